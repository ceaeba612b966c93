"""A real Prometheus on loopback scrapes a real `linewatch serve` with the shipped alert
rules, and sees LineWatchCameraDown fire when the camera's video file is deleted (and
resolve when the file is back).

LineWatch runs one file camera (a copy of a clip from ../shared/data/videos, looped)
and the shipped model (or, while models/zoo has none, a tiny end2end ONNX model built
here). Prometheus scrapes it twice: as job `linewatch` (expect_gpu="false") and as job
`linewatch-expect-gpu` (expect_gpu="true"), so LineWatchInferenceOnCpu must fire for the
second job only. The rules are a test copy with every `for:` shortened to 2s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, REPO, SHARED_DATA, find_tool, load_yaml
from tests.deploy.test_dockerfile import healthcheck_command
from tests.deploy.test_grafana import DASHBOARDS, dashboard_exprs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLIP = SHARED_DATA / "videos" / "intel_bolt-multi-size-detection_preview_h264.mp4"
SHIPPED_MODEL = REPO / "models" / "zoo" / "linewatch-parts-s.onnx"
T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float, what: str,
               log: Path | None = None) -> T:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def build_tiny_model(path: Path) -> Path:
    """End2end pose model: uint8 [B,240,320,3] -> detections [B,N,6+5*3]."""
    import numpy as np

    from tests.inference.onnx_factory import build_model, make_row

    names = {0: "bracket", 1: "flange", 2: "arm", 3: "hand"}
    rows = np.stack([make_row((40.0, 30.0, 120.0, 90.0), 0.9, 0,
                              np.array([[50, 40], [110, 40], [110, 80], [60, 60], [100, 60]]))])
    return build_model(path, rows, metadata={"names": repr(names)})


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class Stack:
    camera_file: Path  # cam-1's video file (a copy the tests may delete)
    linewatch_port: int
    linewatch_log: Path
    prometheus: str  # base URL
    prometheus_log: Path

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        data: dict[str, Any] = json.loads(body) if body else {"status": f"http {status}"}
        return data

    def alerts(self) -> list[dict[str, Any]]:
        status, body = http_get(f"{self.prometheus}/api/v1/alerts")
        if status != 200:
            return []
        alerts: list[dict[str, Any]] = json.loads(body)["data"]["alerts"]
        return alerts

    def firing(self, name: str, **labels: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"]["alertname"] == name
                and a["state"] == "firing"
                and all(a["labels"].get(k) == v for k, v in labels.items())]


def _test_rules(tmp: Path) -> Path:
    rules = load_yaml(DEPLOY / "prometheus" / "rules.yml")
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = find_tool("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (install Debian package 'prometheus')")
    if not CLIP.is_file():
        pytest.skip(f"test clip {CLIP} is absent (../shared/data is not beside the checkout)")
    tmp = tmp_path_factory.mktemp("alerts-live")
    model = SHIPPED_MODEL if SHIPPED_MODEL.is_file() else build_tiny_model(tmp / "tiny.onnx")
    procs: list[subprocess.Popen[Any]] = []
    camera_file = Path(shutil.copy(CLIP, tmp / "cam-1.mp4"))
    config = {
        "cameras": [{"id": "cam-1", "source": str(camera_file), "line": "line-1", "fps": 10,
                     "backoff": {"initial_s": 0.2, "max_s": 1.0}}],
        "models": [{"id": "parts", "path": str(model), "providers": ["cpu"],
                    "intra_op_threads": 1, "inter_op_threads": 1, "warmup_runs": 1}],
        "api": {"host": "127.0.0.1", "port": 0},
        "store": {"url": f"sqlite:///{tmp / 'linewatch.db'}"},
    }
    (tmp / "linewatch.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    lw_log = tmp / "linewatch.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    try:
        with lw_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--config",
                 str(tmp / "linewatch.yaml")],
                cwd=tmp, env={**env, "PYTHONPATH": str(REPO)}, stdout=out,
                stderr=subprocess.STDOUT,
            ))
        serving = re.compile(rb"serving on http://127\.0\.0\.1:(\d+)")

        def bound_port() -> int | None:
            if procs[0].poll() is not None:
                pytest.fail(f"linewatch serve exited {procs[0].returncode}:\n"
                            + lw_log.read_text(errors="replace")[-3000:])
            m = serving.search(lw_log.read_bytes())
            return int(m.group(1)) if m else None

        port = wait_until(bound_port, 60, "linewatch serve to listen", lw_log)
        target = f"127.0.0.1:{port}"
        wait_until(lambda: http_get(f"http://{target}/readyz")[0] == 200, 60,
                   "linewatch /readyz", lw_log)

        prom_port = free_port()
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(_test_rules(tmp))],
            "scrape_configs": [
                {"job_name": "linewatch", "static_configs": [
                    {"targets": [target], "labels": {"expect_gpu": "false"}}]},
                {"job_name": "linewatch-expect-gpu", "static_configs": [
                    {"targets": [target], "labels": {"expect_gpu": "true"}}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config), encoding="utf-8")
        prom_log = tmp / "prometheus.log"
        (tmp / "tsdb").mkdir()
        with prom_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
            ))
        base = f"http://127.0.0.1:{prom_port}"
        wait_until(lambda: http_get(f"{base}/-/ready")[0] == 200, 60, "prometheus ready",
                   prom_log)
        yield Stack(camera_file, port, lw_log, base, prom_log)
    finally:
        for proc in reversed(procs):
            stop(proc)


def _camera_up(stack: Stack) -> float | None:
    result = stack.query('linewatch_camera_up{job="linewatch", camera="cam-1"}')
    samples = result.get("data", {}).get("result", [])
    return float(samples[0]["value"][1]) if samples else None


def _has_data(stack: Stack, expr: str) -> bool:
    return bool(stack.query(expr)["data"]["result"])


def test_dashboard_queries_run_on_real_data(stack: Stack) -> None:
    """Every dashboard query is valid PromQL for a real Prometheus; camera and inference
    panels have data from the running LineWatch."""
    wait_until(lambda: _camera_up(stack) == 1.0, 60, "a scrape with cam-1 up",
               stack.prometheus_log)
    exprs = [e for d in DASHBOARDS for e in dashboard_exprs(json.loads(d.read_text()))]
    substituted = [re.sub(r"\$__rate_interval", "10s", re.sub(r"\$(line|camera)", ".*", e))
                   for e in exprs]
    for expr in substituted:
        result = stack.query(expr)
        assert result["status"] == "success", (expr, result)
    expect_data = [e for e in substituted if re.search(
        r"linewatch_(camera_fps|camera_up|capture_to_publish|inference_provider)", e)]
    assert len(expect_data) >= 4
    for expr in expect_data:
        wait_until(partial(_has_data, stack, expr), 30, f"data for {expr}",
                   stack.prometheus_log)


def test_dockerfile_healthcheck_passes_against_a_real_server(stack: Stack) -> None:
    command = [sys.executable if c == "python3" else c for c in healthcheck_command()]
    ok = subprocess.run(command, env={**os.environ,
                                      "LINEWATCH_API__PORT": str(stack.linewatch_port)},
                        capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    closed = subprocess.run(command, env={**os.environ, "LINEWATCH_API__PORT": str(free_port())},
                            capture_output=True, timeout=30, check=False)
    assert closed.returncode != 0


def test_inference_on_cpu_fires_only_where_a_gpu_is_expected(stack: Stack) -> None:
    wait_until(lambda: stack.firing("LineWatchInferenceOnCpu", job="linewatch-expect-gpu"),
               60, "LineWatchInferenceOnCpu for the GPU job", stack.prometheus_log)
    assert stack.firing("LineWatchInferenceOnCpu", job="linewatch") == []


def _camera(stack: Stack) -> dict[str, Any]:
    status, body = http_get(f"http://127.0.0.1:{stack.linewatch_port}/api/v1/cameras/cam-1")
    assert status == 200, body
    camera: dict[str, Any] = json.loads(body)
    return camera


def test_camera_down_alert_fires_when_the_file_is_deleted_and_resolves_when_it_is_back(
    stack: Stack,
) -> None:
    wait_until(lambda: _camera_up(stack) == 1.0, 60, "a scrape with cam-1 up",
               stack.prometheus_log)
    assert stack.firing("LineWatchCameraDown") == []
    stack.camera_file.unlink()  # LineWatch has it open: only the path is gone
    wait_until(lambda: _camera(stack)["state"] != "up", 10, "cam-1 to go down",
               stack.linewatch_log)
    assert re.search(r"camera cam-1 .* down: video file .*cam-1\.mp4 was removed while playing",
                     stack.linewatch_log.read_text(errors="replace"))
    alerts = wait_until(lambda: stack.firing("LineWatchCameraDown", job="linewatch",
                                             camera="cam-1"),
                        90, "LineWatchCameraDown to fire", stack.linewatch_log)
    (alert,) = alerts
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "Camera cam-1 is down"
    assert alert["annotations"]["runbook_url"] == "docs/operations.md#linewatchcameradown"
    assert stack.firing("LineWatchTargetDown") == []  # the process itself is fine
    assert "does not exist" in _camera(stack)["reason"]  # it keeps retrying
    status, body = http_get(f"http://127.0.0.1:{stack.linewatch_port}/healthz")
    assert status == 200, body

    shutil.copy(CLIP, stack.camera_file)
    wait_until(lambda: _camera_up(stack) == 1.0, 60, "a scrape with cam-1 up again",
               stack.linewatch_log)
    wait_until(lambda: not stack.firing("LineWatchCameraDown"), 30,
               "LineWatchCameraDown to resolve", stack.prometheus_log)
