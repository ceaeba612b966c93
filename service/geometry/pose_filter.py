"""Per-track orientation filter: rigid parts keep their angle while they ride the belt.

A part's rotation is constant while it is tracked, so the angle of its pose is
estimated over the whole track instead of frame by frame: a scalar Kalman filter
on theta per track id, with a small drift per update (the model's keypoint bias
changes slowly as a part crosses the image), measurement variances from the fit
(keypoint noise over the template's lever arms, inflated by the fit residual),
innovation gating (a frame whose angle is many standard deviations off does not
move the estimate) and a reset after several such frames in a row (the part really
turned).  The translation is then fitted again with the filtered angle
(:class:`~service.geometry.PoseEstimator`).

A fit whose RMS residual is above ``max_residual_mm`` does not match the template
(the model misplaced keypoints): its angle is no evidence and never moves the
estimate (nor counts towards a reset); the track keeps its filtered angle.  A track
that has had no such good fit yet has no estimate: its frame-by-frame angle is
reported as it is, so a run of poor fits is not averaged into a smooth value that
holds a rule past its ``for`` (a part the model gets wrong for its whole track
behaves as without the filter).

Everything is vectorised over the tracks of one frame; the state is a handful of
arrays keyed by track id, and entries of tracks not seen for ``forget_after``
updates are dropped, so memory stays bounded however long the camera runs.
Updates are counted, not timed: the drift is per update (per frame of the camera).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]


class PoseFilterConfig(BaseModel):
    """Orientation filtering of rigid part poses (per camera)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True, description="Filter the angle over each track; false: frame-by-frame fits."
    )
    keypoint_sigma_mm: float = Field(
        default=1.5, gt=0.0,
        description="Keypoint noise on the work plane (mm) that sets a fit's angle variance.",
    )
    residual_gain: float = Field(
        default=2.0, ge=0.0,
        description="A fit's RMS residual, times this, adds to the keypoint noise: fits that "
        "do not match the template count less.",
    )
    drift_deg: float = Field(
        default=0.03, ge=0.0,
        description="Standard deviation (degrees) the angle may drift per update; larger "
        "follows slow changes sooner, smaller averages more frames.",
    )
    gate_sigma: float = Field(
        default=3.0, gt=0.0,
        description="A fit whose angle is further than this many standard deviations from "
        "the estimate is an outlier and leaves it alone.",
    )
    max_outliers: int = Field(
        default=5, ge=0,
        description="After this many outliers in a row the estimate restarts at the fit "
        "(the part turned).",
    )
    max_residual_mm: float | None = Field(
        default=3.0, gt=0.0,
        description="A fit with a larger RMS residual (mm) leaves the estimate alone; a "
        "track without a fit under it reports its frame-by-frame angle.  None: every fit "
        "counts (weighted by its residual).",
    )
    forget_after: int = Field(
        default=100, ge=1,
        description="Updates after which the state of a track that was not seen is dropped.",
    )


def wrap_rad(angle: npt.ArrayLike) -> F64:
    """Angles in radians -> [-pi, pi)."""
    return np.asarray((np.asarray(angle, np.float64) + np.pi) % (2 * np.pi) - np.pi, np.float64)


def orientation_step(
    theta: npt.ArrayLike, var: npt.ArrayLike, z: npt.ArrayLike, r: npt.ArrayLike,
    q: float, gate_sigma: float,
) -> tuple[F64, F64, Bool]:
    """One Kalman step of a constant angle with drift, for N tracks at once.

    ``theta`` / ``var``: the estimates (rad) and their variances; ``z`` / ``r``: the
    measured angles and their variances; ``q``: drift variance per step.  Returns
    the new estimates and variances and which measurements were inliers (within
    ``gate_sigma`` standard deviations of the innovation); an outlier leaves the
    estimate where it was, with its variance grown by ``q``.
    """
    th = np.asarray(theta, np.float64)
    p = np.asarray(var, np.float64) + q
    innovation = wrap_rad(np.asarray(z, np.float64) - th)
    s = p + np.asarray(r, np.float64)
    inlier = innovation**2 <= gate_sigma**2 * s
    gain = np.where(inlier, p / s, 0.0)
    return wrap_rad(th + gain * innovation), (1.0 - gain) * p, np.asarray(inlier)


class OrientationFilter:
    """Filters the pose angle of each track over its life (see the module docstring)."""

    def __init__(self, config: PoseFilterConfig | None = None) -> None:
        self.config = config or PoseFilterConfig()
        self._ids: I64 = np.zeros(0, np.int64)
        self._cls: I64 = np.zeros(0, np.int64)
        self._theta: F64 = np.zeros(0)
        self._var: F64 = np.zeros(0)
        self._outliers: I64 = np.zeros(0, np.int64)
        self._seen: I64 = np.zeros(0, np.int64)
        self._updates = 0

    def __len__(self) -> int:
        """Tracks with a state (bounded: unseen ones are forgotten)."""
        return len(self._ids)

    def filter(
        self, track_ids: npt.ArrayLike, class_ids: npt.ArrayLike,
        theta_deg: npt.ArrayLike, var_rad2: npt.ArrayLike,
        residual_mm: npt.ArrayLike | None = None,
    ) -> F64:
        """Filtered angles (degrees, [-180, 180)) of this frame's tracks.

        ``theta_deg`` / ``var_rad2``: each track's fitted angle and its variance
        (rad^2); NaN (no fit this frame) keeps the track's state and gives NaN.
        ``residual_mm``: the fits' RMS residuals; a fit above ``max_residual_mm``
        keeps the track's state and gives its filtered angle, or NaN (use the fit)
        for a track without a state.  A track id seen with another class than
        before starts afresh.
        """
        cfg = self.config
        ids = np.asarray(track_ids, np.int64).ravel()
        cls = np.asarray(class_ids, np.int64).ravel()
        z = np.radians(np.asarray(theta_deg, np.float64).ravel())
        r = np.asarray(var_rad2, np.float64).ravel()
        self._updates += 1
        fitted = np.isfinite(z) & np.isfinite(r) & (r > 0)
        measured = fitted
        if residual_mm is not None and cfg.max_residual_mm is not None:
            res = np.asarray(residual_mm, np.float64).ravel()
            measured = fitted & ~(res > cfg.max_residual_mm)  # NaN residual: no information
        slot, known = self._lookup(ids, cls)
        out = np.full(len(ids), np.nan)
        held = fitted & ~measured & known
        if held.any():
            out[held] = self._theta[slot[held]]

        step = measured & known
        if step.any():
            i = slot[step]
            theta, var, inlier = orientation_step(
                self._theta[i], self._var[i], z[step], r[step],
                np.radians(cfg.drift_deg) ** 2, cfg.gate_sigma,
            )
            outliers = np.where(inlier, 0, self._outliers[i] + 1)
            restart = outliers > cfg.max_outliers
            self._theta[i] = np.where(restart, z[step], theta)
            self._var[i] = np.where(restart, r[step], var)
            self._outliers[i] = np.where(restart, 0, outliers)
            out[step] = self._theta[i]
        if known.any():
            self._seen[slot[known]] = self._updates

        fresh = measured & ~known
        if fresh.any():
            self._add(ids[fresh], cls[fresh], z[fresh], r[fresh])
            out[fresh] = wrap_rad(z[fresh])
        self._forget()
        return np.degrees(out)

    def _lookup(self, ids: I64, cls: I64) -> tuple[I64, Bool]:
        """Each id's slot in the state arrays, and whether it is there with that class."""
        if not len(self._ids) or not len(ids):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        order = np.argsort(self._ids, kind="stable")
        pos = np.minimum(np.searchsorted(self._ids[order], ids), len(order) - 1)
        slot = order[pos]
        return slot, (self._ids[slot] == ids) & (self._cls[slot] == cls)

    def _add(self, ids: I64, cls: I64, theta: F64, var: F64) -> None:
        stale = np.isin(self._ids, ids)  # an id seen before with another class
        if stale.any():
            self._keep(~stale)
        n = len(ids)
        self._ids = np.concatenate([self._ids, ids])
        self._cls = np.concatenate([self._cls, cls])
        self._theta = np.concatenate([self._theta, wrap_rad(theta)])
        self._var = np.concatenate([self._var, var])
        self._outliers = np.concatenate([self._outliers, np.zeros(n, np.int64)])
        self._seen = np.concatenate([self._seen, np.full(n, self._updates, np.int64)])

    def _forget(self) -> None:
        old = self._updates - self._seen > self.config.forget_after
        if old.any():
            self._keep(~old)

    def _keep(self, mask: Bool) -> None:
        self._ids, self._cls = self._ids[mask], self._cls[mask]
        self._theta, self._var = self._theta[mask], self._var[mask]
        self._outliers, self._seen = self._outliers[mask], self._seen[mask]
