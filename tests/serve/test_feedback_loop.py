"""The feedback loop end to end on the reduced offline base: serve a registered version with recording on,
users chat and send ratings and corrections, `seektune data from-feedback` turns them into preference
pairs, DPO trains the next version from the production one and registers it, and an A/B split serves the
two versions, whose answers the store tells apart."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from seektune.cli import main
from seektune.config import validate_config
from seektune.pipeline import run_train_stage
from seektune.registry.catalog import lineage, promote_version, record_evaluation
from seektune.registry.store import open_store
from seektune.serve.server import build_app
from support import tiny_run_config

QUESTIONS = [f"When does the shop in district {i} open?" for i in range(24)]
CORRECTION = "The shop opens at 9 every day. Questions: help@shop.example."


def _chat(client: httpx.Client, model: str, question: str, user: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,  # a non-empty answer, so every correction makes a pair
        "user": user,
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply


def _from_feedback(store: Path, out: Path, *more: str) -> dict:
    assert main(["data", "from-feedback", "--store", str(store), "--out", str(out), *more]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_serve_feedback_dataset_dpo_register_and_ab_in_one_loop(tmp_path, base_cache, serve_app) -> None:
    url = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    store = tmp_path / "feedback.db"
    shop = tmp_path / "shop.jsonl"
    shop.write_text(
        "".join(json.dumps({"question": q, "answer": "At noon."}) + "\n" for q in QUESTIONS), encoding="utf-8"
    )
    registry = {"enabled": True, "url": url, "model_name": "shop"}
    first = tiny_run_config(
        tmp_path, base_cache, name="shop", data={"sources": [{"path": str(shop)}]}, registry=registry
    )
    run_train_stage(validate_config(first))
    record_evaluation(
        open_store(url), "shop@1.0.0", {"perplexity": 12.0}, None, None
    )  # the gate to production
    promote_version(open_store(url), "shop@1.0.0", "production")

    # 1. serve production with recording on; users chat and send feedback
    serving = tiny_run_config(
        tmp_path,
        base_cache,
        registry={"url": url},
        serve={"feedback": {"enabled": True, "store": str(store)}},
    )
    app = build_app(validate_config(serving), "registry:shop@production", {})
    with serve_app(app) as running, httpx.Client(base_url=running.url, timeout=120) as client:
        for i, question in enumerate(QUESTIONS):
            answer = _chat(client, "shop", question, f"user{i}").json()
            verdict = {"rating": -1, "correction": CORRECTION} if i % 2 == 0 else {"rating": 1}
            sent = client.post("/v1/feedback", json={"response_id": answer["id"], **verdict})
            assert sent.status_code == 201, sent.text
        unknown = client.post("/v1/feedback", json={"response_id": "chatcmpl-unknown", "rating": 1})
        assert unknown.status_code == 404 and "chatcmpl-unknown" in unknown.json()["error"]["message"]
    # the server's shutdown wrote everything queued

    # 2. the store as datasets
    report = _from_feedback(store, tmp_path / "round1")
    assert (report["responses"], report["with_feedback"], report["preference_pairs"]) == (24, 24, 12)
    assert report["by_version"]["shop"]["like_rate"] == 0.5
    pairs = [json.loads(line) for line in (tmp_path / "round1" / "preference.jsonl").read_text().splitlines()]
    assert {p["chosen"][0]["content"] for p in pairs} == {
        "The shop opens at 9 every day. Questions: <EMAIL>."
    }

    # 3. DPO from the production version on those pairs, registered as the next version
    dpo = tiny_run_config(
        tmp_path,
        base_cache,
        name="shop-dpo",
        model={"name_or_path": "registry:shop@production"},
        data={"sources": [{"path": str(tmp_path / "round1" / "preference.jsonl")}], "validation_ratio": 0.0},
        train={"objective": "dpo", "max_steps": 4, "batch_size": 4, "learning_rate": 5e-3},
        registry=registry,
    )
    run_train_stage(validate_config(dpo))
    tree = lineage(open_store(url), "shop@1.1.0")["trees"][0]
    assert [v["version"] for v in tree["ancestors"]] == ["1.0.0"]

    # 4. an A/B split of production and the new version; the store tells their answers apart
    serve = {
        "feedback": {"enabled": True, "store": str(store)},
        "ab": [
            {"name": "shop-ab", "versions": {"registry:shop@production": 0.5, "registry:shop@1.1.0": 0.5}}
        ],
    }
    split = tiny_run_config(tmp_path, base_cache, registry={"url": url}, serve=serve)
    app = build_app(validate_config(split), "registry:shop@production", {})
    answered: set[str] = set()
    with serve_app(app) as running, httpx.Client(base_url=running.url, timeout=120) as client:
        for i, question in enumerate(QUESTIONS):
            reply = _chat(client, "shop-ab", question, f"ab-user{i}")
            answered.add(reply.headers["x-seektune-version"])
            sent = client.post(
                "/v1/feedback", json={"response_id": reply.json()["id"], "rating": 1 - 2 * (i % 3 == 0)}
            )
            assert sent.status_code == 201
    assert answered == {"shop", "shop@1.1.0"}
    report = _from_feedback(store, tmp_path / "round2", "--model", "shop-ab")
    assert set(report["by_version"]) == {"shop", "shop@1.1.0"}
    assert sum(t["responses"] for t in report["by_version"].values()) == 24
