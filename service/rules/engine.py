"""The rule engine of one line: Tracks in, rule and line-state change Events out.

Usage::

    engine = RuleEngine(line_config, classes=model_classes)
    events = engine.update("cam-1", tracks, t_wall=frame.t_wall, frame_age_s=age)
    events += engine.tick(time.time())     # between frames: staleness, IDLE
    engine.snapshot()                       # {line, state, since, rules, counters, ...}

Per frame, every rule of the camera is evaluated to a raw condition, combined over
the rule's cameras, and debounced (``for`` / ``clear_for``); the line state follows
from the rules by the table in :mod:`service.rules.linestate`.  Every change of a
rule's status or of the line state is one :class:`Event` (without a cursor: the
store assigns it).  The engine never reads a clock: all times come from the caller
(wall-clock seconds, or simulated seconds in ``linewatch rules eval``).  It is
thread-safe (one lock) so that ``snapshot()`` can be called from another thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.domain import ClassInfo, Event, LineStateName, RuleStatus, Tracks
from service.rules.config import (
    ConveyorRule,
    LineConfig,
    PresenceRule,
    RuleConfig,
    StaleCameraRule,
    ThroughputRule,
)
from service.rules.debounce import Debouncer
from service.rules.kinds import ClassCatalog, Evaluator, Observation, make_evaluator
from service.rules.linestate import derive_line_state, effective_line_state
from service.telemetry import metrics


@dataclass
class _Rule:
    """A rule's runtime: one evaluator per camera, the combined verdict, the debouncer."""

    config: RuleConfig
    debouncer: Debouncer
    implies: LineStateName | None
    evaluators: dict[str, Evaluator] = field(default_factory=dict)
    latest: dict[str, Observation] = field(default_factory=dict)
    raw: bool | None = None
    value: float | None = None
    detail: dict[str, object] = field(default_factory=dict)
    mode: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def type(self) -> str:
        return self.config.type


def _combine(rule: _Rule) -> Observation:
    """One verdict over the rule's cameras: presence is violated only when every
    camera misses the part; every other kind when any camera sees a violation."""
    obs = list(rule.latest.values())
    known = [o for o in obs if o.raw is not None]
    if isinstance(rule.config, PresenceRule):
        decisive = [o for o in known if not o.raw]
        raw: bool | None = None if not known else not decisive
    else:
        decisive = [o for o in known if o.raw]
        raw = None if not known else bool(decisive)
    pick = decisive[0] if decisive else (known[0] if known else (obs[0] if obs else None))
    if pick is None:
        return Observation(None)
    modes = [o.mode for o in obs if o.mode is not None]
    mode = None
    if modes:
        if "jammed" in modes:
            mode = "jammed"
        elif all(m == "stopped" for m in modes):
            mode = "stopped"
        elif "running" in modes:
            mode = "running"
        else:
            mode = modes[0]
    return Observation(raw, pick.value, dict(pick.detail), mode=mode)


def _json_number(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 4)


class RuleEngine:
    """Evaluates one line's rules on every camera's Tracks and derives its state."""

    def __init__(self, line: LineConfig, classes: Sequence[ClassInfo] = ()) -> None:
        self.line = line
        self._catalog = ClassCatalog(classes)
        self._min_score = line.keypoint_min_score
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        for cfg in line.rules:
            if not isinstance(cfg, StaleCameraRule):
                make_evaluator(cfg, self._catalog, self._min_score)  # names -> ConfigError now
            self._rules.append(
                _Rule(
                    cfg,
                    Debouncer(cfg.for_s, cfg.clear_for_s),
                    effective_line_state(cfg.type, cfg.line_state),
                )
            )
        self._has_throughput = any(isinstance(r.config, ThroughputRule) for r in self._rules)
        self._seen: set[str] = set()
        self._last_fresh: dict[str, float] = {}
        self._t_start: float | None = None
        self._now = 0.0
        self._state = LineStateName.UNKNOWN
        self._state_since: float | None = None
        self._reasons: list[str] = ["no frame yet"]
        self._parts = 0
        self._last_count_t: float | None = None
        self._cycle_time: float | None = None
        self._last_activity: float | None = None
        self._pose_residual: float | None = None
        self._belt_speed: float | None = None
        for state in LineStateName:
            metrics.LINE_STATE.labels(line.id, state.value).set(
                1.0 if state == self._state else 0.0
            )
        for rule in self._rules:
            self._rule_metrics(rule)

    # -- public ------------------------------------------------------------------
    def update(
        self, camera: str, tracks: Tracks, t_wall: float, frame_age_s: float = 0.0
    ) -> list[Event]:
        """Judge one camera's Tracks (captured at ``t_wall``, ``frame_age_s`` old now)."""
        if self.line.cameras and camera not in self.line.cameras:
            raise ValueError(
                f"camera {camera!r} is not a camera of line {self.line.id!r} "
                f"({', '.join(self.line.cameras)})"
            )
        with self._lock:
            now = t_wall + max(frame_age_s, 0.0)
            self._begin(t_wall)
            self._now = max(self._now, now)
            self._seen.add(camera)
            events: list[Event] = []
            if frame_age_s <= self._max_age(camera):
                self._last_fresh[camera] = max(self._last_fresh.get(camera, t_wall), t_wall)
                self._observe_residuals(camera, tracks)
                if not self._has_throughput and len(tracks):
                    self._last_activity = t_wall
                stale = self._stale_cameras(now)
                for rule in self._rules:
                    if isinstance(rule.config, StaleCameraRule):
                        continue
                    cameras = self._rule_cameras(rule)
                    if camera not in cameras:
                        continue
                    self._evaluate(rule, camera, tracks, t_wall)
                    if stale.intersection(cameras):
                        continue  # the staleness pass turns it UNKNOWN
                    events.extend(self._judge(rule, t_wall))
            events.extend(self._staleness(now))
            events.extend(self._derive_state(t_wall))
            return events

    def tick(self, t_wall: float) -> list[Event]:
        """Re-check staleness and idleness at ``t_wall`` when no frame arrives."""
        with self._lock:
            self._begin(t_wall)
            self._now = max(self._now, t_wall)
            events = self._staleness(t_wall)
            events.extend(self._derive_state(t_wall))
            return events

    @property
    def state(self) -> LineStateName:
        return self._state

    def snapshot(self) -> dict[str, object]:
        """The line as plain JSON-ready data for the API and the bus."""
        with self._lock:
            return {
                "line": self.line.id,
                "state": self._state.value,
                "since": self._state_since,
                "reasons": list(self._reasons),
                "rules": [
                    {
                        "name": r.name,
                        "type": r.type,
                        "status": r.debouncer.status.value,
                        "since": r.debouncer.since,
                        "value": _json_number(r.value),
                        "detail": dict(r.detail, **({"mode": r.mode} if r.mode else {})),
                    }
                    for r in self._rules
                ],
                "counters": {"parts": self._parts},
                "belt_speed_mm_s": _json_number(self._belt_speed),
                "cycle_time_s": _json_number(self._cycle_time),
                "pose_residual_mm": _json_number(self._pose_residual),
                "cameras": {
                    c: {
                        "last_frame_t": self._last_fresh.get(c),
                        "stale": c in self._stale_cameras(self._now),
                    }
                    for c in sorted(self._line_cameras())
                },
            }

    # -- evaluation ------------------------------------------------------------------
    def _begin(self, t: float) -> None:
        if self._t_start is None:
            self._t_start = t
            self._state_since = t
            self._last_activity = t

    def _evaluate(self, rule: _Rule, camera: str, tracks: Tracks, t: float) -> None:
        evaluator = rule.evaluators.get(camera)
        if evaluator is None:
            evaluator = make_evaluator(rule.config, self._catalog, self._min_score)
            rule.evaluators[camera] = evaluator
        obs = evaluator.observe(tracks, t)
        rule.latest[camera] = obs
        if obs.counted:
            self._count(rule, obs.counted, t)
        combined = _combine(rule)
        rule.raw = combined.raw
        rule.value, rule.detail, rule.mode = combined.value, combined.detail, combined.mode
        if isinstance(rule.config, ConveyorRule):
            speed = combined.value
            if self._is_first_conveyor(rule):
                self._belt_speed = speed
            metrics.BELT_SPEED.labels(self.line.id, rule.name).set(
                float("nan") if speed is None else speed / 1000.0
            )

    def _judge(self, rule: _Rule, t: float) -> list[Event]:
        old = rule.debouncer.status
        new = rule.debouncer.update(rule.raw, t)
        if new is None:
            return []
        return [self._rule_event(rule, old, t)]

    def _count(self, rule: _Rule, n: int, t: float) -> None:
        metrics.PARTS_COUNTED.labels(self.line.id, rule.name).inc(n)
        self._parts += n
        self._last_activity = t
        intervals = [0.0] * (n - 1)
        if self._last_count_t is not None:
            intervals.insert(0, max(t - self._last_count_t, 0.0))
        for dt in intervals:
            metrics.CYCLE_TIME.labels(self.line.id).observe(dt)
        if intervals:
            self._cycle_time = intervals[-1]
        self._last_count_t = t

    def _is_first_conveyor(self, rule: _Rule) -> bool:
        first = next(r for r in self._rules if isinstance(r.config, ConveyorRule))
        return first is rule

    def _observe_residuals(self, camera: str, tracks: Tracks) -> None:
        if tracks.pose_residual_mm is None or not len(tracks):
            return
        res = np.asarray(tracks.pose_residual_mm, np.float64).reshape(-1)
        res = res[np.isfinite(res)]
        for r in res.tolist():
            metrics.POSE_RESIDUAL.labels(camera).observe(r / 1000.0)
        if res.size:
            self._pose_residual = float(res[-1])

    # -- staleness ---------------------------------------------------------------------
    def _max_age(self, camera: str) -> float:
        ages = [
            r.config.max_age_s
            for r in self._rules
            if isinstance(r.config, StaleCameraRule)
            and (not r.config.cameras or camera in r.config.cameras)
        ]
        return min(ages) if ages else self.line.stale_after_s

    def _line_cameras(self) -> set[str]:
        if self.line.cameras:
            return set(self.line.cameras)
        named = {c for r in self._rules for c in r.config.cameras}
        return named | self._seen

    def _rule_cameras(self, rule: _Rule) -> set[str]:
        return set(rule.config.cameras) if rule.config.cameras else self._line_cameras()

    def _camera_age(self, camera: str, now: float) -> float:
        last = self._last_fresh.get(camera)
        if last is None:
            assert self._t_start is not None
            return now - self._t_start  # never delivered: as old as the engine
        return now - last

    def _stale_cameras(self, now: float) -> set[str]:
        if self._t_start is None:
            return set()
        return {c for c in self._line_cameras() if self._camera_age(c, now) > self._max_age(c)}

    def _staleness(self, now: float) -> list[Event]:
        stale = self._stale_cameras(now)
        events: list[Event] = []
        for rule in self._rules:
            cameras = self._rule_cameras(rule)
            if isinstance(rule.config, StaleCameraRule):
                if not cameras:
                    continue
                ages = {c: self._camera_age(c, now) for c in sorted(cameras)}
                late = sorted(c for c in cameras if ages[c] > rule.config.max_age_s)
                rule.value = max(ages.values())
                rule.detail = {"stale_cameras": late}
                old = rule.debouncer.status
                if rule.debouncer.update(bool(late), now) is not None:
                    events.append(self._rule_event(rule, old, now))
                continue
            late = sorted(stale.intersection(cameras))
            if late:
                old = rule.debouncer.status
                if rule.debouncer.force_unknown(now) is not None:
                    rule.detail = {"reason": "stale camera", "stale_cameras": late}
                    events.append(self._rule_event(rule, old, now))
        return events

    # -- line state ----------------------------------------------------------------------
    def _derive_state(self, t: float) -> list[Event]:
        signals: dict[LineStateName, list[str]] = {s: [] for s in LineStateName}
        stale = self._stale_cameras(self._now)
        signals[LineStateName.UNKNOWN].extend(f"camera {c} stale" for c in sorted(stale))
        if not self._last_fresh:
            signals[LineStateName.UNKNOWN].append("no frame yet")
        for rule in self._rules:
            status = rule.debouncer.status
            if rule.implies is not None and status == RuleStatus.VIOLATED:
                signals[rule.implies].append(rule.name)
            if (
                isinstance(rule.config, ConveyorRule)
                and rule.config.line_state != "none"
                and rule.mode == "stopped"
                and status != RuleStatus.UNKNOWN
            ):
                signals[LineStateName.STOPPED].append(rule.name)
        if self._last_activity is not None and self._now - self._last_activity >= (
            self.line.idle_after_s
        ):
            signals[LineStateName.IDLE].append("no parts")
        state, reasons = derive_line_state(signals)
        self._reasons = reasons
        if state == self._state:
            return []
        old, self._state, self._state_since = self._state, state, t
        for s in LineStateName:
            metrics.LINE_STATE.labels(self.line.id, s.value).set(1.0 if s == state else 0.0)
        return [
            Event(
                line=self.line.id,
                kind="state",
                name="state",
                old=old.value,
                new=state.value,
                t_wall=t,
                detail={"reasons": reasons},
            )
        ]

    # -- events and metrics --------------------------------------------------------------
    def _rule_event(self, rule: _Rule, old: RuleStatus, t: float) -> Event:
        self._rule_metrics(rule)
        detail: dict[str, object] = {"type": rule.type, "value": _json_number(rule.value)}
        detail.update(rule.detail)
        if rule.mode is not None:
            detail["mode"] = rule.mode
        return Event(
            line=self.line.id,
            kind="rule",
            name=rule.name,
            old=old.value,
            new=rule.debouncer.status.value,
            t_wall=t,
            detail=detail,
        )

    def _rule_metrics(self, rule: _Rule) -> None:
        status = rule.debouncer.status
        labels = (self.line.id, rule.name, rule.type)
        metrics.RULE_VIOLATED.labels(*labels).set(1.0 if status == RuleStatus.VIOLATED else 0.0)
        metrics.RULE_UNKNOWN.labels(*labels).set(1.0 if status == RuleStatus.UNKNOWN else 0.0)
