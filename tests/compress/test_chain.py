"""The compression chain end to end: `seektune run` with a compress section, `seektune compress`, a step
that fails its check, and the bad input that stops before anything runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from seektune.cli import main
from seektune.config import BaseBuildConfig, SeektuneConfig
from seektune.models.tiny import ensure_base
from seektune.pipeline import run_compress_stage, run_pipeline
from support import TINY_RECIPE, tiny_run_config
from train import tinymodels


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _files_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _trained_lora_run(tmp_path: Path, base_cache: Path) -> Path:
    raw = tiny_run_config(tmp_path, base_cache, eval={"enabled": False})
    return run_pipeline(SeektuneConfig(**raw)).path


@pytest.mark.slow
def test_run_trains_then_merges_trains_for_int8_and_quantises(tmp_path, base_cache):
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        eval={"compare_base": False},
        compress={
            "enabled": True,
            "qat": {"enabled": True, "max_steps": 2},
            "quantize": {"method": "int8_dynamic"},
            "check_prompts": 4,
            "check_new_tokens": 6,
        },
    )
    run = run_pipeline(SeektuneConfig(**raw)).path
    results = json.loads((run / "compress" / "results.json").read_text())
    assert results["status"] == "completed"
    assert [s["step"] for s in results["steps"]] == ["merge", "qat", "quantize"]
    assert all(s["check"]["passed"] for s in results["steps"])
    merge = results["steps"][0]["check"]["figures"]
    assert merge["max_logit_diff"] < 1e-3  # the merged model computes what base + adapter did
    assert [row["label"] for row in results["table"]] == ["source", "merge", "qat", "quantize"]
    source, merged, _, quantised = results["table"]
    assert merged["parameters"] < source["parameters"]  # the adapter's matrices are folded in
    # the Linear weights are int8; this base's embeddings, head and fused experts (most of it) stay float
    assert quantised["size_on_disk_mb"] < merged["size_on_disk_mb"]
    assert results["steps"][2]["details"]["parameters_quantized"] > 0
    assert results["steps"][1]["details"]["fake_quantized_linears"] > 0
    assert "perplexity" in quantised and "ms_per_token" in quantised
    assert Path(results["final_model"]) == run / "compress" / "03-quantize"
    assert json.loads((run / "compress" / "03-quantize" / "config.json").read_text())["quantization_config"]
    assert "## Compression" in (run / "report.md").read_text()
    assert "Before and after" in (run / "compress" / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compress"]["steps"] == ["merge", "qat", "quantize"]
    with safe_open(str(run / "model" / "adapter_model.safetensors"), "pt") as f:
        assert any("lora_" in key for key in f.keys())  # noqa: SIM118 - safe_open is not iterable


@pytest.mark.slow
def test_compress_command_on_a_run_leaves_its_model_untouched(tmp_path, base_cache, capsys):
    run = _trained_lora_run(tmp_path, base_cache)
    before = _files_digest(run / "model")
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        name="c",
        compress={"source": str(run), "quantize": {"method": "int8_weight_only"}, "evaluate": False},
    )
    code = main(["compress", str(_write(tmp_path, raw))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "compressed model:" in out and "02-quantize" in out
    assert _files_digest(run / "model") == before


def _bpe_llama(folder: Path, layers: int) -> Path:
    eos, pad = 0, 1  # the BPE tokenizer's <|endoftext|> and <|pad|>
    model = tinymodels.llama(
        vocab_size=tinymodels.BPE_VOCAB,
        num_hidden_layers=layers,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=pad,
    )
    model.save_pretrained(folder)
    tinymodels.bpe_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_prune_distill_export_and_quantise_a_llama_in_one_chain(tmp_path, base_cache):
    teacher = _bpe_llama(tmp_path / "teacher", layers=2)
    student = _bpe_llama(tmp_path / "student", layers=1)
    before = _files_digest(teacher), _files_digest(student)
    # random weights: perplexity and greedy tokens say little, so those limits are loose or off
    loose = {"max_perplexity_increase": 1.0, "min_greedy_agreement": None}
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        name="c",
        compress={
            "source": str(teacher),
            "check_prompts": 2,
            "check_new_tokens": 4,
            "evaluate": False,
            "prune": {"enabled": True, "sparsity": 0.3, "steps": 2, "recovery_steps": 1, "check": loose},
            "distill": {"enabled": True, "student": str(student), "max_steps": 2, "batch_size": 4},
            "export": {"gguf": True, "gguf_type": "f32"},
            "quantize": {"method": "int8_weight_only", "check": loose},
        },
    )
    run = run_compress_stage(SeektuneConfig(**raw)).path
    results = json.loads((run / "compress" / "results.json").read_text())
    assert results["status"] == "completed", results
    # distillation first: the student is what gets pruned, exported and quantised
    assert [s["step"] for s in results["steps"]] == ["distill", "prune", "export", "quantize"]
    distill, prune, export, quantize = results["steps"]
    assert [round(s["sparsity_reached"], 2) for s in prune["details"]["per_step"]] == [0.26, 0.3]
    assert distill["details"]["student_parameters"] < distill["details"]["teacher_parameters"]
    # the GGUF file holds the distilled student and reads back with its logits (f32)
    assert export["check"]["figures"]["max_logit_diff"] < 1e-3
    assert (run / "compress" / "03-export" / "model-f32.gguf").is_file()
    # quantize went on from the float student, not from the GGUF folder
    assert quantize["details"]["quantized_linears"] == 7  # one block's q, k, v, o, gate, up, down
    assert Path(results["final_model"]) == run / "compress" / "04-quantize"
    assert (
        json.loads((run / "compress" / "04-quantize" / "config.json").read_text())["num_hidden_layers"] == 1
    )
    assert results["vllm_problems"] == []
    assert [row["label"] for row in results["table"]] == ["source", "distill", "prune", "export", "quantize"]
    assert prune["model_dir"] == str(run / "compress" / "02-prune")
    assert (_files_digest(teacher), _files_digest(student)) == before


@pytest.mark.slow
def test_a_step_that_fails_its_check_stops_the_chain(tmp_path, base_cache):
    run = _trained_lora_run(tmp_path, base_cache)
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        name="c",
        compress={
            "source": str(run),
            "evaluate": False,
            "check_prompts": 2,
            "check_new_tokens": 4,
            # int8 weights cannot reproduce float logits to 1e-9: the check must catch it
            "quantize": {"method": "int8_dynamic", "check": {"max_logit_diff": 1e-9}},
        },
    )
    with pytest.raises(Exception, match=r"compression step quantize failed its check.*max_logit_diff"):
        run_compress_stage(SeektuneConfig(**raw))
    (compressed,) = (tmp_path / "runs").glob("c-*")
    results = json.loads((compressed / "compress" / "results.json").read_text())
    assert results["status"] == "failed" and results["final_model"] is None
    assert (compressed / "compress" / "02-quantize.rejected").is_dir()
    assert not (compressed / "compress" / "02-quantize").exists()
    assert "stopped at quantize" in (compressed / "compress" / "report.md").read_text()
    assert json.loads((compressed / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize(
    ("compress", "expected"),
    [
        ({"quantize": {"method": "bnb_nf4"}}, "needs a CUDA GPU"),
        ({"merge": {"enabled": False}}, "nothing to do"),
        ({"prune": {"enabled": True, "mode": "heads", "sparsity": 1.0}}, "would remove every head"),
        ({"export": {"gguf": True}}, "compress.export.gguf supports llama and qwen2"),
        ({"prune": {"enabled": True, "sparsity": 1.5}}, "compress.prune.sparsity"),
        ({"qat": {"enabled": True}}, "compress.quantize.method to int8_dynamic"),
        ({"distill": {"enabled": True}}, "compress.distill.student"),
    ],
)
def test_bad_compress_configs_stop_with_one_line_and_no_run_dir(
    tmp_path, base_cache, capsys, compress, expected
):
    raw = tiny_run_config(tmp_path, base_cache, compress=compress)
    code = main(["compress", str(_write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "runs").glob("t-*"))


@pytest.mark.parametrize(
    ("method", "compress", "expected"),
    [
        ("full", {}, "compress has nothing to do for the model this run trains"),
        (
            "lora",
            {"merge": {"enabled": False}, "quantize": {"method": "int8_dynamic"}},
            "merge.enabled is false",
        ),
        ("prefix", {"quantize": {"method": "int8_dynamic"}}, "method.name prefix trains weights outside"),
    ],
)
def test_a_run_whose_training_leaves_compress_nothing_to_do_stops_before_training(
    tmp_path, base_cache, capsys, method, compress, expected
):
    raw = tiny_run_config(
        tmp_path, base_cache, method={"name": method}, compress={"enabled": True, **compress}
    )
    code = main(["run", str(_write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "runs").glob("t-*"))


def test_a_student_with_another_tokenizer_is_refused_before_the_run(tmp_path, base_cache, capsys):
    student = tmp_path / "student"
    tinymodels.llama().save_pretrained(student)
    tinymodels.word_tokenizer().save_pretrained(student)
    raw = tiny_run_config(
        tmp_path, base_cache, compress={"distill": {"enabled": True, "student": str(student)}}
    )
    code = main(["compress", str(_write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert code == 2
    assert "same tokenizer" in err and str(student) in err
    assert not list((tmp_path / "runs").glob("t-*"))


def test_an_already_quantised_source_is_refused(tmp_path, base_cache, capsys):
    fake = tmp_path / "quantised"
    shutil.copytree(ensure_base(BaseBuildConfig(**TINY_RECIPE), base_cache), fake, dirs_exist_ok=True)
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao"}
    (fake / "config.json").write_text(json.dumps(config))
    raw = tiny_run_config(
        tmp_path, base_cache, compress={"source": str(fake), "quantize": {"method": "int8_dynamic"}}
    )
    code = main(["compress", str(_write(tmp_path, raw))])
    err = capsys.readouterr().err
    assert code == 2
    assert "already quantised (torchao)" in err
