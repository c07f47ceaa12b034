"""Batch collators: padded examples, or packed rows that keep their examples apart.

Unpacked examples go through transformers' `DataCollatorForSeq2Seq` (pad token, labels -100, an
`attention_mask`). Packed rows (`seektune.data.pack`) need our own small collator: transformers has none
that pads rows holding several examples each. Each row is padded to the batch's longest row with the pad
token and labels -100, and the padding gets `position_ids` 0, 1, ... as a sequence of its own. There is no
`attention_mask`: transformers then reads the example boundaries from the restarting `position_ids`
(a block-diagonal causal mask for sdpa/eager, variable-length kernels for flash-attention), which an
attention mask would switch off. transformers reads them only when no key-value cache is built, and a
model whose config has `use_cache=True` (the default) builds one even for a plain forward pass, so the
packed batch says `use_cache=False` itself (the Trainer also sets it, but evaluation code may not).

Both collators keep only what the model takes (`input_ids`, `labels`, `position_ids`), so a dataset may
carry `length`, `source` and other columns for samplers and reports, and add `num_real_tokens` (the batch's
non-padding tokens), which `seektune.train.loop.SeektuneTrainer` counts and removes before the forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from seektune.data.encode import IGNORE_INDEX

UNPACKED_KEYS = ("input_ids", "labels")
REAL_TOKENS_KEY = "num_real_tokens"


class PaddingCollator:
    """Unpacked examples padded to the batch's longest (transformers' `DataCollatorForSeq2Seq`)."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorForSeq2Seq

        self._pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._pad([{key: feature[key] for key in UNPACKED_KEYS} for feature in features])
        batch[REAL_TOKENS_KEY] = sum(len(feature["input_ids"]) for feature in features)
        return batch


class PackedCollator:
    """Packed rows padded to the batch's longest row; no attention mask, positions restart per example."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(feature["input_ids"]) for feature in features)
        shape = (len(features), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        # Padding positions count 0, 1, ...: transformers sees the padding as one more sequence.
        position_ids = torch.arange(longest, dtype=torch.long).repeat(len(features), 1)
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            input_ids[row, :size] = torch.as_tensor(feature["input_ids"])
            labels[row, :size] = torch.as_tensor(feature["labels"])
            position_ids[row, :size] = torch.as_tensor(feature["position_ids"])
            position_ids[row, size:] -= size
        # A key-value cache would hide the packing from transformers' mask builder (see module docstring).
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "use_cache": False,
            REAL_TOKENS_KEY: sum(len(feature["input_ids"]) for feature in features),
        }


def collator_for(train_set: Any, tokenizer: Any) -> PaddingCollator | PackedCollator:
    """The packed collator when `train_set` holds packed rows (a `position_ids` column), else padding."""
    if "position_ids" in train_set.column_names:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PackedCollator(pad)
    return PaddingCollator(tokenizer)
