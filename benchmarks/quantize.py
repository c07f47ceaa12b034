"""Size, decode speed and perplexity of seektune's int8 models against the fp32 model, measured in one run.

Models:
- tiny: the offline base `tiny-deepseek-v3` built with the tests' reduced recipe (tests/support.py:
  0.4M parameters, hidden 96, 2 blocks, pre-trained on the standard library's docs), so its perplexity
  means something; `--base` takes any saved model folder instead.
- ds100m: a random-weight DeepSeek-V3 of 114M parameters (MLA attention, 2 dense blocks then 6
  MoE blocks of 8 routed experts, 2 per token, and a shared expert), saved with the tiny base's tokenizer.
  Random weights: its perplexity is about its vocabulary size, and only the difference to fp32 counts.

Each model is saved in fp32, quantised by `seektune.compress.quantize.quantize_model` (the chain's step)
with int8_weight_only and int8_dynamic, and every variant is loaded by `seektune.models.load.load_model`,
so `model.int8_kernel` applies (auto: int8_dynamic runs on fbgemm on a CPU). The variants:

- fp32: the float model, the peer.
- int8_weight_only: torchao's kernel (int8 weights, float activations; fbgemm would change its numerics).
- int8_dynamic: seektune's default on a CPU, the same torchao int8 weights run through fbgemm.
- int8_dynamic_torchao: the same folder with `int8_kernel: torchao` (torchao's CPU kernel).

Figures per variant:
- Linear weights: bytes on disk of the nn.Linear weights that the int8 methods quantise (every Linear
  but the output head; DeepSeek's routed experts are fused 3-D parameters and stay float), against
  their fp32 bytes; int8 bytes include the per-channel scales and zero points. Also the whole
  safetensors size, and the Linear share of the fp32 file.
- decode tokens/s at batch 1: greedy `generate` of --new-tokens tokens (no early stop) after a fixed
  --prompt-tokens prompt of held-out docs text, median of --repeats. The variants of a model each run
  in their own process, loaded once, and are measured in turns (fp32, int8..., fp32, ...), so that a
  busy moment on a shared CPU hits them alike; each turn starts half a second after the last, so that
  no idle process's worker threads are still spinning.
- perplexity: next-token perplexity over --ppl-windows windows of --ppl-length tokens of held-out
  standard-library docs (units outside the base's pre-training split), one window per forward (batch
  1, as one request's prefill: fbgemm quantises the activations of the whole window with one scale).
- peak RSS: the high-water mark of the variant's process (load, decode and perplexity).

    python benchmarks/quantize.py [--quick] [--new-tokens 64] [--repeats 5] [--threads N]
        [--only tiny ds100m] [--base FOLDER]

The goal line checks the issue's figures for int8_dynamic on each model: Linear weights at most 30% of
fp32, decode at least 1.3x fp32, perplexity within 1% of fp32. The last line repeats the figures as
key=value pairs (ratio and size_ratio: int8_dynamic against fp32 on the largest model measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SEED = 0
# tests/support.py's TINY_RECIPE: a base that builds in about a minute on 2 cores.
TINY_RECIPE = {
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
# About 113M parameters: 32M in Linear layers (attention, dense MLPs, shared experts), 56M in the fused
# routed experts, 25M in the untied input and output embeddings.
DS100M = {
    "vocab_size": 16384,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 2,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 384,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "num_mtp_layers": 0,
}
QUICK_DS = {"num_hidden_layers": 3}  # --quick: the same widths, 2 dense blocks + 1 MoE block (51M)
VARIANTS = {  # name: (quantisation method or None, model.int8_kernel)
    "fp32": (None, "auto"),
    "int8_weight_only": ("int8_weight_only", "auto"),
    "int8_dynamic": ("int8_dynamic", "auto"),
    "int8_dynamic_torchao": ("int8_dynamic", "torchao"),
}
GOAL = {"linear_ratio": 0.30, "speedup": 1.3, "ppl_change": 0.01}
MARK = "@@ "  # prefix of a worker's answer lines; anything else on its stdout is library noise


# ---- preparing the models ----


def held_out_texts() -> list[str]:
    """Standard-library docs outside the base's pre-training split, in their stable order."""
    from seektune.data.stdlib_docs import collect_units

    return [f"{u.title}\n\n{u.text}" for u in collect_units() if u.split != "train"]


def eval_windows(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` token ids cut from the held-out docs as one stream."""
    stream: list[int] = []
    for text in held_out_texts():
        stream.extend([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
        if len(stream) >= count * length:
            break
    if len(stream) < count * length:
        raise SystemExit(f"the held-out docs have {len(stream)} tokens, fewer than {count} x {length}")
    return [stream[i * length : (i + 1) * length] for i in range(count)]


def build_random_deepseek(folder: Path, sizes: dict[str, Any], tokenizer: Any) -> int:
    """Save a seeded random-weight DeepSeek-V3 of `sizes` (fp32) with `tokenizer`; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(
        **sizes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def quantised_folders(source: Path, root: Path) -> dict[str, Path]:
    """The fp32 folder and one folder per quantisation method, written by the chain's quantize step."""
    from seektune.compress.quantize import quantize_model
    from seektune.config import ModelConfig, QuantizeConfig

    model_cfg = ModelConfig(name_or_path=str(source), device="cpu", dtype="float32")
    folders = {"fp32": source}
    for method in sorted({method for method, _ in VARIANTS.values() if method}):
        folders[method] = root / f"{source.name}-{method}"
        quantize_model(source, folders[method], QuantizeConfig(method=method), model_cfg)
    return folders


# ---- sizes on disk ----


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in the folder's safetensors files, read from their headers."""
    sizes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                sizes[name] = end - start
    return sizes


def disk_sizes(folders: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Per folder: the bytes of the quantised Linear layers' weights and of all safetensors files.

    The quantised Linear layers are those whose weights the int8 folders store as `_weight_qdata` (with
    `_weight_scale` and `_weight_zero_point`); their fp32 bytes are those of `<layer>.weight`.
    """
    tensors = {name: safetensors_bytes(folder) for name, folder in folders.items()}
    layers = {
        key.removesuffix("._weight_qdata")
        for name in folders
        if name != "fp32"
        for key in tensors[name]
        if key.endswith("._weight_qdata")
    }
    sizes = {}
    for name, found in tensors.items():
        linear = sum(
            size
            for key, size in found.items()
            if key.rpartition(".")[0] in layers
            and key.rpartition(".")[2] in ("weight", "_weight_qdata", "_weight_scale", "_weight_zero_point")
        )
        sizes[name] = {"linear_bytes": linear, "file_bytes": sum(found.values())}
    return sizes


# ---- the measuring worker (one process per variant) ----


def _own_peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: ru_maxrss would carry a parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(spec_file: str) -> None:
    """Load one variant, then answer 'decode', 'ppl' and 'quit' lines on stdin with JSON lines."""
    import logging
    import warnings

    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from seektune.config import ModelConfig
    from seektune.models.int8_cpu import FbgemmInt8Linear
    from seektune.models.load import load_model

    started = time.perf_counter()
    cfg = ModelConfig(name_or_path=spec["folder"], device="cpu", dtype="float32", int8_kernel=spec["kernel"])
    loaded = load_model(cfg)
    model = loaded.model.eval()
    fbgemm_layers = sum(isinstance(m, FbgemmInt8Linear) for m in model.modules())
    prompt = torch.tensor([spec["prompt"]])
    windows = [torch.tensor([window]) for window in spec["windows"]]
    pad = loaded.tokenizer.pad_token_id

    def decode(new_tokens: int) -> float:
        with torch.inference_mode():
            begin = time.perf_counter()
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            seconds = time.perf_counter() - begin
        assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
        return seconds

    def perplexity() -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for window in windows:
                loss = model(input_ids=window, labels=window).loss
                total += float(loss) * (window.shape[1] - 1)
                count += window.shape[1] - 1
        return math.exp(total / count)

    decode(4)  # warm-up: first-call allocations and kernel set-up
    kernel = "fbgemm" if fbgemm_layers else ("torchao" if spec["method"] else "fp32")
    _answer({"load_s": time.perf_counter() - started, "kernel": kernel, "fbgemm_layers": fbgemm_layers})
    for line in sys.stdin:
        command = line.strip()
        if command == "decode":
            seconds = decode(spec["new_tokens"])
            _answer({"seconds": seconds, "tokens_per_s": spec["new_tokens"] / seconds})
        elif command == "ppl":
            _answer({"ppl": perplexity()})
        elif command == "quit":
            _answer({"peak_rss_mb": round(_own_peak_rss_mb(), 1)})
            return


def _answer(figures: dict[str, Any]) -> None:
    print(MARK + json.dumps(figures), flush=True)


class Worker:
    """A variant's measuring process: it loads the model once and answers one command at a time."""

    def __init__(self, name: str, spec: dict[str, Any], root: Path) -> None:
        self.name = name
        spec_file = root / f"spec-{spec['model']}-{name}.json"
        spec_file.write_text(json.dumps(spec))
        self.log = root / f"worker-{spec['model']}-{name}.log"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(spec_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env=env,
        )

    def ask(self, command: str | None = None) -> dict[str, Any]:
        """Send `command` (None: only wait for the answer to loading) and return the answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        if command:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.process.wait()
        sys.stderr.write(self.log.read_text()[-6000:])
        raise SystemExit(f"the {self.name} worker stopped (exit code {self.process.returncode})")

    def close(self) -> dict[str, Any]:
        answer = self.ask("quit")
        self.process.wait()
        return answer


def measure_model(
    model: str, folders: dict[str, Path], inputs: dict[str, Any], args: argparse.Namespace, root: Path
) -> dict[str, dict[str, Any]]:
    """Load every variant in its own process, time decoding in turns, then perplexity and peak RSS."""
    common = {"model": model, "threads": args.threads, "new_tokens": args.new_tokens, **inputs}
    workers = {
        name: Worker(
            name,
            {**common, "folder": str(folders[method or "fp32"]), "kernel": kernel, "method": method},
            root,
        )
        for name, (method, kernel) in VARIANTS.items()
    }
    results = {name: worker.ask() for name, worker in workers.items()}
    times: dict[str, list[float]] = {name: [] for name in workers}
    for _ in range(args.repeats):
        for name, worker in workers.items():
            time.sleep(0.5)
            times[name].append(worker.ask("decode")["tokens_per_s"])
    for name, worker in workers.items():
        results[name].update(worker.ask("ppl"))
        results[name].update(worker.close())
        results[name]["tokens_per_s"] = statistics.median(times[name])
        results[name]["tokens_per_s_all"] = [round(value, 1) for value in times[name]]
    return results


# ---- the driver ----


def prepare(args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    """Every model's fp32 and int8 folders, sizes, parameter count and the shared prompt and windows."""
    from seektune.config import BaseBuildConfig, ModelConfig
    from seektune.models.load import load_tokenizer
    from seektune.models.tiny import ensure_base

    base = Path(args.base) if args.base else ensure_base(BaseBuildConfig(**TINY_RECIPE))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(base)), str(base))
    windows = eval_windows(tokenizer, args.ppl_windows + 1, max(args.ppl_length, args.prompt_tokens))
    inputs = {
        "prompt": windows[0][: args.prompt_tokens],
        "windows": [window[: args.ppl_length] for window in windows[1:]],
    }
    models = {}
    if "tiny" in args.only:
        source = root / "tiny"
        from transformers import AutoModelForCausalLM

        fp32 = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
        fp32.save_pretrained(source)  # a copy, so that every variant loads from this run's folders
        tokenizer.save_pretrained(source)
        params = sum(p.numel() for p in fp32.parameters())
        models["tiny"] = {"folders": quantised_folders(source, root), "parameters": params}
    if "ds100m" in args.only:
        source = root / "ds100m"
        sizes = {**DS100M, **(QUICK_DS if args.quick else {})}
        params = build_random_deepseek(source, sizes, tokenizer)
        models["ds100m"] = {"folders": quantised_folders(source, root), "parameters": params}
    for info in models.values():
        info["sizes"] = disk_sizes(info["folders"])
        info["inputs"] = inputs
    return models


def _print_header(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    import torch

    from seektune.models.int8_cpu import cpu_has_vnni

    packages = ("torch", "transformers", "torchao")
    print("seektune int8 benchmark: size, batch-1 decode speed and perplexity against fp32")
    print(
        f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"AVX512-VNNI {'yes' if cpu_has_vnni() else 'no'}, "
        f"torch threads {args.threads or torch.get_num_threads()}; "
        f"python {platform.python_version()}; " + ", ".join(f"{name} {version(name)}" for name in packages)
    )
    print(
        f"settings: --new-tokens {args.new_tokens} --prompt-tokens {args.prompt_tokens} --repeats "
        f"{args.repeats} --ppl-windows {args.ppl_windows} --ppl-length {args.ppl_length}"
        + (" --quick" if args.quick else "")
    )


def _ratio(value: float, peer: float) -> str:
    return f"{value / peer:.2f}x"


def _report_model(model: str, info: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sizes = info["sizes"]
    fp32_sizes, fp32 = sizes["fp32"], results["fp32"]
    print(
        f"\n{model}: {info['parameters'] / 1e6:.1f}M parameters; the quantised Linear weights are "
        f"{fp32_sizes['linear_bytes'] / fp32_sizes['file_bytes']:.0%} of the fp32 file"
    )
    print(
        f"{'variant':<22}{'kernel':>8}{'Linear MB':>11}{'vs fp32':>9}{'file MB':>9}{'vs fp32':>9}"
        f"{'decode tok/s':>14}{'vs fp32':>9}{'perplexity':>12}{'vs fp32':>9}{'peak RSS MB':>13}"
    )
    values: dict[str, Any] = {f"{model}_parameters": info["parameters"]}
    for name, run in results.items():
        size = sizes[VARIANTS[name][0] or "fp32"]
        linear_ratio = size["linear_bytes"] / fp32_sizes["linear_bytes"]
        speedup = run["tokens_per_s"] / fp32["tokens_per_s"]
        ppl_change = run["ppl"] / fp32["ppl"] - 1
        print(
            f"{name:<22}{run['kernel']:>8}{size['linear_bytes'] / 1e6:>11.1f}{linear_ratio:>9.1%}"
            f"{size['file_bytes'] / 1e6:>9.1f}{size['file_bytes'] / fp32_sizes['file_bytes']:>9.1%}"
            f"{run['tokens_per_s']:>14.1f}{_ratio(run['tokens_per_s'], fp32['tokens_per_s']):>9}"
            f"{run['ppl']:>12.3f}{ppl_change:>+9.2%}{run['peak_rss_mb']:>13.0f}"
        )
        key = f"{model}_{name}"
        values[f"{key}_tps"] = round(run["tokens_per_s"], 1)
        values[f"{key}_ppl"] = round(run["ppl"], 4)
        values[f"{key}_rss_mb"] = round(run["peak_rss_mb"])
        values[f"{key}_linear_mb"] = round(size["linear_bytes"] / 1e6, 2)
        if name != "fp32":
            values[f"{key}_speedup"] = round(speedup, 2)
            values[f"{key}_linear_ratio"] = round(linear_ratio, 4)
            values[f"{key}_ppl_change"] = round(ppl_change, 5)
    print(
        "decode tok/s of each turn: "
        + "; ".join(f"{name} {', '.join(map(str, run['tokens_per_s_all']))}" for name, run in results.items())
    )
    dyn = results["int8_dynamic"]
    torchao = results["int8_dynamic_torchao"]
    print(
        f"int8_dynamic on fbgemm ({dyn['fbgemm_layers']} Linear layers) / fp32: "
        f"{_ratio(dyn['tokens_per_s'], fp32['tokens_per_s'])} decode; "
        "/ the same weights on torchao's kernel: "
        f"{_ratio(dyn['tokens_per_s'], torchao['tokens_per_s'])}"
    )
    checks = {
        "Linear weights <= 30% of fp32": values[f"{model}_int8_dynamic_linear_ratio"] <= GOAL["linear_ratio"],
        "decode >= 1.3x fp32": values[f"{model}_int8_dynamic_speedup"] >= GOAL["speedup"],
        "perplexity within 1% of fp32": abs(values[f"{model}_int8_dynamic_ppl_change"]) <= GOAL["ppl_change"],
    }
    print(
        f"goal ({model}, int8_dynamic): "
        + "; ".join(f"{label} {'met' if met else 'MISSED'}" for label, met in checks.items())
    )
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer tokens, a 3-block ds100m")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per turn (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="decode turns per variant (default 5)")
    parser.add_argument("--ppl-windows", type=int, default=None, help="perplexity windows (default 16)")
    parser.add_argument("--ppl-length", type=int, default=96, help="tokens per perplexity window")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's")
    parser.add_argument("--only", nargs="*", default=["tiny", "ds100m"], choices=["tiny", "ds100m"])
    parser.add_argument("--base", default=None, help="model folder for 'tiny'; default: the reduced base")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return
    quick = {"new_tokens": 8, "repeats": 1, "ppl_windows": 2}
    full = {"new_tokens": 64, "repeats": 5, "ppl_windows": 16}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    _print_header(args)
    values: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="seektune-quantize-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        models = prepare(args, root)
        print(
            f"prepared {', '.join(models)} (fp32, int8_weight_only, int8_dynamic) in "
            f"{time.perf_counter() - started:.0f} s"
        )
        for model, info in models.items():
            results = measure_model(model, info["folders"], info["inputs"], args, root)
            values.update(_report_model(model, info, results))
    headline = "ds100m" if "ds100m" in models else "tiny"
    values["ratio"] = values[f"{headline}_int8_dynamic_speedup"]
    values["size_ratio"] = values[f"{headline}_int8_dynamic_linear_ratio"]
    print(" ".join(f"{key}={value}" for key, value in values.items()))


if __name__ == "__main__":
    main()
