"""LineWatch across machines: ``linewatch worker`` publishes, ``linewatch api`` serves.

A **worker** runs cameras and models like ``linewatch serve`` but, instead of the
REST/websocket API, forwards every bus message to an MQTT broker
(:class:`WorkerLink`): frames, line state, events, its cameras' status every
``bus.mqtt.status_interval_s``, and its own presence on
``<prefix>/workers/<worker-id>`` ("online", retained), whose last will ("offline",
listing its cameras) the broker publishes when the worker dies.  It serves only
``/healthz``, ``/readyz`` and ``/metrics`` (probes and Prometheus).

An **API** process subscribes to those topics (:class:`RemoteState`), republishes
the messages on its own in-process hub (the websocket reads that) and answers the
REST routes from what it heard (:class:`RemoteView`, a ``RuntimeView``).  A
worker's cameras show ``down`` as soon as its will arrives, and ``down`` after
``stale_after_s`` without a status message.  Images do not cross the broker:
``snapshot.jpg`` answers 404 (docs/mqtt.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import ValidationError

from service.api.schemas import (
    CameraSnapshot,
    ClassSnapshot,
    Health,
    ModelSnapshot,
    Readiness,
)
from service.api.views import LatestSnapshot
from service.bus.hub import Hub, HubClosed
from service.bus.mqtt import (
    OFFLINE,
    ONLINE,
    WORKERS,
    MqttConnection,
    MqttPublisher,
    MqttSettings,
    PayloadError,
    Topics,
    WorkerStatus,
    camera_message,
    decode,
    default_worker_id,
    encode,
    worker_message,
)
from service.config import Config
from service.domain import ClassInfo, Event
from service.errors import ConfigError
from service.telemetry.metrics import MQTT_DUPLICATE_EVENTS, MQTT_INVALID, MQTT_RECEIVED

log = logging.getLogger(__name__)

Message = dict[str, Any]
LAST_WILL_REASON = "connection to the broker lost (last will)"
STOPPED_REASON = "stopped"
STATE_POLL_S = 0.25
"""How often a worker looks for camera state changes to publish at once."""


# --- the worker side ------------------------------------------------------------------------


class WorkerLink:
    """Forwards a runtime's hub to the broker, with camera status and worker presence.

    ``cameras`` and ``models`` return the runtime's snapshots as JSON data (the
    ``CameraSnapshot`` / ``ModelSnapshot`` fields); ``roster`` lists the worker's
    cameras (``camera``, ``line``, ``model``) for its presence message and will.
    """

    def __init__(
        self,
        hub: Hub,
        settings: MqttSettings,
        worker_id: str,
        *,
        roster: Sequence[dict[str, Any]],
        cameras: Callable[[], list[dict[str, Any]]],
        models: Callable[[], list[dict[str, Any]]],
        status_interval_s: float = 2.0,
        host: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.settings = settings
        self._hub = hub
        self._roster = [dict(c) for c in roster]
        self._cameras = cameras
        self._models = models
        self._interval = status_interval_s
        self._host = host
        topics = settings.topics
        self._worker_topic = topics.worker(worker_id)
        will = worker_message(worker_id, OFFLINE, self._roster, reason=LAST_WILL_REASON, host=host)
        self.connection = MqttConnection(settings, will=(self._worker_topic, encode(will)))
        self.publisher = MqttPublisher(self.connection, settings)
        self.connection.on_connected(self._announce)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._published_states: dict[str, tuple[Any, Any]] = {}
        self._subscription = hub.subscribe(stream="mqtt")  # before the runtime publishes

    def start(self) -> None:
        """Connect (in the background) and start forwarding."""
        self.publisher.start()
        self.connection.start()
        for name, target in (("mqtt-bridge", self._bridge), ("mqtt-status", self._status_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Forward what the hub still holds, mark the cameras stopped, go offline, disconnect.

        Call it after the runtime stopped (its hub is closed then).
        """
        if self._stop.is_set():
            return
        bridge, status = self._threads if self._threads else (None, None)
        if bridge is not None:
            bridge.join(timeout)  # ends when the closed hub is drained
        self._stop.set()
        self._subscription.close()
        if status is not None:
            status.join(timeout)
        now = time.time()
        for snap in self._cameras():
            final = {**snap, "state": "stopped", "fps": 0.0,
                     "reason": f"worker {self.worker_id} stopped"}
            self.publisher.publish(camera_message(self.worker_id, final, now))
        self.publisher.publish(self._presence(OFFLINE, STOPPED_REASON))
        if self.connection.connected and not self.publisher.flush(timeout):
            log.warning("MQTT: %d message(s) not acknowledged by the broker at shutdown",
                        self.publisher.pending_reliable())
        self.publisher.close()
        self.connection.stop()

    def readiness_reason(self) -> str | None:
        """None when connected, else why the worker cannot publish."""
        return None if self.connection.connected else self.connection.describe()

    # -- threads

    def _presence(self, status: WorkerStatus, reason: str | None = None) -> Message:
        return worker_message(
            self.worker_id, status, self._roster,
            reason=reason, models=self._models(), host=self._host, t_wall=time.time(),
        )

    def _announce(self) -> None:
        """After every (re)connect: presence first, then fresh camera status."""
        self.publisher.publish(self._presence(ONLINE))
        self._publish_status()

    def _publish_status(self, only_changed: bool = False) -> None:
        now = time.time()
        for snap in self._cameras():
            seen = (snap.get("state"), snap.get("reason"))
            if only_changed and self._published_states.get(snap["id"]) == seen:
                continue
            self._published_states[snap["id"]] = seen
            self.publisher.publish(camera_message(self.worker_id, snap, now))

    def _status_loop(self) -> None:
        """Every ``status_interval_s`` all cameras; a camera whose state changed at once."""
        tick = min(STATE_POLL_S, self._interval)
        last_full = time.monotonic()
        while not self._stop.wait(tick):
            if not self.connection.connected:
                continue
            full = time.monotonic() - last_full >= self._interval
            if full:
                last_full = time.monotonic()
            self._publish_status(only_changed=not full)

    def _bridge(self) -> None:
        subscription = self._subscription
        while True:
            try:
                message = subscription.get_blocking(0.5)
            except HubClosed:
                return
            if message is not None:
                self.publisher.publish(message)


def worker_roster(config: Config) -> list[dict[str, Any]]:
    """The enabled cameras of a worker config (``camera``, ``line``, ``model``)."""
    roster = [
        {"camera": c.id, "line": c.line, "model": c.model} for c in config.cameras if c.enabled
    ]
    if any(c["line"] == WORKERS for c in roster):
        raise ConfigError(
            f"a line may not be called {WORKERS!r} over MQTT (<prefix>/{WORKERS}/<id> is the "
            "worker presence topic): rename the line in cameras[].line"
        )
    return roster


def create_probe_app(readiness: Callable[[], Readiness]) -> FastAPI:
    """The worker's HTTP surface: ``/healthz``, ``/readyz`` and ``/metrics`` only."""
    app = FastAPI(title="LineWatch worker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> Health:
        return Health()

    @app.get("/readyz")
    def readyz() -> Response:
        ready = readiness()
        return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def worker_readiness(runtime_ready: Callable[[], Readiness], link: WorkerLink) -> Readiness:
    """The runtime's readiness, and not ready while the broker is unreachable."""
    ready = runtime_ready()
    reason = link.readiness_reason()
    if reason is None:
        return ready
    return Readiness(
        ready=False, models_loaded=ready.models_loaded, cameras_up=ready.cameras_up,
        reasons=[*ready.reasons, reason],
    )


def run_worker(config_path: Path | None, host: str | None = None, port: int | None = None) -> None:
    """``linewatch worker``: cameras and models publishing over MQTT until SIGTERM."""
    from service.api.server import bind_socket, bound_port, run_server
    from service.api.ws import WebsocketClients
    from service.app import Runtime, setup_logging
    from service.config import load_config
    from service.telemetry.memory import keep_frames_out_of_the_heap

    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.json_)
    keep_frames_out_of_the_heap()
    worker_id = config.bus.mqtt.worker_id or default_worker_id()
    settings = MqttSettings.from_config(config.bus, role="worker", worker_id=worker_id)
    roster = worker_roster(config)
    host = host or config.api.host
    sock = bind_socket(host, config.api.port if port is None else port)
    runtime: Runtime | None = None
    link: WorkerLink | None = None
    try:
        hub = Hub(frame_queue=config.bus.frame_queue, event_limit=config.bus.event_queue_limit)
        runtime = Runtime.build(config, hub)
        status = runtime.status
        link = WorkerLink(
            hub, settings, worker_id, roster=roster,
            cameras=lambda: [c.model_dump(mode="json") for c in status.cameras()],
            models=lambda: [m.model_dump(mode="json") for m in status.models()],
            status_interval_s=config.bus.mqtt.status_interval_s, host=default_worker_id(),
        )
        link.start()
        runtime.start()
        log.info(
            "LineWatch worker %s: %d camera(s) publishing to %s under %s/; probes on "
            "http://%s:%d (/healthz, /readyz, /metrics)", worker_id, len(roster),
            settings.address, settings.topics.prefix, host, bound_port(sock),
        )
        ready_link = link

        def drain() -> None:
            assert runtime is not None
            runtime.stop()
            ready_link.stop()

        app = create_probe_app(lambda: worker_readiness(status.readiness, ready_link))
        run_server(app, sock, drain=drain, clients=WebsocketClients(),
                   log_level=config.logging.level.lower())
    finally:
        if runtime is not None:
            runtime.stop()
        if link is not None:
            link.stop()
        sock.close()


# --- the API side ---------------------------------------------------------------------------


class RemoteEvents:
    """The events heard over MQTT, newest ``keep`` (an ``EventLog`` for the events routes).

    Each worker numbers its events with its own store's cursor; this log renumbers
    them in arrival order (``cursor``), keeping the worker's as ``source_cursor``, so
    that one API process has one cursor sequence over all workers.  Cursors belong
    to the process: a client that moves to another API replica starts again.

    Events come at QoS 1: the broker sends one again when its acknowledgement was lost
    (a reconnect, or a persistent session resumed).  Such a copy has the same line, worker
    cursor, transition and wall time as the first; the newest ``keep`` events' keys are
    remembered and a copy is dropped (``add`` returns "duplicate"), so a client never
    sees one event twice under two cursors.
    """

    def __init__(self, keep: int = 1000) -> None:
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=keep)
        self._seen: dict[tuple[Any, ...], None] = {}  # insertion-ordered: oldest first
        self._keep = keep
        self._cursor = 0

    def add(self, message: Message) -> Literal["added", "duplicate", "invalid"]:
        """Number ``message`` (in place) and keep it: "added"; "duplicate" for a copy of
        an event already kept; "invalid" when it is not an event."""
        fields = [message.get(k) for k in ("line", "kind", "name", "old", "new")]
        t_wall, detail = message.get("t_wall"), message.get("detail") or {}
        if not all(isinstance(f, str) for f in fields) or not isinstance(detail, dict) \
                or not isinstance(t_wall, int | float) or isinstance(t_wall, bool):
            return "invalid"
        line, kind, name, old, new = (str(f) for f in fields)
        source = message.get("cursor")
        key = (line, source if isinstance(source, int) else None, kind, name, old, new,
               float(t_wall))
        with self._lock:
            if key in self._seen:
                return "duplicate"
            self._seen[key] = None
            if len(self._seen) > self._keep:
                del self._seen[next(iter(self._seen))]
            self._cursor += 1
            if "cursor" in message:
                message["source_cursor"] = message["cursor"]
            message["cursor"] = self._cursor
            self._events.append(
                Event(line, kind, name, old, new, float(t_wall), detail, self._cursor)
            )
        return "added"

    def list(
        self, line: str | None = None, since_cursor: int = 0, limit: int = 100
    ) -> tuple[list[Event], int]:
        """Events after ``since_cursor`` (oldest first, at most ``limit``) and the next cursor."""
        with self._lock:
            page = [
                e for e in self._events
                if (e.cursor or 0) > since_cursor and (line is None or e.line == line)
            ][:limit]
        return page, (page[-1].cursor or since_cursor) if page else since_cursor

    def latest_cursor(self) -> int:
        with self._lock:
            return self._cursor


@dataclass(slots=True)
class WorkerEntry:
    status: str
    reason: str | None
    cameras: list[dict[str, Any]]
    models: list[dict[str, Any]]


@dataclass(slots=True)
class CameraEntry:
    line: str
    worker: str | None = None
    status: dict[str, Any] | None = None
    status_mono: float | None = None
    model: str | None = None


@dataclass(slots=True)
class _Tables:
    workers: dict[str, WorkerEntry] = field(default_factory=dict)
    cameras: dict[str, CameraEntry] = field(default_factory=dict)
    latest: dict[str, Message] = field(default_factory=dict)
    lines: dict[str, Message] = field(default_factory=dict)


class RemoteState:
    """Everything an API process heard from the broker; ``ingest`` runs on the MQTT thread.

    Every accepted message is also published on ``hub`` (frames for the websocket,
    state/event/camera/worker messages for any other subscriber).
    """

    def __init__(
        self,
        topics: Topics,
        hub: Hub,
        *,
        stale_after_s: float = 10.0,
        recent_events: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self._hub = hub
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._t = _Tables()
        self.events = RemoteEvents(recent_events)
        self.refused = 0

    # -- the MQTT side

    def ingest(self, topic: str, payload: bytes) -> None:
        """Take one received message; a bad one is counted and logged, never raised."""
        info = self.topics.parse(topic)
        if info is None:
            self._refuse("topic", f"unexpected topic {topic!r}")
            return
        if not payload:  # an empty retained message clears the topic
            self._clear(info.kind, info.line, info.camera, info.worker)
            return
        try:
            message = decode(payload)
        except PayloadError as exc:
            self._refuse("payload", f"{topic}: {exc}")
            return
        if message["type"] != info.kind:
            self._refuse("type", f"{topic}: a {message['type']!r} message on a {info.kind} topic")
            return
        for key, value in (("line", info.line), ("camera", info.camera), ("worker", info.worker)):
            if value is not None:
                if message.get(key, value) != value:
                    self._refuse("topic", f"{topic}: message names {key} {message.get(key)!r}")
                    return
                message[key] = value
        MQTT_RECEIVED.labels(info.kind).inc()
        if info.kind == "event":
            added = self.events.add(message)  # numbers it with this process's cursor
            if added == "invalid":
                self._refuse("payload", f"{topic}: an event without line/kind/name/old/new/t_wall")
                return
            if added == "duplicate":  # QoS 1 sent it again: the clients have it already
                MQTT_DUPLICATE_EVENTS.inc()
                log.debug("MQTT: dropped a second copy of an event on %s", topic)
                return
        else:
            handler = {
                "frame": self._frame, "camera": self._camera, "worker": self._worker,
                "state": self._state,
            }[info.kind]
            handler(message)
        self._hub.publish(message)

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused += 1
        MQTT_INVALID.labels(reason).inc()
        log.warning("MQTT: ignored a message: %s", detail)

    def _clear(self, kind: str, line: str | None, camera: str | None, worker: str | None) -> None:
        with self._lock:
            if kind == "worker" and worker is not None:
                self._t.workers.pop(worker, None)
            elif kind == "camera" and camera is not None:
                self._t.cameras.pop(camera, None)
                self._t.latest.pop(camera, None)
            elif kind == "state" and line is not None:
                self._t.lines.pop(line, None)

    def _entry(self, camera: str, line: str) -> CameraEntry:
        entry = self._t.cameras.get(camera)
        if entry is None:
            entry = self._t.cameras[camera] = CameraEntry(line=line)
        return entry

    def _frame(self, message: Message) -> None:
        with self._lock:
            self._entry(message["camera"], message["line"])
            self._t.latest[message["camera"]] = message

    def _camera(self, message: Message) -> None:
        with self._lock:
            entry = self._entry(message["camera"], message["line"])
            entry.line = message["line"]
            entry.status = message
            entry.status_mono = self._clock()
            worker = message.get("worker")
            entry.worker = worker if isinstance(worker, str) else entry.worker
            model = message.get("model")
            entry.model = model if isinstance(model, str) else entry.model

    def _worker(self, message: Message) -> None:
        cameras = [c for c in message.get("cameras") or [] if isinstance(c, dict)]
        models = [m for m in message.get("models") or [] if isinstance(m, dict)]
        status = OFFLINE if message.get("status") == OFFLINE else ONLINE
        worker_id = message["worker"]
        with self._lock:
            known = self._t.workers.get(worker_id)
            if status == OFFLINE and not models and known is not None:
                models = known.models  # a last will lists no models: keep the last known
            self._t.workers[worker_id] = WorkerEntry(
                status, message.get("reason"), cameras, models
            )
            for cam in cameras:
                cam_id, line = cam.get("camera"), cam.get("line")
                if not (isinstance(cam_id, str) and isinstance(line, str)):
                    continue
                entry = self._entry(cam_id, line)
                if entry.worker is None:
                    entry.worker = worker_id
                if entry.model is None and isinstance(cam.get("model"), str):
                    entry.model = cam["model"]
        if status == OFFLINE and message.get("reason") == STOPPED_REASON:
            log.info("worker %s stopped: its cameras are stopped", worker_id)
        elif status == OFFLINE:
            log.warning("worker %s is offline (%s): its cameras are down", worker_id,
                        message.get("reason"))

    def _state(self, message: Message) -> None:
        with self._lock:
            self._t.lines[message["line"]] = message

    # -- the read side

    def camera_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._t.cameras)

    def camera(self, camera_id: str) -> CameraSnapshot | None:
        with self._lock:
            entry = self._t.cameras.get(camera_id)
            if entry is None:
                return None
            worker = self._t.workers.get(entry.worker) if entry.worker else None
            return _camera_snapshot(camera_id, entry, worker, self._clock(), self.stale_after_s)

    def latest(self, camera_id: str) -> Message | None:
        with self._lock:
            return self._t.latest.get(camera_id)

    def workers(self) -> dict[str, WorkerEntry]:
        with self._lock:
            return dict(self._t.workers)

    def lines(self) -> dict[str, Message]:
        with self._lock:
            return dict(self._t.lines)

    def camera_model(self, camera_id: str) -> str | None:
        with self._lock:
            entry = self._t.cameras.get(camera_id)
            return entry.model if entry else None


_SNAPSHOT_FIELDS = set(CameraSnapshot.model_fields)


def _camera_snapshot(
    camera_id: str, entry: CameraEntry, worker: WorkerEntry | None, now: float, stale_s: float
) -> CameraSnapshot:
    """One camera as the API shows it: its last status, overruled by its worker's presence."""
    base: dict[str, Any] = {
        "id": camera_id, "source": "", "state": "connecting", "reason": None, "fps": 0.0,
        "reconnects": 0, "frames_captured": 0, "frames_processed": 0, "frames_dropped": 0,
        "model": entry.model or "", "line": entry.line,
    }
    if entry.status is not None:
        base.update({k: v for k, v in entry.status.items() if k in _SNAPSHOT_FIELDS and k != "id"})
    if worker is not None and worker.status == OFFLINE:
        stopped = worker.reason == STOPPED_REASON
        base.update(
            state="stopped" if stopped else "down", fps=0.0,
            reason=f"worker {entry.worker} stopped" if stopped
            else f"worker {entry.worker} is offline: {worker.reason or 'no reason given'}",
        )
    elif entry.status_mono is not None and now - entry.status_mono > stale_s:
        base.update(
            state="down", fps=0.0,
            reason=f"no status from worker {entry.worker} for {now - entry.status_mono:.0f} s",
        )
    try:
        return CameraSnapshot.model_validate(base)
    except ValidationError as exc:
        return CameraSnapshot(
            id=camera_id, source=str(base.get("source", "")), state="down",
            reason=f"unreadable status message: {exc.errors()[0]['msg']}", fps=0.0,
            last_frame_time=None, last_frame_ts=None,
            reconnects=0, frames_captured=0, frames_processed=0, frames_dropped=0,
            model=entry.model or "", line=entry.line,
        )


class RemoteView:
    """The API's read-only view (a ``RuntimeView``) of cameras heard over MQTT."""

    def __init__(self, state: RemoteState, connection: MqttConnection, config: Config) -> None:
        self._state = state
        self._connection = connection
        self._config = config

    def cameras(self) -> list[CameraSnapshot]:
        snaps = (self._state.camera(c) for c in self._state.camera_ids())
        return [s for s in snaps if s is not None]

    def camera(self, camera_id: str) -> CameraSnapshot | None:
        return self._state.camera(camera_id)

    def models(self) -> list[ModelSnapshot]:
        """Every model a worker announced; one entry per id, cameras of all workers merged."""
        merged: dict[str, dict[str, Any]] = {}
        for worker in self._state.workers().values():
            online = worker.status == ONLINE
            for model in worker.models:
                mid = model.get("id")
                if not isinstance(mid, str):
                    continue
                seen = merged.get(mid)
                if seen is None:
                    merged[mid] = {**model, "loaded": online,
                                   "cameras": list(model.get("cameras") or [])}
                    continue
                seen["loaded"] = seen["loaded"] or online
                seen["cameras"] = sorted({*seen["cameras"], *(model.get("cameras") or [])})
                providers = {*str(seen["provider"]).split(", "), str(model.get("provider"))}
                seen["provider"] = ", ".join(sorted(providers))
        out = []
        for mid in sorted(merged):
            try:
                out.append(ModelSnapshot.model_validate(merged[mid]))
            except ValidationError as exc:
                log.warning("MQTT: model %s announced with unreadable fields: %s", mid, exc)
        return out

    def readiness(self) -> Readiness:
        reasons = []
        if not self._connection.connected:
            reasons.append(self._connection.describe())
        elif not self._connection.subscribed:
            reasons.append("subscribing to the broker's topics")
        workers = self._state.workers().values()
        online = sum(1 for w in workers if w.status == ONLINE)
        up = sum(1 for c in self.cameras() if c.state == "up")
        return Readiness(
            ready=not reasons, models_loaded=online > 0, cameras_up=up, reasons=reasons
        )

    def latest(self, camera_id: str) -> LatestSnapshot | None:
        message = self._state.latest(camera_id)
        return None if message is None else LatestSnapshot(None, message)

    def classes(self, camera_id: str) -> Sequence[ClassInfo]:
        model_id = self._state.camera_model(camera_id)
        for model in self.models():
            if model.id == model_id:
                return tuple(_class_info(c) for c in model.classes)
        return ()

    def lines(self) -> list[dict[str, Any]]:
        """The newest snapshot (``state`` message fields) of every line heard of."""
        lines = self._state.lines()
        return [_line_snapshot(lines[k]) for k in sorted(lines)]

    def line(self, line_id: str) -> dict[str, Any] | None:
        message = self._state.lines().get(line_id)
        return None if message is None else _line_snapshot(message)

    def effective_config(self) -> dict[str, Any]:
        from service.app import masked_config

        return masked_config(self._config)


def _line_snapshot(message: Message) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k not in ("v", "type")}


def _class_info(c: ClassSnapshot) -> ClassInfo:
    return ClassInfo(c.name, tuple(c.keypoints), tuple((a, b) for a, b in c.skeleton))


def api_subscriptions(settings: MqttSettings) -> list[tuple[str, int]]:
    return [(f, settings.qos if reliable else 0) for f, reliable in settings.topics.subscriptions()]


def run_api(config_path: Path | None, host: str | None = None, port: int | None = None) -> None:
    """``linewatch api``: the REST and websocket API, fed from the broker, until SIGTERM."""
    from service.api.factory import create_app
    from service.api.server import bind_socket, bound_port, run_server
    from service.api.ws import WebsocketClients
    from service.app import api_settings, setup_logging
    from service.config import load_config

    config = load_config(config_path, check_files=False)  # the API loads no model
    setup_logging(config.logging.level, config.logging.json_)
    settings = MqttSettings.from_config(config.bus, role="api")
    host = host or config.api.host
    sock = bind_socket(host, config.api.port if port is None else port)
    connection: MqttConnection | None = None
    try:
        hub = Hub(frame_queue=config.bus.frame_queue, event_limit=config.bus.event_queue_limit)
        state = RemoteState(
            settings.topics, hub, stale_after_s=max(10.0, 5 * config.bus.mqtt.status_interval_s)
        )
        connection = MqttConnection(settings, on_message=state.ingest)
        link = connection
        link.on_connected(lambda: link.subscribe(api_subscriptions(settings)))
        clients = WebsocketClients()
        app = create_app(RemoteView(state, link, config), hub, api_settings(config),
                         clients=clients, events=state.events)
        link.start()
        log.info(
            "LineWatch API on http://%s:%d fed from %s (topics %s/#)", host, bound_port(sock),
            settings.address, settings.topics.prefix,
        )

        def drain() -> None:
            link.stop()
            hub.close()

        run_server(app, sock, drain=drain, clients=clients, log_level=config.logging.level.lower())
    finally:
        if connection is not None:
            connection.stop()
        sock.close()
