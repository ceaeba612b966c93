"""Configuration of a line and its rules (YAML -> pydantic, ``extra="forbid"``).

A line has rules; every rule has a ``type`` (the discriminator), a ``name`` unique
in its line, the cameras it watches (``camera: cam-1`` or ``cameras: [...]``; none:
every camera of the line), ``for`` (how long its condition must hold before the
rule turns violated, like Prometheus ``for:``), ``clear_for`` (how long the
condition must be clear before it turns ok again) and, where it compares a value
with a threshold, a hysteresis (enter beyond the threshold, leave only once the
value is back by the hysteresis).  Coordinates are millimetres on the work plane
(``units: mm``, the default) or pixels for an uncalibrated camera (``units: px``).

The reference with a YAML example of every kind is ``docs/rules.md``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_PATTERN = r"^[a-z0-9_-]+$"
_ID_RE = re.compile(ID_PATTERN)

Point = tuple[float, float]
ClassRef = str | int  # a class name (from the model's metadata) or its id
KeypointRef = str | int  # a keypoint name of the class, or its index
LineStateOverride = Literal["FAULT", "JAMMED", "STOPPED", "IDLE", "none"]


def _check_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid id: use lowercase letters, digits, '-' and '_' "
            f"(pattern {ID_PATTERN})"
        )
    return value


def _check_polygon(points: list[Point]) -> list[Point]:
    if len(points) < 3:
        raise ValueError(f"a zone needs at least 3 points, got {len(points)}")
    area2 = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        area2 += x0 * y1 - x1 * y0
    if abs(area2) < 1e-9:
        raise ValueError("the zone's points are collinear (the polygon has no area)")
    return points


Polygon = Annotated[list[Point], Field(min_length=3)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        allow_inf_nan=False,
    )


class _RuleBase(_Model):
    """Fields every rule kind has."""

    name: str
    cameras: list[str] = Field(
        default_factory=list, description="cameras it watches; empty: all cameras of the line"
    )
    for_s: float = Field(
        default=0.0, ge=0.0, alias="for", description="seconds the condition holds before violated"
    )
    clear_for_s: float = Field(
        default=0.0,
        ge=0.0,
        alias="clear_for",
        description="seconds the condition is clear before ok again",
    )
    units: Literal["mm", "px"] = "mm"
    line_state: LineStateOverride | None = Field(
        default=None,
        description="line state its violation implies; None: the kind's default (docs/rules.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _camera_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "camera" in data:
            if "cameras" in data:
                raise ValueError("give either 'camera' or 'cameras', not both")
            data = dict(data)
            data["cameras"] = [data.pop("camera")]
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, value: list[str]) -> list[str]:
        for camera in value:
            _check_id(camera)
        if len(set(value)) != len(value):
            raise ValueError(f"cameras are listed twice: {value}")
        return value


class _ZoneRule(_RuleBase):
    zone: Polygon | None = Field(default=None, description="polygon; None: the whole view")
    classes: list[ClassRef] = Field(
        default_factory=list, description="class names or ids; empty: every class"
    )

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: list[Point] | None) -> list[Point] | None:
        return None if value is None else _check_polygon(value)


class PresenceRule(_ZoneRule):
    """Violated while fewer than ``min_count`` parts of ``classes`` are in ``zone``."""

    type: Literal["presence"] = "presence"
    zone: Polygon
    min_count: int = Field(default=1, ge=1)


class PositionRule(_ZoneRule):
    """Violated while a part in ``zone`` (or its ``keypoint``) is off ``target`` by more
    than ``tolerance_mm`` (leaves below ``tolerance_mm - hysteresis_mm``)."""

    type: Literal["position"] = "position"
    keypoint: KeypointRef | None = Field(
        default=None, description="a named keypoint; None: the part's pose position"
    )
    target: Point | None = Field(default=None, description="a target point")
    target_line: tuple[Point, Point] | None = Field(
        default=None, description="a target line through two points (distance to the line)"
    )
    tolerance_mm: float = Field(gt=0.0)
    hysteresis_mm: float = Field(default=0.0, ge=0.0)
    max_residual_mm: float | None = Field(
        default=None, gt=0.0, description="ignore parts whose pose fit residual is larger"
    )

    @model_validator(mode="after")
    def _one_target(self) -> PositionRule:
        if (self.target is None) == (self.target_line is None):
            raise ValueError("give exactly one of 'target' (a point) or 'target_line'")
        if self.target_line is not None:
            (x0, y0), (x1, y1) = self.target_line
            if math.hypot(x1 - x0, y1 - y0) < 1e-9:
                raise ValueError("target_line needs two different points")
        if self.hysteresis_mm >= self.tolerance_mm:
            raise ValueError("hysteresis_mm must be smaller than tolerance_mm")
        return self


class OrientationRule(_ZoneRule):
    """Violated while a part's theta in ``zone`` is off ``target_deg`` by more than
    ``tolerance_deg``, modulo ``symmetry_deg`` (180: a part that looks the same turned
    by half a turn)."""

    type: Literal["orientation"] = "orientation"
    target_deg: float = 0.0
    tolerance_deg: float = Field(gt=0.0, lt=180.0)
    symmetry_deg: float = Field(default=360.0, gt=0.0, le=360.0)
    hysteresis_deg: float = Field(default=0.0, ge=0.0)
    max_residual_mm: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _fits(self) -> OrientationRule:
        if self.tolerance_deg >= self.symmetry_deg / 2:
            raise ValueError(
                f"tolerance_deg ({self.tolerance_deg}) must be below half of symmetry_deg "
                f"({self.symmetry_deg}): every orientation would pass"
            )
        if self.hysteresis_deg >= self.tolerance_deg:
            raise ValueError("hysteresis_deg must be smaller than tolerance_deg")
        return self


class ThroughputRule(_RuleBase):
    """Counts tracks crossing ``count_line`` in ``direction`` (each track once) and
    is violated while the rate over ``window_s`` is below ``min_per_minute``."""

    type: Literal["throughput"] = "throughput"
    count_line: tuple[Point, Point]
    direction: Point | None = Field(
        default=None,
        description="the counted crossing direction; None: (dy, -dx) of the count line",
    )
    classes: list[ClassRef] = Field(default_factory=list)
    window_s: float = Field(default=60.0, gt=0.0)
    min_per_minute: float | None = Field(default=None, ge=0.0)
    hysteresis_per_minute: float = Field(default=0.0, ge=0.0)
    forget_after_s: float = Field(
        default=60.0, gt=0.0, description="a track unseen this long is forgotten"
    )

    @model_validator(mode="after")
    def _geometry(self) -> ThroughputRule:
        (x0, y0), (x1, y1) = self.count_line
        if math.hypot(x1 - x0, y1 - y0) < 1e-9:
            raise ValueError("count_line needs two different points")
        if self.direction is not None:
            dx, dy = self.direction
            # a direction along the line crosses nothing
            cross = (x1 - x0) * dy - (y1 - y0) * dx
            if abs(cross) < 1e-9 * math.hypot(dx, dy) * math.hypot(x1 - x0, y1 - y0) or (
                dx == 0 and dy == 0
            ):
                raise ValueError("direction must not be zero or parallel to count_line")
        return self


class ConveyorRule(_ZoneRule):
    """Belt speed from the parts in the belt ``zone``; violated (jammed) while parts
    are present and move slower than ``min_speed_mm_s`` along ``direction``."""

    type: Literal["conveyor"] = "conveyor"
    direction: Point = (1.0, 0.0)
    min_speed_mm_s: float = Field(gt=0.0, description="slower than this: standing still")
    hysteresis_mm_s: float = Field(default=0.0, ge=0.0)
    min_parts: int = Field(default=1, ge=1, description="parts needed to judge the belt")
    empty_for_s: float = Field(
        default=10.0, gt=0.0, description="no parts on the belt this long: stopped"
    )

    @field_validator("direction")
    @classmethod
    def _direction(cls, value: Point) -> Point:
        if math.hypot(*value) < 1e-9:
            raise ValueError("direction must not be zero")
        return value


class ZoneIntrusionRule(_ZoneRule):
    """Violated while any (visible) keypoint of ``classes`` is inside ``zone``."""

    type: Literal["zone_intrusion"] = "zone_intrusion"
    zone: Polygon
    keypoints: list[KeypointRef] = Field(
        default_factory=list, description="keypoints that count; empty: all"
    )


class JointRangeRule(_RuleBase):
    """Violated while a joint angle of ``class``'s keypoint ``chain`` is outside
    [``min_deg``, ``max_deg``].  Two keypoints: the link's direction from +X; three:
    the signed turn of the second link relative to the first (a joint angle)."""

    type: Literal["joint_range"] = "joint_range"
    cls: ClassRef = Field(alias="class")
    chain: list[KeypointRef] = Field(min_length=2, max_length=3)
    min_deg: float = Field(ge=-180.0, le=180.0)
    max_deg: float = Field(ge=-180.0, le=180.0)
    hysteresis_deg: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _range(self) -> JointRangeRule:
        if self.min_deg >= self.max_deg:
            raise ValueError(f"min_deg ({self.min_deg}) must be below max_deg ({self.max_deg})")
        if 2 * self.hysteresis_deg >= self.max_deg - self.min_deg:
            raise ValueError("hysteresis_deg must be below half of the range")
        return self


class StallRule(_RuleBase):
    """Violated while ``class``'s keypoints stand still (moved less than
    ``min_motion_mm`` over the last ``motion_window_s``) for ``for`` seconds: set
    ``for`` longer than the longest planned dwell."""

    type: Literal["stall"] = "stall"
    cls: ClassRef = Field(alias="class")
    keypoints: list[KeypointRef] = Field(default_factory=list, description="empty: all")
    min_motion_mm: float = Field(default=5.0, gt=0.0)
    motion_window_s: float = Field(default=0.5, gt=0.0)


class StaleCameraRule(_RuleBase):
    """Violated while a camera has delivered no fresh frame for ``max_age_s``; every
    other rule of that camera is UNKNOWN meanwhile, and the line is UNKNOWN."""

    type: Literal["stale_camera"] = "stale_camera"
    max_age_s: float = Field(default=5.0, gt=0.0)


RuleConfig = Annotated[
    PresenceRule
    | PositionRule
    | OrientationRule
    | ThroughputRule
    | ConveyorRule
    | ZoneIntrusionRule
    | JointRangeRule
    | StallRule
    | StaleCameraRule,
    Field(discriminator="type"),
]

RULE_TYPES: tuple[str, ...] = (
    "presence",
    "position",
    "orientation",
    "throughput",
    "conveyor",
    "zone_intrusion",
    "joint_range",
    "stall",
    "stale_camera",
)


class LineConfig(_Model):
    """One production line: its cameras, rules and line-state settings."""

    id: str
    cameras: list[str] = Field(
        default_factory=list,
        description="cameras of the line; empty: every camera a rule names or that sends frames",
    )
    rules: list[RuleConfig] = Field(default_factory=list)
    idle_after_s: float = Field(
        default=60.0, gt=0.0, description="no part counted (or seen) this long: IDLE"
    )
    stale_after_s: float = Field(
        default=5.0,
        gt=0.0,
        description="frame age that makes a camera stale where no stale_camera rule says",
    )
    keypoint_min_score: float = Field(
        default=0.3, ge=0.0, le=1.0, description="keypoints scoring below this are not seen"
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, value: list[str]) -> list[str]:
        for camera in value:
            _check_id(camera)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LineConfig:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique in a line; repeated: {', '.join(dupes)}")
        if self.cameras:
            known = set(self.cameras)
            for rule in self.rules:
                unknown = [c for c in rule.cameras if c not in known]
                if unknown:
                    raise ValueError(
                        f"rule {rule.name!r} names camera(s) {', '.join(unknown)} that are not "
                        f"cameras of line {self.id!r} ({', '.join(self.cameras)})"
                    )
        return self
