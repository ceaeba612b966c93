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

F64 = npt.NDArray[np.float64]


def _wrap_deg(angle: npt.ArrayLike) -> F64:
    """Angles in degrees -> [-180, 180)."""
    return np.asarray((np.asarray(angle, np.float64) + 180.0) % 360.0 - 180.0, np.float64)


def fit_rigid_2d_batch(templates: npt.ArrayLike, points: npt.ArrayLike,
                       weights: npt.ArrayLike) -> F64:
    """Weighted rigid fits (rotation + translation, no scale) of N instances at once.

    templates (N, K, 2) or (K, 2) in part coordinates, points (N, K, 2) on the work
    plane, weights (N, K) >= 0 (0, or a NaN point, leaves a keypoint out).  Returns
    (N, 4): x, y, theta_deg (the pose that maps the template onto the points) and
    the weighted RMS residual; a row is NaN when fewer than 2 keypoints count.
    """
    p = np.asarray(points, np.float64)
    q = np.broadcast_to(np.asarray(templates, np.float64), p.shape)
    w = np.asarray(weights, np.float64).reshape(p.shape[:2])
    usable = (w > 0) & np.isfinite(p).all(axis=2) & np.isfinite(q).all(axis=2)
    w = np.where(usable, w, 0.0)
    p = np.where(usable[..., None], p, 0.0)
    q = np.where(usable[..., None], q, 0.0)
    enough = usable.sum(axis=1) >= 2
    sw = np.where(enough, w.sum(axis=1), 1.0)[:, None]
    cq = (w[..., None] * q).sum(axis=1) / sw
    cp = (w[..., None] * p).sum(axis=1) / sw
    a = q - cq[:, None, :]
    b = p - cp[:, None, :]
    dot = (w * (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1])).sum(axis=1)
    cross = (w * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])).sum(axis=1)
    theta = np.arctan2(cross, dot)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)  # (N, 2, 2)
    t = cp - np.einsum("nij,nj->ni", rot, cq)
    fitted = np.einsum("nij,nkj->nki", rot, q) + t[:, None, :]
    sq = ((fitted - p) ** 2).sum(axis=2)
    rms = np.sqrt((w * sq).sum(axis=1) / sw[:, 0])
    out = np.column_stack([t, _wrap_deg(np.degrees(theta)), rms])
    out[~enough] = np.nan
    return out


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
    """

    def __init__(self, templates: Mapping[int, npt.ArrayLike],
                 keypoint_thresh: float = 0.3) -> None:
        self.templates = {int(c): np.asarray(t, np.float64).reshape(-1, 2)
                          for c, t in templates.items()}
        self.keypoint_thresh = float(keypoint_thresh)

    def update(self, tracks: Tracks, homography: Homography | None) -> Tracks:
        """Tracks with keypoints_mm, poses, pose_residual_mm and velocity_mm_s filled.

        Without a homography (an uncalibrated camera) the tracks come back as they are.
        """
        if homography is None:
            return tracks
        det = tracks.detections
        n, k = len(tracks), det.num_keypoints
        kp = det.keypoints.astype(np.float64)
        visible = kp[:, :, 2] >= self.keypoint_thresh
        mm = np.where(visible[..., None], homography.px_to_mm(kp[:, :, :2]), np.nan)
        fits = np.full((n, 4), np.nan)
        for cls, template in self.templates.items():
            rows = np.flatnonzero(det.class_ids == cls)
            kc = min(len(template), k)
            if len(rows) and kc >= 2:
                weights = np.where(visible[rows, :kc], kp[rows, :kc, 2], 0.0)
                fits[rows] = fit_rigid_2d_batch(template[:kc], mm[rows, :kc], weights)
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
