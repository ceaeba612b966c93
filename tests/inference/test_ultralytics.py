"""Parity with Ultralytics' own predict on the same ONNX files and images.

Ultralytics runs under ``.venv-ultralytics`` (``scripts/ultralytics-env`` makes it) in a
subprocess (tests/support/ultra_ref.py); these tests skip when it is absent.
Ultralytics reports coordinates with the image spanning 0..W (pixel edges); LineWatch
uses pixel centres, so LineWatch = Ultralytics - 0.5 px.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.config import InferenceConfig
from service.inference.runner import Predictor
from service.predict import predict_files

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "../shared/data"
ULTRA_PY = ROOT / ".venv-ultralytics" / "bin" / "python"
REF = ROOT / "tests" / "support" / "ultra_ref.py"
COCO = sorted((DATA / "coco-sample").glob("*.jpg"))
STREET = DATA / "videos" / "mmpose_demo_street_5frames.mp4"
TOL_PX = 0.5

pytestmark = [
    pytest.mark.skipif(not ULTRA_PY.exists(), reason=".venv-ultralytics is absent: run "
                       "scripts/ultralytics-env to create it (Ultralytics is a test dependency)"),
    pytest.mark.skipif(not COCO, reason="../shared/data/coco-sample is absent"),
]


def ultra(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run([str(ULTRA_PY), str(REF), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def export_pair(factory: pytest.TempPathFactory, name: str, *flags: str) -> dict[str, Path]:
    """ultra_ref's export with ``flags``: {"raw": ..., "nms": ...} (BatchNorm calibrated)."""
    out = factory.mktemp(name)
    paths = ultra("export", "--out", str(out), *flags, "--calib", *map(str, COCO))[0]
    return {k: Path(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_pair(tmp_path_factory, "yolo")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """COCO images (640 wide: no resize) plus a 960x540 street frame (resized 2/3)."""
    import cv2

    out = [*COCO]
    if STREET.exists():
        cap = cv2.VideoCapture(str(STREET))
        ok, frame = cap.read()
        cap.release()
        if ok:
            path = tmp_path_factory.mktemp("frames") / "street0.png"
            cv2.imwrite(str(path), frame)
            out.append(path)
    return out


def assert_parity(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]], *, ties_may_swap: bool = False
) -> int:
    """Same instances in the same order, keypoints of the same names; boxes and keypoints
    within TOL_PX. Returns count.

    ``ties_may_swap``: another runtime's float rounding may order two instances whose
    scores differ by less than 1e-3 the other way; pair them by box first (the scores
    are still checked, so only such near-ties can swap).
    """
    from scipy.optimize import linear_sum_assignment

    total = 0
    for a, b in zip(ours, theirs, strict=True):
        inst = a["instances"]
        assert len(inst) == len(b["boxes"]), a["file"]
        if not inst:
            continue
        for i in inst:  # named as Ultralytics names them (the export's kpt_names metadata)
            names = b["kpt_names"][str(i["class_id"])] if b["kpt_names"] else []
            assert list(i["keypoints"]) == names, a["file"]
        if ties_may_swap:
            cost = np.abs(np.asarray([i["box"] for i in inst])[:, None]
                          - (np.asarray(b["boxes"]) - 0.5)[None]).sum(axis=2)
            rows, cols = linear_sum_assignment(cost)
            b = {k: [b[k][c] for c in cols] for k in ("boxes", "keypoints", "scores", "classes")}
            inst = [inst[r] for r in rows]
        boxes = np.asarray([i["box"] for i in inst])
        kps = np.asarray([list(i["keypoints"].values()) for i in inst])
        ref_boxes = np.asarray(b["boxes"]) - 0.5
        ref_kps = np.asarray(b["keypoints"])
        np.testing.assert_allclose(boxes, ref_boxes, atol=TOL_PX)
        if ref_kps.size:  # a pose model (a detector has none)
            np.testing.assert_allclose(kps[..., :2], ref_kps[..., :2] - 0.5, atol=TOL_PX)
            if ref_kps.shape[-1] == 3:  # kpt_shape [K, 3]: visibility scores
                np.testing.assert_allclose(kps[..., 2], ref_kps[..., 2], atol=1e-3)
        np.testing.assert_allclose([i["score"] for i in inst], b["scores"], atol=1e-3)
        assert [i["class_id"] for i in inst] == b["classes"], a["file"]
        total += len(inst)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("conf,iou", [(0.3, 0.7), (0.6, 0.45)])
def test_raw_export_matches_ultralytics_predict(
    exported: dict[str, Path], images: list[Path], conf: float, iou: float
) -> None:
    theirs = ultra("predict", "--model", str(exported["raw"]), "--conf", str(conf),
                   "--iou", str(iou), *map(str, images))
    model = Predictor(exported["raw"], InferenceConfig(warmup_runs=0, score_threshold=conf),
                      AdapterConfig.model_validate({"nms": {"iou": iou}}))
    assert model.adapter.name == "ultralytics"
    assert set(model.cpu_rewrites) == {"conv+split", "softmax (not last axis)"}  # ran rewritten
    assert model.acceleration == {"provider": "CPUExecutionProvider",
                                  "cpu_rewrites": model.cpu_rewrites}  # as the API shows it
    ours = list(predict_files(model, images))
    assert assert_parity(ours, theirs) >= 3  # thresholds chosen so that instances exist


def both_predict(
    path: Path, files: list[Path], conf: float, adapter: str
) -> tuple[Predictor, list[dict[str, Any]], list[dict[str, Any]]]:
    """The model as LineWatch loads it (its adapter checked), our records, Ultralytics'."""
    theirs = ultra("predict", "--model", str(path), "--conf", str(conf), *map(str, files))
    model = Predictor(path, InferenceConfig(warmup_runs=0, score_threshold=conf))
    assert model.adapter.name == adapter
    return model, list(predict_files(model, files)), theirs


BOTH_EXPORTS = pytest.mark.parametrize(("kind", "adapter"),
                                       [("raw", "ultralytics"), ("nms", "end2end")])


@pytest.fixture(scope="module")
def exported26(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """YOLO26n-pose: its raw (one-to-many) export and its own NMS-free head (nms=False)."""
    return export_pair(tmp_path_factory, "yolo26", "--arch", "26")


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-class YOLO11n detector (part0..part2, no keypoints)."""
    return export_pair(tmp_path_factory, "yolo-detect", "--detect", "3")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A custom parts model as a line would train one: 2 classes, kpt_shape [4, 2] (no
    visibility), keypoints named per class by the data yaml's kpt_names."""
    return export_pair(tmp_path_factory, "yolo-parts", "--parts")


@pytest.fixture(scope="module")
def rect_exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """imgsz=(384, 640): a 16:9 camera's export (40 % less compute than 640x640)."""
    return export_pair(tmp_path_factory, "yolo-rect", "--imgsz", "384,640")


@pytest.fixture(scope="module")
def gray_exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A gray YOLO11n-pose (input [1, 1, 640, 640]), as training with channels: 1 makes it."""
    return export_pair(tmp_path_factory, "yolo-gray", "--channels", "1")


@pytest.mark.slow
@BOTH_EXPORTS
def test_yolo26_exports_match_ultralytics_predict(
    exported26: dict[str, Path], images: list[Path], kind: str, adapter: str
) -> None:
    _, ours, theirs = both_predict(exported26[kind], images, 0.3, adapter)
    assert assert_parity(ours, theirs) >= 3


@pytest.mark.slow
@BOTH_EXPORTS
def test_multi_class_detector_matches_ultralytics_predict(
    detector: dict[str, Path], images: list[Path], kind: str, adapter: str
) -> None:
    """Class-aware NMS across classes, class ids and names as Ultralytics gives them."""
    _, ours, theirs = both_predict(detector[kind], images, 0.3, adapter)
    assert assert_parity(ours, theirs) >= 3
    found = {i["class"] for r in ours for i in r["instances"]}
    assert len(found) >= 2 and found <= {"part0", "part1", "part2"}  # several classes met
    shown = CliRunner().invoke(app, ["model", "inspect", str(detector[kind])])
    assert shown.exit_code == 0 and "2: part2  keypoints: none (boxes only)" in shown.stdout
    assert "a detector" in shown.stdout


@pytest.mark.slow
@BOTH_EXPORTS
def test_parts_model_without_visibility_matches_ultralytics_predict(
    parts: dict[str, Path], images: list[Path], kind: str, adapter: str
) -> None:
    model, ours, theirs = both_predict(parts[kind], images, 0.3, adapter)
    assert model.info.kpt_shape == (4, 2)
    assert assert_parity(ours, theirs) >= 3  # names checked per class there
    instances = [i for r in ours for i in r["instances"]]
    assert {i["class"] for i in instances} == {"bracket", "plate"}
    plate = next(i for i in instances if i["class"] == "plate")
    assert list(plate["keypoints"]) == ["top_left", "top_right", "bottom_right", "bottom_left"]


@pytest.mark.slow
@BOTH_EXPORTS
def test_rectangular_export_matches_ultralytics_predict(
    rect_exported: dict[str, Path], images: list[Path], kind: str, adapter: str
) -> None:
    """COCO images get side padding, the 960x540 street frames a band above and below."""
    files = [*images, *([STREET] if STREET.exists() else [])]
    model, ours, theirs = both_predict(rect_exported[kind], files, 0.3, adapter)
    assert (model.info.input.height, model.info.input.width) == (384, 640)
    assert assert_parity(ours, theirs) >= 3


@pytest.fixture(scope="module")
def gray_images(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The images as a mono camera gives them: one-channel PNGs (Ultralytics decodes a
    color JPEG straight to gray, by other weights than OpenCV's BGR->gray of its frames)."""
    import cv2

    out = tmp_path_factory.mktemp("gray")
    paths = []
    for path in images:
        frame = cv2.imread(str(path))
        assert frame is not None, path
        target = out / f"{path.stem}.png"
        cv2.imwrite(str(target), cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        paths.append(target)
    return paths


@pytest.mark.slow
@BOTH_EXPORTS
def test_gray_model_matches_ultralytics_predict(
    gray_exported: dict[str, Path], gray_images: list[Path], kind: str, adapter: str
) -> None:
    model, ours, theirs = both_predict(gray_exported[kind], gray_images, 0.3, adapter)
    assert model.info.input.color == "GRAY" and model.info.input.layout == "NCHW"
    assert assert_parity(ours, theirs) >= 3


@pytest.mark.slow
def test_gray_model_on_color_video_frames_matches_ultralytics(
    gray_exported: dict[str, Path]
) -> None:
    """A camera's color frames: both turn each one gray (OpenCV's BGR->gray), then letterbox."""
    if not STREET.exists():
        pytest.skip("../shared/data/videos is absent")
    _, ours, theirs = both_predict(gray_exported["raw"], [STREET], 0.1, "ultralytics")
    assert [r["frame"] for r in ours] == [r["frame"] for r in theirs] == list(range(5))
    assert assert_parity(ours, theirs) >= 3


@pytest.mark.slow
def test_cpu_rewrites_of_the_export_give_its_raw_outputs(
    exported: dict[str, Path], images: list[Path]
) -> None:
    import cv2

    from service.inference.session import open_model_session

    config = InferenceConfig(providers=["cpu"])
    on = open_model_session(exported["raw"], config)
    off = open_model_session(exported["raw"], config.model_copy(update={"cpu_rewrites": False}))
    assert on.cpu_rewrites["conv+split"] >= 8  # one per C3k2 block of YOLO11n
    assert on.cpu_rewrites["softmax (not last axis)"] == 1  # the DFL head
    assert off.cpu_rewrites == {}
    name = on.session.get_inputs()[0].name
    for path in images[:4]:
        frame = cv2.imread(str(path))
        assert frame is not None, path
        image = cv2.resize(frame, (640, 640))
        x = np.ascontiguousarray(image[None, :, :, ::-1].transpose(0, 3, 1, 2),
                                 np.float32) / 255
        ours, theirs = on.session.run(None, {name: x})[0], off.session.run(None, {name: x})[0]
        np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=0.01)  # boxes, px
        np.testing.assert_allclose(ours[:, 4:], theirs[:, 4:], atol=0.01)  # scores, keypoints


@pytest.mark.slow
def test_raw_export_on_openvino_f32_matches_ultralytics_predict(
    exported: dict[str, Path], images: list[Path]
) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    theirs = ultra("predict", "--model", str(exported["raw"]), "--conf", "0.3", *map(str, images))
    model = Predictor(exported["raw"], InferenceConfig(warmup_runs=0, score_threshold=0.3,
                                                       providers=["openvino"]))
    assert model.provider == "OpenVINO"
    assert assert_parity(list(predict_files(model, images)), theirs, ties_may_swap=True) >= 3


@pytest.mark.slow
def test_cpu_rewrites_of_a_yolov8_export_at_opset_12(tmp_path: Path) -> None:
    """YOLOv8 (C2f blocks) at opset 12: Split takes its sizes as an attribute and the DFL
    Softmax is exported another way; the Splits are still rewritten, with the same outputs."""
    from service.inference.session import open_model_session

    path = Path(ultra("export", "--out", str(tmp_path), "--imgsz", "320", "--arch", "v8",
                      "--opset", "12", "--raw-only", "--calib", *map(str, COCO[:2]))[0]["raw"])
    config = InferenceConfig(providers=["cpu"])
    on = open_model_session(path, config)
    off = open_model_session(path, config.model_copy(update={"cpu_rewrites": False}))
    assert on.cpu_rewrites == {"conv+split": 8}  # one per C2f block of YOLOv8n
    x = np.random.default_rng(5).random((1, 3, 320, 320), dtype=np.float32)
    name = on.session.get_inputs()[0].name
    np.testing.assert_allclose(on.session.run(None, {name: x})[0],
                               off.session.run(None, {name: x})[0], atol=0.01)


@pytest.mark.slow
def test_nms_free_export_matches_ultralytics_predict(
    exported: dict[str, Path], images: list[Path]
) -> None:
    theirs = ultra("predict", "--model", str(exported["nms"]), "--conf", "0.3", *map(str, images))
    model = Predictor(exported["nms"], InferenceConfig(warmup_runs=0, score_threshold=0.3))
    assert model.adapter.name == "end2end"
    ours = [r for r in predict_files(model, images)]
    # end2end keeps score >= threshold, Ultralytics > threshold: equal unless a score ties.
    assert assert_parity(ours, theirs) >= 3


@pytest.mark.slow
def test_predict_cli_json_lines_and_forced_adapter_refusal(
    exported: dict[str, Path], images: list[Path]
) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--model", str(exported["raw"]), "--conf", "0.3",
                              str(images[0]), "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["frame"] == 0 and lines[0]["instances"]
    assert set(lines[0]["instances"][0]) == {"class", "class_id", "score", "box", "keypoints"}
    with pytest.raises(ModelError, match="does not fit the configured adapter 'simcc'"):
        Predictor(exported["raw"], InferenceConfig(warmup_runs=0), AdapterConfig(kind="simcc"))


@pytest.mark.slow
def test_inspect_says_ultralytics_and_why(exported: dict[str, Path]) -> None:
    res = CliRunner().invoke(app, ["model", "inspect", str(exported["raw"])])
    assert res.exit_code == 0, res.output
    assert "adapter: ultralytics" in res.stdout and "17*3 keypoints" in res.stdout
    assert "graph rewrites 9 conv+split, 1 softmax (not last axis)" in res.stdout


@pytest.mark.slow
def test_time_ultralytics_stream_loop(exported: dict[str, Path]) -> None:
    from service.inference.ultralytics import time_ultralytics

    clip = DATA / "videos" / "intel_bolt-multi-size-detection_preview_h264.mp4"
    if not clip.exists():
        pytest.skip("../shared/data/videos is absent")
    timing = time_ultralytics(exported["raw"], str(clip), 2.0, ROOT, warmup=2)
    assert timing.fps > 0 and timing.frames >= 1 and timing.seconds >= 2.0


@pytest.mark.slow
def test_bench_compares_with_ultralytics_before_and_after_the_pipeline(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.bench import run_bench
    from service.inference import session as session_mod

    bare_loops: list[tuple[int, bool]] = []  # (threads, cpu_rewrites) of each bare loop
    plain_open = session_mod.open_session

    def recording(path: Path, config: InferenceConfig, **kwargs: Any) -> Any:
        bare_loops.append((config.intra_op_threads, config.cpu_rewrites))
        return plain_open(path, config, **kwargs)

    monkeypatch.setattr(session_mod, "open_session", recording)

    clip = DATA / "videos" / "intel_bolt-multi-size-detection_preview_h264.mp4"
    if not clip.exists():
        pytest.skip("../shared/data/videos is absent")
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"cameras:\n  - id: cam\n    source: {json.dumps(str(clip.resolve()))}\n"
        f"models:\n  - id: m\n    path: {json.dumps(str(exported['raw']))}\n"
        "    score_threshold: 0.25\n    max_batch: 1\n"
        f"store:\n  url: {json.dumps('sqlite:///' + str(tmp_path / 'bench.db'))}\n"
    )
    result = run_bench(config, seconds=3.0, warmup_s=1.0, raw_seconds=1.0,
                       compare="ultralytics", replay_frames=10)
    runs = result["ultralytics_fps_runs"]
    assert len(runs) == 2 and all(r > 0 for r in runs)  # before and after the pipeline
    assert min(runs) <= result["ultralytics_fps"] <= max(runs)
    assert result["speedup_vs_ultralytics"] == pytest.approx(
        result["fps"] / result["ultralytics_fps"], rel=0.01)
    assert result["cpu_rewrites"]["conv+split"] >= 8  # the YOLO export runs rewritten
    assert (result["threads"]["intra_op"], True) in bare_loops  # the graph the pipeline runs
    if session_mod.usable_cores() >= 2:
        # a heavy model: two instances, and single_session_fps, a user's plain loop: one
        # session on every core, on the file as it is
        assert result["instances"] == 2 and result["single_session_fps"] > 0
        assert bare_loops[-1] == (session_mod.usable_cores(), False)
