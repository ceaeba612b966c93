"""Factories for the rule tests: synthetic Tracks, line configs and engines."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from service.domain import ClassInfo, Detections, Event, Tracks
from service.rules import LineConfig, RuleEngine

CLASSES = (
    ClassInfo("bracket", ("corner", "long_tip", "short_tip", "hole_long", "hole_short")),
    ClassInfo("flange", ("centre", "notch", "bolt_1", "bolt_2", "bolt_3")),
    ClassInfo("arm", ("base", "shoulder", "elbow", "wrist", "tool")),
    ClassInfo("hand", ("elbow", "wrist", "palm", "index_tip", "thumb_tip")),
)
TEMPLATE = np.array([[0, 0], [20, 0], [0, 20], [-20, 0], [0, -20]], np.float64)


@dataclass
class Part:
    """One track in a synthetic frame (millimetres; pixels are the same numbers)."""

    tid: int
    cls: int = 0
    xy: tuple[float, float] = (0.0, 0.0)
    theta: float = 0.0
    vel: tuple[float, float] = (0.0, 0.0)
    kps: Sequence[Sequence[float]] | None = None  # (5, 2); default: TEMPLATE at the pose
    kp_score: float | Sequence[float] = 0.9
    residual: float = 0.5


def make_tracks(*parts: Part, with_mm: bool = True) -> Tracks:
    n = len(parts)
    kps = np.zeros((n, 5, 2))
    for i, p in enumerate(parts):
        if p.kps is not None:
            kps[i] = np.asarray(p.kps, np.float64)
        else:
            a = np.radians(p.theta)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            kps[i] = TEMPLATE @ rot.T + np.asarray(p.xy)
    scores = np.array(
        [np.broadcast_to(np.asarray(p.kp_score, np.float64), (5,)) for p in parts]
    ).reshape(n, 5)
    kp3 = np.concatenate([kps, scores.reshape(n, 5, 1)], axis=2) if n else np.zeros((0, 5, 3))
    boxes = np.concatenate([kps.min(axis=1), kps.max(axis=1)], axis=1) if n else np.zeros((0, 4))
    det = Detections(
        boxes=boxes.astype(np.float32),
        scores=np.full(n, 0.9, np.float32),
        class_ids=np.array([p.cls for p in parts], np.int32),
        keypoints=kp3.astype(np.float32),
    )
    vel = np.array([p.vel for p in parts], np.float32).reshape(n, 2)
    return Tracks(
        detections=det,
        track_ids=np.array([p.tid for p in parts], np.int32),
        velocity_px_s=vel,
        keypoints_mm=kps.astype(np.float32) if with_mm else None,
        poses=np.array([[*p.xy, p.theta] for p in parts], np.float32).reshape(n, 3)
        if with_mm
        else None,
        pose_residual_mm=np.array([p.residual for p in parts], np.float32) if with_mm else None,
        velocity_mm_s=vel if with_mm else None,
    )


def line_config(line_id: str, rules: list[dict[str, Any]], **kw: Any) -> LineConfig:
    return LineConfig.model_validate({"id": line_id, "rules": rules, **kw})


@pytest.fixture
def line_id() -> str:
    """A unique line id (Prometheus metrics are process-global)."""
    return f"line-{uuid.uuid4().hex[:8]}"


EngineFactory = Callable[..., RuleEngine]


@pytest.fixture
def make_engine(line_id: str) -> EngineFactory:
    def make(rules: list[dict[str, Any]], **kw: Any) -> RuleEngine:
        return RuleEngine(line_config(line_id, rules, **kw), classes=CLASSES)

    return make


def feed(
    engine: RuleEngine,
    frames: Callable[[float], Tracks],
    t0: float,
    t1: float,
    fps: float = 10.0,
    camera: str = "cam-1",
) -> list[Event]:
    """Feed frames at ``fps`` for t in [t0, t1) and collect the events."""
    events: list[Event] = []
    for i in range(round((t1 - t0) * fps)):
        t = t0 + i / fps
        events.extend(engine.update(camera, frames(t), t_wall=t, frame_age_s=0.01))
    return events


def changes(events: list[Event], name: str) -> list[tuple[str, str, float]]:
    """(old, new, t) of the events of one rule (or "state"), t rounded to 1 ms."""
    return [(e.old, e.new, round(e.t_wall, 3)) for e in events if e.name == name]
