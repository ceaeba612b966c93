"""Top-down models on ROIs: one batched run for all crops, crop geometry, detector boxes,
and the real MoveNet model against a plain script on COCO ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.config import InferenceConfig
from service.inference.roi import crop, crop_region
from service.inference.runner import Predictor
from tests.inference.conftest import ModelFactory
from tests.inference.onnx_factory import make_row

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "../shared/data"
MOVENET = DATA / "models" / "movenet" / "movenet_singlepose_lightning_int8_4_dequant.onnx"
COCO_JSON = DATA / "coco-sample" / "test_coco.json"
COCO17 = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
          "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
          "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]


def simcc_model(path: Path, h: int = 8, w: int = 8, k: int = 2, peak_x: int = 10,
                peak_y: int = 6) -> Path:
    """Dynamic-batch SimCC model: constant peaks at bins (peak_x, peak_y), split ratio 2."""
    bx = np.zeros((1, k, w * 2), np.float32)
    by = np.zeros((1, k, h * 2), np.float32)
    bx[0, :, peak_x] = 0.8
    by[0, :, peak_y] = 0.6
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m3"]),
        helper.make_node("Mul", ["m3", "zero"], ["z"]),
        helper.make_node("Add", ["z", "bx"], ["simcc_x"]),
        helper.make_node("Add", ["z", "by"], ["simcc_y"]),
    ]
    inits = [numpy_helper.from_array(bx, "bx"), numpy_helper.from_array(by, "by"),
             numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape")]
    graph = helper.make_graph(
        nodes, "simcc",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, h, w])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, ["n", k, w * 2]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, ["n", k, h * 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def expected_point(box: list[float], x: float, y: float, hw: tuple[int, int]) -> np.ndarray:
    left, top, cw, ch = crop_region(box, hw, 1.25)
    return np.array([(x + 0.5) * cw / hw[1] + left - 0.5, (y + 0.5) * ch / hw[0] + top - 0.5])


def test_crop_transform_round_trips_and_samples_the_right_pixels() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 120:140] = 255  # a bright square
    patch, t = crop(image, [110.0, 30.0, 150.0, 70.0], (64, 64), padding=1.0)
    assert patch.shape == (64, 64, 3)
    pts = np.array([[120.0, 40.0], [139.0, 59.0], [3.0, 97.0]])
    np.testing.assert_allclose(t.to_source(t.to_model(pts)), pts, atol=1e-4)
    centre = t.to_model([[129.5, 49.5]])[0]
    assert patch[int(round(centre[1])), int(round(centre[0]))].tolist() == [255, 255, 255]
    corner = t.to_model([[110.0, 30.0]])[0]  # outside the square: dark
    assert patch[int(corner[1]), int(corner[0])].tolist() == [0, 0, 0]


def test_simcc_runs_all_rois_of_all_frames_in_one_batch(tmp_path: Path) -> None:
    boxes = [[10.0, 10.0, 50.0, 90.0], [100.0, 20.0, 180.0, 60.0], [0.0, 0.0, 20.0, 20.0]]
    settings = AdapterConfig.model_validate(
        {"roi": {"boxes": boxes}, "input": {"normalization": "unit"}}
    )
    model = Predictor(simcc_model(tmp_path / "simcc.onnx"), InferenceConfig(warmup_runs=0),
                      settings)
    assert model.adapter.name == "simcc" and "split ratio 2.0" in model.adapter_reason
    frames = [np.full((120, 200, 3), v, np.uint8) for v in (10, 200)]
    dets = model.predict(frames)
    assert model.runs == 1  # 2 frames x 3 ROIs in one session.run
    assert [len(d) for d in dets] == [3, 3]
    for det in dets:
        np.testing.assert_allclose(det.boxes, boxes)
        for i, box in enumerate(boxes):
            want = expected_point(box, 10 / 2, 6 / 2, (8, 8))
            np.testing.assert_allclose(det.keypoints[i, :, :2], [want, want], atol=1e-3)
            np.testing.assert_allclose(det.keypoints[i, :, 2], 0.7, atol=1e-6)


def test_top_down_on_detector_boxes(tmp_path: Path, model_factory: ModelFactory) -> None:
    rows = [make_row((20, 30, 120, 200), 0.9, 1), make_row((200, 40, 300, 120), 0.8, 0),
            make_row((0, 0, 10, 10), 0.3, 2)]
    detector = Predictor(model_factory("det", rows), InferenceConfig(warmup_runs=0))
    settings = AdapterConfig.model_validate(
        {"roi": {"detector": "det", "detector_classes": [0, 1]}, "input": {"normalization": "unit"}}
    )
    pose = Predictor(simcc_model(tmp_path / "simcc.onnx"), InferenceConfig(warmup_runs=0),
                     settings, detector=detector)
    frames = [np.zeros((240, 320, 3), np.uint8)] * 3
    dets = pose.predict(frames)
    assert pose.runs == 1 and [len(d) for d in dets] == [2, 2, 2]
    np.testing.assert_allclose(dets[0].boxes, detector.predict(frames[:1])[0].boxes[:2])
    assert dets[0].class_ids.tolist() == [1, 0]
    np.testing.assert_allclose(dets[0].extra["roi_score"], [0.9, 0.8])


def test_regression_without_output_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="adapter.output .* is missing"):
        Predictor(simcc_model(tmp_path / "m.onnx"), InferenceConfig(warmup_runs=0),
                  AdapterConfig(kind="regression"))


# --- MoveNet on COCO ---------------------------------------------------------------------


def coco_people() -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """(image, bbox xywh, keypoints (17, 3)) of annotated people with >= 5 keypoints."""
    data = json.loads(COCO_JSON.read_text())
    files = {im["id"]: COCO_JSON.parent / im["file_name"] for im in data["images"]}
    out = []
    for ann in data["annotations"]:
        if ann.get("num_keypoints", 0) >= 5 and not ann.get("iscrowd"):
            out.append((files[ann["image_id"]], np.asarray(ann["bbox"], float),
                        np.asarray(ann["keypoints"], float).reshape(17, 3)))
    return out


def plain_movenet(session: object, image: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """What a user would write: square crop of the 1.25x box, resize, run, scale back."""
    x, y, w, h = bbox
    side = max(w, h) * 1.25
    x0, y0 = int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2))
    s = int(round(side))
    padded = cv2.copyMakeBorder(image, s, s, s, s, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    patch = padded[y0 + s:y0 + 2 * s, x0 + s:x0 + 2 * s]
    inp = cv2.resize(patch, (192, 192))[..., ::-1][None].astype(np.uint8)
    out = session.run(None, {"serving_default_input:0": inp})[0][0, 0]  # type: ignore[attr-defined]
    return np.stack([out[:, 1] * s + x0, out[:, 0] * s + y0], axis=1)


@pytest.mark.slow
@pytest.mark.skipif(not MOVENET.exists() or not COCO_JSON.exists(),
                    reason="../shared/data (MoveNet model, COCO sample) is absent")
def test_movenet_on_coco_matches_a_plain_script() -> None:
    import onnxruntime as ort

    people = coco_people()
    assert len(people) >= 5
    # COCO boxes are in edge coordinates (image spans 0..W); ROIs are pixel centres.
    rois = {f"p{i}": [(b[0] - 0.5, b[1] - 0.5, b[0] + b[2] - 0.5, b[1] + b[3] - 0.5)]
            for i, (_, b, _) in enumerate(people)}
    settings = AdapterConfig.model_validate({
        "kind": "regression",
        "input": {"layout": "NHWC", "color": "RGB", "dtype": "uint8",
                  "normalization": "in-graph", "resize": "stretch"},
        "output": {"layout": "BNKV", "coords": "normalised", "axis_order": "yx",
                   "score_index": 2, "keypoint_names": COCO17, "class_name": "person"},
        "roi": {"boxes": rois, "padding": 1.25},
    })
    model = Predictor(MOVENET, InferenceConfig(warmup_runs=0, score_threshold=0.0), settings)
    assert model.adapter.name == "regression"
    session = ort.InferenceSession(str(MOVENET), providers=["CPUExecutionProvider"])
    ours, plain = [], []
    for i, (path, bbox, gt) in enumerate(people):
        image = np.asarray(cv2.imread(str(path)), np.uint8)
        det = model.predict([image], camera=f"p{i}")[0]
        assert len(det) == 1
        visible = gt[:, 2] > 0
        gt_xy = gt[visible, :2] - 0.5  # COCO edge coordinates -> pixel centres
        ours.extend(np.linalg.norm(det.keypoints[0, visible, :2] - gt_xy, axis=1))
        ref = plain_movenet(session, image, bbox) - 0.5
        plain.extend(np.linalg.norm(ref[visible] - gt_xy, axis=1))
    med_ours, med_plain = float(np.median(ours)), float(np.median(plain))
    print(f"MoveNet median keypoint error: LineWatch {med_ours:.2f} px, plain {med_plain:.2f} px")
    assert med_ours <= med_plain + 1.0, (med_ours, med_plain)
    assert med_ours < 30.0  # a real model finds people: errors are a few px, not the box size
