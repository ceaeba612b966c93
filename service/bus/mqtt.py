"""MQTT: the bus between ``linewatch worker`` processes and ``linewatch api`` processes.

Topics (prefix ``linewatch/v1`` by default, see docs/mqtt.md)::

    <prefix>/<line>/<camera>/frames   frame messages            QoS 0
    <prefix>/<line>/state             line state                QoS 1, retained
    <prefix>/<line>/events            rule and state events     QoS 1
    <prefix>/<line>/<camera>/status   camera status             QoS 1, retained
    <prefix>/workers/<worker-id>      worker online / offline   QoS 1, retained (the LWT)

Payloads are the bus messages as compact JSON (``"v": 1``, ``"type"``).

Public API::

    from service.bus.mqtt import MqttConnection, MqttPublisher, MqttSettings, Topics

    settings = MqttSettings.from_config(config.bus, role="worker")
    connection = MqttConnection(settings, will=(topic, payload))   # reconnects by itself
    publisher = MqttPublisher(connection, settings)   # publish(message) never blocks
    connection.start(); publisher.start()
    publisher.publish({"v": 1, "type": "frame", "line": "line-1", "camera": "cam-1", ...})
    publisher.flush(5.0); publisher.close(); connection.stop()

The pure parts (:class:`Topics`, :func:`encode`, :func:`decode`, the message
builders) need no broker.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from service.config import BusConfig, parse_mqtt_url
from service.errors import ConfigError
from service.telemetry.metrics import MQTT_CONNECTED, MQTT_DROPPED, MQTT_SENT

log = logging.getLogger(__name__)

Message = dict[str, Any]
MESSAGE_VERSION = 1
WORKERS = "workers"
"""The topic level of worker presence messages (a line may not be called ``workers``)."""

Kind = Literal["frame", "state", "event", "camera", "worker"]
WORKER_TYPE = "worker"
WorkerStatus = Literal["online", "offline"]
ONLINE: Final = "online"
OFFLINE: Final = "offline"

# --- topics (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message goes: its topic, whether it is retained and whether it may be lost."""

    topic: str
    kind: Kind
    retain: bool
    reliable: bool  # QoS >= 1; False: QoS 0 (frames)


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What a topic says about its message (the subscriber side of :class:`Topics`)."""

    kind: Kind
    line: str | None = None
    camera: str | None = None
    worker: str | None = None


_LEVEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class Topics:
    """Topic names under one prefix, both ways: message -> topic, topic -> kind."""

    def __init__(self, prefix: str = "linewatch/v1") -> None:
        self.prefix = prefix.rstrip("/")
        self._depth = len(self.prefix.split("/"))

    def frames(self, line: str, camera: str) -> str:
        return f"{self.prefix}/{line}/{camera}/frames"

    def state(self, line: str) -> str:
        return f"{self.prefix}/{line}/state"

    def events(self, line: str) -> str:
        return f"{self.prefix}/{line}/events"

    def camera_status(self, line: str, camera: str) -> str:
        return f"{self.prefix}/{line}/{camera}/status"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}/{WORKERS}/{worker_id}"

    def subscriptions(self) -> list[tuple[str, bool]]:
        """(filter, reliable) pairs that an API subscribes to."""
        p = self.prefix
        return [
            (f"{p}/{WORKERS}/+", True),
            (f"{p}/+/+/status", True),
            (f"{p}/+/state", True),
            (f"{p}/+/events", True),
            (f"{p}/+/+/frames", False),
        ]

    def route(self, message: Mapping[str, Any]) -> Route | None:
        """The topic of a bus message; None when it names no valid line/camera/worker."""
        kind = message.get("type")
        if kind == WORKER_TYPE:
            worker = message.get("worker")
            return Route(self.worker(worker), "worker", True, True) if _level(worker) else None
        line = message.get("line")
        if not _level(line) or line == WORKERS:
            return None
        if kind == "state":
            return Route(self.state(line), "state", True, True)
        if kind == "event":
            return Route(self.events(line), "event", False, True)
        camera = message.get("camera")
        if not _level(camera):
            return None
        if kind == "frame":
            return Route(self.frames(line, camera), "frame", False, False)
        if kind == "camera":
            return Route(self.camera_status(line, camera), "camera", True, True)
        return None

    def parse(self, topic: str) -> TopicInfo | None:
        """What a received topic carries; None for a topic outside this scheme."""
        if not topic.startswith(self.prefix + "/"):
            return None
        levels = topic.split("/")[self._depth :]
        if not all(_level(lvl) for lvl in levels):
            return None
        if len(levels) == 2:
            first, last = levels
            if first == WORKERS:
                return TopicInfo("worker", worker=last)
            if last == "state":
                return TopicInfo("state", line=first)
            if last == "events":
                return TopicInfo("event", line=first)
        elif len(levels) == 3 and levels[0] != WORKERS:
            line, camera, last = levels
            if last == "frames":
                return TopicInfo("frame", line=line, camera=camera)
            if last == "status":
                return TopicInfo("camera", line=line, camera=camera)
        return None



def _level(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(_LEVEL_RE.match(value))


# --- payloads (pure) ----------------------------------------------------------------


class PayloadError(ValueError):
    """A received payload that is not a LineWatch message."""


def encode(message: Mapping[str, Any]) -> bytes:
    """Compact JSON in UTF-8; ValueError for NaN/infinity or values JSON cannot hold."""
    return json.dumps(
        message, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    ).encode()


def decode(payload: bytes) -> Message:
    """A received payload -> message dict; :class:`PayloadError` when it is not one."""
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise PayloadError(f"not a JSON object but a {type(message).__name__}")
    if message.get("v") != MESSAGE_VERSION:
        raise PayloadError(f"unsupported message version {message.get('v')!r}")
    if not isinstance(message.get("type"), str):
        raise PayloadError("no 'type'")
    return message


def iso_utc(t_wall: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with milliseconds (2026-01-01T12:00:00.125Z)."""
    millis = int(t_wall % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_wall)) + f".{millis:03d}Z"


def worker_message(
    worker_id: str,
    status: WorkerStatus,
    cameras: Iterable[Mapping[str, Any]],
    *,
    reason: str | None = None,
    models: Iterable[Mapping[str, Any]] = (),
    host: str | None = None,
    t_wall: float | None = None,
) -> Message:
    """The worker presence message (retained; its ``offline`` form is the LWT)."""
    message: Message = {
        "v": MESSAGE_VERSION,
        "type": WORKER_TYPE,
        "worker": worker_id,
        "status": status,
        "reason": reason,
        "cameras": [dict(c) for c in cameras],
        "models": [dict(m) for m in models],
        "host": host,
    }
    if t_wall is not None:
        message["time"] = iso_utc(t_wall)
        message["ts"] = round(t_wall, 3)
    return message


def camera_message(worker_id: str, snapshot: Mapping[str, Any], t_wall: float) -> Message:
    """A camera status message from a camera snapshot (``id`` becomes ``camera``)."""
    body = {k: v for k, v in snapshot.items() if k != "id"}
    return {
        "v": MESSAGE_VERSION,
        "type": "camera",
        "camera": snapshot["id"],
        **body,
        "worker": worker_id,
        "time": iso_utc(t_wall),
        "ts": round(t_wall, 3),
    }


# --- settings --------------------------------------------------------------------------


def default_worker_id() -> str:
    """The host name as an id (lowercase letters, digits, '-' and '_')."""
    name = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-")
    return name[:64] or "worker"


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker, from ``bus`` in the config."""

    host: str
    port: int
    tls: bool
    client_id: str
    topics: Topics
    qos: int = 1
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    keepalive_s: int = 15
    reconnect_max_s: float = 30.0
    outgoing_frames: int = 32
    outgoing_limit: int = 10_000
    role: str = "worker"
    # the broker keeps the session (subscriptions, QoS 1 messages missed while away)
    persistent: bool = False

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_config(
        cls, bus: BusConfig, *, role: Literal["worker", "api"], worker_id: str | None = None
    ) -> MqttSettings:
        scheme = bus.url.split("://", 1)[0].lower()
        if scheme not in ("mqtt", "mqtts"):
            raise ConfigError(
                f"bus.url is {bus.url!r}, but linewatch {role} talks to an MQTT broker: set "
                "bus.url to mqtt://host:1883 (or mqtts://host:8883), e.g. with "
                "LINEWATCH_BUS__URL=mqtt://broker:1883 (docs/mqtt.md)"
            )
        host, port, tls = parse_mqtt_url(bus.url)
        mq = bus.mqtt
        if mq.client_id:
            client_id = mq.client_id
        elif role == "worker":
            client_id = f"linewatch-worker-{worker_id or mq.worker_id or default_worker_id()}"
        else:
            client_id = f"linewatch-api-{default_worker_id()}-{secrets.token_hex(3)}"
        # An API with a client id of its own keeps its broker session: the events, states
        # and camera statuses published while it restarts or is cut off wait for it.
        persistent = role == "api" and bool(mq.client_id)
        return cls(
            host=host, port=port, tls=tls, client_id=client_id,
            topics=Topics(mq.topic_prefix), qos=mq.qos, username=mq.username,
            password=mq.password.get_secret_value() if mq.password else None,
            ca_file=mq.ca_file, keepalive_s=mq.keepalive_s, reconnect_max_s=mq.reconnect_max_s,
            outgoing_frames=mq.outgoing_frames, outgoing_limit=mq.outgoing_limit, role=role,
            persistent=persistent,
        )


# --- the connection ----------------------------------------------------------------------


class MqttConnection:
    """One paho client: connects in the background and reconnects with backoff.

    ``on_connected`` callbacks run on paho's network thread after every
    (re)connect (subscribe there, republish retained state); ``on_message``
    receives (topic, payload) on the same thread and must not block.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: tuple[str, bytes] | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._connected_callbacks: list[Callable[[], None]] = []
        self._publish_callbacks: list[Callable[[], None]] = []
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connected = False
        self._subscribed = False
        self._started = False
        self.connects = 0
        self.last_error: str | None = "not connected yet"
        self._metric = MQTT_CONNECTED.labels(settings.role)
        self._metric.set(0)
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=settings.client_id,
            protocol=paho.MQTTv311, clean_session=not settings.persistent,
        )
        client.reconnect_delay_set(1, max(1, int(settings.reconnect_max_s)))
        client.max_inflight_messages_set(MqttPublisher.RELIABLE_WINDOW)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if will is not None:
            client.will_set(will[0], will[1], qos=settings.qos, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_message = self._handle_message
        self.client = client

    # -- callbacks registration

    def on_connected(self, callback: Callable[[], None]) -> None:
        self._connected_callbacks.append(callback)

    def on_published(self, callback: Callable[[], None]) -> None:
        self._publish_callbacks.append(callback)

    def on_disconnected(self, callback: Callable[[], None]) -> None:
        self._disconnect_callbacks.append(callback)

    # -- lifecycle

    def start(self) -> None:
        """Connect in the background (a broker that is down is retried with backoff)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        s = self.settings
        log.info("MQTT %s: connecting to %s as %s%s", s.role, s.address, s.client_id,
                 " (persistent session)" if s.persistent else "")
        self.client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop the thread."""
        with self._lock:
            if not self._started:
                return
            self._started = False
        self.client.disconnect()
        self.client.loop_stop()
        # paho's loop_stop leaves the network socket and its wake-up socket pair open
        self.client._reset_sockets()
        with self._lock:
            self._connected = False
            self._changed.notify_all()
        self._metric.set(0)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        self._subscribed = False
        result, _mid = self.client.subscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("MQTT subscribe failed: %s", paho.error_string(result))

    def describe(self) -> str:
        """One line for readiness reasons and logs."""
        if self._connected:
            return f"connected to {self.settings.address}"
        return f"not connected to the MQTT broker {self.settings.address}: {self.last_error}"

    # -- paho callbacks (network thread)

    def _handle_connect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"the broker refused the connection: {reason}"
            log.error("MQTT %s: %s", self.settings.role, self.last_error)
            return
        with self._lock:
            self._connected = True
            self.connects += 1
            self.last_error = None
            self._changed.notify_all()
        self._metric.set(1)
        log.info("MQTT %s: connected to %s", self.settings.role, self.settings.address)
        for callback in self._connected_callbacks:
            callback()

    def _handle_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self.last_error = "cannot reach the broker (retrying with backoff)"
        log.warning("MQTT %s: cannot reach %s; retrying", self.settings.role,
                    self.settings.address)

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            self._subscribed = False
            if self._started:
                self.last_error = f"connection lost ({reason}); reconnecting"
            self._changed.notify_all()
        self._metric.set(0)
        if was and self._started:
            log.warning("MQTT %s: disconnected from %s (%s); reconnecting with backoff",
                        self.settings.role, self.settings.address, reason)
        for callback in self._disconnect_callbacks:
            callback()

    def _handle_publish(
        self, _client: paho.Client, _userdata: Any, _mid: int, _reason: Any, _props: Any
    ) -> None:
        for callback in self._publish_callbacks:
            callback()

    def _handle_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("MQTT %s: the broker refused %d subscription(s): %s",
                      self.settings.role, len(failed), failed)
        self._subscribed = True

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg.topic, bytes(msg.payload))


# --- the publisher -------------------------------------------------------------------------


class MqttPublisher:
    """The worker's side of the bus: ``publish`` never blocks and never waits on the broker.

    A sender thread hands messages to the MQTT client while it is connected, at
    most ``FRAME_WINDOW`` frames and ``RELIABLE_WINDOW`` QoS 1 messages in flight.
    What waits meanwhile is bounded:

    - frames: the newest ``outgoing_frames``; older ones are dropped and counted;
    - retained messages (state, camera and worker status): the newest per topic;
    - events: up to ``outgoing_limit``; beyond that the oldest are dropped,
      counted and logged (the worker's store still has them).
    """

    FRAME_WINDOW = 16
    RELIABLE_WINDOW = 32

    def __init__(self, connection: MqttConnection, settings: MqttSettings) -> None:
        self._connection = connection
        self._topics = settings.topics
        self._qos = settings.qos
        self._frames: deque[tuple[Route, Message]] = deque()
        self._frame_limit = settings.outgoing_frames
        self._retained: OrderedDict[str, tuple[Route, Message]] = OrderedDict()
        self._events: deque[tuple[Route, Message]] = deque()
        self._event_limit = settings.outgoing_limit
        self._frames_out: list[paho.MQTTMessageInfo] = []
        self._reliable_out: list[paho.MQTTMessageInfo] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.dropped: dict[tuple[str, str], int] = {}
        connection.on_connected(self._notify)
        connection.on_published(self._notify)
        connection.on_disconnected(self._forget_in_flight)

    # -- producer side (any thread, never blocks)

    def publish(self, message: Message) -> None:
        route = self._topics.route(message)
        if route is None:
            self._drop(str(message.get("type")), "unroutable")
            return
        dropped = False
        with self._lock:
            if self._stop:
                return
            if route.kind == "frame":
                if len(self._frames) >= self._frame_limit:
                    self._frames.popleft()
                    dropped = True
                self._frames.append((route, message))
            elif route.retain:
                self._retained.pop(route.topic, None)  # the newest wins and goes last
                self._retained[route.topic] = (route, message)
            else:
                if len(self._events) >= self._event_limit:
                    self._events.popleft()
                    dropped = True
                self._events.append((route, message))
            self._wake.notify()
        if dropped:
            self._drop(route.kind, "queue_full")
            if route.kind != "frame":
                log.error(
                    "MQTT: %d events waiting for the broker (bus.mqtt.outgoing_limit): "
                    "dropping the oldest", self._event_limit,
                )

    def pending(self) -> int:
        """Messages waiting for the broker, plus those in flight."""
        with self._lock:
            self._prune_locked()
            return (len(self._frames) + len(self._retained) + len(self._events)
                    + len(self._frames_out) + len(self._reliable_out))

    def pending_reliable(self) -> int:
        with self._lock:
            self._prune_locked()
            return len(self._retained) + len(self._events) + len(self._reliable_out)

    # -- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
            self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every state/event/status message is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending_reliable():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        """Stop the sender thread; what is still queued is dropped."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    # -- the sender thread

    def _notify(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _forget_in_flight(self) -> None:
        """After a disconnect: QoS 0 frames in flight are gone; paho resends QoS 1 itself."""
        with self._lock:
            self._frames_out.clear()
            self._reliable_out.clear()
            self._wake.notify_all()

    def _prune_locked(self) -> None:
        self._frames_out = [m for m in self._frames_out if not _done(m)]
        self._reliable_out = [m for m in self._reliable_out if not _done(m)]

    def _next_locked(self) -> tuple[Route, Message] | None:
        if not self._connection.connected:
            return None
        self._prune_locked()
        if len(self._reliable_out) < self.RELIABLE_WINDOW:
            if self._retained:
                return self._retained.popitem(last=False)[1]
            if self._events:
                return self._events.popleft()
        if self._frames and len(self._frames_out) < self.FRAME_WINDOW:
            return self._frames.popleft()
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                item = None
                while not self._stop:
                    item = self._next_locked()
                    if item is not None:
                        break
                    self._wake.wait(0.25)
                if item is None:
                    return
            self._send(*item)

    def _send(self, route: Route, message: Message) -> None:
        try:
            payload = encode(message)
        except (TypeError, ValueError) as exc:
            self._drop(route.kind, "unencodable")
            log.error("MQTT: cannot encode a %s message for %s: %s", route.kind, route.topic, exc)
            return
        qos = self._qos if route.reliable else 0
        info = self._connection.publish(route.topic, payload, qos=qos, retain=route.retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            MQTT_SENT.labels(route.kind).inc()
            with self._lock:
                (self._reliable_out if route.reliable else self._frames_out).append(info)
        elif route.reliable and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            MQTT_SENT.labels(route.kind).inc()  # paho keeps it and sends it after reconnecting
        else:
            self._drop(route.kind, "disconnected")

    def _drop(self, kind: str, reason: str) -> None:
        key = (kind, reason)
        with self._lock:
            self.dropped[key] = self.dropped.get(key, 0) + 1
        MQTT_DROPPED.labels(kind, reason).inc()


def _done(info: paho.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (ValueError, RuntimeError):  # never queued: nothing to wait for
        return True
