"""Several machines over MQTT: two ``linewatch worker`` processes, one ``linewatch api``, a
real Mosquitto on loopback.  Kill one worker: the API keeps serving and shows its camera
down (the worker's last will); the other camera keeps streaming."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import connect

from tests.api.conftest import _rows
from tests.bus.test_mqtt import MOSQUITTO, Listener, Mosquitto
from tests.e2e.conftest import SHIPPED_MODEL, LineWatchProcess
from tests.inference.onnx_factory import build_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MOSQUITTO is None,
        reason="mosquitto is not installed (Debian: apt-get install mosquitto); this test "
        "needs a real broker on loopback",
    ),
]

STATES = {"RUNNING", "IDLE", "STOPPED", "JAMMED", "FAULT", "UNKNOWN"}
LWT_BOUND_S = 5.0  # the broker sends a dead client's will as soon as its socket closes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any], str], LineWatchProcess]]:
    started: list[LineWatchProcess] = []

    def start(command: str, config: dict[str, Any], name: str) -> LineWatchProcess:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        started.append(LineWatchProcess(command, path, tmp_path, name=name))
        return started[-1]

    yield start
    for p in started:
        p.cleanup()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    if SHIPPED_MODEL.is_file():
        return SHIPPED_MODEL
    return build_model(tmp_path / "stand-in.onnx", _rows(2))


def worker_config(broker: Mosquitto, model: Path, worker: str, camera: str, line: str,
                  seed: int) -> dict[str, Any]:
    return {
        "cameras": [{"id": camera, "line": line,
                     "source": f"sim://conveyor?seed={seed}&fps=10&width=320&height=240"}],
        "models": [{"id": "parts", "path": str(model), "warmup_runs": 1,
                    "intra_op_threads": 1}],
        "lines": [{"id": line, "cameras": [camera], "rules": [
            {"type": "stale_camera", "name": "camera-fresh", "max_age_s": 2.0}]}],
        "bus": {"url": broker.url, "mqtt": {"worker_id": worker, "status_interval_s": 1.0}},
        "store": {"url": f"sqlite:///{worker}.db"},  # each worker its own (as on its machine)
    }


async def _frames_until(url: str, done: Callable[[list[dict[str, Any]]], bool],
                        timeout: float = 30.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with connect(url, proxy=None) as ws:
        async with asyncio.timeout(timeout):
            while not done(got):
                got.append(json.loads(await ws.recv()))
    return got


def cameras(api: LineWatchProcess) -> dict[str, dict[str, Any]]:
    response = api.get("/api/v1/cameras")
    assert response.status_code == 200, response.text
    return {c["id"]: c for c in response.json()}


def test_two_workers_one_api_and_a_killed_worker(broker: Mosquitto, model_path: Path,
                                                 procs, request: pytest.FixtureRequest) -> None:
    api = procs("api", {"bus": {"url": broker.url, "mqtt": {"status_interval_s": 1.0}}}, "api")
    api.wait_ready()  # subscribed before the workers start: it hears their first events
    w1 = procs("worker", worker_config(broker, model_path, "w1", "cam-a", "line-1", 3), "w1")
    w2 = procs("worker", worker_config(broker, model_path, "w2", "cam-b", "line-2", 4), "w2")
    for p in (w1, w2):
        p.wait_ready()

    # a websocket client on the API sees frames from both workers' cameras
    ws_url = f"ws://127.0.0.1:{api.port}/api/v1/ws/frames"
    got = asyncio.run(_frames_until(ws_url, lambda g: {m["camera"] for m in g} == {"cam-a",
                                                                                 "cam-b"}))
    assert all(m["type"] == "frame" and m["v"] == 1 for m in got)
    assert {m["line"] for m in got} <= {"line-1", "line-2"}
    deadline = time.monotonic() + 5  # a state change is published within 0.25 s
    while {c: s["state"] for c, s in cameras(api).items()} != {"cam-a": "up", "cam-b": "up"}:
        assert time.monotonic() < deadline, cameras(api)
        time.sleep(0.05)
    state = cameras(api)
    assert state["cam-a"]["model"] == "parts" and state["cam-a"]["line"] == "line-1"
    (model,) = api.get("/api/v1/models").json()
    assert model["id"] == "parts" and sorted(model["cameras"]) == ["cam-a", "cam-b"]
    assert api.get("/api/v1/cameras/cam-b/latest").json()["camera"] == "cam-b"
    snapshot = api.get("/api/v1/cameras/cam-b/snapshot.jpg")
    assert snapshot.status_code == 404 and "no images over MQTT" in snapshot.json()["detail"]

    # a SCADA/MES client subscribed to the broker gets what README.md documents: the
    # retained line states, camera status and worker presence at once, then live frames
    scada = Listener(broker)
    request.addfinalizer(scada.close)
    wanted = {"linewatch/v1/line-1/state", "linewatch/v1/line-2/state",
              "linewatch/v1/line-1/cam-a/status", "linewatch/v1/line-2/cam-b/status",
              "linewatch/v1/workers/w1", "linewatch/v1/workers/w2",
              "linewatch/v1/line-1/cam-a/frames", "linewatch/v1/line-2/cam-b/frames"}
    heard = scada.collect(lambda g: wanted <= {t for t, *_ in g}, timeout=20)
    first: dict[str, tuple[dict[str, Any] | None, int, bool]] = {}
    for topic, message, qos, retain in heard:
        first.setdefault(topic, (message, qos, retain))
    for line in ("line-1", "line-2"):
        message, qos, retain = first[f"linewatch/v1/{line}/state"]
        assert message is not None and (qos, retain) == (1, True)
        assert message["v"] == 1 and message["type"] == "state" and message["line"] == line
        assert message["state"] in STATES
    for topic, camera in (("linewatch/v1/line-1/cam-a/frames", "cam-a"),
                          ("linewatch/v1/line-2/cam-b/frames", "cam-b")):
        message, qos, retain = first[topic]
        assert message is not None and (qos, retain) == (0, False)
        assert message["type"] == "frame" and message["camera"] == camera
        assert "capture_ts" in message and "age_ms" in message
    message, qos, retain = first["linewatch/v1/line-1/cam-a/status"]
    assert message is not None and (qos, retain) == (1, True)
    assert message["type"] == "camera" and message["state"] == "up" and message["worker"] == "w1"
    message, qos, retain = first["linewatch/v1/workers/w1"]
    assert message is not None and (qos, retain) == (1, True) and message["status"] == "online"
    lines = {ln["line"]: ln for ln in api.get("/api/v1/lines").json()}
    assert set(lines) == {"line-1", "line-2"}
    assert all(lines[ln]["state"] in STATES for ln in lines), lines
    def state_changes() -> set[tuple[str, str, str]]:
        return {(e["line"], e["old"], e["new"]) for e in api.get("/api/v1/events").json()[
            "events"] if e["kind"] == "state"}

    deadline = time.monotonic() + 10  # each line's first state change, heard by the API
    while {line for line, _old, _new in state_changes()} != {"line-1", "line-2"}:
        assert time.monotonic() < deadline, api.get("/api/v1/events").json()
        time.sleep(0.1)
    assert {(line, old) for line, old, _new in state_changes()} >= {
        ("line-1", "UNKNOWN"), ("line-2", "UNKNOWN")}

    # a worker serves probes and metrics only
    assert w1.get("/healthz").json() == {"status": "ok"}
    assert w1.get("/api/v1/cameras").status_code == 404
    assert 'linewatch_mqtt_connected{role="worker"} 1.0' in w1.get("/metrics").text

    # SIGKILL one worker: its camera is down within a bounded time, from its last will
    w1.kill()
    killed = time.monotonic()
    while cameras(api)["cam-a"]["state"] != "down":
        assert time.monotonic() - killed < LWT_BOUND_S, f"cam-a still {cameras(api)['cam-a']}"
        time.sleep(0.05)
    after = cameras(api)
    assert "w1" in after["cam-a"]["reason"] and "last will" in after["cam-a"]["reason"]
    will = scada.collect(lambda g: any(t == "linewatch/v1/workers/w1" for t, *_ in g))
    (message, qos, _retain), = [(m, q, r) for t, m, q, r in will
                                if t == "linewatch/v1/workers/w1"]
    assert message is not None and qos == 1 and message["status"] == "offline"
    assert "last will" in message["reason"] and message["cameras"][0]["camera"] == "cam-a"
    assert after["cam-a"]["fps"] == 0.0
    assert after["cam-b"]["state"] == "up"
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["cameras_up"] == 1

    # the other camera keeps streaming to a new client, the dead one sends nothing
    got = asyncio.run(_frames_until(ws_url, lambda g: len(g) >= 10, timeout=20))
    assert {m["camera"] for m in got} == {"cam-b"}
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # a graceful stop: exit 0, cameras "stopped" (not the will); the API still serves
    assert w2.stop() == 0
    deadline = time.monotonic() + 10
    while cameras(api)["cam-b"]["state"] != "stopped":
        assert time.monotonic() < deadline, cameras(api)["cam-b"]
        time.sleep(0.05)
    assert cameras(api)["cam-b"]["reason"] == "worker w2 stopped"
    assert api.get("/healthz").status_code == 200
    assert api.stop() == 0
    assert "Traceback" not in api.log + w2.log
