"""The records that flow through the pipeline.

``Frame`` comes out of a source, ``Detections`` out of inference.  ``Detections``
is one validated container of parallel numpy arrays (in the style of
supervision's ``Detections``), so that every stage handles N instances at once
instead of looping over Python objects.

Pixel convention everywhere: the centre of the top-left pixel is (0, 0), x to the
right, y down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]
ImageArray = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured image of one camera."""

    camera: str
    seq: int
    t_mono: float  # capture time, time.monotonic() seconds
    t_wall: float  # capture time, Unix epoch seconds
    image: ImageArray  # H x W x 3, uint8, BGR

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"Frame.image must be HxWx3 uint8 BGR, got {self.image.shape} {self.image.dtype}"
            )


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """A class a model detects, with the names of its keypoints.

    Models with a shared keypoint dimension K give every class K slots; a class
    with fewer keypoints names only the first ``len(keypoint_names)``.
    """

    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class Detections:
    """N detected instances as parallel arrays.

    boxes:      (N, 4) float32, x1 y1 x2 y2 in pixels of the original frame
    scores:     (N,)   float32, 0..1
    class_ids:  (N,)   int32
    keypoints:  (N, K, 3) float32, x y score in pixels of the original frame
    """

    boxes: FloatArray
    scores: FloatArray
    class_ids: IntArray
    keypoints: FloatArray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = self.boxes.shape[0]
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(n)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int32).reshape(n)
        kp = np.asarray(self.keypoints, dtype=np.float32)
        if kp.size == 0:
            kp = kp.reshape(n, kp.shape[1] if kp.ndim == 3 else 0, 3)
        if kp.ndim != 3 or kp.shape[0] != n or kp.shape[2] != 3:
            raise ValueError(f"keypoints must be (N, K, 3) with N={n}, got {kp.shape}")
        self.keypoints = kp
        for key, value in self.extra.items():
            if len(value) != n:
                raise ValueError(f"extra[{key!r}] has {len(value)} rows, expected {n}")

    @classmethod
    def empty(cls, num_keypoints: int = 0) -> Detections:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            class_ids=np.zeros((0,), np.int32),
            keypoints=np.zeros((0, num_keypoints, 3), np.float32),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_keypoints(self) -> int:
        return int(self.keypoints.shape[1])

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> Detections:
        if isinstance(index, int):
            index = [index]
        return Detections(
            boxes=self.boxes[index],
            scores=self.scores[index],
            class_ids=self.class_ids[index],
            keypoints=self.keypoints[index],
            extra={k: v[index] for k, v in self.extra.items()},
        )

    @classmethod
    def concat(cls, parts: Sequence[Detections], num_keypoints: int = 0) -> Detections:
        if not parts:
            return cls.empty(num_keypoints)
        keys = set(parts[0].extra)
        return cls(
            boxes=np.concatenate([p.boxes for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            class_ids=np.concatenate([p.class_ids for p in parts]),
            keypoints=np.concatenate([p.keypoints for p in parts]),
            extra={k: np.concatenate([p.extra[k] for p in parts]) for k in keys},
        )


@dataclass(slots=True)
class Tracks:
    """Confirmed tracks of one camera at one frame, as parallel arrays.

    ``detections`` holds the (smoothed) boxes and keypoints in pixels; the arrays
    below have one row per track.  Geometry fills the millimetre fields once the
    camera is calibrated (NaN where a value is unknown).
    """

    detections: Detections
    track_ids: IntArray  # (N,)
    velocity_px_s: FloatArray  # (N, 2) of the box centre
    keypoints_mm: FloatArray | None = None  # (N, K, 2) on the work plane
    poses: FloatArray | None = None  # (N, 3) x_mm, y_mm, theta_deg (rigid fit to template)
    pose_residual_mm: FloatArray | None = None  # (N,) RMS residual of the rigid fit
    velocity_mm_s: FloatArray | None = None  # (N, 2)

    def __post_init__(self) -> None:
        n = len(self.detections)
        self.track_ids = np.asarray(self.track_ids, dtype=np.int32).reshape(n)
        self.velocity_px_s = np.asarray(self.velocity_px_s, dtype=np.float32).reshape(n, 2)

    def __len__(self) -> int:
        return len(self.detections)


class RuleStatus(StrEnum):
    OK = "ok"
    VIOLATED = "violated"
    UNKNOWN = "unknown"


class LineStateName(StrEnum):
    RUNNING = "RUNNING"
    IDLE = "IDLE"
    STOPPED = "STOPPED"
    JAMMED = "JAMMED"
    FAULT = "FAULT"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Event:
    """A change of a rule's status or of a line's state.

    ``cursor`` is assigned by the store when the event is written (monotonic,
    starting at 1); a client resumes a stream from the last cursor it saw.
    """

    line: str
    kind: str  # "rule" | "state"
    name: str  # rule name, or "state"
    old: str
    new: str
    t_wall: float  # Unix epoch seconds of the frame that caused the change
    detail: dict[str, object] = field(default_factory=dict)
    cursor: int | None = None
