"""Configuration of one model's inference session (a pydantic model, extra="forbid").

The service config embeds :class:`InferenceConfig` per model; the CLI builds one
from its options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINO",
}


class GpuConfig(BaseModel):
    """The GPU fast path (TensorRT / CUDA execution providers); ignored on the CPU.

    ``fp16`` and the engine cache apply to TensorRT; the uint8 input graph, IO binding
    and CUDA graphs to both TensorRT and CUDA.  docs/models.md ("GPU") describes each.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp16: bool = Field(
        default=True, description="TensorRT builds an fp16 engine (layers stay fp32 where "
        "TensorRT finds fp16 too imprecise). No effect on the CUDA provider."
    )
    engine_cache_dir: Path | None = Field(
        default=None, description="Where TensorRT engines and timing caches are kept, one "
        "sub-directory per model file and settings; default $XDG_CACHE_HOME/linewatch/trt "
        "(~/.cache/linewatch/trt)."
    )
    io_binding: bool = Field(
        default=True, description="Run through ONNX Runtime IO binding: each batch is "
        "copied from host memory to the GPU once and its outputs back once, inside the run "
        "(which releases Python's GIL); with cuda_graphs, on fixed device buffers."
    )
    uint8_input: bool = Field(
        default=True, description="For a float NCHW model (e.g. an Ultralytics export), "
        "prepend Cast, BGR->RGB, x/255 and NHWC->NCHW to the graph, so uint8 frames go to the "
        "device and normalisation runs there."
    )
    cuda_graphs: bool = Field(
        default=False, description="Capture the model as a CUDA graph and replay it (less "
        "launch overhead). Needs a model with a fixed batch size and IO binding."
    )
    max_candidates: int = Field(
        default=1000, ge=0, le=100_000, description="A raw Ultralytics output (YOLO at 640: "
        "8400 anchors an image): the device keeps each image's best anchors, this many, so "
        "that only those come back to the CPU and go through NMS. The same instances as "
        "with every anchor while fewer anchors than this score above the threshold (the log "
        "warns when an image has more). 0: every anchor."
    )
    device_id: int = Field(default=0, ge=0, description="Which GPU (CUDA device index).")
    workspace_gb: float = Field(
        default=4.0, gt=0.0, le=1024.0, description="TensorRT builder workspace limit."
    )

    @model_validator(mode="after")
    def _graphs_need_binding(self) -> GpuConfig:
        if self.cuda_graphs and not self.io_binding:
            raise ValueError(
                "cuda_graphs: true needs io_binding: true (a CUDA graph replays on fixed "
                "device buffers, which only IO binding provides)"
            )
        return self


class OpenVinoConfig(BaseModel):
    """The OpenVINO CPU runtime (``providers: [openvino, cpu]``); ignored otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["f32", "bf16"] = Field(
        default="f32", description="Inference precision on the CPU. f32: the same results as "
        "ONNX Runtime. bf16: several times faster on CPUs with AMX or AVX512-BF16 (Xeon 4th "
        "generation and later), keypoints move by hundredths of a pixel (docs/models.md); "
        "where the CPU lacks it OpenVINO runs f32 and the log says so. (f16 is not offered: "
        "on a Xeon with AVX512-FP16 it ran slower than f32 and moved keypoints by up to "
        "tens of pixels.)"
    )
    uint8_input: bool = Field(
        default=True, description="For a float NCHW model (e.g. an Ultralytics export), "
        "prepend Cast, BGR->RGB, x/255 and NHWC->NCHW to the graph OpenVINO compiles, so "
        "uint8 frames go in and the conversion runs inside the model. Off when "
        "adapter.input overrides the input conversion."
    )


class InferenceConfig(BaseModel):
    """How to run a model: providers, threads, warm-up, thresholds."""

    model_config = ConfigDict(extra="forbid")

    providers: str | list[str] = Field(
        default="auto",
        description="'auto' (TensorRT, then CUDA, when they load; else CPU) or an explicit "
        "list in priority order: tensorrt, cuda, cpu or full ONNX Runtime provider names; "
        "or openvino first (OpenVINO's CPU runtime instead of ONNX Runtime, e.g. "
        "[openvino, cpu]: ONNX Runtime's CPU when OpenVINO cannot run the model).",
    )
    intra_op_threads: int = Field(
        default=0, ge=0,
        description="Threads inside an operator; 0 = every usable core but one (at least one).",
    )
    inter_op_threads: int = Field(
        default=0, ge=0, description="Threads across operators; 0 = ORT default."
    )
    instances: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Sessions of the model that run consecutive batches side by side "
        "(Triton's instance count): more images/s, each image takes longer. 'auto': 1, or 2 "
        "for a heavy model on the CPU (over 15 ms an image at warm-up) with "
        "intra_op_threads 0, each with its share of the cores.",
    )
    spin_wait: bool = Field(
        default=False, description="Let idle ORT worker threads spin (lower latency, burns CPU)."
    )
    cpu_rewrites: bool = Field(
        default=True, description="On ONNX Runtime's CPU provider, rewrite two patterns it "
        "runs slowly (Conv -> activation -> Split on channels; Softmax over an axis that is "
        "not the last, as in every Ultralytics YOLO export) into the same arithmetic it runs "
        "faster, at load; the file is not changed (docs/models.md, CPU graph rewrites).",
    )
    warmup_runs: int = Field(
        default=2, ge=0, le=100, description="Runs at load, before the model is ready."
    )
    score_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Minimum instance score; default: the model's score_threshold metadata, "
        "else 0.5.",
    )
    max_detections: int | None = Field(
        default=None, ge=1, description="Keep at most this many per image."
    )
    max_batch: int = Field(
        default=8, ge=1, le=256, description="The largest batch the inference loop sends; on "
        "TensorRT it sizes the optimisation profile of a dynamic-batch model (bigger batches "
        "run in chunks of this size)."
    )
    gpu: GpuConfig = Field(default_factory=GpuConfig, description="The GPU fast path.")
    openvino: OpenVinoConfig = Field(
        default_factory=OpenVinoConfig, description="The OpenVINO CPU runtime."
    )

    @field_validator("providers")
    @classmethod
    def _auto_or_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if value == "auto":
                return value
            return [p.strip() for p in value.split(",") if p.strip()]
        return value
