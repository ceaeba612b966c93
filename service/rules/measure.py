"""Pure numpy measurements the rules judge: positions, zones, angles, crossings.

Everything here is a function of arrays; nothing keeps state.  Angles are degrees,
coordinates are whatever unit the caller works in (mm on the work plane, or px).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.domain import Tracks

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]


def points_in_polygon(points: F64, polygon: F64) -> Bool:
    """Which of ``points`` (N, 2) lie inside ``polygon`` (M, 2) (even-odd rule).

    NaN points are outside.  Points exactly on an edge may fall either way.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, np.float64).reshape(-1, 2)
    if not len(pts):
        return np.zeros(0, bool)
    x, y = pts[:, 0:1], pts[:, 1:2]  # (N, 1)
    x0, y0 = poly[:, 0], poly[:, 1]  # (M,)
    nxt = np.concatenate((poly[1:], poly[:1]))  # each edge's end point
    x1, y1 = nxt[:, 0], nxt[:, 1]
    straddles = (y0 > y) != (y1 > y)  # (N, M); a horizontal edge never straddles
    dy = np.where(y1 == y0, 1.0, y1 - y0)
    x_cross = x0 + (y - y0) * ((x1 - x0) / dy)
    hits = straddles & (x < x_cross)
    inside: Bool = (np.count_nonzero(hits, axis=1) % 2 == 1) & np.isfinite(pts).all(axis=1)
    return inside


def visible_mask(tracks: Tracks, min_score: float) -> Bool:
    """(N, K) keypoints seen with a score of at least ``min_score``."""
    kp = tracks.detections.keypoints
    mask: Bool = np.isfinite(kp[..., :2]).all(axis=-1) & (kp[..., 2] >= min_score)
    return mask


def keypoints_in(tracks: Tracks, units: str) -> F64 | None:
    """(N, K, 2) keypoints in ``units`` ("mm" or "px"); None when mm are unknown."""
    if units == "px":
        return tracks.detections.keypoints[..., :2].astype(np.float64)
    if tracks.keypoints_mm is None:
        return None
    k = tracks.detections.num_keypoints
    return np.asarray(tracks.keypoints_mm, np.float64).reshape(len(tracks), k, 2)


def part_positions(tracks: Tracks, units: str, min_score: float) -> F64 | None:
    """(N, 2) one position per track: the pose (mm) where fitted, else the mean of the
    visible keypoints, else (px only) the box centre.  NaN where unknown; None when
    millimetres are asked for and the camera has none."""
    n = len(tracks)
    kp = keypoints_in(tracks, units)
    if kp is None:
        return None
    vis = visible_mask(tracks, min_score)
    counts = np.asarray(vis, np.int64).sum(axis=1)
    total = np.where(vis[..., None], kp, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / counts[:, None]
    out = np.where(counts[:, None] > 0, mean, np.nan)
    if units == "mm" and tracks.poses is not None:
        poses = np.asarray(tracks.poses, np.float64).reshape(n, 3)[:, :2]
        fitted = np.asarray(np.isfinite(poses).all(axis=1), bool)
        out = np.where(fitted[:, None], poses, out)
    if units == "px":
        boxes = tracks.detections.boxes.astype(np.float64)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        known = np.asarray(np.isfinite(out).all(axis=1), bool)
        out = np.where(known[:, None], out, centres)
    result: F64 = np.asarray(out, np.float64).reshape(n, 2)
    return result


def class_mask(class_ids: npt.NDArray[np.int32], wanted: Sequence[int]) -> Bool:
    """(N,) tracks whose class is in ``wanted`` (empty: every class)."""
    if not wanted:
        return np.ones(len(class_ids), bool)
    mask: Bool = class_ids == wanted[0]
    for c in wanted[1:]:  # a few classes: cheaper than np.isin on a few tracks
        mask |= class_ids == c
    return mask


def angle_error_deg(theta: F64, target_deg: float, symmetry_deg: float = 360.0) -> F64:
    """|theta - target| wrapped into [0, symmetry/2]: a part with an n-fold symmetry
    (symmetry 360/n) looks the same turned by ``symmetry_deg``."""
    d = np.mod(np.asarray(theta, np.float64) - target_deg + symmetry_deg / 2, symmetry_deg)
    err: F64 = np.abs(d - symmetry_deg / 2)
    return err


def distance_to_point(points: F64, target: Sequence[float]) -> F64:
    d: F64 = np.hypot(points[:, 0] - target[0], points[:, 1] - target[1])
    return d


def distance_to_line(points: F64, a: Sequence[float], b: Sequence[float]) -> F64:
    """Distance of ``points`` (N, 2) to the infinite line through ``a`` and ``b``."""
    ab = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    rel = points - np.asarray(a, np.float64)
    d: F64 = np.abs(ab[0] * rel[:, 1] - ab[1] * rel[:, 0]) / float(np.hypot(*ab))
    return d


def link_angle_deg(p0: F64, p1: F64) -> F64:
    """Direction of the link p0 -> p1 from +X, in (-180, 180]."""
    d = p1 - p0
    a: F64 = np.degrees(np.arctan2(d[..., 1], d[..., 0]))
    return a


def wrap_deg(angle: F64) -> F64:
    """Angles wrapped into (-180, 180]."""
    w: F64 = 180.0 - np.mod(180.0 - np.asarray(angle, np.float64), 360.0)
    return w


def chain_angle_deg(chain: F64) -> F64:
    """(..., 2|3, 2) keypoint chains -> angle: a 2-point chain gives the link's
    direction; a 3-point chain the signed turn of link 2 relative to link 1
    (counter-clockwise positive in a right-handed frame)."""
    if chain.shape[-2] == 2:
        return link_angle_deg(chain[..., 0, :], chain[..., 1, :])
    first = link_angle_deg(chain[..., 0, :], chain[..., 1, :])
    second = link_angle_deg(chain[..., 1, :], chain[..., 2, :])
    return wrap_deg(second - first)


def signed_side(points: F64, a: Sequence[float], normal: Sequence[float]) -> F64:
    """Signed distance of ``points`` from the line through ``a`` along unit ``normal``."""
    s: F64 = (points[:, 0] - a[0]) * normal[0] + (points[:, 1] - a[1]) * normal[1]
    return s


def crossing_normal(
    a: Sequence[float], b: Sequence[float], direction: Sequence[float] | None
) -> tuple[float, float]:
    """Unit normal of the line a -> b pointing to the side a counted crossing goes to:
    ``direction``'s side, or (dy, -dx) of a -> b when none is given."""
    dx, dy = float(b[0] - a[0]), float(b[1] - a[1])
    n = np.array([dy, -dx]) / float(np.hypot(dx, dy))
    if direction is not None and float(np.dot(n, direction)) < 0:
        n = -n
    return float(n[0]), float(n[1])


def crossing_within_segment(
    p_prev: F64, p_now: F64, a: Sequence[float], b: Sequence[float], margin: float = 0.0
) -> bool:
    """Whether the move p_prev -> p_now crosses the line a-b within the segment
    (extended by ``margin`` at both ends); assumes the sides differ."""
    av, bv = np.asarray(a, np.float64), np.asarray(b, np.float64)
    seg = bv - av
    length = float(np.hypot(*seg))
    nrm = np.array([seg[1], -seg[0]]) / length
    s0, s1 = float(np.dot(p_prev - av, nrm)), float(np.dot(p_now - av, nrm))
    if s0 == s1:
        return False
    u = s0 / (s0 - s1)
    q = p_prev + u * (p_now - p_prev)
    along = float(np.dot(q - av, seg / length))
    return -margin <= along <= length + margin


def median_speed_along(velocity: F64, direction: Sequence[float]) -> float | None:
    """Median of the velocities' components along ``direction``; None if none is finite."""
    dvec = np.asarray(direction, np.float64)
    unit = dvec / float(np.hypot(dvec[0], dvec[1]))
    along = velocity @ unit
    along = along[np.isfinite(along)]
    if along.size == 0:
        return None
    return float(np.median(along))
