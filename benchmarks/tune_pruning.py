"""Hyperparameter search: what pruning saves, and what TPE gains over random sampling, in seektune's search.

Work: whole Optuna studies run by `seektune.tune.study.run_search` (the code `seektune tune` runs), each in
its own run directory, on one tokenised dataset prepared once (`prepare_data`: the chat examples of
`builtin:stdlib-docs-qa`, --train-samples training and --eval-samples validation examples). Every trial
trains a LoRA adapter for --steps optimizer steps (batch --batch-size, fp32 on the CPU) and evaluates the
validation loss every --eval-steps steps; seektune's defaults otherwise (cosine schedule, `keep_best`: the
trial's value is its lowest validation loss; the config's own values as the baseline trial 0). The space
is where pruning should pay: the learning rate on a log scale over 3.5 decades (most of it too low to
learn much in a short run), LoRA rank 4-32, warm-up ratio 0-0.3. The model is --base: `reduced`, the
reduced recipe of the offline base the test suite builds (2 layers, hidden 96, 4 routed experts: a trial
of 40 steps and 9 evaluations takes about 5 CPU s here, so the default run takes about 15 minutes), or
`default`, `tiny-deepseek-v3` itself (4.4M parameters: about 3x the time per step, evaluations included).
`ensure_base` builds either once into seektune's cache.

The comparisons, for every seed of --seeds (42, 43, ...: the study's `seed`, which seeds the sampler and
every trial's training):

- pruning: TPE with `tune.pruner: none` against TPE with the same seed, space and number of trials and a
  pruner from --pruners. `median` is what `pruner: auto` gives: Optuna's MedianPruner once
  `tune.pruner_startup_trials` (2) trials are complete, and in a trial not before it has trained on
  `tune.pruner_warmup_ratio` (0.25) of its rows (trials report their validation loss against the training
  rows seen: here not before step 10 of 40). `median:startup=N:warmup=R` sets those two keys (either or
  both). `hyperband` is Optuna's HyperbandPruner with seektune's resources: its first rung at the first
  evaluation, its last at the end of a trial.
- samplers: TPE against random sampling at the same budget (trials and steps), both without pruning.
  seektune's TPE starts with Optuna's 10 random startup trials, drawn from the same seeded generator
  as the random sampler's: at one seed both studies share trials 0-9 (trial 0 is the baseline), and only
  the later trials show what TPE's model adds.

Figures. `best` is the study's best value: the lowest validation loss any complete trial reached. Compute
is the optimizer steps spent over all trials (`user_attrs["steps"]`: a pruned trial counts the steps it
trained before it was stopped); the compute ratio is the pruned study's steps over the unpruned one's.
The loss gap is (pruned best - unpruned best) / unpruned best, in per cent. The goal: a gap within 2% for
at most half the compute. As the losses of this space lie in a narrow band above the model's floor (the
baseline trial, the config's own values, ends within 2% of the best one), the gap is also given as a share
of what the unpruned search gained over its baseline trial (baseline value - best value): the share of
the search's gain that pruning lost. CPU seconds (`time.process_time` of the whole study, one process)
are printed too: they also hold what steps do not count, the evaluations, checkpoints and the per-trial
set-up, so their ratio is the saving of time a user sees on this machine. --threads defaults to 1 (see
benchmarks/train_throughput.py: on 2 shared cores, a second OpenMP thread made steps slower).

    python benchmarks/tune_pruning.py [--trials 20] [--steps 40] [--eval-steps 5] [--seeds 3]
        [--pruners median median:warmup=0 median:startup=0 hyperband] [--base reduced|default] [--no-samplers]
        [--show-trials] [--eval-samples 32] [--train-samples 512] [--batch-size 8] [--threads 1]

The last line repeats the figures as key=value pairs: means over the seeds, and the compute ratio of the
pruned studies' steps over the unpruned studies' steps, all seeds together; the keys of `median` bare,
those of other pruners prefixed with their name (`median_warmup0_compute_ratio`, `hyperband_goal_met`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SEED = 42
# The reduced recipe of the offline base that tests/support.py builds for the test suite.
REDUCED_RECIPE = {
    "vocab_size": 2048,
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "intermediate_size": 128,
    "context_length": 96,
    "pretrain_steps": 300,
    "batch_size": 8,
    "learning_rate": 3e-3,
}
SPACE = {
    "train.learning_rate": {"type": "float", "low": 1.0e-5, "high": 3.0e-2, "log": True},
    "method.lora.r": [4, 8, 16, 32],
    "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.3},
}
# The settings of the median pruner that --pruners can set, and their config keys.
PRUNER_SETTINGS = {"startup": "pruner_startup_trials", "warmup": "pruner_warmup_ratio"}
GOAL_GAP_PCT = 2.0
GOAL_COMPUTE_RATIO = 0.5


# ---- one study ----


def study_config(
    args: argparse.Namespace, root: Path, name: str, seed: int, sampler: str, pruner: str
) -> Any:
    """The whole-run config of one study; `pruner` is `none`, `hyperband` or `median` with optional
    `:startup=N:warmup=R`."""
    from seektune.config import validate_config

    pruner_name, *settings = pruner.split(":")
    tune: dict[str, Any] = {
        "n_trials": args.trials,
        "sampler": sampler,
        "pruner": pruner_name,
        "space": SPACE,
    }
    tune.update(_pruner_setting(setting) for setting in settings)
    model: dict[str, Any] = {"device": "cpu"}
    if args.base == "reduced":
        model["base"] = REDUCED_RECIPE
    raw = {
        "name": name,
        "seed": seed,
        "output_dir": str(root / "runs"),
        "model": model,
        "data": {
            "max_train_samples": args.train_samples,
            "max_eval_samples": args.eval_samples,
            "max_length": 128,
        },
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16}},
        "train": {
            "learning_rate": 1.0e-3,
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "eval_steps": args.eval_steps,
            "logging_steps": args.eval_steps,
            "report_to": [],  # no TensorBoard files for a few hundred throw-away trials
        },
        "tune": tune,
    }
    return validate_config(raw)


def run_study(
    args: argparse.Namespace, root: Path, prepared: tuple[Any, Any], seed: int, sampler: str, pruner: str
) -> dict[str, Any]:
    """Run one whole study with `run_search` and read its figures back from its Optuna storage."""
    import optuna

    from seektune.rundir import RunDir
    from seektune.tune.study import run_search

    data, tokenizer = prepared
    name = f"{sampler}-{_label(pruner)}-s{seed}"
    cfg = study_config(args, root, name, seed, sampler, pruner)
    run = RunDir.create(root / "runs", name)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_search(cfg, run, data, tokenizer)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    best = min(complete, key=lambda t: t.value)
    return {
        "name": name,
        "sampler": sampler,
        "pruner": pruner,
        "seed": seed,
        "best": best.value,
        "best_trial": best.number,
        "best_params": best.params,
        "baseline": next((t.value for t in complete if t.user_attrs.get("baseline")), float("nan")),
        "steps": sum(int(t.user_attrs.get("steps", 0)) for t in study.trials),
        "complete": len(complete),
        "pruned": len(pruned),
        "pruned_at": sorted(int(t.user_attrs.get("steps", 0)) for t in pruned),
        "failed": len(study.trials) - len(complete) - len(pruned),
        "wall_s": wall,
        "cpu_s": cpu,
        "trials": study.trials,
    }


def _params_text(params: dict[str, Any]) -> str:
    short = {"train.learning_rate": "lr", "method.lora.r": "r", "train.warmup_ratio": "warmup"}
    return ", ".join(
        f"{short.get(key, key)} {value:.2g}" if isinstance(value, float) else f"{short.get(key, key)} {value}"
        for key, value in params.items()
    )


def print_study(study: dict[str, Any], show_trials: bool) -> None:
    pruned = ""
    if study["pruned"]:
        at = study["pruned_at"]
        pruned = f", {study['pruned']} pruned (at steps {at[0]}-{at[-1]}, median {statistics.median(at):g})"
    failed = f", {study['failed']} FAILED" if study["failed"] else ""
    print(
        f"{study['sampler']:<6} pruner {study['pruner']:<10} seed {study['seed']}: best {study['best']:.4f} "
        f"(trial {study['best_trial']}: {_params_text(study['best_params'])}; baseline trial "
        f"{study['baseline']:.4f}); {study['complete']} complete"
        f"{pruned}{failed}; {study['steps']:,} steps; {study['cpu_s']:.0f} CPU s ({study['wall_s']:.0f} s)",
        flush=True,
    )
    if show_trials:
        for trial in study["trials"]:
            value = f"{trial.value:.4f}" if trial.value is not None else "      "
            print(
                f"    trial {trial.number:>2} {trial.state.name.lower():<8} {value} after "
                f"{trial.user_attrs.get('steps', 0):>3} steps  {_params_text(trial.params)}"
            )


# ---- the comparisons ----


def pruning_figures(unpruned: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """The loss gap and compute ratio of a pruned study against the unpruned one of the same seed."""
    gap = pruned["best"] - unpruned["best"]
    gain = unpruned["baseline"] - unpruned["best"]
    figures = {
        "gap_pct": 100 * gap / unpruned["best"],
        "gain_lost_pct": 100 * gap / gain if gain > 0 else float("nan"),
        "compute_ratio": pruned["steps"] / unpruned["steps"],
        "cpu_ratio": pruned["cpu_s"] / unpruned["cpu_s"],
    }
    figures["goal_met"] = (
        figures["gap_pct"] <= GOAL_GAP_PCT and figures["compute_ratio"] <= GOAL_COMPUTE_RATIO
    )
    return figures


def print_pruning(
    pruner: str, unpruned: dict[str, Any], pruned: dict[str, Any], figures: dict[str, Any]
) -> None:
    print(
        f"  seed {unpruned['seed']}, pruner {pruner}: best {pruned['best']:.4f} vs {unpruned['best']:.4f} "
        f"unpruned ({figures['gap_pct']:+.2f}%; {figures['gain_lost_pct']:.0f}% of the search's gain over "
        f"the baseline trial, {unpruned['baseline']:.4f} -> {unpruned['best']:.4f}); steps "
        f"{pruned['steps']:,} / {unpruned['steps']:,} = {figures['compute_ratio']:.2f}x; CPU s "
        f"{figures['cpu_ratio']:.2f}x; "
        f"goal {'met' if figures['goal_met'] else 'NOT met'}"
    )


def pruning_summary(pruner: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Means over the seeds; the compute ratio of all seeds' steps together."""
    figures = [pruning_figures(unpruned, pruned) for unpruned, pruned in pairs]
    summary = {
        "unpruned_best": statistics.mean(u["best"] for u, _ in pairs),
        "pruned_best": statistics.mean(p["best"] for _, p in pairs),
        "loss_gap_pct": statistics.mean(f["gap_pct"] for f in figures),
        "loss_gap_max_pct": max(f["gap_pct"] for f in figures),
        "gain_lost_pct": statistics.mean(f["gain_lost_pct"] for f in figures),
        "compute_ratio": sum(p["steps"] for _, p in pairs) / sum(u["steps"] for u, _ in pairs),
        "cpu_ratio": sum(p["cpu_s"] for _, p in pairs) / sum(u["cpu_s"] for u, _ in pairs),
        "goal_met": f"{sum(f['goal_met'] for f in figures)}/{len(figures)}",
    }
    print(
        f"pruner {pruner} over {len(pairs)} seeds: mean best {summary['pruned_best']:.4f} vs "
        f"{summary['unpruned_best']:.4f} unpruned (gap mean {summary['loss_gap_pct']:+.2f}%, worst "
        f"{summary['loss_gap_max_pct']:+.2f}%; {summary['gain_lost_pct']:.0f}% of the search's gain over the "
        f"baseline lost); compute {summary['compute_ratio']:.2f}x (CPU s "
        f"{summary['cpu_ratio']:.2f}x); goal (gap <= {GOAL_GAP_PCT:g}%, compute <= "
        f"{GOAL_COMPUTE_RATIO:g}x) met for {summary['goal_met']} seeds"
    )
    return summary


def sampler_summary(tpe: list[dict[str, Any]], random: list[dict[str, Any]]) -> dict[str, Any]:
    """TPE against random sampling, both unpruned, seed by seed and on average."""
    for ours, peer in zip(tpe, random, strict=True):
        print(
            f"  seed {ours['seed']}: TPE best {ours['best']:.4f} (trial {ours['best_trial']}), random "
            f"{peer['best']:.4f} (trial {peer['best_trial']}): TPE {ours['best'] - peer['best']:+.4f}"
        )
    summary = {
        "tpe_mean_best": statistics.mean(s["best"] for s in tpe),
        "random_mean_best": statistics.mean(s["best"] for s in random),
        "tpe_wins": f"{sum(t['best'] < r['best'] for t, r in zip(tpe, random, strict=True))}/{len(tpe)}",
    }
    print(
        f"TPE against random over {len(tpe)} seeds: mean best {summary['tpe_mean_best']:.4f} vs "
        f"{summary['random_mean_best']:.4f} ({summary['tpe_mean_best'] - summary['random_mean_best']:+.4f}); "
        f"TPE lower for {summary['tpe_wins']} seeds"
    )
    return summary


# ---- the run ----


def prepare(args: argparse.Namespace, root: Path) -> tuple[Any, Any]:
    """The tokenizer (building the base when needed) and the data every study shares, prepared once."""
    from seektune.data.prepare import prepare_data
    from seektune.models.load import load_tokenizer

    cfg = study_config(args, root, "prepare", SEED, "tpe", "none")
    started = time.perf_counter()
    # What a study imports on first use (peft, the Trainer, the report), loaded here so that the first
    # study's CPU seconds do not hold it.
    for module in ("seektune.models.methods", "seektune.train.trainer", "seektune.tune.report"):
        importlib.import_module(module)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, SEED, root / "prepared")
    print(
        f"data: {len(data.tokenized['train'])} training and {len(data.tokenized['validation'])} validation "
        f"examples of builtin:stdlib-docs-qa; base and data ready in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return data, tokenizer


def _print_header(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    packages = ("optuna", "torch", "transformers", "peft")
    print(f"seektune hyperparameter search benchmark: pruning and samplers ({args.base} base)")
    print(
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {platform.machine()}, "
        f"{args.threads} torch threads; python {platform.python_version()}; "
        + ", ".join(f"{name} {version(name)}" for name in packages)
    )
    print(
        f"settings: --trials {args.trials} --steps {args.steps} --eval-steps {args.eval_steps} --seeds "
        f"{args.seeds} --batch-size {args.batch_size}; space: "
        + "; ".join(f"{key} {spec}" for key, spec in SPACE.items()),
        flush=True,
    )


def _quiet() -> None:
    """Library progress bars and INFO logs off: the benchmark prints its own lines."""
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of every study")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of a trial that is not pruned")
    parser.add_argument(
        "--eval-steps", type=int, default=5, help="validation loss (and pruning) every N steps"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 42, 43, ...: each compares on every seed")
    parser.add_argument(
        "--pruners",
        nargs="+",
        default=["median"],
        help="median (optionally :startup=N, :warmup=R, e.g. median:startup=0:warmup=0) or hyperband",
    )
    parser.add_argument("--no-samplers", action="store_true", help="leave out the random-sampling studies")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=512, help="training examples")
    parser.add_argument("--eval-samples", type=int, default=32, help="validation examples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see above)")
    parser.add_argument("--base", choices=("reduced", "default"), default="reduced")
    parser.add_argument("--show-trials", action="store_true", help="print every trial of every study")
    args = parser.parse_args(argv)
    for pruner in args.pruners:
        if not _valid_pruner(pruner):
            parser.error(f"--pruners: {pruner!r} is not hyperband or median[:startup=N][:warmup=R]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    _print_header(args)
    seeds = list(range(SEED, SEED + args.seeds))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seektune-tune-bench-") as tmp:
        root = Path(tmp)
        prepared = prepare(args, root)
        tpe, random, pruned = [], [], {pruner: [] for pruner in args.pruners}
        for seed in seeds:  # seed by seed, so that a busy minute hits every kind of study alike
            tpe.append(run_study(args, root, prepared, seed, "tpe", "none"))
            print_study(tpe[-1], args.show_trials)
            for pruner in args.pruners:
                pruned[pruner].append(run_study(args, root, prepared, seed, "tpe", pruner))
                print_study(pruned[pruner][-1], args.show_trials)
                print_pruning(
                    pruner, tpe[-1], pruned[pruner][-1], pruning_figures(tpe[-1], pruned[pruner][-1])
                )
            if not args.no_samplers:
                random.append(run_study(args, root, prepared, seed, "random", "none"))
                print_study(random[-1], args.show_trials)
    values: dict[str, Any] = {"trials": args.trials, "steps": args.steps, "seeds": args.seeds}
    values["unpruned_best"] = _rounded(statistics.mean(study["best"] for study in tpe))
    for pruner in args.pruners:  # the default pruner's keys bare, the others' prefixed with its name
        summary = pruning_summary(pruner, list(zip(tpe, pruned[pruner], strict=True)))
        prefix = "" if pruner == "median" else _label(pruner).replace("-", "_") + "_"
        values.update(
            {prefix + key: _rounded(value) for key, value in summary.items() if key != "unpruned_best"}
        )
    if random:
        values.update({key: _rounded(value) for key, value in sampler_summary(tpe, random).items()})
    print(f"total {time.perf_counter() - started:.0f} s")
    print(" ".join(f"{key}={value}" for key, value in values.items()))


def _valid_pruner(pruner: str) -> bool:
    name, *settings = pruner.split(":")
    if name == "hyperband":
        return not settings
    try:
        return name == "median" and all(_pruner_setting(setting) for setting in settings)
    except (KeyError, ValueError):
        return False


def _pruner_setting(setting: str) -> tuple[str, int | float]:
    """`startup=2` as ("pruner_startup_trials", 2), `warmup=0.1` as ("pruner_warmup_ratio", 0.1)."""
    key, _, value = setting.partition("=")
    return PRUNER_SETTINGS[key], int(value) if key == "startup" else float(value)


def _label(pruner: str) -> str:
    """`median:startup=0:warmup=0.1` as `median-startup0-warmup0.1` (a run name and a key prefix)."""
    return pruner.replace(":", "-").replace("=", "")


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
