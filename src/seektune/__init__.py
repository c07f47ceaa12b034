"""seektune: customise DeepSeek-family language models end to end."""

import logging

__version__ = "0.1.0"

# Import-time noise that tells a user nothing: torchao's CUDA-only kernels failing to load on a CPU, and
# torch's deprecation warning for the enums torchao registers (transformers imports torchao when present).
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
