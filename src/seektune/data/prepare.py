"""The data stage: every step from source files to tokenised training rows, and the report of what it did.

Order: load every source → clean and mask personal data → exact and near dedup across all sources and
splits (a held-out record wins over its training twin, so no test example has a near-twin in training) →
split what has no split yet (per source, stratified when asked, seeded) → training split only: balance,
mix by ratio, augment → tokenise with the chat template → pack (when asked) → write the splits as JSONL
in chat form and as Arrow, the report as JSON and Markdown.

Every step runs on `datasets` (Arrow on disk, memory-mapped, `num_proc` workers for the per-record work),
so a source larger than memory streams through. Intermediate Arrow files live in `<out_dir>/cache` and are
removed once the splits are saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets, disable_progress_bars, load_from_disk

from seektune.config import DataConfig
from seektune.data.encode import (  # noqa: F401  (re-exported: the stage's public helpers)
    IGNORE_INDEX,
    encode_chat,
    last_exchange,
    prompt_text,
    tokenize_batch,
    with_system_prompt,
)
from seektune.data.records import RECORD_FEATURES, batch_rows, column_values, record_text
from seektune.errors import UserError
from seektune.logs import log_event
from seektune.rundir import atomic_write_json, atomic_write_jsonl, fingerprint_line

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")
# Below this many records one process is faster than starting workers.
PARALLEL_FROM = 50_000


@dataclass
class PreparedData:
    """Records (chat form) and tokenised rows by split, and the report of every step."""

    records: dict[str, Dataset]
    tokenized: dict[str, Dataset]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Steps:
    """The report's table: records in and out of each step, removed by reason, changed by rule."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        step: str,
        n_in: int,
        n_out: int,
        removed: dict[str, int] | None = None,
        changed: dict[str, int] | None = None,
    ) -> None:
        row = {"step": step, "in": n_in, "out": n_out, "removed": removed or {}, "changed": changed or {}}
        self.rows.append(row)
        log_event(logger, f"data {step}", records_in=n_in, records_out=n_out, **row["removed"])


def prepare_data(
    cfg: DataConfig, tokenizer: Any, seed: int, out_dir: Path, need_train: bool = True
) -> PreparedData:
    """Run every data step; write the splits, the Arrow datasets and the report into `out_dir`.

    `need_train=False` (an evaluation) accepts data without a training split.
    """
    disable_progress_bars()  # one log line per step instead of a bar per map
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"
    steps = _Steps()
    report: dict[str, Any] = {"steps": steps.rows}
    try:
        dataset = _load(cfg, cache, steps, report)
        dataset = _clean(cfg, dataset, steps, report)
        dataset = _dedup(cfg, dataset, seed, steps, report)
        records = _split(cfg, dataset, seed, steps)
        if len(records["train"]) or need_train:
            records["train"] = _train_only_steps(cfg, records["train"], seed, steps, report)
        records = {split: _with_system_prompt(rows, cfg.system_prompt) for split, rows in records.items()}
        records, tokenized = _tokenize(cfg, records, tokenizer, steps)
        lengths = {split: column_values(tokenized[split], "length") for split in SPLITS}  # per example
        if cfg.packing:
            tokenized = _pack(cfg, tokenized, seed, report)
        prepared, report["fingerprint"] = _save(records, tokenized, out_dir)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    _finish_report(cfg, prepared, lengths, seed, report)
    from seektune.data.report import write_data_report

    atomic_write_json(out_dir / "report.json", report)
    write_data_report(report, out_dir)
    prepared.report = report
    log_event(logger, "data prepared", **report["splits"], fingerprint=report["fingerprint"])
    return prepared


def load_prepared(out_dir: Path) -> PreparedData:
    """The data `prepare_data` saved in `out_dir`: records and tokenised rows by split, and the report.

    The other processes of a data-parallel run read this instead of preparing the data again, so every
    process trains on the same rows. An empty split (saved without an Arrow file, which `load_from_disk`
    cannot reopen) comes back empty with the columns it was saved with.
    """
    from datasets import DatasetInfo

    out_dir = Path(out_dir)
    report_file = out_dir / "report.json"
    if not report_file.is_file():
        raise UserError(f"{out_dir} holds no prepared data (no report.json): run `seektune data prepare`")
    loaded: dict[str, dict[str, Dataset]] = {"records": {}, "tokenized": {}}
    for kind, splits in loaded.items():
        for split in SPLITS:
            folder = out_dir / kind / split
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if state.get("_data_files"):
                splits[split] = load_from_disk(str(folder))
            else:
                features = DatasetInfo.from_directory(str(folder)).features
                splits[split] = Dataset.from_dict({name: [] for name in features}, features=features)
    report = json.loads(report_file.read_text(encoding="utf-8"))
    return PreparedData(records=loaded["records"], tokenized=loaded["tokenized"], report=report)


def num_proc_for(cfg: DataConfig, n_records: int) -> int | None:
    """Worker processes for a map over `n_records`: the configured number, or automatic by size."""
    if cfg.num_proc is not None:
        return cfg.num_proc if cfg.num_proc > 1 else None
    return min(os.cpu_count() or 1, 8) if n_records >= PARALLEL_FROM else None


# ---------------------------------------------------------------------------------------------------------
# Steps


def _load(cfg: DataConfig, cache: Path, steps: _Steps, report: dict[str, Any]) -> Dataset:
    from seektune.data.load import load_source

    parts, sources, skipped = [], [], Counter()
    names: set[str] = set()
    for index, source in enumerate(cfg.sources):
        loaded = load_source(source, cfg.on_error, cache / f"source-{index}")
        if loaded.name in names:
            raise UserError(
                f"two data sources are both named '{loaded.name}': give them distinct data.sources[].name"
            )
        names.add(loaded.name)
        parts.append(loaded.dataset)
        skipped.update(loaded.skip_reasons)
        sources.append(
            {
                "name": loaded.name,
                "path": source.path,
                "records": len(loaded.dataset),
                "skipped": loaded.skipped,
                "skip_reasons": dict(loaded.skip_reasons),
            }
        )
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    report["sources"] = sources
    steps.add("load", len(dataset) + sum(skipped.values()), len(dataset), removed=dict(skipped))
    return dataset


def _clean(cfg: DataConfig, dataset: Dataset, steps: _Steps, report: dict[str, Any]) -> Dataset:
    from seektune.data.clean import clean_batch
    from seektune.data.privacy import privacy_batch

    def clean_and_mask(batch: dict[str, list]) -> dict[str, list]:
        batch = clean_batch(batch, cfg.clean)
        return privacy_batch(batch, cfg.privacy) if cfg.privacy.enabled else batch

    marked = dataset.map(
        clean_and_mask, batched=True, batch_size=1000, num_proc=num_proc_for(cfg, len(dataset))
    )
    removed_by = column_values(marked, "removed_by")
    changed, pii = Counter(), Counter()
    for rules in column_values(marked, "changed_by"):
        if rules:
            changed.update(rules.split(","))
    if "pii" in marked.column_names:
        for found in column_values(marked, "pii"):
            for item in filter(None, found.split(",")):
                kind, _, count = item.partition(":")
                pii[kind] += int(count or 1)
    removed = Counter(reason for reason in removed_by if reason)
    report["removed_examples"] = _removed_examples(marked, removed_by)
    keep = [i for i, reason in enumerate(removed_by) if not reason]
    privacy_removed = removed.pop("privacy", 0)
    privacy_changed = changed.pop("privacy", 0)
    after_clean = len(dataset) - sum(removed.values())
    steps.add("clean", len(dataset), after_clean, removed=dict(removed), changed=dict(changed))
    if cfg.privacy.enabled:
        steps.add(
            "privacy",
            after_clean,
            after_clean - privacy_removed,
            removed={"privacy": privacy_removed} if privacy_removed else {},
            changed={"masked": privacy_changed} if privacy_changed else {},
        )
    report["pii"] = dict(pii)
    extra = [c for c in marked.column_names if c not in RECORD_FEATURES]
    cleaned = marked.remove_columns(extra).select(keep)
    if not len(cleaned):
        reasons = ", ".join(
            f"{n} by {reason}" for reason, n in (removed + Counter({"privacy": privacy_removed})).items()
        )
        raise UserError(
            f"every record was removed by cleaning ({reasons}): loosen data.clean (min_chars, max_chars, "
            "languages, allowed_chars) or data.privacy.action"
        )
    return cleaned


def _removed_examples(marked: Dataset, removed_by: list[str], per_reason: int = 3) -> dict[str, list[str]]:
    """The first few records removed for each reason, as text, for the report."""
    picked: dict[str, list[int]] = {}
    for index, reason in enumerate(removed_by):
        if reason and len(picked.setdefault(reason, [])) < per_reason:
            picked[reason].append(index)
    from seektune.data.privacy import mask_pii

    return {
        reason: [mask_pii(record_text(marked[i])[:300])[0] for i in indices]
        for reason, indices in picked.items()
    }


def _dedup(cfg: DataConfig, dataset: Dataset, seed: int, steps: _Steps, report: dict[str, Any]) -> Dataset:
    if not (cfg.dedup.exact or cfg.dedup.near):
        return dataset
    from seektune.data.dedup import cluster_examples, find_duplicates

    result = find_duplicates(dataset, cfg.dedup, seed, num_proc_for(cfg, len(dataset)))
    exact, near = result.counts.get("exact", 0), result.counts.get("near", 0)
    if cfg.dedup.exact:
        steps.add(
            "exact_dedup", len(dataset), len(dataset) - exact, removed={"exact": exact} if exact else {}
        )
    if cfg.dedup.near:
        n_in = len(dataset) - exact
        steps.add("near_dedup", n_in, n_in - near, removed={"near": near} if near else {})
    report["duplicates"] = {"exact": exact, "near": near, "clusters": cluster_examples(dataset, result)}
    return dataset.select(result.keep_indices)


def _split(cfg: DataConfig, dataset: Dataset, seed: int, steps: _Steps) -> dict[str, Dataset]:
    """Assign a split to every record without one (per source, stratified when asked), then divide."""
    assigned = column_values(dataset, "split")
    sources = column_values(dataset, "source")
    strata = _strata(dataset, cfg.stratify_by) if cfg.stratify_by else None
    by_source: dict[str, dict[str, list[int]]] = {}
    for index, split in enumerate(assigned):
        if not split:
            stratum = strata[index] if strata is not None else ""
            by_source.setdefault(sources[index], {}).setdefault(stratum, []).append(index)
    rng = np.random.default_rng(seed)
    for source in sorted(by_source):
        groups = by_source[source]
        n_test, n_val = split_sizes(
            sum(len(g) for g in groups.values()), cfg.validation_ratio, cfg.test_ratio
        )
        test_parts = _spread(n_test, {k: len(v) for k, v in groups.items()})
        val_parts = _spread(n_val, {k: len(v) - test_parts[k] for k, v in groups.items()})
        for stratum in sorted(groups):
            indices = groups[stratum]
            order = [indices[i] for i in rng.permutation(len(indices))]
            n_t, n_v = test_parts[stratum], val_parts[stratum]
            for position, index in enumerate(order):
                assigned[index] = (
                    "test" if position < n_t else "validation" if position < n_t + n_v else "train"
                )
    by_split: dict[str, list[int]] = {split: [] for split in SPLITS}
    for index, split in enumerate(assigned):
        by_split.setdefault(split, []).append(index)
    unknown = set(by_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"records with unknown splits {unknown}")
    dataset = dataset.remove_columns("split").add_column("split", assigned)
    records = {}
    for split in SPLITS:
        order = [by_split[split][i] for i in rng.permutation(len(by_split[split]))]
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        records[split] = dataset.select(order[:limit] if limit is not None else order)
    counts = {split: len(rows) for split, rows in records.items()}
    cut = len(dataset) - sum(counts.values())
    steps.add("split", len(dataset), sum(counts.values()), removed={"sample_limit": cut} if cut else {})
    return records


def split_sizes(n: int, validation_ratio: float, test_ratio: float) -> tuple[int, int]:
    """(test, validation) sizes of a source of `n` records.

    A split with a ratio above zero keeps at least one record, as long as two remain for training.
    """
    n_test = max(round(n * test_ratio), 1 if test_ratio > 0 and n >= 3 else 0)
    n_val = max(round(n * validation_ratio), 1 if validation_ratio > 0 and n - n_test >= 3 else 0)
    return n_test, n_val


def _spread(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """`total` divided across groups in proportion to `sizes` (largest remainder, ties by name)."""
    available = sum(sizes.values())
    if not available:
        return dict.fromkeys(sizes, 0)
    exact = {k: total * n / available for k, n in sizes.items()}
    parts = {k: min(int(v), sizes[k]) for k, v in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (-(exact[k] - parts[k]), k))
    for key in by_remainder[: total - sum(parts.values())]:
        parts[key] += 1
    return parts


def _strata(dataset: Dataset, name: str) -> list[str]:
    from seektune.data.mix import field_values

    return field_values(dataset, name, "data.stratify_by").to_pylist()


def _train_only_steps(
    cfg: DataConfig, train: Dataset, seed: int, steps: _Steps, report: dict[str, Any]
) -> Dataset:
    """Balancing, mixing and augmentation: they change the training split only."""
    if cfg.balance.field:
        from seektune.data.mix import balance

        n_in = len(train)
        train, report["balance"] = balance(train, cfg.balance.field, cfg.balance.strategy, seed)
        steps.add("balance", n_in, len(train))
    if cfg.mix.strategy != "concat":
        from seektune.data.mix import mix_sources

        n_in = len(train)
        ratios = _ratios(cfg, report["sources"]) if cfg.mix.strategy == "ratio" else None
        train, report["mix"] = mix_sources(train, cfg.mix, ratios, seed)
        steps.add("mix", n_in, len(train))
    if cfg.augment.enabled:
        from seektune.data.augment import augment_dataset

        n_in = len(train)
        extra = augment_dataset(train, cfg.augment, seed, num_proc=num_proc_for(cfg, len(train)))
        report["augmented"] = dict(Counter(column_values(extra, "augmented")))
        if len(extra):
            train = concatenate_datasets([train, extra.cast(train.features)])
        train = train.shuffle(seed=seed)
        steps.add("augment", n_in, len(train), changed={"added": len(extra)} if len(extra) else {})
    if not len(train):
        raise UserError("the training split is empty: add data or lower data.validation_ratio / test_ratio")
    return train


def _ratios(cfg: DataConfig, loaded: list[dict[str, Any]]) -> dict[str, float]:
    """Mixing weight by source name (the names the loader gave, in config order)."""
    return {
        info["name"]: float(source.ratio)
        for info, source in zip(loaded, cfg.sources, strict=True)
        if source.ratio is not None and source.split in ("auto", "train")
    }


def _with_system_prompt(records: Dataset, system_prompt: str | None) -> Dataset:
    if not system_prompt or not len(records):
        return records

    def add(batch: dict[str, list]) -> dict[str, list]:
        batch["messages"] = [with_system_prompt(m, system_prompt) if m else m for m in batch["messages"]]
        return batch

    return records.map(add, batched=True)


def _tokenize(
    cfg: DataConfig, records: dict[str, Dataset], tokenizer: Any, steps: _Steps
) -> tuple[dict[str, Dataset], dict[str, Dataset]]:
    """Tokenise each split; drop what does not fit, keeping held-out records and rows aligned."""
    kept_records, tokenized = {}, {}
    removed, changed = Counter(), Counter()
    n_in = sum(len(rows) for rows in records.values())
    for split in SPLITS:
        rows = records[split]
        if not len(rows):
            kept_records[split], tokenized[split] = rows, _empty_tokenized()
            continue
        encoded = rows.map(
            tokenize_batch,
            batched=True,
            batch_size=256,
            with_indices=True,
            remove_columns=rows.column_names,
            num_proc=num_proc_for(cfg, len(rows)),
            fn_kwargs={
                "tokenizer": tokenizer,
                "max_length": cfg.max_length,
                "train_on": cfg.train_on,
                "truncation": cfg.truncation,
                "min_tokens": cfg.clean.min_tokens,
                "windows": split == "train",
            },
        )
        reasons = column_values(encoded, "drop_reason")
        removed.update(r for r in reasons if r)
        changed["truncated"] += sum(column_values(encoded, "truncated"))
        keep = [i for i, reason in enumerate(reasons) if not reason]
        tokenized[split] = encoded.select(keep).remove_columns(["drop_reason", "truncated", "record_index"])
        if split == "train":
            record_index = column_values(encoded, "record_index")
            kept_records[split] = rows.select(sorted({record_index[i] for i in keep}))
        else:  # one row per record: rows and records stay aligned for evaluation
            kept_records[split] = rows.select(keep)
    if len(records["train"]) and not len(tokenized["train"]):  # (no training data at all: an evaluation)
        reasons = (
            ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in removed.items()) or "no records"
        )
        raise UserError(
            f"the training split is empty after tokenisation ({reasons}): add data, raise data.max_length "
            "or set data.truncation: truncate for 'too long', or give records with assistant answers"
        )
    kept = sum(len(r) for r in kept_records.values())
    steps.add(
        "tokenise",
        n_in,
        kept,
        removed=dict(removed),
        changed={k: v for k, v in changed.items() if v},
    )
    return kept_records, tokenized


def _empty_tokenized() -> Dataset:
    return Dataset.from_dict({"input_ids": [], "labels": [], "length": [], "source": []})


def _pack(
    cfg: DataConfig, tokenized: dict[str, Dataset], seed: int, report: dict[str, Any]
) -> dict[str, Dataset]:
    from seektune.data.pack import pack_dataset

    length = cfg.pack_length or cfg.max_length
    report["packing"] = {}
    for split in ("train", "validation"):
        if len(tokenized[split]):
            tokenized[split], report["packing"][split] = pack_dataset(
                tokenized[split],
                length,
                num_proc_for(cfg, len(tokenized[split])),
                order=cfg.pack_order,
                seed=seed,
            )
    return tokenized


def _save(
    records: dict[str, Dataset], tokenized: dict[str, Dataset], out_dir: Path
) -> tuple[PreparedData, str]:
    """Write the splits (JSONL to read, Arrow to reuse), reopen them from the run directory, and return
    them with the fingerprint of the records (sha256 over every split's readable records, in order)."""
    saved_records, saved_tokens = {}, {}
    digest = hashlib.sha256()
    for split in SPLITS:
        atomic_write_jsonl(out_dir / f"{split}.jsonl", _readable_rows(records[split], split, digest))
        for kind, data, saved in (
            ("records", records, saved_records),
            ("tokenized", tokenized, saved_tokens),
        ):
            target = out_dir / kind / split
            partial = target.with_name(f".{split}-partial")
            shutil.rmtree(partial, ignore_errors=True)
            dataset = _materialised(data[split])
            dataset.save_to_disk(str(partial))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
            # datasets cannot reopen an empty saved dataset (no Arrow file): keep the in-memory one
            saved[split] = load_from_disk(str(target)) if len(dataset) else dataset
    return PreparedData(records=saved_records, tokenized=saved_tokens), digest.hexdigest()


def _readable_rows(records: Dataset, split: str, digest: Any) -> Iterator[dict[str, Any]]:
    """The split's records as `readable_record`s, read in Arrow batches, each also fed to `digest`."""
    for batch in records.iter(batch_size=1000):
        for record in batch_rows(batch):
            row = readable_record(record)
            digest.update(fingerprint_line({"split": split, **row}))
            yield row


def _materialised(dataset: Dataset) -> Dataset:
    """The dataset without an indices mapping (an empty one rebuilt, which datasets cannot flatten)."""
    if len(dataset):
        return dataset.flatten_indices()
    return Dataset.from_dict({name: [] for name in dataset.column_names}, features=dataset.features)


def readable_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record as a person reads it in `<split>.jsonl`: the chat or the document, then where it came from."""
    row: dict[str, Any] = {"messages": record["messages"]} if record["messages"] else {"text": record["text"]}
    if record.get("rejected"):  # a preference pair in TRL's conversational form
        *prompt, chosen = record["messages"]
        rejected = {"role": "assistant", "content": record["rejected"]}
        row = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    row["source"] = record["source"]
    row["origin"] = record["origin"]
    metadata = json.loads(record["metadata"] or "{}")
    if metadata:
        row["metadata"] = metadata
    for key in ("label", "augmented"):
        if record[key]:
            row[key] = record[key]
    return row


def _finish_report(
    cfg: DataConfig,
    prepared: PreparedData,
    lengths: dict[str, list[int]],
    seed: int,
    report: dict[str, Any],
) -> None:
    from seektune.data.report import describe_splits, distribution_shift

    records, tokenized = prepared.records, prepared.tokenized
    report["splits"] = {split: len(records[split]) for split in SPLITS}
    report["train_rows"] = len(tokenized["train"])
    report["train_tokens"] = int(sum(lengths["train"]))
    label_field = cfg.balance.field or cfg.stratify_by
    report["splits_detail"] = describe_splits(records, lengths, label_field, seed)
    held_out = records["test"] if len(records["test"]) else records["validation"]
    report["shift"] = distribution_shift(
        [record_text(r) for r in _sample(records["train"], 2000, seed)],
        [record_text(r) for r in _sample(held_out, 2000, seed)],
        seed,
    )


def _sample(dataset: Dataset, limit: int, seed: int) -> Dataset:
    if len(dataset) <= limit:
        return dataset
    return dataset.select(sorted(np.random.default_rng(seed).choice(len(dataset), limit, replace=False)))


def compact_report(report: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json keeps of the data report: counts, removals, fingerprint and the shift AUC."""
    removed: Counter = Counter()
    for step in report.get("steps", []):
        removed.update(step["removed"])
    return {
        "sources": {s["name"]: s["records"] for s in report.get("sources", [])},
        "splits": report.get("splits", {}),
        "removed": dict(removed),
        "pii": report.get("pii", {}),
        "train_rows": report.get("train_rows"),
        "train_tokens": report.get("train_tokens"),
        "shift_auc": (report.get("shift") or {}).get("auc"),
        "fingerprint": report.get("fingerprint"),
    }
