"""Dockerfile and .dockerignore: hadolint-clean, multi-stage on a CUDA 13 runtime, no torch,
non-root, the model and config inside, a health check on /healthz. No Docker engine runs
on the test machines, so the image is checked statically; tests/deploy/test_alerts_live.py
runs the HEALTHCHECK command against a real server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from service.config import load_config
from tests.deploy.conftest import REPO, output_of

DOCKERFILE = REPO / "Dockerfile"
CONTAINER_CONFIG = REPO / "deploy" / "docker" / "config.yaml"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def healthcheck_command() -> list[str]:
    (args,) = [a for i, a in stages()[-1] if i == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return command


def test_hadolint_passes(run_tool: Callable[..., Any]) -> None:
    proc = run_tool("hadolint", "--failure-threshold", "warning", DOCKERFILE)
    assert proc.returncode == 0, output_of(proc)


def test_hadolint_catches_problems(run_tool: Callable[..., Any], tmp_path: Any) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n", encoding="utf-8")
    proc = run_tool("hadolint", "--failure-threshold", "warning", bad)
    assert proc.returncode == 1 and "DL3007" in proc.stdout


def test_multi_stage_on_a_cuda_13_runtime_image() -> None:
    args = dict(
        a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a
    )
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    froms = [a for i, a in instructions() if i == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("${CUDA_IMAGE}") for f in froms)
    assert any(i == "COPY" and a.startswith("--from=build /opt/venv") for i, a in stages()[-1])


def test_no_torch_no_train_extra_no_compilers() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    extras = re.findall(r"\.\[([^\]]*)\]", runs)
    assert extras == ["openvino"], extras  # the runtime's optional OpenVINO only
    assert 'pip install ".[openvino]"' in runs
    assert not re.search(r"\b(build-essential|gcc|g\+\+|clang|python3-dev)\b", runs)
    assert "-devel" not in text
    assert 'import torch' in runs  # the build fails if torch crept in


def test_onnxruntime_gpu_is_pinned_to_a_cuda_13_build_and_checked() -> None:
    """onnxruntime-gpu 1.31.1 is the PyPI release whose wheel declares CUDA 13 / cuDNN 9
    (checked with `pip install --dry-run --report` on its metadata); the build itself
    asserts that the CUDA execution provider is in the installed package."""
    (build,) = [s for s in stages() if "AS build" in s[0][1]]
    args = dict(a.split("=", 1) for i, a in build if i == "ARG" and "=" in a)
    version = tuple(int(x) for x in args["ONNXRUNTIME_GPU_VERSION"].split("."))
    assert len(version) == 3 and version >= (1, 31, 1)
    runs = " ".join(a for i, a in build if i == "RUN")
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in runs
    assert "'CUDAExecutionProvider' in ort.get_available_providers()" in runs


def test_runs_as_a_non_root_user() -> None:
    users = [a for i, a in stages()[-1] if i == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000


def test_exposes_8000_and_serves_the_container_config() -> None:
    final = stages()[-1]
    assert ("EXPOSE", "8000") in final
    entry = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    assert entry + cmd == ["linewatch", "serve", "--config", "/etc/linewatch/config.yaml"]
    copies = [a for i, a in final if i == "COPY"]
    assert "deploy/docker/config.yaml /etc/linewatch/config.yaml" in copies
    model_copy = [c for c in copies if c.startswith("models/zoo/")]
    assert model_copy and model_copy[0].endswith("/opt/linewatch/models/zoo/linewatch-parts-s.onnx")


def test_healthcheck_probes_healthz() -> None:
    command = healthcheck_command()
    assert command[0] == "python3" and "/healthz" in command[-1]


def test_container_config_listens_everywhere_with_auth_and_the_shipped_model() -> None:
    env = {"LINEWATCH_API__AUTH__TOKENS__0__TOKEN": "secret-token"}
    config = load_config(CONTAINER_CONFIG, env=env, check_files=False)
    assert config.api.host == "0.0.0.0" and config.api.port == 8000
    assert config.api.auth.enabled
    assert str(config.models[0].path) == "/opt/linewatch/models/zoo/linewatch-parts-s.onnx"
    assert str(config.store.url).startswith("sqlite:////var/lib/linewatch/")
    env_lines = " ".join(a for i, a in stages()[-1] if i == "ENV")
    assert "LINEWATCH_API__AUTH__ENABLED=true" in env_lines


def test_container_config_refuses_to_start_without_a_token() -> None:
    from service.errors import ConfigError

    with pytest.raises(ConfigError, match="no tokens"):
        load_config(CONTAINER_CONFIG, env={}, check_files=False)


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out, then only what the image needs back in
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "service", "models", "deploy/docker/config.yaml"} <= allowed
    assert not any(a.startswith((".venv", "runs", "tests")) for a in allowed)
    copied = {a.split()[0] for i, a in instructions() if i == "COPY" and "--from" not in a}
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
