"""docker-compose.yml: valid for docker-compose, GPU and CPU variants of LineWatch, and the
monitoring stack wired to the files in deploy/."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import load_config
from tests.deploy.conftest import REPO, load_yaml, output_of

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(extra)
    return env


def test_docker_compose_config_accepts_the_file(run_tool: Callable[..., Any]) -> None:
    for profile in ("gpu", "cpu"):
        proc = run_tool("docker-compose", "-f", COMPOSE, "--profile", profile, "config", "-q",
                        env=_env(LINEWATCH_TOKEN="test-token"))
        assert proc.returncode == 0, output_of(proc)


def test_compose_refuses_to_run_without_an_api_token(run_tool: Callable[..., Any]) -> None:
    proc = run_tool("docker-compose", "-f", COMPOSE, "config", "-q", env=_env())
    assert proc.returncode != 0
    assert "LINEWATCH_TOKEN" in proc.stderr


def test_linewatch_reserves_a_gpu_and_the_cpu_profile_does_not(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu, cpu = services["linewatch"], services["linewatch-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu
    assert cpu["environment"]["LINEWATCH_MODELS__0__PROVIDERS"] == "[cpu]"
    for service in (gpu, cpu):
        assert service["build"]["context"] == "."
        assert "8000" in service["ports"][0]
        assert "LINEWATCH_API__AUTH__TOKENS__0__TOKEN" in service["environment"]


def test_the_cpu_profile_override_is_a_valid_config_for_the_image() -> None:
    env = {"LINEWATCH_API__AUTH__TOKENS__0__TOKEN": "t", "LINEWATCH_MODELS__0__PROVIDERS": "[cpu]"}
    config = load_config(REPO / "deploy" / "docker" / "config.yaml", env=env, check_files=False)
    assert config.models[0].providers == ["cpu"]


def test_every_bind_mount_exists_in_the_repo(compose: dict[str, Any]) -> None:
    mounted = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
                mounted += 1
    assert mounted >= 5


def test_the_monitoring_stack_is_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"mosquitto", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert ("./deploy/mosquitto/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"
            in services["mosquitto"]["volumes"])
    assert ("./deploy/alertmanager:/etc/alertmanager:ro" in services["alertmanager"]["volumes"])
    prometheus = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    (am,) = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am.split(":")[0] in services
    datasource = load_yaml(REPO / "deploy/grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_mosquitto_config_has_a_listener_and_no_unknown_lines() -> None:
    known = {"listener", "allow_anonymous", "persistence", "persistence_location", "log_dest",
             "log_type", "max_queued_messages", "password_file", "autosave_interval"}
    lines = [line.split() for line in (REPO / "deploy/mosquitto/mosquitto.conf").read_text()
             .splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert {words[0] for words in lines} <= known
    assert ["listener", "1883", "0.0.0.0"] in lines


@pytest.mark.parametrize("image_key", ["prometheus", "alertmanager", "grafana", "mosquitto"])
def test_third_party_images_are_pinned(compose: dict[str, Any], image_key: str) -> None:
    image = compose["services"][image_key]["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", image
    assert any(ch.isdigit() for ch in tag)


def test_compose_file_paths_are_relative(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert not Path(volume.split(":")[0]).is_absolute(), volume
