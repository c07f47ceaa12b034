"""Routing of the `model` field: base, adapters, A/B splits by share, sticky per user, per-version metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seektune.config import ABSplitConfig
from seektune.errors import UserError
from seektune.serve.errors import APIError
from seektune.serve.routing import Route, Router, sticky_point, validate_routes

SPLIT = ABSplitConfig(name="public", versions={"stable": 9, "candidate": 1})  # normalised to 0.9 / 0.1


def _router(seed: int = 0, splits=(SPLIT,)) -> Router:
    return Router("stable", lambda: ["candidate", "other"], list(splits), seed=seed)


def test_base_and_adapters_route_to_themselves() -> None:
    router = _router()
    assert router.resolve("stable") == Route("stable", "stable", None)
    assert router.resolve("candidate") == Route("candidate", "candidate", "candidate")
    assert router.served_names() == ["stable", "candidate", "other", "public"]


def test_unknown_model_is_a_404_naming_the_served_ones() -> None:
    with pytest.raises(APIError) as missing:
        _router().resolve("gpt-4o")
    assert missing.value.status == 404 and missing.value.code == "model_not_found"
    assert "stable, candidate, other, public" in missing.value.message


@pytest.mark.parametrize("with_user", [True, False])
def test_shares_are_respected_over_a_thousand_requests(with_user: bool) -> None:
    router = _router(seed=1)
    versions = [router.resolve("public", f"user-{i}" if with_user else None).version for i in range(1000)]
    candidate = versions.count("candidate")
    # binomial(1000, 0.1): mean 100, sd 9.5; 4 sd either side
    assert 62 <= candidate <= 138, candidate
    assert versions.count("stable") == 1000 - candidate
    routes = {router.resolve("public", "u").adapter for _ in range(3)}
    assert routes <= {None, "candidate"}


def test_a_user_keeps_their_version() -> None:
    router = _router()
    for user in (f"user-{i}" for i in range(50)):
        assert len({router.resolve("public", user).version for _ in range(20)}) == 1
    # the same users on a fresh router (another replica, a restart) get the same versions
    again = _router(seed=99)
    assert [again.resolve("public", f"user-{i}").version for i in range(50)] == [
        router.resolve("public", f"user-{i}").version for i in range(50)
    ]


def test_sticky_points_are_uniform_and_differ_between_splits() -> None:
    points = [sticky_point("a", f"u{i}") for i in range(2000)]
    assert all(0 <= p < 1 for p in points)
    assert 0.45 < sum(points) / len(points) < 0.55
    assert sticky_point("a", "u1") != sticky_point("b", "u1")


def test_without_user_the_seed_decides() -> None:
    def sequence(seed: int) -> list[str]:
        router = _router(seed=seed)
        return [router.resolve("public").version for _ in range(200)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_a_zero_share_never_routes_there() -> None:
    split = ABSplitConfig(name="public", versions={"stable": 1.0, "candidate": 0.0})
    router = _router(splits=[split])
    assert {router.resolve("public", f"u{i}").version for i in range(300)} == {"stable"}


def test_splits_are_validated_at_start() -> None:
    with pytest.raises(UserError, match="not served"):
        validate_routes(
            "stable", ["candidate"], [ABSplitConfig(name="p", versions={"stable": 1, "ghost": 1})]
        )
    with pytest.raises(UserError, match="already a served model"):
        validate_routes(
            "stable", ["candidate"], [ABSplitConfig(name="candidate", versions={"stable": 1, "candidate": 1})]
        )
    with pytest.raises(UserError, match="already a served model"):
        two = [ABSplitConfig(name="p", versions={"stable": 1, "candidate": 1})] * 2
        validate_routes("stable", ["candidate"], two)
    with pytest.raises(UserError, match="twice"):
        validate_routes("stable", ["stable"], [])
    with pytest.raises(UserError, match="not served"):
        Router("stable", lambda: [], [SPLIT])


def _requests_by_version(url: str, model: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "seektune_requests"]
    out: dict[str, float] = {}
    for sample in family.samples:
        if (
            sample.name.endswith("_total")
            and sample.labels["model"] == model
            and sample.labels["status"] == "200"
        ):
            out[sample.labels["version"]] = out.get(sample.labels["version"], 0) + sample.value
    return out


def test_the_live_split_labels_metrics_per_version(live_server) -> None:
    router = live_server.state.router
    users = {}
    for i in range(200):  # one user sticky to each version
        version = router.resolve(live_server.ab_name, f"user-{i}").version
        users.setdefault(version, f"user-{i}")
    assert set(users) == {live_server.base_name, live_server.adapter_name}
    before = _requests_by_version(live_server.url, live_server.ab_name)
    client = live_server.client()
    for version, user in users.items():
        for _ in range(2):
            raw = client.completions.with_raw_response.create(
                model=live_server.ab_name, prompt="The cat", max_tokens=3, temperature=0, user=user
            )
            assert raw.headers["x-seektune-version"] == version
            assert raw.parse().model == live_server.ab_name  # the client sees the name it asked for
    after = _requests_by_version(live_server.url, live_server.ab_name)
    for version in users:
        assert after.get(version, 0) - before.get(version, 0) == 2
