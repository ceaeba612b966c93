"""The inference loop: newest frame of each camera -> one batch -> stages -> messages.

One :class:`InferenceLoop` runs per model, in its own thread.  Each turn it takes
the newest frame of each of its cameras (a camera keeps only its newest frame and
counts the ones it replaced: nothing is ever queued here), runs them through the
model as one batch when the model has a dynamic batch dimension (optionally
waiting up to ``batch_window_s`` for the cameras that had no new frame yet), then
runs each camera's cheap stages (:class:`CameraStages`: one tracker update, one
vectorised pose fit when the camera is calibrated, its line's rule engine), turns
every result into a frame message (:func:`build_frame_message`, a pure function)
and publishes it.  Rule and state changes go through the :class:`EventRecorder`:
stored first (durable), then published as ``event`` messages, followed by the
line's ``state`` message.

This is the hot path: no image copies, no per-keypoint Python beyond building the
message dicts, metric children bound once.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt

from service.domain import ClassInfo, Detections, Event, Frame, ImageArray, Tracks
from service.geometry import Homography, PoseEstimator, joint_angles
from service.rules import RuleEngine
from service.telemetry.metrics import (
    CAPTURE_TO_PUBLISH,
    FRAMES_PROCESSED,
    INSTANCES,
)
from service.tracking import Tracker

log = logging.getLogger(__name__)

MESSAGE_VERSION = 1
DET_ROW = "det_row"  # Detections.extra key: the row of each track's detection
Message = dict[str, Any]


# --- the frame message (pure) ---------------------------------------------------


def _is_chain(info: ClassInfo) -> bool:
    """A class whose skeleton is one open chain 0-1-2-... over all its keypoints (an arm)."""
    k = len(info.keypoint_names)
    return k >= 3 and tuple(info.skeleton) == tuple((i, i + 1) for i in range(k - 1))


@dataclass(frozen=True, slots=True)
class ClassTable:
    """Class names and keypoint names by class id, looked up once per model.

    ``chains`` are the ids of classes whose skeleton is one open chain (a robot
    arm): their frame messages carry the chain's joint angles.
    """

    names: tuple[str, ...]
    keypoint_names: tuple[tuple[str, ...], ...]
    chains: frozenset[int] = frozenset()

    @classmethod
    def from_classes(cls, classes: Sequence[ClassInfo]) -> ClassTable:
        return cls(
            names=tuple(c.name for c in classes),
            keypoint_names=tuple(tuple(c.keypoint_names) for c in classes),
            chains=frozenset(i for i, c in enumerate(classes) if _is_chain(c)),
        )

    def name(self, class_id: int) -> str:
        return self.names[class_id] if 0 <= class_id < len(self.names) else f"class_{class_id}"

    def keypoints(self, class_id: int, num_slots: int) -> tuple[str, ...]:
        """Names of the keypoint slots this class uses (unnamed slots get their index)."""
        if 0 <= class_id < len(self.keypoint_names) and self.keypoint_names[class_id]:
            return self.keypoint_names[class_id][:num_slots]
        return tuple(str(i) for i in range(num_slots))


def iso_utc(t_wall: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with milliseconds, e.g. 2026-01-01T12:00:00.125Z."""
    return datetime.fromtimestamp(t_wall, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _nan_to_none(values: list[Any]) -> list[Any]:
    return [None if v != v else v for v in values]  # NaN != NaN


def _track_columns(
    detections: Detections, tracks: Tracks | None
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(detection rows, track rows) of the detections that belong to a confirmed track."""
    if tracks is None or not len(tracks):
        empty = np.zeros(0, np.intp)
        return empty, empty
    rows = tracks.detections.extra.get(DET_ROW)
    if rows is None:
        raise ValueError(f"tracks carry no {DET_ROW!r}: run the tracker through CameraStages")
    return np.asarray(rows, np.intp), np.arange(len(tracks), dtype=np.intp)


def build_frame_message(
    frame: Frame,
    detections: Detections,
    classes: ClassTable,
    *,
    model: str,
    line: str | None,
    published_mono: float,
    sim_t: float | None = None,
    tracks: Tracks | None = None,
) -> Message:
    """The ``frame`` message (DESIGN.md "Messages") for one processed frame.

    ``published_mono`` is ``time.monotonic()`` at publish; ``age_ms`` is measured on
    the monotonic clock from capture.  Pixel values are rounded to 0.01 px and
    scores to 0.001 in numpy, before the arrays become Python lists.

    With ``tracks`` (the camera's confirmed tracks of this frame), an instance that
    belongs to a track carries the track's smoothed box and keypoints, its
    ``track_id`` and ``velocity`` (px/s, and mm/s when calibrated); with millimetre
    fields in the tracks (a calibrated camera), every keypoint gains ``x_mm`` /
    ``y_mm`` (null when not seen), rigid parts a ``pose`` and chain classes (an
    arm) ``joints_deg``.  Other instances have ``track_id`` null.
    """
    n = len(detections)
    boxes_arr = detections.boxes
    kps_arr = detections.keypoints
    det_rows, trk_rows = _track_columns(detections, tracks)
    track_ids = [None] * n
    calibrated = tracks is not None and tracks.keypoints_mm is not None
    if len(det_rows):
        assert tracks is not None
        boxes_arr = boxes_arr.copy()
        kps_arr = kps_arr.copy()
        boxes_arr[det_rows] = tracks.detections.boxes[trk_rows]
        kps_arr[det_rows] = tracks.detections.keypoints[trk_rows]
    # float64 before rounding: a rounded float32 prints as 0.9729999899864197 in JSON
    boxes = boxes_arr.astype(np.float64).round(2).tolist()
    scores = detections.scores.astype(np.float64).round(3).tolist()
    class_ids = detections.class_ids.tolist()
    num_slots = int(kps_arr.shape[1])
    kp64 = kps_arr.astype(np.float64)
    kp_xy = kp64[:, :, :2].round(2).tolist()
    kp_score = kp64[:, :, 2].round(3).tolist()

    extras: list[dict[str, Any]] = [{} for _ in range(n)]
    kp_mm: list[Any] | None = None
    if len(det_rows):
        assert tracks is not None
        ids = tracks.track_ids[trk_rows].tolist()
        v_px = tracks.velocity_px_s[trk_rows].astype(np.float64).round(1).tolist()
        v_mm: list[Any] = [None] * len(det_rows)
        poses: list[Any] = [None] * len(det_rows)
        joints: dict[int, list[Any]] = {}
        if calibrated:
            assert tracks.keypoints_mm is not None
            mm = np.full((n, num_slots, 2), np.nan)  # float64
            mm[det_rows] = tracks.keypoints_mm[trk_rows]
            kp_mm = mm.round(2).tolist()
            if tracks.velocity_mm_s is not None:
                v_mm = tracks.velocity_mm_s[trk_rows].astype(np.float64).round(1).tolist()
            if tracks.poses is not None and tracks.pose_residual_mm is not None:
                pose_arr = np.column_stack(
                    [tracks.poses[trk_rows], tracks.pose_residual_mm[trk_rows]]
                ).astype(np.float64)
                poses = pose_arr.round(2).tolist()
            chain_rows = [
                j for j, r in enumerate(det_rows.tolist()) if class_ids[r] in classes.chains
            ]
            if chain_rows:
                angles = joint_angles(tracks.keypoints_mm[trk_rows[chain_rows]].astype(np.float64))
                for j, row in zip(chain_rows, angles.round(2).tolist(), strict=True):
                    joints[j] = _nan_to_none(row)
        for j, r in enumerate(det_rows.tolist()):
            track_ids[r] = ids[j]
            velocity: dict[str, Any] = {"px_s": v_px[j]}
            if calibrated:
                mm_s = v_mm[j]
                velocity["mm_s"] = None if mm_s is None or mm_s[0] != mm_s[0] else mm_s
            extra: dict[str, Any] = {"velocity": velocity}
            if calibrated:
                pose = poses[j]
                extra["pose"] = (
                    None
                    if pose is None or pose[0] != pose[0]
                    else {
                        "x_mm": pose[0], "y_mm": pose[1], "theta_deg": pose[2],
                        "residual_mm": pose[3],
                    }
                )  # fmt: skip
            if j in joints:
                extra["joints_deg"] = joints[j]
            extras[r] = extra

    instances: list[dict[str, Any]] = []
    for i, class_id in enumerate(class_ids):
        names = classes.keypoints(class_id, num_slots)
        xy = kp_xy[i]
        ks = kp_score[i]
        if kp_mm is not None:
            mm_i = kp_mm[i]
            keypoints = {
                name: {
                    "x": xy[j][0], "y": xy[j][1], "score": ks[j],
                    "x_mm": None if mm_i[j][0] != mm_i[j][0] else mm_i[j][0],
                    "y_mm": None if mm_i[j][1] != mm_i[j][1] else mm_i[j][1],
                }
                for j, name in enumerate(names)
            }  # fmt: skip
        else:
            keypoints = {
                name: {"x": xy[j][0], "y": xy[j][1], "score": ks[j]}
                for j, name in enumerate(names)
            }
        instances.append(
            {
                "class": classes.name(class_id),
                "class_id": class_id,
                "score": scores[i],
                "box": boxes[i],
                "keypoints": keypoints,
                "track_id": track_ids[i],
                **extras[i],
            }
        )
    message: Message = {
        "v": MESSAGE_VERSION,
        "type": "frame",
        "camera": frame.camera,
        "line": line,
        "seq": frame.seq,
        "capture_time": iso_utc(frame.t_wall),
        "capture_ts": round(frame.t_wall, 6),
        "age_ms": round((published_mono - frame.t_mono) * 1000.0, 3),
        "model": model,
        "instances": instances,
    }
    if sim_t is not None:
        message["sim_t"] = round(sim_t, 6)
    return message


def event_message(event: Event) -> Message:
    """The ``event`` message of a stored event (it has its cursor)."""
    return {
        "v": MESSAGE_VERSION,
        "type": "event",
        "cursor": event.cursor,
        "line": event.line,
        "kind": event.kind,
        "name": event.name,
        "old": event.old,
        "new": event.new,
        "t_wall": round(event.t_wall, 6),
        "time": iso_utc(event.t_wall),
        "detail": event.detail,
    }


def state_message(snapshot: dict[str, object]) -> Message:
    """The ``state`` message of a line: its engine's snapshot, with ``v`` and ``type``."""
    return {"v": MESSAGE_VERSION, "type": "state", **snapshot}


# --- what the loop needs from its collaborators -------------------------------


class FrameTaker(Protocol):
    """A camera as the loop sees it (service.sources.Camera)."""

    def take(self, after_seq: int) -> Frame | None: ...

    def wait(self, after_seq: int, timeout: float) -> Any: ...


class Predictor(Protocol):
    """A loaded model as the loop sees it (service.inference.OrtModel)."""

    def predict(self, images: list[ImageArray]) -> list[Detections]: ...


class CameraPredictor(Protocol):
    """A model whose ``per_camera`` is true: its results depend on each image's camera
    (top-down models with fixed ROIs per camera, service.inference.runner.Predictor)."""

    per_camera: bool

    def predict(
        self, images: list[ImageArray], *, cameras: Sequence[str | None]
    ) -> list[Detections]: ...


class Publisher(Protocol):
    """Where messages go (service.bus.Hub); ``publish`` must never block."""

    def publish(self, msg: Message) -> Any: ...


class EventSink(Protocol):
    """Where events are made durable (service.store.EventStore): returns them with cursors."""

    def append(self, events: list[Event]) -> list[Event]: ...


class LatestStates:
    """Newest ``state`` message per line, written by the recorder, read by the API."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, Message] = {}

    def put(self, line: str, message: Message) -> None:
        with self._lock:
            self._latest[line] = message

    def get(self, line: str) -> Message | None:
        with self._lock:
            return self._latest.get(line)


class EventRecorder:
    """Judges, stores and publishes: the only way events leave a rule engine.

    ``judge`` (a camera's tracks) and ``tick`` (the clock) run the engine and
    ``record`` its events under one lock: ``sink.append`` commits them (cursors
    assigned) before anything is published, so every published event is durable,
    and one engine's changes are stored and published in the order it made them,
    whichever thread (inference loops, the ticker) made them.  The line's ``state``
    message follows its events.  A failing sink raises: nothing unstored is published.
    """

    def __init__(
        self, sink: EventSink, publisher: Publisher, states: LatestStates | None = None
    ) -> None:
        self._sink = sink
        self._publisher = publisher
        self._states = states
        self._lock = threading.Lock()

    def judge(
        self, engine: RuleEngine, camera: str, tracks: Tracks, t_wall: float, age_s: float
    ) -> int:
        """``engine.update`` on a camera's tracks, then record; returns events published."""
        with self._lock:
            events = engine.update(camera, tracks, t_wall=t_wall, frame_age_s=age_s)
            return self._emit(engine, events, state=False)

    def tick(self, engine: RuleEngine, now: float) -> int:
        """``engine.tick`` (staleness, idleness), record, and always publish the state."""
        with self._lock:
            return self._emit(engine, engine.tick(now), state=True)

    def record(self, engine: RuleEngine, events: list[Event], *, state: bool = False) -> int:
        """Store + publish ``events`` made by ``engine``; publish the line's state when
        anything changed (or ``state`` is True).  Returns the number of events published."""
        with self._lock:
            return self._emit(engine, events, state=state)

    def _emit(self, engine: RuleEngine, events: list[Event], *, state: bool) -> int:
        stored = self._sink.append(events) if events else []
        for event in stored:
            self._publisher.publish(event_message(event))
        if stored or state:
            message = state_message(engine.snapshot())
            if self._states is not None:
                self._states.put(engine.line.id, message)
            self._publisher.publish(message)
        return len(stored)


@dataclass(slots=True)
class CameraStages:
    """A camera's stages after inference: tracker, pose (when calibrated), its line's rules.

    ``track`` runs one tracker update and one vectorised pose fit; the tracker's
    times are seconds on one clock (monotonic, or simulated).  The running service
    judges the tracks through :meth:`EventRecorder.judge`; ``update`` (track, then
    ``engine.update``) is for single-threaded callers such as ``linewatch rules eval``.
    """

    tracker: Tracker
    pose: PoseEstimator | None = None
    homography: Homography | None = None
    engine: RuleEngine | None = None

    def track(self, detections: Detections, t: float) -> Tracks:
        """Tracks of this frame, mm fields filled when calibrated.

        Marks each detection's row in ``detections.extra`` so that each track finds
        its detection again (``build_frame_message``)."""
        detections.extra[DET_ROW] = np.arange(len(detections), dtype=np.intp)
        tracks = self.tracker.update(detections, t)
        if self.pose is not None and self.homography is not None:
            tracks = self.pose.update(tracks, self.homography)
        return tracks

    def update(
        self, camera: str, detections: Detections, t: float, t_wall: float, age_s: float
    ) -> tuple[Tracks, list[Event]]:
        """Tracks of this frame and the rule events they cause (single-threaded use)."""
        tracks = self.track(detections, t)
        events = (
            self.engine.update(camera, tracks, t_wall=t_wall, frame_age_s=age_s)
            if self.engine is not None
            else []
        )
        return tracks, events


@dataclass(frozen=True, slots=True)
class LatestFrame:
    """The newest processed frame of a camera and its message (never copied)."""

    frame: Frame
    message: Message


class LatestFrames:
    """Newest processed frame per camera, written by loops, read by the API."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, LatestFrame] = {}

    def put(self, camera: str, latest: LatestFrame) -> None:
        with self._lock:
            self._latest[camera] = latest

    def get(self, camera: str) -> LatestFrame | None:
        with self._lock:
            return self._latest.get(camera)


@dataclass(slots=True)
class CameraFeed:
    """One camera of a loop: where its frames come from and what the loop knows."""

    camera_id: str
    source: FrameTaker
    line: str | None = None
    sim_time: Callable[[Frame], float | None] | None = None
    stages: CameraStages | None = None
    last_seq: int = -1
    processed: int = 0


class Pruner(Protocol):
    """The store as the ticker sees it: drop events older than the retention."""

    def prune(self) -> int: ...


class LineTicker:
    """Once a second: each line's staleness/idleness tick and its ``state`` message.

    ``tick(now)`` runs one round (``engine.tick``, then the recorder stores and
    publishes the events and the state), so a line whose cameras stopped sending
    still turns UNKNOWN and clients still get a state at least once a second.  The
    thread also prunes the store at start and once a day.
    """

    def __init__(
        self,
        engines: Sequence[RuleEngine],
        recorder: EventRecorder,
        *,
        pruner: Pruner | None = None,
        interval_s: float = 1.0,
        prune_every_s: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engines = list(engines)
        self._recorder = recorder
        self._pruner = pruner
        self._interval_s = interval_s
        self._prune_every_s = prune_every_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def tick(self, now: float | None = None) -> int:
        """One round over every line; returns the events published."""
        t = self._clock() if now is None else now
        published = 0
        for engine in self._engines:
            published += self._recorder.tick(engine, t)
        return published

    def start(self) -> None:
        if self._thread is None and (self._engines or self._pruner is not None):
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="line-ticker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        next_prune = time.monotonic()
        while not self._stop.is_set():
            try:
                if self._pruner is not None and time.monotonic() >= next_prune:
                    removed = self._pruner.prune()
                    if removed:
                        log.info("store: pruned %d events past the retention", removed)
                    next_prune = time.monotonic() + self._prune_every_s
                self.tick()
            except Exception:  # keep ticking; a failing store is logged loudly each round
                self.errors += 1
                log.exception("line ticker failed")
            self._stop.wait(self._interval_s)


# --- the loop ------------------------------------------------------------------


Batch = tuple[list[Frame], list[CameraFeed]]


class StagedPredictor(Protocol):
    """A model whose ``predict`` is split in three, so that a loop can overlap them:
    ``prepare`` (decode/resize/normalise, CPU), ``infer`` (the session run; ONNX
    Runtime releases the GIL) and ``finish`` (decode the outputs to Detections).
    ``finish(infer(prepare(images, cameras)))`` equals ``predict``."""

    def prepare(
        self, images: list[ImageArray], cameras: Sequence[str | None] | None
    ) -> Any: ...

    def infer(self, prepared: Any) -> Any: ...

    def finish(self, inferred: Any) -> list[Detections]: ...


class _Stages:
    """The three steps of a model, for a model that has them or only ``predict``."""

    def __init__(self, model: Predictor) -> None:
        self._model = model
        self.staged = all(
            callable(getattr(model, name, None)) for name in ("prepare", "infer", "finish")
        )
        self._per_camera = bool(getattr(model, "per_camera", False))

    def prepare(self, frames: list[Frame]) -> Any:
        images = [f.image for f in frames]
        # only a model with per-camera ROIs is told whose frames these are
        cameras: list[str | None] | None = (
            [f.camera for f in frames] if self._per_camera else None
        )
        if self.staged:
            return cast(StagedPredictor, self._model).prepare(images, cameras)
        return images, cameras

    def infer(self, prepared: Any) -> Any:
        if self.staged:
            return cast(StagedPredictor, self._model).infer(prepared)
        images, cameras = prepared
        if self._per_camera:  # fixed ROIs per camera: say whose
            return cast(CameraPredictor, self._model).predict(images, cameras=cameras)
        return self._model.predict(images)

    def finish(self, inferred: Any) -> list[Detections]:
        if self.staged:
            return cast(StagedPredictor, self._model).finish(inferred)
        return cast(list[Detections], inferred)


# Prepare the next batch this long before the model needs it: the larger of a fixed
# margin and a share of the run, which covers how much a run's end and the preparing
# itself vary on a busy CPU. (YOLO11n-pose on 2 cores, two instances, 60 ms runs: a
# 1 ms margin left each instance idle 2.9 % of the time, waiting for its batch; 6 ms,
# 0.8 %; the frame is taken that much earlier.)
JIT_MARGIN_S = 0.001
JIT_MARGIN_SHARE = 0.1


def prepare_at(started: float, run_s: float, prepare_s: float) -> float:
    """When to start preparing the next batch for a run that started at ``started``
    and takes ``run_s`` (typical values), preparing taking ``prepare_s``."""
    return started + run_s - prepare_s - max(JIT_MARGIN_S, JIT_MARGIN_SHARE * run_s)


class _Mean:
    """An exponential moving average of durations (seconds)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.value = 0.0
        self._weight = weight
        self.empty = True

    def add(self, seconds: float) -> None:
        if self.empty:
            self.value, self.empty = seconds, False
        else:
            self.value += self._weight * (seconds - self.value)


T = TypeVar("T")


class _Handoff(Generic[T]):
    """A short queue between two threads of a loop.

    ``put`` blocks while ``depth`` items wait (the next step is behind: the loop
    stops taking frames and the cameras keep only their newest), giving up only
    when ``stop`` is set; ``get`` blocks until an item comes and returns None once
    the queue is closed and drained.
    """

    def __init__(self, depth: int) -> None:
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._depth = max(1, depth)
        self._closed = False

    def put(self, item: T, stop: threading.Event | None = None) -> bool:
        with self._cond:
            while len(self._items) >= self._depth and not self._closed:
                if stop is not None and stop.is_set():
                    return False
                self._cond.wait(0.1)
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def wait_empty(self, stop: threading.Event) -> bool:
        """Block until nothing waits in the queue; False when ``stop`` is set first."""
        with self._cond:
            while self._items and not self._closed:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            return not stop.is_set()

    def get(self) -> T | None:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._items.clear()


class _InOrder:
    """Batches from several inference threads, handed on in the order they were taken.

    Each batch has a number from the prepare thread; ``put`` files a batch (or None for
    one whose run failed) under its number, ``get`` returns the next number's batch
    once it is there.  ``put`` blocks while ``depth`` batches wait, except for the
    batch the consumer waits for (so the threads never wait on each other in a ring).
    The queue closes when every producer has closed it.
    """

    def __init__(self, depth: int, producers: int = 1) -> None:
        self._cond = threading.Condition()
        self._items: dict[int, tuple[Batch, Any] | None] = {}
        self._depth = max(1, depth)
        self._producers = self._open = max(1, producers)
        self._next = 0

    def put(self, number: int, item: tuple[Batch, Any] | None) -> None:
        with self._cond:
            while (len(self._items) >= self._depth and number != self._next
                   and self._open == self._producers):
                self._cond.wait(0.1)
            self._items[number] = item
            self._cond.notify_all()

    def get(self) -> tuple[Batch, Any] | None:
        """The next batch in order; None once every producer closed and all is drained."""
        with self._cond:
            while True:
                while self._next in self._items:
                    item = self._items.pop(self._next)
                    self._next += 1
                    self._cond.notify_all()
                    if item is not None:
                        return item
                if self._open == 0:
                    return None
                self._cond.wait()

    def close(self) -> None:
        """One producer is done (the last one closes the queue)."""
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def reopen(self, producers: int) -> None:
        with self._cond:
            self._producers = self._open = max(1, producers)
            self._items.clear()
            self._next = 0


class InferenceLoop:
    """Runs one model over the newest frames of its cameras.

    Started, it runs three threads joined by short queues, so that the model never
    waits for Python work: the *prepare* thread takes the newest frame of each
    camera and preprocesses the batch, just in time for the model; the *inference*
    thread runs the model (ONNX Runtime releases the GIL while it computes); the
    *stage* thread decodes the outputs, tracks, fits poses, judges the rules,
    builds the messages and publishes them.  Frames keep their order per camera.
    A model that takes every CPU core runs the steps in turn on one thread instead
    (see ``overlapped``).  ``stop`` stops taking frames and lets the batches already
    taken through.  ``step`` does it all inline (single-threaded callers and tests).
    """

    def __init__(
        self,
        model_id: str,
        model: Predictor,
        classes: Sequence[ClassInfo],
        feeds: Sequence[CameraFeed],
        publisher: Publisher,
        *,
        max_batch: int = 1,
        batch_window_s: float = 0.0,
        latest: LatestFrames | None = None,
        recorder: EventRecorder | None = None,
        idle_wait_s: float = 0.1,
        poll_s: float = 0.004,
        handoff_depth: int = 2,
    ) -> None:
        if not feeds:
            raise ValueError(f"inference loop for model {model_id!r} has no cameras")
        self.model_id = model_id
        self._model = model
        self._steps = _Stages(model)
        self._classes = ClassTable.from_classes(classes)
        self._feeds = list(feeds)
        self._publisher = publisher
        self._max_batch = max(1, int(max_batch))
        self._batch_window_s = max(0.0, batch_window_s)
        self._latest = latest
        self._recorder = recorder
        if recorder is None and any(f.stages and f.stages.engine for f in self._feeds):
            raise ValueError(f"inference loop {model_id!r} has rule engines but no recorder")
        self._idle_wait_s = idle_wait_s
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # one batch ready while the model runs the last (numbered: kept in order after)
        self._prepared: _Handoff[tuple[int, Batch, Any]] = _Handoff(1)
        # instances of the model that run batches side by side (OrtModel.instances)
        self._workers = max(1, int(getattr(model, "instances", 1)))
        self._runs: dict[int, float] = {}  # worker -> perf_counter() of its run in progress
        self._run_s = _Mean()
        self._prepare_s = _Mean()
        self._inferred = _InOrder(handoff_depth, self._workers)
        self._numbers = itertools.count()
        self._wait_index = 0
        self.batches = 0
        self._count_lock = threading.Lock()
        self.errors = 0
        self.last_error: str | None = None
        self._camera_metrics = {
            f.camera_id: (
                FRAMES_PROCESSED.labels(f.camera_id),
                CAPTURE_TO_PUBLISH.labels(f.camera_id),
                INSTANCES.labels(f.camera_id),
            )
            for f in self._feeds
        }

    # -- lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._prepared.reopen()
        self._inferred.reopen(self._workers)
        self._numbers = itertools.count()
        self._runs.clear()
        inference = [
            (f"inference{i if self._workers > 1 else ''}",
             functools.partial(self._run_inference, i))
            for i in range(self._workers)
        ]
        steps: list[tuple[str, Callable[[], None]]] = (
            [("stages", self._run_stages), *inference, ("prepare", self._run_prepare)]
            if self.overlapped
            else [("inference", self._run_serial)]
        )
        for name, target in steps:
            thread = threading.Thread(target=target, name=f"{name}-{self.model_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking frames; publish the batches already taken, then return."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in reversed(self._threads):  # prepare, inference, stages: in flow order
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop within %.1f s", thread.name, timeout)
        self._threads = []

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def overlapped(self) -> bool:
        """Whether the steps run on three threads.  A model that takes every CPU core
        (a heavy model on the CPU: ``uses_all_cores``) runs them in turn on one thread
        instead: Python work beside a run that fills every core only preempts its
        threads, which then wait for each other at each operator.  A model with
        several instances gets one inference thread per instance."""
        return not bool(getattr(self._model, "uses_all_cores", False))

    def _run_serial(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(self._idle_wait_s)
            except Exception as exc:  # keep serving the other frames; logged loudly
                self._failed(exc, "a batch")
                self._stop.wait(1.0)

    def processed(self, camera_id: str) -> int:
        for feed in self._feeds:
            if feed.camera_id == camera_id:
                return feed.processed
        return 0

    # -- work

    def _failed(self, exc: Exception, what: str) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.exception("inference loop %s failed on %s", self.model_id, what)

    def _run_prepare(self) -> None:
        try:
            while self._prepared.wait_empty(self._stop):
                self._wait_until_needed()
                if self._stop.is_set():
                    break
                try:
                    for batch in self._next_batches(self._idle_wait_s):
                        t0 = time.perf_counter()
                        prepared = self._steps.prepare(batch[0])
                        self._prepare_s.add(time.perf_counter() - t0)
                        item = (next(self._numbers), batch, prepared)
                        if not self._prepared.put(item, self._stop):
                            break
                except Exception as exc:  # keep serving the other frames; logged loudly
                    self._failed(exc, "preparing a batch")
                    self._stop.wait(1.0)
        finally:
            self._prepared.close()

    def _busy_since(self) -> float | None:
        """When the earliest run in progress started, if every instance is running."""
        runs = list(self._runs.values())
        return min(runs) if len(runs) >= self._workers else None

    def _wait_until_needed(self) -> None:
        """Just-in-time: while the model runs a batch on every instance, take the next
        frames only when they can be prepared by the time the first run ends, so that
        a busy model still gets the newest frames (not ones taken a whole run earlier)."""
        started = self._busy_since()
        if started is None:
            return
        if self._run_s.empty:  # the first run: its length is unknown, wait for its end
            while self._busy_since() is not None and not self._stop.wait(0.001):
                pass
            return
        ready_at = prepare_at(started, self._run_s.value, self._prepare_s.value)
        delay = ready_at - time.perf_counter()
        if delay > 0:
            self._stop.wait(delay)

    def _run_inference(self, worker: int = 0) -> None:
        try:
            while (item := self._prepared.get()) is not None:
                number, batch, prepared = item
                t0 = self._runs[worker] = time.perf_counter()
                try:
                    inferred = self._steps.infer(prepared)
                except Exception as exc:  # the next batch still runs
                    self._failed(exc, "a batch")
                    self._inferred.put(number, None)
                    continue
                finally:
                    self._runs.pop(worker, None)
                self._run_s.add(time.perf_counter() - t0)
                with self._count_lock:
                    self.batches += 1
                self._inferred.put(number, (batch, inferred))
        finally:
            self._inferred.close()

    def _run_stages(self) -> None:
        while (item := self._inferred.get()) is not None:
            (frames, feeds), inferred = item
            try:
                self._publish(frames, self._finish(frames, inferred), feeds)
            except Exception as exc:  # the next batch still gets its stages
                self._failed(exc, "the stages of a batch")

    def step(self, timeout: float = 0.0) -> int:
        """Take the newest frame of each camera, infer, publish; returns frames published.

        With no new frame anywhere it waits up to ``timeout`` for one and returns 0.
        """
        published = 0
        for frames, feeds in self._next_batches(timeout):
            inferred = self._steps.infer(self._steps.prepare(frames))
            self.batches += 1
            self._publish(frames, self._finish(frames, inferred), feeds)
            published += len(frames)
        return published

    def _finish(self, frames: list[Frame], inferred: Any) -> list[Detections]:
        results = self._steps.finish(inferred)
        if len(results) != len(frames):
            raise RuntimeError(
                f"model {self.model_id!r} returned {len(results)} results for {len(frames)} frames"
            )
        return results

    def _next_batches(self, timeout: float) -> list[Batch]:
        """The newest new frame of each camera, cut into model batches (may be empty)."""
        frames: list[Frame] = []
        feeds: list[CameraFeed] = []
        for feed in self._feeds:
            frame = feed.source.take(feed.last_seq)
            if frame is not None:
                feed.last_seq = frame.seq
                frames.append(frame)
                feeds.append(feed)
        if not frames:
            if timeout > 0:
                self._wait_for_frame(timeout)
            return []
        if self._batch_window_s > 0 and len(frames) < len(self._feeds):
            self._fill_batch(frames, feeds)
        n = self._max_batch
        return [(frames[i : i + n], feeds[i : i + n]) for i in range(0, len(frames), n)]

    def _fill_batch(self, frames: list[Frame], feeds: list[CameraFeed]) -> None:
        """Wait up to the batch window for the cameras that had no new frame."""
        deadline = time.monotonic() + self._batch_window_s
        missing = [f for f in self._feeds if f not in feeds]
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            missing[0].source.wait(missing[0].last_seq, min(remaining, self._poll_s))
            for feed in list(missing):
                frame = feed.source.take(feed.last_seq)
                if frame is not None:
                    feed.last_seq = frame.seq
                    frames.append(frame)
                    feeds.append(feed)
                    missing.remove(feed)

    def _wait_for_frame(self, timeout: float) -> None:
        if len(self._feeds) == 1:
            feed = self._feeds[0]
            feed.source.wait(feed.last_seq, timeout)
            return
        # Several cameras: short waits on each in turn, so none waits on another.
        feed = self._feeds[self._wait_index % len(self._feeds)]
        self._wait_index += 1
        feed.source.wait(feed.last_seq, min(timeout, self._poll_s))

    def _publish(
        self, frames: list[Frame], results: list[Detections], feeds: list[CameraFeed]
    ) -> None:
        """Each frame's stages, message and rule events, in camera order."""
        for frame, detections, feed in zip(frames, results, feeds, strict=True):
            sim_t = feed.sim_time(frame) if feed.sim_time is not None else None
            tracks: Tracks | None = None
            stages = feed.stages
            if stages is not None:
                tracks = stages.track(detections, frame.t_mono)
            now = time.monotonic()
            message = build_frame_message(
                frame,
                detections,
                self._classes,
                model=self.model_id,
                line=feed.line,
                published_mono=now,
                sim_t=sim_t,
                tracks=tracks,
            )
            if self._latest is not None:
                self._latest.put(feed.camera_id, LatestFrame(frame, message))
            self._publisher.publish(message)
            if stages is not None and stages.engine is not None and tracks is not None:
                assert self._recorder is not None
                self._recorder.judge(
                    stages.engine, feed.camera_id, tracks, frame.t_wall, now - frame.t_mono
                )
            feed.processed += 1
            processed, latency, instances = self._camera_metrics[feed.camera_id]
            processed.inc()
            latency.observe(now - frame.t_mono)
            instances.observe(len(detections))
