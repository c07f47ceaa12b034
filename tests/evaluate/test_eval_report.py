"""eval/report.md and report.html: every section from a full evaluation, the same cells in both, escaping,
missing values that never turn into numbers, the plots, the terminal table and the run report's section."""

from __future__ import annotations

import base64
import copy
import json
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from seektune.config import EvalConfig
from seektune.evaluate import report_plots
from seektune.evaluate.compare import compare_models
from seektune.evaluate.report import eval_markdown_section, summary_table, write_eval_report
from seektune.evaluate.robustness import distractor_sentences, measure_robustness
from seektune.evaluate.scorecard import build_scorecard
from seektune.evaluate.stats import ExampleStats, mean_stats
from seektune.report import _fmt_num, _md_escape
from seektune.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_LABEL = "no test example has a label: map a label column (data.sources[].fields.label)"
INJECTION = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def _robustness(clean: float, drops: dict[str, list[float]], score: float) -> dict[str, Any]:
    rates = [0.05, 0.1, 0.2]
    return {
        "metric": "rouge_l",
        "n": 32,
        "rates": rates,
        "clean": {"rouge_l": clean, "perplexity": 10.0},
        "curves": {
            kind: {str(r): {"rouge_l": clean - d, "perplexity": 11.0} for r, d in zip(rates, ds, strict=True)}
            for kind, ds in drops.items()
        },
        "drop": {kind: {str(r): d for r, d in zip(rates, ds, strict=True)} for kind, ds in drops.items()},
        "relative_drop": {
            kind: {str(r): d / clean for r, d in zip(rates, ds, strict=True)} for kind, ds in drops.items()
        },
        "skipped": {"chinese": "no test prompt has Han characters"},
        "changed_share": {kind: {str(r): 1.0 for r in rates} for kind in drops},
        "score": score,
        "examples": [
            {"kind": "typo", "rate": 0.1, "clean": "How do I open a file?", "noisy": "How do I oepn a flie?"},
            {
                "kind": "distractor",
                "rate": 0.1,
                "clean": "Explain 列表推导.",
                "noisy": "Explain 列表推导. Sets hash.",
            },
        ],
    }


def _efficiency(ms_per_token: float, ttft: float) -> dict[str, Any]:
    return {
        "device": "cpu",
        "prompts": 8,
        "new_tokens": 32,
        "batch_size": 8,
        "ttft_ms": ttft,
        "ttft_ms_p90": ttft * 1.5,
        "ms_per_token": ms_per_token,
        "ms_per_token_p90": ms_per_token * 1.25,
        "tokens_per_s_batch1": 1000 / ms_per_token,
        "tokens_per_s_batched": 4 * 1000 / ms_per_token,
        "peak_memory_mb": 1500.0,
        "memory_before_mb": 1200.0,
        "parameters": 120_000_000,
        "size_on_disk_mb": 240.0,
        "size_on_disk": {"/models/base": 240.0},
        "ttft_ms_all": [ttft + i for i in range(8)],
        "token_ms_all": [ms_per_token + (i % 5) for i in range(8 * 31)],
    }


def _scorecard(accuracy: float, robustness: float, overall: float) -> dict[str, Any]:
    fairness_reason = "set eval.fairness.attribute to measure it"
    return {
        "dimensions": {
            "accuracy": {"score": accuracy, "weight": 0.3, "detail": f"ROUGE-L {accuracy}", "reason": None},
            "robustness": {"score": robustness, "weight": 0.2, "detail": None, "reason": None},
            "efficiency": {"score": 1.0, "weight": 0.15, "detail": None, "reason": None},
            "explainability": {"score": 0.6, "weight": 0.15, "detail": None, "reason": None},
            "fairness": {"score": None, "weight": 0.1, "detail": None, "reason": fairness_reason},
            "adaptability": {"score": 0.1, "weight": 0.1, "detail": None, "reason": None},
        },
        "overall": overall,
        "weight_measured": 0.9,
    }


def _entry(model: str, metrics: dict[str, float], **sections: Any) -> dict[str, Any]:
    return {
        "model": model,
        "metrics": metrics,
        "missing": {"accuracy": NO_LABEL, "macro_f1": NO_LABEL},
        "warnings": [],
        "seconds": 12.5,
        **sections,
    }


def full_evaluation() -> dict[str, Any]:
    """Two models with every section filled, the way the evaluation stage writes them."""
    base = _entry(
        "tiny-deepseek-v3",
        {
            "perplexity": 12.3,
            "exact_match": 0.1,
            "token_f1": 0.3,
            "rouge_l": 0.12,
            "bleu": 0.05,
            "eos_rate": 0.4,
            "mean_new_tokens": 40.0,
            "n": 50,
        },
        robustness=_robustness(0.12, {"typo": [0.01, 0.02, 0.04], "distractor": [0.0, 0.01, 0.03]}, 0.8),
        efficiency=_efficiency(20.0, 35.0),
        explainability={
            "attention_on_prompt": 0.62,
            "n": 16,
            "per_layer": [0.7, 0.54],
            "method": "mean share",
        },
        fairness={
            "attribute": "metadata.gender",
            "metric": "rouge_l",
            "gap": 0.05,
            "left_out": {"x": 2},
            "groups": {"f": {"value": 0.1, "n": 24}, "m": {"value": 0.15, "n": 24}},
        },
        adaptability={"source": "medical-qa", "n": 20, "metrics": {"rouge_l": 0.08, "perplexity": 30.0}},
        scorecard=_scorecard(0.12, 0.8, 0.5),
        warnings=["3 of 50 answers are empty"],
    )
    tuned = _entry(
        "runs/demo/checkpoints/final",
        {
            "perplexity": 8.1,
            "exact_match": 0.08,
            "token_f1": 0.35,
            "rouge_l": 0.211,
            "bleu": 0.06,
            "eos_rate": 0.7,
            "mean_new_tokens": 31.5,
            "n": 50,
        },
        robustness=_robustness(0.211, {"typo": [0.005, 0.01, 0.02], "distractor": [0.0, 0.0, 0.01]}, 0.95),
        efficiency=_efficiency(22.0, 40.0),
        explainability={"attention_on_prompt": 0.7, "n": 16, "per_layer": [0.8, 0.6], "method": "mean share"},
        fairness={
            "attribute": "metadata.gender",
            "metric": "rouge_l",
            "gap": 0.02,
            "left_out": {"x": 2},
            "groups": {"f": {"value": 0.2, "n": 24}, "m": {"value": 0.22, "n": 24}},
        },
        adaptability={"source": "medical-qa", "n": 20, "metrics": {"rouge_l": 0.1, "perplexity": 25.0}},
        scorecard=_scorecard(0.211, 0.95, 0.6),
    )
    return {
        "primary_metric": "rouge_l",
        "models": {"base": base, "tuned": tuned},
        "comparison": {
            "a": "base",
            "b": "tuned",
            "confidence": 0.95,
            "samples": 1000,
            "summary": "tuned is better than base on ROUGE-L (+0.091, 95% CI +0.05..+0.13) and perplexity.",
            "examples_metric": "rouge_l",
            "metrics": {
                "rouge_l": _bootstrap("rouge_l", 0.12, 0.211, 0.05, 0.13, "B better"),
                "perplexity": _bootstrap("perplexity", 12.3, 8.1, -5.1, -3.3, "B better", higher=False),
                "exact_match": _bootstrap("exact_match", 0.1, 0.08, -0.04, -0.001, "A better"),
                "bleu": _bootstrap("bleu", 0.05, 0.06, -0.01, 0.03, "no significant difference"),
            },
            "examples": [
                {
                    "index": 7,
                    "prompt": f"Explain {INJECTION}",
                    "reference": "Use `open()`.",
                    "a_output": "",
                    "b_output": "用 open() 打开文件。\nThen read it.",
                    "a_score": 0.0,
                    "b_score": 0.8,
                },
                {
                    "index": 3,
                    "prompt": "What is a dict?",
                    "reference": "A mapping.",
                    "a_output": "A list.",
                    "b_output": "A mapping of keys.",
                    "a_score": 0.1,
                    "b_score": 0.6,
                },
            ],
        },
        "review": {
            "models": {
                "base": {"mean": 2.5, "n": 10, "win_rate": 0.25},
                "tuned": {"mean": 3.8, "n": 10, "win_rate": 0.75},
            },
            "rated_rows": 10,
            "rows": 12,
            "sheet": "filled.csv",
        },
    }


def _bootstrap(metric: str, a: float, b: float, low: float, high: float, verdict: str, higher: bool = True):
    return {
        "metric": metric,
        "a": a,
        "b": b,
        "diff": b - a,
        "relative_diff": (b - a) / a,
        "ci_low": low,
        "ci_high": high,
        "p_value": 0.01,
        "higher_is_better": higher,
        "verdict": verdict,
        "n": 50,
    }


def _perplexity(nll: np.ndarray, tokens: np.ndarray) -> ExampleStats:
    stats = np.stack([nll * tokens, tokens], axis=1)
    return ExampleStats("perplexity", stats, lambda t: np.exp(t[..., 0] / t[..., 1]), higher_is_better=False)


def produced_evaluation(examples_metric: str = "rouge_l", n: int = 24) -> dict[str, Any]:
    """Two models' evaluation made by the real producers, without a model: per-example statistics into
    `compare_models`, `measure_robustness` with a fake score callback, `build_scorecard`; then a JSON round
    trip, as `seektune review import` re-renders it from eval/results.json. The metrics are
    [accuracy, rouge_l, perplexity]: the primary metric is accuracy, and the examples are ranked by
    `examples_metric` (rouge_l, as the evaluation chooses a metric that scores answers; or accuracy, with
    the gold labels as references and the predicted labels as outputs)."""
    cfg = EvalConfig.model_validate(
        {
            "metrics": ["accuracy", "rouge_l", "perplexity"],
            "robustness": {"max_samples": 8, "noise_rates": [0.1, 0.3]},
            "efficiency": {"enabled": False},
            "explainability": {"enabled": False},
            "compare": {"bootstrap_samples": 300, "examples": 2},
        }
    )
    rng = np.random.default_rng(0)
    questions = [f"Question {i}: how do I open file {i}? 请解释第{i}个例子。" for i in range(n)]
    references = [f"Use open() on file {i}. 然后读取它。" for i in range(n)]
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        for q, r in zip(questions, references, strict=True)
    ]
    rouge = {"base": rng.uniform(0.1, 0.3, n)}
    rouge["tuned"] = rouge["base"] + rng.uniform(0.05, 0.15, n)
    rouge["tuned"][5] += 0.5  # ROUGE-L differs most at example 5
    correct = {"base": np.ones(n), "tuned": np.ones(n)}
    correct["base"][[2, 9]] = 0.0  # accuracy differs at examples 2 and 9
    nll = {"base": rng.uniform(2.0, 3.0, n)}
    nll["tuned"] = nll["base"] - 0.5
    tokens = rng.integers(5, 20, n).astype(float)
    stats = {
        name: {
            "accuracy": mean_stats("accuracy", correct[name]),
            "rouge_l": mean_stats("rouge_l", rouge[name]),
            "perplexity": _perplexity(nll[name], tokens),
        }
        for name in ("base", "tuned")
    }
    models = {}
    for name, metric_stats in stats.items():
        metrics: dict[str, float] = {m: s.value() for m, s in metric_stats.items()}
        metrics["n"] = n

        def score(convs: list, metrics: dict[str, float] = metrics) -> dict[str, float]:
            """Accuracy falls with how far the prompts moved from the clean ones (a fake model)."""
            similar = [
                SequenceMatcher(None, c[0]["content"], conversations[i][0]["content"]).ratio()
                for i, c in enumerate(convs)
            ]
            return {
                "accuracy": metrics["accuracy"] * float(np.mean(similar)) ** 2,
                "rouge_l": metrics["rouge_l"],
            }

        robustness = measure_robustness(
            score, conversations, None, cfg.robustness, 0, "accuracy", True, distractor_sentences(references)
        )
        entry = {
            "model": f"models/{name}",
            "metrics": metrics,
            "missing": {},
            "warnings": [],
            "robustness": robustness,
            "efficiency": None,
            "explainability": None,
            "fairness": None,
            "adaptability": None,
        }
        entry["scorecard"] = build_scorecard(entry, cfg)
        entry["seconds"] = 3.5
        models[name] = entry
    outputs = {name: [f"{name} answer {i}" for i in range(n)] for name in stats}
    if examples_metric in ("accuracy", "macro_f1"):
        references = ["positive"] * n
        outputs = {name: ["positive" if c else "negative" for c in correct[name]] for name in stats}
    texts = {
        "metric": examples_metric,
        "prompts": questions,
        "references": references,
        "a_outputs": outputs["base"],
        "b_outputs": outputs["tuned"],
    }
    comparison = compare_models(stats["base"], stats["tuned"], ("base", "tuned"), cfg.compare, 0, texts)
    evaluation = {"primary_metric": cfg.primary(), "models": models, "comparison": comparison, "review": None}
    return json.loads(json.dumps(evaluation, allow_nan=False))


def minimal_evaluation() -> dict[str, Any]:
    """One model, perplexity only, no sections."""
    return {"primary_metric": "perplexity", "models": {"model": {"metrics": {"perplexity": 12.3, "n": 5}}}}


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir.create_at(tmp_path / "demo-run")


@dataclass
class Written:
    run: RunDir
    markdown: str
    html: str


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """The full report, written once for the tests that only read it (plots take about a second)."""
    run = RunDir.create_at(tmp_path_factory.mktemp("full") / "demo-run")
    paths = write_eval_report(run, full_evaluation())
    return Written(
        run, paths["markdown"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")
    )


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variations of the text only: skip drawing (the plots are tested on the full report)."""
    monkeypatch.setattr(report_plots, "_PLOTTERS", {})


def _markdown(run: RunDir, evaluation: dict[str, Any]) -> str:
    return write_eval_report(run, evaluation)["markdown"].read_text(encoding="utf-8")


class _Tables(HTMLParser):
    """Every HTML table as rows of cell texts; <img> sources; tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(html_text: str) -> _Tables:
    parser = _Tables()
    parser.feed(html_text)
    return parser


def _md_row(cells: list[str]) -> str:
    return f"| {' | '.join(_md_escape(c) for c in cells)} |"


def _row(markdown: str, first_cell: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |"))


# ---------------------------------------------------------------------------------------------------------
# Files


def test_writes_markdown_html_and_plots(full: Written) -> None:
    eval_dir = full.run.path / "eval"
    assert (eval_dir / "report.md").read_text(encoding="utf-8") == full.markdown
    plots = sorted(p.name for p in (eval_dir / "plots").iterdir())
    assert plots == ["latency.png", "metrics.png", "robustness.png", "scorecard.png"]
    for name in plots:
        assert (eval_dir / "plots" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"(plots/{name})" in full.markdown
    assert not list(full.run.path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_returns_the_paths(run: RunDir, no_plots: None) -> None:
    paths = write_eval_report(run, minimal_evaluation())
    assert paths == {"markdown": run.path / "eval" / "report.md", "html": run.path / "eval" / "report.html"}
    assert all(p.is_file() for p in paths.values())


def test_html_embeds_the_same_images_and_loads_nothing(full: Written) -> None:
    parsed = _parse(full.html)
    files = {p.read_bytes() for p in (full.run.path / "eval" / "plots").iterdir()}
    prefix = "data:image/png;base64,"
    assert len(parsed.images) == 4 and all(src.startswith(prefix) for src in parsed.images)
    assert {base64.b64decode(src[len(prefix) :]) for src in parsed.images} == files
    assert full.html.startswith("<!doctype html>") and '<meta charset="utf-8">' in full.html
    assert "<title>Evaluation: demo-run</title>" in full.html
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", full.html)
    assert "url(" not in full.html and "@import" not in full.html


def test_html_and_markdown_show_the_same_cells(full: Written) -> None:
    tables = _parse(full.html).tables
    # models, metrics, scorecard, robustness, efficiency, explainability, fairness, adaptability, review
    assert len(tables) == 9
    lines = set(full.markdown.splitlines())
    for table in tables:
        for row in table:
            assert _md_row(row) in lines, row


def test_model_text_is_escaped(full: Written) -> None:
    assert "<script>" not in full.html and "<img src=x" not in full.html
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;"
    assert escaped in full.html
    assert "用 open() 打开文件。\nThen read it." in full.html  # Chinese kept; line break kept (pre-wrap)
    assert "<script>" not in full.markdown and "\\<script\\>" in full.markdown
    assert "- tuned: 用 open() 打开文件。 ↵ Then read it." in full.markdown
    assert "- base: (empty)" in full.markdown


# ---------------------------------------------------------------------------------------------------------
# Sections


def test_headline_is_the_comparison_summary(full: Written) -> None:
    summary = full_evaluation()["comparison"]["summary"]
    assert full.markdown.splitlines()[:3] == ["# Evaluation: demo-run", "", _md_escape(summary)]
    assert f'<p class="headline">{summary}</p>' in full.html


def test_headline_without_comparison_is_the_primary_metric(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    evaluation["comparison"] = None
    markdown = _markdown(run, evaluation)
    assert markdown.splitlines()[2] == "ROUGE-L (higher is better): base 0.12; tuned 0.211."
    assert "Change" not in markdown  # no comparison: no change column


def test_metrics_table_with_significance_verdicts(full: Written) -> None:
    md = full.markdown
    assert "| Metric | base | tuned | Change (tuned − base) |" in md
    assert _row(md, "ROUGE-L ↑") == "| ROUGE-L ↑ | 0.12 | 0.211 | +0.091 (95% CI +0.05..+0.13) tuned better |"
    assert _row(md, "Perplexity ↓") == "| Perplexity ↓ | 12.3 | 8.1 | −4.2 (95% CI −5.1..−3.3) tuned better |"
    # exact match is shown in percent, so is its difference: in percentage points
    assert (
        _row(md, "Exact match ↑")
        == "| Exact match ↑ | 10% | 8% | −2.0 pp (95% CI −4.0 pp..−0.1 pp) base better |"
    )
    assert _row(md, "Exact match ↑").endswith("| −2.0 pp (95% CI −4.0 pp..−0.1 pp) base better |")
    assert _row(md, "BLEU ↑").endswith("| +0.01 (95% CI −0.01..+0.03) no significant difference |")
    # not bootstrapped: the plain difference in the run report's style, without a verdict
    assert _row(md, "Answers ending with EOS ↑") == "| Answers ending with EOS ↑ | 40% | 70% | +30 pp |"
    assert _row(md, "Examples") == "| Examples | 50 | 50 | — |"
    order = [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| ") and " ↑ |" in line]
    assert order[:4] == ["Exact match ↑", "Token F1 ↑", "Accuracy ↑", "Macro-F1 ↑"]


def test_verdict_colours_in_html(full: Written) -> None:
    assert '<td class="r better">+0.091 (95% CI +0.05..+0.13) tuned better</td>' in full.html
    assert '<td class="r worse">−2.0 pp (95% CI −4.0 pp..−0.1 pp) base better</td>' in full.html
    assert '<td class="r">+0.01 (95% CI −0.01..+0.03) no significant difference</td>' in full.html
    assert "tbody tr:nth-child(even)" in full.html and "max-width" in full.html and "system-ui" in full.html


def test_missing_metric_shows_its_reason_never_a_number(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    evaluation["models"]["tuned"]["metrics"]["accuracy"] = 0.0  # a stray 0 next to the reason
    markdown = _markdown(run, evaluation)
    missing = f"missing: {_md_escape(NO_LABEL)}"
    assert _row(markdown, "Accuracy ↑") == f"| Accuracy ↑ | {missing} | {missing} | — |"
    assert f"- base: Macro-F1 missing: {_md_escape(NO_LABEL)}" in markdown
    assert "- base: 3 of 50 answers are empty" in markdown
    page = (run.path / "eval" / "report.html").read_text(encoding="utf-8")
    assert '<td class="r missing">missing: no test example has a label' in page


def test_scorecard_section(full: Written) -> None:
    md = full.markdown
    assert "| Dimension | Weight | base | tuned |" in md
    assert _row(md, "Accuracy") == "| Accuracy | 0.3 | 0.12 | 0.211 |"
    assert "- Accuracy: base ROUGE-L 0.12; tuned ROUGE-L 0.211." in md  # what the score stands for
    reason = "not measured: set eval.fairness.attribute to measure it"
    assert _row(md, "Fairness") == f"| Fairness | 0.1 | {reason} | {reason} |"
    assert (
        _row(md, "Overall")
        == "| Overall |  | 0.5 (90% of the weight measured) | 0.6 (90% of the weight measured) |"
    )


def test_robustness_section(full: Written) -> None:
    md = full.markdown
    assert "| Noise | Model | Drop at 5% | Drop at 10% | Drop at 20% |" in md
    # drop / clean: 0.01 / 0.12 = 8.3%, 0.02 / 0.12 = 17%, 0.04 / 0.12 = 33%; 0.01 / 0.211 = 4.7%
    assert "| typo | base | +0.01 (8.3%) | +0.02 (17%) | +0.04 (33%) |" in md
    assert "| distractor | tuned | 0 (0%) | 0 (0%) | +0.01 (4.7%) |" in md
    assert "- base: clean ROUGE-L 0.12; robustness score 0.8 " in md
    assert "- tuned: chinese skipped: no test prompt has Han characters." in md
    assert "**typo at 10%**" in md and "- Noisy: How do I oepn a flie?" in md


def test_efficiency_section(full: Written) -> None:
    md = full.markdown
    assert _row(md, "Time to first token (median / p90)").endswith("| 35 ms / 52.5 ms | 40 ms / 60 ms |")
    assert _row(md, "Per-token latency (median / p90)").endswith("| 20 ms / 25 ms | 22 ms / 27.5 ms |")
    assert _row(md, "Tokens/s, batch 1").endswith("| 50 | 45.5 |")
    assert _row(md, "Tokens/s, batched").endswith("| 200 (batch 8) | 182 (batch 8) |")
    assert _row(md, "Peak memory").endswith("| 1,500 MB (+300 MB over 1,200 MB before) |")
    assert _row(md, "Size on disk").endswith("| 240 MB | 240 MB |")
    assert _row(md, "Parameters").endswith("| 120M | 120M |")
    assert "- base: /models/base 240 MB" in md


def test_fairness_adaptability_review(full: Written) -> None:
    md = full.markdown
    assert "| base | 0.62 | 16 | 0.7, 0.54 |" in md  # explainability
    assert "`metadata.gender`" in md
    assert "| f | 24 | 0.1 | 0.2 |" in md and "| Gap (max − min) |  | 0.05 | 0.02 |" in md
    assert "Left out, with too few test examples: x (2)." in md
    assert "source medical-qa (20 examples)" in md
    assert _row(md, "Perplexity ↓").startswith(
        "| Perplexity ↓ | 12.3 | 8.1 |"
    )  # the metrics table comes first
    assert "| Perplexity ↓ | 30 (12.3) | 25 (8.1) |" in md  # adaptability: second domain (test split)
    assert "| base | 2.5 | 10 | 25% |" in md and "| tuned | 3.8 | 10 | 75% |" in md
    assert "10 of 12 rows rated" in md


def test_fairness_without_gap_and_adaptability_missing(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    why = "fewer than 2 groups of metadata.gender have 5 or more test examples (found f: 3): lower it"
    for entry in evaluation["models"].values():
        entry["fairness"].update(gap=None, reason=why, groups={"f": {"value": 0.1, "n": 3}})
        entry["adaptability"]["missing"] = {"bleu": "needs reference answers"}
    markdown = _markdown(run, evaluation)
    assert "| Gap (max − min) |  | — | — |" in markdown
    assert markdown.count(f"No gap: {why}.") == 1
    assert "| BLEU ↑ | missing: needs reference answers | missing: needs reference answers |" in markdown


def test_explainability_not_measured(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    evaluation["models"]["tuned"]["explainability"] = {
        "attention_on_prompt": None,
        "reason": "the model's attention could not be read: sdpa only",
    }
    markdown = _markdown(run, evaluation)
    assert "| tuned | not measured: the model's attention could not be read: sdpa only | — | — |" in markdown


def test_review_sheet_not_yet_filled(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    export = {
        "sheet": "eval/review.csv",
        "jsonl": "eval/review.jsonl",
        "key": "eval/review-key.json",
        "models": ["base", "tuned"],
        "rows": 12,
        "scale": "1-5",
    }
    expected = (
        f"Sheet written to eval/review.csv: fill score\\_1..2 (1-5) and run "
        f"`seektune review import {run.path} SHEET`."
    )
    for review in (export, {"export": export, "scores": None}):
        evaluation["review"] = review
        assert expected in _markdown(run, evaluation)


def _section(markdown: str, heading: str) -> str:
    """The Markdown of one "## " section, up to the next."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


def _example_titles(markdown: str) -> list[str]:
    section = _section(markdown, "Where base and tuned differ most")
    return [line for line in section.splitlines() if line.startswith("**Example ")]


def test_examples_where_the_models_differ_most(full: Written) -> None:
    section = _section(full.markdown, "Where base and tuned differ most")
    assert "The test examples whose ROUGE-L differs most between the two models" in section
    assert _example_titles(full.markdown) == [
        "**Example 7, ROUGE-L: base 0, tuned 0.8**",
        "**Example 3, ROUGE-L: base 0.1, tuned 0.6**",
    ]  # the comparison's order


def test_examples_are_labelled_with_the_metric_that_ranked_them(run: RunDir, no_plots: None) -> None:
    # metrics [accuracy, rouge_l, perplexity]: accuracy is the primary metric, but the comparison ranks the
    # answers by ROUGE-L, and its scores are ROUGE-L values
    evaluation = produced_evaluation()
    assert evaluation["primary_metric"] == "accuracy"
    assert evaluation["comparison"]["examples_metric"] == "rouge_l"
    markdown = _markdown(run, evaluation)
    section = _section(markdown, "Where base and tuned differ most")
    assert "whose ROUGE-L differs most" in section and "Accuracy" not in section
    expected = [
        f"**Example {e['index']}, ROUGE-L: base {_fmt_num(e['a_score'])}, tuned {_fmt_num(e['b_score'])}**"
        for e in evaluation["comparison"]["examples"]
    ]
    assert _example_titles(markdown) == expected and expected[0].startswith("**Example 5, ")


def test_examples_ranked_by_a_label_metric(run: RunDir, no_plots: None) -> None:
    # references are the gold labels, outputs the predicted labels, per-example accuracy 0 or 1
    markdown = _markdown(run, produced_evaluation("accuracy"))
    section = _section(markdown, "Where base and tuned differ most")
    assert "whose Accuracy differs most" in section and "ROUGE" not in section
    assert _example_titles(markdown) == [
        "**Example 2, Accuracy: base 0, tuned 1**",
        "**Example 9, Accuracy: base 0, tuned 1**",
    ]
    assert "- Reference: positive\n- base: negative\n- tuned: positive" in section


def test_examples_without_their_metric_are_not_labelled_with_the_primary_one(
    run: RunDir, no_plots: None
) -> None:
    evaluation = full_evaluation()
    evaluation["primary_metric"] = "perplexity"
    del evaluation["comparison"]["examples_metric"]
    section = _section(_markdown(run, evaluation), "Where base and tuned differ most")
    assert "whose score differs most" in section and "Perplexity" not in section
    assert "**Example 7, score: base 0, tuned 0.8**" in section


def test_report_of_the_real_producers_reads_every_section(run: RunDir, no_plots: None) -> None:
    # keys written by compare_models, measure_robustness and build_scorecard are the keys the report reads
    evaluation = produced_evaluation()
    markdown = _markdown(run, evaluation)
    assert markdown.splitlines()[2] == _md_escape(evaluation["comparison"]["summary"])
    rouge = evaluation["comparison"]["metrics"]["rouge_l"]
    assert rouge["verdict"] == "B better"
    low, high = (f"+{_fmt_num(rouge[k])}" for k in ("ci_low", "ci_high"))
    assert _row(markdown, "ROUGE-L ↑").endswith(f"(95% CI {low}..{high}) tuned better |")
    # the interval's lower bound is exactly 0 (resamples without the two examples base got wrong): no sign
    assert evaluation["comparison"]["metrics"]["accuracy"]["ci_low"] == 0
    assert _row(markdown, "Accuracy ↑").endswith("(95% CI 0 pp..+21 pp) no significant difference |")
    assert _row(markdown, "Perplexity ↓").endswith("tuned better |")
    robustness = _section(markdown, "Robustness")
    assert "Accuracy on the first 8 test prompts" in robustness
    for kind in ("typo", "chinese", "punctuation", "casing", "distractor"):
        for name in ("base", "tuned"):
            row = _row(robustness, f"{kind} | {name}")
            assert "—" not in row and row.count("%)") == 2, row
    scorecard = _section(markdown, "Scorecard")
    accuracy = evaluation["models"]["base"]["scorecard"]["dimensions"]["accuracy"]["score"]
    assert _row(scorecard, "Accuracy").startswith(f"| Accuracy | 0.3 | {_fmt_num(accuracy)} |")
    assert "not measured: turned off: set eval.efficiency.enabled to true" in _row(scorecard, "Efficiency")
    assert "(50% of the weight measured)" in _row(scorecard, "Overall")


def test_minimal_evaluation(run: RunDir) -> None:
    # plots of an earlier, fuller report must go: they would no longer describe this evaluation
    (run.path / "eval" / "plots").mkdir(parents=True)
    (run.path / "eval" / "plots" / "robustness.png").write_bytes(PNG_MAGIC)
    paths = write_eval_report(run, minimal_evaluation())
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown.splitlines()[2] == "Perplexity (lower is better): model 12.3."
    assert "| Perplexity ↓ | 12.3 |" in markdown and "Change" not in markdown
    for heading in ("Scorecard", "Robustness", "Efficiency", "Fairness", "Human review", "differ most"):
        assert heading not in markdown
    assert "No metric is missing and nothing was flagged." in markdown
    assert sorted(p.name for p in (run.path / "eval" / "plots").iterdir()) == ["metrics.png"]
    assert len(_parse(paths["html"].read_text(encoding="utf-8")).images) == 1


def test_sections_that_are_none_and_no_models(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    for entry in evaluation["models"].values():
        for key in ("robustness", "efficiency", "explainability", "fairness", "adaptability", "scorecard"):
            entry[key] = None
    evaluation["comparison"] = evaluation["review"] = None
    markdown = _markdown(run, evaluation)
    assert "## Metrics" in markdown and "## Robustness" not in markdown and "## Scorecard" not in markdown
    assert "| ROUGE-L ↑ | 0.12 | 0.211 |" in markdown
    assert "No model was evaluated." in _markdown(run, {"models": {}})


def test_plots_skip_what_is_missing(tmp_path: Path) -> None:
    evaluation = full_evaluation()
    evaluation["models"]["tuned"]["efficiency"]["token_ms_all"] = []
    evaluation["models"]["base"]["robustness"]["curves"] = {}
    assert report_plots._plot_latency(evaluation, tmp_path / "latency.png")  # ttft of both, tokens of base
    assert report_plots._plot_robustness(evaluation, tmp_path / "robustness.png")  # tuned's curves
    for entry in evaluation["models"].values():
        entry["efficiency"] = entry["robustness"] = None
    assert not report_plots._plot_latency(evaluation, tmp_path / "none.png")
    assert not report_plots._plot_robustness(evaluation, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------------------
# Terminal table and the run report's section


def test_summary_table() -> None:
    table = summary_table(full_evaluation())
    assert [c.header for c in table.columns] == ["Metric", "base", "tuned", "Change (tuned − base)"]
    console = Console(record=True, width=250, color_system=None)
    console.print(table)
    text = console.export_text()
    assert re.search(
        r"ROUGE-L ↑\s+│\s+0\.12\s+│\s+0\.211\s+│\s+\+0\.091 \(95% CI \+0\.05\.\.\+0\.13\) tuned better", text
    )
    assert "data.sources[].fields.label" in text  # brackets are text, not rich markup
    verdicts = {str(cell): cell.style for cell in table.columns[3].cells}
    assert verdicts["+0.091 (95% CI +0.05..+0.13) tuned better"] == "bold green"
    assert verdicts["−2.0 pp (95% CI −4.0 pp..−0.1 pp) base better"] == "bold red"
    minimal = summary_table(minimal_evaluation())
    assert [c.header for c in minimal.columns] == ["Metric", "model"] and minimal.row_count == 2


def test_eval_markdown_section() -> None:
    evaluation = full_evaluation()
    lines = eval_markdown_section(evaluation)
    assert lines[:2] == [_md_escape(evaluation["comparison"]["summary"]), ""]
    assert not [line for line in lines if line.startswith("#")]  # it goes under the run report's heading
    assert "| ROUGE-L ↑ | 0.12 | 0.211 | +0.091 (95% CI +0.05..+0.13) tuned better |" in lines
    overall = "base 0.5 (90% of the weight measured); tuned 0.6 (90% of the weight measured)"
    assert f"Overall scorecard (0..1): {overall}." in lines
    text = "\n".join(lines)
    assert "[eval/report.md](eval/report.md)" in text and "[eval/report.html](eval/report.html)" in text
    nested = "\n".join(eval_markdown_section(minimal_evaluation(), link_prefix="trial-3/eval/"))
    assert "(trial-3/eval/report.html)" in nested and "Overall scorecard" not in nested


def test_input_is_not_modified(run: RunDir, no_plots: None) -> None:
    evaluation = full_evaluation()
    kept = copy.deepcopy(evaluation)
    write_eval_report(run, evaluation)
    summary_table(evaluation)
    eval_markdown_section(evaluation)
    assert evaluation == kept
