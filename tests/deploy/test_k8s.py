"""deploy/k8s: manifests valid for Kubernetes (kubernetes-validate --strict, offline), the
GPU worker, API replicas behind a Service, the broker, probes, the ConfigMap, the
ServiceMonitors and the PrometheusRule generated from deploy/prometheus/rules.yml."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import load_config
from tests.deploy.conftest import DEPLOY, load_yaml, load_yaml_all, output_of

K8S = DEPLOY / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
API = ("StatefulSet", "linewatch-api")


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, name): object} over every manifest."""
    return {(o["kind"], o["metadata"]["name"]): o for p in MANIFESTS for o in load_yaml_all(p)}


def container(kind_name: tuple[str, str]) -> dict[str, Any]:
    (c,) = objects()[kind_name]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = c
    return result


def test_kubernetes_validate_strict(run_tool: Callable[..., Any]) -> None:
    proc = run_tool("kubernetes-validate", "--strict", *MANIFESTS, timeout=120)
    assert proc.returncode == 0, output_of(proc)
    # Only the Prometheus Operator's CRDs have no bundled schema (a warning, not an error).
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        if line.startswith("WARN"):
            assert "monitoring.coreos.com" in line, line


def test_kubernetes_validate_strict_rejects_unknown_fields(
    run_tool: Callable[..., Any], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {ports: [{port: 80}], selectr: {app: x}}\n", encoding="utf-8",
    )
    proc = run_tool("kubernetes-validate", "--strict", bad)
    assert proc.returncode != 0, output_of(proc)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)


def test_everything_lives_in_the_linewatch_namespace() -> None:
    for (kind, name), obj in objects().items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "linewatch", f"{kind}/{name}"


def test_worker_runs_on_a_gpu_node() -> None:
    worker = objects()[("Deployment", "linewatch-worker")]
    pod = worker["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    c = container(("Deployment", "linewatch-worker"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["command"] == ["linewatch", "worker", "--config", "/etc/linewatch/config.yaml"]
    assert worker["spec"]["strategy"]["type"] == "Recreate"  # a camera is read by one worker


def test_api_replicas_behind_a_service() -> None:
    objs = objects()
    api = objs[API]
    assert api["spec"]["replicas"] >= 2
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    service = objs[("Service", "linewatch-api")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    worker_labels = objs[("Deployment", "linewatch-worker")]["spec"]["template"]["metadata"][
        "labels"]
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    c = container(API)
    assert c["command"] == ["linewatch", "api", "--config", "/etc/linewatch/config.yaml"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_each_api_replica_keeps_its_broker_session(tmp_path: Path) -> None:
    """A StatefulSet's pods keep their names across restarts; each is its replica's MQTT
    client id, so the broker keeps a persistent session per replica (docs/mqtt.md)."""
    from service.bus.mqtt import MqttSettings

    api = objects()[API]
    assert api["spec"]["serviceName"] == "linewatch-api"
    env = {e["name"]: e for e in container(API)["env"]}
    ref = env["LINEWATCH_BUS__MQTT__CLIENT_ID"]["valueFrom"]["fieldRef"]
    assert ref["fieldPath"] == "metadata.name"
    path = tmp_path / "config.yaml"  # the ConfigMap's config, as the pod linewatch-api-0 reads it
    path.write_text(objects()[("ConfigMap", "linewatch-config")]["data"]["config.yaml"])
    config = load_config(path, env={"LINEWATCH_API__AUTH__TOKENS__0__TOKEN": "t",
                                    "LINEWATCH_BUS__MQTT__CLIENT_ID": "linewatch-api-0"},
                         check_files=False)
    settings = MqttSettings.from_config(config.bus, role="api")
    assert settings.persistent and settings.client_id == "linewatch-api-0"
    conf = objects()[("ConfigMap", "mosquitto-config")]["data"]["mosquitto.conf"]
    assert "persistent_client_expiration" in conf


@pytest.mark.parametrize("key", [("Deployment", "linewatch-worker"), API])
def test_probes_and_config_mount(key: tuple[str, str]) -> None:
    c = container(key)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["port"] in port_names
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/linewatch"
    pod = objects()[key]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "linewatch-config"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    token = {e["name"]: e for e in c["env"]}["LINEWATCH_API__AUTH__TOKENS__0__TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == "linewatch-auth"


def test_the_configmap_is_a_valid_linewatch_config(tmp_path: Path) -> None:
    text = objects()[("ConfigMap", "linewatch-config")]["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    env = {"LINEWATCH_API__AUTH__TOKENS__0__TOKEN": "secret-token"}
    if "mqtt" not in _supported_bus_schemes():
        env["LINEWATCH_BUS__URL"] = "memory://"  # until the MQTT bus lands (issue 6, item 6)
    config = load_config(path, env=env, check_files=False)
    assert config.api.host == "0.0.0.0" and config.api.auth.enabled
    assert "mqtt://mosquitto:1883" in text


def _supported_bus_schemes() -> set[str]:
    from service.config import BusConfig

    try:
        BusConfig(url="mqtt://mosquitto:1883")
    except ValueError:
        return {"memory"}
    return {"memory", "mqtt"}


def test_the_broker_service_matches_the_bus_url() -> None:
    objs = objects()
    service = objs[("Service", "mosquitto")]
    assert service["spec"]["ports"][0]["port"] == 1883
    broker = objs[("StatefulSet", "mosquitto")]
    assert service["spec"]["selector"].items() <= broker["spec"]["template"]["metadata"][
        "labels"].items()
    conf = objs[("ConfigMap", "mosquitto-config")]["data"]["mosquitto.conf"]
    assert "listener 1883" in conf


def test_the_broker_keeps_its_sessions_on_a_volume() -> None:
    """What the broker persists (tests/bus/test_mqtt.py restarts a real Mosquitto with this
    config) lands in the StatefulSet's claim, writable by the broker's group."""
    objs = objects()
    broker = objs[("StatefulSet", "mosquitto")]
    conf = objs[("ConfigMap", "mosquitto-config")]["data"]["mosquitto.conf"]
    settings = {line.split()[0]: line.split()[1:] for line in conf.splitlines()
                if line.strip() and not line.lstrip().startswith("#")}
    assert settings["persistence"] == ["true"]
    (location,) = settings["persistence_location"]
    (c,) = broker["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["data"]["mountPath"].rstrip("/") == location.rstrip("/")
    assert not mounts["data"].get("readOnly", False)
    (claim,) = broker["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    pod = broker["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_service_monitors_select_services_by_port_name() -> None:
    objs = objects()
    monitors = [o for (k, _), o in objs.items() if k == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"linewatch-worker", "linewatch-api"}
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [o for (k, _), o in objs.items()
                    if k == "Service" and selector.items() <= o["metadata"]["labels"].items()]
        assert len(services) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        # the rules match job=~"linewatch.*"; the operator's job label is the Service name
        assert services[0]["metadata"]["name"].startswith("linewatch")
    worker = objs[("ServiceMonitor", "linewatch-worker")]["spec"]["endpoints"][0]
    assert {"targetLabel": "expect_gpu", "replacement": "true", "action": "replace"} in worker[
        "relabelings"]


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    spec = importlib.util.spec_from_file_location("render", K8S / "render_prometheusrule.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert (K8S / "prometheusrule.yaml").read_text(encoding="utf-8") == render.render(), (
        "deploy/k8s/prometheusrule.yaml is stale: run python deploy/k8s/render_prometheusrule.py"
    )
    rule = objects()[("PrometheusRule", "linewatch")]
    assert rule["spec"]["groups"] == load_yaml(DEPLOY / "prometheus" / "rules.yml")["groups"]
