from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.domain import Detections
from service.evaluation import (
    EvalAccumulator,
    GroundTruth,
    evaluate_frames,
    match_frame,
    match_pairs,
    oks_matrix,
)
from service.inference import InferenceConfig, OrtModel, default_model_path
from service.inference.preprocess import Transform
from tests.inference.onnx_factory import NAMES, build_model, make_row

CLASSES = tuple(NAMES.values())
runner = CliRunner()


@dataclass
class Inst:
    """A hand-made ground-truth instance (the fields evaluation reads)."""

    class_name: str
    box: np.ndarray
    keypoints_px: np.ndarray
    visible: np.ndarray
    in_view: float = 1.0


def make_inst(
    name: str = "bracket", x: float = 100.0, y: float = 100.0, size: float = 40.0,
    visible: list[bool] | None = None, in_view: float = 1.0,
) -> Inst:
    kps = np.array([[x, y], [x + size, y], [x, y + size], [x + size, y + size],
                    [x + size / 2, y + size / 2]], float)
    return Inst(name, np.array([x, y, x + size, y + size], float), kps,
                np.array(visible or [True] * 5), in_view)


def detections_for(insts: list[Inst], shift: float = 0.0, names: tuple[str, ...] = CLASSES,
                   score: float = 0.9) -> Detections:
    kps = np.array([np.c_[i.keypoints_px + shift, np.ones(5)] for i in insts]).reshape(-1, 5, 3)
    return Detections(
        boxes=np.array([i.box + shift for i in insts]).reshape(-1, 4),
        scores=np.full(len(insts), score),
        class_ids=np.array([names.index(i.class_name) for i in insts]),
        keypoints=kps,
    )


# --- OKS -------------------------------------------------------------------------


def test_oks_of_a_perfect_prediction_is_one() -> None:
    inst = make_inst()
    oks = oks_matrix(inst.keypoints_px[None], inst.keypoints_px[None], inst.visible[None],
                     [1600.0], [0.05])
    assert oks.shape == (1, 1) and oks[0, 0] == pytest.approx(1.0)


def test_oks_of_a_shifted_prediction_matches_the_coco_formula() -> None:
    inst = make_inst(size=40.0)
    d = 3.0  # every keypoint off by 3 px in x
    oks = oks_matrix((inst.keypoints_px + [d, 0.0])[None], inst.keypoints_px[None],
                     inst.visible[None], [1600.0], [0.05])
    expected = math.exp(-(d**2) / (2 * 1600.0 * (2 * 0.05) ** 2))
    assert oks[0, 0] == pytest.approx(expected)
    assert expected == pytest.approx(math.exp(-9 / 32))  # 0.7548


def test_oks_counts_only_visible_keypoints_unless_none_are() -> None:
    inst = make_inst(visible=[True, True, False, False, False])
    pred = inst.keypoints_px.copy()
    pred[2:] += 50.0  # hidden keypoints far off: ignored
    vis = inst.visible[None]
    assert oks_matrix(pred[None], inst.keypoints_px[None], vis, [1600.0], [0.05])[0, 0] == 1.0
    none = np.zeros((1, 5), bool)
    assert oks_matrix(pred[None], inst.keypoints_px[None], none, [1600.0], [0.05])[0, 0] < 0.5


def test_match_pairs_prefers_more_matches_then_higher_oks() -> None:
    # pred 0 fits both truths, pred 1 only truth 0: both must match
    assert sorted(match_pairs([[0.99, 0.55], [0.6, 0.0]], 0.5)) == [(0, 1), (1, 0)]
    assert match_pairs([[0.49]], 0.5) == []
    assert match_pairs(np.zeros((0, 3)), 0.5) == []


# --- frames ------------------------------------------------------------------------


def test_perfect_predictions_give_recall_and_precision_one() -> None:
    insts = [make_inst("bracket", 50, 50), make_inst("flange", 300, 200), make_inst("arm", 10, 300)]
    truth = GroundTruth.from_instances(insts)
    result = match_frame(detections_for(insts), truth, CLASSES)
    acc = EvalAccumulator(CLASSES)
    acc.add(result, truth, 1.5)
    s = acc.summary()
    assert (s["recall"], s["precision"], s["tp"], s["fp"], s["fn"]) == (1.0, 1.0, 3, 0, 0)
    assert s["kpt_err_px_mean"] == 0.0 and s["keypoints"] == 15
    assert s["per_class"]["flange"]["recall"] == 1.0
    assert s["ms_per_frame"] == 1.5


def test_shifted_prediction_has_its_keypoint_error_and_fails_when_too_far() -> None:
    inst = make_inst(size=40.0)
    truth = GroundTruth.from_instances([inst])
    near = match_frame(detections_for([inst], shift=1.0), truth, CLASSES)
    assert near.tp == {"bracket": 1}
    np.testing.assert_allclose(near.kpt_errors, [math.sqrt(2)] * 5)
    far = match_frame(detections_for([inst], shift=15.0), truth, CLASSES)  # OKS ~ 0.06
    assert far.fp == {"bracket": 1} and far.fn == {"bracket": 1}


def test_wrong_class_is_a_false_positive_and_a_miss() -> None:
    inst = make_inst("bracket")
    pred = detections_for([make_inst("flange")])
    result = match_frame(pred, GroundTruth.from_instances([inst]), CLASSES)
    assert result.fp == {"flange": 1} and result.fn == {"bracket": 1} and not result.tp


def test_mostly_out_of_view_truth_is_ignored_not_counted() -> None:
    edge = make_inst("flange", 0, 0, in_view=0.5)
    inside = make_inst("bracket", 200, 200)
    truth = GroundTruth.from_instances([edge, inside])
    assert truth.ignore.tolist() == [True, False]
    # found the edge part: ignored, not a false positive
    both = match_frame(detections_for([edge, inside]), truth, CLASSES)
    assert (both.tp, both.fp, both.fn, both.ignored) == ({"bracket": 1}, {}, {}, 1)
    # missed the edge part: not a miss either
    only = match_frame(detections_for([inside]), truth, CLASSES)
    assert only.fn == {}


def test_duplicate_prediction_is_a_false_positive() -> None:
    inst = make_inst()
    result = match_frame(detections_for([inst, inst]), GroundTruth.from_instances([inst]), CLASSES)
    assert result.tp == {"bracket": 1} and result.fp == {"bracket": 1}


def test_summary_with_nothing_to_score_reports_null_rates() -> None:
    acc = EvalAccumulator(CLASSES)
    empty = GroundTruth.from_instances([], num_keypoints=5)
    acc.add(match_frame(Detections.empty(5), empty, CLASSES), empty)
    s = acc.summary()
    assert s["recall"] is None and s["precision"] is None and s["kpt_err_px_mean"] is None
    assert s["frames"] == 1 and set(s["per_class"]) == set(CLASSES)


# --- with real ONNX models -------------------------------------------------------------


def oracle_rows(insts: list[Inst], transform: Transform) -> np.ndarray:
    """Detection rows (model-input px) that reproduce the truth exactly."""
    rows = []
    for inst in insts:
        corners = transform.to_model(np.reshape(inst.box, (2, 2))).ravel()
        x1, y1, x2, y2 = (float(v) for v in corners)
        kps = transform.to_model(inst.keypoints_px)
        rows.append(make_row((x1, y1, x2, y2), 0.95, CLASSES.index(inst.class_name), kps))
    return np.stack(rows)


def test_evaluate_frames_runs_the_service_model(tmp_path: Path) -> None:
    insts = [make_inst("bracket", 100, 120), make_inst("arm", 400, 300, size=60)]
    half = Transform(0.5, 0.5, 0, 0, 640, 480)
    model = OrtModel(build_model(tmp_path / "oracle.onnx", oracle_rows(insts, half)),
                     InferenceConfig(intra_op_threads=1))
    image = np.zeros((480, 640, 3), np.uint8)
    report = evaluate_frames(model, [(image, insts), (image, insts)])
    assert report["frames"] == 2 and report["instances"] == 4
    assert report["recall"] == 1.0 and report["precision"] == 1.0
    assert report["kpt_err_px_mean"] < 1e-3
    assert report["ms_per_frame"] > 0


def test_model_eval_cli_on_sim_frames_with_an_oracle_model(tmp_path: Path) -> None:
    from service.sim import Scene

    _, truth = Scene("conveyor", seed=7).render(0)
    assert truth.instances, "sim frame 0 of seed 7 should show parts"
    half = Transform(0.5, 0.5, 0, 0, 640, 480)
    rows = oracle_rows(list(truth.instances), half)  # type: ignore[arg-type]
    path = build_model(tmp_path / "oracle.onnx", rows, num_rows=max(8, len(rows)))
    result = runner.invoke(app, [
        "model", "eval", "--model", str(path), "--seed", "7", "--frames", "1", "--every", "1",
        "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    valid = sum(i.in_view >= 0.8 for i in truth.instances)
    assert report["instances"] == valid
    assert report["recall"] == 1.0 and report["precision"] == 1.0
    assert report["kpt_err_px_p95"] < 1e-3
    assert report["provider"] == "CPUExecutionProvider" or report["provider"].endswith("Provider")
    assert report["threads"] == 1 and report["frames"] == 1


def test_model_eval_cli_runs_the_model_on_the_runtime_given(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from service.sim import Scene

    _, truth = Scene("conveyor", seed=7).render(0)
    rows = oracle_rows(list(truth.instances), Transform(0.5, 0.5, 0, 0, 640, 480))  # type: ignore[arg-type]
    path = build_model(tmp_path / "oracle.onnx", rows, num_rows=max(8, len(rows)))
    args = ["model", "eval", "--model", str(path), "--seed", "7", "--frames", "1",
            "--every", "1"]
    result = runner.invoke(app, [*args, "--providers", "openvino,cpu", "--precision", "f32",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["provider"] == "OpenVINO" and report["inference_precision"] == "f32"
    assert report["recall"] == 1.0 and report["kpt_err_px_p95"] < 1e-3
    text = runner.invoke(app, [*args, "--providers", "openvino,cpu"])
    assert text.exit_code == 0 and " on OpenVINO f32 (1 thread(s))" in text.stdout
    plain = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert plain["provider"] == "CPUExecutionProvider" and plain["inference_precision"] is None
    refused = runner.invoke(app, [*args, "--precision", "bf16"])
    assert refused.exit_code == 2 and "add --providers openvino,cpu" in refused.stderr


def test_model_eval_cli_counts_misses_of_a_blind_model(tmp_path: Path) -> None:
    path = build_model(tmp_path / "blind.onnx")
    result = runner.invoke(app, ["model", "eval", "--model", str(path), "--seed", "3",
                                 "--frames", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recall"] == 0.0 and report["precision"] is None
    assert report["fn"] == report["instances"] > 0


def test_model_eval_cli_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["model", "eval", "--model", str(tmp_path / "x.onnx"), "--json"])
    assert result.exit_code == 2
    assert "x.onnx' does not exist" in result.stderr and "Traceback" not in result.output


def test_model_eval_cli_text_report(tmp_path: Path) -> None:
    path = build_model(tmp_path / "blind.onnx")
    result = runner.invoke(app, ["model", "eval", "--model", str(path), "--frames", "1"])
    assert result.exit_code == 0, result.output
    assert "recall 0.000" in result.stdout and "bracket" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not default_model_path().is_file(),
                    reason=f"shipped model not built yet: {default_model_path()}")
def test_shipped_model_meets_the_floors() -> None:
    result = runner.invoke(app, ["model", "eval", "--seed", "4242", "--frames", "60",
                                 "--every", "7", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["instances"] >= 100
    assert r["recall"] >= 0.97 and r["precision"] >= 0.97, r
    for name, c in r["per_class"].items():
        if name == "hand":  # on the line the hand reaches in from below the frame
            continue
        assert c["instances"] > 0, f"no {name} in the held-out clip"
        assert c["recall"] >= 0.97 and c["precision"] >= 0.97, (name, c)
    assert r["kpt_err_px_mean"] <= 2.0 and r["kpt_err_px_p95"] <= 5.0, r
    assert r["ms_per_frame"] <= 10.0, r
    assert default_model_path().stat().st_size <= 10 * 1024 * 1024
    # hands fully in view: held-out frames of the train scenario
    result = runner.invoke(app, ["model", "eval", "--scenario", "train", "--seed", "9001",
                                 "--frames", "300", "--every", "3", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    hand = json.loads(result.stdout)["per_class"]["hand"]
    assert hand["instances"] >= 20, hand
    assert hand["recall"] >= 0.97 and hand["precision"] >= 0.97, hand
