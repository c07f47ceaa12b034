"""Model families seektune knows: which `config.model_type` belongs to which family, the LoRA target
modules of each, and DeepSeek's chat template.

transformers loads every architecture, but it has no notion of "the modules worth adapting" per
family, and the DeepSeek-LLM/Coder base checkpoints ship without a chat template. Those two facts are
what this module adds. Every module name below was checked against the modelling code of
transformers 5.23 (`modeling_deepseek_v3.py`, `modeling_deepseek_v2.py`, `modeling_llama.py`,
`modeling_qwen2.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from seektune.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyPreset:
    """What seektune needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    lora_target_modules: tuple[str, ...]
    description: str


# Multi-head latent attention (MLA), same module names in DeepSeek-V2 and V3:
#   q_proj                   query projection when the config has no q_lora_rank (V2-Lite)
#   q_a_proj / q_b_proj      query down / up projection when q_lora_rank is set (V2, V3, R1)
#   kv_a_proj_with_mqa       key/value down projection (+ the shared rotary key)
#   kv_b_proj                key/value up projection
#   o_proj                   output projection
# gate/up/down_proj are the dense MLP of the first `first_k_dense_replace` layers and the
# `mlp.shared_experts` of the MoE layers. The routed experts (`mlp.experts.gate_up_proj`,
# `mlp.experts.down_proj`) are fused 3-D nn.Parameters in transformers 5.x, not nn.Linear modules, so
# no module name (nor "all-linear") reaches them (methods.py stops PEFT from re-reading gate/up/down_proj
# as routed-expert names, huggingface/peft#3711). Names a model lacks (q_proj next to q_a_proj) are
# dropped when the preset is applied, so one preset serves V2 and V2-Lite.
_MLA_TARGETS = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ROUTED_EXPERTS_NOTE = (
    " LoRA reaches attention, the dense MLP and the shared experts; the routed experts are fused 3-D"
    " parameters in transformers 5.x (not nn.Linear) and stay frozen unless method.lora.include_experts"
    " adapts them too."
)

FAMILIES: dict[str, FamilyPreset] = {
    "deepseek_v3": FamilyPreset(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        lora_target_modules=_MLA_TARGETS,
        description="DeepSeek-V3 and R1: multi-head latent attention (MLA) + mixture of experts."
        + _ROUTED_EXPERTS_NOTE,
    ),
    "deepseek_v2": FamilyPreset(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        lora_target_modules=_MLA_TARGETS,
        description="DeepSeek-V2, V2-Lite and Coder-V2: MLA (V2-Lite without a query down projection)"
        " + mixture of experts." + _ROUTED_EXPERTS_NOTE,
    ),
    "llama": FamilyPreset(
        name="llama",
        model_types=("llama",),
        lora_target_modules=_DENSE_TARGETS,
        description="DeepSeek-LLM, DeepSeek-Coder and DeepSeek-R1-Distill-Llama: Llama architecture.",
    ),
    "qwen2": FamilyPreset(
        name="qwen2",
        model_types=("qwen2",),
        lora_target_modules=_DENSE_TARGETS,
        description="DeepSeek-R1-Distill-Qwen: Qwen2 architecture.",
    ),
}


def detect_family(model_config: Any, override: str = "auto") -> FamilyPreset:
    """The family of a model config (anything with `.model_type`); `override` forces one by name."""
    model_type = getattr(model_config, "model_type", None)
    if override != "auto":
        preset = FAMILIES[override]
        if model_type not in preset.model_types:
            logger.warning("model_type %r is treated as family %r (model.family)", model_type, override)
        return preset
    for preset in FAMILIES.values():
        if model_type in preset.model_types:
            return preset
    raise UserError(
        f"model_type {model_type!r} is not a family seektune knows (supported: {', '.join(FAMILIES)}); "
        "set model.family to one of them to force its preset."
    )


DEEPSEEK_SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
    "think_open": "<think>",
    "think_close": "</think>",
    "pad": "<｜▁pad▁｜>",
}

# DeepSeek-R1's template (tokenizer_config.json of deepseek-ai/DeepSeek-R1), without tool calls:
# bos, all system prompts joined by a blank line, then <｜User｜>... and
# <｜Assistant｜>...<｜end▁of▁sentence｜> turns.
# Like R1 it drops the reasoning (text up to the last </think>) of assistant turns in the history. Unlike
# R1 it keeps the reasoning of a conversation's final assistant message, which is the training target
# when fine-tuning on reasoning traces. The generation prompt opens <think>\n only when `thinking` is true.
DEEPSEEK_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set ns = namespace(system_prompt='', is_first_sp=true) -%}
{%- for message in messages if message['role'] == 'system' -%}
    {%- if ns.is_first_sp -%}
        {%- set ns.system_prompt = message['content'] -%}
        {%- set ns.is_first_sp = false -%}
    {%- else -%}
        {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] -%}
    {%- endif -%}
{%- endfor -%}
{{- ns.system_prompt -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<｜User｜>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- set content = message['content'] -%}
        {%- if '</think>' in content and not loop.last -%}
            {%- set content = content.split('</think>')[-1] -%}
        {%- endif -%}
        {{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('this chat template knows the roles system, user and assistant, not '
                            + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<｜Assistant｜>' -}}
    {%- if thinking is defined and thinking -%}
        {{- '<think>\n' -}}
    {%- endif -%}
{%- endif -%}
"""


def ensure_chat_template(tokenizer: Any, override: str | None = None) -> None:
    """Give `tokenizer` a chat template: `override`, else its own, else DeepSeek's.

    The preset hard-codes DeepSeek's role tokens; a tokenizer that lacks them as special tokens (an old
    DeepSeek-LLM base) still works, it just spells them out in ordinary tokens.
    """
    if override is not None:
        tokenizer.chat_template = override
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEEPSEEK_CHAT_TEMPLATE
        logger.info("the tokenizer has no chat template: applied the DeepSeek-R1 preset template")
