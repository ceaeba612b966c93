"""Association costs and assignment (pure numpy + scipy), used by the tracker.

The similarity of a track and a detection mixes box IoU with keypoint similarity
(OKS, as in COCO's keypoint metric) over the keypoints visible in both; pairs of
different classes are never matched.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

F64 = npt.NDArray[np.float64]
Int = npt.NDArray[np.intp]

_FORBIDDEN = 1e6


def iou_matrix(a: npt.ArrayLike, b: npt.ArrayLike) -> F64:
    """IoU of boxes a (N, 4) and b (M, 4), x1 y1 x2 y2 -> (N, M)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    wh = np.maximum(np.minimum(a[:, None, 2:], b[None, :, 2:])
                    - np.maximum(a[:, None, :2], b[None, :, :2]), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    size_a = np.maximum(a[:, 2:] - a[:, :2], 0.0)
    size_b = np.maximum(b[:, 2:] - b[:, :2], 0.0)
    union = (size_a[:, 0] * size_a[:, 1])[:, None] + size_b[:, 0] * size_b[:, 1] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def oks_matrix(
    kp_a: npt.ArrayLike,
    kp_b: npt.ArrayLike,
    areas_b: npt.ArrayLike,
    sigma: float,
    keypoint_thresh: float,
) -> tuple[F64, npt.NDArray[np.bool_]]:
    """Object keypoint similarity of keypoints a (N, K, 3) and b (M, K, 3).

    ``areas_b`` (M,) is the scale (box area, px^2) of each b.  Returns the OKS
    (N, M) averaged over the keypoints visible (score >= thresh) in both, and a
    mask of the pairs that share at least one visible keypoint.
    """
    a = np.asarray(kp_a, np.float64)
    b = np.asarray(kp_b, np.float64)
    n, m = a.shape[0], b.shape[0]
    if a.shape[1] == 0 or n == 0 or m == 0:
        return np.zeros((n, m)), np.zeros((n, m), bool)
    d2 = np.sum((a[:, None, :, :2] - b[None, :, :, :2]) ** 2, axis=3)  # (N, M, K)
    vis = (a[:, None, :, 2] >= keypoint_thresh) & (b[None, :, :, 2] >= keypoint_thresh)
    vis &= np.isfinite(d2)
    scale = 2.0 * np.maximum(np.asarray(areas_b, np.float64), 1.0) * sigma**2  # (M,)
    e = np.exp(-np.where(vis, d2, 0.0) / scale[None, :, None])
    count = vis.sum(axis=2)
    total = np.where(vis, e, 0.0).sum(axis=2)
    oks = np.divide(total, count, out=np.zeros((n, m)), where=count > 0)
    return oks, count > 0


def similarity_matrix(
    boxes_a: npt.ArrayLike,
    kp_a: npt.ArrayLike,
    cls_a: npt.ArrayLike,
    boxes_b: npt.ArrayLike,
    kp_b: npt.ArrayLike,
    cls_b: npt.ArrayLike,
    *,
    oks_weight: float,
    oks_sigma: float,
    keypoint_thresh: float,
) -> F64:
    """(N, M) similarity in [0, 1]: IoU mixed with OKS where keypoints overlap.

    Pairs of different classes get -1 (never matched).
    """
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    iou = iou_matrix(boxes_a, b)
    size = np.maximum(b[:, 2:] - b[:, :2], 0.0)
    areas = size[:, 0] * size[:, 1]
    sim = iou
    if oks_weight > 0:
        oks, has = oks_matrix(kp_a, kp_b, areas, oks_sigma, keypoint_thresh)
        sim = np.where(has, (1.0 - oks_weight) * iou + oks_weight * oks, iou)
    same = np.asarray(cls_a).reshape(-1, 1) == np.asarray(cls_b).reshape(1, -1)
    return np.where(same, sim, -1.0)


def assign(cost: npt.ArrayLike, max_cost: float) -> tuple[Int, Int, Int]:
    """Minimum-cost matching with pairs above ``max_cost`` forbidden.

    Returns (matches (P, 2) of row, column), unmatched rows, unmatched columns.
    """
    c = np.asarray(cost, np.float64)
    n, m = c.shape
    if n == 0 or m == 0:
        return np.zeros((0, 2), np.intp), np.arange(n), np.arange(m)
    allowed = c <= max_cost
    rows, cols = linear_sum_assignment(np.where(allowed, c, _FORBIDDEN))
    keep = allowed[rows, cols]
    matches = np.column_stack([rows[keep], cols[keep]]).astype(np.intp)
    free_rows = np.ones(n, bool)
    free_rows[matches[:, 0]] = False
    free_cols = np.ones(m, bool)
    free_cols[matches[:, 1]] = False
    return matches, np.flatnonzero(free_rows), np.flatnonzero(free_cols)
