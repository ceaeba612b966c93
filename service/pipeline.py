"""The inference loop: newest frame of each camera -> one batch -> frame messages.

One :class:`InferenceLoop` runs per model, in its own thread.  Each turn it takes
the newest frame of each of its cameras (a camera keeps only its newest frame and
counts the ones it replaced: nothing is ever queued here), runs them through the
model as one batch when the model has a dynamic batch dimension (optionally
waiting up to ``batch_window_s`` for the cameras that had no new frame yet), turns every
result into a frame message (:func:`build_frame_message`, a pure function) and
publishes it.

This is the hot path: no image copies, no per-keypoint Python beyond building the
message dicts, metric children bound once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from service.domain import ClassInfo, Detections, Frame, ImageArray
from service.telemetry.metrics import (
    CAPTURE_TO_PUBLISH,
    FRAMES_PROCESSED,
    INSTANCES,
)

log = logging.getLogger(__name__)

MESSAGE_VERSION = 1
Message = dict[str, Any]


# --- the frame message (pure) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassTable:
    """Class names and keypoint names by class id, looked up once per model."""

    names: tuple[str, ...]
    keypoint_names: tuple[tuple[str, ...], ...]

    @classmethod
    def from_classes(cls, classes: Sequence[ClassInfo]) -> ClassTable:
        return cls(
            names=tuple(c.name for c in classes),
            keypoint_names=tuple(tuple(c.keypoint_names) for c in classes),
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


def build_frame_message(
    frame: Frame,
    detections: Detections,
    classes: ClassTable,
    *,
    model: str,
    line: str | None,
    published_mono: float,
    sim_t: float | None = None,
) -> Message:
    """The ``frame`` message (DESIGN.md "Messages") for one processed frame.

    ``published_mono`` is ``time.monotonic()`` at publish; ``age_ms`` is measured on
    the monotonic clock from capture.  Pixel values are rounded to 0.01 px and
    scores to 0.001 in numpy, before the arrays become Python lists.
    """
    boxes = np.round(detections.boxes, 2).tolist()
    scores = np.round(detections.scores, 3).tolist()
    class_ids = detections.class_ids.tolist()
    kps = detections.keypoints
    num_slots = int(kps.shape[1])
    kp_xy = np.round(kps[:, :, :2], 2).tolist()
    kp_score = np.round(kps[:, :, 2], 3).tolist()

    instances: list[dict[str, Any]] = []
    for i, class_id in enumerate(class_ids):
        names = classes.keypoints(class_id, num_slots)
        xy = kp_xy[i]
        ks = kp_score[i]
        instances.append(
            {
                "class": classes.name(class_id),
                "class_id": class_id,
                "score": scores[i],
                "box": boxes[i],
                "keypoints": {
                    name: {"x": xy[j][0], "y": xy[j][1], "score": ks[j]}
                    for j, name in enumerate(names)
                },
                "track_id": None,
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


# --- what the loop needs from its collaborators -------------------------------


class FrameTaker(Protocol):
    """A camera as the loop sees it (service.sources.Camera)."""

    def take(self, after_seq: int) -> Frame | None: ...

    def wait(self, after_seq: int, timeout: float) -> Any: ...


class Predictor(Protocol):
    """A loaded model as the loop sees it (service.inference.OrtModel)."""

    def predict(self, images: list[ImageArray]) -> list[Detections]: ...


class Publisher(Protocol):
    """Where messages go (service.bus.Hub); ``publish`` must never block."""

    def publish(self, msg: Message) -> Any: ...


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
    last_seq: int = -1
    processed: int = 0


# --- the loop ------------------------------------------------------------------


class InferenceLoop:
    """Runs one model over the newest frames of its cameras, in its own thread."""

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
        idle_wait_s: float = 0.1,
        poll_s: float = 0.004,
    ) -> None:
        if not feeds:
            raise ValueError(f"inference loop for model {model_id!r} has no cameras")
        self.model_id = model_id
        self._model = model
        self._classes = ClassTable.from_classes(classes)
        self._feeds = list(feeds)
        self._publisher = publisher
        self._max_batch = max(1, int(max_batch))
        self._batch_window_s = max(0.0, batch_window_s)
        self._latest = latest
        self._idle_wait_s = idle_wait_s
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wait_index = 0
        self.batches = 0
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
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"inference-{self.model_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the in-flight batch has been published."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("inference loop %s did not stop within %.1f s", self.model_id, timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def processed(self, camera_id: str) -> int:
        for feed in self._feeds:
            if feed.camera_id == camera_id:
                return feed.processed
        return 0

    # -- work

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(self._idle_wait_s)
            except Exception as exc:  # keep serving the other frames; a bug is logged loudly
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("inference loop %s failed on a batch", self.model_id)
                self._stop.wait(1.0)

    def step(self, timeout: float = 0.0) -> int:
        """Take the newest frame of each camera, infer, publish; returns frames published.

        With no new frame anywhere it waits up to ``timeout`` for one and returns 0.
        """
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
            return 0
        if self._batch_window_s > 0 and len(frames) < len(self._feeds):
            self._fill_batch(frames, feeds)
        n = self._max_batch
        for start in range(0, len(frames), n):
            self._infer_and_publish(frames[start : start + n], feeds[start : start + n])
        return len(frames)

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

    def _infer_and_publish(self, frames: list[Frame], feeds: list[CameraFeed]) -> None:
        results = self._model.predict([f.image for f in frames])
        if len(results) != len(frames):
            raise RuntimeError(
                f"model {self.model_id!r} returned {len(results)} results for {len(frames)} frames"
            )
        self.batches += 1
        for frame, detections, feed in zip(frames, results, feeds, strict=True):
            sim_t = feed.sim_time(frame) if feed.sim_time is not None else None
            now = time.monotonic()
            message = build_frame_message(
                frame,
                detections,
                self._classes,
                model=self.model_id,
                line=feed.line,
                published_mono=now,
                sim_t=sim_t,
            )
            if self._latest is not None:
                self._latest.put(feed.camera_id, LatestFrame(frame, message))
            self._publisher.publish(message)
            feed.processed += 1
            processed, latency, instances = self._camera_metrics[feed.camera_id]
            processed.inc()
            latency.observe(now - frame.t_mono)
            instances.observe(len(detections))
