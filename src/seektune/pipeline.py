"""The order of the stages, and the run directory around them.

This is the only module that knows the order: resolve registered versions the config names
(`registry:NAME@REF`, checksums verified) → prepare the data (with the model's tokenizer, so bad data stops
a run before any weight is loaded) → load the base → evaluate the base → apply the fine-tuning method →
train → evaluate the tuned model → compress → report → register what the completed run produced. Each stage
is a plain function of its own config section and the artefacts of earlier stages. A run that fails records
the error in its run directory (`status.json`) before the error reaches the user.

Under a launcher (`torchrun`, `accelerate launch`) every process runs the same stages in one run directory:
rank 0 creates it, prepares the data and writes every file (config, status, metrics, logs, report,
evaluation); the others wait for the data and load it, train with it (the Trainer synchronises them) and log
to the console at warning level only (`seektune.distributed`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seektune.config import SeektuneConfig, config_to_yaml
from seektune.distributed import (
    barrier,
    broadcast_from_main,
    is_main_process,
    shards_parameters,
    start_process_group,
    world_size,
)
from seektune.errors import UserError
from seektune.logs import attach_run_logs, detach_run_logs, log_event
from seektune.rundir import RunDir, environment_info

logger = logging.getLogger(__name__)

SAMPLES_IN_REPORT = 5
# The CLI verb that reruns each kind of run.
_VERBS = {
    "run": "run",
    "data": "data prepare",
    "train": "train",
    "eval": "eval",
    "tune": "tune",
    "compress": "compress",
}

# The config fields that may name a registered version (registry:NAME@REF), resolved before a run.
_REGISTRY_FIELDS = (
    ("model", "name_or_path"),
    ("compress", "source"),
    ("eval.compare", "with_model"),
    ("compress.distill", "student"),
)


def check_stages_available(cfg: SeektuneConfig, compresses: bool = False) -> None:
    """Stop with one line, before anything runs, when the config asks for what this version lacks or
    cannot run here; `compresses`: the command compresses (seektune run with compress.enabled)."""
    _check_registry(cfg)
    if cfg.method.name == "qlora" and not _has_cuda(cfg.model.device):
        raise UserError(
            "method.name qlora loads the base in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU, "
            f"and model.device '{cfg.model.device}' has none here: use method.name lora (the same adapter "
            "on a full-precision base)"
        )
    if cfg.method.name == "prefix":
        from seektune.models.prefix import check_prefix_compatible

        check_prefix_compatible(cfg.data)
    if compresses:
        from seektune.compress.chain import check_compress_config

        check_compress_config(cfg)
    if cfg.continual.enabled:
        _check_continual(cfg)
    if cfg.tune.enabled:
        from seektune.tune.study import check_space, open_storage

        check_space(cfg)
        if cfg.tune.storage:
            open_storage(cfg.tune.storage)  # a storage that cannot open stops before any run directory


def _check_continual(cfg: SeektuneConfig) -> None:
    problem = (
        "train.objective sft (replay mixes earlier supervised examples)" if cfg.train.objective != "sft" else
        "data.packing: false (replay draws single examples by their loss)" if cfg.data.packing else
        "tune.enabled: false (a round compares itself with plain fine-tuning, not with trials)"
        if cfg.tune.enabled else None
    )  # fmt: skip
    if problem:
        raise UserError(f"continual.enabled needs {problem}")
    if not cfg.continual.replay.sources:
        raise UserError(
            "continual.replay.sources is empty and model.name_or_path is not a registered version whose run "
            "directory still holds its data: name the earlier data (its train and test files) in "
            "continual.replay.sources, or start from registry:NAME@VERSION"
        )


def with_replay_sources(cfg: SeektuneConfig, refs: dict[str, str]) -> SeektuneConfig:
    """A continual round from a registered version with no replay sources replays the data of the run
    that trained it (`<run>/data/train.jsonl` and `test.jsonl`), when that run directory still has them."""
    ref = refs.get("model.name_or_path")
    if not cfg.continual.enabled or cfg.continual.replay.sources or ref is None:
        return cfg
    from seektune.config import SourceConfig
    from seektune.registry.catalog import show_version

    run_dir = show_version(_open_registry(cfg), ref).get("run_dir")
    data_dir = RunDir(Path(run_dir)).data_dir if run_dir else None
    if data_dir is None or not (data_dir / "train.jsonl").is_file():
        return cfg
    sources = [
        SourceConfig(path=str(data_dir / f"{split}.jsonl"), name=f"replay-{split}", split=split)
        for split in ("train", "test")
        if (data_dir / f"{split}.jsonl").is_file()
    ]
    log_event(logger, "continual: replaying the registered version's data", version=ref, data=str(data_dir))
    replay = cfg.continual.replay.model_copy(update={"sources": sources})
    return cfg.model_copy(update={"continual": cfg.continual.model_copy(update={"replay": replay})})


def _check_registry(cfg: SeektuneConfig) -> None:
    """With registry.enabled: a registry that cannot open, or a version already taken, stops here."""
    if cfg.registry.enabled:
        from seektune.registry.register import check_registration

        check_registration(_open_registry(cfg), cfg.registry, cfg.name)


def _open_registry(cfg: SeektuneConfig) -> Any:
    from seektune.registry.store import open_store

    return open_store(cfg.registry.url, cfg.registry.artefact_dir)


def resolve_registry_refs(cfg: SeektuneConfig) -> tuple[SeektuneConfig, dict[str, str]]:
    """The config with every `registry:NAME@REF` replaced by the version's verified artefact folder, and
    `{dotted field: NAME@VERSION}` of what was replaced (a checksum mismatch stops here)."""
    from seektune.registry.catalog import resolve_version
    from seektune.registry.refs import is_registry_ref

    refs: dict[str, str] = {}
    store = None
    for section, key in _REGISTRY_FIELDS:
        owner: Any = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        value = getattr(owner, key)
        if not is_registry_ref(value):
            continue
        store = store or _open_registry(cfg)
        resolved = resolve_version(store, value)
        refs[f"{section}.{key}"] = resolved.ref
        cfg = _replace(cfg, section.split("."), key, str(resolved.path))
        log_event(logger, "registry version resolved", ref=resolved.ref, path=str(resolved.path))
    return cfg, refs


def _replace(cfg: Any, path: list[str], key: str, value: str) -> Any:
    if not path:
        return cfg.model_copy(update={key: value})
    child = getattr(cfg, path[0])
    return cfg.model_copy(update={path[0]: _replace(child, path[1:], key, value)})


def _register(
    run: RunDir, cfg: SeektuneConfig, summary: dict[str, Any], refs: dict[str, str], parent: str | None
) -> None:
    """Note the registered versions the run started from, register what the completed run produced
    (registry.enabled), and add the new versions to its report."""
    if not is_main_process():
        return
    if refs:
        run.update_metrics("registry", {"inputs": refs})
    if not cfg.registry.enabled:
        return
    from seektune.registry.register import register_run

    try:
        versions = register_run(_open_registry(cfg), cfg.registry, run.path, parent_ref=parent)
    except UserError as exc:
        raise UserError(
            f"{exc} (the run itself completed: register it later with seektune registry add {run.path})"
        ) from None
    registered = [{key: v[key] for key in ("ref", "kind", "parent")} for v in versions]
    run.update_metrics("registry", {"inputs": refs, "versions": registered})
    summary["registry"] = {"versions": versions}
    from seektune.report import write_report

    write_report(run, summary)
    log_event(logger, "registered", versions=",".join(v["ref"] for v in versions))


def _record_evaluations(run: RunDir, cfg: SeektuneConfig, refs: dict[str, str]) -> None:
    """Attach an evaluation of registered versions to them (what promotion asks for)."""
    from seektune.registry.catalog import record_evaluation

    metrics = json.loads(run.metrics_path.read_text(encoding="utf-8"))
    evaluated = metrics.get("eval") or {}
    fingerprint = (metrics.get("data") or {}).get("fingerprint")
    store = _open_registry(cfg)
    for field_name, which in (("model.name_or_path", ("model", "a")), ("eval.compare.with_model", ("b",))):
        scores = next((evaluated[w] for w in which if w in evaluated), None)
        if field_name in refs and scores:
            record_evaluation(store, refs[field_name], scores, fingerprint, str(run.path))
            log_event(logger, "evaluation recorded in the registry", ref=refs[field_name])


def _check_memory(cfg: SeektuneConfig) -> None:
    """Stop before anything loads when the configured micro-batch cannot fit (`seektune plan`'s estimate)."""
    from seektune.train.plan import check_fits

    check_fits(cfg)


def _has_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


@dataclass
class RunContext:
    """What the stages of one run have produced so far, for metrics.json and the report."""

    run: RunDir
    cfg: SeektuneConfig
    summary: dict[str, Any] = field(default_factory=dict)
    evaluated: list[Any] = field(default_factory=list)  # ModelEvaluation of each evaluated model, in order
    second_domain: Any = None  # the prepared eval.adaptability.source


def _check_launch(cfg: SeektuneConfig, command: str) -> None:
    """Refuse, before anything runs, what several processes cannot do together."""
    if world_size() < 2:
        return
    if command == "tune" or (command == "run" and cfg.tune.enabled):
        raise UserError(
            "a search runs its trials one process each: start `seektune tune` without a launcher, once per "
            "worker, all with the same tune.storage (docs/tune.md)"
        )
    if cfg.model.device.startswith("cuda:"):
        raise UserError(
            f"model.device is {cfg.model.device!r}, which puts every process of this {world_size()}-process "
            "launch on one GPU: set model.device: auto (each process takes the GPU of its LOCAL_RANK)"
        )
    if cfg.method.name in ("adapter", "prefix") and shards_parameters():
        raise UserError(
            f"method.name {cfg.method.name} saves its weights from one process, which under FSDP or "
            "DeepSpeed ZeRO-3 holds only a shard of them: use method.name lora, or plain data parallelism "
            "(configs/accelerate/ddp.yaml) or ZeRO-2"
        )
    if command == "compress" or (command == "run" and cfg.compress.enabled):
        raise UserError(
            "compression runs in one process: train under the launcher (seektune train), then run "
            "seektune compress without a launcher, with compress.source set to that run directory"
        )
    evaluates = command == "eval" or (command == "run" and cfg.eval.enabled)
    if evaluates and shards_parameters():
        raise UserError(
            "the evaluation runs in one process, but under FSDP or DeepSpeed ZeRO-3 each process holds only "
            "a shard of the weights: launch `seektune train` instead and evaluate its run directory in one "
            "process (seektune eval --model <run dir>), or set eval.enabled: false"
        )


def _shared_run_dir(cfg: SeektuneConfig) -> RunDir:
    """The run directory: rank 0 creates it and every other process is given its path."""
    run = RunDir.create(cfg.output_dir, cfg.name) if is_main_process() else None
    return RunDir(broadcast_from_main(run.path if run is not None else None))


@contextmanager
def open_run(cfg: SeektuneConfig, command: str) -> Iterator[RunContext]:
    """Create the run directory, record config and environment, and mark the run's outcome.

    Under a launcher the process group is joined first; only rank 0 writes, and the other processes
    log warnings and errors only.
    """
    start_process_group(cpu=not _has_cuda(cfg.model.device))
    _check_launch(cfg, command)
    run = _shared_run_dir(cfg)
    main = is_main_process()
    package_logger = logging.getLogger("seektune")
    quiet_from = package_logger.level
    if main:
        run.write_text("config.yaml", config_to_yaml(cfg))
        run.write_json("environment.json", environment_info(cfg.seed))  # rewritten with the device later
        attach_run_logs(run.logs_dir)
        run.mark_status("running", stage=command)
    else:
        from transformers.utils import logging as hf_logging

        package_logger.setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()  # rank 0 shows the loading bars; one set is enough
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = RunContext(
        run=run,
        cfg=cfg,
        summary={
            "run": {
                "name": cfg.name,
                "run_dir": str(run.path),
                "started_at": started,
                "seed": cfg.seed,
                "command_verb": _VERBS[command],
                "processes": world_size(),
            }
        },
    )
    log_event(logger, "run started", run_dir=str(run.path), command=command, processes=world_size())
    try:
        yield state
    except BaseException as exc:
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        if main:
            run.mark_status("failed", stage=command, error=message or type(exc).__name__)
        log_event(logger, "run failed", run_dir=str(run.path), error=message)
        raise
    else:
        state.summary["run"]["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if main:
            run.mark_status("completed", stage=command)
        log_event(logger, "run finished", run_dir=str(run.path))
    finally:
        if main:
            detach_run_logs()
        else:
            package_logger.setLevel(quiet_from)


def _load_base(state: RunContext):
    from transformers import set_seed

    from seektune.models.load import load_model

    set_seed(state.cfg.seed)
    loaded = load_model(state.cfg.model, four_bit=state.cfg.method.name == "qlora")
    if is_main_process():
        state.run.write_json("environment.json", environment_info(state.cfg.seed, str(loaded.device)))
    state.summary["run"].update(
        model=state.cfg.model.name_or_path,
        model_path=loaded.path,
        family=loaded.family.name,
        method=state.cfg.method.name,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
    return loaded


def _tokenizer(cfg: SeektuneConfig) -> Any:
    from seektune.models.load import load_tokenizer

    return load_tokenizer(cfg.model)


def _prepare(state: RunContext, need_train: bool = True):
    """Prepare the data with the model's tokenizer; under a launcher rank 0 prepares, the others load.

    Rank 0 goes first also because loading the tokenizer builds (tiny-deepseek-v3) or downloads the
    base into the shared cache, which the others then find there.
    """
    from seektune.data.prepare import compact_report, load_prepared, prepare_data

    if is_main_process():
        data = prepare_data(
            state.cfg.data, _tokenizer(state.cfg), state.cfg.seed, state.run.data_dir, need_train=need_train
        )
        state.run.update_metrics("data", compact_report(data.report))
    barrier()
    if not is_main_process():
        data = load_prepared(state.run.data_dir)
    state.summary["data"] = compact_report(data.report)
    return data


def _require_test_split(data: Any, needed_by: str | None = "eval.enabled: false") -> None:
    """`needed_by`: the setting that would make the test split unnecessary (None: there is none)."""
    if not len(data.tokenized["test"]):
        what = (
            f"raise data.test_ratio, add data, or set {needed_by}"
            if needed_by
            else ("raise data.test_ratio or add data")
        )
        raise UserError(f"the test split is empty, so nothing can be evaluated: {what}")


def _evaluate_on_main(
    state: RunContext, which: str, model: Any, tokenizer: Any, data: Any, model_dirs: list[Path]
) -> None:
    """Evaluate in rank 0 alone (generation needs no other process); the others wait for it."""
    if is_main_process():
        _evaluate(state, which, model, tokenizer, data, model_dirs)
    barrier()


def _evaluate(
    state: RunContext, which: str, model: Any, tokenizer: Any, data: Any, model_dirs: list[Path]
) -> None:
    from seektune.data.prepare import last_exchange
    from seektune.evaluate.evaluation import evaluate_model_fully

    started = time.perf_counter()
    evaluated = evaluate_model_fully(
        which,
        model,
        tokenizer,
        data,
        state.cfg.eval,
        state.cfg.seed,
        state.cfg.data.system_prompt,
        model_label=str(model_dirs[-1]) if model_dirs else which,
        model_dirs=model_dirs,
        second_domain=_second_domain(state, tokenizer),
    )
    state.evaluated.append(evaluated)
    scores = evaluated.entry["metrics"]
    seconds = round(time.perf_counter() - started, 2)
    evaluation = state.summary.setdefault("eval", {"models": {}, "samples": []})
    evaluation["models"][which] = {**scores, "seconds": seconds}
    state.run.update_metrics("eval", {which: scores})
    state.run.update_metrics("timing", {f"eval_{which}_s": seconds})
    answers = []
    for record, generation in zip(evaluated.task.records, evaluated.task.generations, strict=False):
        _, question, reference = last_exchange(record["messages"])
        answers.append(
            {
                "question": question,
                "reference": reference,
                "answer": generation.text,
                "ended_with_eos": generation.ended_with_eos,
            }
        )
    state.run.write_jsonl(f"eval/{which}-answers.jsonl", answers)
    samples = evaluation["samples"]
    for index, answer in enumerate(answers[:SAMPLES_IN_REPORT]):
        if index == len(samples):
            samples.append({"question": answer["question"], "reference": answer["reference"]})
        samples[index][which] = answer["answer"]


def _second_domain(state: RunContext, tokenizer: Any) -> Any:
    """The prepared second-domain test set of `eval.adaptability.source` (prepared once per run)."""
    source = state.cfg.eval.adaptability.source
    if source is None:
        return None
    if state.second_domain is None:
        from seektune.data.prepare import prepare_data

        held_out = source.model_copy(update={"split": "test", "ratio": None})
        cfg = type(state.cfg.data)(
            **{
                **state.cfg.data.model_dump(exclude={"sources", "mix", "balance", "augment", "packing"}),
                "sources": [held_out.model_dump()],
            }
        )
        state.second_domain = prepare_data(
            cfg, tokenizer, state.cfg.seed, state.run.path / "eval" / "second-domain", need_train=False
        )
    return state.second_domain


def _finish_evaluation(state: RunContext) -> None:
    """The A/B comparison, the review sheet, eval/results.json and the eval report (rank 0)."""
    if not is_main_process() or not state.evaluated:
        return
    from seektune.evaluate.evaluation import finish_evaluation

    evaluation = finish_evaluation(state.run, state.evaluated, state.cfg.eval, state.cfg.seed)
    summary = state.summary.setdefault("eval", {"models": {}, "samples": []})
    summary["evaluation"] = evaluation
    comparison = evaluation.get("comparison")
    if comparison:  # the scorecard stays in eval/results.json: its efficiency depends on the machine's load
        verdicts = {
            metric: {key: row[key] for key in ("diff", "ci_low", "ci_high", "p_value", "verdict")}
            for metric, row in comparison["metrics"].items()
        }
        state.run.update_metrics(
            "eval", {"comparison": {"a": comparison["a"], "b": comparison["b"], **verdicts}}
        )


@dataclass(frozen=True)
class TrainOptions:
    """How the CLI asked to train: resume from a checkpoint, accept changed data, or only profile."""

    resume: bool = False
    resume_new_data: bool = False
    profile: bool = False


def _resume_checkpoint(cfg: SeektuneConfig, options: TrainOptions) -> Any:
    """The checkpoint to continue from (checked against model and method), or None to start afresh."""
    if options.profile or not (options.resume or options.resume_new_data or cfg.train.resume == "auto"):
        return None
    from seektune.train.checkpoints import check_identity, checkpoint_identity, find_resume_checkpoint

    checkpoint = find_resume_checkpoint(cfg.output_dir, cfg.name)
    if checkpoint is None:
        if options.resume or options.resume_new_data:
            raise UserError(
                f"nothing to resume: no unfinished run named {cfg.name!r} in {cfg.output_dir} has a "
                "complete checkpoint; run without --resume to start a new run"
            )
        log_event(logger, "train.resume auto: no checkpoint to resume, starting a new run")
        return None
    check_identity(checkpoint, checkpoint_identity(cfg, None), allow_new_data=False)
    return checkpoint


def _train(
    state: RunContext,
    loaded: Any,
    data: Any,
    domain_weights: Any = None,
    checkpoint: Any = None,
    options: TrainOptions | None = None,
) -> Any:
    from seektune.models.methods import make_trainable
    from seektune.train.checkpoints import ResumePoint, check_identity, checkpoint_identity
    from seektune.train.preference import train_by_objective

    options = options or TrainOptions()
    identity = checkpoint_identity(state.cfg, data.report.get("fingerprint"))
    resume = None
    if checkpoint is not None:
        new_data = check_identity(checkpoint, identity, allow_new_data=options.resume_new_data)
        resume = ResumePoint(checkpoint, int(checkpoint.name.rsplit("-", 1)[1]), new_data)
        state.summary["run"]["resumed_from"] = str(checkpoint)
        log_event(logger, "resuming", checkpoint=str(checkpoint), new_data=new_data)
    if state.cfg.continual.enabled:
        model, result, trainable = _train_continual(state, loaded, data, identity)
    else:
        model, trainable = make_trainable(
            loaded.model, state.cfg.method, loaded.family, state.cfg.train.gradient_checkpointing
        )
        result = train_by_objective(
            state.cfg,
            model,
            loaded.tokenizer,
            data,
            state.run,
            checkpoint_identity=identity,
            domain_weights=domain_weights,
            resume=resume,
            profile=options.profile,
        )
    counts = {"trainable_params": trainable.trainable, "total_params": trainable.total}
    if result.profile is not None:
        state.summary["profile"] = result.profile
        if is_main_process():
            state.run.write_json("profile/summary.json", result.profile)
            state.run.update_metrics("profile", result.profile)
        return model
    state.summary["train"] = {**result.summary(), "history": result.history, **counts}
    if is_main_process():
        resumed = {"resumed_from": result.resumed_from} if result.resumed_from else {}
        state.run.update_metrics("train", {**result.scores(), **counts, **resumed})
        state.run.update_metrics("timing", result.timing())
        state.run.write_json("train/history.json", result.history)
    return model


def _train_continual(state: RunContext, loaded: Any, data: Any, identity: dict[str, Any]) -> tuple:
    """A continual-learning round: the earlier data prepared beside the new (`<run>/data/replay`), then
    replay + layer freezing, and plain fine-tuning to compare (`seektune.train.continual`)."""
    from seektune.data.prepare import prepare_data
    from seektune.train.continual import continual_round

    cfg = state.cfg
    _require_test_split(data, "continual.enabled: false")  # learning is measured on it
    old_cfg = cfg.data.model_copy(
        update={
            "sources": cfg.continual.replay.sources,
            "validation_ratio": 0.0,
            "max_train_samples": cfg.continual.replay.max_pool,
            "augment": cfg.data.augment.model_copy(update={"enabled": False}),
            "mix": type(cfg.data.mix)(),
            "balance": type(cfg.data.balance)(),
        }
    )
    old = prepare_data(old_cfg, loaded.tokenizer, cfg.seed, state.run.data_dir / "replay")
    if len(old.tokenized["test"]) == 0:
        raise UserError(
            "continual learning measures forgetting on the earlier data's test split, and "
            "continual.replay.sources gave none: give a test file (split: test) or raise data.test_ratio"
        )
    model, result, summary = continual_round(cfg, state.run, loaded, data, old, identity)
    state.summary["continual"] = summary
    if is_main_process():
        state.run.update_metrics("continual", summary)
    from seektune.models.methods import count_parameters

    return model, result, count_parameters(model)


def _previous_study(cfg: SeektuneConfig, resume: bool) -> str | None:
    """With --resume: the storage of the newest unfinished search of this name (its own SQLite file)."""
    if not resume or cfg.tune.storage:
        return None  # a named storage is continued by name anyway
    from seektune.train.checkpoints import unfinished_runs
    from seektune.tune.study import STUDY_FILE, TUNE_DIR

    for run in unfinished_runs(cfg.output_dir, cfg.name):
        study = run / TUNE_DIR / STUDY_FILE
        if study.is_file():
            return f"sqlite:///{study.resolve()}"
    raise UserError(
        f"nothing to resume: no unfinished search named {cfg.name!r} in {cfg.output_dir}; run without "
        "--resume to start a new one"
    )


def _search(state: RunContext, data: Any, resumed: str | None) -> Any:
    """The hyperparameter search (continuing the study at `resumed`, an earlier run's SQLite file, when
    given); the best trial's model ends in `<run>/model`."""
    from seektune.tune.study import run_search

    if resumed:
        state.summary["run"]["resumed_from"] = resumed
    result = run_search(state.cfg, state.run, data, _tokenizer(state.cfg), resumed)
    if resumed and is_main_process():  # its study is finished here: --resume no longer picks that run
        earlier = RunDir(Path(resumed.removeprefix("sqlite:///")).parents[1])
        earlier.mark_status("completed", stage=f"tune, continued in {state.run.path.name}")
    state.summary["tune"] = {
        **result.report,
        "config": str(result.config_path) if result.config_path else None,
    }
    state.run.update_metrics(
        "tune", {"study": result.study_name, "storage": result.storage, "best": result.best}
    )
    if result.model_dir is None:
        raise UserError(
            f"no trial of the search completed (see {state.run.path / 'tune' / 'report.md'}): fix the "
            "failing trials' errors there, or widen tune.space"
        )
    return result


def _domain_weights(cfg: SeektuneConfig, data: Any) -> Any:
    """The dynamic source weights (`data.mix.dynamic`), starting from the training split's shares."""
    if not cfg.data.mix.dynamic:
        return None
    from collections import Counter

    from seektune.data.mix import DomainWeights
    from seektune.data.records import column_values

    counts = Counter(column_values(data.tokenized["train"], "source"))
    if len(counts) < 2:
        raise UserError("data.mix.dynamic re-weights sources, but the training data has one: add a source")
    if not len(data.tokenized["validation"]):
        raise UserError(
            "data.mix.dynamic re-weights sources by their validation loss but there is no validation "
            "split: set data.validation_ratio above 0 (or give validation files)"
        )
    total = sum(counts.values())
    shares = {name: n / total for name, n in sorted(counts.items())}
    return DomainWeights(shares, cfg.data.mix.dynamic_step, cfg.data.mix.dynamic_min_share)


def _finish(state: RunContext) -> None:
    from seektune.report import write_report

    if not is_main_process():
        return
    models = state.summary.get("eval", {}).get("models", {})
    if "base" in models and "tuned" in models:
        state.run.update_metrics("eval", {"improvement": improvement(models["base"], models["tuned"])})
    write_report(state.run, state.summary)


def improvement(base: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    """Change from base to tuned per metric (relative for perplexity, absolute for rates and scores)."""
    change: dict[str, float] = {}
    if "perplexity" in base and "perplexity" in tuned:
        change["perplexity_relative"] = round(tuned["perplexity"] / base["perplexity"] - 1, 4)
    for key in ("rouge_l", "eos_rate"):
        if key in base and key in tuned:
            change[key] = round(tuned[key] - base[key], 4)
    return change


# ---------------------------------------------------------------------------------------------------------
# Entry points (the CLI calls these)


def run_pipeline(cfg: SeektuneConfig, options: TrainOptions | None = None) -> RunDir:
    """The whole loop: data, base evaluation, training, tuned evaluation, compression, report, registry."""
    cfg, refs = resolve_registry_refs(cfg)
    cfg = with_replay_sources(cfg, refs)
    check_stages_available(cfg, compresses=cfg.compress.enabled)
    _check_memory(cfg)
    options = options or TrainOptions()
    searched = _previous_study(cfg, options.resume) if cfg.tune.enabled else None
    checkpoint = None if cfg.tune.enabled else _resume_checkpoint(cfg, options)
    with open_run(cfg, "run") as state:
        data = _prepare(state)  # bad data stops before any weight is loaded
        if cfg.eval.enabled:
            _require_test_split(data)
        if cfg.compress.enabled:  # every compression step is checked on test prompts
            _require_test_split(data, "compress.enabled: false")
        weights = _domain_weights(cfg, data)
        loaded = _load_base(state)
        if cfg.eval.enabled and cfg.eval.compare_base:
            _evaluate_on_main(state, "base", loaded.model, loaded.tokenizer, data, _model_dirs(loaded.path))
        tokenizer = loaded.tokenizer
        if cfg.tune.enabled:
            loaded = None  # every trial loads its own base: this one would only hold memory meanwhile
            result = _search(state, data, searched)
            model = _load_trained(cfg, result.model_dir)
        else:
            model = _train(state, loaded, data, weights, checkpoint, options)
        if cfg.eval.enabled:
            _evaluate_on_main(
                state, "tuned", model, tokenizer, data, _model_dirs(str(state.run.path / "model"))
            )
            _finish_evaluation(state)
        if cfg.compress.enabled:
            model = loaded = None  # the chain loads each model it needs; this one would only hold memory
            _compress(state, data, _compress_source(cfg, state.run.path / "model"))
        _finish(state)
    _register(state.run, cfg, state.summary, refs, refs.get("model.name_or_path"))
    return state.run


def _compress_source(cfg: SeektuneConfig, trained: Path) -> Path:
    """compress.source as a model folder (a run directory's model/, the built-in base built), else the
    model this run trained."""
    if not cfg.compress.source:
        return trained
    from seektune.compress.merge import model_folder
    from seektune.models.load import resolve_model_path

    named = cfg.model.model_copy(update={"name_or_path": cfg.compress.source})
    return model_folder(Path(resolve_model_path(named)))


def _compress(state: RunContext, data: Any, source: Path) -> None:
    """The compression chain on `source`; its table and steps go to metrics.json and the report."""
    from seektune.compress.chain import run_compression

    started = time.perf_counter()
    result = run_compression(state.cfg, state.run, data, source)
    state.summary["compress"] = result.to_dict()
    state.run.update_metrics(
        "compress",
        {
            "final_model": str(result.final_model),
            "steps": [step["step"] for step in result.steps],
            "table": result.to_dict()["table"],
        },
    )
    state.run.update_metrics("timing", {"compress_s": round(time.perf_counter() - started, 2)})


def run_compress_stage(cfg: SeektuneConfig) -> RunDir:
    """Compress `compress.source` (or model.name_or_path): data for the checks (and for the steps that
    train), then the chain; the compressed model and compress/report.md end in the run directory."""
    from seektune.compress.chain import needs_training_data, plan_steps
    from seektune.compress.merge import model_folder
    from seektune.models.load import resolve_model_path

    cfg, refs = resolve_registry_refs(cfg)
    compress = cfg.compress.model_copy(update={"enabled": True})
    cfg = cfg.model_copy(update={"compress": compress})
    if compress.source:  # the data is tokenised with the tokenizer of the model being compressed
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": compress.source})})
    # only compression's own checks: the training method, a search's storage and the like play no part
    source = model_folder(Path(resolve_model_path(cfg.model)))
    plan_steps(cfg, source)  # what cannot run stops here, before a run directory exists
    _check_registry(cfg)
    with open_run(cfg, "compress") as state:
        data = _prepare(state, need_train=needs_training_data(cfg))
        _require_test_split(data, needed_by=None)
        _compress(state, data, source)
        _finish(state)
    parent = refs.get("compress.source") or (None if compress.source else refs.get("model.name_or_path"))
    _register(state.run, cfg, state.summary, refs, parent)
    return state.run


def _load_trained(cfg: SeektuneConfig, model_dir: Any) -> Any:
    from seektune.models.load import load_model

    return load_model(cfg.model.model_copy(update={"name_or_path": str(model_dir)})).model


def run_tune_stage(cfg: SeektuneConfig, resume: bool = False) -> RunDir:
    """Prepare the data and search hyperparameters; the best trial's config and model end in the run."""
    cfg, refs = resolve_registry_refs(cfg)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"enabled": True})})
    check_stages_available(cfg)
    url = _previous_study(cfg, resume)
    with open_run(cfg, "tune") as state:
        data = _prepare(state)
        _search(state, data, url)
        _finish(state)
    _register(state.run, cfg, state.summary, refs, refs.get("model.name_or_path"))
    return state.run


def run_data_stage(cfg: SeektuneConfig) -> RunDir:
    """Prepare the data alone (the tokenizer of the configured model is loaded, not its weights)."""
    with open_run(cfg, "data") as state:
        _prepare(state)
        _finish(state)
    return state.run


def run_train_stage(cfg: SeektuneConfig, options: TrainOptions | None = None) -> RunDir:
    """Prepare the data and train, without evaluation (or, with `options.profile`, profile a few steps)."""
    cfg, refs = resolve_registry_refs(cfg)
    cfg = with_replay_sources(cfg, refs)
    check_stages_available(cfg, compresses=cfg.compress.enabled)
    _check_memory(cfg)
    options = options or TrainOptions()
    checkpoint = _resume_checkpoint(cfg, options)
    with open_run(cfg, "train") as state:
        data = _prepare(state)
        weights = _domain_weights(cfg, data)
        loaded = _load_base(state)
        _train(state, loaded, data, weights, checkpoint, options)
        _finish(state)
    if not options.profile:
        _register(state.run, cfg, state.summary, refs, refs.get("model.name_or_path"))
    return state.run


def run_eval_stage(cfg: SeektuneConfig) -> RunDir:
    """Evaluate the configured model (a base, a merged model or a run's `model` folder) on the test split;
    with `eval.compare.with_model`, evaluate that model too and compare the two (A = the configured one).
    A registered version (registry:NAME@REF) evaluated here gets the evaluation recorded in the registry."""
    cfg, refs = resolve_registry_refs(cfg)
    other = cfg.eval.compare.with_model
    if other:
        _check_same_tokenizer(cfg, other)
    with open_run(cfg, "eval") as state:
        data = _prepare(state, need_train=False)
        _require_test_split(data)
        loaded = _load_base(state)
        names = ("a", "b") if other else ("model",)
        _evaluate_on_main(state, names[0], loaded.model, loaded.tokenizer, data, _model_dirs(loaded.path))
        if other:
            loaded = None  # free model A before B loads
            loaded = _load_other(cfg, other)
            _evaluate_on_main(state, "b", loaded.model, loaded.tokenizer, data, _model_dirs(loaded.path))
        _finish_evaluation(state)
        _finish(state)
    if refs and is_main_process():
        unregistered = cfg.registry.model_copy(update={"enabled": False})  # an evaluation makes no model
        _register(
            state.run,
            cfg.model_copy(update={"registry": unregistered}),
            state.summary,
            refs,
            None,
        )
        _record_evaluations(state.run, cfg, refs)
    return state.run


def _check_same_tokenizer(cfg: SeektuneConfig, other: str) -> None:
    """A and B are scored on the same tokenised test set (and B's perplexity on A's tokens), so they must
    share a tokenizer and chat template; stop before anything runs when they do not."""
    from seektune.models.load import load_tokenizer, resolve_model_path

    mine = load_tokenizer(cfg.model)
    theirs = load_tokenizer(
        cfg.model, resolve_model_path(cfg.model.model_copy(update={"name_or_path": other}))
    )
    if mine.get_vocab() != theirs.get_vocab() or mine.chat_template != theirs.chat_template:
        raise UserError(
            f"eval.compare.with_model {other!r} has another tokenizer or chat template than "
            f"{cfg.model.name_or_path!r}, so their test tokens and prompts differ and a paired comparison "
            "is not meaningful: compare models of one base, or evaluate each on its own with seektune eval"
        )


def _model_dirs(path: str) -> list[Path]:
    """The local folders whose weight files make a model: an adapter's base first, then the adapter (a
    hub id resolves to its snapshot in the local cache)."""
    from seektune.models.load import adapter_base

    base = adapter_base(path)
    return [_local_folder(p) for p in ([base, path] if base else [path])]


def _local_folder(name: str) -> Path:
    if Path(name).exists():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or not a hub id): efficiency reports the size as unknown
        return Path(name)


def _load_other(cfg: SeektuneConfig, name_or_path: str) -> Any:
    from seektune.models.load import load_model

    return load_model(cfg.model.model_copy(update={"name_or_path": name_or_path}))
