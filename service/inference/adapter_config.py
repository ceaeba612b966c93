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

In a config file the section is :data:`AdapterSpec`, a union discriminated by
``kind``: each forced kind takes only the keys that mean something to it (``nms``
for ultralytics, ``roi`` for the top-down kinds, a required ``output`` for
regression), so a misplaced key is a config error with its line.  ``auto`` takes
them all, since the adapter is only known once the file is read.  Every spec
:meth:`~_SpecBase.resolved` to the flat :class:`AdapterConfig` that the adapters read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

AdapterKind = Literal["auto", "end2end", "ultralytics", "simcc", "heatmap", "regression"]
Box = tuple[float, float, float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputOverride(_Strict):
    """Input spec overrides; unset keys come from the model's metadata (or its defaults)."""

    layout: Literal["NCHW", "NHWC"] | None = None
    color: Literal["RGB", "BGR", "GRAY"] | None = Field(
        default=None, description="GRAY: a one-channel input (the frame converted to gray)"
    )
    dtype: Literal["uint8", "float32", "float16"] | None = None
    normalization: Literal["unit", "in-graph", "mean-std"] | None = Field(
        default=None,
        description="unit: x/255; in-graph: raw 0..255 values; mean-std: (x - mean) / std",
    )
    mean: tuple[float, float, float] | tuple[float] | None = Field(
        default=None,
        description="per channel, in 0..255 units, in the model's color order (one for GRAY)",
    )
    std: tuple[float, float, float] | tuple[float] | None = None
    resize: Literal["letterbox", "stretch"] | None = None
    size: tuple[int, int] | None = Field(default=None, description="[height, width]")
    pad_value: int | None = Field(default=None, ge=0, le=255)

    @model_validator(mode="after")
    def _mean_std(self) -> InputOverride:
        if self.normalization == "mean-std" and (self.mean is None or self.std is None):
            raise ValueError("normalization: mean-std needs both mean and std")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need the same number of values (3, or 1 for GRAY)")
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

    @field_validator("boxes")
    @classmethod
    def _boxes(cls, value: list[Box] | dict[str, list[Box]]) -> list[Box] | dict[str, list[Box]]:
        lists = value.values() if isinstance(value, dict) else [value]
        for boxes in lists:
            for x1, y1, x2, y2 in boxes:
                if x2 <= x1 or y2 <= y1:
                    raise ValueError(
                        f"box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is empty: give [x1, y1, x2, y2] "
                        "with x2 > x1 and y2 > y1 (pixels of the camera's frame)"
                    )
        return value

    @model_validator(mode="after")
    def _boxes_or_detector(self) -> RoiConfig:
        if self.detector is not None and self.boxes:
            raise ValueError("give fixed 'boxes' or a 'detector', not both")
        return self

    @property
    def per_camera(self) -> bool:
        """True when the fixed boxes are given per camera id."""
        return isinstance(self.boxes, dict)

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


# --- the config-file form: one spec per kind, discriminated by ``kind`` -----------------


class _SpecBase(_Strict):
    input: InputOverride = InputOverride()

    def resolved(self) -> AdapterConfig:
        """The flat settings the adapters read (unset sections take their defaults)."""
        return AdapterConfig.model_validate(self.model_dump(exclude_unset=False))


class _TopDownSpec(_SpecBase):
    roi: RoiConfig = RoiConfig()
    output: OutputSpec | None = Field(
        default=None, description="optional here: keypoint_names and class_name name the "
        "keypoints of a model whose metadata does not",
    )


class AutoSpec(_TopDownSpec):
    """``auto``: the file decides; every section is accepted for the adapter it picks."""

    kind: Literal["auto"] = "auto"
    nms: NmsConfig = NmsConfig()
    simcc_split_ratio: float | None = Field(default=None, gt=0.0)
    simcc_score: Literal["mean", "min"] = "mean"
    heatmap_refine: Literal["dark", "quadratic", "none"] = "dark"


class End2EndSpec(_SpecBase):
    """``end2end``: ``[B, N, 6+K*D]`` rows; nothing to set but the input."""

    kind: Literal["end2end"]


class UltralyticsSpec(_SpecBase):
    """``ultralytics``: raw YOLO-pose/detect, decoded with NMS."""

    kind: Literal["ultralytics"]
    nms: NmsConfig = NmsConfig()


class SimccSpec(_TopDownSpec):
    """``simcc``: RTMPose-style x/y bins on ROIs."""

    kind: Literal["simcc"]
    simcc_split_ratio: float | None = Field(default=None, gt=0.0)
    simcc_score: Literal["mean", "min"] = "mean"


class HeatmapSpec(_TopDownSpec):
    """``heatmap``: one heatmap per keypoint on ROIs."""

    kind: Literal["heatmap"]
    heatmap_refine: Literal["dark", "quadratic", "none"] = "dark"


class RegressionSpec(_TopDownSpec):
    """``regression``: direct coordinates on ROIs; the output spec is required."""

    kind: Literal["regression"]
    output: OutputSpec = Field(description="how to read the keypoint tensor")  # type: ignore[assignment]


def tag_adapter(value: Any) -> Any:
    """``adapter: ultralytics`` -> ``{kind: ultralytics}``; no ``kind`` -> ``auto``."""
    if value is None:
        return {"kind": "auto"}
    if isinstance(value, str):
        return {"kind": value.strip().lower()}
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "auto", **value}
    return value


AdapterSpec = Annotated[
    AutoSpec | End2EndSpec | UltralyticsSpec | SimccSpec | HeatmapSpec | RegressionSpec,
    Field(discriminator="kind"),
]
"""The ``adapter:`` section of a model in a config file (see the module doc)."""

ADAPTER_KINDS: tuple[str, ...] = ("auto", "end2end", "ultralytics", "simcc", "heatmap",
                                  "regression")

_SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(AdapterSpec)


def parse_adapter_spec(value: Any) -> AutoSpec | End2EndSpec | UltralyticsSpec | SimccSpec | \
        HeatmapSpec | RegressionSpec:
    """Validate an ``adapter:`` value (short or long form) as a config file would."""
    spec: AutoSpec | End2EndSpec | UltralyticsSpec | SimccSpec | HeatmapSpec | RegressionSpec = (
        _SPEC_ADAPTER.validate_python(tag_adapter(value))
    )
    return spec
