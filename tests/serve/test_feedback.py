"""The feedback store on the server: recording answers (plain, streamed, several choices), POST /v1/feedback
with its refusals, masking before anything is written, and recording that never holds up a request."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seektune.config import PrivacyConfig, ServeConfig
from seektune.errors import UserError
from seektune.serve.feedback import FeedbackStore, ResponseRecord, open_store, read_store

KEY = {"Authorization": "Bearer k"}
ASKED = [{"role": "user", "content": "My e-mail is li.wei@example.com, when does the shop open?"}]


@pytest.fixture(scope="module")
def recording(base_cache: Path, tmp_path_factory, serve_helpers, serve_app):
    """The tiny base served with feedback recording on (masking e-mail and phone numbers)."""
    from seektune.serve.app import ServedModels, create_app
    from seektune.serve.engine import Engine

    store = tmp_path_factory.mktemp("feedback") / "feedback.db"
    cfg = ServeConfig(
        api_keys=["k"],
        feedback={"enabled": True, "store": store},
        limits={"default_max_tokens": 12, "max_n": 3},
    )
    loaded = serve_helpers.load(base_cache)
    engine = Engine(loaded.model, loaded.tokenizer, cfg.limits, version="tiny")
    app = create_app(engine, loaded.tokenizer, cfg, ServedModels("tiny"))
    with serve_app(app) as running, httpx.Client(base_url=running.url, headers=KEY, timeout=60) as client:
        yield client, app.state.server.feedback, store


def _chat(client: httpx.Client, **extra) -> dict:
    reply = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": ASKED, "temperature": 0, **extra}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def _send(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/feedback", json=body)


def _stored(store: FeedbackStore, path: Path):
    store.flush()
    return read_store(path)


def test_an_answer_and_its_feedback_are_stored_masked(recording) -> None:
    client, store, path = recording
    answer = _chat(client, user="li.wei@example.com")
    sent = _send(
        client,
        response_id=answer["id"],
        rating=-1,
        correction="We open at 9. Call 13812345678 for more.",
        comment="wrong hours",
    )
    assert sent.status_code == 201, sent.text
    assert sent.json()["response_id"] == answer["id"] and sent.json()["id"].startswith("fb-")
    responses, feedback = _stored(store, path)
    row = next(r for r in responses if r["id"] == answer["id"])
    assert row["prompt"] == [{"role": "user", "content": "My e-mail is <EMAIL>, when does the shop open?"}]
    assert row["output"] == answer["choices"][0]["message"]["content"]
    assert (row["endpoint"], row["model"], row["version"], row["user"]) == ("chat", "tiny", "tiny", "<EMAIL>")
    assert row["pii"] == {"email": 2}
    mine = [f for f in feedback if f["response_id"] == answer["id"]]
    assert [(f["rating"], f["correction"], f["comment"]) for f in mine] == [
        (-1, "We open at 9. Call <PHONE> for more.", "wrong hours")
    ]
    raw = b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))  # the file and its WAL
    assert b"li.wei@example.com" not in raw and b"13812345678" not in raw  # never written, not even the WAL


def test_a_streamed_answer_is_stored_as_streamed(recording) -> None:
    client, store, path = recording
    text, response_id = "", None
    with client.stream(
        "POST", "/v1/chat/completions", json={"model": "tiny", "messages": ASKED, "stream": True}
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                response_id = chunk["id"]
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
    assert _send(client, response_id=response_id, rating=1).status_code == 201
    responses, _ = _stored(store, path)
    assert [r["output"] for r in responses if r["id"] == response_id] == [text]


def test_each_choice_of_a_completion_can_get_its_own_feedback(recording) -> None:
    client, store, path = recording
    reply = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "Opening hours:", "n": 2, "seed": 3}
    )
    assert reply.status_code == 200
    response_id = reply.json()["id"]
    assert _send(client, response_id=response_id, index=1, rating=1).status_code == 201
    past = _send(client, response_id=response_id, index=2, rating=1)
    assert past.status_code == 400 and "has 2 choice(s); index 2" in past.json()["error"]["message"]
    responses, feedback = _stored(store, path)
    mine = sorted((r["choice"], r["prompt"], r["endpoint"]) for r in responses if r["id"] == response_id)
    assert mine == [(0, "Opening hours:", "completion"), (1, "Opening hours:", "completion")]
    assert [(f["choice"], f["rating"]) for f in feedback if f["response_id"] == response_id] == [(1, 1)]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"response_id": "chatcmpl-nope", "rating": 1}, 404, "no response 'chatcmpl-nope' was recorded"),
        ({"response_id": "{known}"}, 400, "send a rating (-1, 0 or 1), a correction or a comment"),
        ({"response_id": "{known}", "rating": 2}, 400, "rating"),
        ({"response_id": "{known}", "rating": "1"}, 400, "rating"),
        ({"response_id": "{known}", "rating": True}, 400, "rating"),
        ({"response_id": "{known}", "correction": "  "}, 400, "correction is blank"),
        ({"response_id": "{known}", "index": -1, "rating": 1}, 400, "index"),
        ({"rating": 1}, 400, "response_id"),
    ],
)
def test_bad_feedback_is_refused_with_what_to_send(recording, body, status, says) -> None:
    client, store, path = recording
    known = _chat(client, max_tokens=2)["id"]
    body = {k: known if v == "{known}" else v for k, v in body.items()}
    before = len(_stored(store, path)[1])
    reply = _send(client, **body)
    assert reply.status_code == status, reply.text
    assert says in reply.json()["error"]["message"]
    assert len(_stored(store, path)[1]) == before  # nothing half-written


def test_feedback_needs_the_api_key_and_is_counted_in_metrics(recording) -> None:
    client, store, _ = recording
    known = _chat(client, max_tokens=2)["id"]
    anonymous = httpx.post(
        str(client.base_url.join("/v1/feedback")), json={"response_id": known, "rating": 1}
    )
    assert anonymous.status_code == 401
    store.flush()
    metrics = client.get("/metrics").text
    values = {
        (sample.labels.get("kind"), sample.labels.get("outcome")): sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "seektune_feedback_records"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert values[("response", "stored")] >= 1
    assert 'endpoint="feedback"' in metrics


def test_feedback_on_a_server_that_does_not_record_is_a_404_with_the_setting(live_server) -> None:
    reply = httpx.post(
        f"{live_server.url}/v1/feedback",
        json={"response_id": "chatcmpl-x", "rating": 1},
        headers={"Authorization": f"Bearer {live_server.api_key}"},
    )
    assert reply.status_code == 404
    assert "serve.feedback.enabled: true" in reply.json()["error"]["message"]


def _record(store: FeedbackStore, response_id: str, text: str = "hi") -> bool:
    return store.record_response(
        ResponseRecord(
            response_id, "chat", "m", "m", None, [{"role": "user", "content": text}], [(text, "stop")]
        )
    )


def test_a_slow_disk_drops_records_instead_of_holding_up_requests(tmp_path, monkeypatch) -> None:
    outcomes: list[tuple[str, str]] = []
    store = FeedbackStore(
        tmp_path / "f.db", PrivacyConfig(), max_pending=2, on_outcome=lambda *o: outcomes.append(o)
    )
    gate = threading.Event()
    write = store._write
    monkeypatch.setattr(store, "_write", lambda records: (gate.wait(30), write(records)))
    started = time.perf_counter()
    accepted = [_record(store, f"r{i}") for i in range(50)]
    assert time.perf_counter() - started < 0.5  # 50 records against a stuck writer: no waiting
    assert accepted.count(False) >= 47 and outcomes.count(("response", "dropped")) == accepted.count(False)
    gate.set()
    store.close()
    responses, _ = read_store(tmp_path / "f.db")
    assert len(responses) == accepted.count(True)


def test_a_reopened_store_still_knows_its_response_ids(tmp_path) -> None:
    store = FeedbackStore(tmp_path / "f.db", PrivacyConfig(), max_pending=10)
    _record(store, "chatcmpl-old")
    store.close()
    again = FeedbackStore(tmp_path / "f.db", PrivacyConfig(), max_pending=10)
    assert again.choices_of("chatcmpl-old") == 1 and again.choices_of("chatcmpl-other") is None
    again.close()


def test_drop_keeps_the_ids_but_no_text_of_a_record_with_personal_data(tmp_path) -> None:
    store = FeedbackStore(tmp_path / "f.db", PrivacyConfig(action="drop"), max_pending=10)
    _record(store, "a", "mail me at a@b.example")
    _record(store, "b", "no personal data here")
    store.close()
    responses, _ = read_store(tmp_path / "f.db")
    assert [(r["id"], r["withheld"], r["prompt"], r["output"]) for r in responses] == [
        ("a", 1, None, ""),
        ("b", 0, [{"role": "user", "content": "no personal data here"}], "no personal data here"),
    ]


def test_a_store_path_that_is_not_a_feedback_store_is_refused_with_what_to_do(tmp_path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("hello")
    with pytest.raises(UserError, match="is not a SQLite file"):
        open_store(text, create=True)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(UserError, match=r"another program \(tables: invoices\)"):
        open_store(other, create=True)
    with pytest.raises(UserError, match="is a folder"):
        open_store(tmp_path, create=True)
    with pytest.raises(UserError, match="there is no feedback store"):
        open_store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
