"""Part poses from keypoints: rigid 2-D fits, 6-DoF PnP, joint angles of a chain.

All helpers are pure numpy (OpenCV for PnP) and vectorised over instances;
:class:`PoseEstimator` applies them to the tracks of one camera.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from service.domain import Tracks
from service.geometry.calibration import Homography
from service.geometry.pose_filter import OrientationFilter, PoseFilterConfig

F64 = npt.NDArray[np.float64]


def _wrap_deg(angle: npt.ArrayLike) -> F64:
    """Angles in degrees -> [-180, 180)."""
    return np.asarray((np.asarray(angle, np.float64) + 180.0) % 360.0 - 180.0, np.float64)


@dataclass(frozen=True)
class _Moments:
    """Weighted centred point sets of N rigid fits (everything a pose needs)."""

    w: F64  # (N, K) weights, 0 for unusable keypoints
    a: F64  # (N, K, 2) template minus its weighted centroid
    b: F64  # (N, K, 2) points minus their weighted centroid
    cq: F64  # (N, 2) template centroid
    cp: F64  # (N, 2) point centroid
    sw: F64  # (N,) weight sums (1 where too few keypoints)
    used: npt.NDArray[np.intp]  # (N,) keypoints that count

    @classmethod
    def of(cls, templates: npt.ArrayLike, points: npt.ArrayLike,
           weights: npt.ArrayLike) -> _Moments:
        p = np.asarray(points, np.float64)
        q = np.broadcast_to(np.asarray(templates, np.float64), p.shape)
        w = np.asarray(weights, np.float64).reshape(p.shape[:2])
        usable = (w > 0) & np.isfinite(p).all(axis=2) & np.isfinite(q).all(axis=2)
        w = np.where(usable, w, 0.0)
        p = np.where(usable[..., None], p, 0.0)
        q = np.where(usable[..., None], q, 0.0)
        used = usable.sum(axis=1)
        sw = np.where(used >= 2, w.sum(axis=1), 1.0)
        cq = (w[..., None] * q).sum(axis=1) / sw[:, None]
        cp = (w[..., None] * p).sum(axis=1) / sw[:, None]
        return cls(w, q - cq[:, None, :], p - cp[:, None, :], cq, cp, sw, used)

    def best_theta(self) -> F64:
        """The least-squares rotation (rad)."""
        a, b, w = self.a, self.b, self.w
        dot = (w * (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1])).sum(axis=1)
        cross = (w * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])).sum(axis=1)
        return np.asarray(np.arctan2(cross, dot), np.float64)

    def pose(self, theta: F64) -> F64:
        """(N, 4) x, y, theta_deg, RMS residual for rotations theta (rad)."""
        c, s = np.cos(theta), np.sin(theta)
        a, b = self.a, self.b
        tx = self.cp[:, 0] - (c * self.cq[:, 0] - s * self.cq[:, 1])
        ty = self.cp[:, 1] - (s * self.cq[:, 0] + c * self.cq[:, 1])
        ex = c[:, None] * a[..., 0] - s[:, None] * a[..., 1] - b[..., 0]
        ey = s[:, None] * a[..., 0] + c[:, None] * a[..., 1] - b[..., 1]
        out = np.empty((len(theta), 4))
        out[:, 0], out[:, 1] = tx, ty
        out[:, 2] = _wrap_deg(np.degrees(theta))
        out[:, 3] = np.sqrt((self.w * (ex * ex + ey * ey)).sum(axis=1) / self.sw)
        out[self.used < 2] = np.nan
        return out

    def lever(self) -> F64:
        """(N,) sum of squared distances of the used template points from their
        centroid, with the weights scaled to average 1."""
        sq = self.a[..., 0] ** 2 + self.a[..., 1] ** 2
        return np.asarray((self.w * sq).sum(axis=1) * self.used / self.sw, np.float64)


def fit_rigid_2d_batch(templates: npt.ArrayLike, points: npt.ArrayLike,
                       weights: npt.ArrayLike, theta_deg: npt.ArrayLike | None = None) -> F64:
    """Weighted rigid fits (rotation + translation, no scale) of N instances at once.

    templates (N, K, 2) or (K, 2) in part coordinates, points (N, K, 2) on the work
    plane, weights (N, K) >= 0 (0, or a NaN point, leaves a keypoint out).  Returns
    (N, 4): x, y, theta_deg (the pose that maps the template onto the points) and
    the weighted RMS residual; a row is NaN when fewer than 2 keypoints count.
    With ``theta_deg`` (N,) the rotation is given (where finite) and only the
    translation and the residual are fitted.
    """
    m = _Moments.of(templates, points, weights)
    theta = m.best_theta()
    if theta_deg is not None:
        given = np.radians(np.asarray(theta_deg, np.float64).reshape(len(theta)))
        theta = np.where(np.isfinite(given), given, theta)
    return m.pose(theta)


def rotation_variance(templates: npt.ArrayLike, weights: npt.ArrayLike,
                      residual_mm: npt.ArrayLike, keypoint_sigma_mm: float,
                      residual_gain: float = 0.0) -> F64:
    """Variance (rad^2) of the angle of weighted rigid fits, N at once.

    For keypoint noise sigma (mm) on each used point the fitted angle varies by
    about sigma^2 / sum_k w_k |q_k - c|^2 (weights scaled to average 1, c the
    weighted centroid of the used template points): keypoints far from the centre
    pin the angle down.
    sigma^2 is ``keypoint_sigma_mm^2 + (residual_gain * residual_mm)^2``.  NaN
    where fewer than 2 keypoints count.
    """
    w = np.asarray(weights, np.float64)
    t = np.broadcast_to(np.asarray(templates, np.float64), (*w.shape, 2))
    m = _Moments.of(t, np.where(np.isfinite(t), 0.0, np.nan), w)
    return _variance(m, residual_mm, keypoint_sigma_mm, residual_gain)


def _variance(m: _Moments, residual_mm: npt.ArrayLike, sigma_mm: float, gain: float) -> F64:
    lever = m.lever()
    resid = np.asarray(residual_mm, np.float64)
    resid = np.where(np.isfinite(resid), resid, 0.0)
    var = (sigma_mm**2 + (gain * resid) ** 2) / np.maximum(lever, 1e-12)
    return np.where((m.used >= 2) & (lever > 0), var, np.nan)


def fit_rigid_2d(template_mm: npt.ArrayLike, points_mm: npt.ArrayLike,
                 weights: npt.ArrayLike | None = None) -> tuple[float, float, float, float]:
    """Weighted Kabsch/Umeyama fit without scale of template (K, 2) to points (K, 2).

    Returns (x_mm, y_mm, theta_deg, rms_residual_mm); all NaN with fewer than two
    keypoints of positive weight.
    """
    pts = np.asarray(points_mm, np.float64)
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, np.float64)
    x, y, theta, rms = fit_rigid_2d_batch(template_mm, pts[None], w[None])[0]
    return float(x), float(y), float(theta), float(rms)


def joint_angles(chain: npt.ArrayLike) -> F64:
    """Angles of a keypoint chain (..., K, 2) -> (..., K - 1) degrees.

    The first value is the absolute angle of the first link (from the x axis), each
    next one the relative angle at an interior joint (link i against link i - 1),
    counter-clockwise positive in the chain's own frame, in [-180, 180).  Give the
    chain in work-plane mm: image pixels have y pointing down (angles flip sign)
    and perspective bends them.
    """
    p = np.asarray(chain, np.float64)
    d = np.diff(p, axis=-2)
    absolute = np.degrees(np.arctan2(d[..., 1], d[..., 0]))
    rel = np.diff(absolute, axis=-1)
    return _wrap_deg(np.concatenate([absolute[..., :1], rel], axis=-1))


@dataclass(frozen=True)
class PnPResult:
    """A 6-DoF pose: object -> camera (OpenCV's rvec / tvec), with its quality."""

    rvec: F64  # (3,) Rodrigues rotation vector
    tvec: F64  # (3,) translation, in the template's units
    reprojection_rms_px: float
    ok: bool


def solve_pnp(
    template_3d: npt.ArrayLike,
    points_px: npt.ArrayLike,
    camera_matrix: npt.ArrayLike,
    dist_coeffs: npt.ArrayLike | None = None,
    valid: npt.ArrayLike | None = None,
) -> PnPResult:
    """6-DoF pose of a 3-D template (K, 3) seen at pixels (K, 2).

    Uses IPPE when the template is planar (needs >= 4 points), SQPnP otherwise;
    ``valid`` (K,) leaves out keypoints that were not seen.  ``ok`` is False (and
    the arrays NaN) when too few points are left or OpenCV finds no solution.
    """
    obj = np.asarray(template_3d, np.float64).reshape(-1, 3)
    img = np.asarray(points_px, np.float64).reshape(-1, 2)
    k = np.asarray(camera_matrix, np.float64)
    dist = np.zeros(5) if dist_coeffs is None else np.asarray(dist_coeffs, np.float64)
    use = np.isfinite(obj).all(1) & np.isfinite(img).all(1)
    if valid is not None:
        use &= np.asarray(valid, bool).reshape(-1)
    obj, img = obj[use], img[use]
    failed = PnPResult(np.full(3, np.nan), np.full(3, np.nan), float("nan"), False)
    if len(obj) < 4:
        return failed
    spread = np.linalg.svd(obj - obj.mean(axis=0), compute_uv=False)
    planar = spread[2] <= 1e-6 * spread[0]
    method = cv2.SOLVEPNP_IPPE if planar else cv2.SOLVEPNP_SQPNP
    ok, rvec, tvec = cv2.solvePnP(obj, img, k, dist, flags=method)
    if not ok:
        return failed
    proj, _ = cv2.projectPoints(obj, rvec, tvec, k, dist)
    err = np.linalg.norm(proj.reshape(-1, 2) - img, axis=1)
    return PnPResult(
        np.asarray(rvec, np.float64).ravel(), np.asarray(tvec, np.float64).ravel(),
        float(np.sqrt(np.mean(err**2))), True,
    )  # fmt: skip


class PoseEstimator:
    """Fills the millimetre fields of tracks: keypoints, part poses, velocities.

    ``templates`` maps a class id to its rigid keypoint template (K_c, 2) in mm
    (part coordinates, using the first K_c keypoints); classes without one (an
    articulated arm) get NaN poses.  Keypoints below ``keypoint_thresh`` are
    unknown (NaN in mm) and do not count in the fit; the others weigh by score.

    Stateful, one per camera: with ``smoothing`` enabled (the default) a part's
    angle is filtered over its track (:class:`OrientationFilter`, keyed by track
    id) and the translation is fitted with the filtered angle, so the reported pose
    does not jitter with the keypoints from frame to frame.  Fits whose residual is
    above ``smoothing.max_residual_mm`` do not move a track's angle; a track without a
    good fit yet keeps its frame-by-frame angle.
    """

    def __init__(self, templates: Mapping[int, npt.ArrayLike],
                 keypoint_thresh: float = 0.3,
                 smoothing: PoseFilterConfig | None = None) -> None:
        self.templates = {int(c): np.asarray(t, np.float64).reshape(-1, 2)
                          for c, t in templates.items()}
        self.keypoint_thresh = float(keypoint_thresh)
        self.smoothing = smoothing or PoseFilterConfig()
        self._filter = OrientationFilter(self.smoothing) if self.smoothing.enabled else None
        self._tables: dict[int, F64] = {}  # keypoints per instance -> (classes, K, 2)

    def update(self, tracks: Tracks, homography: Homography | None) -> Tracks:
        """Tracks with keypoints_mm, poses, pose_residual_mm and velocity_mm_s filled.

        ``pose_residual_mm`` is the RMS distance of the keypoints from the template
        placed at the reported pose.  Without a homography (an uncalibrated camera)
        the tracks come back as they are.
        """
        if homography is None:
            return tracks
        det = tracks.detections
        n, k = len(tracks), det.num_keypoints
        kp = det.keypoints.astype(np.float64)
        visible = kp[:, :, 2] >= self.keypoint_thresh
        mm = np.where(visible[..., None], homography.px_to_mm(kp[:, :, :2]), np.nan)
        fits = np.full((n, 4), np.nan)
        table = self._table(k)
        cls = det.class_ids.astype(np.intp)
        rows = np.flatnonzero((cls >= 0) & (cls < len(table)))
        if len(rows):
            templates = table[cls[rows]]  # (R, K, 2), NaN where a class has no keypoint
            weights = np.where(visible[rows], kp[rows, :, 2], 0.0)
            m = _Moments.of(templates, mm[rows], weights)
            fit = m.pose(m.best_theta())
            if self._filter is not None:
                cfg = self.smoothing
                var = _variance(m, fit[:, 3], cfg.keypoint_sigma_mm, cfg.residual_gain)
                theta = self._filter.filter(tracks.track_ids[rows], cls[rows], fit[:, 2], var,
                                            fit[:, 3])
                fit = np.where(np.isfinite(theta)[:, None],
                               m.pose(np.radians(np.nan_to_num(theta))), fit)
            fits[rows] = fit
        centre = (det.boxes[:, :2] + det.boxes[:, 2:]).astype(np.float64) / 2
        jac = homography.jacobian(centre) if n else np.zeros((0, 2, 2))
        v_mm = np.einsum("nij,nj->ni", jac, tracks.velocity_px_s.astype(np.float64))
        return dataclasses.replace(
            tracks,
            keypoints_mm=mm.astype(np.float32),
            poses=fits[:, :3].astype(np.float32),
            pose_residual_mm=fits[:, 3].astype(np.float32),
            velocity_mm_s=v_mm.astype(np.float32),
        )

    def _table(self, k: int) -> F64:
        """Templates by class id for instances of k keypoints: (classes, k, 2), NaN-padded.

        A class without a template, or with fewer than 2 of the k keypoints, is all NaN
        (its poses stay NaN)."""
        table = self._tables.get(k)
        if table is None:
            size = max(self.templates, default=-1) + 1
            table = np.full((size, k, 2), np.nan)
            for c, template in self.templates.items():
                kc = min(len(template), k)
                if c >= 0 and kc >= 2:
                    table[c, :kc] = template[:kc]
            self._tables[k] = table
        return table
