"""Configuration of the tracker (pydantic, extra="forbid")."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OneEuroConfig(BaseModel):
    """One-Euro filter (Casiez et al., CHI 2012) on keypoints, in pixels and seconds.

    Lower ``min_cutoff`` smooths more at rest; higher ``beta`` follows fast motion
    with less lag.  ``d_cutoff`` smooths the speed estimate that drives the cutoff.
    """

    model_config = ConfigDict(extra="forbid")

    min_cutoff: float = Field(default=1.0, gt=0.0, description="Cutoff at rest, Hz.")
    beta: float = Field(default=0.05, ge=0.0, description="Cutoff slope, Hz per (px/s).")
    d_cutoff: float = Field(default=1.0, gt=0.0, description="Cutoff of the speed estimate, Hz.")


class TrackerConfig(BaseModel):
    """ByteTrack-style association, Kalman box filter and keypoint smoothing."""

    model_config = ConfigDict(extra="forbid")

    track_high_thresh: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Detections at or above this score take part in the first association.",
    )
    track_low_thresh: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Detections in [low, high) only extend existing tracks (second stage); "
        "below low they are ignored.",
    )
    new_track_thresh: float = Field(
        default=0.6, ge=0.0, le=1.0,
        description="An unmatched detection at or above this score starts a tentative track.",
    )
    match_thresh: float = Field(
        default=0.8, gt=0.0, le=1.0,
        description="Largest cost (1 - similarity) accepted in the first association.",
    )
    low_match_thresh: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Largest cost accepted when matching low-score detections.",
    )
    tentative_match_thresh: float = Field(
        default=0.7, gt=0.0, le=1.0,
        description="Largest cost accepted when matching tentative tracks.",
    )
    min_hits: int = Field(
        default=3, ge=1,
        description="Updates before a track is confirmed; tentative tracks are never output.",
    )
    max_lost_s: float = Field(
        default=1.0, ge=0.0,
        description="How long a confirmed track without detections is kept for re-association.",
    )
    keypoint_thresh: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="Keypoints below this score are invisible: they neither update the "
        "smoothing filter nor count in the keypoint similarity.",
    )
    oks_weight: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Weight of keypoint similarity (OKS) against box IoU in the cost.",
    )
    oks_sigma: float = Field(
        default=0.1, gt=0.0,
        description="OKS falloff per keypoint, as a fraction of the box's sqrt(area).",
    )
    motion_compensation: bool = Field(
        default=True,
        description="Carry each keypoint's smoothed value along with the Kalman velocity "
        "before filtering, so that parts moving at constant speed are smoothed without lag.",
    )
    one_euro: OneEuroConfig = Field(default_factory=OneEuroConfig)

    @model_validator(mode="after")
    def _ordered(self) -> TrackerConfig:
        if self.track_low_thresh > self.track_high_thresh:
            raise ValueError(
                f"track_low_thresh ({self.track_low_thresh}) must not exceed "
                f"track_high_thresh ({self.track_high_thresh})"
            )
        return self
