"""``linewatch predict``: config entry settings (adapter, ROIs per camera), JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.errors import SourceError
from service.predict import read_inputs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
MOVENET = DATA / "models" / "movenet" / "movenet_singlepose_lightning_int8_4_dequant.onnx"
IMAGE = DATA / "coco-sample" / "000000000785.jpg"

CONFIG = """
models:
  - id: movenet
    path: {model}
    score_threshold: 0.0
    adapter:
      kind: regression
      input: {{layout: NHWC, color: RGB, dtype: uint8, normalization: in-graph, resize: stretch}}
      output: {{coords: normalized, axis_order: yx, score_index: 2, class_name: person,
               keypoint_names: [nose, l_eye, r_eye, l_ear, r_ear, l_sh, r_sh, l_el, r_el,
                                l_wr, r_wr, l_hip, r_hip, l_kn, r_kn, l_an, r_an]}}
      roi: {{boxes: {{cam-1: [[280, 40, 500, 420]], cam-2: [[0, 0, 100, 100], [10, 10, 90, 90]]}}}}
"""


@pytest.mark.skipif(not MOVENET.exists() or not IMAGE.exists(),
                    reason="../shared/data (MoveNet, COCO sample) is absent")
def test_predict_with_config_entry_and_camera_rois(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text(CONFIG.format(model=MOVENET))
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--config", str(cfg), "--camera", "cam-1", str(IMAGE)])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert record["frame"] == 0 and (record["width"], record["height"]) == (640, 425)
    (inst,) = record["instances"]
    assert inst["class"] == "person" and inst["box"] == [280.0, 40.0, 500.0, 420.0]
    assert list(inst["keypoints"])[:2] == ["nose", "l_eye"]
    nose = inst["keypoints"]["nose"]
    assert 280 <= nose[0] <= 500 and 40 <= nose[1] <= 420  # the person in the ROI
    res2 = runner.invoke(app, ["predict", "--config", str(cfg), "--model-id", "movenet",
                               "--camera", "cam-2", str(IMAGE)])
    assert res2.exit_code == 0, res2.output
    assert len(json.loads(res2.stdout.strip().splitlines()[-1])["instances"]) == 2


def test_predict_refuses_a_model_without_adapter_settings_clearly(tmp_path: Path) -> None:
    if not MOVENET.exists():
        pytest.skip("../shared/data/models/movenet is absent")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    res = CliRunner().invoke(app, ["predict", "--model", str(MOVENET), str(image)])
    assert res.exit_code == 2
    assert "matches no LineWatch adapter" in res.output and "output spec" in res.output


def test_read_inputs_frames_of_images_and_videos(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), i * 50, np.uint8))
    writer.release()
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((10, 20, 3), np.uint8))
    frames = [(p.name, i, im.shape) for p, i, im in read_inputs([image, video])]
    assert frames == [("a.png", 0, (10, 20, 3)), ("v.avi", 0, (48, 64, 3)),
                      ("v.avi", 1, (48, 64, 3)), ("v.avi", 2, (48, 64, 3))]
    with pytest.raises(SourceError, match="does not exist"):
        list(read_inputs([tmp_path / "missing.jpg"]))


def test_a_directory_stands_for_its_images_and_videos_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.PNG", "a.jpg", "sub/c.png"):
        cv2.imwrite(str(folder / name), np.zeros((8, 8, 3), np.uint8))
    (folder / "notes.txt").write_text("not an image")
    lone = tmp_path / "z.png"
    cv2.imwrite(str(lone), np.zeros((4, 4, 3), np.uint8))
    frames = [(p.name, i) for p, i, _ in read_inputs([lone, folder])]
    assert frames == [("z.png", 0), ("a.jpg", 0), ("b.PNG", 0)]  # not sub/, not notes.txt
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no image or video file"):
        list(read_inputs([tmp_path / "empty"]))


@pytest.mark.skipif(not MOVENET.exists() or not IMAGE.exists(),
                    reason="../shared/data (MoveNet, COCO sample) is absent")
def test_predict_and_inspect_say_the_adapter_was_forced_and_why(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text(CONFIG.format(model=MOVENET) + """
cameras:
  - {id: cam-2, source: "sim://conveyor"}
  - {id: cam-1, source: "sim://conveyor"}
""")
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--config", str(cfg), str(IMAGE)])
    assert res.exit_code == 0, res.output
    assert "(config entry 'movenet') on CPUExecutionProvider: adapter regression (forced by " \
           "config (adapter: regression); output StatefulPartitionedCall:0" in res.stderr
    assert "ROIs of camera 'cam-2'" in res.stderr  # the first camera that runs the model
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(record["instances"]) == 2  # cam-2 has two ROIs
    res = runner.invoke(app, ["model", "inspect", "--config", str(cfg), "--model-id", "movenet"])
    assert res.exit_code == 0, res.output
    assert "adapter: regression (forced by config (adapter: regression)" in res.stdout
    assert f"settings: {cfg} (model 'movenet')" in res.stdout
    assert "0: person  keypoints: nose, l_eye, r_eye" in res.stdout  # names from the config
    assert "input: 192x192 NHWC uint8 RGB, normalization in-graph, resize stretch" in res.stdout
    res = runner.invoke(app, ["model", "inspect", str(MOVENET)])  # no config: refused
    assert res.exit_code == 1 and "adapter: none." in res.stdout
    res = runner.invoke(app, ["predict", "--config", str(cfg), "--adapter", "simcc", str(IMAGE)])
    assert res.exit_code == 2
    assert "does not fit the configured adapter 'simcc'" in res.output


@pytest.mark.skipif(not MOVENET.exists() or not IMAGE.exists(),
                    reason="../shared/data (MoveNet, COCO sample) is absent")
def test_predict_runs_the_config_entry_on_the_providers_given(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    cfg = tmp_path / "line.yaml"
    cfg.write_text(CONFIG.format(model=MOVENET))
    runner = CliRunner()
    base = ["predict", "--config", str(cfg), "--camera", "cam-1", str(IMAGE)]
    on_ort = runner.invoke(app, base)
    on_ov = runner.invoke(app, [*base, "--providers", "openvino,cpu", "--precision", "f32"])
    assert on_ov.exit_code == 0, on_ov.output
    assert "(config entry 'movenet') on OpenVINO f32: adapter regression" in on_ov.stderr
    (ort,) = json.loads(on_ort.stdout.strip().splitlines()[-1])["instances"]
    (ov,) = json.loads(on_ov.stdout.strip().splitlines()[-1])["instances"]
    assert ov["box"] == ort["box"]  # the entry's ROI, the entry's adapter
    for name, (x, y, _) in ort["keypoints"].items():
        assert ov["keypoints"][name][:2] == pytest.approx([x, y], abs=0.01), name
    refused = runner.invoke(app, [*base, "--precision", "bf16"])
    assert refused.exit_code == 2
    assert "this model runs on auto: add --providers openvino,cpu" in refused.stderr
