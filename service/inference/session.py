"""One ONNX Runtime session per model: providers, threads, warm-up, batched predict.

``OrtModel(path, config).predict(images) -> list[Detections]``.  The provider that
actually runs is checked after the session is built (ONNX Runtime silently falls
back to the CPU when a GPU provider fails to load), logged at INFO, exposed as
``provider`` and set on the ``inference_provider`` metric.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.adapters import Adapter, configured_adapter
from service.inference.config import PROVIDER_ALIASES, InferenceConfig
from service.inference.metadata import ModelInfo, model_info_from_session
from service.inference.preprocess import Transform
from service.telemetry import metrics

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU = "CPUExecutionProvider"


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


def resolve_providers(
    requested: str | Sequence[str], available: Sequence[str], gpu_present: bool
) -> list[str]:
    """The provider list to ask ONNX Runtime for, best first, CPU last when allowed."""
    if isinstance(requested, str):
        if requested != "auto":
            requested = [requested]
        else:
            gpus = [p for p in GPU_PROVIDERS if p in available] if gpu_present else []
            return [*gpus, CPU]
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    if not names:
        raise ModelError("The model's provider list is empty; use 'auto' or name at least one.")
    missing = [p for p in names if p not in available]
    if missing:
        raise ModelError(
            f"Execution provider(s) {', '.join(missing)} are not in this ONNX Runtime build; "
            f"available: {', '.join(available)}. Use providers: auto, or one of those."
        )
    return names


def auto_intra_op_threads() -> int:
    """Threads for ``intra_op_threads: 0``: every usable core but one (at least one).

    The spare core runs what the model thread does not: capture and decoding,
    preprocessing the next batch, and the stages (tracking, poses, rules, messages)
    of the last one, which all overlap the model (service.pipeline).  On a 2-core
    machine one model thread plus that core outruns two model threads competing
    with them (docs/benchmarks.md).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (usable or 1) - 1)


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


def open_session(path: Path, config: InferenceConfig) -> tuple[Any, list[str]]:
    """Build the ORT session; return it with the provider list that was requested."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError(
            f"Model file {str(path)!r} does not exist. Check the model path in the config "
            "(relative paths are resolved from the working directory)."
        )
    gpu = nvidia_driver_present()
    requested = resolve_providers(config.providers, ort.get_available_providers(), gpu)
    if config.providers == "auto" and not gpu:
        log.debug("no NVIDIA driver found: skipping GPU execution providers")
    captured = io.StringIO()
    try:
        # ORT prints its provider fall-back to stdout; keep stdout clean for --json output.
        with contextlib.redirect_stdout(captured):
            session = ort.InferenceSession(
                str(path), sess_options=_session_options(config), providers=requested
            )
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, ...
        raise ModelError(
            f"Model file {str(path)!r} could not be loaded by ONNX Runtime "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}). Is it a complete, valid ONNX "
            "file exported for opset <= the installed runtime supports?"
        ) from exc
    if captured.getvalue().strip():
        log.info("onnxruntime: %s", " ".join(captured.getvalue().split()))
    return session, requested


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
        self._session, requested = open_session(self.path, self.config)
        self._providers: tuple[str, ...] = tuple(self._session.get_providers())
        self._check_provider(requested)
        self.info: ModelInfo
        self.info, normalizer, choice = configured_adapter(
            model_info_from_session(self.path, self._session), self.settings
        )
        self.adapter: Adapter = choice.adapter(
            self.info, self.config.score_threshold, self.config.max_detections, self.settings,
            normalizer,
        )
        self.adapter_reason = choice.reason
        self._before_warm_up()
        self._output_names = [o.name for o in self.info.outputs]
        self.last_timing = RunTiming(0, 0, 0.0, 0.0, 0.0)
        self._warm_up()
        log.info(
            "model %s (%s): provider %s, adapter %s (%s), input %dx%d %s %s, %s batch",
            self.name, self.path, self.provider, self.adapter.name, self.adapter_reason,
            self.info.input.width, self.info.input.height, self.info.input.layout,
            self.info.input.dtype,
            "dynamic" if self.info.dynamic_batch else f"fixed {self.info.fixed_batch}",
        )
        for p in (*GPU_PROVIDERS, CPU):
            metrics.PROVIDER.labels(self.name, p).set(1.0 if p == self.provider else 0.0)
        metrics.MODEL_LOADED.labels(self.name).set(1.0)

    def _before_warm_up(self) -> None:
        """Hook for subclasses: checks that need the adapter, before the first run."""

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

    def _warm_up(self) -> None:
        blank = np.zeros((self.info.input.height, self.info.input.width, 3), np.uint8)
        for _ in range(self.config.warmup_runs):
            self._predict([blank])

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
        return run_in_batches(self._session, self._output_names, feeds, n, self.info, self.name)


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
    pieces: list[list[np.ndarray]] = []
    model_s = 0.0
    for start in range(0, n, chunk):
        part = {k: _pad_batch(v[start:start + chunk], chunk) for k, v in feeds.items()}
        t = time.perf_counter()
        try:
            out = session.run(output_names, part)
        except Exception as exc:  # ORT raises its own RuntimeError subclasses
            raise ModelError(
                f"Model {name!r} failed to run on a batch of {chunk} "
                f"({type(exc).__name__}: {str(exc).strip()[:300]})."
            ) from exc
        model_s += time.perf_counter() - t
        pieces.append([np.asarray(o) for o in out])
    if len(pieces) == 1:
        return [o[:n] for o in pieces[0]], model_s, 1
    merged = [np.concatenate([p[i] for p in pieces])[:n] for i in range(len(pieces[0]))]
    return merged, model_s, len(pieces)


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    pad = np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])
