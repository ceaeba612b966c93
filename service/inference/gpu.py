"""The GPU fast path's building blocks (onnxruntime-gpu; the CPU path never needs them).

- :func:`uint8_input_model`: prepend Cast, BGR->RGB, scale and NHWC->NCHW to a float
  NCHW model, so that frames go to the device once as uint8 and normalisation and the
  layout change run on the device (inside the graph).
- :func:`tensorrt_provider`: TensorRT options (fp16, engine + timing cache on disk, so
  an engine is rebuilt only when the model or these settings change);
  :func:`open_gpu_session` logs a line while an engine builds.
- :class:`BoundRunner`: IO binding: inputs bound as device OrtValues, outputs
  allocated on the device and copied back once.

Runs on the CPU too (device ``cpu``), which is how its tests check it without a GPU.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ModelError

log = logging.getLogger(__name__)


def uint8_input_model(model: Any, input_name: str | None = None, bgr_to_rgb: bool = True,
                      scale: float = 1.0 / 255.0) -> Any:
    """A copy of ``model`` (onnx ModelProto, float NCHW input) taking uint8 NHWC BGR frames."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    target = next((i for i in inputs if input_name in (None, i.name)), None)
    if target is None:
        raise ModelError(f"uint8_input_model: no input {input_name!r} in the model.")
    dims = target.type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ModelError("uint8_input_model: the model input must be float NCHW with 3 channels.")
    old = target.name
    new = old + "_uint8_nhwc"
    shape = [d.dim_param or d.dim_value for d in dims]
    raw = helper.make_tensor_value_info(
        new, TensorProto.UINT8, [shape[0], shape[2], shape[3], 3]
    )
    nodes = [helper.make_node("Cast", [new], [new + "_f"], to=TensorProto.FLOAT)]
    src = new + "_f"
    if bgr_to_rgb:
        nodes.append(helper.make_node("Gather", [src, new + "_bgr"], [new + "_rgb"], axis=3))
        graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64),
                                                         new + "_bgr"))
        src = new + "_rgb"
    nodes.append(helper.make_node("Mul", [src, new + "_scale"], [new + "_scaled"]))
    graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), new + "_scale"))
    nodes.append(helper.make_node("Transpose", [new + "_scaled"], [old], perm=[0, 3, 1, 2]))
    kept = [i for i in graph.input if i.name != old]
    del graph.input[:]
    graph.input.extend([raw, *kept])
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *existing])
    onnx.checker.check_model(m)
    return m


def tensorrt_provider(cache_dir: Path, fp16: bool = True, workspace_gb: float = 4.0,
                      device_id: int = 0) -> tuple[str, dict[str, Any]]:
    """TensorRT execution provider options: fp16, engine and timing caches in ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return "TensorrtExecutionProvider", {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": int(workspace_gb * 2**30),
        "trt_builder_optimization_level": 3,
    }


def cuda_provider(device_id: int = 0) -> tuple[str, dict[str, Any]]:
    return "CUDAExecutionProvider", {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}


def engine_cache_key(model_path: Path, options: dict[str, Any]) -> str:
    """What the engine depends on: the model bytes and the provider settings."""
    h = hashlib.sha256(model_path.read_bytes())
    h.update(repr(sorted(options.items())).encode())
    return h.hexdigest()[:16]


def open_gpu_session(
    model_path: Path,
    cache_dir: Path,
    fp16: bool = True,
    providers: Sequence[str] = ("tensorrt", "cuda", "cpu"),
    session_options: Any = None,
) -> Any:
    """An ORT session with TensorRT -> CUDA -> CPU as configured; logs engine builds."""
    import onnxruntime as ort

    chosen: list[Any] = []
    key_dir = cache_dir
    for p in providers:
        if p == "tensorrt":
            name, opts = tensorrt_provider(cache_dir, fp16)
            key_dir = cache_dir / engine_cache_key(model_path, opts)
            opts["trt_engine_cache_path"] = str(key_dir)
            opts["trt_timing_cache_path"] = str(key_dir)
            key_dir.mkdir(parents=True, exist_ok=True)
            chosen.append((name, opts))
        elif p == "cuda":
            chosen.append(cuda_provider())
        else:
            chosen.append("CPUExecutionProvider")
    building = "tensorrt" in providers and not any(key_dir.glob("*.engine"))
    if building:
        log.info("building a TensorRT engine for %s (fp16=%s); this takes a minute or more, "
                 "once: it is cached in %s", model_path, fp16, key_dir)
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                   providers=chosen)
    if building:
        log.info("TensorRT engine for %s ready in %.1f s", model_path, time.perf_counter() - t0)
    return session


class BoundRunner:
    """``run(feeds) -> outputs`` through IO binding on ``device`` ('cuda' or 'cpu')."""

    def __init__(self, session: Any, device: str = "cuda", device_id: int = 0) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            ortvalue = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value), self.device, self.device_id
            )
            binding.bind_ortvalue_input(name, ortvalue)
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return [np.asarray(o) for o in binding.copy_outputs_to_cpu()]
