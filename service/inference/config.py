"""Configuration of one model's inference session (a pydantic model, extra="forbid").

The service config embeds :class:`InferenceConfig` per model; the CLI builds one
from its options.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class InferenceConfig(BaseModel):
    """How to run a model: providers, threads, warm-up, thresholds."""

    model_config = ConfigDict(extra="forbid")

    providers: str | list[str] = Field(
        default="auto",
        description="'auto' (TensorRT, then CUDA, when they load; else CPU) or an explicit "
        "list in priority order: tensorrt, cuda, cpu or full ONNX Runtime provider names.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0,
        description="Threads inside an operator; 0 = every usable core but one (at least one).",
    )
    inter_op_threads: int = Field(
        default=0, ge=0, description="Threads across operators; 0 = ORT default."
    )
    spin_wait: bool = Field(
        default=False, description="Let idle ORT worker threads spin (lower latency, burns CPU)."
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

    @field_validator("providers")
    @classmethod
    def _auto_or_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if value == "auto":
                return value
            return [p.strip() for p in value.split(",") if p.strip()]
        return value
