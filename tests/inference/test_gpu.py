"""GPU fast path: the uint8 input wrapper and IO binding (checked on the CPU), and the
CUDA/TensorRT results against the CPU's (skipped without an NVIDIA GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.inference.gpu import BoundRunner, open_gpu_session, uint8_input_model
from service.inference.metadata import InputSpec
from service.inference.preprocess import to_layout
from service.inference.session import nvidia_driver_present

HAS_GPU = nvidia_driver_present() and "CUDAExecutionProvider" in ort.get_available_providers()


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


@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU / CUDA provider on this machine")
@pytest.mark.parametrize("providers,tol", [(("cuda", "cpu"), 1e-4), (("tensorrt", "cuda"), 2e-2)])
def test_gpu_equals_cpu_within_fp16_tolerance(
    tmp_path: Path, providers: tuple[str, ...], tol: float
) -> None:
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
