"""Tiny random-weight models of each family, saved once per session with a tiny DeepSeek tokenizer."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from seektune.models.families import DEEPSEEK_SPECIAL_TOKENS

VOCAB = 128
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "def add ( a , b ) : return a + b",
    "what is the capital of france ? paris is the capital",
    "import os and read the file then print the result",
    "a list holds items , a dict maps keys to values",
]
_SPECIALS = ["<unk>", *DEEPSEEK_SPECIAL_TOKENS.values()]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over SENTENCES with DeepSeek's special tokens (ids 0..7)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token=DEEPSEEK_SPECIAL_TOKENS["bos"],
        eos_token=DEEPSEEK_SPECIAL_TOKENS["eos"],
        pad_token=DEEPSEEK_SPECIAL_TOKENS["pad"],
        extra_special_tokens=[
            DEEPSEEK_SPECIAL_TOKENS[k] for k in ("user", "assistant", "think_open", "think_close")
        ],
    )


_IDS = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 7}
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_MLA = {"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}
_MOE = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 16}

FAMILY_CONFIGS: dict[str, PretrainedConfig] = {
    # Layer 0 dense MLP, layer 1 MoE (routed + shared experts); q_lora_rank set as in V3/R1.
    "deepseek_v3": DeepseekV3Config(
        **_IDS,
        **_SMALL,
        **_MLA,
        **_MOE,
        q_lora_rank=16,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        max_position_embeddings=64,
    ),
    # V2-Lite shape: no query down projection (q_proj), MoE from layer 1.
    "deepseek_v2": DeepseekV2Config(
        **_IDS,
        **_SMALL,
        **_MLA,
        **_MOE,
        q_lora_rank=None,
        first_k_dense_replace=1,
        topk_method="greedy",
        max_position_embeddings=64,
    ),
    "llama": LlamaConfig(**_IDS, **_SMALL, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": Qwen2Config(**_IDS, **_SMALL, num_key_value_heads=2, max_position_embeddings=64),
}


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model directory per family (model + tokenizer, no chat template)."""
    dirs = {}
    tokenizer = build_tokenizer()
    for family, config in FAMILY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out = tmp_path_factory.mktemp(family)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs[family] = out
    return dirs


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the hub (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
