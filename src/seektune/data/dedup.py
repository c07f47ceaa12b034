"""Exact and near-duplicate detection across all sources and splits.

Three passes over the records, the first two each a `Dataset.map(batched=True, num_proc=...)` followed by a
cheap single-process decision:

1. Exact: a 64-bit BLAKE2b digest of the normalised text (`normalise_for_dedup`) per record; records
   whose digest was seen before are dropped.
2. Near: a MinHash signature per surviving record (datasketch's permutations over character n-gram
   shingles, so Chinese needs no word segmentation), indexed in a datasketch `MinHashLSH`. Each
   record queries the index, its candidates are verified by the Jaccard similarity estimated from the
   signatures, and only records that stay are inserted (so a removed record points at one kept so far).
3. Held-out check (only when there are test or validation records): pass 2's band layout finds about 93%
   of the pairs at the threshold, so a training record can keep a held-out near-twin. The kept held-out
   records (usually few) are indexed again, with a band layout that finds at least 99.5% of the pairs at
   the threshold (datasketch's false-negative probability (1 - s**r)**b at s = threshold; a pair whose
   *estimated* Jaccard reaches the threshold is missed far more rarely: at 0.85 and 128 permutations,
   18 bands of 7 rows, only if its at most 19 differing signature values hit all 18 bands, probability
   4e-6, and never from 0.867 up), every other kept record queries it with the signatures of pass 2, and
   one whose estimated Jaccard to a candidate reaches the threshold is removed as that candidate's
   near-duplicate (the most similar one). No second MinHash pass: the signatures of pass 2 are reused.

Which member of a duplicate group stays: records are visited test first, then validation, then the
rest ('train' or '' = not split yet), each group in index order; the first one visited stays. So a held-out
example never loses to its training twin and no test example keeps a near-twin in training.

Normalisation (for the comparison only; the records keep their text): NFKC (full-width to half-width),
casefold, Unicode punctuation deleted, whitespace next to Chinese or Japanese characters deleted, other
whitespace runs folded to one space. So "你好，世界。", "你好 ， 世界" and "你好世界" are equal, as are
"Hello, world!" and "hello world", and "使用 Python 编程" and "使用Python编程": the usual differences
between scraped copies of the same text.

Our own code, and why: datasketch hashes every shingle with a Python call (SHA-1 by default) and
updates one MinHash at a time, which is nearly all of its cost on short records (about 200 records/s
at 128 permutations). We hash all n-grams of a batch at once with NumPy (a polynomial rolling hash over
the code points, then a 64-bit finaliser) and apply datasketch's own permutations (`MinHash(...).
permutations`, scheme 'affine32') to the whole batch in a few array operations; the signatures equal
`MinHash.update_batch` on the same shingle hashes (a test checks this). The index and the band layout
are datasketch's `MinHashLSH`; candidates are verified by comparing signature arrays, which is what
`MinHash.jaccard` computes, without building a MinHash per candidate. The held-out check bands all
signatures at once with NumPy (a 64-bit hash per band, matched by binary search in the held-out records'
sorted band keys) instead of a `MinHashLSH.query` per record, which takes 60 us a record: with 5% of the
records held out that added 38% to the near-dedup time, this adds 2-3%, and the same pairs come out.
A `select`ed dataset (what cleaning leaves) is read through datasets' private `_indices` with Arrow
`take`: datasets' public getters and `map` read a selection row by row, which made the exact pass about
1.5x slower.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex
from datasets import Dataset
from datasketch import LeanMinHash, MinHash, MinHashLSH

from seektune.config import DedupConfig
from seektune.data.records import record_text

logger = logging.getLogger(__name__)

_PUNCTUATION = regex.compile(r"\p{P}+")
# The same set for ASCII-only text, deleted by bytes.translate (ten times as fast as the regex).
_ASCII_PUNCTUATION = bytes(c for c in range(128) if _PUNCTUATION.match(chr(c)))
_HELD_OUT = ("test", "validation")  # visited first, in this order
_TEXT_COLUMNS = ["messages", "text", "rejected"]
_MIN_ROWS_PER_PROCESS = 10_000
_GATHER_ROWS = 2_000_000  # rows of a selection gathered into memory at once (~0.5 GB of chat text)
# datasketch's default permutation scheme (2.x): 32-bit affine permutations, uint32 signatures.
_SCHEME = "affine32"
# LSH band layout chosen with false negatives weighted 19 times false positives: candidates are verified
# anyway, so a spurious one costs a comparison while a missed one leaves a twin in the data. At the
# default threshold 0.85 this finds 93% of the pairs at the threshold and 99% at 0.9 (50/50: 46%, 81%).
_LSH_WEIGHTS = (0.05, 0.95)
# Share of the pairs at the threshold that the held-out check's band layout must find (see the docstring).
_HELD_OUT_RECALL = 0.995
_QUERY_CHUNK = 65_536  # records banded and matched at once by the held-out check (~10 MiB of band keys)
_SHINGLE_CHUNK = 8192  # shingles permuted at once: 8192 x num_perm 128 x 4 bytes = 4 MiB
_POLY_BASE = np.uint64(0x100000001B3)
_MIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT_33 = np.uint64(33)
_SHIFT_32 = np.uint64(32)


class Duplicate(NamedTuple):
    """Why a record was removed: 'exact' or 'near', the index it duplicates, their similarity.

    That index may itself be removed (see `_final`); `DedupResult.clusters` names the record that stays.
    """

    kind: str
    kept: int
    similarity: float


@dataclass
class DuplicateCluster:
    """A kept record and the records removed as its duplicates."""

    kept: int
    removed: list[int]
    kind: str
    similarity: float

    @property
    def size(self) -> int:
        return 1 + len(self.removed)


@dataclass
class DedupResult:
    """What `find_duplicates` found; `dataset.select(result.keep_indices)` is the deduplicated data."""

    removed: dict[int, Duplicate] = field(default_factory=dict)
    keep_indices: list[int] = field(default_factory=list)
    clusters: list[DuplicateCluster] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"exact": 0, "near": 0})


def normalise_for_dedup(text: str) -> str:
    """`text` as compared for duplicates: NFKC, casefolded, punctuation deleted, whitespace folded
    (and deleted next to Chinese or Japanese characters)."""
    if text.isascii():
        return " ".join(text.lower().encode().translate(None, _ASCII_PUNCTUATION).decode().split())
    if not unicodedata.is_normalized("NFKC", text):
        # NFC of NFKD is NFKC by definition; CPython computes it about 15x faster for Chinese text.
        text = unicodedata.normalize("NFC", unicodedata.normalize("NFKD", text))
    words = _PUNCTUATION.sub("", text.casefold()).split()
    if len(words) < 2:
        return words[0] if words else ""
    pieces = [words[0]]
    for before, word in itertools.pairwise(words):  # few: Chinese text has spaces only between lines
        if not (_is_cjk(before[-1]) or _is_cjk(word[0])):
            pieces.append(" ")
        pieces.append(word)
    return "".join(pieces)


def _is_cjk(character: str) -> bool:
    """A character of a script written without spaces between words: Han, kana (and CJK symbols)."""
    return "\u3000" <= character <= "\u9fff" or "\uf900" <= character <= "\ufaff" or character >= "\U00020000"


def _batch_texts(batch: dict[str, list]) -> list[str]:
    rejected_answers = batch.get("rejected") or [""] * len(batch["text"])
    return [
        normalise_for_dedup(record_text({"messages": messages, "text": text, "rejected": rejected}))
        for messages, text, rejected in zip(batch["messages"], batch["text"], rejected_answers, strict=True)
    ]


def exact_keys_batch(batch: dict[str, list]) -> dict[str, list]:
    """The column `dedup_key`: a signed 64-bit digest of each record's normalised text.

    Returns only the new column; `Dataset.map` adds it to the dataset's columns.
    """
    keys = [
        int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
        for text in _batch_texts(batch)
    ]
    return {"dedup_key": keys}


def _mix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads the rolling hash over all bits (wrap-around intended)."""
    values ^= values >> _SHIFT_33
    values *= _MIX_1
    values ^= values >> _SHIFT_33
    values *= _MIX_2
    values ^= values >> _SHIFT_33
    return values


def _polynomial_hash(codes: np.ndarray, width: int, count: int) -> np.ndarray:
    """Hashes of the `count` windows of `width` code points starting at 0, 1, ... (mod 2**64)."""
    hashes = codes[:count].copy()
    for offset in range(1, width):
        hashes *= _POLY_BASE
        hashes += codes[offset : offset + count]
    return hashes


def _shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """The 32-bit hashes of every character n-gram of every text, concatenated, and the bounds of each
    text's run (text i owns hashes[bounds[i]:bounds[i + 1]]). A text shorter than n is one shingle."""
    lengths = [len(text) for text in texts]
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = _polynomial_hash(codes, ngram, max(len(codes) - ngram + 1, 0))
    runs = []
    start = 0
    for length in lengths:
        if length >= ngram:
            runs.append(hashes[start : start + length - ngram + 1])
        elif length:
            runs.append(_polynomial_hash(codes[start : start + length], length, 1))
        start += length
    mixed = _mix64(np.concatenate(runs)) if runs else hashes[:0]
    bounds = np.cumsum([0] + [max(length - ngram + 1, min(length, 1)) for length in lengths])
    return (mixed ^ (mixed >> _SHIFT_32)).astype(np.uint32), bounds


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, which datasketch's 'affine32' scheme applies to each input hash."""
    values = values ^ (values >> np.uint32(16))
    values *= np.uint32(0x85EBCA6B)
    values ^= values >> np.uint32(13)
    values *= np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


def _minhash_seed(seed: int) -> int:
    """`seed` in the range NumPy's RandomState (datasketch's permutation source) accepts."""
    return seed % 2**32


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's permutation parameters (a, b) for `num_perm` and `seed`, as column vectors."""
    a, b = MinHash(num_perm=num_perm, seed=_minhash_seed(seed), scheme=_SCHEME).permutations
    return a.reshape(-1, 1), b.reshape(-1, 1)


def _signatures_of(hashes: np.ndarray, bounds: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (one row per run of `hashes`), exactly `MinHash.update_batch`'s, computed for
    _SHINGLE_CHUNK shingles at a time; an empty run keeps datasketch's empty value (all 2**32 - 1)."""
    a, b = _permutations(num_perm, seed)
    signatures = np.full((len(bounds) - 1, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for chunk_start in range(0, len(hashes), _SHINGLE_CHUNK):
        chunk_end = min(chunk_start + _SHINGLE_CHUNK, len(hashes))
        # Permutations x shingles, so that the minimum over each run reads contiguous memory.
        permuted = a * _fmix32(hashes[chunk_start:chunk_end]).reshape(1, -1)
        permuted += b
        # Runs that own shingles of this chunk; they tile it, so their first shingles split it.
        first = int(np.searchsorted(bounds, chunk_start, side="right")) - 1
        last = int(np.searchsorted(bounds, chunk_end, side="left"))
        rows = np.arange(first, last)
        starts = np.maximum(bounds[first:last], chunk_start) - chunk_start
        owning = starts < np.minimum(bounds[first + 1 : last + 1], chunk_end) - chunk_start
        rows, starts = rows[owning], starts[owning]
        signatures[rows] = np.minimum(signatures[rows], np.minimum.reduceat(permuted, starts, axis=1).T)
    return signatures


def minhash_batch(batch: dict[str, list], cfg: DedupConfig, seed: int) -> dict[str, np.ndarray]:
    """The column `minhash`: each record's MinHash signature, a row of cfg.num_perm uint32 values.

    Shingles are the character cfg.ngram-grams of the normalised text; the signature equals datasketch's
    `MinHash(num_perm, seed, hashfunc=identity).update_batch(shingle hashes)`. Returns only the new column,
    as one (records x num_perm) array, which `Dataset.map` stores 5x faster than a list of rows.
    """
    hashes, bounds = _shingle_hashes(_batch_texts(batch), cfg.ngram)
    return {"minhash": _signatures_of(hashes, bounds, cfg.num_perm, seed)}


def _processes(num_proc: int | None, rows: int) -> int | None:
    """Worker processes worth starting: none below _MIN_ROWS_PER_PROCESS rows per worker."""
    if not num_proc:
        return None
    useful = min(num_proc, rows // _MIN_ROWS_PER_PROCESS)
    return useful if useful > 1 else None


def _column(dataset: Dataset, name: str) -> pa.ChunkedArray:
    """Column `name` of `dataset`, through its row selection (`select`) if it has one.

    A selection is gathered with one Arrow `take`: datasets' own getters gather a selection row by row
    (about 5 s per million rows). `_indices` is datasets' attribute for the selection; it has no public one.
    """
    column = dataset.data.column(name)
    return column if dataset._indices is None else column.take(dataset._indices.column(0))


def _split_ranks(dataset: Dataset) -> np.ndarray:
    """Each record's visiting rank: 0 test, 1 validation, 2 the rest (len(_HELD_OUT) = not held out)."""
    splits = _column(dataset, "split")
    ranks = np.full(len(dataset), len(_HELD_OUT), dtype=np.int8)
    for rank, split in enumerate(_HELD_OUT):
        ranks[pc.fill_null(pc.equal(splits, split), False).to_numpy(zero_copy_only=False)] = rank
    return ranks


def _text_parts(dataset: Dataset) -> Iterator[Dataset]:
    """The text columns of the rows of `dataset` (no selection), or of a selection gathered into memory in
    parts of _GATHER_ROWS rows: `Dataset.map` over a selection reads it row by row, a third slower."""
    if dataset._indices is None:
        yield dataset.select_columns(_TEXT_COLUMNS)
        return
    indices = dataset._indices.column(0).combine_chunks()
    for start in range(0, len(dataset), _GATHER_ROWS):
        part = indices.slice(start, _GATHER_ROWS)
        table = pa.table({name: dataset.data.column(name).take(part) for name in _TEXT_COLUMNS})
        # A fingerprint of our own: datasets would otherwise hash the whole table (about 1 s per million).
        yield Dataset(table, fingerprint=f"dedup-{uuid.uuid4().hex}")


def _mapped_column(
    dataset: Dataset, function: Any, column: str, num_proc: int | None, **kwargs: Any
) -> pa.Array:
    """`function` mapped over the text columns of `dataset`; the new column as an Arrow array.

    A selection of at least half the underlying rows (what cleaning and the exact pass leave) is mapped
    over all underlying rows, which workers read memory-mapped, and the selection taken from the result;
    a smaller one is gathered (`_text_parts`), which sends the text to the workers.
    """
    indices = None if dataset._indices is None else dataset._indices.column(0).combine_chunks()
    if indices is not None and 2 * len(indices) >= dataset.data.num_rows:
        underlying = Dataset(dataset.data, fingerprint=f"{dataset._fingerprint}-dedup-rows")
        return _mapped_column(underlying, function, column, num_proc, **kwargs).take(indices)
    results = []
    for part in _text_parts(dataset):
        mapped = part.map(
            function,
            batched=True,
            num_proc=_processes(num_proc, len(part)),
            remove_columns=_TEXT_COLUMNS,
            fn_kwargs=kwargs or None,
            desc=f"dedup: {column}",
        )
        results.append(mapped.data.column(column).combine_chunks())
    return pa.concat_arrays(results)


def _exact_pass(
    dataset: Dataset, order: np.ndarray, num_proc: int | None, removed: dict[int, Duplicate]
) -> np.ndarray:
    """Records removed as exact duplicates go into `removed`; returns the survivors in visiting order."""
    keys = _mapped_column(dataset, exact_keys_batch, "dedup_key", num_proc).to_numpy()[order]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    kept_position = first[inverse]
    duplicate = np.flatnonzero(kept_position != np.arange(len(order)))
    for position in duplicate.tolist():
        removed[int(order[position])] = Duplicate("exact", int(order[kept_position[position]]), 1.0)
    return np.delete(order, duplicate)


def _signatures(dataset: Dataset, cfg: DedupConfig, seed: int, num_proc: int | None) -> np.ndarray:
    column = _mapped_column(dataset, minhash_batch, "minhash", num_proc, cfg=cfg, seed=seed)
    return column.flatten().to_numpy().astype(np.uint32, copy=False).reshape(-1, cfg.num_perm)


def _near_pass(
    dataset: Dataset,
    survivors: np.ndarray,
    held_out: np.ndarray,
    cfg: DedupConfig,
    seed: int,
    num_proc: int | None,
    removed: dict[int, Duplicate],
) -> None:
    """Records removed as near-duplicates of a record visited earlier go into `removed`; `held_out` marks
    the test and validation records among `survivors` (visiting order, so held-out ones come first)."""
    signatures = _signatures(dataset.select(survivors), cfg, seed, num_proc)
    stays = _lsh_pass(signatures, survivors, cfg, seed, removed)
    if held_out.any() and not held_out.all():
        _held_out_check(signatures, survivors, stays & held_out, stays & ~held_out, cfg, removed)


def _sketch(signature: np.ndarray, seed: int) -> LeanMinHash:
    return LeanMinHash(seed=_minhash_seed(seed), hashvalues=signature, scheme=_SCHEME)


def _best_match(
    signatures: np.ndarray, signature: np.ndarray, candidates: list[int], threshold: float
) -> tuple[int, float] | None:
    """The candidate (a position in `signatures`) most similar to `signature` by estimated Jaccard, with
    that similarity, if it reaches `threshold`."""
    similarities = (signatures[candidates] == signature).mean(axis=1)
    best = int(similarities.argmax())
    return (candidates[best], float(similarities[best])) if similarities[best] >= threshold else None


def _lsh_pass(
    signatures: np.ndarray, survivors: np.ndarray, cfg: DedupConfig, seed: int, removed: dict[int, Duplicate]
) -> np.ndarray:
    """Pass 2: each record against the records kept before it; returns which positions stay."""
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=_LSH_WEIGHTS)
    stays = np.zeros(len(signatures), dtype=bool)
    for position, signature in enumerate(signatures):
        sketch = _sketch(signature, seed)
        candidates = lsh.query(sketch)
        match = _best_match(signatures, signature, candidates, cfg.threshold) if candidates else None
        if match:
            kept, similarity = match
            removed[int(survivors[position])] = Duplicate("near", int(survivors[kept]), similarity)
            continue
        lsh.insert(position, sketch, check_duplication=False)
        stays[position] = True
    return stays


@functools.lru_cache(maxsize=8)
def _held_out_band_layout(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) of the held-out check: the most rows per band (the fewest spurious candidates) with
    which a pair at Jaccard `threshold` shares a band with probability at least _HELD_OUT_RECALL, by
    datasketch's false-negative probability (1 - s**rows)**bands at s = threshold. (18, 7) at 0.85, 128."""
    for rows in range(num_perm, 1, -1):
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= 1 - _HELD_OUT_RECALL:
            return bands, rows
    return num_perm, 1


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(records x bands) 64-bit keys of the bands of `rows` signature values: equal bands, equal keys
    (unequal bands collide with probability about 2**-64, which only adds a candidate to verify)."""
    banded = signatures[:, : bands * rows].reshape(len(signatures), bands, rows)
    keys = banded[:, :, 0].astype(np.uint64)
    for row in range(1, rows):
        keys *= _POLY_BASE
        keys += banded[:, :, row]
    return _mix64(keys)


class _BandIndex(NamedTuple):
    """Band keys of the indexed records, sorted per band (`keys[band]`), and their rows (`rows[band]`)."""

    keys: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, band_keys: np.ndarray) -> _BandIndex:
        rows = np.argsort(band_keys, axis=0, kind="stable").T
        return cls(np.take_along_axis(band_keys.T, rows, axis=1), rows)

    def pairs(self, query_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, indexed row) of every pair that shares at least one band key, each pair once."""
        queries, matches = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for keys, rows, wanted in zip(self.keys, self.rows, np.ascontiguousarray(query_keys.T), strict=True):
            low = np.searchsorted(keys, wanted)
            hits = np.flatnonzero(keys[np.minimum(low, len(keys) - 1)] == wanted)
            if not len(hits):
                continue
            wanted, low = wanted[hits], low[hits]
            counts = np.searchsorted(keys, wanted, side="right") - low
            # Positions low[i] .. low[i] + counts[i] - 1 in the sorted keys, for each hit i, concatenated.
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            queries.append(np.repeat(hits, counts))
            matches.append(rows[np.repeat(low, counts) + offsets])
        pairs = np.unique(np.stack([np.concatenate(queries), np.concatenate(matches)]), axis=1)
        return pairs[0], pairs[1]


def _held_out_check(
    signatures: np.ndarray,
    survivors: np.ndarray,
    held_out: np.ndarray,
    others: np.ndarray,
    cfg: DedupConfig,
    removed: dict[int, Duplicate],
) -> None:
    """Pass 3: kept records (`others`) removed as near-twins of a kept held-out record (`held_out`) that
    pass 2's LSH missed; both are masks over the positions of `signatures`. Of several held-out twins the
    most similar wins (then the first visited)."""
    indexed, queried = np.flatnonzero(held_out), np.flatnonzero(others)
    if not len(indexed) or not len(queried):
        return
    bands, rows = _held_out_band_layout(cfg.threshold, cfg.num_perm)
    index = _BandIndex.of(_band_keys(signatures[indexed], bands, rows))
    found = 0
    for start in range(0, len(queried), _QUERY_CHUNK):
        chunk = queried[start : start + _QUERY_CHUNK]
        query_rows, index_rows = index.pairs(_band_keys(signatures[chunk], bands, rows))
        query_positions, index_positions = chunk[query_rows], indexed[index_rows]
        similarities = (signatures[query_positions] == signatures[index_positions]).mean(axis=1)
        twin = similarities >= cfg.threshold
        query_positions, index_positions, similarities = (
            query_positions[twin],
            index_positions[twin],
            similarities[twin],
        )
        best = np.lexsort((index_positions, -similarities, query_positions))
        _, first = np.unique(query_positions[best], return_index=True)
        for pair in best[first].tolist():
            kept = int(survivors[index_positions[pair]])
            removed[int(survivors[query_positions[pair]])] = Duplicate(
                "near", kept, float(similarities[pair])
            )
        found += len(first)
    logger.debug("dedup: the held-out check removed %d near-twins of held-out records", found)


def _final(removed: dict[int, Duplicate], duplicate: Duplicate) -> Duplicate:
    """`duplicate` followed to the record that stays: 'near' if any link is, the lowest link similarity.

    A record can point at a removed one: an exact twin of a record that pass 2 removed, or a near-twin of
    a training record that the held-out check removed later.
    """
    while duplicate.kept in removed:
        link = removed[duplicate.kept]
        kind = "near" if "near" in (duplicate.kind, link.kind) else "exact"
        duplicate = Duplicate(kind, link.kept, min(duplicate.similarity, link.similarity))
    return duplicate


def _clusters(removed: dict[int, Duplicate]) -> list[DuplicateCluster]:
    """Removed records grouped by the record that finally stays, biggest group first.

    An exact twin of a record removed as a near-duplicate joins that record's near cluster, and so do the
    records removed in favour of a record that was removed itself (`_final`). A cluster is 'near' when any
    member is; its similarity is the highest of its members' to the kept record.
    """
    groups: dict[int, DuplicateCluster] = {}
    for index in sorted(removed):
        duplicate = _final(removed, removed[index])
        cluster = groups.setdefault(duplicate.kept, DuplicateCluster(duplicate.kept, [], "exact", 0.0))
        cluster.removed.append(index)
        cluster.kind = "near" if duplicate.kind == "near" else cluster.kind
        cluster.similarity = max(cluster.similarity, duplicate.similarity)
    return sorted(groups.values(), key=lambda cluster: (-cluster.size, cluster.kept))


def find_duplicates(
    dataset: Dataset, cfg: DedupConfig, seed: int, num_proc: int | None = None
) -> DedupResult:
    """Exact (cfg.exact) then near (cfg.near) duplicates of `dataset`, a dataset of `RECORD_FEATURES`.

    Of each duplicate group the test record stays, else the validation record, else the earliest.
    """
    ranks = _split_ranks(dataset)
    order = np.argsort(ranks, kind="stable")  # visiting order: test, validation, the rest
    removed: dict[int, Duplicate] = {}
    survivors = order
    if cfg.exact and len(survivors):
        survivors = _exact_pass(dataset, survivors, num_proc, removed)
    if cfg.near and len(survivors):
        held_out = ranks[survivors] < len(_HELD_OUT)
        _near_pass(dataset, survivors, held_out, cfg, seed, num_proc, removed)
    counts = {"exact": 0, "near": 0}
    for duplicate in removed.values():
        counts[duplicate.kind] += 1
    keep = [index for index in range(len(dataset)) if index not in removed]
    logger.info(
        "dedup: %d exact and %d near duplicates removed, %d records kept",
        counts["exact"],
        counts["near"],
        len(keep),
    )
    return DedupResult(removed=removed, keep_indices=keep, clusters=_clusters(removed), counts=counts)


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cluster_examples(dataset: Dataset, result: DedupResult, limit: int = 5, width: int = 160) -> list[dict]:
    """The `limit` biggest clusters as text snippets of `width` characters for the data report.

    Each: {kind, size, kept: snippet, removed: [snippets of at most `limit` removed records], similarity}.
    """
    examples = []
    for cluster in result.clusters[:limit]:
        examples.append(
            {
                "kind": cluster.kind,
                "size": cluster.size,
                "kept": _snippet(record_text(dataset[cluster.kept]), width),
                "removed": [_snippet(record_text(dataset[i]), width) for i in cluster.removed[:limit]],
                "similarity": round(cluster.similarity, 4),
            }
        )
    return examples
