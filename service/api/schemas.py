"""What the API returns: read-only snapshots of the runtime, as pydantic models.

The composition root (``service.app``) fills these in; the routes only pass them
on, so the OpenAPI page at ``/docs`` documents every field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CameraState = Literal["connecting", "up", "down", "stopped"]


class _Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CameraSnapshot(_Snapshot):
    id: str
    source: str = Field(description="The source URL or path, credentials masked.")
    state: CameraState
    reason: str | None = Field(None, description="Why the camera is down, when it is.")
    fps: float = Field(description="Measured capture rate (frames/s).")
    last_frame_time: str | None = Field(None, description="ISO-8601 UTC of the newest frame.")
    last_frame_ts: float | None = Field(None, description="Epoch seconds of the newest frame.")
    reconnects: int
    frames_captured: int
    frames_processed: int
    frames_dropped: int
    model: str
    line: str | None = None


class ClassSnapshot(_Snapshot):
    id: int
    name: str
    keypoints: list[str]
    skeleton: list[tuple[int, int]]


class TensorSnapshot(_Snapshot):
    name: str
    shape: list[int | str | None]
    dtype: str


class ModelSnapshot(_Snapshot):
    id: str
    path: str
    provider: str = Field(description="The execution provider the model actually runs on.")
    loaded: bool
    classes: list[ClassSnapshot]
    keypoints: int = Field(description="Keypoint slots per instance (K).")
    inputs: list[TensorSnapshot]
    imgsz: list[int] = Field(description="Model input size [height, width].")
    dynamic_batch: bool
    max_batch: int
    cameras: list[str]
    instances: int = Field(
        default=1, description="Sessions of the model running batches side by side."
    )
    threads: int | None = Field(
        default=None,
        description="Intra-op threads of each session (CPU: ONNX Runtime or OpenVINO).",
    )
    acceleration: dict[str, Any] | None = Field(
        default=None,
        description="The GPU fast path as it runs (io_binding, fp16, cuda_graphs, uint8 input "
        "on the device, engine cache), or on OpenVINO its precision (f32, bf16); null on "
        "ONNX Runtime's CPU provider.",
    )


class Readiness(_Snapshot):
    ready: bool
    models_loaded: bool
    cameras_up: int
    reasons: list[str]


class Health(_Snapshot):
    status: Literal["ok"] = "ok"


class ErrorBody(_Snapshot):
    detail: str | list[dict[str, object]]
