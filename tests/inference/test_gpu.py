"""GPU fast path: the uint8 input graph, IO binding, CUDA-graph buffers and the config
(checked on the CPU, with the fast path's wiring forced onto the CPU provider), and the
CUDA/TensorRT results against the CPU's (skipped without an NVIDIA GPU)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

import service.inference.gpu as gpu_mod
import service.inference.session as session_mod
from service.app import inference_config
from service.config import load_config
from service.domain import Detections
from service.errors import ConfigError, ModelError
from service.inference import InferenceConfig, OrtModel
from service.inference.adapter_config import AdapterConfig, InputOverride
from service.inference.config import GpuConfig
from service.inference.decoders import decode_ultralytics_pose
from service.inference.gpu import (
    BoundRunner,
    DeviceRunner,
    GraphRunner,
    default_engine_cache_dir,
    engine_cache_key,
    open_gpu_session,
    top_candidates_model,
    uint8_input_model,
)
from service.inference.metadata import InputSpec, read_model_info
from service.inference.preprocess import to_layout
from service.inference.session import CPU, nvidia_driver_present, tensorrt_runtime_present
from tests.inference.onnx_factory import K, build_model, default_metadata, make_row

HAS_GPU = nvidia_driver_present() and "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = (HAS_GPU and "TensorrtExecutionProvider" in ort.get_available_providers()
           and tensorrt_runtime_present())
NEEDS_GPU = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU / CUDA provider on this machine")
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models/zoo/linewatch-parts-s.onnx"
YOLO_ONNX = os.environ.get("LINEWATCH_TEST_YOLO_ONNX", "")  # set by scripts/gpu-check


def float_model(path: Path) -> Path:
    """Float NCHW model: a 1x1 conv with distinct channel weights, then a global mean."""
    w = np.array([[[[1.0]], [[10.0]], [[100.0]]]], np.float32)  # out=1, in=3
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"]),
             helper.make_node("ReduceMean", ["c"], ["out"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes, "f", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 4, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 1])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def float_pose_model(path: Path, batch: int | str = "batch", h: int = 240, w: int = 320,
                     rows: int = 4) -> Path:
    """An end2end pose model with a float NCHW RGB 0..1 input (as Ultralytics exports are)
    whose first row moves with the per-channel means (R + 10 G + 100 B px), so a wrong
    channel order, scale or layout changes the boxes and keypoints."""
    d = 6 + K * 3
    block = np.zeros((1, rows, d), np.float32)
    block[0, 0] = make_row((20, 40, 80, 80), 0.9, 1,
                           np.array([[30 + 8 * i, 50 + 4 * i, 0.9] for i in range(K)]))
    block[0, 1] = make_row((150, 100, 220, 180), 0.8, 0)
    weights = np.zeros((3, rows * d), np.float32)
    for col in [0, 2, *[6 + 3 * k for k in range(K)]]:  # x1, x2 and every keypoint x of row 0
        weights[:, col] = [1.0, 10.0, 100.0]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "wts"], ["shift"]),
        helper.make_node("Reshape", ["shift", "shape"], ["shift3"]),
        helper.make_node("Add", ["shift3", "block"], ["detections"]),
    ]
    graph = helper.make_graph(
        nodes, "float_pose",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [batch, rows, d])],
        initializer=[numpy_helper.from_array(block, "block"),
                     numpy_helper.from_array(weights, "wts"),
                     numpy_helper.from_array(np.array([-1, rows, d], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = default_metadata(h, w)
    meta.update(input_layout="NCHW", input_dtype="float32", input_color="RGB",
                normalization="unit")
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def raw_pose_model(path: Path, anchors: int = 600, h: int = 320, w: int = 320) -> Path:
    """A raw Ultralytics YOLO-pose output ``[B, 4 + 1 + K*3, anchors]`` from a float NCHW
    RGB 0..1 input: six clusters of overlapping boxes (scores 0.9 down to 0.3, one tie)
    among low-scoring anchors, all boxes shifted by the image's mean red (x) and green
    (y), so each image decodes differently."""
    rng = np.random.default_rng(7)
    rows = 4 + 1 + K * 3
    block = np.zeros((1, rows, anchors), np.float32)
    block[0, 0] = rng.uniform(20, w - 20, anchors)  # cx, cy, w, h
    block[0, 1] = rng.uniform(20, h - 20, anchors)
    block[0, 2:4] = rng.uniform(8, 30, (2, anchors))
    block[0, 4] = rng.uniform(0.0, 0.2, anchors)
    for c, (cx, cy, score) in enumerate([(60, 60, 0.9), (200, 80, 0.8), (100, 220, 0.8),
                                         (250, 250, 0.6), (160, 160, 0.45), (40, 280, 0.3)]):
        at = np.arange(c * 50, c * 50 + 12)  # twelve anchors on one object, best first
        block[0, 0, at], block[0, 1, at] = cx + np.arange(12) * 0.5, cy
        block[0, 2, at], block[0, 3, at] = 40, 50
        block[0, 4, at] = score - np.arange(12) * 0.01
    kx = block[0, 0] + np.arange(K)[:, None] * 3.0
    block[0, 5::3], block[0, 6::3], block[0, 7::3] = kx, block[0, 1] + 2.0, 0.9
    shift = np.zeros((3, rows * anchors), np.float32)  # rows 0 and 5, 8, ... move with R
    for r in (0, *range(5, rows, 3)):
        shift[0, r * anchors:(r + 1) * anchors] = 10.0
    shift[1, anchors:2 * anchors] = 10.0  # cy moves with G
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "shift"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["s3"]),
        helper.make_node("Add", ["s3", "block"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "raw_pose",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", rows, anchors])],
        initializer=[numpy_helper.from_array(block, "block"),
                     numpy_helper.from_array(shift, "shift"),
                     numpy_helper.from_array(np.array([-1, rows, anchors], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {
        "author": "Ultralytics", "task": "pose", "kpt_shape": f"[{K}, 3]",
        "names": "{0: 'part'}", "imgsz": f"[{h}, {w}]", "stride": "32",
    })
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (240, 320), (300, 500), (720, 1280)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = rng.integers(0, 60)  # B, G, R at distinct levels per frame
        img[..., 1] = rng.integers(60, 140)
        img[..., 2] = rng.integers(140, 255)
        out.append(img)
    return out


def assert_same(a: list[Detections], b: list[Detections], px: float = 0.02) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        np.testing.assert_array_equal(x.class_ids, y.class_ids)
        np.testing.assert_allclose(x.boxes, y.boxes, atol=px)
        np.testing.assert_allclose(x.keypoints[..., :2], y.keypoints[..., :2], atol=px)
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-3)


def plain_cpu_model(path: Path, config: InferenceConfig) -> OrtModel:
    """The model on the plain CPU path, with ``fast_path_on_cpu`` in force: the reference
    that the fast path's wiring must equal."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session_mod, "_device_for", lambda provider, driver: None)
        return OrtModel(path, config)


@pytest.fixture
def fast_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the GPU fast path's wiring (uint8 graph, DeviceRunner) on the CPU provider."""
    monkeypatch.setattr(session_mod, "_device_for", lambda provider, driver: "cpu")
    yield


# --- building blocks -------------------------------------------------------------------


def test_uint8_wrapper_equals_host_normalisation_and_io_binding(tmp_path: Path) -> None:
    path = float_model(tmp_path / "f.onnx")
    wrapped = tmp_path / "u8.onnx"
    onnx.save(uint8_input_model(onnx.load(str(path))), str(wrapped))
    frames = np.random.default_rng(0).integers(0, 255, (2, 4, 6, 3), dtype=np.uint8)
    spec = InputSpec("images", 4, 6, "NCHW", "float32", "RGB", "unit", "stretch")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": to_layout(frames, spec)})[0]
    sess = ort.InferenceSession(str(wrapped), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    out = BoundRunner(sess, device="cpu").run({sess.get_inputs()[0].name: frames})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_uint8_wrapper_metadata_says_what_the_graph_now_takes(tmp_path: Path) -> None:
    path = float_pose_model(tmp_path / "f.onnx")
    wrapped = tmp_path / "u8.onnx"
    onnx.save(uint8_input_model(onnx.load(str(path))), str(wrapped))
    spec = read_model_info(wrapped).input
    assert (spec.name, spec.layout, spec.dtype, spec.color, spec.normalization) == (
        "images_uint8_nhwc", "NHWC", "uint8", "BGR", "in-graph")
    assert (spec.height, spec.width) == (240, 320)
    with pytest.raises(ModelError, match="float NCHW"):
        uint8_input_model(onnx.load(str(wrapped)))  # already uint8 NHWC


@pytest.mark.parametrize("opset", [17, 18])
def test_top_candidates_keep_each_images_best_anchors_in_score_order(
    tmp_path: Path, opset: int
) -> None:
    path = raw_pose_model(tmp_path / "raw.onnx", anchors=600)
    model = onnx.load(str(path))
    model.opset_import[0].version = opset  # ReduceMax takes its axes as an input from 18
    if opset >= 18:
        for node in model.graph.node:
            if node.op_type == "ReduceMean":
                del node.attribute[:]
                node.input.append("axes23")
                node.attribute.append(helper.make_attribute("keepdims", 0))
        model.graph.initializer.append(numpy_helper.from_array(np.array([2, 3]), "axes23"))
    top = top_candidates_model(model, "output0", 1, 100)
    assert [d.dim_value or d.dim_param for d in top.graph.output[0].type.tensor_type.shape.dim
            ] == ["batch", 4 + 1 + K * 3, 100]
    x = np.stack([np.full((3, 320, 320), v, np.float32) for v in (0.1, 0.5)])
    full = ort.InferenceSession(model.SerializeToString(), providers=[CPU]).run(
        None, {"images": x})[0]
    kept = ort.InferenceSession(top.SerializeToString(), providers=[CPU]).run(
        None, {"images": x})[0]
    for b in range(2):
        order = np.argsort(-full[b, 4], kind="stable")[:100]  # ties: lower anchor first
        np.testing.assert_array_equal(kept[b], full[b][:, order])
    for b in range(2):  # the same instances from 100 anchors as from all 600
        for threshold in (0.25, 0.201):  # the background scores up to 0.2
            want = decode_ultralytics_pose(full[b], 1, (K, 3), threshold, 0.7)
            got = decode_ultralytics_pose(kept[b], 1, (K, 3), threshold, 0.7)
            assert len(want.boxes) >= 6
            np.testing.assert_array_equal(got.boxes, want.boxes)
            np.testing.assert_array_equal(got.keypoints, want.keypoints)


@pytest.mark.parametrize("k", [100, 1000])
def test_top_candidates_of_a_dynamic_anchor_count_keep_min_k_anchors(
    tmp_path: Path, k: int
) -> None:
    """A dynamic-shape export (Ultralytics' dynamic=True) does not say how many anchors
    it has: the graph keeps min(k, A) of them (all 600 here for k = 1000)."""
    model = onnx.load(str(raw_pose_model(tmp_path / "raw.onnx", anchors=600)))
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "anchors"
    top = top_candidates_model(model, "output0", 1, k)
    assert [d.dim_value or d.dim_param for d in top.graph.output[0].type.tensor_type.shape.dim
            ] == ["batch", 4 + 1 + K * 3, "top_anchors"]
    x = np.stack([np.full((3, 320, 320), v, np.float32) for v in (0.1, 0.5)])
    full = ort.InferenceSession(model.SerializeToString(), providers=[CPU]).run(
        None, {"images": x})[0]
    kept = ort.InferenceSession(top.SerializeToString(), providers=[CPU]).run(
        None, {"images": x})[0]
    assert kept.shape == (2, 4 + 1 + K * 3, min(k, 600))
    for b in range(2):
        order = np.argsort(-full[b, 4], kind="stable")[:k]
        np.testing.assert_array_equal(kept[b], full[b][:, order])


def test_top_candidates_refuse_an_output_that_is_not_raw_ultralytics(tmp_path: Path) -> None:
    model = onnx.load(str(float_pose_model(tmp_path / "e2e.onnx")))
    with pytest.raises(ModelError, match="no output 'output0'"):
        top_candidates_model(model, "output0", 1, 100)
    flat = onnx.load(str(float_model(tmp_path / "f.onnx")))
    with pytest.raises(ModelError, match=r"must be \[B, 4 \+ C \+ K\*D, A\]"):
        top_candidates_model(flat, "out", 1, 100)


def test_fast_path_chooses_the_best_anchors_on_the_device(
    tmp_path: Path, fast_path_on_cpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    path = raw_pose_model(tmp_path / "raw.onnx", anchors=600)
    images = frames(4)
    config = InferenceConfig(warmup_runs=1, score_threshold=0.25,
                             gpu=GpuConfig(max_candidates=100))
    plain = plain_cpu_model(path, config)
    ref = plain.predict(images)
    with caplog.at_level(logging.INFO):
        model = OrtModel(path, config)
    assert plain.info.outputs[0].shape[2] == 600 and model.info.outputs[0].shape[2] == 100
    assert model.adapter.name == "ultralytics"
    assert model.device_setup is not None and model.device_setup.candidates == 100
    assert "best 100 anchors an image chosen on the device" in caplog.text
    assert model.acceleration is not None and model.acceleration["candidates"] == 100
    got = model.predict(images)
    assert all(len(d) >= 5 for d in ref)
    assert_same(got, ref)  # the uint8 graph sums in another order: within 0.02 px
    assert "NMS saw only those" not in caplog.text
    low = OrtModel(path, config.model_copy(update={"score_threshold": 0.001}))
    with caplog.at_level(logging.WARNING):
        low.predict(images)
        low.predict(images)
    assert caplog.text.count("more anchors scoring above 0.001 than the 100 of 600") == 1
    every = OrtModel(path, config.model_copy(update={"gpu": GpuConfig(max_candidates=0)}))
    assert every.device_setup is not None and every.device_setup.candidates is None
    assert every.info.outputs[0].shape[2] == 600
    assert_same(every.predict(images), ref)


def test_fast_path_chooses_the_best_anchors_of_a_dynamic_shape_export(
    tmp_path: Path, fast_path_on_cpu: None
) -> None:
    model = onnx.load(str(raw_pose_model(tmp_path / "raw.onnx", anchors=600)))
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "anchors"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    images = frames(4)
    config = InferenceConfig(warmup_runs=1, score_threshold=0.25,
                             gpu=GpuConfig(max_candidates=100))
    plain = plain_cpu_model(path, config)
    ref = plain.predict(images)
    device = OrtModel(path, config)
    assert read_model_info(path).outputs[0].shape[2] == "anchors"  # as the file says
    assert device.device_setup is not None and device.device_setup.candidates == 100
    assert device.predict(images[:1])[0].boxes.shape[0] >= 5
    assert all(len(d) >= 5 for d in ref)
    assert_same(device.predict(images), ref)


def test_bound_and_graph_runners_on_cpu_equal_session_run(tmp_path: Path) -> None:
    path = float_pose_model(tmp_path / "f.onnx", batch=2)
    sess = ort.InferenceSession(str(path), providers=[CPU])
    x = np.random.default_rng(3).random((2, 3, 240, 320), dtype=np.float32)
    ref = sess.run(None, {"images": x})[0]
    np.testing.assert_array_equal(BoundRunner(sess, "cpu").run({"images": x})[0], ref)
    graph = GraphRunner(sess, "cpu")
    for scale in (1.0, 0.5):  # the same buffers, updated in place
        out = graph.run({"images": x * scale})[0]
        np.testing.assert_allclose(out, sess.run(None, {"images": x * scale})[0], rtol=1e-6)


def test_graph_runner_refuses_dynamic_shapes(tmp_path: Path) -> None:
    sess = ort.InferenceSession(str(float_pose_model(tmp_path / "f.onnx")), providers=[CPU])
    with pytest.raises(ModelError, match="static shapes"):
        GraphRunner(sess, "cpu")


@pytest.mark.parametrize(("batch", "max_chunk", "n", "runs"),
                         [(2, None, 3, 2), ("batch", 4, 9, 3), ("batch", None, 9, 1)])
def test_device_runner_chunks_like_the_cpu_path(
    tmp_path: Path, batch: int | str, max_chunk: int | None, n: int, runs: int
) -> None:
    sess = ort.InferenceSession(str(float_pose_model(tmp_path / "f.onnx", batch=batch)),
                                providers=[CPU])
    x = np.random.default_rng(4).random((n, 3, 240, 320), dtype=np.float32)
    fixed = batch if isinstance(batch, int) else None
    out, model_s, got_runs = DeviceRunner(sess, "m", "bound", fixed, max_chunk, "cpu").run(
        {"images": x}, n)
    one = ort.InferenceSession(str(float_pose_model(tmp_path / "d.onnx")), providers=[CPU])
    expected = np.concatenate([one.run(None, {"images": x[i:i + 1]})[0] for i in range(n)])
    assert got_runs == runs and model_s > 0
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


# --- config ----------------------------------------------------------------------------


def test_gpu_config_defaults_and_refusals() -> None:
    gpu = InferenceConfig().gpu
    assert (gpu.fp16, gpu.io_binding, gpu.uint8_input, gpu.cuda_graphs, gpu.device_id) == (
        True, True, True, False, 0)
    assert default_engine_cache_dir().parts[-2:] == ("linewatch", "trt")
    with pytest.raises(ValidationError, match="cuda_graphs: true needs io_binding"):
        GpuConfig(cuda_graphs=True, io_binding=False)
    with pytest.raises(ValidationError, match="Extra inputs"):
        GpuConfig.model_validate({"fp32": True})


def test_model_gpu_section_in_a_config_file(tmp_path: Path, model_factory: Any) -> None:
    model = model_factory("fixed", batch=2)  # CUDA graphs need a fixed batch
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "cameras:\n  - id: cam\n    source: sim://conveyor\nmodels:\n  - id: m\n"
        f"    path: {model}\n    max_batch: 16\n    gpu:\n      fp16: false\n"
        "      engine_cache_dir: trt-cache\n      cuda_graphs: true\n      device_id: 1\n"
    )
    mod = load_config(cfg).models[0]
    assert mod.gpu.engine_cache_dir == tmp_path / "trt-cache"  # relative to the config file
    ic = inference_config(mod)
    assert (ic.max_batch, ic.gpu.fp16, ic.gpu.cuda_graphs, ic.gpu.device_id) == (16, False, True, 1)
    cfg.write_text(cfg.read_text().replace("device_id: 1", "device: 1"))
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: models\[0\]\.gpu\.device"):
        load_config(cfg)
    # a dynamic-batch model with cuda_graphs is a config error at its YAML line
    cfg.write_text(cfg.read_text().replace(str(model), str(model_factory()))
                   .replace("device: 1", "device_id: 1"))
    lines = cfg.read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if "cuda_graphs" in t)
    with pytest.raises(ConfigError, match=rf"c.yaml:{line}: models\[0\]\.gpu\.cuda_graphs: "
                                          r"Model 'm': gpu.cuda_graphs needs a fixed batch"):
        load_config(cfg)


def test_inference_config_turns_the_uint8_graph_off_with_an_input_override(
    tmp_path: Path, model_factory: Any
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "cameras:\n  - id: cam\n    source: sim://conveyor\nmodels:\n  - id: m\n"
        f"    path: {model_factory()}\n    adapter:\n      kind: auto\n"
        "      input: {color: BGR}\n"
    )
    assert inference_config(load_config(cfg).models[0]).gpu.uint8_input is False
    assert session_mod.device_input_allowed(InputOverride(size=(320, 320)))


def test_cuda_graphs_with_a_dynamic_batch_is_refused(model_factory: Any) -> None:
    config = InferenceConfig(providers=["cpu"], gpu=GpuConfig(cuda_graphs=True))
    with pytest.raises(ModelError, match="cuda_graphs needs a fixed batch size.*dynamic"):
        OrtModel(model_factory(), config, name="dyn")
    fixed = OrtModel(model_factory("fixed", batch=2), config, name="fixed")
    assert fixed.device_setup is None  # accepted; the CPU runs it as before


# --- OrtModel: the CPU path stays plain; the fast path's wiring on the CPU --------------


def test_cpu_provider_does_not_take_the_gpu_path(
    model_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_mod, "nvidia_driver_present", lambda: True)
    calls: list[int] = []
    plain = session_mod.run_in_batches

    def counting(*args: Any) -> Any:
        calls.append(args[3])
        return plain(*args)

    monkeypatch.setattr(session_mod, "run_in_batches", counting)
    model = OrtModel(model_factory(), InferenceConfig(providers=["cpu"], warmup_runs=0))
    assert model.device_setup is None and model.device_runners == []
    assert model.acceleration is None
    model.predict(frames(3))
    assert calls == [3]  # the plain session.run path, one batched run
    assert model.info.input.dtype == "uint8"  # the file's own input, no wrapper


def test_gpu_provider_that_falls_back_runs_the_plain_cpu_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if HAS_GPU:
        pytest.skip("needs a machine where the CUDA provider cannot load (no GPU)")
    monkeypatch.setattr(session_mod, "nvidia_driver_present", lambda: True)
    path = float_pose_model(tmp_path / "f.onnx")
    with caplog.at_level(logging.INFO):
        model = OrtModel(path, InferenceConfig(providers=["cuda", "cpu"], warmup_runs=0))
    assert model.provider == CPU and model.device_setup is None
    assert model.info.input.dtype == "float32"  # the file itself, not the uint8 graph
    assert "did not load; running on CPUExecutionProvider" in caplog.text


@pytest.mark.parametrize("io_binding", [True, False])
def test_fast_path_wiring_on_cpu_equals_the_plain_model(
    tmp_path: Path, fast_path_on_cpu: None, io_binding: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = float_pose_model(tmp_path / "f.onnx")
    images = frames(4)
    ref = plain_cpu_model(path, InferenceConfig(warmup_runs=0)).predict(images)
    with caplog.at_level(logging.INFO):
        model = OrtModel(path, InferenceConfig(warmup_runs=1,
                                               gpu=GpuConfig(io_binding=io_binding)))
    setup = model.device_setup
    assert setup is not None and setup.uint8_input and setup.io_binding is io_binding
    assert model.info.input.dtype == "uint8" and model.info.input.layout == "NHWC"
    assert [r.mode for r in model.device_runners] == ["bound" if io_binding else "plain"]
    feeds = model.prepare(images).feeds
    assert next(iter(feeds.values())).dtype == np.uint8  # frames go to the device as uint8
    got = model.predict(images)
    assert_same(got, ref)
    assert f"io_binding {'on' if io_binding else 'off'}, fp16 off, cuda_graphs off" in caplog.text
    assert model.acceleration is not None and model.acceleration["uint8_input"] is True


def test_fast_path_three_steps_and_cuda_graph_buffers_on_cpu(
    tmp_path: Path, fast_path_on_cpu: None
) -> None:
    path = float_pose_model(tmp_path / "f.onnx", batch=2)
    images = frames(3, seed=5)
    ref = plain_cpu_model(path, InferenceConfig(warmup_runs=0)).predict(images)
    model = OrtModel(path, InferenceConfig(warmup_runs=1, gpu=GpuConfig(cuda_graphs=True)))
    assert model.device_setup is not None and model.device_setup.cuda_graphs
    assert [r.mode for r in model.device_runners] == ["graph"]
    got = model.finish(model.infer(model.prepare(images)))
    assert_same(got, ref)
    assert model.last_timing.runs == 2  # padded chunks of the fixed batch


def test_each_instance_runs_its_own_session_through_its_own_device_buffers(
    tmp_path: Path, fast_path_on_cpu: None
) -> None:
    """With ``instances: 2`` every instance's device runner (its CUDA-graph buffers) is
    bound to that instance's session: a graph replays what its own session captured, and
    one session may not be run from two threads with CUDA graphs."""
    path = float_pose_model(tmp_path / "f.onnx", batch=2)
    images = frames(3, seed=5)
    ref = plain_cpu_model(path, InferenceConfig(warmup_runs=0)).predict(images)
    model = OrtModel(path, InferenceConfig(warmup_runs=1, instances=2,
                                           gpu=GpuConfig(cuda_graphs=True)))
    runners = model.device_runners
    assert model.instances == 2 and [r.mode for r in runners] == ["graph", "graph"]
    assert runners[0].session is not runners[1].session
    with ThreadPoolExecutor(2) as pool:
        for got in pool.map(lambda _: model.predict(images), range(6)):
            assert_same(got, ref)


def test_a_gpu_provider_that_cannot_make_the_session_is_dropped_keeping_the_next_ones_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime's own fallback would retry [CUDA, CPU] *without* their options
    (device_id, CUDA graphs): LineWatch turns it off and retries itself."""
    if HAS_TRT:
        pytest.skip("needs a machine where the TensorRT provider cannot make a session")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT provider")
    monkeypatch.setattr(session_mod, "nvidia_driver_present", lambda: True)
    calls: list[list[Any]] = []
    create = session_mod._create_session

    def recording(model: Any, so: Any, providers: Any, path: Path) -> Any:
        calls.append([p if isinstance(p, str) else (p[0], dict(p[1])) for p in providers])
        return create(model, so, providers, path)

    monkeypatch.setattr(session_mod, "_create_session", recording)
    path = float_pose_model(tmp_path / "f.onnx")
    config = InferenceConfig(providers=["tensorrt", "cuda", "cpu"], warmup_runs=0,
                             gpu=GpuConfig(engine_cache_dir=tmp_path / "trt"))
    with caplog.at_level(logging.WARNING):
        model = OrtModel(path, config)
    assert [c[0] if isinstance(c[0], str) else c[0][0] for c in calls][:2] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert calls[1][0] == ("CUDAExecutionProvider", {
        "device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"})
    assert "TensorrtExecutionProvider could not run it" in caplog.text
    if not HAS_GPU:  # and CUDA did not load either: the plain CPU session
        assert model.provider == CPU and model.device_setup is None
        assert calls[-1] == [CPU]
        assert len(model.predict(frames(1))[0]) == 2


def test_engine_cache_key_follows_the_tensorrt_version_and_the_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_gpu_models = gpu_mod.gpu_models
    info = tmp_path / "gpus" / "0000:01:00.0" / "information"
    info.parent.mkdir(parents=True)
    info.write_text("Model: \t\t NVIDIA H200\nIRQ:   \t 42\n")
    assert read_gpu_models(tmp_path / "gpus") == ("NVIDIA H200",)
    assert read_gpu_models(tmp_path / "none") == ()
    options = {"trt_fp16_enable": True, "trt_engine_cache_path": "/a"}
    monkeypatch.setattr(gpu_mod, "tensorrt_version", lambda: "101300")
    monkeypatch.setattr(gpu_mod, "gpu_models", lambda: ("NVIDIA H100 80GB HBM3",))
    key = engine_cache_key(b"model", options)
    assert engine_cache_key(b"model", {**options, "trt_engine_cache_path": "/b"}) == key
    monkeypatch.setattr(gpu_mod, "tensorrt_version", lambda: "101400")
    assert engine_cache_key(b"model", options) != key
    monkeypatch.setattr(gpu_mod, "tensorrt_version", lambda: "101300")
    monkeypatch.setattr(gpu_mod, "gpu_models", lambda: ("NVIDIA H200",))
    assert engine_cache_key(b"model", options) != key


def test_uint8_graph_is_skipped_for_an_input_override(
    tmp_path: Path, fast_path_on_cpu: None
) -> None:
    path = float_pose_model(tmp_path / "f.onnx")
    settings = AdapterConfig(input=InputOverride(color="BGR"))
    model = OrtModel(path, InferenceConfig(warmup_runs=0), settings=settings)
    assert model.device_setup is not None and not model.device_setup.uint8_input
    assert model.info.input.dtype == "float32" and model.info.input.color == "BGR"
    assert len(model.predict(frames(1))[0]) == 2


def test_uint8_graph_is_skipped_for_a_gray_model(tmp_path: Path, fast_path_on_cpu: None) -> None:
    """A one-channel model is fed frames converted to gray on the host (the device graph
    takes BGR frames); it still runs on the GPU path, and gets the same result."""
    rows = np.stack([make_row((20, 40, 80, 80), 0.9, 1, np.full((K, 3), 50.0, np.float32))])
    unsaid = {k: None for k in ("input_layout", "input_color", "input_dtype", "normalization")}
    path = build_model(tmp_path / "gray.onnx", rows, layout="NCHW", channels=1,
                       dtype=TensorProto.FLOAT, metadata=unsaid)
    model = OrtModel(path, InferenceConfig(warmup_runs=0))
    assert model.device_setup is not None and not model.device_setup.uint8_input
    assert model.info.input.color == "GRAY" and model.info.input.dtype == "float32"
    assert_same(model.predict(frames(2)),
                plain_cpu_model(path, InferenceConfig(warmup_runs=0)).predict(frames(2)))


def test_bench_session_takes_the_same_feeds(tmp_path: Path, fast_path_on_cpu: None) -> None:
    path = float_pose_model(tmp_path / "f.onnx")
    model = OrtModel(path, InferenceConfig(warmup_runs=0))
    bare = session_mod.open_session(path, InferenceConfig()).session
    feeds = model.prepare(frames(2)).feeds
    out = bare.run(None, feeds)[0]
    np.testing.assert_allclose(out, model._run(feeds, 2)[0][0], rtol=1e-6)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_bench_bare_loop_runs_through_the_models_device_runner(
    tmp_path: Path, fast_path_on_cpu: None, monkeypatch: pytest.MonkeyPatch,
    cuda_graphs: bool,
) -> None:
    """The bare loop that overhead_ratio is measured against runs as the pipeline does:
    through IO binding, and replaying captured graphs with gpu.cuda_graphs."""
    from service.app import LoadedModel
    from service.bench import raw_model_fps
    from service.config import ModelConfig
    from service.inference.runner import Predictor

    path = float_pose_model(tmp_path / "f.onnx", batch=2 if cuda_graphs else "batch")
    mod = ModelConfig(id="m", path=path, warmup_runs=0, providers=["cuda", "cpu"],
                      gpu=GpuConfig(cuda_graphs=cuda_graphs))
    model = Predictor(path, inference_config(mod), name="m")
    runner = gpu_mod.GraphRunner if cuda_graphs else gpu_mod.BoundRunner
    assert [r.mode for r in model.device_runners] == ["graph" if cuda_graphs else "bound"]
    batches: list[int] = []
    plain_run = runner.run

    def counting(self: Any, feeds: dict[str, np.ndarray]) -> Any:
        batches.append(next(iter(feeds.values())).shape[0])
        return plain_run(self, feeds)

    monkeypatch.setattr(runner, "run", counting)
    result = raw_model_fps(LoadedModel(mod, model, ("cam",), 2), frames(2), 0.2)
    assert result.fps > 0 and result.batch == 2
    assert batches and set(batches) == {2}  # every bare run went through that runner


# --- on a GPU ---------------------------------------------------------------------------


@NEEDS_GPU
@pytest.mark.parametrize("providers,tol", [(("cuda", "cpu"), 1e-4), (("tensorrt", "cuda"), 2e-2)])
def test_gpu_equals_cpu_within_fp16_tolerance(
    tmp_path: Path, providers: tuple[str, ...], tol: float
) -> None:
    if "tensorrt" in providers and not HAS_TRT:
        pytest.skip("this onnxruntime build has no TensorRT provider")
    path = tmp_path / "u8.onnx"
    onnx.save(uint8_input_model(onnx.load(str(float_model(tmp_path / "f.onnx")))), str(path))
    frames = np.random.default_rng(1).integers(0, 255, (8, 4, 6, 3), dtype=np.uint8)
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = cpu.get_inputs()[0].name
    ref = cpu.run(None, {name: frames})[0]
    gpu = open_gpu_session(path, tmp_path / "trt-cache", fp16=True, providers=providers)
    assert gpu.get_providers()[0] != "CPUExecutionProvider"
    out = BoundRunner(gpu, "cuda").run({name: frames})[0]
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def sim_frames(n: int) -> list[np.ndarray]:
    from service.sim import Scene

    scene = Scene("conveyor", seed=3, width=640, height=480, fps=10.0)
    return [scene.render(i * 7)[0] for i in range(n)]


def assert_close_detections(
    gpu: list[Detections], cpu: list[Detections], px: float, confident: float = 0.6
) -> None:
    """Every confident CPU instance (score >= ``confident``) has a GPU one of its class
    within ``px`` (box and visible keypoints); fp16 may move scores near the threshold, so
    those are not required."""
    matched = 0
    for g, c in zip(gpu, cpu, strict=True):
        for i in np.flatnonzero(c.scores >= confident):
            same = np.flatnonzero(g.class_ids == c.class_ids[i])
            assert same.size, f"a class {c.class_ids[i]} instance is missing on the GPU"
            j = same[np.argmin(np.abs(g.boxes[same] - c.boxes[i]).max(axis=1))]
            assert np.abs(g.boxes[j] - c.boxes[i]).max() <= px
            vis = c.keypoints[i, :, 2] >= 0.5
            assert np.abs(g.keypoints[j, vis, :2] - c.keypoints[i, vis, :2]).max(
                initial=0.0) <= px
            matched += 1
    assert matched, "no confident instance to compare: pick other frames"


def gpu_models() -> list[Any]:
    models = [pytest.param(DEFAULT_MODEL, id="default")]
    if YOLO_ONNX:
        models.append(pytest.param(Path(YOLO_ONNX), id="yolo11n-pose"))
    return models


@NEEDS_GPU
@pytest.mark.parametrize("path", gpu_models())
@pytest.mark.parametrize("providers", [["cuda", "cpu"], ["tensorrt", "cuda", "cpu"]])
def test_ortmodel_on_the_gpu_equals_the_cpu(
    tmp_path: Path, path: Path, providers: list[str]
) -> None:
    if "tensorrt" in providers and not HAS_TRT:
        pytest.skip("this onnxruntime build has no TensorRT provider")
    images = sim_frames(6)
    # the calibrated untrained YOLO export scores 0.25-0.76 (13-22 instances a frame here)
    threshold, confident = (0.25, 0.35) if "yolo" in path.name else (None, 0.6)
    cpu = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=0,
                                         score_threshold=threshold)).predict(images)
    model = OrtModel(path, InferenceConfig(
        providers=providers, warmup_runs=2, score_threshold=threshold,
        gpu=GpuConfig(engine_cache_dir=tmp_path / "trt")))
    assert model.provider != CPU and model.device_setup is not None
    assert model.device_setup.io_binding
    assert model.device_setup.uint8_input is (model.info.inputs[0].name.endswith("_uint8_nhwc"))
    assert_close_detections(model.predict(images), cpu, px=1.0, confident=confident)


@pytest.mark.skipif(not HAS_TRT, reason="no NVIDIA GPU with the TensorRT provider here")
def test_tensorrt_engine_is_built_once_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = InferenceConfig(providers=["tensorrt", "cuda", "cpu"], warmup_runs=1,
                             gpu=GpuConfig(engine_cache_dir=tmp_path / "trt"))
    with caplog.at_level(logging.INFO):
        first = OrtModel(DEFAULT_MODEL, config)
    assert first.provider == "TensorrtExecutionProvider"
    assert "building a TensorRT engine" in caplog.text
    engines = {p: p.stat().st_mtime_ns for p in (tmp_path / "trt").rglob("*.engine")}
    assert engines, "no engine file in the cache directory"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = OrtModel(DEFAULT_MODEL, config)
    assert "building a TensorRT engine" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "trt").rglob("*.engine")} == engines
    assert second.device_setup is not None and second.device_setup.fp16


@NEEDS_GPU
def test_cuda_graphs_on_a_fixed_batch_model_equal_the_cpu(tmp_path: Path) -> None:
    path = float_pose_model(tmp_path / "f.onnx", batch=4)
    images = frames(6, seed=9)
    cpu = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=0)).predict(images)
    model = OrtModel(path, InferenceConfig(providers=["cuda", "cpu"], warmup_runs=2,
                                           gpu=GpuConfig(cuda_graphs=True)))
    assert model.device_setup is not None and model.device_setup.cuda_graphs, (
        model.device_setup and model.device_setup.notes)
    for _ in range(3):  # replays of the captured graph with new inputs
        assert_same(model.predict(images), cpu, px=1e-2)


@NEEDS_GPU
def test_two_instances_with_cuda_graphs_side_by_side_equal_the_cpu(tmp_path: Path) -> None:
    path = float_pose_model(tmp_path / "f.onnx", batch=2)
    images = frames(3, seed=4)
    cpu = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=0)).predict(images)
    model = OrtModel(path, InferenceConfig(providers=["cuda", "cpu"], warmup_runs=2,
                                           instances=2, gpu=GpuConfig(cuda_graphs=True)))
    assert model.instances == 2 and [r.mode for r in model.device_runners] == ["graph"] * 2
    with ThreadPoolExecutor(2) as pool:
        for got in pool.map(lambda _: model.predict(images), range(8)):
            assert_same(got, cpu, px=1e-2)



ULTRA_PY = ROOT / ".venv-ultralytics/bin/python"


@pytest.mark.skipif(not ULTRA_PY.exists(), reason=".venv-ultralytics is absent: run "
                    "scripts/ultralytics-env to check the uint8 graph on a real YOLO export")
def test_uint8_graph_on_a_real_yolo_export_equals_the_float_model(
    tmp_path: Path, fast_path_on_cpu: None
) -> None:
    import subprocess

    res = subprocess.run([str(ULTRA_PY), str(ROOT / "tests/support/ultra_ref.py"), "export",
                          "--out", str(tmp_path), "--imgsz", "320"],
                         capture_output=True, text=True, timeout=300, check=True)
    raw = Path(json.loads(res.stdout.strip().splitlines()[-1])["raw"])
    images = sim_frames(3)
    config = InferenceConfig(warmup_runs=0, score_threshold=0.01)
    # the file's own graph (no CPU rewrites, as the device path runs it): with an
    # untrained model's saturated scores, rounding elsewhere would reorder ties
    plain = plain_cpu_model(raw, config.model_copy(update={"cpu_rewrites": False}))
    ref = plain.predict(images)
    model = OrtModel(raw, config)
    assert plain.info.input.dtype == "float32" and model.info.input.dtype == "uint8"
    assert model.device_setup is not None and model.device_setup.uint8_input
    got = model.predict(images)
    assert sum(len(d) for d in ref) > 0, "no detections to compare: lower the threshold"
    assert_same(got, ref, px=0.05)
