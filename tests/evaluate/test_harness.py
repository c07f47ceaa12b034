"""The lm-eval adapter: local tasks on a tiny saved DeepSeek-V3 scored by lm-eval equal scoring by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, DeepseekV3Config, PreTrainedTokenizerFast

from seektune.errors import UserError
from seektune.evaluate.harness import harness_rows, harness_table, run_harness

TASK_DIR = Path(__file__).parent / "harness_task"
QA, GEN = "seektune_tiny_qa", "seektune_tiny_gen"
ROWS = [json.loads(line) for line in (TASK_DIR / "seektune_tiny_qa.jsonl").read_text().splitlines()]
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]

needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None, reason="lm-eval is not installed")


def qa_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over every word of the task's questions and choices (ids 0..3 special)."""
    words = [row["question"] + " " + " ".join(row["choices"]) for row in ROWS]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def harness_env(tmp_path_factory: pytest.TempPathFactory):
    """Offline, a private datasets cache, and the task folder as working folder (its YAMLs name their
    data file relative to it)."""
    import datasets.config

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        patch.chdir(TASK_DIR)
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded two-block DeepSeek-V3 (MLA, block 1 MoE) with the task's tokenizer, saved."""
    tokenizer = qa_tokenizer()
    for choice in (c for row in ROWS for c in row["choices"]):  # choices must survive tokenisation
        assert tokenizer.decode(tokenizer(" " + choice, add_special_tokens=False).input_ids) == choice
    config = DeepseekV3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
        initializer_range=0.2,  # wide logits: choices far apart, so the ranking is no coin toss
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-deepseek-qa")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def hand_loglikelihoods(model, tokenizer, row: dict) -> list[float]:
    """Summed log-probability of each choice's tokens after the question, one forward per choice."""
    context = tokenizer(row["question"]).input_ids
    scores = []
    for choice in row["choices"]:
        continuation = tokenizer(" " + choice, add_special_tokens=False).input_ids
        logprobs = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
        # the token at position p is predicted by the logits at p - 1
        scores.append(sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation)))
    return scores


@torch.no_grad()
def hand_generation(model, tokenizer, question: str, max_new_tokens: int, stop: str) -> str:
    """Greedy decoding by argmax over full forwards (no cache), cut at `stop` or the eos token."""
    ids = tokenizer(question).input_ids
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).split(stop)[0]


def sample_loglikelihoods(sample: dict) -> list[float]:
    return [loglikelihood for loglikelihood, _is_greedy in sample["filtered_resps"]]


def accuracy(scores: list[list[float]], rows: list[dict]) -> float:
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return sum(b == r["answer"] for b, r in zip(best, rows, strict=True)) / len(rows)


def load_saved(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_results(harness_env, model_dir: Path) -> dict:
    return run_harness(
        str(model_dir), [QA], include_path=TASK_DIR, batch_size=4, device="cpu",
        include_defaults=False, log_samples=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_scores(model_dir: Path) -> list[list[float]]:
    model, tokenizer = load_saved(model_dir), qa_tokenizer()
    return [hand_loglikelihoods(model, tokenizer, row) for row in ROWS]


@needs_lm_eval
def test_multiple_choice_equals_loglikelihood_ranking_by_hand(base_results: dict, base_scores, model_dir):
    samples = sorted(base_results["samples"][QA], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(6))
    for sample, row, scores in zip(samples, ROWS, base_scores, strict=True):
        assert sample["arguments"] == [[row["question"], " " + c] for c in row["choices"]]
        assert sample_loglikelihoods(sample) == pytest.approx(scores, abs=1e-4)
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-3  # the ranking is decided, not a near tie
    acc = base_results["results"][QA]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(accuracy(base_scores, ROWS))
    assert base_results["n-samples"][QA] == {"original": 6, "effective": 6}
    config = base_results["config"]
    assert config["model"] == "seektune" and config["seektune_model_path"] == str(model_dir)
    json.dumps(base_results)  # JSON-safe, ready for results.json


@needs_lm_eval
def test_limit_and_generation_match_hand_decoding(harness_env, model_dir: Path, base_scores):
    results = run_harness(
        str(model_dir), [f"{QA},{GEN}"], include_path=TASK_DIR, limit=4, batch_size=1, device="cpu",
        include_defaults=False, log_samples=True,
    )  # fmt: skip
    for task in (QA, GEN):
        assert results["n-samples"][task] == {"original": 6, "effective": 4}
        assert len(results["samples"][task]) == 4
    assert results["results"][QA]["acc,none"] == pytest.approx(accuracy(base_scores[:4], ROWS[:4]))
    model, tokenizer = load_saved(model_dir), qa_tokenizer()
    expected = [hand_generation(model, tokenizer, row["question"], 3, "?") for row in ROWS[:4]]
    generated = [s["filtered_resps"][0] for s in sorted(results["samples"][GEN], key=lambda s: s["doc_id"])]
    assert generated == expected
    hits = [text == row["choices"][row["answer"]] for text, row in zip(expected, ROWS[:4], strict=True)]
    assert results["results"][GEN]["exact_match,none"] == pytest.approx(sum(hits) / 4)


@needs_lm_eval
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_run_directory_loads_its_lora_adapter_onto_the_base(
    harness_env, model_dir: Path, base_scores, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "kv_b_proj"], init_lora_weights=False)
    get_peft_model(load_saved(model_dir), lora).save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "status.json").write_text('{"status": "done"}')  # what makes it a run directory
    results = run_harness(
        str(tmp_path / "run"), [QA], include_path=TASK_DIR, limit=2, device="cpu",
        include_defaults=False, log_samples=True,
    )  # fmt: skip
    adapted = PeftModel.from_pretrained(load_saved(model_dir), str(tmp_path / "run" / "model")).eval()
    tokenizer = qa_tokenizer()
    samples = sorted(results["samples"][QA], key=lambda s: s["doc_id"])
    for sample, row, base in zip(samples, ROWS[:2], base_scores[:2], strict=True):
        scores = hand_loglikelihoods(adapted, tokenizer, row)
        assert sample_loglikelihoods(sample) == pytest.approx(scores, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(scores, base, strict=True)) > 1e-2  # the adapter counts
    assert results["config"]["seektune_model_path"] == str(tmp_path / "run" / "model")


@needs_lm_eval
def test_unknown_task_is_a_user_error_before_any_model_loads(harness_env):
    with pytest.raises(UserError) as raised:
        run_harness("/no/such/model", ["seektune_tiny_q"], include_path=TASK_DIR, include_defaults=False)
    message = str(raised.value)
    assert "'seektune_tiny_q'" in message and "did you mean seektune_tiny_qa" in message
    assert "include_path" in message and "lm-eval ls tasks" in message
    assert "\n" not in message


@needs_lm_eval
def test_missing_include_path_and_bad_limit_are_user_errors(harness_env, tmp_path):
    with pytest.raises(UserError, match=r"include_path .*does not exist"):
        run_harness("m", [QA], include_path=tmp_path / "nowhere", include_defaults=False)
    with pytest.raises(UserError, match="limit must be at least 1"):
        run_harness("m", [QA], include_path=TASK_DIR, limit=0, include_defaults=False)


@needs_lm_eval
def test_task_data_that_cannot_be_read_is_a_user_error(harness_env, model_dir: Path, tmp_path):
    yaml = (TASK_DIR / "seektune_tiny_qa.yaml").read_text().replace("task: seektune_tiny_qa", "task: moved")
    (tmp_path / "moved.yaml").write_text(yaml.replace("test: seektune_tiny_qa.jsonl", "test: gone.jsonl"))
    with pytest.raises(UserError, match=r"could not load a task's data \(.*gone.*local copy of the task"):
        run_harness(str(model_dir), ["moved"], include_path=tmp_path, device="cpu", include_defaults=False)


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'seektune\[harness\]'"):
        run_harness("tiny-deepseek-v3", ["hellaswag"])


@needs_lm_eval
def test_seektune_is_a_registered_model_type_beside_lm_evals_own():
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from seektune.evaluate.harness import SeektuneLM

    assert get_model("seektune") is SeektuneLM and issubclass(SeektuneLM, HFLM)
    assert get_model("hf") is HFLM  # registering ours first must not hide lm-eval's types
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


@needs_lm_eval
def test_model_args_seektune_cannot_honour_are_user_errors():
    from seektune.evaluate.harness import SeektuneLM

    with pytest.raises(UserError, match="dtype='float8'"):
        SeektuneLM(model="tiny-deepseek-v3", dtype="float8")
    with pytest.raises(UserError, match="does not take peft: give the adapter folder"):
        SeektuneLM(model="tiny-deepseek-v3", peft="some/adapter")


@needs_lm_eval
def test_model_args_reach_seektunes_loader(monkeypatch, tmp_path):
    import seektune.models.load
    from seektune.evaluate.harness import SeektuneLM

    seen = []

    def record(cfg):
        seen.append(cfg)
        raise UserError("stop here")

    monkeypatch.setattr(seektune.models.load, "load_model", record)
    with pytest.raises(UserError, match="stop here"):
        SeektuneLM(model="tiny-deepseek-v3", device="cpu", dtype="float32", cache_dir=str(tmp_path))
    assert (seen[0].name_or_path, seen[0].device, seen[0].dtype) == ("tiny-deepseek-v3", "cpu", "float32")
    assert seen[0].cache_dir == tmp_path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@needs_lm_eval
def test_cuda_on_a_machine_without_it_says_to_pass_device_cpu():
    from seektune.evaluate.harness import SeektuneLM

    with pytest.raises(UserError, match="pass --device cpu"):
        SeektuneLM(model="tiny-deepseek-v3", device="cuda:0")


RESULTS = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.125, "acc_norm,none": 0.5,
                     "acc_norm_stderr,none": 0.0625, "sample_len": 4},
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 12.5, "word_perplexity_stderr,none": "N/A"},
    },
    "versions": {"arc_easy": 1.0, "wikitext": 2.0},
    "n-shot": {"arc_easy": 0, "wikitext": 0},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "wikitext": {"word_perplexity": False}},
}  # fmt: skip


def test_harness_rows_and_table_lay_out_every_metric():
    assert harness_rows(RESULTS) == [
        ("arc_easy", "1.0", "none", "0", "acc", "↑", "0.2500", "0.1250"),
        ("", "", "none", "", "acc_norm", "↑", "0.5000", "0.0625"),
        ("wikitext", "2.0", "none", "0", "word_perplexity", "↓", "12.5000", "N/A"),
    ]
    console = Console(record=True, width=140)
    console.print(harness_table(RESULTS))
    text = console.export_text()
    assert "lm-evaluation-harness" in text and "word_perplexity" in text and "0.0625" in text


@needs_lm_eval
@pytest.mark.slow
def test_python_m_runs_lm_evals_own_cli_with_the_seektune_type(model_dir: Path, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path),
    }
    command = [
        sys.executable, "-m", "seektune.evaluate.harness", "--model", "seektune",
        "--model_args", f"model={model_dir}", "--tasks", QA, "--include_path", str(TASK_DIR),
        "--device", "cpu", "--limit", "2", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert QA in done.stdout and "acc" in done.stdout
    (written,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["n-samples"][QA]["effective"] == 2 and 0 <= results["results"][QA]["acc,none"] <= 1
    assert results["config"]["model"] == "seektune"


@needs_lm_eval
def test_harness_command_prints_the_table_and_writes_the_results(
    harness_env, model_dir: Path, tmp_path, capsys
):
    from seektune.cli import main

    out = tmp_path / "results.json"
    args = ["harness", "--model", str(model_dir), "--tasks", QA, "--include-path", str(TASK_DIR)]
    args += ["--no-builtin-tasks", "--limit", "2", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert QA in printed and "acc" in printed
    assert json.loads(out.read_text())["n-samples"][QA] == {"original": 6, "effective": 2}
