"""One evaluator per rule kind: ``evaluator.observe(tracks, t) -> Observation``.

An evaluator watches one camera for one rule.  It turns the camera's Tracks into a
raw condition (True: violating, False: clear, None: no evidence this frame), the
value it judged (for the API) and a small detail dict.  Thresholds go through a
:class:`Schmitt` trigger (hysteresis); the time debouncing (``for``) is the
engine's.  Evaluators keep only bounded per-track state.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.domain import ClassInfo, Tracks
from service.errors import ConfigError
from service.rules import measure
from service.rules.config import (
    ClassRef,
    ConveyorRule,
    JointRangeRule,
    KeypointRef,
    OrientationRule,
    PositionRule,
    PresenceRule,
    RuleConfig,
    StallRule,
    ThroughputRule,
    ZoneIntrusionRule,
)

NO_MM = "no millimetre coordinates (is the camera calibrated?); use units: px"


@dataclass
class Observation:
    """One camera's judgement of one rule at one frame."""

    raw: bool | None  # True: violating; None: no evidence
    value: float | None = None
    detail: dict[str, object] = field(default_factory=dict)
    mode: str | None = None  # conveyor: running | jammed | stopped
    counted: int = 0  # throughput: tracks counted at this frame


class Evaluator(Protocol):
    def observe(self, tracks: Tracks, t: float) -> Observation: ...


class ClassCatalog:
    """Resolves class and keypoint names of the rules against the model's classes."""

    def __init__(self, classes: Sequence[ClassInfo]) -> None:
        self._classes = tuple(classes)
        self._ids = {c.name: i for i, c in enumerate(self._classes)}

    def class_id(self, ref: ClassRef, rule: str) -> int:
        if isinstance(ref, int):
            if self._classes and not 0 <= ref < len(self._classes):
                raise ConfigError(
                    f"rule {rule!r}: class id {ref} is out of range; the model has "
                    f"{len(self._classes)} classes ({', '.join(self._ids)})"
                )
            return ref
        if ref not in self._ids:
            known = ", ".join(self._ids) or "none: the model's class names are not known here"
            raise ConfigError(
                f"rule {rule!r} names class {ref!r}, which the model does not have "
                f"(classes: {known}); use a class name from the model's metadata or its id"
            )
        return self._ids[ref]

    def class_ids(self, refs: Sequence[ClassRef], rule: str) -> list[int]:
        return [self.class_id(r, rule) for r in refs]

    def keypoint_index(self, class_id: int, ref: KeypointRef, rule: str) -> int | None:
        """Index of keypoint ``ref`` in class ``class_id``; None if the class lacks it."""
        if isinstance(ref, int):
            return ref
        if class_id >= len(self._classes):
            raise ConfigError(
                f"rule {rule!r} names keypoint {ref!r} but the keypoint names of class "
                f"{class_id} are not known; give the keypoint's index instead"
            )
        names = self._classes[class_id].keypoint_names
        return names.index(ref) if ref in names else None

    def keypoint_indices(self, class_id: int, refs: Sequence[KeypointRef], rule: str) -> list[int]:
        """Indices of ``refs`` in the class; every one must exist."""
        out = []
        for ref in refs:
            idx = self.keypoint_index(class_id, ref, rule)
            if idx is None:
                names = ", ".join(self._classes[class_id].keypoint_names)
                raise ConfigError(
                    f"rule {rule!r}: class {self._classes[class_id].name!r} has no keypoint "
                    f"{ref!r} (keypoints: {names})"
                )
            out.append(idx)
        return out


@dataclass
class Schmitt:
    """Threshold with hysteresis: violating beyond ``threshold``; once violating,
    clear only when back by ``hysteresis`` (``below``: violating under it)."""

    threshold: float
    hysteresis: float = 0.0
    below: bool = False
    active: bool = False

    def update(self, value: float | None) -> bool:
        if value is None:
            self.active = False
            return False
        margin = self.hysteresis if self.active else 0.0
        if self.below:
            self.active = value < self.threshold + margin
        else:
            self.active = value > self.threshold - margin
        return self.active


class _FrameMemo(threading.local):
    """Per thread: what the rules of one frame share (positions, zone tests).

    Several rules of a line judge the same tracks with the same units and often the
    same zone; the memo is keyed on the Tracks object itself (kept referenced, so
    never confused with a later frame's) and is dropped at the next frame.
    """

    tracks: Tracks | None = None
    values: dict[object, measure.F64 | measure.Bool | None]

    def get(self, tracks: Tracks) -> dict[object, measure.F64 | measure.Bool | None]:
        if self.tracks is not tracks:
            self.tracks = tracks
            self.values = {}
        return self.values


_MEMO = _FrameMemo()


def _positions(tracks: Tracks, units: str, min_score: float) -> measure.F64 | None:
    """Part positions (memoised per frame; the caller must not write into them)."""
    memo = _MEMO.get(tracks)
    key = ("positions", units, min_score)
    if key not in memo:
        memo[key] = measure.part_positions(tracks, units, min_score)
    return memo[key]  # type: ignore[return-value]


def _in_zone(points: measure.F64, zone: Sequence[tuple[float, float]] | None) -> measure.Bool:
    if zone is None:
        finite: measure.Bool = np.asarray(np.isfinite(points).all(axis=1), bool)
        return finite
    return measure.points_in_polygon(points, np.asarray(zone, np.float64))


def _in_zone_of(
    tracks: Tracks, units: str, min_score: float, points: measure.F64,
    zone: Sequence[tuple[float, float]] | None,
) -> measure.Bool:
    """``_in_zone`` of the frame's part positions, memoised per frame and zone."""
    memo = _MEMO.get(tracks)
    key = ("zone", units, min_score, None if zone is None else tuple(map(tuple, zone)))
    found = memo.get(key)
    if found is None:
        found = memo[key] = _in_zone(points, zone)
    return found  # type: ignore[return-value]


class PresenceEvaluator:
    def __init__(self, rule: PresenceRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.classes = catalog.class_ids(rule.classes, rule.name)

    def observe(self, tracks: Tracks, t: float) -> Observation:
        pos = _positions(tracks, self.rule.units, self.min_score)
        if pos is None:
            return Observation(None, detail={"reason": NO_MM})
        mask = measure.class_mask(tracks.detections.class_ids, self.classes) & _in_zone_of(
            tracks, self.rule.units, self.min_score, pos, self.rule.zone
        )
        count = int(mask.sum())
        return Observation(
            count < self.rule.min_count,
            float(count),
            {"track_ids": tracks.track_ids[mask].tolist()},
        )


class PositionEvaluator:
    def __init__(self, rule: PositionRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.classes = catalog.class_ids(rule.classes, rule.name)
        self.schmitt = Schmitt(rule.tolerance_mm, rule.hysteresis_mm)
        self._catalog = catalog

    def _points(self, tracks: Tracks, pos: measure.F64) -> measure.F64:
        if self.rule.keypoint is None:
            return pos
        kp = measure.keypoints_in(tracks, self.rule.units)
        assert kp is not None  # pos is not None, so neither are the keypoints
        vis = measure.visible_mask(tracks, self.min_score)
        out = np.full((len(tracks), 2), np.nan)
        for i, cid in enumerate(tracks.detections.class_ids.tolist()):
            idx = self._catalog.keypoint_index(cid, self.rule.keypoint, self.rule.name)
            if idx is not None and idx < kp.shape[1] and vis[i, idx]:
                out[i] = kp[i, idx]
        return out

    def observe(self, tracks: Tracks, t: float) -> Observation:
        pos = _positions(tracks, self.rule.units, self.min_score)
        if pos is None:
            return Observation(None, detail={"reason": NO_MM})
        mask = measure.class_mask(tracks.detections.class_ids, self.classes) & _in_zone_of(
            tracks, self.rule.units, self.min_score, pos, self.rule.zone
        )
        mask &= _residual_ok(tracks, self.rule.max_residual_mm)
        pts = self._points(tracks, pos)
        mask &= np.isfinite(pts).all(axis=1)
        if self.rule.target is not None:
            dev = measure.distance_to_point(pts[mask], self.rule.target)
        else:
            assert self.rule.target_line is not None
            dev = measure.distance_to_line(pts[mask], *self.rule.target_line)
        value = float(dev.max()) if dev.size else None
        raw = self.schmitt.update(value)
        detail: dict[str, object] = {"parts": int(mask.sum())}
        if dev.size:
            detail["track_id"] = int(tracks.track_ids[mask][int(dev.argmax())])
        return Observation(raw, value, detail)


def _residual_ok(tracks: Tracks, max_residual: float | None) -> measure.Bool:
    n = len(tracks)
    if max_residual is None or tracks.pose_residual_mm is None:
        return np.ones(n, bool)
    res = np.asarray(tracks.pose_residual_mm, np.float64).reshape(n)
    ok: measure.Bool = ~(res > max_residual)  # NaN residual: no fit, keep the keypoint mean
    return ok


class OrientationEvaluator:
    def __init__(self, rule: OrientationRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.classes = catalog.class_ids(rule.classes, rule.name)
        self.schmitt = Schmitt(rule.tolerance_deg, rule.hysteresis_deg)

    def observe(self, tracks: Tracks, t: float) -> Observation:
        pos = _positions(tracks, self.rule.units, self.min_score)
        if pos is None or tracks.poses is None:
            return Observation(None, detail={"reason": "no part poses (calibrate the camera)"})
        theta = np.asarray(tracks.poses, np.float64).reshape(len(tracks), 3)[:, 2]
        mask = measure.class_mask(tracks.detections.class_ids, self.classes) & _in_zone_of(
            tracks, self.rule.units, self.min_score, pos, self.rule.zone
        )
        mask &= np.isfinite(theta) & _residual_ok(tracks, self.rule.max_residual_mm)
        err = measure.angle_error_deg(theta[mask], self.rule.target_deg, self.rule.symmetry_deg)
        value = float(err.max()) if err.size else None
        raw = self.schmitt.update(value)
        detail: dict[str, object] = {"parts": int(mask.sum())}
        if err.size:
            worst = int(err.argmax())
            detail["track_id"] = int(tracks.track_ids[mask][worst])
            detail["theta_deg"] = round(float(theta[mask][worst]), 3)
        return Observation(raw, value, detail)


class ThroughputEvaluator:
    """Counts each track once when it crosses the count line in the right direction."""

    def __init__(self, rule: ThroughputRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.classes = catalog.class_ids(rule.classes, rule.name)
        self.a, self.b = rule.count_line
        self.normal = measure.crossing_normal(self.a, self.b, rule.direction)
        self.schmitt = (
            None
            if rule.min_per_minute is None
            else Schmitt(rule.min_per_minute, rule.hysteresis_per_minute, below=True)
        )
        self.total = 0
        self.wrong_way = 0
        self._last: dict[int, tuple[float, measure.F64, float]] = {}  # id -> side, pos, t
        self._counted: set[int] = set()
        self._wrong: set[int] = set()
        self._times: deque[float] = deque()
        self._t0: float | None = None

    def observe(self, tracks: Tracks, t: float) -> Observation:
        if self._t0 is None:
            self._t0 = t
        pos = _positions(tracks, self.rule.units, self.min_score)
        if pos is None:
            return Observation(None, detail={"reason": NO_MM})
        mask = measure.class_mask(tracks.detections.class_ids, self.classes)
        mask &= np.isfinite(pos).all(axis=1)
        sides = measure.signed_side(pos, self.a, self.normal)
        counted = 0
        for i in np.flatnonzero(mask).tolist():
            tid = int(tracks.track_ids[i])
            side, p = float(sides[i]), pos[i]
            prev = self._last.get(tid)
            if prev is not None and (prev[0] < 0) != (side < 0):
                within = measure.crossing_within_segment(prev[1], p, self.a, self.b)
                if within and side >= 0 and tid not in self._counted:
                    self._counted.add(tid)
                    self._times.append(t)
                    counted += 1
                elif within and side < 0 and tid not in self._wrong | self._counted:
                    self._wrong.add(tid)
                    self.wrong_way += 1
            self._last[tid] = (side, p, t)
        self.total += counted
        self._forget(t)
        while self._times and self._times[0] <= t - self.rule.window_s:
            self._times.popleft()
        rate = len(self._times) * 60.0 / self.rule.window_s
        detail: dict[str, object] = {"count": self.total, "wrong_way": self.wrong_way}
        if self.schmitt is None:
            raw: bool | None = False
        elif t - self._t0 < self.rule.window_s:
            raw = None  # the window is not full yet: no verdict on the rate
            detail["warming_up"] = True
        else:
            raw = self.schmitt.update(rate)
        return Observation(raw, rate, detail, counted=counted)

    def _forget(self, t: float) -> None:
        horizon = t - self.rule.forget_after_s
        stale = [tid for tid, (_, _, seen) in self._last.items() if seen < horizon]
        for tid in stale:
            del self._last[tid]
            self._counted.discard(tid)
            self._wrong.discard(tid)


class ConveyorEvaluator:
    def __init__(self, rule: ConveyorRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.classes = catalog.class_ids(rule.classes, rule.name)
        self.schmitt = Schmitt(rule.min_speed_mm_s, rule.hysteresis_mm_s, below=True)
        self._last_parts_t: float | None = None
        self._mode = "unknown"

    def observe(self, tracks: Tracks, t: float) -> Observation:
        if self._last_parts_t is None:
            self._last_parts_t = t
        pos = _positions(tracks, self.rule.units, self.min_score)
        vel = tracks.velocity_px_s if self.rule.units == "px" else tracks.velocity_mm_s
        if pos is None or vel is None:
            return Observation(None, detail={"reason": NO_MM}, mode="unknown")
        velocity = np.asarray(vel, np.float64).reshape(len(tracks), 2)
        mask = measure.class_mask(tracks.detections.class_ids, self.classes) & _in_zone_of(
            tracks, self.rule.units, self.min_score, pos, self.rule.zone
        )
        mask &= np.isfinite(velocity).all(axis=1)
        parts = int(mask.sum())
        if parts >= self.rule.min_parts:
            self._last_parts_t = t
            speed = measure.median_speed_along(velocity[mask], self.rule.direction)
            jammed = self.schmitt.update(speed)
            self._mode = "jammed" if jammed else "running"
            return Observation(jammed, speed, {"parts": parts}, mode=self._mode)
        if t - self._last_parts_t >= self.rule.empty_for_s:
            self.schmitt.active = False
            self._mode = "stopped"
            return Observation(False, None, {"parts": parts}, mode="stopped")
        return Observation(None, None, {"parts": parts}, mode=self._mode)


class ZoneIntrusionEvaluator:
    def __init__(self, rule: ZoneIntrusionRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.classes = catalog.class_ids(rule.classes, rule.name)
        self._catalog = catalog
        self.zone = np.asarray(rule.zone, np.float64)
        self._kp_cache: dict[int, list[int] | None] = {}

    def _keypoint_filter(self, class_id: int) -> list[int] | None:
        if not self.rule.keypoints:
            return None
        if class_id not in self._kp_cache:
            idx = [
                self._catalog.keypoint_index(class_id, r, self.rule.name)
                for r in self.rule.keypoints
            ]
            self._kp_cache[class_id] = [i for i in idx if i is not None]
        return self._kp_cache[class_id]

    def observe(self, tracks: Tracks, t: float) -> Observation:
        kp = measure.keypoints_in(tracks, self.rule.units)
        if kp is None:
            return Observation(None, detail={"reason": NO_MM})
        n, k = kp.shape[:2]
        use = measure.visible_mask(tracks, self.min_score)
        use &= measure.class_mask(tracks.detections.class_ids, self.classes)[:, None]
        for i, cid in enumerate(tracks.detections.class_ids.tolist()):
            keep = self._keypoint_filter(cid)
            if keep is not None:
                row = np.zeros(k, bool)
                row[[j for j in keep if j < k]] = True
                use[i] &= row
        inside = measure.points_in_polygon(kp.reshape(-1, 2), self.zone).reshape(n, k) & use
        count = int(inside.sum())
        ids = tracks.track_ids[inside.any(axis=1)].tolist()
        return Observation(count > 0, float(count), {"track_ids": ids})


class JointRangeEvaluator:
    def __init__(self, rule: JointRangeRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.class_id = catalog.class_id(rule.cls, rule.name)
        self.chain = catalog.keypoint_indices(self.class_id, rule.chain, rule.name)
        self.active = False

    def observe(self, tracks: Tracks, t: float) -> Observation:
        kp = measure.keypoints_in(tracks, self.rule.units)
        if kp is None:
            return Observation(None, detail={"reason": NO_MM})
        if kp.shape[1] <= max(self.chain):
            return Observation(None, detail={"reason": "the model has fewer keypoints"})
        vis = measure.visible_mask(tracks, self.min_score)[:, self.chain].all(axis=1)
        mask = (tracks.detections.class_ids == self.class_id) & vis
        if not mask.any():
            return Observation(None, detail={"reason": "chain not seen"})
        angles = measure.chain_angle_deg(kp[mask][:, self.chain, :])
        h = self.rule.hysteresis_deg if self.active else 0.0
        lo, hi = self.rule.min_deg + h, self.rule.max_deg - h
        excess = np.maximum(lo - angles, angles - hi)
        worst = int(excess.argmax())
        self.active = bool(excess[worst] > 0)
        return Observation(
            self.active,
            float(angles[worst]),
            {"track_id": int(tracks.track_ids[mask][worst])},
        )


class StallEvaluator:
    """The chain's keypoints moved less than ``min_motion_mm`` over the motion window."""

    def __init__(self, rule: StallRule, catalog: ClassCatalog, min_score: float) -> None:
        self.rule, self.min_score = rule, min_score
        self.class_id = catalog.class_id(rule.cls, rule.name)
        self.keypoints = catalog.keypoint_indices(self.class_id, rule.keypoints, rule.name)
        self._history: dict[int, deque[tuple[float, measure.F64]]] = {}

    def observe(self, tracks: Tracks, t: float) -> Observation:
        kp = measure.keypoints_in(tracks, self.rule.units)
        if kp is None:
            return Observation(None, detail={"reason": NO_MM})
        vis = measure.visible_mask(tracks, self.min_score)
        window = self.rule.motion_window_s
        motions: list[tuple[float, int]] = []
        for i in np.flatnonzero(tracks.detections.class_ids == self.class_id).tolist():
            tid = int(tracks.track_ids[i])
            pts = np.where(vis[i][:, None], kp[i], np.nan)
            if self.keypoints:
                pts = pts[[j for j in self.keypoints if j < pts.shape[0]]]
            hist = self._history.setdefault(tid, deque())
            hist.append((t, pts))
            while len(hist) >= 2 and hist[1][0] <= t - window:
                hist.popleft()
            if t - hist[0][0] + 1e-9 < window:
                continue  # not watched for a whole window yet
            past = np.stack([p for _, p in hist])  # (S, K, 2)
            dist = np.hypot(*(past - pts[None]).transpose(2, 0, 1))  # (S, K)
            if np.isfinite(dist).any():
                motions.append((float(np.nanmax(dist)), tid))
        horizon = t - max(10.0, 4 * window)
        for tid in [k for k, h in self._history.items() if h[-1][0] < horizon]:
            del self._history[tid]
        if not motions:
            return Observation(None, detail={"reason": "not watched for a whole window"})
        motion, tid = min(motions)
        return Observation(motion < self.rule.min_motion_mm, motion, {"track_id": tid})


def make_evaluator(rule: RuleConfig, catalog: ClassCatalog, min_score: float) -> Evaluator:
    """The evaluator of one rule for one camera (stale_camera rules have none)."""
    if isinstance(rule, PresenceRule):
        return PresenceEvaluator(rule, catalog, min_score)
    if isinstance(rule, PositionRule):
        return PositionEvaluator(rule, catalog, min_score)
    if isinstance(rule, OrientationRule):
        return OrientationEvaluator(rule, catalog, min_score)
    if isinstance(rule, ThroughputRule):
        return ThroughputEvaluator(rule, catalog, min_score)
    if isinstance(rule, ConveyorRule):
        return ConveyorEvaluator(rule, catalog, min_score)
    if isinstance(rule, ZoneIntrusionRule):
        return ZoneIntrusionEvaluator(rule, catalog, min_score)
    if isinstance(rule, JointRangeRule):
        return JointRangeEvaluator(rule, catalog, min_score)
    if isinstance(rule, StallRule):
        return StallEvaluator(rule, catalog, min_score)
    raise TypeError(f"rule {rule.name!r} of type {rule.type!r} has no frame evaluator")
