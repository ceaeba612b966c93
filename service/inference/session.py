"""One ONNX Runtime session per model: providers, threads, warm-up, batched predict.

``OrtModel(path, config).predict(images) -> list[Detections]``.  The provider that
actually runs is checked after the session is built (ONNX Runtime silently falls
back to the CPU when a GPU provider fails to load), logged at INFO, exposed as
``provider`` and set on the ``inference_provider`` metric.

When TensorRT or CUDA is asked for and an NVIDIA driver is present,
:func:`open_model_session` takes the GPU fast path (``config.gpu``, service/inference/gpu.py):
TensorRT options (fp16, engine cache), the uint8-input graph for float NCHW models, and
:class:`~service.inference.gpu.DeviceRunner` (IO binding, CUDA graphs) for the runs;
``OrtModel.device_setup`` says what is on.  On the CPU none of it is built and a batch
runs through :func:`run_in_batches` as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig, InputOverride
from service.inference.adapters import Adapter, UltralyticsPoseAdapter, build_adapter
from service.inference.config import PROVIDER_ALIASES, GpuConfig, InferenceConfig
from service.inference.cpu_graph import CpuGraph, cpu_graph, describe_rewrites
from service.inference.gpu import DeviceRunner, run_chunks
from service.inference.metadata import ModelInfo, model_info_from_session, read_model_info
from service.inference.openvino import OPENVINO, OpenVinoSession
from service.inference.preprocess import Transform
from service.telemetry import metrics

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU = "CPUExecutionProvider"
CPU_RUNTIMES = (CPU, OPENVINO)  # the providers that run on the CPU's cores


@dataclass(frozen=True, slots=True)
class RunTiming:
    """Timing of the last ``predict`` call (seconds)."""

    batch_size: int
    runs: int  # session.run calls (1 when the batch dimension is dynamic)
    model_s: float  # session.run only, summed over runs
    preprocess_s: float
    postprocess_s: float

    @property
    def model_ms_per_image(self) -> float:
        return 1000.0 * self.model_s / max(1, self.batch_size)


def nvidia_driver_present() -> bool:
    """False on Linux when no NVIDIA driver is loaded (GPU providers cannot work)."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def _loads(candidates: Sequence[str]) -> bool:
    """Whether one of the shared libraries ``candidates`` (names or paths) loads."""
    import ctypes

    for name in candidates:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def tensorrt_runtime_present() -> bool:
    """Whether TensorRT's own library loads here.  onnxruntime-gpu lists the TensorRT
    provider whether or not TensorRT is installed; without libnvinfer the provider
    fails when a session is made, so ``auto`` leaves it out."""
    return _loads(("libnvinfer.so.10", "libnvinfer.so"))


def cudnn_runtime_present() -> bool:
    """Whether cuDNN 9 loads here (from the library path, or the ``nvidia-cudnn`` wheel's
    directory).  onnxruntime-gpu loads cuDNN only when an operator first needs it: without
    it a CUDA session is made and then fails at its first convolution, so ``auto`` leaves
    the CUDA provider out."""
    in_wheels = [Path(p) / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9" for p in sys.path if p]
    return _loads(("libcudnn.so.9", "libcudnn.so", *(str(f) for f in in_wheels if f.is_file())))


def resolve_providers(
    requested: str | Sequence[str], available: Sequence[str], gpu_present: bool
) -> list[str]:
    """The provider list to ask ONNX Runtime for, best first, CPU last when allowed."""
    if isinstance(requested, str):
        if requested != "auto":
            requested = [requested]
        else:
            gpus = [p for p in GPU_PROVIDERS if p in available] if gpu_present else []
            if GPU_PROVIDERS[0] in gpus and not tensorrt_runtime_present():
                log.info("TensorRT's library (libnvinfer) does not load here: "
                         "providers auto uses CUDA without TensorRT")
                gpus.remove(GPU_PROVIDERS[0])
            if GPU_PROVIDERS[1] in gpus and not cudnn_runtime_present():
                log.warning("cuDNN 9 (libcudnn.so.9) does not load here: providers auto "
                            "leaves the CUDA provider out (install cuDNN 9 for CUDA 13, or "
                            "put its lib directory on LD_LIBRARY_PATH)")
                gpus.remove(GPU_PROVIDERS[1])
            return [*gpus, CPU]
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    if not names:
        raise ModelError("The model's provider list is empty; use 'auto' or name at least one.")
    if OPENVINO in names[1:]:
        raise ModelError(
            "openvino replaces ONNX Runtime for the model, so it can only come first in the "
            f"provider list (e.g. [openvino, cpu]); got [{', '.join(requested)}]."
        )
    missing = [p for p in names if p not in available and p != OPENVINO]
    if missing:
        raise ModelError(
            f"Execution provider(s) {', '.join(missing)} are not in this ONNX Runtime build; "
            f"available: {', '.join(available)}. Use providers: auto, or one of those."
        )
    return names


HEAVY_MODEL_MS = 15.0  # per image: above it a model gets every core (intra_op_threads: 0)
AUTO_INSTANCES = 2  # sessions of a heavy CPU model with ``instances: auto``


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_intra_op_threads() -> int:
    """Threads for ``intra_op_threads: 0``: every usable core but one (at least one),
    or, for a heavy model, every core split between its instances
    (:meth:`OrtModel._fit_to_cores`).

    The spare core runs what the model thread does not: capture and decoding,
    preprocessing the next batch, and the stages (tracking, poses, rules, messages)
    of the last one, which all overlap the model (service.pipeline).  On a 2-core
    machine one model thread plus that core outruns two model threads competing
    with them (docs/benchmarks.md).
    """
    return max(1, usable_cores() - 1)


def _session_options(config: InferenceConfig) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = config.intra_op_threads or auto_intra_op_threads()
    so.inter_op_num_threads = config.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; the provider outcome is logged by us
    if not config.spin_wait:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def open_session(
    path: Path, config: InferenceConfig, *, cuda_graphs: bool = False
) -> OpenedSession:
    """A session of the model as :class:`OrtModel` opens it (TensorRT options, the
    uint8-input graph, CUDA graphs only with ``cuda_graphs``: a plain ``session.run``
    loop cannot feed a captured graph, a :class:`DeviceRunner` in ``graph`` mode can),
    for loops outside the pipeline (the bench's bare loop)."""
    return open_model_session(path, config, cuda_graphs=cuda_graphs)


@dataclass(frozen=True, slots=True)
class DeviceSetup:
    """How a model runs on its GPU provider (``OrtModel.device_setup``; None on the CPU)."""

    provider: str
    device: str  # OrtValue device: "cuda" ("cpu" only in tests)
    device_id: int
    uint8_input: bool  # the uint8 NHWC graph: normalisation and layout change on the device
    io_binding: bool
    fp16: bool  # a TensorRT fp16 engine
    cuda_graphs: bool
    engine_cache_dir: Path | None  # this model's TensorRT cache directory
    profile_max_batch: int | None  # TensorRT's optimisation profile for a dynamic batch
    notes: tuple[str, ...] = ()  # why something asked for is off
    candidates: int | None = None  # anchors per image kept on the device (Ultralytics raw)

    @property
    def runner_mode(self) -> str:
        """How a :class:`DeviceRunner` runs the session: ``graph`` (fixed device buffers,
        the captured CUDA graph replayed), ``bound`` (IO binding) or ``plain``."""
        return "graph" if self.cuda_graphs else "bound" if self.io_binding else "plain"

    def describe(self) -> str:
        def on(flag: bool) -> str:
            return "on" if flag else "off"

        text = (f"io_binding {on(self.io_binding)}, fp16 {on(self.fp16)}, cuda_graphs "
                f"{on(self.cuda_graphs)}, uint8 input on the device {on(self.uint8_input)}")
        if self.candidates is not None:
            text += f", best {self.candidates} anchors an image chosen on the device"
        if self.engine_cache_dir is not None:
            text += f", engine cache {self.engine_cache_dir}"
        return text + "".join(f"; {n}" for n in self.notes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for the API)."""
        return {
            "provider": self.provider, "device_id": self.device_id,
            "uint8_input": self.uint8_input, "io_binding": self.io_binding, "fp16": self.fp16,
            "cuda_graphs": self.cuda_graphs, "candidates": self.candidates,
            "engine_cache_dir": str(self.engine_cache_dir) if self.engine_cache_dir else None,
            "notes": list(self.notes),
        }


def _device_for(provider: str, driver: bool) -> str | None:
    """The OrtValue device of the GPU fast path for ``provider``; None: the plain CPU path.

    (Tests replace this to run the fast path's wiring on the CPU.)
    """
    return "cuda" if driver and provider in GPU_PROVIDERS else None


def device_input_allowed(override: InputOverride) -> bool:
    """False when the config overrides how the input is converted (layout, color, dtype,
    normalisation): the uint8-input graph follows the file's own input spec only."""
    return all(getattr(override, k) is None
               for k in ("layout", "color", "dtype", "normalization", "mean", "std"))


def check_cuda_graphs(info: ModelInfo, gpu: GpuConfig, name: str) -> None:
    """Refuse ``gpu.cuda_graphs`` for a model with a dynamic batch (its shapes vary)."""
    if gpu.cuda_graphs and info.dynamic_batch:
        dim = info.inputs[0].shape[0] if info.inputs and info.inputs[0].shape else None
        raise ModelError(
            f"Model {name!r}: gpu.cuda_graphs needs a fixed batch size, but "
            f"{str(info.path)!r} has a dynamic batch dimension ({dim!r}). Export it with a "
            "static batch (e.g. Ultralytics: export(format='onnx', batch=8, dynamic=False)) "
            "or set gpu.cuda_graphs: false."
        )


def _uint8_wrappable(info: ModelInfo) -> bool:
    spec = info.input
    return (spec.layout == "NCHW" and spec.dtype == "float32" and spec.normalization == "unit"
            and spec.color != "GRAY"  # converted to gray on the host
            and len(info.inputs) == 1 and info.inputs[0].dtype == "float32")


def _uint8_graph(path: Path, info: ModelInfo) -> Any:
    """The model file with the uint8 NHWC input graph in front (an ``onnx.ModelProto``),
    for a float NCHW model that :func:`_uint8_wrappable` accepts."""
    import onnx

    from service.inference.gpu import uint8_input_model

    spec = info.input
    return uint8_input_model(onnx.load(str(path)), spec.name, bgr_to_rgb=spec.color == "RGB",
                             size=(spec.height, spec.width))


def _candidates(info: ModelInfo, wanted: int) -> int | None:
    """How many anchors an image the device keeps of a raw Ultralytics output (None: the
    output is not one, has no more anchors than that, or ``wanted`` is 0)."""
    if not wanted or not info.outputs or not UltralyticsPoseAdapter.accepts(info).accepted:
        return None
    channels, anchors = info.outputs[0].shape[1], info.outputs[0].shape[2]
    if not isinstance(channels, int) or (isinstance(anchors, int) and anchors <= wanted):
        return None  # a dynamic anchor count (a dynamic-shape export): the graph takes min(k, A)
    return max(wanted, channels + 1)  # still more anchors than channels: [B, 4+C+K*D, A]


@dataclass(frozen=True, slots=True)
class DeviceGraph:
    """The model as the GPU path runs it: ``graph`` (an ``onnx.ModelProto``; None when the
    file runs unchanged), whether it takes uint8 frames, and the anchors it keeps."""

    graph: Any
    uint8_input: bool
    candidates: int | None


def device_graph(path: Path, info: ModelInfo, gpu: GpuConfig) -> DeviceGraph:
    """What ``gpu`` makes of the model file: the uint8 NHWC input graph in front (a float
    NCHW model, ``uint8_input``), each image's best anchors chosen at the end (a raw
    Ultralytics output, ``max_candidates``)."""
    import onnx

    from service.inference.gpu import top_candidates_model

    uint8 = gpu.uint8_input and _uint8_wrappable(info)
    candidates = _candidates(info, gpu.max_candidates)
    if not uint8 and candidates is None:
        return DeviceGraph(None, False, None)
    graph = _uint8_graph(path, info) if uint8 else onnx.load(str(path))
    out = info.outputs[0]
    channels = out.shape[1]
    if candidates is not None and isinstance(channels, int):
        k, d = info.kpt_shape or (0, 3)
        graph = top_candidates_model(graph, out.name, channels - 4 - k * d, candidates)
    return DeviceGraph(graph, uint8, candidates)


class SessionRefused(ModelError):
    """ONNX Runtime could not create a session on the providers asked for."""


def _create_session(
    model: str | bytes, so: Any, providers: Sequence[Any], path: Path
) -> Any:
    """An ORT session on exactly ``providers`` (with their options), or SessionRefused.

    ONNX Runtime's own fallback is off: on a failure to create the session it would retry
    on CUDA/CPU *without the provider options* (device_id, CUDA graphs, ...), and on a
    provider failure during a run it would switch the session to the CPU, both with a
    message on stdout only.  The caller decides what to try next instead."""
    import onnxruntime as ort

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):  # keep stdout clean for --json output
            session = ort.InferenceSession(model, sess_options=so, providers=list(providers),
                                           enable_fallback=0)
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, ...
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        hint = (f"Check that the libraries of {names[0]} load here (CUDA, cuDNN, TensorRT)"
                if names and names[0] != CPU else "Is it a complete, valid ONNX file exported "
                "for opset <= the installed runtime supports?")
        raise SessionRefused(
            f"Model file {str(path)!r} could not be loaded by ONNX Runtime on "
            f"{', '.join(names)} ({type(exc).__name__}: {str(exc).strip()[:300]}). {hint}"
        ) from exc
    if captured.getvalue().strip():
        log.info("onnxruntime: %s", " ".join(captured.getvalue().split()))
    return session


class OpenedSession(NamedTuple):
    """What :func:`open_model_session` built: the session (ORT's, or OpenVINO's), the
    providers asked for, the GPU fast path's setup (None off the GPU) and the CPU graph
    rewrites made (empty unless ONNX Runtime's CPU provider runs a rewritten graph)."""

    session: Any
    requested: list[str]
    setup: DeviceSetup | None
    cpu_rewrites: dict[str, int]


def open_model_session(
    path: Path, config: InferenceConfig, *, cuda_graphs: bool = True
) -> OpenedSession:
    """The ORT session, the requested providers and, on a GPU provider, the fast path's
    setup (None on the CPU: the session is built exactly as without a GPU)."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError(
            f"Model file {str(path)!r} does not exist. Check the path given to --model "
            "(relative to the working directory) or a model's path in the config (relative "
            "to the config file's directory)."
        )
    gpu = nvidia_driver_present()
    requested = resolve_providers(config.providers, ort.get_available_providers(), gpu)
    if config.providers == "auto" and not gpu:
        log.debug("no NVIDIA driver found: skipping GPU execution providers")
    if requested[0] == OPENVINO:
        try:
            session = open_openvino(path, config)
        except ModelError as exc:
            if len(requested) == 1:
                raise
            log.warning("model %s: OpenVINO cannot run it (%s); falling back to %s",
                        path, exc, ", ".join(requested[1:]))
            config = config.model_copy(update={"providers": requested[1:]})
            fallback = open_model_session(path, config, cuda_graphs=cuda_graphs)
            return fallback._replace(requested=requested)
        return OpenedSession(session, requested, None, {})
    return _open_first_that_works(path, config, requested, gpu, cuda_graphs)


def _open_first_that_works(
    path: Path, config: InferenceConfig, requested: list[str], gpu: bool, graphs_ok: bool
) -> OpenedSession:
    """The session on the first provider of ``requested`` that can create it: the GPU
    fast path on a GPU provider, else the plain CPU path.  A provider that cannot
    (TensorRT without libnvinfer, an engine that fails to build, ...) is dropped with a
    warning and the next one is tried with its own options."""
    providers = requested
    while True:
        device = _device_for(providers[0], gpu)
        try:
            if device is None:
                opened = _open_on_cpu(path, config, requested, providers)
            else:
                opened = _open_on_device(path, config, providers, device, graphs_ok)
            return opened._replace(requested=requested)
        except SessionRefused as exc:
            rest = providers[1:]
            if not rest:
                raise
            log.warning("model %s: %s could not run it (%s); trying %s", path, providers[0],
                        exc, ", ".join(rest))
            providers = rest


def _open_on_cpu(
    path: Path, config: InferenceConfig, requested: list[str], providers: list[str]
) -> OpenedSession:
    """ONNX Runtime on the CPU provider (``providers``), on the rewritten graph
    (``config.cpu_rewrites``, service/inference/cpu_graph.py) when any rewrite applies."""
    rewritten = cpu_graph(path) if config.cpu_rewrites else CpuGraph(None, {})
    refused: ModelError | None = None
    if rewritten.model is not None:
        try:
            session = _create_session(rewritten.model, _session_options(config), providers, path)
            return OpenedSession(session, requested, None, rewritten.rewrites)
        except ModelError as exc:  # never refuse a file over a rewrite: run it as it is
            refused = exc
    session = _create_session(str(path), _session_options(config), providers, path)
    if refused is not None:
        log.warning("model %s: ONNX Runtime refused the rewritten graph (%s); running the "
                    "file as it is (set cpu_rewrites: false to skip the rewrites)", path, refused)
    return OpenedSession(session, requested, None, {})


def open_openvino(path: Path, config: InferenceConfig) -> OpenVinoSession:
    """The model compiled by OpenVINO for the CPU (``providers: [openvino, ...]``).

    With ``openvino.uint8_input`` a float NCHW model gets the uint8 NHWC input graph (as
    on the GPU): frames go in as uint8 and OpenVINO converts them inside the compiled
    model (YOLO11n-pose at 640: 2-3 ms less CPU a frame, ~7 % on bf16).
    """
    info = read_model_info(path)
    model: bytes | None = None
    if config.openvino.uint8_input and _uint8_wrappable(info):
        from service.inference.metadata import model_info_from_proto

        wrapped = _uint8_graph(path, info)
        model, info = wrapped.SerializeToString(), model_info_from_proto(path, wrapped)
    session = OpenVinoSession(path, info, model=model, precision=config.openvino.precision,
                              threads=config.intra_op_threads or auto_intra_op_threads())
    if session.precision != session.requested_precision:
        log.warning("model %s: OpenVINO runs %s, not the %s asked for (this CPU lacks it)",
                    path, session.precision, session.requested_precision)
    log.debug("model %s: %s, compiled in %.2f s", path, session.describe(), session.compile_s)
    return session


def session_model_info(path: Path, session: Any) -> ModelInfo:
    """The model's tensors and metadata from its session (either runtime)."""
    if isinstance(session, OpenVinoSession):
        return session.model_info
    return model_info_from_session(path, session)


def _open_on_device(
    path: Path, config: InferenceConfig, requested: list[str], device: str, graphs_ok: bool
) -> OpenedSession:
    """The GPU fast path: TensorRT/CUDA options, the uint8 graph, CUDA graphs if static."""
    from service.inference import gpu as g

    opts = config.gpu
    info = read_model_info(path)
    check_cuda_graphs(info, opts, path.stem)
    notes: list[str] = []
    on_device = device_graph(path, info, opts)
    wrap, candidates = on_device.uint8_input, on_device.candidates
    model: str | bytes = str(path)
    model_bytes: Path | bytes = path
    if on_device.graph is not None:
        model = model_bytes = on_device.graph.SerializeToString()
    graphs = opts.cuda_graphs and graphs_ok
    if graphs:
        dynamic = [t.describe() for t in (*info.inputs, *info.outputs)
                   if g.static_shape(t.shape) is None]
        if dynamic:
            graphs = False
            notes.append(f"cuda_graphs off: dynamic shapes ({'; '.join(dynamic)})")
    profile = None
    in_name = info.input.name + ("_uint8_nhwc" if wrap else "")
    input_dims = info.inputs[0].shape if info.inputs else ()
    if g.static_shape(input_dims) is None:
        h, w = info.input.height, info.input.width
        nhwc = wrap or info.input.layout == "NHWC"

        def shape(b: int) -> str:
            dims = (b, h, w, 3) if nhwc else (b, 3, h, w)
            return f"{in_name}:{'x'.join(map(str, dims))}"

        b_max = config.max_batch if info.dynamic_batch else (info.fixed_batch or 1)
        profile = (shape(1 if info.dynamic_batch else b_max), shape(b_max), shape(b_max))
    providers: list[Any] = []
    key_dir: Path | None = None
    for name in requested:
        if name == g.TENSORRT:
            provider, key_dir = g.keyed_tensorrt_provider(
                model_bytes, (opts.engine_cache_dir or g.default_engine_cache_dir()).expanduser(),
                fp16=opts.fp16, workspace_gb=opts.workspace_gb, device_id=opts.device_id,
                cuda_graph=graphs, profile=profile,
            )
            providers.append(provider)
        elif name == g.CUDA:
            providers.append(g.cuda_provider(opts.device_id, cuda_graph=graphs))
        else:
            providers.append(name)
    if key_dir is not None and isinstance(model, bytes):
        # TensorRT names its engine files after the model path: load the graph from a file.
        target = key_dir / "model-uint8.onnx"
        if not target.is_file() or target.read_bytes() != model:
            target.write_bytes(model)
        model = str(target)
    building = key_dir is not None and not g.engine_cached(key_dir)
    if building:
        log.info("building a TensorRT engine for %s (fp16=%s); this takes a minute or more, "
                 "once: it is cached in %s", path, opts.fp16, key_dir)
    t0 = time.perf_counter()
    so = _session_options(config)
    try:
        session = _create_session(model, so, providers, path)
    except SessionRefused as exc:
        if not graphs:
            raise
        providers = [(p[0], {k: v for k, v in p[1].items()
                             if k not in ("trt_cuda_graph_enable", "enable_cuda_graph")})
                     if isinstance(p, tuple) else p for p in providers]
        # raises when the graphs were not what the provider refused
        session = _create_session(model, _session_options(config), providers, path)
        log.warning("model %s: CUDA graphs could not be enabled (%s); running without them",
                    path, exc)
        notes.append("cuda_graphs off: the session refused them (see the log)")
        graphs = False
    active = session.get_providers()[0]
    if building and active == g.TENSORRT:
        log.info("TensorRT engine for %s ready in %.1f s", path, time.perf_counter() - t0)
    if _device_for(active, True) is None and device != "cpu":
        # fell back to the CPU: run the plain CPU session, exactly as without a GPU
        if CPU in requested:
            return _open_on_cpu(path, config, requested, [CPU])
        return OpenedSession(session, requested, None, {})
    setup = DeviceSetup(
        provider=active, device=device, device_id=opts.device_id, uint8_input=wrap,
        io_binding=opts.io_binding, fp16=opts.fp16 and active == g.TENSORRT,
        cuda_graphs=graphs, engine_cache_dir=key_dir if active == g.TENSORRT else None,
        profile_max_batch=(config.max_batch if active == g.TENSORRT and info.dynamic_batch
                           else None),
        notes=tuple(notes), candidates=candidates,
    )
    return OpenedSession(session, requested, setup, {})


@dataclass(frozen=True, slots=True)
class _Instance:
    """One session of a model and, on a GPU, its device runner."""

    session: Any
    runner: DeviceRunner | None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A preprocessed batch: ``n`` images, the session feeds, one transform per input."""

    n: int
    feeds: dict[str, np.ndarray]
    transforms: list[Transform]
    prepare_s: float


@dataclass(frozen=True, slots=True)
class Inferred:
    """A batch after ``session.run``: its raw outputs (first rows only)."""

    prepared: Prepared
    outputs: list[np.ndarray]
    model_s: float
    runs: int


class OrtModel:
    """A loaded, warmed-up model: ``predict(images) -> list[Detections]``."""

    def __init__(
        self,
        path: str | Path,
        config: InferenceConfig | None = None,
        name: str | None = None,
        settings: AdapterConfig | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config or InferenceConfig()
        self.settings = settings or AdapterConfig()
        self.name = name or self.path.stem
        session_config = self.config
        if not device_input_allowed(self.settings.input):
            session_config = self.config.model_copy(update={
                "gpu": self.config.gpu.model_copy(update={"uint8_input": False}),
                "openvino": self.config.openvino.model_copy(update={"uint8_input": False}),
            })
        self._session_config = session_config
        self._session, requested, self.device_setup, self.cpu_rewrites = open_model_session(
            self.path, session_config
        )
        self._providers: tuple[str, ...] = tuple(self._session.get_providers())
        self._check_provider(requested)
        self.info: ModelInfo
        self.adapter: Adapter
        self.info, self.adapter, choice = build_adapter(
            session_model_info(self.path, self._session), self.settings,
            self.config.score_threshold, self.config.max_detections,
        )
        check_cuda_graphs(self.info, self.config.gpu, self.name)
        self.adapter_reason = choice.reason
        self._before_warm_up()
        self._output_names = [o.name for o in self.info.outputs]
        self.last_timing = RunTiming(0, 0, 0.0, 0.0, 0.0)
        runner = (None if self.device_setup is None
                  else self._make_device_runner(self._session, self.device_setup))
        self._instances = [_Instance(self._session, runner)]
        self._pool: queue.Queue[_Instance] = queue.Queue()  # the instances not running
        self._pool.put(self._instances[0])
        self.instances = 1
        self.intra_op_threads = self.config.intra_op_threads or auto_intra_op_threads()
        self.spin_wait = self.config.spin_wait
        self.warmup_ms_per_image = float("inf")  # the fastest warm-up run (set by _warm_up)
        self._warm_up()
        self._fit_to_cores()
        log.info(
            "model %s (%s): provider %s, adapter %s (%s), input %dx%d %s %s, %s batch%s",
            self.name, self.path, self.provider, self.adapter.name, self.adapter_reason,
            self.info.input.width, self.info.input.height, self.info.input.layout,
            self.info.input.dtype,
            "dynamic" if self.info.dynamic_batch else f"fixed {self.info.fixed_batch}",
            f"; GPU: {self.device_setup.describe()}" if self.device_setup
            else f"; {self._session.describe()}" if isinstance(self._session, OpenVinoSession)
            else f"; CPU graph rewrites: {describe_rewrites(self.cpu_rewrites)}"
            if self.cpu_rewrites else "",
        )
        for p in (*GPU_PROVIDERS, *CPU_RUNTIMES):
            metrics.PROVIDER.labels(self.name, p).set(1.0 if p == self.provider else 0.0)
        metrics.MODEL_LOADED.labels(self.name).set(1.0)

    def _before_warm_up(self) -> None:
        """Hook for subclasses: checks that need the adapter, before the first run."""

    @property
    def uses_all_cores(self) -> bool:
        """True when one CPU session's threads take every usable core (no core is left
        for the pipeline's other threads to overlap it)."""
        return (
            self.instances == 1
            and self.provider in CPU_RUNTIMES
            and self.intra_op_threads >= usable_cores()
        )

    def _fit_to_cores(self) -> None:
        """Settle the thread and instance counts once the warm-up has timed the model.

        ``intra_op_threads: 0`` on the CPU leaves a core for the rest of the pipeline.
        A heavy model (its warm-up took over HEAVY_MODEL_MS an image) would mostly
        leave that core idle; with ``instances: auto`` it then runs as
        AUTO_INSTANCES sessions of a share of the cores each, which the inference loop
        runs side by side on consecutive batches (on 2 cores two 1-thread sessions of
        YOLO11n-pose at 640 give 1.37x the images/s of one 2-thread session: one
        operator's threads no longer wait for each other; each image takes longer).
        ``instances: 1`` keeps one session with every core, whose workers spin between
        operators (without spinning, waking them for each of a few hundred operators
        costs YOLO11n-pose at 640 about 15 % on 2 cores).  An explicit count is kept.
        """
        usable = usable_cores()
        fastest = self.warmup_ms_per_image
        heavy = (
            self.config.intra_op_threads == 0
            and self.provider in CPU_RUNTIMES
            and self.device_setup is None
            and usable >= 2
            and fastest != float("inf")
            and fastest >= HEAVY_MODEL_MS
        )
        wanted = self.config.instances
        count = (min(AUTO_INSTANCES, usable) if heavy else 1) if wanted == "auto" else wanted
        if count == 1:
            if heavy:
                log.info(
                    "model %s: %.0f ms an image on %d thread(s): heavy, so it gets all %d "
                    "cores", self.name, fastest, self.intra_op_threads, usable,
                )
                self._reopen(usable, spin=True)
            return
        threads, spin = self.intra_op_threads, self.spin_wait
        if self.config.intra_op_threads == 0 and self.provider in CPU_RUNTIMES:
            threads, spin = max(1, usable // count), False
        log.info(
            "model %s: %d instances of %d thread(s) each%s", self.name, count, threads,
            f" ({fastest:.0f} ms an image at warm-up: heavy)" if heavy else "",
        )
        if (threads, spin) != (self.intra_op_threads, self.spin_wait):
            self._reopen(threads, spin=spin)
        for _ in range(count - 1):
            self._instances.append(self._open_instance())
            self._pool.put(self._instances[-1])
        self.instances = count
        self._warm_up(every_instance=True)

    def _reopen(self, threads: int, *, spin: bool) -> None:
        """Open the (single) session again with other thread settings, and warm it up."""
        self._session_config = self._session_config.model_copy(
            update={"intra_op_threads": threads, "spin_wait": spin}
        )
        self._pool.get()
        instance = self._open_instance()
        self._session, self._instances = instance.session, [instance]
        self._pool.put(instance)
        self.intra_op_threads, self.spin_wait = threads, spin
        self._warm_up()

    def _open_instance(self) -> _Instance:
        """One more session of this model, as the first was opened (same providers,
        threads and GPU setup)."""
        opened = open_model_session(self.path, self._session_config)
        setup = opened.setup
        return _Instance(opened.session,
                         None if setup is None else self._make_device_runner(opened.session, setup))

    def _make_device_runner(self, session: Any, setup: DeviceSetup) -> DeviceRunner:
        """The device runner of ``session`` (each instance's own: CUDA graphs replay on the
        buffers they were captured with, one session's)."""
        return DeviceRunner(
            session, self.name, setup.runner_mode, self.info.fixed_batch, setup.profile_max_batch,
            setup.device, setup.device_id,
        )

    @property
    def device_runners(self) -> list[DeviceRunner]:
        """The device runner of each instance (empty on the CPU)."""
        return [i.runner for i in self._instances if i.runner is not None]

    @property
    def acceleration(self) -> dict[str, Any] | None:
        """The GPU fast path's settings as they run, OpenVINO's precision, or the graph
        rewrites ONNX Runtime's CPU runs with (None: the file runs as it is), for the API."""
        if isinstance(self._session, OpenVinoSession):
            return {"provider": OPENVINO, "precision": self._session.precision,
                    "requested_precision": self._session.requested_precision}
        if self.device_setup is None:
            return {"provider": CPU, "cpu_rewrites": self.cpu_rewrites} if self.cpu_rewrites \
                else None
        return self.device_setup.to_dict()

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        """Class and keypoint names as the adapter reports them (metadata, else config)."""
        return self.adapter.classes()

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the model (ORT may have fallen back)."""
        return self._providers[0]

    @property
    def providers(self) -> tuple[str, ...]:
        """All providers of the session, in priority order (the CPU is always last)."""
        return self._providers

    def _check_provider(self, requested: list[str]) -> None:
        if self.provider == requested[0]:
            return
        if self.config.providers == "auto":
            log.info("provider %s did not load; running on %s", requested[0], self.provider)
        elif self.provider in requested:
            log.warning("provider %s did not load; running on %s", requested[0], self.provider)
        else:
            raise ModelError(
                f"None of the requested execution providers ({', '.join(requested)}) loaded for "
                f"model {str(self.path)!r}; ONNX Runtime fell back to {self.provider}. Check the "
                "GPU driver, CUDA/cuDNN/TensorRT libraries, or add cpu to the provider list."
            )

    def _warm_up(self, *, every_instance: bool = False) -> None:
        """``warmup_runs`` runs of a blank image (of each instance: the pool hands
        its sessions out in turn)."""
        blank = np.zeros((self.info.input.height, self.info.input.width, 3), np.uint8)
        for _ in range(self.config.warmup_runs * (self.instances if every_instance else 1)):
            self._predict([blank])
            self.warmup_ms_per_image = min(
                self.warmup_ms_per_image, self.last_timing.model_ms_per_image
            )

    def predict(self, images: Sequence[ImageArray]) -> list[Detections]:
        """Run all images (HxWx3 uint8 BGR, any sizes) through the model."""
        return self._observed(images, None)

    # The three steps of ``predict``, for a loop that overlaps them on threads:
    # ``finish(infer(prepare(images)))`` is ``predict(images)``.

    def prepare(
        self, images: Sequence[ImageArray], cameras: Sequence[str | None] | None = None
    ) -> Prepared:
        """Preprocess a batch (CPU): the session feeds and each input's transform."""
        t0 = time.perf_counter()
        if not images:
            return Prepared(0, {}, [], 0.0)
        feeds, transforms = self._prepare(images, cameras)
        return Prepared(len(images), feeds, transforms, time.perf_counter() - t0)

    def infer(self, prepared: Prepared) -> Inferred:
        """Run the session on a prepared batch (observed in the metrics)."""
        inferred = self._infer(prepared)
        if prepared.n:
            metrics.INFERENCE_SECONDS.labels(self.name).observe(inferred.model_s)
            metrics.BATCH_SIZE.labels(self.name).observe(prepared.n)
        return inferred

    def finish(self, inferred: Inferred) -> list[Detections]:
        """Decode the outputs into one Detections per image, in image pixels."""
        prepared = inferred.prepared
        t0 = time.perf_counter()
        if not prepared.transforms:  # no image, or a top-down model with no ROI anywhere
            detections = [Detections.empty(self.adapter.num_keypoints) for _ in range(prepared.n)]
        else:
            detections = self.adapter.postprocess(inferred.outputs, prepared.transforms)
        self.last_timing = RunTiming(
            prepared.n, inferred.runs, inferred.model_s, prepared.prepare_s,
            time.perf_counter() - t0,
        )
        return detections

    def _infer(self, prepared: Prepared) -> Inferred:
        if not prepared.transforms:
            return Inferred(prepared, [], 0.0, 0)
        outputs, model_s, runs = self._run(prepared.feeds, len(prepared.transforms))
        self.adapter.buffers.give(prepared.feeds.values())  # run: the batch may be reused
        return Inferred(prepared, outputs, model_s, runs)

    def _observed(
        self, images: Sequence[ImageArray], cameras: Sequence[str | None] | None
    ) -> list[Detections]:
        if not images:
            return []
        return self.finish(self.infer(self.prepare(images, cameras)))

    def _prepare(
        self, images: Sequence[ImageArray], cameras: Sequence[str | None] | None
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        """Session feeds and one transform per model input (subclasses add ROIs)."""
        return self.adapter.preprocess(images)

    def _predict(
        self, images: Sequence[ImageArray], cameras: Sequence[str | None] | None = None
    ) -> list[Detections]:
        """``predict`` without metrics (warm-up)."""
        if not images:
            return []
        return self.finish(self._infer(self.prepare(images, cameras)))

    def _run(self, feeds: dict[str, np.ndarray], n: int) -> tuple[list[np.ndarray], float, int]:
        """Run a batch on a free instance (waits for one while all are busy)."""
        instance = self._pool.get()
        try:
            if instance.runner is None:
                return run_in_batches(
                    instance.session, self._output_names, feeds, n, self.info, self.name
                )
            return instance.runner.run(feeds, n)
        finally:
            self._pool.put(instance)


def run_in_batches(
    session: Any,
    output_names: list[str],
    feeds: dict[str, np.ndarray],
    n: int,
    info: ModelInfo,
    name: str,
) -> tuple[list[np.ndarray], float, int]:
    """session.run over n inputs: once if the batch is dynamic, else in padded fixed chunks.

    Returns the outputs (first n rows), the model-only seconds and the number of runs.
    """
    chunk = n if info.dynamic_batch else (info.fixed_batch or 1)
    return run_chunks(
        lambda part: session.run(output_names, part), feeds, n, chunk,
        pad=not info.dynamic_batch, model=name,
    )

