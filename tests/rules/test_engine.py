"""Each rule kind through the engine with synthetic Tracks: exact transitions and
the timings of ``for``, ``clear_for`` and hysteresis (frames at 10 fps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.domain import Event, Tracks

from .conftest import EngineFactory, Part, changes, feed, make_tracks

BELT = [[-500, -100], [500, -100], [500, 100], [-500, 100]]
DANGER = [[60, -260], [300, -260], [300, -140], [60, -140]]
U, OK, BAD = "unknown", "ok", "violated"


def expect(events: list[Event], name: str, want: list[tuple[str, str, float]]) -> None:
    got = changes(events, name)
    assert [(o, n) for o, n, _ in got] == [(o, n) for o, n, _ in want], got
    assert [t for *_, t in got] == pytest.approx([t for *_, t in want], abs=1e-6), got


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_presence_for_and_class_filter(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [
            {
                "type": "presence",
                "name": "station",
                "camera": "cam-1",
                "for": 2,
                "zone": [[-10, -10], [10, -10], [10, 10], [-10, 10]],
                "classes": ["bracket"],
            }
        ]
    )

    def frames(t: float) -> Tracks:
        present = t < 5 or 6 <= t < 8 or t >= 12
        parts = [Part(1, cls=1), Part(2, cls=0, xy=(50, 0))]  # a flange in, a bracket out
        if present:
            parts.append(Part(3, cls=0, xy=(1, -1)))
        return make_tracks(*parts)

    events = feed(engine, frames, 0, 14)
    # absent for 1 s (< for): nothing; absent from 8 s: violated at 10 s; back at 12 s
    expect(events, "station", [(U, OK, 0.0), (OK, BAD, 10.0), (BAD, OK, 12.0)])
    expect(events, "state", [("UNKNOWN", "RUNNING", 0.0)])  # presence leaves the state alone
    rule = engine.snapshot()["rules"][0]  # type: ignore[index]
    assert rule["status"] == "ok" and rule["value"] == 1.0 and rule["since"] == pytest.approx(12)


@pytest.mark.parametrize(("hysteresis", "recovered_at"), [(5.0, 4.0), (0.0, 3.0)])
def test_position_tolerance_with_hysteresis(
    make_engine: EngineFactory, hysteresis: float, recovered_at: float
) -> None:
    engine = make_engine(
        [
            {
                "type": "position",
                "name": "centred",
                "for": 0.5,
                "zone": BELT,
                "target_line": [[-500, 0], [500, 0]],
                "tolerance_mm": 20,
                "hysteresis_mm": hysteresis,
            }
        ]
    )

    def frames(t: float) -> Tracks:
        y = 10 if t < 1 else 25 if t < 3 else 18 if t < 4 else 12
        return make_tracks(Part(1, xy=(0, y)), Part(2, xy=(0, 300)))  # part 2: outside

    events = feed(engine, frames, 0, 5)
    # 25 mm from t=1: violated after `for` (1.5); 18 mm stays violated only with
    # hysteresis (leave below 20 - 5 = 15 mm)
    expect(events, "centred", [(U, OK, 0.0), (OK, BAD, 1.5), (BAD, OK, recovered_at)])


def test_position_of_a_named_keypoint_against_a_point(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [
            {
                "type": "position",
                "name": "tip",
                "keypoint": "long_tip",
                "classes": ["bracket"],
                "target": [100, 0],
                "tolerance_mm": 10,
            }
        ]
    )
    # TEMPLATE keypoint 1 sits 20 mm along the part's x axis
    events = feed(
        engine, lambda t: make_tracks(Part(1, xy=(80, 0), theta=0 if t < 1 else 90)), 0, 2
    )
    expect(events, "tip", [(U, OK, 0.0), (OK, BAD, 1.0)])
    value = engine.snapshot()["rules"][0]["value"]  # type: ignore[index]
    assert value == pytest.approx(math.hypot(20, 20), abs=1e-3)


def test_orientation_misoriented_part(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [
            {
                "type": "orientation",
                "name": "upright",
                "for": 0.3,
                "zone": BELT,
                "tolerance_deg": 10,
                "hysteresis_deg": 2,
            },
            {
                "type": "orientation",
                "name": "half-turn-ok",
                "zone": BELT,
                "tolerance_deg": 10,
                "symmetry_deg": 180,
            },
        ]
    )

    def frames(t: float) -> Tracks:
        if t < 1:
            return make_tracks(Part(1, theta=-3), Part(2, xy=(100, 0), theta=178))
        if t < 2:
            return make_tracks(Part(1, theta=90), Part(2, xy=(100, 0), theta=178))
        return make_tracks(Part(1, xy=(0, 300), theta=90))  # left the zone

    events = feed(engine, frames, 0, 3)
    # part 2 at 178 deg violates the 360-symmetric rule (after `for`), not the 180 one
    expect(events, "upright", [(U, BAD, 0.3), (BAD, OK, 2.0)])
    expect(events, "half-turn-ok", [(U, OK, 0.0), (OK, BAD, 1.0), (BAD, OK, 2.0)])


def test_orientation_timing(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [{"type": "orientation", "name": "o", "for": 0.3, "zone": BELT, "tolerance_deg": 10}]
    )

    def frames(t: float) -> Tracks:
        theta = 1 if t < 1 else 95 if t < 2 else 0
        return make_tracks(Part(1, theta=theta)) if t < 2.5 else make_tracks()

    events = feed(engine, frames, 0, 3)
    expect(events, "o", [(U, OK, 0.0), (OK, BAD, 1.3), (BAD, OK, 2.0)])


def test_orientation_unknown_without_poses(make_engine: EngineFactory) -> None:
    engine = make_engine([{"type": "orientation", "name": "o", "tolerance_deg": 10}])
    events = feed(engine, lambda t: make_tracks(Part(1), with_mm=False), 0, 1)
    assert changes(events, "o") == []
    rule = engine.snapshot()["rules"][0]  # type: ignore[index]
    assert rule["status"] == "unknown" and "calibrate" in str(rule["detail"])


def _throughput_frames(t: float) -> Tracks:
    parts = []
    if t < 3:  # track 1 crosses x=0 at t=1 (+X); an arm (not counted) does too
        parts += [Part(1, xy=(-50 + 50 * t, 0)), Part(6, cls=2, xy=(-50 + 50 * t, 50))]
    elif t < 5:  # track 2 jitters across the line: counted once
        parts.append(Part(2, cls=1, xy=(1 if round(t * 10) % 2 else -1, 10)))
    elif t < 7:  # track 3 crosses the wrong way
        parts.append(Part(3, xy=(50 - 50 * (t - 5), 0)))
    elif t < 9:  # track 4 crosses beyond the end of the count line
        parts.append(Part(4, xy=(-50 + 50 * (t - 7), 300)))
    elif t < 10:  # track 5 is first seen past the line
        parts.append(Part(5, xy=(10 + 50 * (t - 9), 0)))
    elif 20 <= t < 23:  # after a pause, tracks 7 and 8 cross at 21 and 21.5 s
        parts += [Part(7, xy=(-50 + 50 * (t - 20), 0)), Part(8, xy=(-75 + 50 * (t - 20), 40))]
    return make_tracks(*parts)


def test_throughput_counts_each_track_once_in_the_right_direction(
    make_engine: EngineFactory, line_id: str
) -> None:
    engine = make_engine(
        [
            {
                "type": "throughput",
                "name": "out",
                "count_line": [[0, -100], [0, 100]],
                "direction": [1, 0],
                "classes": ["bracket", "flange"],
                "window_s": 10,
                "min_per_minute": 12,
            }
        ],
        idle_after_s=15,
    )
    events = feed(engine, _throughput_frames, 0, 10)
    snap = engine.snapshot()
    assert snap["counters"] == {"parts": 2}
    rule = snap["rules"][0]  # type: ignore[index]
    assert rule["detail"]["count"] == 2 and rule["detail"]["wrong_way"] == 1
    assert rule["status"] == "unknown"  # the 10 s window is not full yet
    assert snap["cycle_time_s"] == pytest.approx(2.1)  # counted at 1.0 and 3.1
    assert sample("linewatch_parts_counted_total", line=line_id, rule="out") == 2
    assert sample("linewatch_cycle_time_seconds_count", line=line_id) == 1

    events += feed(engine, _throughput_frames, 10, 25)
    # 2 parts in (0, 10] = 12/min: ok; from 11 s only one: below 12/min
    expect(events, "out", [(U, OK, 10.0), (OK, BAD, 11.0), (BAD, OK, 21.5)])
    # idle: nothing counted from 3.1 s for 15 s -> IDLE at 18.1 s; track 7 counted at 21 s
    expect(
        events,
        "state",
        [("UNKNOWN", "RUNNING", 0.0), ("RUNNING", "IDLE", 18.1), ("IDLE", "RUNNING", 21.0)],
    )
    assert engine.snapshot()["counters"] == {"parts": 4}
    assert engine.snapshot()["cycle_time_s"] == pytest.approx(0.5)


def test_conveyor_jam_hysteresis_and_stop(make_engine: EngineFactory, line_id: str) -> None:
    engine = make_engine(
        [
            {
                "type": "conveyor",
                "name": "belt",
                "zone": BELT,
                "classes": ["bracket", "flange"],
                "min_speed_mm_s": 30,
                "hysteresis_mm_s": 10,
                "for": 2,
                "empty_for_s": 2.95,
            }
        ]
    )
    snaps: dict[float, dict[str, object]] = {}

    def frames(t: float) -> Tracks:
        v = 100 if t < 5 else 0 if t < 12 else 35 if t < 13 else 100
        if t >= 16:
            return make_tracks(Part(9, cls=2, xy=(0, 0)))  # only the arm: the belt is empty
        return make_tracks(
            *[Part(i, cls=i % 2, xy=(x, 0), vel=(v, 0)) for i, x in enumerate((-300, 0, 300))]
        )

    events = []
    for t0 in range(0, 22):
        events += feed(engine, frames, t0, t0 + 1)
        snaps[t0] = engine.snapshot()
    # standing still from 5 s: jammed after `for` (7 s); 35 mm/s is not enough to leave
    # (30 + 10); 100 mm/s from 13 s clears it; empty from 16 s: stopped at 18.9 s
    expect(events, "belt", [(U, OK, 0.0), (OK, BAD, 7.0), (BAD, OK, 13.0)])
    expect(
        events,
        "state",
        [
            ("UNKNOWN", "RUNNING", 0.0),
            ("RUNNING", "JAMMED", 7.0),
            ("JAMMED", "RUNNING", 13.0),
            ("RUNNING", "STOPPED", 18.9),
        ],
    )
    assert snaps[3]["belt_speed_mm_s"] == pytest.approx(100)
    assert snaps[8]["belt_speed_mm_s"] == pytest.approx(0)
    assert snaps[21]["belt_speed_mm_s"] is None
    assert snaps[8]["rules"][0]["detail"]["mode"] == "jammed"  # type: ignore[index]
    assert snaps[21]["rules"][0]["detail"]["mode"] == "stopped"  # type: ignore[index]
    assert math.isnan(sample("linewatch_belt_speed_meters_per_second", line=line_id, rule="belt"))
    assert sample("linewatch_line_state", line=line_id, state="STOPPED") == 1
    assert sample("linewatch_line_state", line=line_id, state="RUNNING") == 0


def test_zone_intrusion_by_a_visible_keypoint(make_engine: EngineFactory, line_id: str) -> None:
    engine = make_engine(
        [
            {
                "type": "zone_intrusion",
                "name": "danger",
                "zone": DANGER,
                "classes": ["hand"],
                "clear_for": 0.5,
            }
        ]
    )
    outside = [[100, -400], [100, -350], [100, -300], [110, -290], [90, -300]]

    def frames(t: float) -> Tracks:
        kps = [list(p) for p in outside]
        scores = [0.9] * 5
        if 1 <= t < 3:
            kps[2] = [150, -200]  # the palm in the zone
            scores[2] = 0.9 if t < 2 else 0.1  # ... not seen from 2 s
        arm_in = [[150, -200]] * 5  # an arm in the zone does not count
        return make_tracks(Part(9, cls=3, kps=kps, kp_score=scores), Part(4, cls=2, kps=arm_in))

    events = feed(engine, frames, 0, 3)
    # clear_for also holds the first ok back (from unknown)
    expect(events, "danger", [(U, OK, 0.5), (OK, BAD, 1.0), (BAD, OK, 2.5)])
    expect(
        events,
        "state",
        [("UNKNOWN", "RUNNING", 0), ("RUNNING", "FAULT", 1), ("FAULT", "RUNNING", 2.5)],
    )
    bad = next(e for e in events if e.new == "violated")
    assert bad.detail["track_ids"] == [9] and bad.detail["type"] == "zone_intrusion"
    assert (
        sample("linewatch_rule_violated", line=line_id, rule="danger", type="zone_intrusion") == 0
    )


def _arm(q_deg: float) -> list[list[float]]:
    """base, shoulder, elbow (first link along +Y), wrist at joint angle q, tool."""
    a = math.radians(90 + q_deg)
    wrist = [100 * math.cos(a), 110 + 100 * math.sin(a)]
    return [[0, 0], [0, 10], [0, 110], wrist, [wrist[0], wrist[1] - 20]]


def test_joint_range_with_hysteresis(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [
            {
                "type": "joint_range",
                "name": "elbow",
                "class": "arm",
                "chain": ["shoulder", "elbow", "wrist"],
                "min_deg": -100,
                "max_deg": 100,
                "hysteresis_deg": 5,
            }
        ]
    )

    def frames(t: float) -> Tracks:
        q = 50 if t < 1 else 105 if t < 2 else 97 if t < 3 else 90
        return make_tracks(Part(1, cls=2, kps=_arm(q)))

    events = feed(engine, frames, 0, 4)
    expect(events, "elbow", [(U, OK, 0.0), (OK, BAD, 1.0), (BAD, OK, 3.0)])
    expect(
        events,
        "state",
        [("UNKNOWN", "RUNNING", 0), ("RUNNING", "FAULT", 1), ("FAULT", "RUNNING", 3)],
    )
    assert engine.snapshot()["rules"][0]["value"] == pytest.approx(90)  # type: ignore[index]


def test_stall_of_a_moving_arm(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [{"type": "stall", "name": "arm-stall", "class": "arm", "for": 2, "min_motion_mm": 5}]
    )

    def frames(t: float) -> Tracks:
        s = t if t < 5 or t >= 10 else 5.0  # frozen on [5, 10)
        return make_tracks(Part(1, cls=2, kps=_arm(10 * s - 50)))  # the wrist: 17 mm/s

    events = feed(engine, frames, 0, 11)
    # evidence once a whole 0.5 s window is watched; from 5.3 s the wrist moved less
    # than 5 mm in the last 0.5 s (3.5 mm at 17 mm/s): still, violated `for` later
    expect(events, "arm-stall", [(U, OK, 0.5), (OK, BAD, 7.3), (BAD, OK, 10.0)])
    expect(
        events,
        "state",
        [("UNKNOWN", "RUNNING", 0), ("RUNNING", "FAULT", 7.3), ("FAULT", "RUNNING", 10)],
    )


def _station_rules(**stale: object) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = [
        {"type": "presence", "name": "station", "camera": "cam-1", "zone": BELT},
    ]
    if stale:
        rules.append({"type": "stale_camera", "name": "cam-1-fresh", "camera": "cam-1", **stale})
    return rules


def test_stale_camera_makes_rules_and_line_unknown(make_engine: EngineFactory) -> None:
    engine = make_engine(_station_rules(max_age_s=1.0))
    here = lambda t: make_tracks(Part(1))  # noqa: E731
    events = feed(engine, here, 0, 3)
    events += engine.tick(3.5)
    assert engine.state.value == "RUNNING"  # 0.6 s old: still fresh
    events += engine.tick(4.0)
    events += engine.update("cam-1", here(5.0), t_wall=3.0, frame_age_s=2.0)  # an old frame
    assert engine.state.value == "UNKNOWN"
    events += feed(engine, here, 6, 7)
    # staleness is judged at the time of processing (capture + frame age 0.01 s)
    expect(events, "cam-1-fresh", [(U, OK, 0.01), (OK, BAD, 4.0), (BAD, OK, 6.01)])
    expect(events, "station", [(U, OK, 0.0), (OK, U, 4.0), (U, OK, 6.0)])
    expect(
        events,
        "state",
        [("UNKNOWN", "RUNNING", 0), ("RUNNING", "UNKNOWN", 4.0), ("UNKNOWN", "RUNNING", 6.0)],
    )
    unknown = next(e for e in events if e.name == "station" and e.new == "unknown")
    assert unknown.detail["stale_cameras"] == ["cam-1"]


def test_without_a_stale_rule_a_silent_camera_is_still_unknown(make_engine: EngineFactory) -> None:
    engine = make_engine(_station_rules(), stale_after_s=2.0)
    feed(engine, lambda t: make_tracks(Part(1)), 0, 1)
    assert engine.tick(2.5) == []
    events = engine.tick(3.0)
    assert [(e.name, e.new) for e in events] == [("station", "unknown"), ("state", "UNKNOWN")]


def test_a_line_camera_that_never_delivers_is_stale(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [{"type": "presence", "name": "far", "camera": "cam-2", "zone": BELT}],
        cameras=["cam-1", "cam-2"],
        stale_after_s=2.0,
    )
    events = feed(engine, lambda t: make_tracks(Part(1)), 0, 3)
    expect(events, "state", [("UNKNOWN", "RUNNING", 0.0), ("RUNNING", "UNKNOWN", 2.0)])
    assert changes(events, "far") == []  # never evaluated: unknown from the start
    with pytest.raises(ValueError, match="not a camera of line"):
        engine.update("cam-9", make_tracks(), 3.0)


def test_presence_over_two_cameras_needs_one_to_see_it(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [{"type": "presence", "name": "st", "cameras": ["cam-1", "cam-2"], "zone": BELT}]
    )
    events = []
    for i in range(20):
        t = i / 10
        events += engine.update("cam-1", make_tracks(), t)
        events += engine.update("cam-2", make_tracks(Part(1)) if t < 1 else make_tracks(), t)
    expect(events, "st", [(U, BAD, 0.0), (BAD, OK, 0.0), (OK, BAD, 1.0)])


def test_fault_outranks_jam_and_snapshot_is_json(make_engine: EngineFactory) -> None:
    engine = make_engine(
        [
            {"type": "conveyor", "name": "belt", "zone": BELT, "min_speed_mm_s": 30},
            {"type": "zone_intrusion", "name": "danger", "zone": DANGER},
            {"type": "presence", "name": "station", "zone": BELT, "line_state": "FAULT"},
        ]
    )
    hand = Part(9, cls=3, kps=[[150, -200]] * 5)
    events = feed(engine, lambda t: make_tracks(Part(1, vel=(0, 0)), hand), 0, 1)
    assert engine.state.value == "FAULT"
    reasons = engine.snapshot()["reasons"]
    assert reasons == ["danger"]
    events += feed(engine, lambda t: make_tracks(Part(1, vel=(0, 0))), 1, 2)
    assert engine.state.value == "JAMMED"
    events += feed(engine, lambda t: make_tracks(Part(1, xy=(0, 500), vel=(0, 0))), 2, 3)
    assert engine.state.value == "FAULT"  # the station is empty and says FAULT
    assert engine.snapshot()["reasons"] == ["station"]
    snap = engine.snapshot()
    text = json.dumps(snap, allow_nan=False)
    assert set(json.loads(text)) >= {
        "line", "state", "since", "rules", "counters", "belt_speed_mm_s", "cycle_time_s",
        "pose_residual_mm",
    }  # fmt: skip
    assert snap["pose_residual_mm"] == pytest.approx(0.5)
    assert all(isinstance(e.detail, dict) for e in events)
    json.dumps([e.detail for e in events], allow_nan=False)


def test_pose_residuals_feed_the_histogram(make_engine: EngineFactory) -> None:
    engine = make_engine([])
    camera = f"cam-{np.random.default_rng().integers(1_000_000)}"
    engine.update(camera, make_tracks(Part(1, residual=0.4), Part(2, residual=3.0)), 0.0)
    assert sample("linewatch_pose_fit_residual_meters_count", camera=camera) == 2
    assert sample("linewatch_pose_fit_residual_meters_sum", camera=camera) == pytest.approx(
        0.0034, rel=1e-5
    )
