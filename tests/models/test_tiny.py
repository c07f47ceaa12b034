"""The offline base tiny-deepseek-v3: deterministic, cached, a DeepSeek-V3 that loads like a hub model."""

import json

import torch
import yaml

from seektune.cli import main
from seektune.config import BaseBuildConfig, ModelConfig
from seektune.models.load import load_model
from seektune.models.tiny import base_dir, build_base, ensure_base
from support import TINY_RECIPE


def test_builtin_name_loads_a_pretrained_deepseek_v3(base_cache):
    loaded = load_model(ModelConfig(name_or_path="tiny-deepseek-v3", cache_dir=base_cache, base=TINY_RECIPE))
    assert loaded.family.name == "deepseek_v3"
    assert type(loaded.model).__name__ == "DeepseekV3ForCausalLM"
    assert loaded.model.config.n_routed_experts == TINY_RECIPE["n_routed_experts"]
    assert loaded.model.config.q_lora_rank and loaded.model.config.kv_lora_rank  # MLA
    tok = loaded.tokenizer
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    record = json.loads(
        (base_dir(BaseBuildConfig(**TINY_RECIPE), base_cache) / "seektune_base.json").read_text()
    )
    assert record["final_loss"] < record["first_loss"] - 1.0  # pre-trained: not random


def test_build_is_deterministic_and_cached(tmp_path):
    recipe = BaseBuildConfig(**{**TINY_RECIPE, "pretrain_steps": 3})
    first = build_base(recipe, tmp_path / "a")
    second = build_base(recipe, tmp_path / "b")
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_base(recipe, tmp_path / "a") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp  # cached: not rebuilt
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".building-")]


def test_cli_base_build_prints_the_directory(tmp_path, capsys, base_cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"cache_dir": str(base_cache), "base": TINY_RECIPE}}))
    assert main(["base", "build", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(base_dir(BaseBuildConfig(**TINY_RECIPE), base_cache))
