"""deploy/: the Dockerfile and the Kubernetes manifests agree with each other and with the server.

No Docker daemon or cluster here: the Dockerfile is parsed line by line, the manifests with PyYAML, and
what they name (probe paths, the metric the HPA scales on, the config they mount) is checked against the
app and the config classes themselves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from seektune.config import SeektuneConfig, ServeConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined and comments dropped (last one wins)."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    found: dict[str, list[str]] = {}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        found.setdefault(instruction.upper(), []).append(rest.strip())
    return found


def exec_form(text: str) -> list[str]:
    """A JSON-array (exec form) argument, e.g. ENTRYPOINT ["a", "b"]."""
    value = json.loads(text)
    assert isinstance(value, list), text
    return value


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one manifest of that kind under deploy/k8s (ConfigMaps by name)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = doc["kind"] if doc["kind"] != "ConfigMap" else f"ConfigMap/{doc['metadata']['name']}"
            assert key not in found, f"two {key} manifests"
            found[key] = doc
    return found


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return manifests()


@pytest.fixture(scope="module")
def container(k8s) -> dict[str, Any]:
    (only,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


@pytest.fixture(scope="module")
def app_client():
    """The real app on a stand-in engine (no model): enough for its routes and /metrics."""
    from fastapi.testclient import TestClient

    from seektune.serve.app import ServedModels, create_app
    from seektune.serve.engine import EngineStats

    stats = EngineStats(
        queue_depth=3, running=2, kv_tokens=10, kv_reserved=20, kv_capacity=100, steps=5,
        generated_tokens=7, alive=True, draining=False,
    )  # fmt: skip
    engine = SimpleNamespace(stats=stats, model=SimpleNamespace(config=None), vocab_size=32, on_step=None)
    tokenizer = SimpleNamespace(__len__=lambda self: 32)
    app = create_app(engine, tokenizer, ServeConfig(), ServedModels("tiny"), manage_engine=False)
    return TestClient(app)


def test_dockerfile_exposes_the_manifests_port_and_runs_seektune_serve(k8s, container):
    docker = dockerfile()
    (exposed,) = docker["EXPOSE"]
    (port,) = container["ports"]
    assert int(exposed) == port["containerPort"] == 8000
    (service_port,) = k8s["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert exec_form(docker["ENTRYPOINT"][-1]) == ["seektune", "serve"]
    cmd = exec_form(docker["CMD"][-1])
    assert cmd[cmd.index("--port") + 1] == exposed
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_dockerfile_installs_pinned_torch_first_and_runs_as_non_root():
    docker = dockerfile()
    runs = docker["RUN"]
    torch_run = next(i for i, run in enumerate(runs) if "$TORCH_SPEC" in run)
    seektune_run = next(i for i, run in enumerate(runs) if "pip install ." in run)
    assert torch_run < seektune_run  # as scripts/setup.sh: torch before seektune's requirements
    assert any(arg.startswith("TORCH_SPEC=torch==") for arg in docker["ARG"])
    assert any(arg.startswith("BASE_IMAGE=") for arg in docker["ARG"])  # the CUDA base is a build arg
    (user,) = docker["USER"]
    assert not user.startswith(("root", "0"))


def test_dockerfile_healthcheck_probes_a_route_the_app_answers(app_client):
    (healthcheck,) = dockerfile()["HEALTHCHECK"]
    command = healthcheck.partition("CMD ")[2]
    argv = exec_form(command)
    (path,) = re.findall(r"http://[^/'\"]+(/[\w/-]*)", argv[-1])
    assert path == "/health"
    assert app_client.get(path).status_code == 200


def test_probes_are_ready_and_health_and_the_app_answers_them(container, app_client):
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in (container["ports"][0]["name"], container["ports"][0]["containerPort"])
        assert app_client.get(container[probe]["httpGet"]["path"]).status_code == 200


def test_service_selects_the_deployments_pods(k8s):
    deployment = k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = k8s["Service"]["spec"]["selector"]
    assert selector and all(labels.get(key) == value for key, value in selector.items())
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_the_deployment_on_a_metric_the_server_exports(k8s, app_client):
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["Deployment"]["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in ("seektune_queue_depth", "seektune_running_sequences")
    from seektune.serve import metrics

    assert name in metrics.__doc__  # the module's list of metric names
    scraped = app_client.get("/metrics").text
    assert f"\n{name} 3.0" in scraped or f"\n{name} 2.0" in scraped  # the stand-in engine's figures


def test_prometheus_adapter_rule_exposes_the_hpa_metric(k8s):
    adapter = k8s["ConfigMap/adapter-config"]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    name = k8s["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per-pod, as a Pods metric needs
    assert "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_grace_period_outlasts_the_servers_shutdown_timeout(k8s, container):
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    config = SeektuneConfig.model_validate(
        yaml.safe_load(k8s["ConfigMap/seektune-config"]["data"]["config.yaml"])
    )
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep_s = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > ServeConfig().shutdown_timeout_s  # the default (30)
    assert grace > sleep_s + config.serve.shutdown_timeout_s + 10  # with room to exit


def test_binds_everywhere_with_a_key_from_a_secret(container, k8s):
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--config") + 1].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    )
    (key,) = [env for env in container["env"] if env["name"] == "SEEKTUNE_API_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
    config = yaml.safe_load(k8s["ConfigMap/seektune-config"]["data"]["config.yaml"])
    assert "api_keys" not in config.get("serve", {})  # keys never sit in a ConfigMap


def test_cli_reads_the_key_from_the_variable_the_deployment_sets(monkeypatch, tmp_path, container):
    """SEEKTUNE_API_KEY reaches serve.api_keys: binding 0.0.0.0 then passes the server's key check."""
    from seektune import cli
    from seektune.serve import server

    seen = {}

    def fake_run_server(cfg, model_or_run, adapters):
        server.check_bind(cfg.serve)
        seen["keys"] = cfg.serve.api_keys

    monkeypatch.setattr(server, "run_server", fake_run_server)
    monkeypatch.setenv("SEEKTUNE_API_KEY", "k-one k-two")
    config = tmp_path / "config.yaml"
    config.write_text("serve:\n  port: 8000\n")
    assert cli.main(["serve", str(tmp_path), "--config", str(config), "--host", "0.0.0.0"]) == 0
    assert seen["keys"] == ["k-one", "k-two"]
