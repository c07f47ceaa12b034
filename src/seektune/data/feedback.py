"""`seektune data from-feedback`: the server's feedback store as training data for the next round.

The store (`seektune.serve.feedback`) holds every answered choice and the feedback users sent on it. A
choice's feedback is merged field by field, the latest value of each winning (a thumbs-down followed by a
correction is both). From that:

- `sft.jsonl`: one row per choice that was liked (rating 1) or corrected; a corrected choice teaches its
  correction, a liked one its own answer. Chat responses are written as `messages`, completions as
  `prompt`/`completion`.
- `preference.jsonl`: TRL's conversational pairs `prompt`/`chosen`/`rejected`: a correction is chosen over
  the answer it corrects; and where the same prompt got answers rated 1 and answers rated -1 (two
  versions behind an A/B split, say, or two samples) each liked answer is chosen over each disliked one.
- `report.json`: what was read, what became which row, what was skipped and why, and per served version
  how its answers were rated (the A/B split's evidence).

Every row carries `metadata` {response_id, model, version, source}, so a later data report can group by
version. The texts were masked when they were recorded; nothing is masked again here.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seektune.errors import UserError

MAX_PAIRS_PER_PROMPT = 8
OUTPUT_FILES = ("sft.jsonl", "preference.jsonl", "report.json")


@dataclass
class _Verdict:
    """A choice's feedback merged: the latest rating, correction and comment."""

    rating: int | None = None
    correction: str | None = None
    comment: str | None = None
    count: int = 0
    withheld: bool = False


@dataclass
class _Tally:
    responses: int = 0
    rated: int = 0
    liked: int = 0
    disliked: int = 0
    corrected: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        out["like_rate"] = round(self.liked / self.rated, 4) if self.rated else None
        return out


@dataclass
class FeedbackDatasets:
    sft: list[dict[str, Any]] = field(default_factory=list)
    preference: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def _verdicts(feedback: Iterable[dict[str, Any]]) -> dict[tuple[str, int], _Verdict]:
    verdicts: dict[tuple[str, int], _Verdict] = defaultdict(_Verdict)
    for row in feedback:  # oldest first: later values overwrite earlier ones
        verdict = verdicts[(row["response_id"], row["choice"])]
        verdict.count += 1
        verdict.withheld = verdict.withheld or bool(row["withheld"])
        for key in ("rating", "correction", "comment"):
            if row[key] is not None:
                setattr(verdict, key, row[key])
    return verdicts


def _prompt_key(response: dict[str, Any]) -> str:
    return json.dumps([response["endpoint"], response["prompt"]], ensure_ascii=False, sort_keys=True)


def _answer(response: dict[str, Any], text: str) -> Any:
    return [{"role": "assistant", "content": text}] if response["endpoint"] == "chat" else text


def _sft_row(response: dict[str, Any], text: str, source: str) -> dict[str, Any]:
    metadata = _metadata(response, source)
    if response["endpoint"] == "chat":
        return {
            "messages": [*response["prompt"], {"role": "assistant", "content": text}],
            "metadata": metadata,
        }
    return {"prompt": response["prompt"], "completion": text, "metadata": metadata}


def _pair(response: dict[str, Any], chosen: str, rejected: str, source: str) -> dict[str, Any]:
    return {
        "prompt": response["prompt"],
        "chosen": _answer(response, chosen),
        "rejected": _answer(response, rejected),
        "metadata": _metadata(response, source),
    }


def _metadata(response: dict[str, Any], source: str) -> dict[str, Any]:
    return {
        "response_id": response["id"],
        "choice": response["choice"],
        "model": response["model"],
        "version": response["version"],
        "source": source,
    }


def build_feedback_datasets(
    responses: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    model: str | None = None,
    version: str | None = None,
) -> FeedbackDatasets:
    """SFT rows, preference pairs and the report from the store's rows (`read_store`), optionally of one
    public `model` name or one served `version` only."""
    verdicts = _verdicts(feedback)
    known = {(r["id"], r["choice"]) for r in responses}
    skipped: Counter[str] = Counter()
    skipped["feedback on a response not in the store"] = sum(
        v.count for key, v in verdicts.items() if key not in known
    )
    chosen_responses = [
        r
        for r in responses
        if (model is None or r["model"] == model) and (version is None or r["version"] == version)
    ]
    out = FeedbackDatasets()
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    by_prompt: dict[str, list[tuple[dict[str, Any], int]]] = defaultdict(list)
    seen_pairs: set[tuple[str, str, str]] = set()
    with_feedback = 0

    def add_pair(response: dict[str, Any], chosen: str, rejected: str, source: str) -> None:
        if not chosen.strip() or not rejected.strip():
            skipped["pair with an empty answer"] += 1
            return
        if chosen.strip() == rejected.strip():
            return
        key = (_prompt_key(response), chosen.strip(), rejected.strip())
        if key in seen_pairs:
            skipped["duplicate pair"] += 1
            return
        seen_pairs.add(key)
        out.preference.append(_pair(response, chosen, rejected, source))

    for response in chosen_responses:
        tally = tallies[response["version"]]
        tally.responses += 1
        verdict = verdicts.get((response["id"], response["choice"]))
        if verdict is None:
            continue
        with_feedback += 1
        if verdict.rating is not None:
            tally.rated += 1
            tally.liked += verdict.rating > 0
            tally.disliked += verdict.rating < 0
        if response["withheld"] or verdict.withheld:
            skipped["text withheld (personal data under privacy.action: drop)"] += 1
            continue
        output = response["output"]
        correction = verdict.correction
        if correction is not None and correction.strip() != output.strip():
            tally.corrected += 1
            out.sft.append(_sft_row(response, correction, "correction"))
            add_pair(response, correction, output, "correction")
        elif correction is not None or (verdict.rating is not None and verdict.rating > 0):
            if output.strip():
                out.sft.append(_sft_row(response, output, "liked"))
            else:
                skipped["liked answer is empty"] += 1
        elif verdict.rating is None:
            skipped["comment only"] += 1
        elif verdict.rating == 0:
            skipped["neutral rating"] += 1
        if verdict.rating is not None and verdict.rating != 0:
            by_prompt[_prompt_key(response)].append((response, verdict.rating))

    for rated in by_prompt.values():
        liked = [r for r, rating in rated if rating > 0]
        disliked = [r for r, rating in rated if rating < 0]
        made = 0
        for good in liked:
            for bad in disliked:
                if made == MAX_PAIRS_PER_PROMPT:
                    break
                before = len(out.preference)
                add_pair(good, good["output"], bad["output"], "ratings")
                made += len(out.preference) - before

    out.report = {
        "filters": {"model": model, "version": version},
        "responses": len(chosen_responses),
        "responses_in_store": len(responses),
        "with_feedback": with_feedback,
        "feedback_rows": len(feedback),
        "sft_rows": len(out.sft),
        "preference_pairs": len(out.preference),
        "sft_sources": dict(Counter(row["metadata"]["source"] for row in out.sft)),
        "pair_sources": dict(Counter(row["metadata"]["source"] for row in out.preference)),
        "skipped": {reason: count for reason, count in skipped.items() if count},
        "by_version": {name: tally.as_dict() for name, tally in sorted(tallies.items())},
    }
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_feedback_datasets(
    store: Path, out_dir: Path, model: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Read the store, build the datasets and write sft.jsonl, preference.jsonl and report.json into
    `out_dir` (each replaced whole); the report. A UserError when nothing could be built."""
    from seektune.serve.feedback import read_store

    responses, feedback = read_store(store)
    built = build_feedback_datasets(responses, feedback, model=model, version=version)
    report = {"store": str(store), **built.report}
    if not built.sft and not built.preference:
        if not responses:
            problem = "holds no recorded responses yet"
        elif not report["responses"]:
            served = sorted({f"{r['model']} ({r['version']})" for r in responses})
            problem = f"has no responses of that model/version (it has: {', '.join(served)})"
        else:
            problem = (
                f"has {report['responses']} responses and {report['with_feedback']} with feedback, none "
                f"liked or corrected (skipped: {report['skipped'] or 'none'})"
            )
        raise UserError(
            f"nothing to write: the feedback store {store} {problem}; send feedback with POST /v1/feedback"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "sft.jsonl", built.sft)
    _write_jsonl(out_dir / "preference.jsonl", built.preference)
    tmp = out_dir / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "report.json")
    return report
