"""Per-model adapter settings (pydantic, ``extra="forbid"``): the ``adapter:`` key of a model.

``adapter: auto`` (the default) lets the model's metadata and output shapes pick the
adapter; ``adapter: ultralytics`` (or any name below) forces one, and a model that
does not fit it is refused with a :class:`ModelError` that says why.  The long form
also overrides the input spec, describes a regression output, sets NMS and ROIs::

    adapter:
      kind: regression            # auto | end2end | ultralytics | simcc | heatmap | regression
      input: {layout: NHWC, color: RGB, dtype: uint8, normalization: in-graph, resize: stretch}
      output: {layout: BNKV, coords: normalized, axis_order: yx, score_index: 2}
      roi: {boxes: [[100, 50, 400, 470]], padding: 1.25}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AdapterKind = Literal["auto", "end2end", "ultralytics", "simcc", "heatmap", "regression"]
Box = tuple[float, float, float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputOverride(_Strict):
    """Input spec overrides; unset keys come from the model's metadata (or its defaults)."""

    layout: Literal["NCHW", "NHWC"] | None = None
    color: Literal["RGB", "BGR"] | None = None
    dtype: Literal["uint8", "float32", "float16"] | None = None
    normalization: Literal["unit", "in-graph", "mean-std"] | None = Field(
        default=None,
        description="unit: x/255; in-graph: raw 0..255 values; mean-std: (x - mean) / std",
    )
    mean: tuple[float, float, float] | None = Field(
        default=None, description="per channel, in 0..255 units, in the model's color order"
    )
    std: tuple[float, float, float] | None = None
    resize: Literal["letterbox", "stretch"] | None = None
    size: tuple[int, int] | None = Field(default=None, description="[height, width]")
    pad_value: int | None = Field(default=None, ge=0, le=255)

    @model_validator(mode="after")
    def _mean_std(self) -> InputOverride:
        if self.normalization == "mean-std" and (self.mean is None or self.std is None):
            raise ValueError("normalization: mean-std needs both mean and std")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class OutputSpec(_Strict):
    """A direct-regression keypoint output (e.g. MoveNet: [1, 1, 17, 3] = y, x, score)."""

    name: str | None = Field(default=None, description="output tensor; default: the only one")
    layout: Literal["BNKV", "BKV", "BF"] = Field(
        default="BNKV", description="batch, instances, keypoints, values (BF: K*V flat)"
    )
    coords: Literal["normalized", "pixel"] = "pixel"
    axis_order: Literal["xy", "yx"] = "xy"
    score_index: int | None = Field(default=2, ge=0, description="null: no score")
    keypoint_names: list[str] = Field(default_factory=list)
    class_name: str = "object"

    @field_validator("coords", mode="before")
    @classmethod
    def _british(cls, value: Any) -> Any:
        return "normalized" if value == "normalised" else value


class NmsConfig(_Strict):
    """Ultralytics raw outputs: NMS settings (Ultralytics' predict defaults)."""

    iou: float = Field(default=0.7, gt=0.0, le=1.0)
    max_det: int = Field(default=300, ge=1)
    agnostic: bool = False


class RoiConfig(_Strict):
    """Where a top-down model looks: fixed boxes (x1, y1, x2, y2 px) or a detector's boxes."""

    boxes: list[Box] | dict[str, list[Box]] = Field(
        default_factory=list, description="one list for every camera, or lists per camera id"
    )
    detector: str | None = Field(default=None, description="model id of a detector")
    detector_classes: list[int] | None = Field(
        default=None, description="keep only these detector classes"
    )
    padding: float = Field(default=1.25, ge=1.0, le=4.0, description="box scale before cropping")
    max_rois: int = Field(default=64, ge=1, description="per frame, best detector scores first")

    def boxes_for(self, camera: str | None) -> list[Box]:
        if isinstance(self.boxes, dict):
            return list(self.boxes.get(camera or "", self.boxes.get("*", [])))
        return list(self.boxes)


class AdapterConfig(_Strict):
    """How a model's inputs and outputs are interpreted."""

    kind: AdapterKind = "auto"
    input: InputOverride = InputOverride()
    output: OutputSpec | None = None
    nms: NmsConfig = NmsConfig()
    roi: RoiConfig = RoiConfig()
    simcc_split_ratio: float | None = Field(default=None, gt=0.0)
    simcc_score: Literal["mean", "min"] = "mean"
    heatmap_refine: Literal["dark", "quadratic", "none"] = "dark"

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """``adapter: ultralytics`` is ``adapter: {kind: ultralytics}``."""
        if isinstance(data, str):
            return {"kind": data}
        if data is None:
            return {}
        return data
