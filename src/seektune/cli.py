"""The `seektune` command line: parses arguments, loads the config, calls a stage or the pipeline.

It holds no stage logic. A `UserError` is printed as one line and exits with code 2 (with the traceback
only under `--debug`).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from seektune.config import SeektuneConfig, config_schema, config_to_yaml, load_config
from seektune.errors import UserError
from seektune.logs import json_events_enabled, setup_logging

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Customise DeepSeek-family language models end to end: data, fine-tuning, evaluation and more.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the resolved config or its JSON schema.", no_args_is_help=True)
data_app = typer.Typer(help="The data stage.", no_args_is_help=True)
base_app = typer.Typer(help="The offline base model tiny-deepseek-v3.", no_args_is_help=True)
review_app = typer.Typer(help="Human review sheets of an evaluation.", no_args_is_help=True)
registry_app = typer.Typer(
    help="The model registry: versions, tags, stages, lineage (docs/registry.md).", no_args_is_help=True
)
app.add_typer(config_app, name="config")
app.add_typer(review_app, name="review")
app.add_typer(data_app, name="data")
app.add_typer(base_app, name="base")
app.add_typer(registry_app, name="registry")

_debug = {"on": False}

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer reads the annotation at run time on Python 3.10
    typer.Option("--set", "-s", help="Override a key by dotted path, e.g. --set train.learning_rate=2e-5."),
]


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log one JSON object per event on stderr.")
    ] = False,
) -> None:
    _debug["on"] = debug
    setup_logging(debug=debug, json_events=log_json)


# The registry a command uses when its config sets no registry.url (read here: stages read no environment).
REGISTRY_URL_ENV = "SEEKTUNE_REGISTRY_URL"


def _load(config: Path | None, overrides: list[str] | None) -> SeektuneConfig:
    import os

    cfg = load_config(config, overrides or [])
    if cfg.registry.url is None and os.environ.get(REGISTRY_URL_ENV):
        cfg = cfg.model_copy(
            update={"registry": cfg.registry.model_copy(update={"url": os.environ[REGISTRY_URL_ENV]})}
        )
    return cfg


def _done(run_dir: Path, *more: str) -> None:
    from seektune.distributed import is_main_process

    if is_main_process():  # once, not once per process of a multi-process launch
        for line in (f"run directory: {run_dir}", *more):
            typer.echo(line)


ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the newest unfinished run of this name from its newest complete checkpoint "
        "(in a new run directory).",
    ),
]
ResumeNewDataOpt = Annotated[
    bool,
    typer.Option(
        "--resume-new-data",
        help="Resume even though the data changed: keep weights and optimizer, start the new data afresh.",
    ),
]


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_new_data: ResumeNewDataOpt = False,
) -> None:
    """Run the whole loop: data, base evaluation, fine-tuning, evaluation of the tuned model, report."""
    from seektune.pipeline import TrainOptions, run_pipeline

    options = TrainOptions(resume=resume, resume_new_data=resume_new_data)
    run_dir = run_pipeline(_load(config, set_), options).path
    _print_eval_summary(run_dir)
    html = run_dir / "eval" / "report.html"
    compressed = run_dir / "compress" / "results.json"
    if compressed.is_file():
        _print_compress_table(json.loads(compressed.read_text(encoding="utf-8")))
    _done(
        run_dir,
        f"report: {run_dir / 'report.md'}",
        *([f"evaluation report: {html}"] if html.is_file() else []),
        *([f"compression report: {run_dir / 'compress' / 'report.md'}"] if compressed.is_file() else []),
    )


@data_app.command("prepare")
def data_prepare(config: ConfigArg, set_: SetOpt = None) -> None:
    """Load, clean, deduplicate, mask, split, mix and tokenise the data; write it and its report."""
    from seektune.pipeline import run_data_stage

    run_dir = run_data_stage(_load(config, set_)).path
    if not json_events_enabled():
        from rich.console import Console

        from seektune.data.report import print_data_report

        print_data_report(json.loads((run_dir / "data" / "report.json").read_text()), Console())
    _done(run_dir)
    typer.echo(f"data report: {run_dir / 'data' / 'report.md'}")


@data_app.command("from-feedback")
def data_from_feedback(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write sft.jsonl, preference.jsonl, report.json.")
    ],
    store: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="The feedback store (SQLite); default: serve.feedback.store of --config, or "
            "feedback.db in your data directory."
        ),
    ] = None,
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--config", "-c", help="YAML config whose serve.feedback.store to read."),
    ] = None,
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only responses to this public model name (e.g. an A/B split's name)."),
    ] = None,
    version: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only responses of this served version."),
    ] = None,
) -> None:
    """The server's recorded answers and user feedback as SFT rows and preference pairs (docs/feedback.md)."""
    from seektune.data.feedback import write_feedback_datasets
    from seektune.serve.feedback import default_feedback_store

    if store is None:
        configured = _load(config, []).serve.feedback.store if config is not None else None
        store = configured or default_feedback_store()
    report = write_feedback_datasets(store, out, model=model, version=version)
    typer.echo(
        f"{report['responses']} responses, {report['with_feedback']} with feedback: "
        f"{report['sft_rows']} SFT rows, {report['preference_pairs']} preference pairs"
    )
    for reason, count in report["skipped"].items():
        typer.echo(f"  skipped {count}: {reason}")
    for name, tally in report["by_version"].items():
        rate = "-" if tally["like_rate"] is None else f"{tally['like_rate']:.0%}"
        typer.echo(
            f"  {name}: {tally['responses']} answers, {tally['rated']} rated, liked {rate}, "
            f"{tally['corrected']} corrected"
        )
    typer.echo(f"written: {out / 'sft.jsonl'}, {out / 'preference.jsonl'}, {out / 'report.json'}")


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    resume_new_data: ResumeNewDataOpt = False,
    profile: Annotated[
        bool,
        typer.Option("--profile", help="Run a few steps under torch.profiler and show where the time goes."),
    ] = False,
) -> None:
    """Prepare the data and fine-tune, without evaluation."""
    from seektune.distributed import is_main_process
    from seektune.pipeline import TrainOptions, run_train_stage

    options = TrainOptions(resume=resume, resume_new_data=resume_new_data, profile=profile)
    run_dir = run_train_stage(_load(config, set_), options).path
    if profile and is_main_process():
        from rich.console import Console

        from seektune.train.profile import print_profile

        print_profile(json.loads((run_dir / "profile" / "summary.json").read_text()), Console())
        typer.echo(f"trace (Perfetto, chrome://tracing): {run_dir / 'profile' / 'trace.json'}")
    _done(run_dir)


@app.command()
def plan(
    config: ConfigArg,
    set_: SetOpt = None,
    device_memory_gb: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Plan for a device with this much memory (GiB) instead of this machine's."),
    ] = None,
) -> None:
    """Estimate parameters and memory of the configured training, from the model config alone."""
    from rich.console import Console

    from seektune.train.plan import estimate_plan, print_plan

    memory = int(device_memory_gb * 2**30) if device_memory_gb is not None else None
    print_plan(estimate_plan(_load(config, set_), device_memory=memory), Console())


@app.command("eval")
def eval_(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config file.")] = None,  # noqa: UP045
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Model to evaluate: a hub id, a model folder or a run directory."),
    ] = None,
    data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="A test file (any data format); all of it is the test split."),
    ] = None,
    compare_with: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="A second model (B), evaluated on the same test set and compared with the first."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a model on the test split: task metrics, robustness, efficiency, scorecard, report."""
    from seektune.pipeline import run_eval_stage

    overrides = list(set_ or [])
    if model is not None:
        overrides.append(f"model.name_or_path={json.dumps(model)}")
    if data is not None:
        overrides.append(f"data.sources={json.dumps([{'path': data, 'split': 'test'}])}")
    if compare_with is not None:
        overrides.append(f"eval.compare.with_model={json.dumps(compare_with)}")
    run_dir = run_eval_stage(_load(config, overrides)).path
    _print_eval_summary(run_dir)
    _done(run_dir, f"report: {run_dir / 'eval' / 'report.html'}")


def _print_eval_summary(run_dir: Path) -> None:
    """The evaluation's summary table on the terminal (not with --log-json, nor on other ranks)."""
    from seektune.distributed import is_main_process

    results = run_dir / "eval" / "results.json"
    if json_events_enabled() or not is_main_process() or not results.is_file():
        return
    from rich.console import Console

    from seektune.evaluate.report import summary_table

    Console().print(summary_table(json.loads(results.read_text(encoding="utf-8"))))


@review_app.command("import")
def review_import(
    run_dir: Annotated[Path, typer.Argument(help="The run directory that wrote the review sheet.")],
    sheet: Annotated[Path, typer.Argument(help="The filled-in sheet (review.csv or review.jsonl).")],
) -> None:
    """Read reviewers' scores back into the run's evaluation report."""
    from seektune.evaluate.evaluation import import_review_scores
    from seektune.rundir import RunDir

    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist: give the run that wrote the sheet")
    scores = import_review_scores(RunDir(run_dir), sheet)
    for name, row in scores["models"].items():
        typer.echo(f"{name}: mean {row['mean']} over {row['n']} rated, wins {row['win_rate']}")
    typer.echo(f"report: {run_dir / 'eval' / 'report.html'}")


@app.command()
def harness(
    model: Annotated[
        str, typer.Option(help="Model: a hub id, a folder, a run directory or tiny-deepseek-v3.")
    ],
    tasks: Annotated[str, typer.Option(help="lm-evaluation-harness tasks, comma-separated (globs work).")],
    include_path: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="A folder of your own task YAML files (local data)."),
    ] = None,
    builtin_tasks: Annotated[
        bool, typer.Option(help="Also index lm-eval's built-in tasks (off: only --include-path, faster).")
    ] = True,
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per task.")] = None,  # noqa: UP045
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per prompt.")] = None,  # noqa: UP045
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write lm-eval's results JSON to this file."),
    ] = None,
) -> None:
    """Evaluate a model on lm-evaluation-harness tasks (docs/harness.md)."""
    from rich.console import Console

    from seektune.evaluate.harness import harness_table, run_harness
    from seektune.rundir import atomic_write_json

    results = run_harness(
        model,
        [t for t in tasks.split(",") if t.strip()],
        include_path=include_path,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        device=device,
        include_defaults=builtin_tasks,
    )
    Console().print(harness_table(results))
    if output is not None:
        atomic_write_json(output, results)
        typer.echo(f"results: {output}")


@app.command()
def tune(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the newest unfinished search of this name (its study in its run directory); "
            "interrupted trials run again.",
        ),
    ] = False,
) -> None:
    """Hyperparameter search with Optuna: trials train the configured model with values from tune.space."""
    from seektune.pipeline import run_tune_stage

    run_dir = run_tune_stage(_load(config, set_), resume=resume).path
    _done(
        run_dir, f"best config: {run_dir / 'tune' / 'best.yaml'}", f"report: {run_dir / 'tune' / 'report.md'}"
    )


@app.command()
def compress(config: ConfigArg, set_: SetOpt = None) -> None:
    """Merge adapters, prune, distil, quantise and export a model (compress.source, else model.name_or_path),
    checking every step against the one before; prints the before/after table."""
    from seektune.pipeline import run_compress_stage

    run_dir = run_compress_stage(_load(config, set_)).path
    results = json.loads((run_dir / "compress" / "results.json").read_text(encoding="utf-8"))
    _print_compress_table(results)
    _done(
        run_dir,
        f"compressed model: {results['final_model']}",
        *[f"file: {f}" for f in results.get("files") or []],
        f"report: {run_dir / 'compress' / 'report.md'}",
    )


def _print_compress_table(results: dict) -> None:
    from seektune.distributed import is_main_process

    if json_events_enabled() or not is_main_process():
        return
    from rich.console import Console
    from rich.table import Table

    from seektune.compress.report import compress_table_rows

    table = Table(title="compression: before and after")
    for column in ("model", "size MB", "ms/token", "perplexity"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in compress_table_rows(results):
        table.add_row(*row)
    Console().print(table)


@app.command()
def serve(
    model_or_run: Annotated[
        str,
        typer.Argument(
            help="Model folder, LoRA adapter folder, run directory or hub id.", show_default=False
        ),
    ],
    adapter: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--adapter", "-a", help="Serve a LoRA/DoRA adapter on the same base: NAME=PATH (repeatable)."
        ),
    ] = None,
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--config", "-c", help="YAML config whose serve: and model: sections to use."),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (serve.host).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port to bind (serve.port).")] = None,  # noqa: UP045
    api_key: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--api-key",
            envvar="SEEKTUNE_API_KEY",
            help="Accepted bearer key (repeatable; serve.api_keys); required to bind beyond loopback.",
        ),
    ] = None,
    engine: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="seektune (built-in continuous batching) or vllm (hand the model to vLLM)."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Serve a model (and LoRA adapters on it) with an OpenAI-compatible API: /v1/chat/completions,
    /v1/completions, /v1/models, /health, /ready, /metrics."""
    overrides = list(set_ or [])
    for key, value in (("host", host), ("port", port), ("engine", engine)):
        if value is not None:
            overrides.append(f"serve.{key}={value}")
    cfg = _load(config, overrides)
    if api_key:
        from seektune.config import api_key_problem

        problem = next((api_key_problem(key) for key in api_key if api_key_problem(key)), None)
        if problem:
            raise UserError(f"--api-key / SEEKTUNE_API_KEY: {problem}")
        cfg = cfg.model_copy(
            update={"serve": cfg.serve.model_copy(update={"api_keys": [*cfg.serve.api_keys, *api_key]})}
        )
    adapters = dict(cfg.serve.adapters)
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(
                f"--adapter {item!r} is not NAME=PATH: give e.g. --adapter legal=runs/legal-1/model"
            )
        adapters[name] = path
    if cfg.serve.engine == "vllm":
        from seektune.serve.versions import resolve_served_versions
        from seektune.serve.vllm import run_vllm

        registered = resolve_served_versions(cfg, model_or_run, adapters)
        run_vllm(registered.cfg, registered.model_or_run, registered.adapters)
        return
    from seektune.serve.server import run_server

    run_server(cfg, model_or_run, adapters)


@app.command()
def ui(
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--config",
            "-c",
            help="YAML config: its ui:, serve: and registry: sections, and where the launch form starts.",
        ),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (ui.host).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port to bind (ui.port).")] = None,  # noqa: UP045
    runs: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Folder of run directories to list (ui.runs_dir; default: output_dir)."),
    ] = None,
    server: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="URL of the seektune server the playground talks to (ui.server_url)."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """The web dashboard: runs with live curves, launch and stop jobs, the registry, a chat playground."""
    from seektune.config import read_config_file
    from seektune.ui.server import run_ui, ui_settings

    overrides = list(set_ or [])
    for key, value in (("host", host), ("port", port), ("runs_dir", runs), ("server_url", server)):
        if value is not None:
            overrides.append(f"ui.{key}={value if isinstance(value, int) else json.dumps(str(value))}")
    cfg = _load(config, overrides)
    raw = read_config_file(config) if config is not None else {}
    run_ui(cfg, ui_settings(cfg, raw, config))


# ---------------------------------------------------------------------------------------------------------
# seektune registry ...

RefArg = Annotated[
    str, typer.Argument(help="NAME@REF: a version (1.2.0), stage, tag or latest; NAME alone: the newest.")
]
UrlOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--url",
        envvar=REGISTRY_URL_ENV,
        help="Registry database (SQLAlchemy URL); default: registry.db in your data directory.",
    ),
]
ArtefactDirOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(help="Folder of the registered artefacts (registry.artefact_dir)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]


def _store(url: str | None, artefact_dir: Path | None = None) -> Any:  # a RegistryStore, imported lazily
    from seektune.registry.store import open_store

    return open_store(url, artefact_dir)


def _echo_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


@registry_app.command("list")
def registry_list(
    name: Annotated[Optional[str], typer.Argument(help="Only this registered name.")] = None,  # noqa: UP045
    stage: Annotated[Optional[str], typer.Option(help="Only versions in this stage.")] = None,  # noqa: UP045
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every registered version: kind, stage, tags, metrics, size, who and when."""
    from seektune.registry.catalog import list_versions
    from seektune.registry.models import STAGES

    if stage is not None and stage not in STAGES:
        raise UserError(f"--stage {stage!r} is not one of {', '.join(STAGES)}")
    rows = list_versions(_store(url), name, stage)
    if as_json:
        _echo_json(rows)
    elif not rows:
        typer.echo("no registered versions" + (f" in {stage}" if stage else ""))
    else:
        from rich.console import Console

        from seektune.registry.render import versions_table

        Console().print(versions_table(rows))


@registry_app.command("show")
def registry_show(
    ref: RefArg,
    url: UrlOpt = None,
    config: Annotated[bool, typer.Option("--config", help="Also print the resolved config.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """One version: base, method, data, evaluations, artefact and checksum, parent, stage history."""
    from seektune.registry.catalog import show_version

    view = show_version(_store(url), ref)
    if as_json:
        _echo_json(view)
        return
    from rich.console import Console

    from seektune.registry.render import print_version

    print_version(view, Console(), with_config=config)


@registry_app.command("tag")
def registry_tag(
    ref: RefArg,
    tags: Annotated[list[str], typer.Argument(help="Tags, e.g. v1.0-legal-202403.", show_default=False)],
    remove: Annotated[bool, typer.Option("--remove", help="Take these tags off instead.")] = False,
    move: Annotated[bool, typer.Option("--move", help="Move a tag another version has.")] = False,
    url: UrlOpt = None,
) -> None:
    """Tag a version (a tag names one version of a name, so NAME@TAG finds it)."""
    from seektune.registry.catalog import tag_version

    view = tag_version(_store(url), ref, tags, remove=remove, move=move)
    typer.echo(f"{view['ref']}: tags {', '.join(view['tags']) or 'none'}")


@registry_app.command("promote")
def registry_promote(
    ref: RefArg,
    stage: Annotated[str, typer.Argument(help="none, staging, production or archived.", show_default=False)],
    reason: Annotated[Optional[str], typer.Option(help="Why, for the stage history.")] = None,  # noqa: UP045
    url: UrlOpt = None,
) -> None:
    """Move a version to a stage; a new production version archives the one it replaces."""
    from seektune.registry.catalog import promote_version

    result = promote_version(_store(url), ref, stage, reason)
    if not result["changed"]:
        typer.echo(f"{result['ref']} is already in {stage}")
        return
    typer.echo(f"{result['ref']} is now in {stage}")
    if result["archived"]:
        typer.echo(f"{result['archived']} (production until now) is archived")


@registry_app.command("compare")
def registry_compare(
    a: Annotated[str, typer.Argument(help="Version A (NAME@REF).", show_default=False)],
    b: Annotated[str, typer.Argument(help="Version B (NAME@REF).", show_default=False)],
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Two versions side by side: what they are, their metrics, and their configs as a diff."""
    from seektune.registry.catalog import compare_versions

    comparison = compare_versions(_store(url), a, b)
    if as_json:
        _echo_json(comparison)
        return
    from rich.console import Console

    from seektune.registry.render import compare_table

    console = Console()
    console.print(compare_table(comparison))
    if comparison["same_test_data"] is False:
        console.print("note: A and B were evaluated on different test data; the metrics are not comparable")
    if comparison["config_diff"]:
        console.print("\n".join(comparison["config_diff"]), markup=False, highlight=False)
    else:
        console.print("configs: identical")


@registry_app.command("lineage")
def registry_lineage(ref: RefArg, url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Where a version came from and what was derived from it: base → adapter → merged → quantised."""
    from seektune.registry.catalog import lineage

    found = lineage(_store(url), ref)
    if as_json:
        _echo_json(found)
        return
    from rich.console import Console

    from seektune.registry.render import lineage_tree

    console = Console()
    for tree in lineage_tree(found):
        console.print(tree)


@registry_app.command("export")
def registry_export(
    ref: RefArg,
    destination: Annotated[Path, typer.Argument(help="A new (or empty) folder.", show_default=False)],
    url: UrlOpt = None,
) -> None:
    """Copy a version's artefact out (checksum verified first), with registry.json describing it."""
    from seektune.registry.catalog import export_version

    resolved, target = export_version(_store(url), ref, destination)
    typer.echo(f"{resolved.ref} exported to {target}")


@registry_app.command("gc")
def registry_gc(
    url: UrlOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Remove the artefacts of archived versions (their records stay) and folders no version owns."""
    from seektune.registry.catalog import collect_garbage, gc_plan

    store = _store(url)
    plan = gc_plan(store)
    items = [(v["ref"], v["path"], v["bytes"]) for v in plan["versions"]]
    items += [("(no version)", o["path"], o["bytes"]) for o in plan["orphans"]]
    if not items:
        typer.echo("nothing to remove")
        return
    for ref, path, size in items:
        typer.echo(f"{ref}: {path} ({size / 1e6:.1f} MB)")
    total = sum(size for _, _, size in items) / 1e6
    if dry_run:
        typer.echo(f"would remove {len(items)} folder(s), {total:.1f} MB")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("gc removes files and there is no terminal to confirm on: add --yes")
        typer.confirm(f"remove these {len(items)} folder(s), {total:.1f} MB?", abort=True)
    done = collect_garbage(store)
    typer.echo(
        f"removed {len(done['versions']) + len(done['orphans'])} folder(s), {done['bytes'] / 1e6:.1f} MB"
    )


@registry_app.command("add")
def registry_add(
    run_dir: Annotated[Path, typer.Argument(help="A completed run directory.", show_default=False)],
    name: Annotated[Optional[str], typer.Option(help="Registered name (default: the run's name).")] = None,  # noqa: UP045
    version: Annotated[Optional[str], typer.Option(help="Version of its trained model.")] = None,  # noqa: UP045
    tag: Annotated[Optional[list[str]], typer.Option(help="Tag (repeatable).")] = None,  # noqa: UP045
    url: UrlOpt = None,
    artefact_dir: ArtefactDirOpt = None,
) -> None:
    """Register what a completed run produced (what seektune run does with registry.enabled)."""
    from seektune.config import RegistryConfig
    from seektune.registry.register import register_run

    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: give a folder made by seektune run")
    try:
        registry = RegistryConfig(
            enabled=True, url=url, artefact_dir=artefact_dir, model_name=name, version=version, tags=tag or []
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for view in register_run(_store(url, artefact_dir), registry, run_dir):
        typer.echo(f"registered {view['ref']} ({view['kind']})")


@base_app.command("build")
def base_build(
    config: Annotated[Optional[Path], typer.Option(help="Config whose model.base recipe to use.")] = None,  # noqa: UP045
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when a cached build exists.")] = False,
) -> None:
    """Build (or find in the cache) the offline base model tiny-deepseek-v3 and print its directory."""
    from seektune.models.tiny import build_base, ensure_base

    cfg = _load(config, set_)
    build = build_base if force else ensure_base
    typer.echo(str(build(cfg.model.base, cfg.model.cache_dir)))


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the fully resolved config (every default written out) as YAML."""
    typer.echo(config_to_yaml(_load(config, set_)), nl=False)


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of the config."""
    typer.echo(json.dumps(config_schema(), indent=2))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    import click

    # A stop from outside (kill, a scheduler's timeout) unwinds like an error, so the run directory
    # records the run as failed instead of "running" forever.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app(args=argv, prog_name="seektune", standalone_mode=False)
    except UserError as exc:
        if _debug["on"]:
            raise
        if json_events_enabled():
            typer.echo(
                json.dumps({"level": "ERROR", "event": "error", "error": str(exc)}, ensure_ascii=False),
                err=True,
            )
        else:
            typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    return 0


def console() -> None:
    """The `seektune` executable."""
    sys.exit(main())


if __name__ == "__main__":
    console()
