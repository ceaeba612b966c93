"""service.bus.mqtt and service.remote: topics, payloads, and a real Mosquitto on loopback."""

from __future__ import annotations

import getpass
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from service.api.factory import create_app
from service.bus import Hub
from service.bus.mqtt import (
    MqttConnection,
    MqttPublisher,
    MqttSettings,
    PayloadError,
    Topics,
    camera_message,
    decode,
    encode,
    worker_message,
)
from service.config import BusConfig, Config, check_config, load_config
from service.errors import ConfigError
from service.remote import (
    LAST_WILL_REASON,
    RemoteState,
    RemoteView,
    WorkerLink,
    api_subscriptions,
    worker_roster,
)

REPO = Path(__file__).resolve().parents[2]
Msg = dict[str, Any]
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None,
    reason="mosquitto is not installed (Debian: apt-get install mosquitto); the broker tests "
    "need a real broker on loopback",
)


# --- a real broker -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_loopback(config: str, port: int, data_dir: Path) -> str:
    """A shipped broker config made to run here: its own listener, log and persistence
    location replaced by ``port`` on 127.0.0.1, stderr and ``data_dir``; the rest kept.
    ``user`` is this test's (as root, Mosquitto would drop to ``mosquitto``, which cannot
    write into pytest's private tmp_path)."""
    replaced = {"listener", "log_dest", "persistence_location", "user"}
    kept = [line for line in config.splitlines()
            if not line.strip() or line.split()[0] not in replaced]
    return "\n".join([f"listener {port} 127.0.0.1", f"user {getpass.getuser()}", *kept,
                      "log_dest stderr", f"persistence_location {data_dir}/", ""])


class Mosquitto:
    """A real Mosquitto on 127.0.0.1 (no persistence unless ``config`` is a shipped broker
    config, see :func:`on_loopback`); ``stop``/``start`` keep the port and the data."""

    def __init__(self, workdir: Path, port: int | None = None, *,
                 config: str | None = None) -> None:
        assert MOSQUITTO is not None
        self.port = port or free_port()
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.data_dir = workdir / f"mosquitto-{self.port}-data"
        self.data_dir.mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\n" if config is None
            else on_loopback(config, self.port, self.data_dir)
        )
        self.log_path = workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        assert MOSQUITTO is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited:\n{self.log_path.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise AssertionError(f"mosquitto not listening after {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    made: list[Mosquitto] = []

    def make(*, start: bool = True, port: int | None = None,
             config: str | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path, port, config=config)
        made.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return broker_factory()


class Listener:
    """A plain paho subscriber recording (topic, message, qos, retain)."""

    def __init__(self, broker: Mosquitto, topic: str = "linewatch/v1/#") -> None:
        self.received: queue.Queue[tuple[str, Msg | None, int, bool]] = queue.Queue()
        subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{free_port()}")
        client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda _c, _u, m: self.received.put(
            (m.topic, decode(bytes(m.payload)) if m.payload else None, m.qos, bool(m.retain))
        )
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        self.client = client
        assert subscribed.wait(10), "listener did not subscribe"

    def collect(
        self, until: Callable[[list[tuple[str, Msg | None, int, bool]]], bool], timeout: float = 15
    ) -> list[tuple[str, Msg | None, int, bool]]:
        got: list[tuple[str, Msg | None, int, bool]] = []
        deadline = time.monotonic() + timeout
        while not until(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; received {[g[0] for g in got]}")
            try:
                got.append(self.received.get(timeout=min(left, 0.2)))
            except queue.Empty:
                continue
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener_factory() -> Iterator[Callable[[Mosquitto], Listener]]:
    made: list[Listener] = []

    def make(broker: Mosquitto) -> Listener:
        made.append(Listener(broker))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def settings_for(broker_url: str, role: str = "worker", **mqtt: Any) -> MqttSettings:
    bus = BusConfig.model_validate({"url": broker_url, "mqtt": mqtt})
    return MqttSettings.from_config(bus, role=role, worker_id=mqtt.get("worker_id"))  # type: ignore[arg-type]


class Publishers:
    """Connections + publishers made by a test, stopped at its end."""

    def __init__(self) -> None:
        self.made: list[tuple[MqttConnection, MqttPublisher]] = []

    def __call__(self, settings: MqttSettings) -> tuple[MqttConnection, MqttPublisher]:
        connection = MqttConnection(settings)
        publisher = MqttPublisher(connection, settings)
        publisher.start()
        connection.start()
        self.made.append((connection, publisher))
        return connection, publisher

    def close(self) -> None:
        for connection, publisher in self.made:
            publisher.close()
            connection.stop()


@pytest.fixture
def publishers() -> Iterator[Publishers]:
    made = Publishers()
    yield made
    made.close()


def frame(seq: int, camera: str = "cam-1", line: str = "line-1") -> Msg:
    return {"v": 1, "type": "frame", "camera": camera, "line": line, "seq": seq, "instances": []}


def event(n: int, line: str = "line-1", cursor: int | None = None) -> Msg:
    return {
        "v": 1, "type": "event", "line": line, "cursor": n if cursor is None else cursor,
        "kind": "rule", "name": f"r{n}", "old": "ok", "new": "violated", "t_wall": 1000.0 + n,
        "detail": {},
    }


def line_state(line: str = "line-1", value: str = "RUNNING") -> Msg:
    return {"v": 1, "type": "state", "line": line, "state": value, "rules": []}


def camera_snapshot(camera: str = "cam-1", line: str = "line-1", state: str = "up") -> Msg:
    return {
        "id": camera, "source": "sim://conveyor?seed=1", "state": state, "reason": None,
        "fps": 15.0, "last_frame_time": None, "last_frame_ts": None, "reconnects": 0,
        "frames_captured": 10, "frames_processed": 9, "frames_dropped": 1, "model": "parts",
        "line": line,
    }


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- topics (pure) ---------------------------------------------------------------------------


def test_each_message_type_has_its_topic_qos_and_retention() -> None:
    topics = Topics()
    routes = {
        "frame": topics.route(frame(1)),
        "state": topics.route(line_state()),
        "event": topics.route(event(1)),
        "camera": topics.route(camera_message("w1", camera_snapshot(), 1.0)),
        "worker": topics.route(worker_message("w1", "online", [])),
    }
    assert {k: (r.topic, r.retain, r.reliable) for k, r in routes.items() if r} == {
        "frame": ("linewatch/v1/line-1/cam-1/frames", False, False),
        "state": ("linewatch/v1/line-1/state", True, True),
        "event": ("linewatch/v1/line-1/events", False, True),
        "camera": ("linewatch/v1/line-1/cam-1/status", True, True),
        "worker": ("linewatch/v1/workers/w1", True, True),
    }


def readme_topics(text: str) -> dict[str, tuple[int, bool]]:
    """{topic: (qos, retained)} from the topic table of README.md's MQTT section."""
    section = text.split("## Several machines: MQTT", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| (\d) \| (yes|no) \|$", section, re.MULTILINE)
    return {topic: (int(qos), retained == "yes") for topic, qos, retained in rows}


def test_the_readme_documents_every_topic_with_its_qos_and_retention() -> None:
    """SCADA/MES integrators read the README: its table must be what workers send."""
    documented = readme_topics((REPO / "README.md").read_text(encoding="utf-8"))
    topics = Topics()
    qos = MqttSettings.from_config(BusConfig.model_validate({"url": "mqtt://b:1883"}),
                                   role="worker", worker_id="w1").qos
    sent = {}
    for message in (frame(1), line_state(), event(1),
                    camera_message("w1", camera_snapshot(), 1.0),
                    worker_message("w1", "online", [])):
        route = topics.route(message)
        assert route is not None
        generic = (route.topic.replace("/workers/w1", "/workers/<worker-id>")
                   .replace("/line-1", "/<line>").replace("/cam-1", "/<camera>"))
        sent[generic] = (qos if route.reliable else 0, route.retain)
    assert documented == sent


@pytest.mark.parametrize(
    "message",
    [
        {"v": 1, "type": "frame", "camera": "cam-1", "line": None},
        {"v": 1, "type": "frame", "camera": "cam/1", "line": "line-1"},
        {"v": 1, "type": "frame", "camera": "+", "line": "line-1"},
        {"v": 1, "type": "state", "line": "#"},
        {"v": 1, "type": "state", "line": "workers"},
        {"v": 1, "type": "event"},
        {"v": 1, "type": "worker", "worker": ""},
        {"v": 1, "type": "hello", "line": "line-1", "camera": "cam-1"},
    ],
)
def test_a_message_without_a_valid_topic_is_not_routed(message: Msg) -> None:
    assert Topics().route(message) is None


@pytest.mark.parametrize("prefix", ["linewatch/v1", "plant-7/linewatch", "a"])
def test_parse_inverts_route(prefix: str) -> None:
    topics = Topics(prefix)
    for message in (
        frame(1, "cam-9", "l2"), line_state("l2"), event(1, "l2"),
        camera_message("w", camera_snapshot("cam-9", "l2"), 1.0),
        worker_message("w-7", "offline", []),
    ):
        route = topics.route(message)
        assert route is not None and route.topic.startswith(prefix + "/")
        info = topics.parse(route.topic)
        assert info is not None and info.kind == message["type"]
        worker = message["worker"] if message["type"] == "worker" else None
        assert (info.line, info.camera, info.worker) == (
            message.get("line"), message.get("camera"), worker
        )


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/line-1/state", "linewatch/v2/line-1/state", "linewatch/v1/line-1",
        "linewatch/v1/line-1/cam-1/frames/x", "linewatch/v1/line-1/cam-1/video",
        "linewatch/v1/workers/cam-1/status", "linewatch/v1//state", "linewatch/v1/line 1/state",
    ],
)
def test_parse_refuses_topics_outside_the_scheme(topic: str) -> None:
    assert Topics().parse(topic) is None


def test_subscriptions_cover_every_topic_and_frames_are_qos0() -> None:
    settings = settings_for("mqtt://broker:1883", role="api", qos=2)
    subs = dict(api_subscriptions(settings))
    assert subs == {
        "linewatch/v1/workers/+": 2, "linewatch/v1/+/+/status": 2, "linewatch/v1/+/state": 2,
        "linewatch/v1/+/events": 2, "linewatch/v1/+/+/frames": 0,
    }


# --- payloads (pure) -------------------------------------------------------------------------


def test_payload_round_trip_is_compact_json() -> None:
    message = {**frame(7), "instances": [{"box": [1.5, 2.0, 3.0, 4.25], "keypoints": {}}],
               "name": "Überlauf ✓"}
    payload = encode(message)
    assert b" " not in payload.replace("Überlauf ✓".encode(), b"")
    assert decode(payload) == message


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1, 2]", "JSON object"),
        (b'{"v": 2, "type": "frame"}', "version"), (b'{"v": 1}', "type"),
        (b'{"type": "frame"}', "version"),
    ],
)
def test_decode_refuses_what_is_not_a_linewatch_message(payload: bytes, why: str) -> None:
    with pytest.raises(PayloadError, match=why):
        decode(payload)


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({**line_state(), "belt_speed_mm_s": float("nan")})


# --- configuration ----------------------------------------------------------------------------


def test_settings_from_config_defaults() -> None:
    worker = settings_for("mqtt://broker", worker_id="gpu-3")
    assert (worker.host, worker.port, worker.tls) == ("broker", 1883, False)
    assert worker.client_id == "linewatch-worker-gpu-3"
    assert worker.topics.prefix == "linewatch/v1" and worker.qos == 1
    api_a, api_b = settings_for("mqtts://b.example", role="api"), settings_for(
        "mqtts://b.example", role="api"
    )
    assert (api_a.port, api_a.tls) == (8883, True)
    assert api_a.client_id.startswith("linewatch-api-") and api_a.client_id != api_b.client_id


def test_password_comes_from_the_environment_and_is_never_shown(tmp_path: Path) -> None:
    from service.app import masked_config

    path = tmp_path / "c.yaml"
    path.write_text("bus:\n  url: mqtt://broker:1883\n  mqtt: {username: lw}\n")
    config = load_config(path, env={"LINEWATCH_BUS__MQTT__PASSWORD": "s3cret"})
    settings = MqttSettings.from_config(config.bus, role="api")
    assert (settings.username, settings.password) == ("lw", "s3cret")
    assert "s3cret" not in repr(config) and "s3cret" not in str(masked_config(config))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtt://lw:pw@broker:1883", "no credentials in the bus url"),
        ("mqtt://broker:99999", "port"),
        ("mqtt://:1883", "names no broker host"),
        ("mqtt://broker:1883/linewatch", "no path"),
        ("amqp://broker", "unsupported bus scheme"),
    ],
)
def test_bad_bus_urls_name_file_line_and_fix(tmp_path: Path, url: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"api: {{port: 8000}}\nbus:\n  url: {url}\n")
    report = check_config(path, env={})
    assert not report.ok
    assert any(i.line == 3 and i.location == "bus.url" and message in i.message
               for i in report.issues), report.issues


@pytest.mark.parametrize("prefix", ["", "/linewatch", "linewatch/", "a//b", "a/+/b", "#", "$SYS"])
def test_bad_topic_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="topic prefix"):
        BusConfig.model_validate({"url": "mqtt://b", "mqtt": {"topic_prefix": prefix}})


def test_worker_and_api_need_an_mqtt_url() -> None:
    with pytest.raises(ConfigError, match="mqtt://host:1883"):
        MqttSettings.from_config(BusConfig(), role="worker")


def test_serve_with_an_mqtt_url_points_to_worker_and_api() -> None:
    from service.bus import create_bus

    with pytest.raises(ConfigError, match="linewatch worker.*linewatch api"):
        create_bus("mqtt://broker:1883")


def test_a_line_may_not_be_called_workers() -> None:
    config = Config.model_validate(
        {"cameras": [{"id": "cam-1", "source": "sim://conveyor", "line": "workers"}],
         "models": [{"id": "parts", "path": "parts.onnx"}]}
    )
    with pytest.raises(ConfigError, match="presence topic"):
        worker_roster(config)


# --- RemoteState / RemoteView (what the API heard) --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def heard() -> tuple[RemoteState, Hub, Clock]:
    hub, clock = Hub(), Clock()
    return RemoteState(Topics(), hub, stale_after_s=10.0, clock=clock), hub, clock


def feed(state: RemoteState, message: Msg) -> None:
    route = state.topics.route(message)
    assert route is not None
    state.ingest(route.topic, encode(message))


def announce(state: RemoteState, worker: str, cameras: list[tuple[str, str]],
             status: str = "online", reason: str | None = None) -> None:
    roster = [{"camera": c, "line": ln, "model": "parts"} for c, ln in cameras]
    feed(state, worker_message(worker, status, roster, reason=reason))  # type: ignore[arg-type]


def test_a_dead_workers_cameras_are_down_and_the_others_stay_up(heard) -> None:
    state, _hub, _clock = heard
    announce(state, "w1", [("cam-1", "line-1")])
    announce(state, "w2", [("cam-2", "line-2")])
    feed(state, camera_message("w1", camera_snapshot("cam-1", "line-1"), 1.0))
    feed(state, camera_message("w2", camera_snapshot("cam-2", "line-2"), 1.0))
    assert [(c.id, c.state) for c in map(state.camera, state.camera_ids()) if c] == [
        ("cam-1", "up"), ("cam-2", "up")]
    announce(state, "w1", [("cam-1", "line-1")], "offline", LAST_WILL_REASON)
    cam1, cam2 = state.camera("cam-1"), state.camera("cam-2")
    assert cam1 is not None and cam1.state == "down" and cam1.fps == 0.0
    assert cam1.reason is not None and "w1" in cam1.reason and "last will" in cam1.reason
    assert cam2 is not None and cam2.state == "up"
    announce(state, "w1", [("cam-1", "line-1")], "online")
    assert state.camera("cam-1").state == "up"  # type: ignore[union-attr]


def test_a_camera_taken_over_by_another_worker_is_not_marked_down(heard) -> None:
    state, _hub, _clock = heard
    feed(state, camera_message("w2", camera_snapshot("cam-1"), 2.0))
    announce(state, "w1", [("cam-1", "line-1")], "offline", LAST_WILL_REASON)  # the old owner
    assert state.camera("cam-1").state == "up"  # type: ignore[union-attr]


def test_a_graceful_stop_shows_stopped(heard) -> None:
    state, _hub, _clock = heard
    feed(state, camera_message("w1", camera_snapshot("cam-1"), 1.0))
    announce(state, "w1", [("cam-1", "line-1")], "offline", "stopped")
    cam = state.camera("cam-1")
    assert cam is not None and (cam.state, cam.reason) == ("stopped", "worker w1 stopped")


def test_a_camera_without_status_for_too_long_is_down(heard) -> None:
    state, _hub, clock = heard
    feed(state, camera_message("w1", camera_snapshot("cam-1"), 1.0))
    clock.now += 9.0
    assert state.camera("cam-1").state == "up"  # type: ignore[union-attr]
    clock.now += 2.0
    cam = state.camera("cam-1")
    assert cam is not None and cam.state == "down" and "no status from worker w1" in str(cam.reason)


def test_messages_are_republished_on_the_hub(heard) -> None:
    state, hub, _clock = heard
    sub = hub.subscribe()
    feed(state, frame(3, "cam-2", "line-2"))
    feed(state, state_msg := state_message_for("line-2"))
    got = [sub.get_nowait(), sub.get_nowait()]
    assert got[0] is not None and got[0]["seq"] == 3 and got[0]["camera"] == "cam-2"
    assert got[1] == state_msg
    assert state.latest("cam-2") == frame(3, "cam-2", "line-2")
    assert state.camera("cam-2") is not None  # known from its frames


def state_message_for(line: str) -> Msg:
    return line_state(line, "JAMMED")


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("linewatch/v1/line-1/cam-1/frames", encode(frame(1, "cam-2"))),  # names another camera
        ("linewatch/v1/line-1/cam-1/frames", encode(line_state())),  # a state on a frames topic
        ("linewatch/v1/line-1/state", b"{not json"),
        ("linewatch/v1/line-1/cam-1/video", encode(frame(1))),
        ("linewatch/v1/line-1/events", encode({"v": 1, "type": "event", "line": "line-1"})),
    ],
)
def test_bad_messages_are_refused_and_counted(heard, topic: str, payload: bytes) -> None:
    state, hub, _clock = heard
    sub = hub.subscribe()
    state.ingest(topic, payload)
    assert state.refused == 1 and sub.get_nowait() is None
    assert state.camera_ids() == []


def test_an_empty_retained_message_forgets_a_worker_and_a_camera(heard) -> None:
    state, _hub, _clock = heard
    announce(state, "w1", [("cam-1", "line-1")])
    feed(state, camera_message("w1", camera_snapshot("cam-1"), 1.0))
    state.ingest("linewatch/v1/workers/w1", b"")
    state.ingest("linewatch/v1/line-1/cam-1/status", b"")
    assert state.workers() == {} and state.camera_ids() == []


def test_events_of_several_workers_get_one_cursor_sequence(heard) -> None:
    state, hub, _clock = heard
    sub = hub.subscribe(types={"event"})
    for n in (1, 2):
        feed(state, event(n, "line-1", cursor=n))  # worker 1's store
    feed(state, event(3, "line-2", cursor=1))  # worker 2's store starts at 1 too
    live = [sub.get_nowait() for _ in range(3)]
    assert [(m["cursor"], m["source_cursor"]) for m in live if m] == [(1, 1), (2, 2), (3, 1)]
    page, nxt = state.events.list(since_cursor=1, limit=10)
    assert [e.cursor for e in page] == [2, 3] and nxt == 3
    page, nxt = state.events.list(line="line-2")
    assert [(e.name, e.cursor) for e in page] == [("r3", 3)]
    assert state.events.latest_cursor() == 3


def test_an_event_sent_again_reaches_the_clients_once(heard) -> None:
    from service.telemetry.metrics import MQTT_DUPLICATE_EVENTS

    state, hub, _clock = heard
    sub = hub.subscribe(types={"event"})
    before = MQTT_DUPLICATE_EVENTS._value.get()
    for n in (1, 2, 1, 3, 2):  # QoS 1 redelivers 1 and 2 (same payload: same bytes)
        feed(state, event(n, "line-1", cursor=n))
    # the same transition at another time, or from another worker's store, is an event
    feed(state, {**event(1, "line-1", cursor=1), "t_wall": event(1)["t_wall"] + 5.0})
    feed(state, event(1, "line-2", cursor=1))
    live = []
    while (m := sub.get_nowait()) is not None:
        live.append(m)
    assert [(m["line"], m["name"], m["cursor"]) for m in live] == [
        ("line-1", "r1", 1), ("line-1", "r2", 2), ("line-1", "r3", 3), ("line-1", "r1", 4),
        ("line-2", "r1", 5),
    ]
    assert state.events.latest_cursor() == 5 and state.refused == 0
    assert MQTT_DUPLICATE_EVENTS._value.get() - before == 2


def test_the_duplicate_memory_is_bounded() -> None:
    from service.remote import RemoteEvents

    log = RemoteEvents(keep=3)
    msgs = [event(n, "line-1", cursor=n) for n in range(1, 6)]
    assert [log.add(dict(m)) for m in msgs] == ["added"] * 5
    assert log.add(dict(msgs[-1])) == "duplicate"  # still remembered
    assert log.add(dict(msgs[0])) == "added"  # forgotten after 3 newer ones: kept as new
    assert log.add({"type": "event"}) == "invalid"


def test_models_of_several_workers_merge_by_id(heard) -> None:
    state, _hub, _clock = heard
    model = {
        "id": "parts", "path": "/m.onnx", "provider": "CUDAExecutionProvider", "loaded": True,
        "classes": [{"id": 0, "name": "bracket", "keypoints": ["a", "b"], "skeleton": [[0, 1]]}],
        "keypoints": 2, "inputs": [], "imgsz": [240, 320], "dynamic_batch": True,
        "max_batch": 8, "cameras": ["cam-1"],
    }
    roster = [{"camera": "cam-1", "line": "l", "model": "parts"}]
    feed(state, worker_message("w1", "online", roster, models=[model]))
    feed(state, worker_message("w2", "online", [{**roster[0], "camera": "cam-2"}],
                               models=[{**model, "cameras": ["cam-2"],
                                        "provider": "CPUExecutionProvider"}]))
    view = RemoteView(state, MqttConnection(settings_for("mqtt://127.0.0.1:9")), Config())
    (merged,) = view.models()
    assert merged.cameras == ["cam-1", "cam-2"] and merged.loaded
    assert merged.provider == "CPUExecutionProvider, CUDAExecutionProvider"
    assert [c.name for c in view.classes("cam-2")] == ["bracket"]


def test_the_api_over_mqtt_serves_cameras_latest_lines_and_404_for_images(heard) -> None:
    state, hub, _clock = heard
    announce(state, "w1", [("cam-1", "line-1")])
    feed(state, camera_message("w1", camera_snapshot("cam-1"), 1.0))
    feed(state, frame(5))
    feed(state, line_state())
    connection = MqttConnection(settings_for("mqtt://127.0.0.1:9", role="api"))  # never started
    client = TestClient(create_app(RemoteView(state, connection, Config()), hub))
    assert [c["id"] for c in client.get("/api/v1/cameras").json()] == ["cam-1"]
    assert client.get("/api/v1/cameras/cam-1/latest").json()["seq"] == 5
    snap = client.get("/api/v1/cameras/cam-1/snapshot.jpg")
    assert snap.status_code == 404 and "no images over MQTT" in snap.json()["detail"]
    assert client.get("/api/v1/lines/line-1").json()["state"] == "RUNNING"
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "not connected to the MQTT broker mqtt://127.0.0.1:9" in ready.json()["reasons"][0]


# --- with a real broker --------------------------------------------------------------------------


@needs_broker
def test_messages_reach_the_broker_with_their_qos_and_retention(
    broker: Mosquitto, publishers: Publishers, listener_factory
) -> None:
    connection, publisher = publishers(settings_for(broker.url))
    assert connection.wait_connected(10)
    early = listener_factory(broker)
    publisher.publish(frame(1))
    publisher.publish(line_state())
    publisher.publish(event(1))
    got = early.collect(lambda g: len(g) >= 3)
    by_topic = {t: (m, qos, retain) for t, m, qos, retain in got}
    assert by_topic["linewatch/v1/line-1/cam-1/frames"] == (frame(1), 0, False)
    assert by_topic["linewatch/v1/line-1/state"] == (line_state(), 1, False)  # live: not flagged
    assert by_topic["linewatch/v1/line-1/events"] == (event(1), 1, False)
    late = listener_factory(broker)  # retained: a late subscriber gets the state, no event
    got = late.collect(lambda g: len(g) >= 1)
    time.sleep(0.3)
    assert [(t, retain) for t, *_rest, retain in got] == [("linewatch/v1/line-1/state", True)]
    assert late.received.empty()


class ApiSession:
    """An API process' MQTT connection (its subscriptions, its client id), made again
    after it was away; records the names of the events it hears."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.heard: queue.Queue[Msg | None] = queue.Queue()

    def connect(self) -> MqttConnection:
        connection = MqttConnection(
            self.settings, on_message=lambda _topic, payload: self.heard.put(decode(payload)))
        connection.on_connected(lambda: connection.subscribe(api_subscriptions(self.settings)))
        connection.start()
        wait_for(lambda: connection.subscribed, what="the API to subscribe")
        return connection

    def events_after_reconnect(self, count: int, timeout: float) -> list[str]:
        """Connect again; the names of the events heard until ``count`` or ``timeout``."""
        back = self.connect()
        got: list[str] = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and len(got) < count:
                try:
                    message = self.heard.get(timeout=0.2)
                except queue.Empty:
                    continue
                if message is not None and message.get("type") == "event":
                    got.append(message["name"])
        finally:
            back.stop()
        return got


@needs_broker
@pytest.mark.parametrize("client_id", ["api-7", None])
def test_an_api_with_its_own_client_id_gets_the_events_sent_while_it_was_away(
    broker: Mosquitto, publishers: Publishers, client_id: str | None
) -> None:
    settings = settings_for(broker.url, role="api", client_id=client_id)
    assert settings.persistent is (client_id is not None)
    api = ApiSession(settings)
    api.connect().stop()  # subscribed once, then away (a restart, a network cut)
    _, publisher = publishers(settings_for(broker.url))
    publisher.publish(event(1))
    publisher.publish(event(2))
    assert publisher.flush(10)
    got = api.events_after_reconnect(2, timeout=10 if client_id else 2)
    # a persistent session gets both, in order; a clean one never hears of them
    assert got == ([event(1)["name"], event(2)["name"]] if client_id else [])


def shipped_broker_config(where: str) -> str:
    """The Mosquitto config the compose stack or the Kubernetes manifests ship."""
    if where == "compose":
        return (REPO / "deploy/mosquitto/mosquitto.conf").read_text(encoding="utf-8")
    import yaml

    for doc in yaml.safe_load_all((REPO / "deploy/k8s/mosquitto.yaml").read_text("utf-8")):
        if doc["kind"] == "ConfigMap":
            return str(doc["data"]["mosquitto.conf"])
    raise AssertionError("no mosquitto ConfigMap in deploy/k8s/mosquitto.yaml")


@needs_broker
@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_the_shipped_broker_keeps_an_api_session_and_its_events_across_a_restart(
    broker_factory: Callable[..., Mosquitto], publishers: Publishers, where: str
) -> None:
    broker = broker_factory(config=shipped_broker_config(where))
    api = ApiSession(settings_for(broker.url, role="api", client_id="linewatch-api-0"))
    api.connect().stop()  # the API replica is away (rolling update) ...
    worker, publisher = publishers(settings_for(broker.url))
    publisher.publish(event(1))
    publisher.publish(event(2))
    assert publisher.flush(10)
    worker.stop()
    broker.stop()  # ... and the broker restarts meanwhile (node drain, upgrade)
    broker.start()
    got = api.events_after_reconnect(2, timeout=10)
    assert got == [event(1)["name"], event(2)["name"]], broker.log_path.read_text()
    assert any(broker.data_dir.iterdir()), "the broker saved its sessions to disk"


@needs_broker
def test_publish_never_blocks_without_a_broker_and_events_arrive_once_it_is_up(
    broker_factory, publishers: Publishers, listener_factory
) -> None:
    broker = broker_factory(start=False)
    connection, publisher = publishers(settings_for(broker.url, outgoing_frames=8))
    t0 = time.perf_counter()
    for seq in range(500):
        publisher.publish(frame(seq))
        if seq % 25 == 0:
            publisher.publish(event(seq // 25 + 1))
            publisher.publish(line_state(value=f"S{seq}"))
    assert time.perf_counter() - t0 < 0.5, "publish waited on the broker"
    assert publisher.dropped == {("frame", "queue_full"): 492}
    assert not connection.connected and "not connected" in connection.describe()
    broker.start()
    listener = listener_factory(broker)
    assert not connection.connected, "the listener subscribes before the reconnect (>= 1 s)"

    def count(got: list[Any], suffix: str) -> int:
        return sum(1 for t, *_ in got if t.endswith(suffix))

    got = listener.collect(
        lambda g: (count(g, "/events"), count(g, "/state"), count(g, "/frames")) == (20, 1, 8),
        timeout=30,
    )
    time.sleep(0.3)
    assert listener.received.empty(), "nothing more"
    events = [m["cursor"] for t, m, *_ in got if t.endswith("/events") and m]
    assert events == list(range(1, 21)), "every event, in order"
    states = [m["state"] for t, m, *_ in got if t.endswith("/state") and m]
    assert states == ["S475"], "state coalesced to the newest"
    frames = [m["seq"] for t, m, *_ in got if t.endswith("/frames") and m]
    assert frames == list(range(492, 500)), "only the newest frames were kept"


@needs_broker
def test_the_publisher_reconnects_after_the_broker_restarts(
    broker: Mosquitto, publishers: Publishers, listener_factory
) -> None:
    connection, publisher = publishers(settings_for(broker.url))
    assert connection.wait_connected(10)
    broker.stop()
    wait_for(lambda: not connection.connected, 10, "the disconnect")
    for n in range(1, 6):
        publisher.publish(event(n))
    broker.start()
    listener = listener_factory(broker)
    got = listener.collect(lambda g: len(g) >= 5, timeout=30)
    assert [m["cursor"] for _t, m, *_ in got if m] == [1, 2, 3, 4, 5]
    assert connection.connects == 2


class WorkerAndApi:
    """A WorkerLink over a real hub, and an API-side RemoteState, on one real broker."""

    def __init__(self, broker: Mosquitto, worker_id: str = "w1") -> None:
        self.hub = Hub()
        self.snapshots = [camera_snapshot("cam-1"), camera_snapshot("cam-2")]
        self.link = WorkerLink(
            self.hub, settings_for(broker.url, worker_id=worker_id), worker_id,
            roster=[{"camera": "cam-1", "line": "line-1", "model": "parts"},
                    {"camera": "cam-2", "line": "line-1", "model": "parts"}],
            cameras=lambda: list(self.snapshots), models=lambda: [], status_interval_s=0.2,
        )
        self.api_hub = Hub()
        api_settings = settings_for(broker.url, role="api")
        self.state = RemoteState(api_settings.topics, self.api_hub)
        self.api = MqttConnection(api_settings, on_message=self.state.ingest)
        self.api.on_connected(lambda: self.api.subscribe(api_subscriptions(api_settings)))
        self.api.start()
        self.link.start()

    def states(self) -> dict[str, str]:
        cams = (self.state.camera(c) for c in self.state.camera_ids())
        return {c.id: c.state for c in cams if c is not None}

    def close(self) -> None:
        self.hub.close()
        self.link.stop(2.0)
        self.api.stop()


@pytest.fixture
def worker_and_api(broker: Mosquitto) -> Iterator[WorkerAndApi]:
    both = WorkerAndApi(broker)
    yield both
    both.close()


@needs_broker
def test_the_hub_is_forwarded_and_the_last_will_marks_the_cameras_down(
    worker_and_api: WorkerAndApi,
) -> None:
    both = worker_and_api
    wait_for(lambda: both.states() == {"cam-1": "up", "cam-2": "up"}, what="cameras up")
    both.hub.publish(frame(42, "cam-2"))
    wait_for(lambda: (both.state.latest("cam-2") or {}).get("seq") == 42, what="frame")
    offline = both.api_hub.subscribe(types={"worker"})
    # the worker's connection dies without a DISCONNECT (as when the process is killed)
    sock = both.link.connection.client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    message = offline.get_blocking(10)
    assert message is not None and message["status"] == "offline"
    assert message["reason"] == LAST_WILL_REASON
    assert [c["camera"] for c in message["cameras"]] == ["cam-1", "cam-2"]
    wait_for(lambda: both.link.connection.connects >= 2, what="the worker to reconnect")
    wait_for(lambda: both.states() == {"cam-1": "up", "cam-2": "up"}, what="back online")


@needs_broker
def test_a_graceful_stop_marks_cameras_stopped_without_the_will(
    worker_and_api: WorkerAndApi,
) -> None:
    both = worker_and_api
    wait_for(lambda: both.states() == {"cam-1": "up", "cam-2": "up"}, what="cameras up")
    presence = both.api_hub.subscribe(types={"worker"})
    both.hub.close()
    both.link.stop(5.0)
    wait_for(lambda: both.states() == {"cam-1": "stopped", "cam-2": "stopped"}, what="stopped")
    reasons = []
    while (message := presence.get_blocking(0.5)) is not None:
        reasons.append(message["reason"])
    assert reasons == ["stopped"], "a clean disconnect: the broker does not send the will"
