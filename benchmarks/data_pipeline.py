"""Speed of the data pipeline's cleaning and deduplication against the way a data scientist would write it.

Two measurements on generated chat records (English and Chinese question/answer pairs, about 200 characters,
with HTML, control characters, personal data and case/spacing/width variants of earlier records):

(a) cleaning + exact dedup of --records records. seektune: `Dataset.map(clean_batch, batched=True,
    num_proc=...)` on a memory-mapped dataset, the records cleaning marked removed dropped, then
    `find_duplicates` with `near: false`. Peer: pandas with the same rules (`Series.str.normalize('NFKC')`,
    `str.replace` with clean.py's own compiled regexes, `drop_duplicates` on a column normalised like
    `normalise_for_dedup`); the removal counts of both are printed side by side.
(b) MinHash near-dedup of --near-records records (about 10% near-twins). seektune: `find_duplicates` with
    `exact: false`. Peer: datasketch as its README shows it: a `MinHash` per record updated shingle by
    shingle with `.update()`, then `MinHashLSH.query` / `.insert`; it runs on a sample (--peer-near-sample)
    and its records/s are extrapolated, which the output says.

Each measurement runs in a fresh subprocess, so the peak resident set it reports (its own, and the largest
of its worker processes) belongs to that measurement alone. `privacy_batch` is not part of (a); its speed
is one extra line. Datasets and their caches live in a temporary directory that is removed at the end.

    python benchmarks/data_pipeline.py [--records 1000000] [--near-records 100000] [--num-proc 2]

The last line repeats the figures as key=value pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

_EN_VOCABULARY = (
    "model data training example language token answer question python function error value list "
    "string file memory speed batch layer weight gradient loss learning rate epoch network input output "
    "result table column index query server request response cache thread process queue buffer stream "
    "format parser compiler runtime library module package version release update install config "
    "option default system network socket address message header payload client session account user "
    "password record field schema type class object method variable constant loop branch test case"
)
EN_WORDS = _EN_VOCABULARY.split()
EN_QUESTIONS = (
    "How do I {0} the {1} {2} in Python?",
    "What is the difference between {0} and {1} {2}?",
    "Why does my {0} {1} fail with a {2} error?",
    "Can you explain {0} {1} to a beginner using {2}?",
)
ZH_QUESTIONS = ("如何{0}？", "{0}是什么意思？", "为什么{0}会出错？", "请解释一下{0}。")
CJK_FIRST, CJK_COUNT = 0x4E00, 3500  # the most common characters sit at the start of the block
HTML_FORMS = ("<p>{0}</p>", "<div class='answer'>{0}<br/>&nbsp;</div>", "{0} <b>A &amp; B</b> &lt;ok&gt;")
CONTROL_FORMS = ("{0}\x07", "\u200b{0}", "{0}\x1b[0m done", "{0}\x00")
CJK = "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
SPACE_BY_CJK = rf"\s+(?={CJK})|(?<={CJK})\s+"  # `re` has no \p{Han}: the main blocks spelled out
EMPTY_FORMS = ("<p> </p>", "<br/>&nbsp;", "\u200b \n")  # nothing left after cleaning
PII_FORMS = ("{0} Mail me at dev.{1}@example.com.", "{0} 电话 138{1:08d}。")


class TextPool:
    """Random English word runs and Chinese character runs, cut from two pools drawn once with NumPy.

    Cutting a run is one slice, so a million records are generated in seconds; `below` replaces
    `random.randrange`, which costs ten times `random.random`."""

    def __init__(self, seed: int, size: int = 4_000_000) -> None:
        generator = np.random.default_rng(seed)
        common_first = generator.random(size) ** 2 * CJK_COUNT  # common characters more often
        self.chinese = (common_first.astype(np.uint32) + CJK_FIRST).tobytes().decode("utf-32-le")
        words = np.array(EN_WORDS, dtype=object)[generator.integers(0, len(EN_WORDS), size // 4)]
        self.english = " ".join(words)
        self.word_starts = np.concatenate(([0], np.cumsum([len(word) + 1 for word in words]))).tolist()
        self.random = random.Random(seed).random

    def below(self, n: int) -> int:
        return int(self.random() * n)

    def pick(self, options: tuple[str, ...]) -> str:
        return options[self.below(len(options))]

    def words(self, count: int) -> str:
        start = self.below(len(self.word_starts) - count - 1)
        return self.english[self.word_starts[start] : self.word_starts[start + count] - 1]

    def chars(self, count: int) -> str:
        start = self.below(len(self.chinese) - count)
        return self.chinese[start : start + count]


def _english(pool: TextPool) -> tuple[str, str]:
    question = pool.pick(EN_QUESTIONS).format(*pool.words(3).split())
    first, second = pool.words(10 + pool.below(7)), pool.words(10 + pool.below(7))
    return question, f"{first.capitalize()}. {second.capitalize()}."


def _chinese(pool: TextPool) -> tuple[str, str]:
    question = pool.pick(ZH_QUESTIONS).format(pool.chars(6 + pool.below(7)))
    clauses = [pool.chars(14 + pool.below(11)) for _ in range(5 + pool.below(4))]
    return question, "，".join(clauses) + "。"


_FULL_WIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(ord("!"), ord("~") + 1)})


def _variant(text: str, pool: TextPool) -> str:
    """The same text with other case, spacing or character width: an exact duplicate after normalising."""
    kind = pool.below(3)
    if kind == 0:
        return text.upper()
    if kind == 1:
        return "  " + text.replace(" ", "   ").replace("，", " ， ") + " \n"
    return text.translate(_FULL_WIDTH)


def generate_chat(n_records: int, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """`n_records` chat records of RECORD_FEATURES: ~10% exact variants, ~5% HTML, ~3% control characters,
    ~2% personal data, ~0.5% answers that cleaning empties, ~5% test and ~5% validation records."""
    pool = TextPool(seed)
    contents: list[str] = []
    splits = []
    languages = {"en": 0, "zh": 0}
    for index in range(n_records):
        roll = pool.random()
        if roll < 0.10 and index > 10:
            source = 2 * pool.below(index)
            question, answer = _variant(contents[source], pool), _variant(contents[source + 1], pool)
        else:
            language = "zh" if pool.random() < 0.5 else "en"
            languages[language] += 1
            question, answer = _chinese(pool) if language == "zh" else _english(pool)
            if roll < 0.15:
                answer = pool.pick(HTML_FORMS).format(answer)
            elif roll < 0.18:
                answer = pool.pick(CONTROL_FORMS).format(answer)
            elif roll < 0.20:
                answer = pool.pick(PII_FORMS).format(answer, pool.below(10**8))
            elif roll < 0.205:
                answer = pool.pick(EMPTY_FORMS)
        contents += (question, answer)
        split_roll = pool.random()
        splits.append("test" if split_roll < 0.05 else "validation" if split_roll < 0.10 else "")
    lengths = [len(q) + len(a) + 1 for q, a in zip(contents[::2], contents[1::2], strict=True)]
    info = {"records": n_records, "mean_chars": round(float(np.mean(lengths)), 1), **languages}
    return _record_table(contents, splits, "chat"), info


def _near_text(pool: TextPool) -> str:
    if pool.random() < 0.5:
        return pool.chars(90 + pool.below(41))
    return pool.words(32)


def _near_twin(text: str, pool: TextPool) -> str:
    """`text` with one word (English) or one character (Chinese) changed: Jaccard about 0.9."""
    if " " in text:
        words = text.split(" ")
        words[pool.below(len(words))] = "quantum"
        return " ".join(words)
    spot = pool.below(len(text) - 40) + 20
    return text[:spot] + ("一" if text[spot] != "一" else "二") + text[spot + 1 :]


def generate_near(n_records: int, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """`n_records` question/answer records of which ~10% are near-twins of an earlier record."""
    pool = TextPool(seed)
    contents: list[str] = []
    twins = 0
    for index in range(n_records):
        if pool.random() < 0.10 and index > 10:
            twins += 1
            source = 2 * pool.below(index)
            question, answer = contents[source], _near_twin(contents[source + 1], pool)
        else:
            question = (_english(pool) if pool.random() < 0.5 else _chinese(pool))[0]
            answer = _near_text(pool)
        contents += (question, answer)
    lengths = [len(q) + len(a) + 1 for q, a in zip(contents[::2], contents[1::2], strict=True)]
    info = {"records": n_records, "mean_chars": round(float(np.mean(lengths)), 1), "near_twins": twins}
    return _record_table(contents, [""] * n_records, "near"), info


def _record_table(contents: list[str], splits: list[str], source: str) -> pa.Table:
    """A RECORD_FEATURES table of user/assistant pairs (contents: question, answer, question, ...)."""
    from seektune.data.records import RECORD_FEATURES

    n_records = len(splits)
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n_records + 1, 2, dtype=np.int32)),
        pa.StructArray.from_arrays(
            [pa.array(["user", "assistant"] * n_records), pa.array(contents)], names=["role", "content"]
        ),
    )
    empty = pa.array([""] * n_records)
    columns = {
        "messages": messages,
        "text": empty,
        "source": pa.array([source] * n_records),
        "origin": pa.array([f"generated:{i + 1}" for i in range(n_records)]),
        "metadata": pa.array(["{}"] * n_records),
        "label": empty,
        "split": pa.array(splits),
        "augmented": empty,
    }
    return pa.table(columns, schema=RECORD_FEATURES.arrow_schema)


def _save(table: pa.Table, path: Path) -> None:
    from datasets import Dataset

    Dataset(table).save_to_disk(str(path), max_shard_size="2GB")


def _load(path: str):
    from datasets import load_from_disk

    return load_from_disk(path)


# ---- measurements, each run by a fresh process (--phase) ----


def phase_clean_exact(data: str, num_proc: int) -> dict[str, Any]:
    """seektune: clean_batch through Dataset.map, drop what cleaning removed, exact dedup."""
    import pyarrow.compute as pc

    from seektune.config import CleanConfig, DedupConfig
    from seektune.data.clean import clean_batch
    from seektune.data.dedup import find_duplicates
    from seektune.data.records import RECORD_FEATURES

    dataset = _load(data)
    start = time.perf_counter()
    marked = dataset.map(
        clean_batch, batched=True, batch_size=1000, num_proc=num_proc, fn_kwargs={"cfg": CleanConfig()}
    )
    cleaned_s = time.perf_counter() - start
    removed_by = marked.with_format("arrow")["removed_by"]
    keep = np.flatnonzero(pc.equal(removed_by, "").to_numpy(zero_copy_only=False))
    extra = [column for column in marked.column_names if column not in RECORD_FEATURES]
    cleaned = marked.remove_columns(extra).select(keep)
    result = find_duplicates(cleaned, DedupConfig(near=False), seed=0, num_proc=num_proc)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "clean_seconds": cleaned_s,
        "removed_by_clean": len(dataset) - len(keep),
        "exact": result.counts["exact"],
        "kept": len(result.keep_indices),
    }


def phase_privacy(data: str, num_proc: int) -> dict[str, Any]:
    """seektune: privacy_batch through Dataset.map (not part of (a); an extra line)."""
    from seektune.config import PrivacyConfig
    from seektune.data.privacy import privacy_batch

    dataset = _load(data)
    start = time.perf_counter()
    masked = dataset.map(
        privacy_batch, batched=True, batch_size=1000, num_proc=num_proc, fn_kwargs={"cfg": PrivacyConfig()}
    )
    seconds = time.perf_counter() - start
    found = sum(1 for value in masked.with_format("arrow")["pii"].to_pylist() if value)
    return {"seconds": seconds, "records_with_pii": found}


def phase_peer_clean_exact(data: str, sample: int) -> dict[str, Any]:
    """pandas: the same cleaning rules with clean.py's own regexes, exact dedup on a normalised column."""
    import html

    from seektune.data import clean

    punctuation = _punctuation_class()
    start = time.perf_counter()
    frame = _load(data).select(range(sample)).to_pandas()
    frame["question"] = frame["messages"].map(lambda messages: messages[0]["content"])
    frame["answer"] = frame["messages"].map(lambda messages: messages[1]["content"])
    for column in ("question", "answer"):
        text = frame[column].str.normalize("NFKC")
        text = text.str.replace(clean._MARKUP, "", regex=True)
        text = text.str.replace(clean._ENTITY, lambda match: html.unescape(match.group()), regex=True)
        text = text.str.replace(clean._CONTROL, "", regex=True)
        text = text.str.replace(r"[^\S\n]+", " ", regex=True).str.replace(r"\n{3,}", "\n\n", regex=True)
        frame[column] = text.str.strip()
    frame = frame[(frame["question"].str.len() > 0) & (frame["answer"].str.len() > 0)]
    key = (frame["question"] + "\n" + frame["answer"]).str.normalize("NFKC").str.casefold()
    key = key.str.replace(punctuation, "", regex=True).str.replace(SPACE_BY_CJK, "", regex=True)
    key = key.str.replace(r"\s+", " ", regex=True).str.strip()
    deduplicated = frame.assign(key=key).drop_duplicates(subset="key")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "records": sample,
        "removed_by_clean": sample - len(frame),
        "exact": len(frame) - len(deduplicated),
    }


def _punctuation_class() -> str:
    """A regex class of Unicode punctuation spelled out: pandas' `str.replace` may use `re`, which has no
    \\p{P}."""
    import unicodedata

    marks = (chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P"))
    return "[" + "".join("\\" + c if c in "\\]^-[" else c for c in marks) + "]+"


def phase_near(data: str, num_proc: int) -> dict[str, Any]:
    """seektune: MinHash near-dedup through find_duplicates (exact pass off)."""
    from seektune.config import DedupConfig
    from seektune.data.dedup import find_duplicates

    dataset = _load(data)
    start = time.perf_counter()
    result = find_duplicates(dataset, DedupConfig(exact=False), seed=0, num_proc=num_proc)
    return {"seconds": time.perf_counter() - start, "near": result.counts["near"]}


def phase_peer_near(data: str, sample: int) -> dict[str, Any]:
    """datasketch as its README shows it, on the first `sample` records."""
    from datasketch import MinHash, MinHashLSH

    from seektune.config import DedupConfig
    from seektune.data.dedup import normalise_for_dedup
    from seektune.data.records import record_text

    cfg = DedupConfig()
    dataset = _load(data).select(range(sample))
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    stored: dict[int, MinHash] = {}
    duplicates = 0
    for index, record in enumerate(dataset):
        text = normalise_for_dedup(record_text(record))
        minhash = MinHash(num_perm=cfg.num_perm)
        for position in range(max(len(text) - cfg.ngram + 1, 1)):
            minhash.update(text[position : position + cfg.ngram].encode("utf8"))
        if any(minhash.jaccard(stored[key]) >= cfg.threshold for key in lsh.query(minhash)):
            duplicates += 1
            continue
        stored[index] = minhash
        lsh.insert(index, minhash)
    return {"seconds": time.perf_counter() - start, "records": sample, "near": duplicates}


PHASES = {
    "clean_exact": phase_clean_exact,
    "privacy": phase_privacy,
    "peer_clean_exact": phase_peer_clean_exact,
    "near": phase_near,
    "peer_near": phase_peer_near,
}


def _own_peak_rss_mb() -> float:
    """This process's peak resident set. Linux carries ru_maxrss over exec (a child started by a big
    parent would report the parent's peak), so VmHWM, which belongs to this process image, comes first."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(name: str, data: str, argument: int) -> None:
    """Body of a measuring subprocess: run one phase, print its figures and peak memory as JSON."""
    import datasets

    datasets.disable_progress_bars()
    figures = PHASES[name](data, argument)
    own = _own_peak_rss_mb()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({**figures, "peak_rss_mb": round(own, 1), "peak_worker_rss_mb": round(workers, 1)}))


def measure(name: str, data: Path, argument: int, cache: Path) -> dict[str, Any]:
    """Run a phase in a fresh interpreter; its last stdout line is the JSON of its figures."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--phase", name, "--data", str(data), "--argument", str(argument)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"phase {name} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the driver ----


def _versions() -> str:
    from importlib.metadata import version

    packages = ("datasets", "pyarrow", "pandas", "datasketch", "numpy", "regex")
    return ", ".join(f"{name} {version(name)}" for name in packages)


def _line(label: str, ours: float, unit: str, peer: float | None, peer_label: str, memory: str) -> str:
    ratio = f"ratio {ours / peer:6.1f}x" if peer else "ratio     n/a"
    peer_text = f"{peer_label} {peer:>10,.0f} {unit}" if peer else f"{peer_label:>21}"
    return f"{label:<26} seektune {ours:>10,.0f} {unit}   {peer_text}   {ratio}   {memory}"


def _memory(figures: dict[str, Any]) -> str:
    return f"peak RSS {figures['peak_rss_mb']:,.0f} MB (workers {figures['peak_worker_rss_mb']:,.0f} MB)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records for cleaning + exact dedup")
    parser.add_argument("--near-records", type=int, default=100_000, help="records for near dedup")
    parser.add_argument("--num-proc", type=int, default=2, help="worker processes of Dataset.map")
    parser.add_argument("--peer-clean-sample", type=int, default=None, help="pandas on the first N records")
    parser.add_argument(
        "--peer-near-sample", type=int, default=2_000, help="README datasketch on the first N records"
    )
    parser.add_argument("--skip-privacy", action="store_true", help="leave out the privacy line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--argument", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        run_phase(args.phase, args.data, args.argument)
        return

    import datasets

    datasets.disable_progress_bars()
    print("seektune data pipeline benchmark")
    print(
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{platform.machine()}; python {platform.python_version()}; {_versions()}"
    )
    print(
        f"settings: --records {args.records:,} --near-records {args.near_records:,} "
        f"--num-proc {args.num_proc}"
    )
    with tempfile.TemporaryDirectory(prefix="seektune-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        chat, chat_info = generate_chat(args.records, args.seed)
        _save(chat, root / "chat")
        near, near_info = generate_near(args.near_records, args.seed + 1)
        _save(near, root / "near")
        del chat, near
        print(
            f"data: {chat_info['records']:,} chat records (mean {chat_info['mean_chars']} chars, "
            f"{chat_info['en']:,} English / {chat_info['zh']:,} Chinese originals, the rest case/space/width "
            f"variants); {near_info['records']:,} near-dedup records (mean {near_info['mean_chars']} chars, "
            f"{near_info['near_twins']:,} near-twins); generated in {time.perf_counter() - started:.0f} s"
        )
        figures = _run_all(args, root)
    _report(args, figures)


def _run_all(args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    cache = root / "cache"
    peer_clean_sample = min(args.peer_clean_sample or args.records, args.records)
    peer_near_sample = min(args.peer_near_sample, args.near_records)
    figures = {
        "clean_exact": measure("clean_exact", root / "chat", args.num_proc, cache),
        "peer_clean_exact": measure("peer_clean_exact", root / "chat", peer_clean_sample, cache),
        "near": measure("near", root / "near", args.num_proc, cache),
        "peer_near": measure("peer_near", root / "near", peer_near_sample, cache),
    }
    if not args.skip_privacy:
        figures["privacy"] = measure("privacy", root / "chat", args.num_proc, cache)
    return figures


def _report(args: argparse.Namespace, figures: dict[str, dict[str, Any]]) -> None:
    ours, peer = figures["clean_exact"], figures["peer_clean_exact"]
    clean_rate = args.records / ours["seconds"]
    peer_clean_rate = peer["records"] / peer["seconds"]
    sampled = f" (pandas on {peer['records']:,})" if peer["records"] < args.records else ""
    print(
        _line("clean + exact dedup", clean_rate, "rec/s", peer_clean_rate, "pandas", _memory(ours))
        + f"   [{ours['seconds']:.1f} s; cleaning {ours['clean_seconds']:.1f} s; removed: clean "
        f"{ours['removed_by_clean']:,} (pandas {peer['removed_by_clean']:,}), exact {ours['exact']:,} "
        f"(pandas {peer['exact']:,}){sampled}; "
        f"pandas peak RSS {peer['peak_rss_mb']:,.0f} MB]"
    )
    near, peer_near = figures["near"], figures["peer_near"]
    near_rate = args.near_records / near["seconds"]
    peer_near_rate = peer_near["records"] / peer_near["seconds"]
    print(
        _line("MinHash near dedup", near_rate, "rec/s", peer_near_rate, "datasketch", _memory(near))
        + f"   [{near['seconds']:.1f} s; removed {near['near']:,}; README datasketch on the first "
        f"{peer_near['records']:,} records, extrapolated: {peer_near['near']:,} removed there, "
        f"{args.near_records / peer_near_rate:,.0f} s for all]"
    )
    values = {
        "records": args.records,
        "near_records": args.near_records,
        "num_proc": args.num_proc,
        "clean_exact_records_per_s": round(clean_rate),
        "clean_exact_s": round(ours["seconds"], 2),
        "clean_s": round(ours["clean_seconds"], 2),
        "clean_exact_peak_rss_mb": ours["peak_rss_mb"],
        "clean_exact_worker_peak_rss_mb": ours["peak_worker_rss_mb"],
        "peer_clean_exact_records_per_s": round(peer_clean_rate),
        "ratio_clean_exact": round(clean_rate / peer_clean_rate, 2),
        "near_records_per_s": round(near_rate),
        "near_s": round(near["seconds"], 2),
        "near_peak_rss_mb": near["peak_rss_mb"],
        "near_worker_peak_rss_mb": near["peak_worker_rss_mb"],
        "peer_near_records_per_s": round(peer_near_rate, 1),
        "ratio_near": round(near_rate / peer_near_rate, 1),
        "peak_rss_mb": max(ours["peak_rss_mb"], near["peak_rss_mb"]),
    }
    if "privacy" in figures:
        privacy = figures["privacy"]
        privacy_rate = args.records / privacy["seconds"]
        print(
            _line("privacy (extra)", privacy_rate, "rec/s", None, "no peer", _memory(privacy))
            + f"   [{privacy['seconds']:.1f} s; {privacy['records_with_pii']:,} records with personal data]"
        )
        values["privacy_records_per_s"] = round(privacy_rate)
    print(" ".join(f"{key}={value}" for key, value in values.items()))


if __name__ == "__main__":
    main()
