"""Tiny models (Llama, DeepSeek-V3), a word-level tokenizer and domain-labelled examples for tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, PreTrainedTokenizerFast

VOCAB = 64
PAD = 7
EASY_TOKEN = 10


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Tokens t0 .. t63, pad t7, eos t2."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
        pad_token=f"t{PAD}",
        eos_token="t2",
    )


def llama(**config_overrides):
    """A seeded two-block Llama (hidden 32, 4 heads, 2 key-value heads), untied head; `config_overrides`
    for another tokenizer (vocab_size, pad/bos/eos ids)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": PAD,
            **config_overrides,
        }
    )
    return AutoModelForCausalLM.from_config(config).float()


def deepseek_v3(**config_overrides):
    """A seeded DeepSeek-V3: MLA attention, block 0 dense, block 1 MoE with 4 fused routed experts (2 per
    token) and a shared expert; `config_overrides` as for `llama`."""
    torch.manual_seed(0)
    config = DeepseekV3Config(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 2,
            "first_k_dense_replace": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,  # the default (128) leaves 0 key-value groups: eager attention fails
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "n_group": 1,
            "topk_group": 1,
            "pad_token_id": PAD,
            **config_overrides,
        }
    )
    return AutoModelForCausalLM.from_config(config).float()


def domain_split(sizes: dict[str, int], seed: int = 0) -> Dataset:
    """Unpacked examples of each domain; 'easy' repeats one token, the others are random tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "length": [], "source": []}
    for domain, count in sizes.items():
        for _ in range(count):
            size = int(torch.randint(4, 10, (1,), generator=generator))
            if domain == "easy":
                ids = [EASY_TOKEN] * size
            else:
                ids = torch.randint(8, VOCAB, (size,), generator=generator).tolist()
            rows["input_ids"].append(ids)
            rows["labels"].append([-100, *ids[1:]])
            rows["length"].append(size)
            rows["source"].append(domain)
    return Dataset.from_dict(rows)


BPE_VOCAB = 300
BPE_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
BPE_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer",
    "seektune compresses models: merge, prune, distil, export",
    "12 apples and 345 pears cost 6.78",
]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (as the R1 distills have) of 300 tokens, trained on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(BPE_TEXTS * 5, trainer)
    assert tokenizer.get_vocab_size() == BPE_VOCAB
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = BPE_TEMPLATE
    return fast
