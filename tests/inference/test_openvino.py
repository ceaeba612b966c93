"""OpenVINO as the CPU runtime (``providers: [openvino, cpu]``), with the real OpenVINO
package on the shipped model and sim frames, against ONNX Runtime on the same file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from service.domain import Detections
from service.errors import ModelError
from service.inference import InferenceConfig, OrtModel
from service.inference.openvino import OPENVINO, OpenVinoSession, effective_precision
from service.inference.session import CPU, resolve_providers
from service.sim.scene import Scene
from tests.inference.conftest import ModelFactory

pytest.importorskip("openvino", reason="the openvino extra is not installed")

SHIPPED = Path(__file__).resolve().parents[2] / "models/zoo/linewatch-parts-s.onnx"


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Sim frames of two conveyor cameras, with parts, arms and distractors."""
    out = []
    for seed in (8101, 8102):
        scene = Scene("conveyor", seed=seed, width=320, height=240)
        out += [scene.render(i)[0] for i in range(0, 240, 12)]
    return out


@pytest.fixture(scope="module")
def on_ort(frames: list[np.ndarray]) -> list[Detections]:
    model = OrtModel(SHIPPED, InferenceConfig(providers=["cpu"], instances=1, warmup_runs=0))
    return [model.predict([f])[0] for f in frames]


def _keypoint_diffs(got: list[Detections], want: list[Detections]) -> tuple[np.ndarray, int]:
    """Per keypoint distances (px) between matched instances (same class, nearest box
    centre), and how many instances found no match or are extra."""
    diffs: list[float] = []
    unmatched = 0
    for g, w in zip(got, want, strict=True):
        unmatched += abs(len(g) - len(w))
        for j in range(len(w)):
            same = np.flatnonzero(g.class_ids == w.class_ids[j])
            if not len(same):
                unmatched += 1
                continue
            centres = (g.boxes[same, :2] + g.boxes[same, 2:]) / 2
            want_c = (w.boxes[j, :2] + w.boxes[j, 2:]) / 2
            k = same[np.argmin(np.linalg.norm(centres - want_c, axis=1))]
            diffs.extend(np.linalg.norm(g.keypoints[k, :, :2] - w.keypoints[j, :, :2], axis=1))
    return np.asarray(diffs), unmatched


def test_f32_gives_the_onnxruntime_results(
    frames: list[np.ndarray], on_ort: list[Detections]
) -> None:
    model = OrtModel(SHIPPED, InferenceConfig(providers=["openvino", "cpu"], instances=1))
    assert model.provider == OPENVINO and model.providers == (OPENVINO,)
    assert model.acceleration == {"provider": OPENVINO, "precision": "f32",
                                  "requested_precision": "f32"}
    got = [model.predict([f])[0] for f in frames]
    assert sum(map(len, on_ort)) >= len(frames)  # parts are found: the test compares something
    diffs, unmatched = _keypoint_diffs(got, on_ort)
    assert unmatched == 0
    assert diffs.max() < 0.01
    for g, w in zip(got, on_ort, strict=True):
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4)
        np.testing.assert_array_equal(g.class_ids, w.class_ids)


def test_a_batch_on_openvino_equals_one_image_at_a_time(
    frames: list[np.ndarray], on_ort: list[Detections]
) -> None:
    model = OrtModel(SHIPPED, InferenceConfig(providers=["openvino"], instances=1,
                                              warmup_runs=0))
    got = model.predict(frames[:8])  # the shipped model has a dynamic batch: one run
    assert model.last_timing.runs == 1 and len(got) == 8
    diffs, unmatched = _keypoint_diffs(got, on_ort[:8])
    assert unmatched == 0 and diffs.max() < 0.01


def test_bf16_is_close_to_f32_where_the_cpu_has_it(
    frames: list[np.ndarray], on_ort: list[Detections], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.inference.session"):
        model = OrtModel(SHIPPED, InferenceConfig(providers=["openvino"], instances=1,
                                                  openvino={"precision": "bf16"}))
    assert model.acceleration is not None
    if model.acceleration["precision"] != "bf16":  # no AMX / AVX512-BF16 on this CPU
        assert "OpenVINO runs f32, not the bf16 asked for" in caplog.text
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 (logged)")
    got = [model.predict([f])[0] for f in frames]
    diffs, unmatched = _keypoint_diffs(got, on_ort)
    # bf16 really runs (the keypoints move) but by hundredths of a pixel: a score at the
    # threshold may flip one instance in or out
    assert 0.0 < float(np.median(diffs)) < 0.1
    assert float(np.percentile(diffs, 95)) < 0.5
    assert unmatched <= max(1, sum(map(len, on_ort)) // 50)


def test_two_instances_split_the_cores_and_keep_the_results(
    model_factory: ModelFactory,
) -> None:
    path = model_factory()
    images = [np.full((48, 64, 3), v, np.uint8) for v in (10, 120, 240)]
    want = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=0)).predict(images)
    pair = OrtModel(path, InferenceConfig(providers=["openvino"], instances=2, warmup_runs=1))
    assert pair.instances == 2 and pair.provider == OPENVINO
    sessions = [i.session for i in pair._instances]
    assert len({id(s) for s in sessions}) == 2
    assert all(isinstance(s, OpenVinoSession) for s in sessions)
    assert all(s.threads == pair.intra_op_threads for s in sessions)
    for _ in range(2):  # each instance in turn
        for a, b in zip(pair.predict(images), want, strict=True):
            np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)


@pytest.mark.parametrize("uint8_input", [True, False])
def test_a_float_nchw_model_takes_uint8_frames_and_gives_the_same_results(
    tmp_path: Path, uint8_input: bool
) -> None:
    from tests.inference.test_gpu import float_pose_model

    path = float_pose_model(tmp_path / "f.onnx")  # its boxes move with R + 10 G + 100 B
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (200, 300, 3), dtype=np.uint8) for _ in range(3)]
    want = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=0)).predict(images)
    model = OrtModel(path, InferenceConfig(providers=["openvino"], warmup_runs=0,
                                           openvino={"uint8_input": uint8_input}))
    spec = model.info.input
    if uint8_input:  # the conversion runs inside the compiled model
        assert (spec.name, spec.dtype, spec.layout) == ("images_uint8_nhwc", "uint8", "NHWC")
    else:
        assert (spec.name, spec.dtype, spec.layout) == ("images", "float32", "NCHW")
    got = model.predict(images)
    assert len(got[0]) == 2
    # the model multiplies the channel means by 1, 10 and 100: float sums in another order
    # move its boxes by hundredths of a pixel; a wrong channel order or scale, by tens
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.05)
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=0.05)


def test_an_input_override_keeps_the_file_input(tmp_path: Path) -> None:
    from service.inference.adapter_config import AdapterConfig
    from tests.inference.test_gpu import float_pose_model

    path = float_pose_model(tmp_path / "f.onnx")
    model = OrtModel(path, InferenceConfig(providers=["openvino"], warmup_runs=0),
                     settings=AdapterConfig.model_validate({"input": {"color": "BGR"}}))
    assert model.info.input.dtype == "float32" and model.info.input.color == "BGR"


def test_without_the_package_it_falls_back_to_the_next_provider_or_is_refused(
    model_factory: ModelFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = model_factory()
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with caplog.at_level(logging.WARNING, logger="service.inference.session"):
        model = OrtModel(path, InferenceConfig(providers=["openvino", "cpu"], warmup_runs=0))
    assert model.provider == CPU and model.acceleration is None
    assert "OpenVINO cannot run it" in caplog.text and "linewatch[openvino]" in caplog.text
    with pytest.raises(ModelError, match=r"pip install 'linewatch\[openvino\]'"):
        OrtModel(path, InferenceConfig(providers=["openvino"], warmup_runs=0))


def test_openvino_only_comes_first() -> None:
    with pytest.raises(ModelError, match="can only come first"):
        resolve_providers(["cpu", "openvino"], [CPU], gpu_present=False)
    assert resolve_providers(["openvino", "cpu"], [CPU], gpu_present=False) == [OPENVINO, CPU]


def test_a_file_openvino_cannot_read_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="bad.onnx"):
        OrtModel(bad, InferenceConfig(providers=["openvino"]))


@pytest.mark.parametrize(("text", "ours"), [
    ("<Type: 'bfloat16'>", "bf16"), ("<Type: 'float32'>", "f32"), ("f16", "f16"),
])
def test_effective_precision_names(text: str, ours: str) -> None:
    assert effective_precision(text) == ours
