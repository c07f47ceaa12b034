"""LoRA training speed of seektune against TRL's SFTTrainer, on the same model, data, adapter and steps.

Work: LoRA (r, alpha, dropout, the DeepSeek-V3 preset's target modules: `target_modules: auto`) on the
default offline base `tiny-deepseek-v3` (4.4M parameters; `ensure_base` builds it or finds it cached),
over the chat examples of `builtin:stdlib-docs-qa`, tokenised once by seektune's `prepare_data` (chat
template, labels -100 on prompt tokens). Every run gets the same token ids and labels, learning rate,
cosine schedule with warm-up, clipping, seed and number of optimizer steps. The runs:

- seektune: `apply_method` + `seektune.train.trainer.train` on rows packed by `seektune.data.pack` (what
  `data.packing: true` does with its default `pack_order: shuffled` and the run's seed, rows of --seq-len
  tokens), --batch-size rows per step, fp32 (seektune's
  choice on a CPU). Its collator and progress callback are wrapped to count tokens and time steps.
- TRL: `SFTTrainer` given the same PEFT model (made by `apply_method`: PEFT 0.21 would rewrite the MLP
  target names into the routed experts, huggingface/peft#3711) and the same `input_ids`/`labels` as a
  pre-tokenised dataset. `SFTConfig` keeps its defaults (bf16, gradient checkpointing, no packing) except
  the common settings. The other configurations vary what a user can pick: bf16 on/off, gradient
  checkpointing on/off, and padded batches, `padding_free=True` or `packing=True` (best-fit decreasing
  into rows of --seq-len; TRL then batches padding-free too). `--trl-grid` runs all twelve; by default:
  TRL's defaults (`trl-bf16-gc-padded`), its packing (`trl-bf16-gc-packing`) and the two fastest of the
  grid on the project's machine (fp32, no checkpointing, padded or padding-free: which wins depends on
  the batch). "TRL best" is the fastest TRL run measured.
- plain: a plain PyTorch loop (AdamW, same schedule and clipping) over seektune's packed rows and
  collator, for reference: what is left of a step without any trainer.

Same global batch: the packed runs take --batch-size rows of --seq-len tokens; the unpacked ones take
--batch-size times the mean number of examples in a packed row (printed), so every step sees the same
real tokens on average, equal steps mean equal real tokens (the counts are printed), and the losses
compare at the same number of real tokens. `loss` is the validation loss after the last step (the same
validation examples and code for every run: padded batches of 32 with an attention mask); `train` is
the mean training loss of the last five steps.

Figures. Real tokens are the tokens of the examples in a batch (padding never counts), counted by a
collator wrapper. Speed is measured from the end of step --skip-steps to the end of the last step (the
first steps pay for lazy initialisation): data loading, forward, backward, optimizer, logging and
callbacks. It is given per CPU second of the measuring process (`time.process_time`, all its threads)
and per wall-clock second. On a CPU shared with other work, wall-clock rates swing by 2x from one run to
the next while CPU-time rates stay within a few per cent, so the ratios quoted are those of real tokens
per CPU second. For the same reason --threads defaults to 1: with 2 threads on 2 shared cores, OpenMP's
waiting threads made a step 6x slower while other processes ran. Each run is a fresh process
with `torch.set_num_threads(--threads)`; peak memory is its resident high-water mark (VmHWM).

MFU = model FLOPs per real token x real tokens per CPU second / peak FLOPs per CPU second. FLOPs per
real token are counted once with `torch.utils.flop_counter.FlopCounterMode` over the forward and
backward of 64 single unpadded examples of the adapted model (routed experts through the per-expert
`eager` path, as the counter has no formula for grouped_mm): useful work only, so padding, gradient
checkpointing's recomputation and attention across packed neighbours count as waste. The peak is the
best of five rounds of ten 1024x1024 fp32 `torch.mm`, with the same threads.

    python benchmarks/train_throughput.py [--steps 6] [--batch-size 4] [--seq-len 512] [--trl-grid]
        [--repeats N] [--threads 1] [--only seektune trl-fp32-nogc-padded ...]

The last line repeats the figures as key=value pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEED = 42
VALIDATION_BATCH = 32
# TRL configurations a user can pick: (bf16, gradient checkpointing, batching).
TRL_GRID = {
    f"trl-{'bf16' if bf16 else 'fp32'}-{'gc' if gc else 'nogc'}-{mode}": {
        "bf16": bf16,
        "gradient_checkpointing": gc,
        "packing": mode == "packing",
        "padding_free": mode == "padding_free",
    }
    for mode in ("padded", "padding_free", "packing")
    for bf16 in (True, False)
    for gc in (True, False)
}
TRL_DEFAULTS = "trl-bf16-gc-padded"
TRL_PACKING = "trl-bf16-gc-packing"
# The fastest of --trl-grid on the project's machine (docs/benchmarks.md): which of the two wins depends on
# the batch (padding-free attends over the whole flattened batch, so its cost grows with the batch).
FASTEST_TRL = ("trl-fp32-nogc-padded", "trl-fp32-nogc-padding_free")


# ---- instrumentation shared by the runs ----


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class TokenCounter:
    """A collator wrapper that records the real (non-padding) tokens of every batch, in order."""

    def __init__(self, collator: Any, counts: list[int]) -> None:
        self.collator = collator
        self.counts = counts

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.counts.append(sum(len(feature["input_ids"]) for feature in features))
        return self.collator(features)


class StepRecord:
    """Step end times, logged training losses and real tokens per batch of one run."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []

    def callback(self, base: type | None = None) -> Any:
        """A TrainerCallback (subclass of `base`, e.g. seektune's ProgressCallback) that fills this record."""
        record = self

        class StepClock(base or _callback_base()):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                record.mark()
                return super().on_step_end(args, state, control, **kwargs)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
                if logs and "loss" in logs:
                    record.losses.append(float(logs["loss"]))
                return super().on_log(args, state, control, logs=logs, **kwargs)

        return StepClock

    def mark(self) -> None:
        """The end of a step: wall clock, and the CPU time of this process (all its threads)."""
        self.step_ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def figures(self, skip: int) -> dict[str, Any]:
        """Rates over the steps after the first `skip`; the losses and the real tokens of the run."""
        steps = len(self.step_ends)
        if steps <= skip or len(self.tokens) < steps:
            raise RuntimeError(
                f"the instrumentation saw {steps} step ends and {len(self.tokens)} batches: the trainer no "
                "longer calls the wrapped collator or callback (see phase_seektune / phase_trl)"
            )
        tokens = self.tokens[:steps]
        seconds = self.step_ends[-1] - self.step_ends[skip - 1]
        return {
            "steps": steps,
            "tokens": sum(tokens),
            "timed_tokens": sum(tokens[skip:]),
            "timed_seconds": seconds,
            "tokens_per_s": sum(tokens[skip:]) / seconds,
            "tokens_per_cpu_s": sum(tokens[skip:]) / (self.cpu_ends[-1] - self.cpu_ends[skip - 1]),
            "train_loss": sum(self.losses[-5:]) / len(self.losses[-5:]) if self.losses else None,
            "losses": [round(loss, 4) for loss in self.losses],
        }


def heldout_loss(model: Any, examples: Any, pad_token_id: int) -> float:
    """Mean next-token loss over the label tokens of `examples` (padded batches with an attention mask)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), VALIDATION_BATCH):
            batch = examples[start : start + VALIDATION_BATCH]
            longest = max(len(ids) for ids in batch["input_ids"])
            shape = (len(batch["input_ids"]), longest)
            input_ids = torch.full(shape, pad_token_id)
            labels = torch.full(shape, -100)
            mask = torch.zeros(shape, dtype=torch.long)
            for row, (ids, row_labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(row_labels)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
            shifted = labels[:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((shifted != -100).sum())
    model.train()
    return total / count


def _lora_model(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The base loaded by seektune, with the LoRA adapter of `apply_method`; and the tokenizer."""
    from seektune.config import MethodConfig, ModelConfig
    from seektune.models.load import load_model
    from seektune.models.methods import apply_method

    loaded = load_model(ModelConfig(name_or_path=spec["base"], device="cpu", **spec.get("model", {})))
    method = MethodConfig(name="lora", lora=spec["lora"])
    model, _ = apply_method(loaded.model, method, loaded.family)
    return model, loaded.tokenizer


def _datasets(spec: dict[str, Any]) -> tuple[Any, Any]:
    from datasets import load_from_disk

    data = Path(spec["data"])
    return load_from_disk(str(data / "train")), load_from_disk(str(data / "validation"))


# ---- the measuring phases, each run by a fresh process (--phase) ----


def phase_seektune(spec: dict[str, Any]) -> dict[str, Any]:
    """seektune's training stage on packed rows; the collator and progress callback are wrapped to count
    tokens and time steps (instrumentation only: what trains and how is unchanged)."""
    from seektune.config import TrainConfig
    from seektune.data.pack import pack_dataset
    from seektune.data.prepare import PreparedData
    from seektune.rundir import RunDir
    from seektune.train import collate
    from seektune.train import trainer as trainer_module

    model, tokenizer = _lora_model(spec)
    train_set, validation = _datasets(spec)
    packed, stats = pack_dataset(train_set, spec["seq_len"], seed=spec["pack_seed"])
    record = StepRecord()
    make_collator = collate.collator_for
    collate.collator_for = lambda *args: TokenCounter(make_collator(*args), record.tokens)
    trainer_module.ProgressCallback = record.callback(trainer_module.ProgressCallback)
    cfg = TrainConfig(
        learning_rate=spec["learning_rate"],
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        lr_scheduler="cosine",
        warmup_ratio=spec["warmup_ratio"],
        logging_steps=1,
        save_steps=spec["steps"] + 1000,
        **spec.get("train", {}),
    )
    data = PreparedData(
        records={}, tokenized={"train": packed, "validation": []}, report={"train_tokens": stats["tokens"]}
    )
    run = RunDir.create(Path(spec["workdir"]), "seektune")
    trainer_module.train(cfg, model, tokenizer, data, run, spec["seed"])
    return {**record.figures(spec["skip_steps"]), "loss": heldout_loss(model, validation, _pad(tokenizer))}


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def phase_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's SFTTrainer with SFTConfig defaults except the common settings and this run's choices."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _lora_model(spec)
    train_set, validation = _datasets(spec)
    choices = dict(spec["trl"])
    packed = choices["packing"]
    config = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"] if packed else spec["unpacked_batch_size"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_ratio"],
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        # padding-free without packing does not truncate: TRL asks for max_length None (our examples fit)
        max_length=None if choices["padding_free"] and not packed else spec["seq_len"],
        **choices,
    )
    record = StepRecord()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_set.select_columns(["input_ids", "labels"]),
        processing_class=tokenizer,
        callbacks=[record.callback()()],
    )
    trainer.data_collator = TokenCounter(trainer.data_collator, record.tokens)
    trainer.train()
    return {**record.figures(spec["skip_steps"]), "loss": heldout_loss(model, validation, _pad(tokenizer))}


def phase_plain(spec: dict[str, Any]) -> dict[str, Any]:
    """A plain PyTorch loop over seektune's packed rows and collator: no Trainer, no callbacks."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import get_cosine_schedule_with_warmup

    from seektune.data.pack import pack_dataset
    from seektune.train.collate import PackedCollator

    model, tokenizer = _lora_model(spec)
    train_set, validation = _datasets(spec)
    packed, _ = pack_dataset(train_set, spec["seq_len"], seed=spec["pack_seed"])
    record = StepRecord()
    collator = TokenCounter(PackedCollator(_pad(tokenizer)), record.tokens)
    generator = torch.Generator().manual_seed(spec["seed"])
    loader = DataLoader(
        packed.with_format(None),
        batch_size=spec["batch_size"],
        sampler=RandomSampler(packed, generator=generator),
        collate_fn=collator,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["learning_rate"], weight_decay=0.0)
    warmup = math.ceil(spec["warmup_ratio"] * spec["steps"])  # as transformers reads a warm-up ratio
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, spec["steps"])
    model.train()
    for _, batch in zip(range(spec["steps"]), loader, strict=False):
        batch = {key: value for key, value in batch.items() if key != "num_real_tokens"}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        record.losses.append(loss.item())
        record.mark()
    return {**record.figures(spec["skip_steps"]), "loss": heldout_loss(model, validation, _pad(tokenizer))}


def phase_flops(spec: dict[str, Any]) -> dict[str, Any]:
    """Model FLOPs per real token (FlopCounterMode, forward + backward of single examples) and the peak
    FLOP/s of an fp32 matmul on this machine with these threads."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode has no formula for grouped_mm nor for the fused CPU attention kernel: count through
    # the eager implementations (per-expert mm, matmul attention), which do the same useful work
    model, _ = _lora_model({**spec, "model": {"attn_implementation": "eager"}})
    model.get_base_model().set_experts_implementation("eager")
    train_set, _ = _datasets(spec)
    sample = train_set.select(range(min(64, len(train_set))))
    counter = FlopCounterMode(display=False)
    tokens = 0
    with counter:
        for example in sample:
            input_ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            model(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()
            tokens += input_ids.numel()
    model.zero_grad(set_to_none=True)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "flops_per_token": counter.get_total_flops() / tokens,
        "base_params": base,
        "lora_params": lora,
        **dict(zip(("peak_flops", "peak_flops_per_cpu_s"), matmul_peak_flops(), strict=True)),
    }


def matmul_peak_flops(size: int = 1024, repeats: int = 10) -> tuple[float, float]:
    """Best fp32 square-matmul rate of five tries of `repeats` matmuls: (FLOP/s, FLOP per CPU second)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(5):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            torch.mm(a, b)
        best_wall = min(best_wall, (time.perf_counter() - wall) / repeats)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / repeats)
    flops = 2.0 * size**3
    return flops / best_wall, flops / max(best_cpu, 1e-9)


PHASES = {"seektune": phase_seektune, "trl": phase_trl, "plain": phase_plain, "flops": phase_flops}


def _own_peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: ru_maxrss would carry a parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(name: str, spec_file: str) -> None:
    """Body of a measuring subprocess: quiet libraries, fixed threads, one phase, JSON on stdout."""
    import logging
    import warnings

    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    figures = PHASES[name](spec)
    print(json.dumps({**figures, "peak_rss_mb": round(_own_peak_rss_mb(), 1)}))


def measure(name: str, spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """Run a phase in a fresh interpreter; its last stdout line is the JSON of its figures."""
    spec_file = root / f"spec-{name}.json"
    spec_file.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env.update(TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(root / "cache"))
    phase = "trl" if name.startswith("trl-") else name
    command = [sys.executable, __file__, "--phase", phase, "--spec", str(spec_file)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"run {name} failed with exit code {done.returncode}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["wall_s"] = time.perf_counter() - started
    return figures


# ---- the driver ----


def prepare(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Build (or reuse) the base, tokenise the built-in chat data once, save train and validation."""
    from seektune.config import BaseBuildConfig, DataConfig, ModelConfig
    from seektune.data.pack import pack_dataset
    from seektune.data.prepare import prepare_data
    from seektune.models.load import load_tokenizer
    from seektune.models.tiny import ensure_base

    base = args.base or str(ensure_base(BaseBuildConfig()))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=base))
    data_cfg = DataConfig(max_length=args.seq_len, dedup={"near": False})
    prepared = prepare_data(data_cfg, tokenizer, SEED, root / "prepared")
    train_set = prepared.tokenized["train"].select_columns(["input_ids", "labels"])
    validation = prepared.tokenized["validation"].select_columns(["input_ids", "labels"])
    if args.validation_examples:
        validation = validation.select(range(min(args.validation_examples, len(validation))))
    train_set.save_to_disk(str(root / "data" / "train"))
    validation.save_to_disk(str(root / "data" / "validation"))
    _, stats = pack_dataset(prepared.tokenized["train"], args.seq_len, seed=args.seed)
    examples_per_row = stats["examples"] / stats["rows"]
    return {
        "base": base,
        "examples": stats["examples"],
        "tokens": stats["tokens"],
        "rows": stats["rows"],
        "fill": stats["fill"],
        "validation_examples": len(validation),
        "unpacked_batch_size": max(1, round(args.batch_size * examples_per_row)),
    }


def run_names(args: argparse.Namespace) -> list[str]:
    names = ["seektune"]
    if args.trl_grid:
        names += list(TRL_GRID)
    else:
        names += [TRL_DEFAULTS, TRL_PACKING, *FASTEST_TRL]
    return names + ([] if args.no_plain else ["plain"])


def main(argv: list[str] | None = None) -> None:
    from seektune.config import LoraConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of every run")
    parser.add_argument("--skip-steps", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    parser.add_argument("--seq-len", type=int, default=512, help="max_length and packed row length")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    lora = LoraConfig()  # seektune's defaults, for every run
    parser.add_argument("--lora-r", type=int, default=lora.r)
    parser.add_argument("--lora-alpha", type=float, default=lora.alpha)
    parser.add_argument("--lora-dropout", type=float, default=lora.dropout)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (see above)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of weights init, data order, dropout")
    parser.add_argument(
        "--pack-seed", type=int, default=None, help="seed of the packed rows' layout; default: --seed"
    )
    parser.add_argument("--repeats", type=int, default=1, help="measure every run this often; keep the best")
    parser.add_argument("--validation-examples", type=int, default=None, help="default: all (about 200)")
    parser.add_argument("--base", default=None, help="model folder; default: the built tiny-deepseek-v3")
    parser.add_argument("--trl-grid", action="store_true", help="run all twelve TRL configurations")
    parser.add_argument("--only", nargs="*", default=None, help="run only these runs (names as printed)")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain PyTorch loop")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        run_phase(args.phase, args.spec)
        return
    if args.skip_steps < 1 or args.steps <= args.skip_steps:
        parser.error("--steps must be larger than --skip-steps, which must be at least 1")
    _print_header(args)
    with tempfile.TemporaryDirectory(prefix="seektune-train-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        info = prepare(args, root)
        print(
            f"data: {info['examples']:,} training examples, {info['tokens']:,} tokens; packed into "
            f"{info['rows']} rows of {args.seq_len} (fill {info['fill']:.1%}); unpacked runs take "
            f"{info['unpacked_batch_size']} examples per step (the real tokens of {args.batch_size} packed "
            f"rows); validation: {info['validation_examples']} examples; prepared in "
            f"{time.perf_counter() - started:.0f} s"
        )
        spec = _spec(args, info, root)
        flops = measure("flops", spec, root)
        names = args.only or run_names(args)
        repeats: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(args.repeats):  # interleaved, so that a busy minute hits every run alike
            for name in names:
                run_spec = {**spec, "trl": TRL_GRID[name]} if name in TRL_GRID else spec
                repeats[name].append(measure(name, run_spec, root))
                _print_run(name, repeats[name][-1], flops)
    _report(args, {name: _best(runs) for name, runs in repeats.items()}, flops)


def _spec(args: argparse.Namespace, info: dict[str, Any], root: Path) -> dict[str, Any]:
    return {
        "base": info["base"],
        "data": str(root / "data"),
        "workdir": str(root / "runs"),
        "steps": args.steps,
        "skip_steps": args.skip_steps,
        "batch_size": args.batch_size,
        "unpacked_batch_size": info["unpacked_batch_size"],
        "seq_len": args.seq_len,
        "learning_rate": args.learning_rate,
        "warmup_ratio": args.warmup_ratio,
        "threads": args.threads,
        "seed": args.seed,
        "pack_seed": args.seed if args.pack_seed is None else args.pack_seed,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
    }


def _print_header(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    packages = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
    print("seektune training throughput benchmark (LoRA on tiny-deepseek-v3)")
    print(
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {platform.machine()}, "
        f"{args.threads} torch threads; python {platform.python_version()}; "
        + ", ".join(f"{name} {version(name)}" for name in packages)
    )
    print(
        f"settings: --steps {args.steps} (timed after step {args.skip_steps}) --batch-size {args.batch_size} "
        f"--seq-len {args.seq_len} --learning-rate {args.learning_rate} LoRA r {args.lora_r} alpha "
        f"{args.lora_alpha:g} dropout {args.lora_dropout:g}"
    )


def _mfu(run: dict[str, Any], flops: dict[str, Any]) -> float:
    """Model FLOP per CPU second over the matmul's FLOP per CPU second (with one thread: plain MFU)."""
    return run["tokens_per_cpu_s"] * flops["flops_per_token"] / flops["peak_flops_per_cpu_s"]


def _print_run(name: str, run: dict[str, Any], flops: dict[str, Any]) -> None:
    train = f"{run['train_loss']:.3f}" if run["train_loss"] is not None else "n/a"
    print(
        f"{name:<27} {run['tokens_per_cpu_s']:>7,.0f} real tokens per CPU s "
        f"({run['tokens_per_s']:>6,.0f} per s)   MFU {_mfu(run, flops):6.2%}   "
        f"peak RSS {run['peak_rss_mb']:>6,.0f} MB   loss {run['loss']:.4f} "
        f"(train {train})   {run['tokens']:,} tokens in {run['steps']} steps   [{run['wall_s']:.0f} s]",
        flush=True,
    )


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The least disturbed of a run's repeats (sharing a CPU only ever slows a run down)."""
    return max(runs, key=lambda run: run["tokens_per_cpu_s"])


def _ratio_line(label: str, ours: dict[str, Any], peer: dict[str, Any]) -> str:
    per_cpu = ours["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"]
    wall = ours["tokens_per_s"] / peer["tokens_per_s"]
    return (
        f"seektune / {label}: {per_cpu:.2f}x real tokens per CPU s ({wall:.2f}x per wall-clock s); "
        f"loss {ours['loss']:.4f} vs {peer['loss']:.4f} ({ours['loss'] - peer['loss']:+.4f})"
    )


def _report(args: argparse.Namespace, figures: dict[str, dict[str, Any]], flops: dict[str, Any]) -> None:
    print(
        f"model FLOPs per real token {flops['flops_per_token'] / 1e6:.2f} M (base {flops['base_params']:,} "
        f"frozen + {flops['lora_params']:,} LoRA parameters); peak fp32 matmul "
        f"{flops['peak_flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU s ({flops['peak_flops'] / 1e9:.0f} GFLOP/s)"
    )
    values: dict[str, Any] = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len}
    values["threads"] = args.threads
    for name, run in figures.items():
        key = name.replace("-", "_")
        values[f"{key}_tokens_per_cpu_s"] = round(run["tokens_per_cpu_s"])
        values[f"{key}_tokens_per_s"] = round(run["tokens_per_s"])
        values[f"{key}_mfu"] = round(_mfu(run, flops), 4)
        values[f"{key}_peak_rss_mb"] = run["peak_rss_mb"]
        values[f"{key}_loss"] = round(run["loss"], 4)
    ours = figures.get("seektune")
    trl = {name: run for name, run in figures.items() if name.startswith("trl-")}
    peers = {}
    if TRL_DEFAULTS in trl:
        peers["TRL defaults"] = ("trl_defaults", trl[TRL_DEFAULTS])
    if trl:
        best_name = max(trl, key=lambda name: trl[name]["tokens_per_cpu_s"])
        peers[f"TRL best ({best_name})"] = ("trl_best", trl[best_name])
        values["trl_best"] = best_name
    if "plain" in figures:
        peers["plain PyTorch loop"] = ("plain", figures["plain"])
    for label, (key, peer) in peers.items():
        if ours:
            print(_ratio_line(label, ours, peer))
            values[f"ratio_vs_{key}"] = round(ours["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"], 2)
            values[f"loss_vs_{key}"] = round(ours["loss"] - peer["loss"], 4)
    print(" ".join(f"{key}={value}" for key, value in values.items()))


if __name__ == "__main__":
    main()
