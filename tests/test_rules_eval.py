"""``linewatch rules eval``: event matching (pure), the report's shape, a short real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.domain import Event
from service.errors import ConfigError
from service.rules_eval import (
    Interval,
    Truths,
    _pose_by_class,
    in_polygon,
    judge_changes,
    merge_gap_s,
    merge_intervals,
    run_eval,
)
from service.sim import CLASSES as SIM_CLASSES
from tests.inference.onnx_factory import build_model, default_metadata, make_row

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "zoo" / "linewatch-parts-s.onnx"


def ev(name: str, old: str, new: str, t: float, kind: str = "rule") -> Event:
    return Event("line-1", kind, name, old, new, t)


def test_intervals_closer_than_a_second_merge() -> None:
    merged = merge_intervals(
        [Interval("m", 5.0, 6.0), Interval("m", 1.0, 2.0), Interval("m", 2.5, 3.0)]
    )
    assert [(i.start, i.end) for i in merged] == [(1.0, 3.0), (5.0, 6.0)]


def test_gaps_the_judging_rule_bridges_merge() -> None:
    """Two misoriented parts 1 s apart, judged by a rule with clear_for 1 s: the rule
    cannot clear before the second part arrives, so the truth is one interval."""
    dt = 1 / 15
    gap = merge_gap_s(1.0, dt)
    first = Interval("misoriented", 389.53, 389.53 + 8.0)
    second = Interval("misoriented", first.end + 1.0, first.end + 9.0)
    assert len(merge_intervals([first, second], gap)) == 1
    later = Interval("misoriented", first.end + 1.0 + dt, first.end + 9.0)
    assert len(merge_intervals([first, later], gap)) == 2  # one frame more: it can clear
    assert merge_gap_s(0.5, dt) == merge_gap_s(0.0, dt) == pytest.approx(1.0 + dt / 2)
    assert merge_gap_s(3.0, dt) == pytest.approx(3.0 + dt / 2)


def test_points_in_polygon() -> None:
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert in_polygon([[5, 5], [15, 5], [-1, 3]], square).tolist() == [True, False, False]
    assert in_polygon([[1e6, 1e6]], None).tolist() == [True]


def test_onsets_and_clears_match_within_their_windows() -> None:
    intervals = {"belt_stop": [Interval("belt_stop", 10.0, 20.0)]}
    rule_kinds = {"belt": ["belt_stop"], "state:JAMMED": ["belt_stop"], "other": []}
    events = [
        ev("belt", "unknown", "ok", 0.1),  # start-up: not judged
        ev("state", "UNKNOWN", "RUNNING", 0.1, "state"),
        ev("belt", "ok", "violated", 11.4),  # for 1.0: 0.4 s late
        ev("state", "RUNNING", "JAMMED", 11.4, "state"),
        ev("belt", "violated", "ok", 20.7),  # clear_for 0.5: 0.2 s late
        ev("state", "JAMMED", "RUNNING", 20.7, "state"),
        ev("belt", "ok", "violated", 40.0),  # nothing behind it
        ev("other", "ok", "violated", 12.0),  # a rule judging no incident kind
    ]
    scores, items = judge_changes(
        events, intervals, rule_kinds, {"belt_stop": 1.0}, {"belt_stop": 0.5}
    )
    belt = scores["belt"]
    assert (belt.tp, belt.fp, belt.fn) == (2, 1, 0)
    assert belt.delays == pytest.approx([0.4, 0.2])
    jammed = scores["state:JAMMED"]
    assert (jammed.tp, jammed.fp, jammed.fn) == (2, 0, 0)
    assert (scores["other"].tp, scores["other"].fp) == (0, 1)
    assert len(items) == 6  # the two start-up changes are not judged


def test_an_event_outside_the_window_is_false_and_the_incident_missed() -> None:
    intervals = {"arm_stall": [Interval("arm_stall", 10.0, 20.0)]}
    scores, _ = judge_changes(
        [ev("stall", "ok", "violated", 8.5), ev("stall", "violated", "ok", 9.0),
         ev("stall", "ok", "violated", 17.5)],
        intervals, {"stall": ["arm_stall"]}, {"arm_stall": 2.0}, {"arm_stall": 0.0},
    )  # fmt: skip
    s = scores["stall"]
    # 8.5 is before start - 1 s; 17.5 is after start + for + 5 s; the clear at 9.0 is
    # before end - 1 s: nothing matches
    assert (s.tp, s.fp, s.fn) == (0, 3, 2)


def _sim_stand_in(tmp_path: Path) -> Path:
    """A constant ONNX model with the sim's classes and keypoint names."""
    meta = default_metadata(480, 640)
    meta["names"] = repr({i: c.name for i, c in enumerate(SIM_CLASSES)})
    meta["keypoint_names"] = json.dumps({c.name: list(c.keypoint_names) for c in SIM_CLASSES})
    meta["skeleton"] = json.dumps({c.name: [list(e) for e in c.skeleton] for c in SIM_CLASSES})
    kps = np.array([[300, 200], [340, 200], [300, 240], [320, 210], [305, 225]], np.float32)
    row = make_row((290, 190, 350, 250), 0.9, 0, kps)
    return build_model(tmp_path / "sim-stand-in.onnx", row[None], height=480, width=640,
                       metadata=meta)


def test_report_shape_on_a_short_run(tmp_path: Path) -> None:
    report = run_eval(None, scenario="conveyor", seed=12, seconds=4.0,
                      model_path=_sim_stand_in(tmp_path), threads=1)
    for key in ("precision", "recall", "delay_s_mean"):
        assert key in report["events"]
    assert set(report["states"]) == {"FAULT", "JAMMED", "STOPPED", "IDLE", "UNKNOWN"}
    assert {"belt", "station-occupied", "arm-stall", "danger-zone", "part-upright",
            "part-centred"} <= set(report["rules"])
    for key in ("false_events", "count_error_pct", "position_err_mm_mean",
                "position_err_mm_p95", "orientation_err_deg_mean", "orientation_err_deg_p95"):
        assert key in report, key
    assert report["frames"] == 60 and report["fps"] == 15.0 and report["camera"] == "cam-1"
    assert set(report["floors"]["position_err_mm_mean"]) == {"value", "floor", "ok"}
    json.dumps(report, allow_nan=False)


def test_pose_errors_are_reported_per_class() -> None:
    truths = Truths(pos_err=[1.0, 3.0, 0.5], ang_err=[2.0, 4.0, 1.0],
                    pose_class=["flange", "flange", "bracket"])
    by_class = _pose_by_class(truths)
    assert by_class["flange"]["samples"] == 2
    assert by_class["flange"]["position_err_mm_mean"] == 2.0
    assert by_class["flange"]["orientation_err_deg_mean"] == 3.0
    assert by_class["bracket"]["orientation_err_deg_p95"] == 1.0
    assert _pose_by_class(Truths()) == {}


def test_a_config_without_lines_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cameras:\n  - id: cam-1\n    source: sim://conveyor\nmodels:\n"
                   "  - id: m\n    path: m.onnx\n")
    with pytest.raises(ConfigError, match="no lines"):
        run_eval(cfg, seconds=1.0, model_path=_sim_stand_in(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason=f"{SHIPPED_MODEL} not there yet")
def test_the_cli_on_the_shipped_model(tmp_path: Path) -> None:
    """A real 40 s run (seed 12: a hand in the danger zone at 10.4 s) through the CLI."""
    entry = Path(sys.executable).with_name("linewatch")
    cmd = [str(entry)] if entry.exists() else [sys.executable, "-m", "service.cli"]
    result = subprocess.run(
        [*cmd, "rules", "eval", "--seed", "12", "--seconds", "40", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ}, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rules"]["danger-zone"]["recall"] == 1.0
    assert report["states"]["FAULT"]["recall"] == 1.0
    assert report["position_err_mm_mean"] < 3.0
    assert report["orientation_err_deg_mean"] < 2.0
    by_class = report["pose_by_class"]
    assert set(by_class) == {"bracket", "flange"}
    assert sum(c["samples"] for c in by_class.values()) == report["pose_samples"]


def test_edges_of_the_run_are_not_judged_but_absorb_their_events() -> None:
    intervals = {
        "misoriented": [Interval("misoriented", 0.0, 0.2, judged=False)],
        "belt_stop": [Interval("belt_stop", 590.0, 600.0)],  # still stopped at the end
    }
    rule_kinds = {"upright": ["misoriented"], "belt": ["belt_stop"]}
    events = [ev("upright", "unknown", "violated", 0.3), ev("belt", "ok", "violated", 591.2)]
    scores, items = judge_changes(
        events, intervals, rule_kinds, {"belt_stop": 1.0, "misoriented": 0.5},
        {"belt_stop": 0.5, "misoriented": 0.5}, horizon=600.0,
    )
    assert (scores["upright"].tp, scores["upright"].fp, scores["upright"].fn) == (0, 0, 0)
    belt = scores["belt"]
    assert (belt.tp, belt.fp, belt.fn) == (1, 0, 0)  # the onset counts, the clear cannot
    assert all(i.matched for i in items)
