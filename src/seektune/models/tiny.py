"""The offline base model `tiny-deepseek-v3`, built on this machine from Python's own documentation.

No model hub can be reached here, so seektune makes its default base itself:

1. a byte-level BPE tokenizer trained with `tokenizers` on the standard library's documentation
   (`seektune.data.stdlib_docs`), with DeepSeek's special tokens and chat template;
2. a small `DeepseekV3ForCausalLM` (MLA attention, one dense block then MoE blocks with a shared expert)
   built from transformers' own config class;
3. a short causal-LM pre-training on the same corpus (train-split texts only), so the base has learnt
   English and the docs' style and is not random.

The result is saved with `save_pretrained`, so it loads exactly like a hub checkpoint. It is cached under
the user's cache directory in a folder named by a hash of the recipe, the seektune version and the Python
version (the corpus is this Python's documentation), and built into a temporary folder that is renamed into
place when complete, so an interrupted build never leaves a half-written model.

The pre-training loop is a plain PyTorch loop (AdamW + transformers' cosine schedule): the recipe is fixed,
needs no evaluation, checkpoints or callbacks, and a plain loop keeps it readable top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from platformdirs import user_cache_dir

from seektune import __version__
from seektune.config import BUILTIN_BASE, BaseBuildConfig
from seektune.logs import log_event, progress
from seektune.models.families import DEEPSEEK_CHAT_TEMPLATE, DEEPSEEK_SPECIAL_TOKENS

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The user's cache directory for seektune."""
    return Path(user_cache_dir("seektune", appauthor=False))


def base_dir(recipe: BaseBuildConfig, cache_dir: Path | None = None) -> Path:
    """Where the base built from `recipe` lives (whether or not it has been built yet)."""
    key = json.dumps(
        {"recipe": recipe.model_dump(), "seektune": __version__, "python": sys.version_info[:2]},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir()) / "base" / f"{BUILTIN_BASE}-{digest}"


def ensure_base(recipe: BaseBuildConfig, cache_dir: Path | None = None) -> Path:
    """The directory of the built base, building it first when it is not cached yet."""
    target = base_dir(recipe, cache_dir)
    if (target / "config.json").is_file():
        return target
    return build_base(recipe, cache_dir)


def build_base(recipe: BaseBuildConfig, cache_dir: Path | None = None) -> Path:
    """Build the base from scratch (even if cached) and return its directory."""
    target = base_dir(recipe, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log_event(logger, "base build started", target=str(target))
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as tmp:
        work = Path(tmp) / "model"
        texts = _corpus(recipe.seed)
        tokenizer = train_tokenizer(texts, recipe.vocab_size)
        model = make_model(recipe, tokenizer)
        stats = pretrain(model, tokenizer, texts, recipe)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        stats["build_seconds"] = round(time.perf_counter() - started, 1)
        stats["parameters"] = sum(p.numel() for p in model.parameters())
        (work / "seektune_base.json").write_text(
            json.dumps({"recipe": recipe.model_dump(), **stats}, indent=2)
        )
        if target.exists():  # a concurrent build finished first, or a forced rebuild
            shutil.rmtree(target)
        os.replace(work, target)
    log_event(logger, "base build finished", target=str(target), **stats)
    return target


def _corpus(seed: int) -> list[str]:
    from seektune.data.stdlib_docs import pretraining_texts

    texts = pretraining_texts()
    random.Random(seed).shuffle(texts)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer with DeepSeek's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        DEEPSEEK_SPECIAL_TOKENS[k]
        for k in ("bos", "eos", "pad", "user", "assistant", "think_open", "think_close")
    ]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=DEEPSEEK_SPECIAL_TOKENS["bos"],
        eos_token=DEEPSEEK_SPECIAL_TOKENS["eos"],
        pad_token=DEEPSEEK_SPECIAL_TOKENS["pad"],
        additional_special_tokens=specials[3:],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = DEEPSEEK_CHAT_TEMPLATE
    return tokenizer


def make_model(recipe: BaseBuildConfig, tokenizer):  # -> DeepseekV3ForCausalLM
    """A randomly initialised DeepSeek-V3 (MLA + MoE) of the recipe's size, seeded."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    heads = recipe.num_attention_heads
    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        moe_intermediate_size=recipe.moe_intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_shared_experts=1,
        n_routed_experts=recipe.n_routed_experts,
        num_experts_per_tok=recipe.num_experts_per_tok,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=max(16, recipe.hidden_size // 2),
        kv_lora_rank=max(16, recipe.hidden_size // 3),
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=max(2048, recipe.context_length),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_mtp_layers=0,
    )
    torch.manual_seed(recipe.seed)
    return DeepseekV3ForCausalLM(config)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each opened by BOS and closed by EOS (so the base learns both)."""
    ids: list[int] = []
    # The raw `tokenizers` object: fast, and no warning about documents longer than model_max_length.
    for encoded in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend([tokenizer.bos_token_id, *encoded.ids, tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model, tokenizer, texts: list[str], recipe: BaseBuildConfig) -> dict:
    """Causal-LM pre-training on random windows of the corpus; returns loss figures for the record."""
    from transformers import get_cosine_schedule_with_warmup

    stream = _token_stream(tokenizer, texts)
    window = recipe.context_length
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    warmup = max(1, recipe.pretrain_steps // 20)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, max(recipe.pretrain_steps, 1))
    model.train()
    losses: list[float] = []
    with progress("pre-training the offline base", total=recipe.pretrain_steps) as bar:
        for _step in range(recipe.pretrain_steps):
            starts = torch.randint(0, len(stream) - window - 1, (recipe.batch_size,), generator=generator)
            batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.advance()
            bar.update(loss=round(loss.item(), 3))
    model.eval()
    tail = losses[-20:] or [math.nan]
    return {
        "corpus_tokens": len(stream),
        "trained_tokens": recipe.pretrain_steps * recipe.batch_size * window,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 4),
    }
