"""The GPU fast path (onnxruntime-gpu; the CPU path never needs it).

:func:`service.inference.session.open_model_session` wires these together when the
provider that runs a model is TensorRT or CUDA (``gpu:`` in the model's config):

- :func:`uint8_input_model`: prepend Cast, BGR->RGB, scale and NHWC->NCHW to a float
  NCHW model, so that frames go to the device once as uint8 and normalisation and the
  layout change run on the device (inside the graph).
- :func:`tensorrt_provider`: TensorRT options (fp16, engine + timing cache on disk in a
  directory keyed by :func:`engine_cache_key`, so an engine is rebuilt only when the model
  or these settings change; an optimisation profile for a dynamic batch);
  :func:`open_gpu_session` logs a line while an engine builds.
- :class:`BoundRunner`: IO binding: inputs and outputs bound to host memory, copied to
  and from the device once each, inside the run (which releases the GIL).
  :class:`GraphRunner`: IO binding on fixed device buffers, for CUDA graphs (captured
  once, replayed each run).
- :class:`DeviceRunner`: ``run(feeds, n)`` over a batch (in chunks of the fixed batch or
  the TensorRT profile's maximum) through one of the above.

Runs on the CPU too (device ``cpu``), which is how its tests check it without a GPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ModelError

log = logging.getLogger(__name__)

TOP_CANDIDATES_KEY = "linewatch_top_candidates"  # metadata of a graph that keeps k anchors
TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"

# ONNX Runtime type strings -> numpy dtypes, for device buffers.
_ORT_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_, "tensor(double)": np.float64,
}


def default_engine_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/linewatch/trt``, else ``~/.cache/linewatch/trt``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "linewatch" / "trt"


def uint8_input_model(model: Any, input_name: str | None = None, bgr_to_rgb: bool = True,
                      scale: float = 1.0 / 255.0, size: tuple[int, int] | None = None) -> Any:
    """A copy of ``model`` (onnx ModelProto, float NCHW input) taking uint8 NHWC BGR frames.

    The new input is named ``<input>_uint8_nhwc``; ``size`` = (H, W) fills spatial dims the
    model leaves unnamed.  The copy's metadata says what it now takes (``input_layout``
    NHWC, ``input_dtype`` uint8, ``input_color`` BGR, ``normalization`` in-graph), so the
    adapters prepare plain uint8 frames for it.
    """
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
    if (len(dims) != 4 or dims[1].dim_value != 3
            or target.type.tensor_type.elem_type != TensorProto.FLOAT):
        raise ModelError("uint8_input_model: the model input must be float NCHW with 3 channels.")
    old = target.name
    new = old + "_uint8_nhwc"
    shape: list[Any] = [d.dim_param or d.dim_value or None for d in dims]
    if size is not None:
        shape[2] = shape[2] or size[0]
        shape[3] = shape[3] or size[1]
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
    meta = {p.key: p.value for p in m.metadata_props}
    meta.update(input_layout="NHWC", input_dtype="uint8", input_color="BGR",
                normalization="in-graph")
    del m.metadata_props[:]
    helper.set_model_props(m, meta)
    onnx.checker.check_model(m)
    return m


def top_candidates_model(model: Any, output_name: str, num_classes: int, k: int) -> Any:
    """A copy of ``model`` (onnx ModelProto) whose raw Ultralytics output ``output_name``
    ``[B, 4 + C + K*D, A]`` keeps only each image's ``k`` best anchors: ``[B, 4 + C + K*D,
    k]``, best first (ReduceMax over the class scores, TopK, GatherElements; TopK breaks
    ties by the lower anchor index, as the decoder's stable sort does).

    On the device this shrinks what comes back to the CPU and what NMS looks at (YOLO at
    640: 8400 anchors, 1.9 MB an image) to ``k`` anchors.  Greedy NMS on the best ``k``
    keeps exactly the boxes that NMS on all anchors keeps among those ``k``, so the
    results are the same as long as an image's kept instances are among its ``k`` best
    anchors (Ultralytics itself looks at no more than 30000).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    target = next((o for o in graph.output if o.name == output_name), None)
    if target is None:
        raise ModelError(f"top_candidates_model: no output {output_name!r} in the model.")
    dims = target.type.tensor_type.shape.dim
    rows, anchors = (dims[1].dim_value, dims[2].dim_value) if len(dims) == 3 else (0, 0)
    if not rows or num_classes < 1 or rows < 4 + num_classes:
        raise ModelError("top_candidates_model: the output must be [B, 4 + C + K*D, A] with "
                         f"static channels; got {len(dims)} dims.")
    if anchors:
        k = min(k, anchors)
    full = output_name + "_all_anchors"
    for node in graph.node:  # the model's own output becomes an internal tensor
        node.output[:] = [full if o == output_name else o for o in node.output]
        node.input[:] = [full if i == output_name else i for i in node.input]
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    name = output_name + "_top"

    def const(suffix: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64),
                                                         f"{name}_{suffix}"))
        return f"{name}_{suffix}"

    scores_max = (
        helper.make_node("ReduceMax", [f"{name}_cls", const("axis", [1])], [f"{name}_conf"],
                         keepdims=1) if opset >= 18
        else helper.make_node("ReduceMax", [f"{name}_cls"], [f"{name}_conf"], axes=[1],
                              keepdims=1)
    )
    keep: list[Any] = []  # nodes that make TopK's K when the anchors are not static
    k_name = k_const = const("k", [k])
    if not anchors:  # a dynamic-shape export (e.g. Ultralytics' dynamic=True): K = min(k, A)
        k_name = f"{name}_k_min"
        keep = [
            helper.make_node("Shape", [full], [f"{name}_shape"]),
            helper.make_node("Gather", [f"{name}_shape", const("anchor_axis", [2])],
                             [f"{name}_anchors"], axis=0),
            helper.make_node("Cast", [f"{name}_anchors"], [f"{name}_anchors_f"],
                             to=TensorProto.FLOAT),  # Min takes int64 only from opset 12
            helper.make_node("Cast", [k_const], [f"{name}_k_f"], to=TensorProto.FLOAT),
            helper.make_node("Min", [f"{name}_anchors_f", f"{name}_k_f"], [f"{name}_k_min_f"]),
            helper.make_node("Cast", [f"{name}_k_min_f"], [k_name], to=TensorProto.INT64),
        ]
    graph.node.extend([
        *keep,
        helper.make_node("Slice", [full, const("start", [4]), const("end", [4 + num_classes]),
                                   const("axes", [1])], [f"{name}_cls"]),
        scores_max,  # [B, 1, A]: each anchor's best class score
        helper.make_node("TopK", [f"{name}_conf", k_name],
                         [f"{name}_vals", f"{name}_idx"], axis=2, largest=1, sorted=1),
        helper.make_node("Expand", [f"{name}_idx", const("rows", [1, rows, 1])],
                         [f"{name}_idx_rows"]),
        helper.make_node("GatherElements", [full, f"{name}_idx_rows"], [output_name], axis=2),
    ])
    batch = dims[0].dim_param or dims[0].dim_value or None
    new_output = helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                               [batch, rows, k if anchors else "top_anchors"])
    outputs = [new_output if o.name == output_name else o for o in graph.output]
    del graph.output[:]
    graph.output.extend(outputs)
    meta = {p.key: p.value for p in m.metadata_props}
    meta[TOP_CANDIDATES_KEY] = f"{k} of {anchors}" if anchors else str(k)
    del m.metadata_props[:]
    helper.set_model_props(m, meta)
    onnx.checker.check_model(m)
    return m


def tensorrt_provider(
    cache_dir: Path,
    fp16: bool = True,
    workspace_gb: float = 4.0,
    device_id: int = 0,
    cuda_graph: bool = False,
    profile: tuple[str, str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """TensorRT execution provider options: fp16, engine and timing caches in ``cache_dir``.

    ``profile`` = (min, opt, max) shapes as ORT writes them (``"images:1x640x640x3"``), for a
    model with a dynamic batch (an engine for the whole range, built once).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": int(workspace_gb * 2**30),
        "trt_builder_optimization_level": 3,
    }
    if cuda_graph:
        opts["trt_cuda_graph_enable"] = True
    if profile is not None:
        opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], \
            opts["trt_profile_max_shapes"] = profile
    return TENSORRT, opts


def cuda_provider(device_id: int = 0, cuda_graph: bool = False) -> tuple[str, dict[str, Any]]:
    opts: dict[str, Any] = {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    if cuda_graph:
        opts["enable_cuda_graph"] = True
    return CUDA, opts


def tensorrt_version() -> str | None:
    """The version of the TensorRT library that loads here (``getInferLibVersion``, e.g.
    ``101300`` for 10.13.0), or None without one."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = getattr(lib, "getInferLibVersion", None)
        if version is None:
            return None
        version.restype = ctypes.c_int32
        return str(version())
    return None


def gpu_models(root: Path = Path("/proc/driver/nvidia/gpus")) -> tuple[str, ...]:
    """The model names of the NVIDIA GPUs the driver lists (its ``information`` files)."""
    names: list[str] = []
    for info in sorted(root.glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                names.append(line.split(":", 1)[1].strip())
    return tuple(names)


def engine_cache_key(model: Path | bytes, options: dict[str, Any]) -> str:
    """What an engine depends on: the model bytes, the provider settings (not the cache
    paths), the ONNX Runtime and TensorRT versions and the GPUs (an engine built by another
    TensorRT or for another GPU does not load)."""
    import onnxruntime as ort

    h = hashlib.sha256(model.read_bytes() if isinstance(model, Path) else model)
    settings = {k: v for k, v in options.items() if not k.endswith("_path")}
    h.update(repr(sorted(settings.items())).encode())
    h.update(ort.__version__.encode())
    h.update(repr((tensorrt_version(), gpu_models())).encode())
    return h.hexdigest()[:16]


def keyed_tensorrt_provider(
    model: Path | bytes, cache_root: Path, **kwargs: Any
) -> tuple[tuple[str, dict[str, Any]], Path]:
    """:func:`tensorrt_provider` with its caches in ``cache_root/<engine_cache_key>``."""
    name, opts = tensorrt_provider(cache_root, **kwargs)
    key_dir = cache_root / engine_cache_key(model, opts)
    key_dir.mkdir(parents=True, exist_ok=True)
    opts["trt_engine_cache_path"] = str(key_dir)
    opts["trt_timing_cache_path"] = str(key_dir)
    return (name, opts), key_dir


def engine_cached(key_dir: Path) -> bool:
    return any(key_dir.glob("*.engine"))


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
    key_dir: Path | None = None
    for p in providers:
        if p == "tensorrt":
            provider, key_dir = keyed_tensorrt_provider(model_path, cache_dir, fp16=fp16)
            chosen.append(provider)
        elif p == "cuda":
            chosen.append(cuda_provider())
        else:
            chosen.append("CPUExecutionProvider")
    building = key_dir is not None and not engine_cached(key_dir)
    if building:
        log.info("building a TensorRT engine for %s (fp16=%s); this takes a minute or more, "
                 "once: it is cached in %s", model_path, fp16, key_dir)
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                   providers=chosen, enable_fallback=0)
    if building:
        log.info("TensorRT engine for %s ready in %.1f s", model_path, time.perf_counter() - t0)
    return session


class BoundRunner:
    """``run(feeds) -> outputs`` through IO binding: each input bound from host memory and
    each output to host memory, so ONNX Runtime copies the batch to ``device`` once and the
    outputs back once, both inside ``run_with_iobinding``, which releases the GIL (an
    input made a device OrtValue first, ``OrtValue.ortvalue_from_numpy(x, "cuda")``, would
    copy it while holding the GIL: at 32 frames of 640 a batch, 39 MB).  ``device`` is
    kept for the log and the API; the binding itself does not name it."""

    def __init__(self, session: Any, device: str = "cuda", device_id: int = 0) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return [np.asarray(o) for o in binding.copy_outputs_to_cpu()]


def static_shape(shape: Sequence[Any]) -> tuple[int, ...] | None:
    """The shape when every dim is a positive int, else None."""
    dims = tuple(shape)
    if all(isinstance(d, int) and d > 0 for d in dims):
        return dims  # type: ignore[return-value]
    return None


class GraphRunner:
    """IO binding on fixed device buffers (what CUDA graphs need): bound once, inputs
    updated in place, the captured graph replayed each run.  All shapes must be static."""

    def __init__(self, session: Any, device: str = "cuda", device_id: int = 0) -> None:
        import onnxruntime as ort

        self.session = session
        self._binding = session.io_binding()
        self._inputs: dict[str, Any] = {}
        self._outputs: list[Any] = []
        self._lock = threading.Lock()
        for arg, is_input in [(a, True) for a in session.get_inputs()] + [
                (a, False) for a in session.get_outputs()]:
            shape = static_shape(arg.shape or ())
            dtype = _ORT_NUMPY.get(arg.type)
            if shape is None or dtype is None:
                raise ModelError(
                    f"CUDA graphs need static shapes and plain tensor types; "
                    f"{'input' if is_input else 'output'} {arg.name!r} is {arg.type} {arg.shape}."
                )
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
            if is_input:
                self._inputs[arg.name] = value
                self._binding.bind_ortvalue_input(arg.name, value)
            else:
                self._outputs.append(value)
                self._binding.bind_ortvalue_output(arg.name, value)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:  # one set of device buffers
            for name, value in feeds.items():
                self._inputs[name].update_inplace(np.ascontiguousarray(value))
            self.session.run_with_iobinding(self._binding)
            return [np.asarray(o) for o in self._binding.copy_outputs_to_cpu()]


class DeviceRunner:
    """``run(feeds, n) -> (outputs, model seconds, runs)`` over a batch on the device.

    A fixed-batch model runs in padded chunks of its batch size; a dynamic one in one run,
    or in chunks of ``max_chunk`` (the TensorRT profile's largest batch).  ``mode`` is
    ``graph`` (:class:`GraphRunner`), ``bound`` (:class:`BoundRunner`) or ``plain``
    (``session.run``).
    """

    def __init__(
        self,
        session: Any,
        name: str,
        mode: str,
        fixed_batch: int | None,
        max_chunk: int | None = None,
        device: str = "cuda",
        device_id: int = 0,
    ) -> None:
        self.session = session
        self.name = name
        self.mode = mode
        self.fixed_batch = fixed_batch
        self.max_chunk = max_chunk
        output_names = [o.name for o in session.get_outputs()]
        self._call: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
        if mode == "graph":
            self._call = GraphRunner(session, device, device_id).run
        elif mode == "bound":
            self._call = BoundRunner(session, device, device_id).run
        else:
            self._call = lambda feeds: session.run(output_names, feeds)

    def run(self, feeds: dict[str, np.ndarray], n: int) -> tuple[list[np.ndarray], float, int]:
        chunk = max(1, self.fixed_batch or (min(n, self.max_chunk) if self.max_chunk else n))
        return run_chunks(
            self._call, feeds, n, chunk, pad=bool(self.fixed_batch),
            model=self.name, how=f"{self.mode} run on the device",
        )


def run_chunks(
    call: Callable[[dict[str, np.ndarray]], Sequence[Any]],
    feeds: dict[str, np.ndarray],
    n: int,
    chunk: int,
    *,
    pad: bool,
    model: str,
    how: str | None = None,
) -> tuple[list[np.ndarray], float, int]:
    """``call`` over the first ``n`` rows of ``feeds`` in chunks of ``chunk`` rows (the last
    one zero-padded to ``chunk`` when ``pad``); returns the outputs (first n rows), the
    seconds spent in ``call`` and the number of calls.  A failing call raises ModelError
    naming ``model`` (and ``how`` it ran)."""
    pieces: list[list[np.ndarray]] = []
    model_s = 0.0
    for start in range(0, n, chunk):
        part = {
            k: _pad(v[start:start + chunk], chunk) if pad else v[start:start + chunk]
            for k, v in feeds.items()
        }
        t = time.perf_counter()
        try:
            out = call(part)
        except Exception as exc:  # ORT raises its own RuntimeError subclasses
            rows = next(iter(part.values())).shape[0]
            raise ModelError(
                f"Model {model!r} failed to run on a batch of {rows} "
                f"({how + ': ' if how else ''}{type(exc).__name__}: {str(exc).strip()[:300]})."
            ) from exc
        model_s += time.perf_counter() - t
        pieces.append([np.asarray(o) for o in out])
    if len(pieces) == 1:
        return [o[:n] for o in pieces[0]], model_s, 1
    merged = [np.concatenate([p[i] for p in pieces])[:n] for i in range(len(pieces[0]))]
    return merged, model_s, len(pieces)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])
