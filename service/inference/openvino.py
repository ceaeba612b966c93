"""OpenVINO as a CPU runtime for ONNX models (``providers: [openvino, cpu]``).

On Intel CPUs OpenVINO's CPU plugin runs the same ONNX file as ONNX Runtime, and with
``openvino.precision: bf16`` on a CPU with AMX or AVX512-BF16 (Xeon 4th generation and
later) several times faster (docs/models.md, "OpenVINO"; docs/benchmarks.md).

:class:`OpenVinoSession` has the part of ``onnxruntime.InferenceSession`` that
:class:`~service.inference.session.OrtModel` and the bench use (``run``,
``get_providers``) plus ``model_info`` read from the ONNX file, so everything downstream
of the session (adapters, instances, the inference loop) is the same for both runtimes.
The ``openvino`` package is an optional dependency (``pip install 'linewatch[openvino]'``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ModelError
from service.inference.metadata import ModelInfo

OPENVINO = "OpenVINO"  # the provider name LineWatch reports (not an ONNX Runtime provider)

# our precision names -> OpenVINO's element types (str(ov.Type))
_PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise ModelError(
            "providers: openvino needs the OpenVINO runtime, which is not installed "
            f"({exc}). Install it with: pip install 'linewatch[openvino]' (or pip install "
            "openvino), or use providers: cpu."
        ) from exc
    return ov


def effective_precision(element_type: Any) -> str:
    """OpenVINO's element type (``ov.Type.bf16``, ...) as our name: f32, bf16 or f16."""
    name = str(element_type).lower()
    for ours, token in (("bf16", "bfloat16"), ("bf16", "bf16"), ("f16", "float16"),
                        ("f16", "f16"), ("f32", "float32"), ("f32", "f32")):
        if token in name:
            return ours
    return name


class OpenVinoSession:
    """One ONNX model compiled by OpenVINO for the CPU, with one infer request.

    Like an ONNX Runtime session, one thread runs it at a time (the model's instance
    pool sees to it); several sessions of a model run side by side, each with
    ``threads`` threads.  Threads are not pinned to cores: two pinned single-thread
    models would both land on the first core (half the throughput, measured).
    """

    def __init__(
        self,
        path: Path,
        info: ModelInfo,
        *,
        model: bytes | None = None,
        precision: str = "f32",
        threads: int = 1,
    ) -> None:
        """``info`` describes the graph that runs: the file's, or ``model``'s (the file's
        graph changed in memory, e.g. with the uint8 input in front)."""
        ov = _import_openvino()
        if precision not in _PRECISIONS:
            raise ModelError(f"openvino.precision {precision!r} is not one of "
                             f"{', '.join(_PRECISIONS)}")
        self.path = Path(path)
        self.model_info = info
        self.requested_precision = precision
        core = ov.Core()
        t0 = time.perf_counter()
        try:
            graph = core.read_model(model if model is not None else str(self.path))
            self._compiled = core.compile_model(graph, "CPU", {
                "INFERENCE_PRECISION_HINT": _PRECISIONS[precision],
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                "INFERENCE_NUM_THREADS": max(1, int(threads)),
                "ENABLE_CPU_PINNING": False,
            })
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for what it cannot read
            raise ModelError(
                f"Model file {str(self.path)!r} could not be compiled by OpenVINO "
                f"({str(exc).strip()[:300]}). Use providers: cpu (ONNX Runtime) for it."
            ) from exc
        self.compile_s = time.perf_counter() - t0
        self.precision = effective_precision(
            self._compiled.get_property("INFERENCE_PRECISION_HINT")
        )
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self._compiled.create_infer_request()
        self._ports: dict[str, Any] = {}
        for port in self._compiled.outputs:
            for name in port.get_names():
                self._ports[name] = port
        missing = [t.name for t in self.model_info.outputs if t.name not in self._ports]
        if missing:
            raise ModelError(
                f"OpenVINO does not expose output(s) {', '.join(missing)} of "
                f"{str(self.path)!r}; use providers: cpu (ONNX Runtime) for this model."
            )

    def get_providers(self) -> list[str]:
        return [OPENVINO]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]
            ) -> list[np.ndarray]:
        """``session.run``: the named outputs (all, in the file's order, for None)."""
        names = list(output_names) if output_names else [t.name for t in
                                                          self.model_info.outputs]
        inputs = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        result = self._request.infer(inputs, share_inputs=True, share_outputs=False)
        return [np.asarray(result[self._ports[n]]) for n in names]

    def describe(self) -> str:
        return f"OpenVINO CPU, precision {self.precision}, {self.threads} thread(s)"
