"""`seektune data from-feedback`: the feedback store as SFT rows and preference pairs that the data stage
loads, with the merge of a choice's feedback, pairs from ratings across versions, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

from seektune.cli import main
from seektune.config import PrivacyConfig
from seektune.data.feedback import build_feedback_datasets
from seektune.serve.feedback import FeedbackRecord, FeedbackStore, ResponseRecord, new_feedback_id

Q = [{"role": "user", "content": "When does the shop open?"}]


def _response(rid: str, output: str, version: str = "v1", prompt=None, endpoint: str = "chat") -> dict:
    return {
        "id": rid,
        "choice": 0,
        "created": 0.0,
        "endpoint": endpoint,
        "model": "shop",
        "version": version,
        "user": None,
        "prompt": Q if prompt is None else prompt,
        "output": output,
        "finish_reason": "stop",
        "withheld": 0,
        "pii": {},
    }


def _feedback(rid: str, rating=None, correction=None, comment=None) -> dict:
    return {
        "id": new_feedback_id(),
        "response_id": rid,
        "choice": 0,
        "created": 0.0,
        "rating": rating,
        "correction": correction,
        "comment": comment,
        "user": None,
        "withheld": 0,
        "pii": {},
    }


def test_a_correction_teaches_itself_and_is_chosen_over_the_answer_it_corrects():
    built = build_feedback_datasets(
        [_response("a", "At noon.")], [_feedback("a", rating=-1), _feedback("a", correction="At 9.")]
    )
    assert built.sft == [
        {
            "messages": [*Q, {"role": "assistant", "content": "At 9."}],
            "metadata": {
                "response_id": "a",
                "choice": 0,
                "model": "shop",
                "version": "v1",
                "source": "correction",
            },
        }
    ]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in built.preference] == [
        (Q, [{"role": "assistant", "content": "At 9."}], [{"role": "assistant", "content": "At noon."}])
    ]
    assert built.report["by_version"]["v1"] == {
        "responses": 1,
        "rated": 1,
        "liked": 0,
        "disliked": 1,
        "corrected": 1,
        "like_rate": 0.0,
    }


def test_the_latest_rating_wins_and_liked_answers_become_sft_rows():
    built = build_feedback_datasets(
        [_response("a", "At 9.")], [_feedback("a", rating=-1), _feedback("a", rating=1)]
    )
    assert [row["messages"][-1]["content"] for row in built.sft] == ["At 9."]
    assert built.preference == [] and built.report["by_version"]["v1"]["liked"] == 1


def test_answers_to_the_same_prompt_rated_apart_make_pairs_across_versions():
    responses = [
        _response("a", "At 9.", "v1"),
        _response("b", "No idea.", "v2"),
        _response("c", "At 9 am.", "v2"),
    ]
    feedback = [_feedback("a", rating=1), _feedback("b", rating=-1), _feedback("c", rating=1)]
    built = build_feedback_datasets(responses, feedback)
    pairs = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in built.preference)
    assert pairs == [("At 9 am.", "No idea."), ("At 9.", "No idea.")]
    assert {p["metadata"]["source"] for p in built.preference} == {"ratings"}
    assert built.report["by_version"]["v2"]["like_rate"] == 0.5
    only_v2 = build_feedback_datasets(responses, feedback, version="v2")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in only_v2.preference] == [
        ("At 9 am.", "No idea.")
    ]


def test_completions_become_prompt_completion_rows_and_skips_are_reported():
    responses = [
        _response("c", "9 to 5", prompt="Opening hours:", endpoint="completion"),
        _response("n", "Maybe."),
        _response("w", ""),
        _response("e", ""),
    ]
    responses[2]["withheld"] = 1
    feedback = [
        _feedback("c", rating=1),
        _feedback("n", rating=0),
        _feedback("w", rating=1),
        _feedback("e", rating=1),
        _feedback("ghost", rating=1),
        _feedback("n", comment="meh"),
    ]
    built = build_feedback_datasets(responses, feedback)
    assert built.sft == [
        {
            "prompt": "Opening hours:",
            "completion": "9 to 5",
            "metadata": {
                "response_id": "c",
                "choice": 0,
                "model": "shop",
                "version": "v1",
                "source": "liked",
            },
        }
    ]
    assert built.report["skipped"] == {
        "feedback on a response not in the store": 1,
        "neutral rating": 1,
        "text withheld (personal data under privacy.action: drop)": 1,
        "liked answer is empty": 1,
    }


def _store_with_feedback(path: Path) -> None:
    store = FeedbackStore(path, PrivacyConfig(), max_pending=100)
    for i, (answer, rating, correction) in enumerate(
        [("At noon.", -1, "At 9, call me at 13812345678."), ("At 9.", 1, None), ("Closed.", -1, None)]
    ):
        rid = f"chatcmpl-{i}"
        store.record_response(
            ResponseRecord(rid, "chat", "shop", f"shop@1.{i % 2}.0", None, Q, [(answer, "stop")])
        )
        store.record_feedback(FeedbackRecord(new_feedback_id(), rid, 0, rating, correction, None, None))
    store.close()


def test_the_command_writes_files_the_data_stage_loads(tmp_path, capsys):
    from seektune.config import SourceConfig
    from seektune.data.load import load_source

    _store_with_feedback(tmp_path / "feedback.db")
    out = tmp_path / "fb"
    assert main(["data", "from-feedback", "--store", str(tmp_path / "feedback.db"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 responses, 3 with feedback: 2 SFT rows, 3 preference pairs" in printed
    assert "shop@1.0.0: 2 answers, 2 rated, liked 0%, 1 corrected" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pair_sources"] == {"correction": 1, "ratings": 2}
    pairs = load_source(SourceConfig(path=str(out / "preference.jsonl")), "stop", tmp_path / "cache").dataset
    assert sorted(pairs["rejected"]) == [
        "At noon.",
        "At noon.",
        "Closed.",
    ]  # the correction; "At 9." over both
    assert any("<PHONE>" in m[-1]["content"] for m in pairs["messages"])  # masked when recorded
    sft = load_source(SourceConfig(path=str(out / "sft.jsonl")), "stop", tmp_path / "cache").dataset
    assert sorted(m[-1]["content"] for m in sft["messages"]) == ["At 9, call me at <PHONE>.", "At 9."]
    assert {json.loads(m)["version"] for m in sft["metadata"]} == {"shop@1.0.0", "shop@1.1.0"}


def test_the_command_refuses_a_missing_or_empty_store_in_one_line(tmp_path, capsys):
    code = main(["data", "from-feedback", "--store", str(tmp_path / "none.db"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "there is no feedback store" in err and "serve.feedback.enabled" in err
    FeedbackStore(tmp_path / "empty.db", PrivacyConfig(), max_pending=1).close()
    code = main(
        ["data", "from-feedback", "--store", str(tmp_path / "empty.db"), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "holds no recorded responses yet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    _store_with_feedback(tmp_path / "f.db")
    code = main(
        ["data", "from-feedback", "--store", str(tmp_path / "f.db"), "--out", "x", "--model", "other"]
    )
    assert (
        code == 2
        and "has no responses of that model/version (it has: shop (shop@1.0.0)" in capsys.readouterr().err
    )
