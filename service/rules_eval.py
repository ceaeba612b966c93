"""``linewatch rules eval``: the whole pipeline on the sim, judged against its truth.

One camera of the config (by default the first camera of the first line) is
replayed from the synthetic line in simulated time, as fast as the machine allows:
frames are rendered by index at the camera's fps, run through the same
:class:`~service.inference.OrtModel`, tracker, pose estimator and rule engine as
``linewatch serve`` (:class:`~service.pipeline.CameraStages`), and the resulting
events, counts and poses are compared with the sim's ground truth.

What counts (docs/rules.md, "Evaluating rules on the sim"):

- Truth intervals: the sim's scripted incidents (``belt_stop``, ``station_empty``,
  ``arm_stall``, ``zone_intrusion``), plus ``misplaced`` / ``misoriented``: the time
  a part flagged so in the truth is in the rule's zone and at least 80 % in view.
  Intervals of one kind closer than the judging rule's ``clear_for`` (at least 1 s)
  plus half a frame are merged: the rule is configured to stay violated through them.
- Each kind is judged by the rules of one type and implies line states:
  belt_stop -> conveyor, JAMMED (parts stand still on the belt); station_empty -> presence;
  arm_stall -> stall, FAULT; zone_intrusion -> zone_intrusion, FAULT;
  misplaced -> position; misoriented -> orientation.
- Every rule and state change is an event, judged as an *onset* (a rule turning
  ``violated``, the line entering FAULT/JAMMED/STOPPED/IDLE/UNKNOWN) or a *clear*
  (a rule leaving ``violated``, the line leaving such a state).  Start-up changes
  out of unknown into ok/RUNNING are not judged.
- An onset is a true positive when an interval of a matching kind started within
  [start - 1 s, start + for + 5 s] (``for`` of the rule judging that kind), a clear
  when one ended within [end - 1 s, end + clear_for + 5 s]; each interval matches
  one onset and one clear.  Delay = event time - start - for (onsets) or
  - end - clear_for (clears).  Events without an interval are ``false_events``.
- Edges of the run: an interval that starts in the first second (a flagged part
  already in view at t = 0, before any track can be confirmed) and an onset or clear
  whose window ends after the run (an incident still going on at the end) are not
  judged; they still take their events, which are then no false events.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.config import CameraConfig, Config, load_config
from service.domain import Event, Tracks
from service.errors import ConfigError, LineWatchError
from service.rules import LineConfig, RuleEngine

KIND_RULE_TYPE = {
    "belt_stop": "conveyor",
    "station_empty": "presence",
    "arm_stall": "stall",
    "zone_intrusion": "zone_intrusion",
    "misplaced": "position",
    "misoriented": "orientation",
}
KIND_STATES = {
    "belt_stop": ("JAMMED",),
    "arm_stall": ("FAULT",),
    "zone_intrusion": ("FAULT",),
}
FAULT_STATES = ("FAULT", "JAMMED", "STOPPED", "IDLE", "UNKNOWN")
EARLY_S = 1.0
LATE_S = 5.0
MERGE_GAP_S = 1.0
MIN_IN_VIEW = 0.8
POSE_GATE_MM = 25.0
PART_CLASSES = ("bracket", "flange")
WARMUP_S = 1.0
COUNT_LINE_X = 0.0
FLOORS = {
    "event_recall": 0.95,
    "event_precision": 0.95,
    "state_recall": 0.95,
    "state_precision": 0.95,
    "delay_s_mean": 1.0,
    "count_error_pct": 1.0,
    "position_err_mm_mean": 1.0,
    "orientation_err_deg_mean": 1.0,
}


@dataclass
class Interval:
    """A stretch of truth: something a rule (and maybe the line state) should report."""

    kind: str
    start: float
    end: float
    judged: bool = True  # False: it started in the warm-up; it only absorbs its events


@dataclass
class Item:
    """One judged change: an onset or a clear of a rule or a line state."""

    target: str  # rule name, or "state:JAMMED"
    phase: str  # "onset" | "clear"
    t: float
    event: Event
    matched: bool = False
    delay: float | None = None


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    delays: list[float] = field(default_factory=list)
    missed: list[tuple[str, Interval]] = field(default_factory=list)  # (phase, interval)

    def add(self, other: Score) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.delays += other.delays
        self.missed += other.missed

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": _ratio(self.tp, self.tp + self.fp),
            "recall": _ratio(self.tp, self.tp + self.fn),
            "delay_s_mean": _round(float(np.mean(self.delays))) if self.delays else None,
            "delay_s_max": _round(float(np.max(self.delays))) if self.delays else None,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


# --- truth (pure) -------------------------------------------------------------------


def merge_intervals(intervals: Sequence[Interval], gap: float = MERGE_GAP_S) -> list[Interval]:
    """Intervals of one kind closer than ``gap`` seconds become one."""
    out: list[Interval] = []
    for iv in sorted(intervals, key=lambda i: i.start):
        if out and iv.start - out[-1].end < gap:
            out[-1].end = max(out[-1].end, iv.end)
        else:
            out.append(Interval(iv.kind, iv.start, iv.end, iv.judged))
    return out


def in_polygon(points: npt.ArrayLike, polygon: Sequence[Sequence[float]] | None) -> npt.NDArray[
    np.bool_
]:
    """Even-odd test of (N, 2) points against a polygon (None: everywhere)."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    if polygon is None:
        return np.ones(len(p), bool)
    poly = np.asarray(polygon, np.float64)
    x, y = p[:, 0:1], p[:, 1:2]
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = ((y0 <= y) != (y1 <= y)) & (
        x < (x1 - x0) * (y - y0) / np.where(y1 == y0, 1e-12, y1 - y0) + x0
    )
    return np.asarray(crosses.sum(axis=1) % 2 == 1)


def merge_gap_s(clear_for_s: float, dt: float) -> float:
    """Truth intervals of a kind closer than this are one: the rule that judges the
    kind stays violated through gaps up to its ``clear_for`` (it clears only after
    ``clear_for`` seconds without a violation, at a frame), so a gap of ``clear_for``
    or less cannot show as a clear and a new onset.  At least ``MERGE_GAP_S``; half a
    frame interval absorbs the rounding of frame times."""
    return max(MERGE_GAP_S, clear_for_s) + dt / 2


def flag_intervals(
    samples: dict[str, list[float]], kind: str, dt: float
) -> list[Interval]:
    """Per-part sample times (flagged, in zone, in view) -> merged intervals."""
    out: list[Interval] = []
    for times in samples.values():
        start = prev = times[0]
        for t in times[1:]:
            if t - prev > 1.5 * dt:
                out.append(Interval(kind, start, prev + dt))
                start = t
            prev = t
        out.append(Interval(kind, start, prev + dt))
    return merge_intervals(out)


def judge_changes(
    events: Sequence[Event],
    intervals: dict[str, list[Interval]],
    rule_kinds: dict[str, list[str]],
    for_s: dict[str, float],
    clear_for_s: dict[str, float],
    horizon: float | None = None,
) -> tuple[dict[str, Score], list[Item]]:
    """Match events to truth intervals (see the module docstring); scores per target.

    ``rule_kinds`` maps a target (rule name or ``state:NAME``) to the interval kinds
    it reports; ``for_s`` / ``clear_for_s`` map a kind to the ``for`` / ``clear_for``
    of the rule that judges it.  An interval's onset (clear) is judged only when the
    interval is ``judged`` and its whole window ends before ``horizon`` (the end of
    the run); otherwise it still takes its event (that event is no false positive)
    but counts neither as a hit nor as a miss.
    """
    items: list[Item] = []
    for ev in events:
        if ev.kind == "rule":
            if ev.new == "violated":
                items.append(Item(ev.name, "onset", ev.t_wall, ev))
            elif ev.old == "violated":
                items.append(Item(ev.name, "clear", ev.t_wall, ev))
        else:
            if ev.old in FAULT_STATES and ev.old != "UNKNOWN":
                items.append(Item(f"state:{ev.old}", "clear", ev.t_wall, ev))
            if ev.new in FAULT_STATES:
                items.append(Item(f"state:{ev.new}", "onset", ev.t_wall, ev))
    targets = set(rule_kinds) | {i.target for i in items}
    scores: dict[str, Score] = {}
    for target in sorted(targets):
        kinds = rule_kinds.get(target, [])
        truth = sorted(
            (iv for k in kinds for iv in intervals.get(k, [])), key=lambda iv: iv.start
        )
        score = Score()
        for phase in ("onset", "clear"):
            mine = [i for i in items if i.target == target and i.phase == phase]
            for iv in truth:
                if phase == "onset":
                    anchor, slack = iv.start, for_s.get(iv.kind, 0.0)
                else:
                    anchor, slack = iv.end, clear_for_s.get(iv.kind, 0.0)
                hit = next(
                    (
                        i for i in mine
                        if not i.matched and anchor - EARLY_S <= i.t <= anchor + slack + LATE_S
                    ),
                    None,
                )  # fmt: skip
                judged = iv.judged and (horizon is None or anchor + slack + LATE_S <= horizon)
                if hit is not None:
                    hit.matched = True
                    hit.delay = hit.t - anchor - slack
                if not judged:
                    continue
                if hit is None:
                    score.fn += 1
                    score.missed.append((phase, iv))
                    continue
                assert hit.delay is not None
                score.tp += 1
                score.delays.append(hit.delay)
            score.fp += sum(1 for i in mine if not i.matched)
        scores[target] = score
    return scores, items


# --- the run --------------------------------------------------------------------------


@dataclass
class Truths:
    """What the run collected from the sim's truth and the tracks, frame by frame."""

    flagged: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {"misplaced": defaultdict(list), "misoriented": defaultdict(list)}
    )
    last_x: dict[str, float] = field(default_factory=dict)
    crossings: int = 0
    pos_err: list[float] = field(default_factory=list)
    ang_err: list[float] = field(default_factory=list)
    pose_class: list[str] = field(default_factory=list)  # the class of each pose sample


def pick_camera(config: Config, camera: str | None) -> tuple[CameraConfig, LineConfig]:
    """The camera to replay (default: the first camera of the first line) and its line."""
    if not config.lines:
        raise ConfigError("the config has no lines: rules eval needs a line with rules")
    if camera is None:
        for line in config.lines:
            cams = config.line_cameras(line.id)
            if cams:
                camera = cams[0]
                break
        else:
            raise ConfigError("no enabled camera feeds any configured line")
    try:
        cam = config.camera(camera)
    except KeyError:
        known = ", ".join(c.id for c in config.cameras)
        raise ConfigError(f"no camera {camera!r} in the config (cameras: {known})") from None
    try:
        line = config.line(cam.line)
    except KeyError:
        raise ConfigError(
            f"camera {cam.id!r} feeds line {cam.line!r}, which has no rules in the config"
        ) from None
    return cam, line


def _sim_params(source: str) -> dict[str, float]:
    from urllib.parse import parse_qsl, urlsplit

    if not source.startswith("sim://"):
        return {}
    return {k: float(v) for k, v in parse_qsl(urlsplit(source).query) if k != "scenario"}


def _symmetry_deg(template: npt.NDArray[np.float64] | None) -> float:
    """The smallest rotation (of 180, 120, 90, 72, 60) that maps the template's
    named keypoints onto themselves (360: none)."""
    if template is None:
        return 360.0
    for step in (60.0, 72.0, 90.0, 120.0, 180.0):
        a = math.radians(step)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        if np.allclose(template @ rot.T, template, atol=1e-6):
            return step
    return 360.0


def _wrap(angle: npt.ArrayLike, period: float = 360.0) -> npt.NDArray[np.float64]:
    a = np.asarray(angle, np.float64)
    return np.asarray((a + period / 2) % period - period / 2)


def run_eval(
    config_path: Path | None,
    *,
    scenario: str = "conveyor",
    seed: int = 0,
    seconds: float = 600.0,
    fps: float | None = None,
    camera: str | None = None,
    model_path: Path | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Run the pipeline on the sim and return the report (one JSON-ready dict)."""
    from service.app import camera_stages, inference_config
    from service.inference import OrtModel
    from service.sim import CLASSES as SIM_CLASSES
    from service.sim import SCENARIOS, Scene

    if scenario not in SCENARIOS:
        raise LineWatchError(
            f"unknown scenario {scenario!r}; choose one of: {', '.join(SCENARIOS)}"
        )
    if seconds <= 0:
        raise LineWatchError(f"--seconds must be > 0, got {seconds}")
    config = load_config(config_path, check_files=model_path is None)
    cam, line = pick_camera(config, camera)
    mod = config.model_for(cam)
    params = _sim_params(cam.source)
    fps = float(fps or params.get("fps") or cam.fps or 15.0)
    width = int(params.get("width", cam.width or 640))
    height = int(params.get("height", cam.height or 480))
    opts = inference_config(mod).model_copy(update={"instances": 1})  # one frame at a time
    if threads:
        opts = opts.model_copy(update={"intra_op_threads": threads})
    model = OrtModel(model_path or mod.path, opts, name=mod.id)
    classes = model.info.classes
    engine = RuleEngine(line, classes=classes)
    stages = camera_stages(cam, classes, model.info.metadata, engine)
    if stages.homography is None:
        raise ConfigError(
            f"camera {cam.id!r} has no calibration: rules eval compares millimetres with the "
            "sim's truth; add the sim's homography (see the embedded default config)"
        )
    scene = Scene(scenario, seed=seed, width=width, height=height, fps=fps)
    names = [c.name for c in classes]
    part_ids = {names.index(n) for n in PART_CLASSES if n in names}
    sim_of = {c.name: c for c in SIM_CLASSES}
    symmetry = {
        cid: _symmetry_deg(sim_of[names[cid]].template_mm)
        for cid in part_ids
        if names[cid] in sim_of
    }
    zones: dict[str, Any] = {r.type: getattr(r, "zone", None) for r in line.rules}
    count_rules = [r for r in line.rules if r.type == "throughput"]

    truths = Truths()
    events: list[Event] = []
    n_frames = int(round(seconds * fps))
    parts_at_warmup: int | None = None
    t_start = time.perf_counter()
    infer_s = 0.0
    for index in range(n_frames):
        image, truth = scene.render(index)
        t = index / fps
        t0 = time.perf_counter()
        (detections,) = model.predict([image])
        infer_s += time.perf_counter() - t0
        tracks, new_events = stages.update(cam.id, detections, t, t_wall=t, age_s=0.0)
        events.extend(new_events)
        if parts_at_warmup is None and t >= WARMUP_S:
            parts_at_warmup = _parts(engine)
        _collect_truth(truths, truth, t, zones, names, t >= WARMUP_S)
        _collect_pose_errors(truths, truth, tracks, names, part_ids, symmetry)
    wall_s = time.perf_counter() - t_start
    parts_counted = _parts(engine) - (parts_at_warmup or 0)

    rule_kinds: dict[str, list[str]] = {r.name: [] for r in line.rules}
    for_s: dict[str, float] = {}
    clear_for_s: dict[str, float] = {}
    for kind, rtype in KIND_RULE_TYPE.items():
        for r in line.rules:
            if r.type == rtype:
                rule_kinds[r.name].append(kind)
                for_s.setdefault(kind, r.for_s)
                clear_for_s.setdefault(kind, r.clear_for_s)
    for state in FAULT_STATES:
        rule_kinds[f"state:{state}"] = [k for k, s in KIND_STATES.items() if state in s]

    intervals: dict[str, list[Interval]] = {}
    for inc in scene.incidents(0.0, seconds):
        intervals.setdefault(inc.kind, []).append(
            Interval(inc.kind, inc.start_s, min(inc.end_s, seconds))
        )
    dt = 1.0 / fps
    for kind, samples in truths.flagged.items():
        if samples:
            intervals[kind] = flag_intervals(samples, kind, dt)
    for kind, ivs in intervals.items():
        for iv in ivs:  # tracks are confirmed only after a few frames
            iv.judged = iv.start >= WARMUP_S
        intervals[kind] = merge_intervals(ivs, merge_gap_s(clear_for_s.get(kind, 0.0), dt))

    scores, items = judge_changes(
        events, intervals, rule_kinds, for_s, clear_for_s, horizon=seconds
    )

    total, states_total = Score(), Score()
    for target, score in scores.items():
        total.add(score)
        if target.startswith("state:"):
            states_total.add(score)
    false_items = [i for i in items if not i.matched]
    truth_count = truths.crossings if count_rules else 0
    count_error = (
        abs(parts_counted - truth_count) / truth_count * 100.0 if truth_count else None
    )
    report: dict[str, Any] = {
        "events": total.as_dict(),
        "states": {
            t.split(":", 1)[1]: s.as_dict() for t, s in scores.items() if t.startswith("state:")
        },
        "states_all": states_total.as_dict(),
        "rules": {t: s.as_dict() for t, s in scores.items() if not t.startswith("state:")},
        "false_events": len(false_items),
        "false_event_list": [
            {"t": round(i.t, 2), "phase": i.phase, "target": i.target, "old": i.event.old,
             "new": i.event.new, "detail": i.event.detail}
            for i in false_items[:50]
        ],  # fmt: skip
        "missed": [
            {"target": target, "phase": phase, "kind": iv.kind, "start": round(iv.start, 2),
             "end": round(iv.end, 2)}
            for target, score in scores.items()
            for phase, iv in score.missed
        ][:50],
        "parts_counted": parts_counted,
        "parts_true": truth_count,
        "count_error_pct": _round(count_error),
        "position_err_mm_mean": _stat(truths.pos_err, np.mean),
        "position_err_mm_p95": _stat(truths.pos_err, lambda a: np.percentile(a, 95)),
        "orientation_err_deg_mean": _stat(truths.ang_err, np.mean),
        "orientation_err_deg_p95": _stat(truths.ang_err, lambda a: np.percentile(a, 95)),
        "pose_samples": len(truths.pos_err),
        "pose_by_class": _pose_by_class(truths),
        "incidents": {k: len(v) for k, v in sorted(intervals.items())},
        "scenario": scenario,
        "seed": seed,
        "seconds": seconds,
        "fps": fps,
        "frames": n_frames,
        "camera": cam.id,
        "line": line.id,
        "model": str(model_path or mod.path),
        "provider": model.provider,
        "wall_s": round(wall_s, 1),
        "infer_ms_mean": round(infer_s / max(n_frames, 1) * 1000, 2),
    }
    report["floors"] = _floors(report)
    return report


def _parts(engine: RuleEngine) -> int:
    counters = engine.snapshot().get("counters")
    return int(counters.get("parts", 0)) if isinstance(counters, dict) else 0


def _stat(values: list[float], fn: Any) -> float | None:
    return _round(float(fn(np.asarray(values)))) if values else None


def _collect_truth(
    truths: Truths, truth: Any, t: float, zones: dict[str, Any], names: list[str], count: bool
) -> None:
    zone_of = {"misplaced": zones.get("position"), "misoriented": zones.get("orientation")}
    for inst in truth.instances:
        if inst.class_name not in PART_CLASSES or "at_station" in inst.flags:
            continue
        x, y = inst.pose_mm[0], inst.pose_mm[1]
        prev = truths.last_x.get(inst.uid)
        truths.last_x[inst.uid] = x
        if count and prev is not None and prev < COUNT_LINE_X <= x and abs(y) <= 100.0:
            truths.crossings += 1
        if inst.in_view < MIN_IN_VIEW:
            continue
        for flag, zone in zone_of.items():
            if flag in inst.flags and bool(in_polygon([[x, y]], zone)[0]):
                truths.flagged[flag][inst.uid].append(t)


def _collect_pose_errors(
    truths: Truths, truth: Any, tracks: Tracks, names: list[str], part_ids: set[int],
    symmetry: dict[int, float],
) -> None:
    if tracks.poses is None or not len(tracks):
        return
    poses = tracks.poses.astype(np.float64)
    cls = tracks.detections.class_ids
    for inst in truth.instances:
        if inst.class_name not in PART_CLASSES or inst.in_view < MIN_IN_VIEW:
            continue
        cid = names.index(inst.class_name) if inst.class_name in names else -1
        if cid not in part_ids:
            continue
        rows = np.flatnonzero((cls == cid) & np.isfinite(poses[:, 0]))
        if not len(rows):
            continue
        d = np.hypot(poses[rows, 0] - inst.pose_mm[0], poses[rows, 1] - inst.pose_mm[1])
        j = int(np.argmin(d))
        if d[j] > POSE_GATE_MM:
            continue
        truths.pos_err.append(float(d[j]))
        truths.pose_class.append(inst.class_name)
        period = symmetry.get(cid, 360.0)
        truths.ang_err.append(
            float(abs(_wrap(poses[rows[j], 2] - inst.pose_mm[2], period)))
        )


def _pose_by_class(truths: Truths) -> dict[str, dict[str, Any]]:
    """Pose errors per part class: samples, position and orientation mean / p95."""
    cls = np.asarray(truths.pose_class)
    pos, ang = np.asarray(truths.pos_err), np.asarray(truths.ang_err)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(truths.pose_class)):
        mine = cls == name
        p, a = pos[mine].tolist(), ang[mine].tolist()
        out[name] = {
            "samples": int(mine.sum()),
            "position_err_mm_mean": _stat(p, np.mean),
            "position_err_mm_p95": _stat(p, lambda v: np.percentile(v, 95)),
            "orientation_err_deg_mean": _stat(a, np.mean),
            "orientation_err_deg_p95": _stat(a, lambda v: np.percentile(v, 95)),
        }
    return out


def _floors(report: dict[str, Any]) -> dict[str, Any]:
    values = {
        "event_recall": report["events"]["recall"],
        "event_precision": report["events"]["precision"],
        "state_recall": report["states_all"]["recall"],
        "state_precision": report["states_all"]["precision"],
        "delay_s_mean": report["events"]["delay_s_mean"],
        "count_error_pct": report["count_error_pct"],
        "position_err_mm_mean": report["position_err_mm_mean"],
        "orientation_err_deg_mean": report["orientation_err_deg_mean"],
    }
    out: dict[str, Any] = {}
    for name, floor in FLOORS.items():
        value = values[name]
        higher = name.endswith(("recall", "precision"))
        ok = None if value is None else (value >= floor if higher else value <= floor)
        out[name] = {"value": value, "floor": floor, "ok": ok}
    return out


def render_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_eval`'s report."""
    ev = report["events"]
    lines = [
        f"{report['scenario']} seed {report['seed']}, {report['seconds']:g} s at "
        f"{report['fps']:g} fps ({report['frames']} frames, {report['wall_s']} s wall), "
        f"camera {report['camera']}, line {report['line']}",
        f"events: precision {ev['precision']}, recall {ev['recall']}, "
        f"delay mean {ev['delay_s_mean']} s; false events {report['false_events']}",
    ]
    for group in ("states", "rules"):
        for name, s in report[group].items():
            if s["tp"] or s["fp"] or s["fn"]:
                lines.append(
                    f"  {group[:-1]} {name}: P {s['precision']} R {s['recall']} "
                    f"delay {s['delay_s_mean']} (tp {s['tp']} fp {s['fp']} fn {s['fn']})"
                )
    lines.append(
        f"count: {report['parts_counted']} counted, {report['parts_true']} true "
        f"({report['count_error_pct']} %)"
    )
    lines.append(
        f"position error mm: mean {report['position_err_mm_mean']} p95 "
        f"{report['position_err_mm_p95']}; orientation deg: mean "
        f"{report['orientation_err_deg_mean']} p95 {report['orientation_err_deg_p95']}"
    )
    for name, c in report.get("pose_by_class", {}).items():
        lines.append(
            f"  {name} ({c['samples']} samples): position mm mean "
            f"{c['position_err_mm_mean']}, orientation deg mean {c['orientation_err_deg_mean']}"
        )
    for name, f in report["floors"].items():
        mark = "ok" if f["ok"] else ("n/a" if f["ok"] is None else "MISSED")
        lines.append(f"  floor {name}: {f['value']} (floor {f['floor']}) {mark}")
    return "\n".join(lines)
