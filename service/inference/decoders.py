"""Pure numpy decoders for model outputs (no ONNX Runtime, no torch).

Every function works on whole arrays (all anchors, all instances, all keypoints at
once) and returns coordinates in *model-input pixels* with the pixel-centre
convention of :mod:`service.domain`; adapters map them to the original frame.

- :func:`nms` / :func:`decode_ultralytics_pose`: Ultralytics raw YOLO-pose output
  ``[4 + C + K*D, A]`` (cx, cy, w, h, class scores, keypoints), decoded exactly as
  Ultralytics' ``non_max_suppression`` does (best class per anchor, ``conf >``
  threshold, class-aware NMS by offsetting boxes per class, ``IoU >`` threshold
  suppresses, at most ``max_det``).
- :func:`decode_simcc`: RTMPose SimCC, argmax per axis divided by the split ratio;
  score = mean (rtmlib's 2-D rule) or min of the two per-axis maxima.
- :func:`decode_heatmaps`: argmax with sub-pixel refinement (DARK: second-order
  Taylor expansion of the log heatmap; or the quadratic per-axis fit).
- :func:`decode_regression`: direct keypoint outputs described by an output spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# Ultralytics offsets boxes by class * MAX_WH for class-aware NMS in one pass.
MAX_WH = 7680.0
SimccScore = Literal["mean", "min"]
Refine = Literal["dark", "quadratic", "none"]


# --- NMS and Ultralytics raw pose --------------------------------------------------------


# Up to this many boxes NMS computes every pair's IoU at once (a few numpy calls) and then
# only walks a boolean matrix; above it (a low threshold on a raw output), one row at a time.
PAIRWISE_NMS_MAX = 512


def box_iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(4,)`` xyxy box with ``(N, 4)`` boxes (areas as in torchvision)."""
    return _iou(box[None, :], boxes)[0]


def box_iou_pairs(boxes: np.ndarray) -> np.ndarray:
    """``(N, N)`` IoU of every pair of ``(N, 4)`` xyxy boxes (the values of
    :func:`box_iou_one`, row by row)."""
    return _iou(boxes, boxes)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(..., M, N)`` IoU of ``(..., M, 4)`` and ``(..., N, 4)`` xyxy boxes (0 where the
    union is 0); leading dimensions are batches of images."""
    a4, b4 = a[..., :, None, :], b[..., None, :, :]
    w = np.maximum(np.minimum(a4[..., 2], b4[..., 2]) - np.maximum(a4[..., 0], b4[..., 0]), 0)
    h = np.maximum(np.minimum(a4[..., 3], b4[..., 3]) - np.maximum(a4[..., 1], b4[..., 1]), 0)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    positive = union > 0
    return np.where(positive, inter / np.where(positive, union, 1.0), 0.0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    class_ids: np.ndarray | None = None,
    max_det: int | None = None,
) -> IntArray:
    """Greedy NMS: indices kept, best score first; ``IoU > iou_threshold`` suppresses.

    With ``class_ids``, boxes of different classes never suppress each other
    (boxes are offset by ``class * MAX_WH`` as Ultralytics does).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    s = np.asarray(scores, np.float64).reshape(-1)
    if b.shape[0] == 0:
        return np.zeros((0,), np.int64)
    if class_ids is not None:
        b = b + (np.asarray(class_ids, np.float64).reshape(-1, 1) * MAX_WH)
    order = np.argsort(-s, kind="stable")
    limit = max_det if max_det is not None else b.shape[0]
    if b.shape[0] <= PAIRWISE_NMS_MAX:
        return _nms_pairwise(b[order], limit, iou_threshold, order)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou_one(b[i], b[rest]) <= iou_threshold]
    return np.asarray(keep, np.int64)


def _nms_pairwise(
    ranked: np.ndarray, limit: int, iou_threshold: float, order: np.ndarray
) -> IntArray:
    """Greedy NMS over boxes already sorted best first, from their IoU matrix."""
    suppresses = box_iou_pairs(ranked) > iou_threshold
    alive = np.ones(ranked.shape[0], bool)
    keep: list[int] = []
    for i in range(ranked.shape[0]):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        alive &= ~suppresses[i]
    return order[np.asarray(keep, np.int64)].astype(np.int64)


@dataclass(frozen=True, slots=True)
class Decoded:
    """Instances of one image in model-input pixels: boxes xyxy, scores, classes, (N, K, 3)."""

    boxes: FloatArray
    scores: FloatArray
    class_ids: npt.NDArray[np.int32]
    keypoints: FloatArray

    @classmethod
    def empty(cls, num_keypoints: int) -> Decoded:
        return cls(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
            np.zeros((0,), np.int32), np.zeros((0, num_keypoints, 3), np.float32),
        )


def _corners(xywh: np.ndarray) -> np.ndarray:
    """``(N, 4)`` centre x, y, width, height -> x1, y1, x2, y2 (same dtype)."""
    boxes = np.empty_like(xywh)
    boxes[:, 0:2] = xywh[:, 0:2] - xywh[:, 2:4] / 2
    boxes[:, 2:4] = xywh[:, 0:2] + xywh[:, 2:4] / 2
    return boxes


def decode_ultralytics_pose(
    pred: np.ndarray,
    num_classes: int,
    kpt_shape: tuple[int, int],
    conf_threshold: float,
    iou_threshold: float,
    max_det: int = 300,
    agnostic: bool = False,
    max_candidates: int = 30000,
) -> Decoded:
    """One image's raw output ``[4 + C + K*D, A]`` -> instances after NMS.

    Coordinates stay in Ultralytics' convention (edge: the image spans 0..W); the
    caller shifts them to pixel centres.
    """
    k, d = kpt_shape
    p = np.asarray(pred, np.float32)
    if p.ndim != 2 or p.shape[0] != 4 + num_classes + k * d:
        raise ValueError(
            f"expected [4 + {num_classes} + {k}*{d}, A] = [{4 + num_classes + k * d}, A], "
            f"got {list(p.shape)}"
        )
    cls_scores = p[4:4 + num_classes]
    conf = cls_scores.max(axis=0)
    cand = np.flatnonzero(conf > conf_threshold)
    if cand.size == 0:
        return Decoded.empty(k)
    cand = cand[np.argsort(-conf[cand], kind="stable")[:max_candidates]]
    sel = p[:, cand].T  # (n, 4 + C + K*D)
    boxes = _corners(sel[:, 0:4])
    scores = conf[cand]
    classes = cls_scores[:, cand].argmax(axis=0).astype(np.int32)
    keep = nms(boxes, scores, iou_threshold, None if agnostic else classes, max_det)
    kp = sel[keep, 4 + num_classes:].reshape(keep.size, k, d)  # k = 0: a detect model
    keypoints = np.ones((keep.size, k, 3), np.float32)
    keypoints[..., : min(d, 3)] = kp[..., : min(d, 3)]
    return Decoded(
        boxes[keep].astype(np.float32), scores[keep].astype(np.float32), classes[keep], keypoints
    )


# Above this many candidates in one image, the batch decoder hands the batch to the
# per-image one (its greedy walk takes one step per candidate of the fullest image).
BATCH_NMS_MAX = 256


def decode_ultralytics_pose_batch(
    pred: np.ndarray,
    num_classes: int,
    kpt_shape: tuple[int, int],
    conf_threshold: float,
    iou_threshold: float,
    max_det: int = 300,
    agnostic: bool = False,
    max_candidates: int = 30000,
) -> list[Decoded]:
    """A batch's raw outputs ``[B, 4 + C + K*D, A]`` -> each image's instances: the
    results of :func:`decode_ultralytics_pose` on each image, computed for the whole batch
    at once (candidates of every image in one pass, every image's IoU matrix in one array,
    one greedy step per rank for all images together), which costs a fraction of the
    Python calls.  A batch with an image of more than ``BATCH_NMS_MAX`` candidates (a very
    low threshold) is decoded image by image."""
    p = np.asarray(pred, np.float32)
    k, d = kpt_shape
    rows = 4 + num_classes + k * d
    if p.ndim != 3 or p.shape[1] != rows:
        raise ValueError(f"expected [B, 4 + {num_classes} + {k}*{d}, A] = [B, {rows}, A], "
                         f"got {list(p.shape)}")
    batch = p.shape[0]
    conf = p[:, 4:4 + num_classes, :].max(axis=1)  # (B, A)
    img, anchor = np.nonzero(conf > conf_threshold)  # by image, then anchor
    if img.size == 0:
        return [Decoded.empty(k) for _ in range(batch)]
    score = conf[img, anchor]
    order = np.lexsort((-score, img))  # by image, best first; ties: the lower anchor first
    img, anchor, score = img[order], anchor[order], score[order]
    counts = np.bincount(img, minlength=batch)
    starts = np.cumsum(counts) - counts
    rank = np.arange(img.size) - starts[img]
    if counts.max() > max_candidates:
        capped = rank < max_candidates
        img, anchor, score, rank = img[capped], anchor[capped], score[capped], rank[capped]
        counts = np.minimum(counts, max_candidates)
        starts = np.cumsum(counts) - counts
    widest = int(counts.max())
    if widest > BATCH_NMS_MAX:
        return [decode_ultralytics_pose(p[b], num_classes, kpt_shape, conf_threshold,
                                        iou_threshold, max_det, agnostic, max_candidates)
                for b in range(batch)]
    sel = p[img, :, anchor]  # (N, rows)
    boxes = _corners(sel[:, 0:4])
    classes = sel[:, 4:4 + num_classes].argmax(axis=1).astype(np.int32)
    offset = boxes.astype(np.float64)
    if not agnostic:
        offset = offset + classes.astype(np.float64).reshape(-1, 1) * MAX_WH
    grid = np.zeros((batch, widest, 4))
    grid[img, rank] = offset
    valid = np.zeros((batch, widest), bool)
    valid[img, rank] = True
    suppresses = _iou(grid, grid) > iou_threshold  # (B, M, M): each image's pairs
    alive, kept = valid, np.zeros_like(valid)
    for r in range(widest):  # greedy NMS, one rank of every image at a time
        kept[:, r] = alive[:, r]
        alive = alive & ~(suppresses[:, r, :] & kept[:, r, None])
    kept &= np.cumsum(kept, axis=1) <= max_det
    position = np.zeros((batch, widest), np.int64)
    position[img, rank] = np.arange(img.size)
    chosen = position[kept]  # image by image, best first
    kp = sel[chosen, 4 + num_classes:].reshape(chosen.size, k, d)
    keypoints = np.ones((chosen.size, k, 3), np.float32)
    keypoints[..., : min(d, 3)] = kp[..., : min(d, 3)]
    cuts = np.cumsum(kept.sum(axis=1))[:-1]
    return [
        Decoded(b, s, c, kps) for b, s, c, kps in zip(
            np.split(boxes[chosen], cuts), np.split(score[chosen], cuts),
            np.split(classes[chosen], cuts), np.split(keypoints, cuts), strict=True,
        )
    ]


# --- SimCC ------------------------------------------------------------------------------


def decode_simcc(
    simcc_x: np.ndarray,
    simcc_y: np.ndarray,
    split_ratio: float = 2.0,
    score: SimccScore = "mean",
) -> tuple[FloatArray, FloatArray]:
    """``(N, K, Wx)``, ``(N, K, Wy)`` -> keypoints ``(N, K, 2)`` in input px and scores ``(N, K)``.

    Locations are ``argmax / split_ratio``; the score combines the two per-axis maxima
    (``mean``: rtmlib's ``get_simcc_maximum``; ``min``: its 3-D variant).
    """
    sx = np.asarray(simcc_x, np.float32)
    sy = np.asarray(simcc_y, np.float32)
    locs = np.stack([sx.argmax(axis=-1), sy.argmax(axis=-1)], axis=-1).astype(np.float32)
    mx, my = sx.max(axis=-1), sy.max(axis=-1)
    vals = 0.5 * (mx + my) if score == "mean" else np.minimum(mx, my)
    return locs / np.float32(split_ratio), vals.astype(np.float32)


# --- heatmaps ---------------------------------------------------------------------------


def decode_heatmaps(
    heatmaps: np.ndarray, refine: Refine = "dark", blur_kernel: int = 3
) -> tuple[FloatArray, FloatArray]:
    """``(N, K, H, W)`` -> peak locations ``(N, K, 2)`` in heatmap px (x, y) and scores.

    ``dark``: Gaussian-blur a copy, then one Newton step on the log heatmap (second-order
    Taylor expansion, DARK); ``quadratic``: a parabola through the peak and its two
    neighbours, per axis; ``none``: the integer argmax.
    """
    hm = np.asarray(heatmaps, np.float32)
    n, k, h, w = hm.shape
    flat = hm.reshape(n, k, h * w)
    idx = flat.argmax(axis=-1)
    scores = np.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
    xs = (idx % w).astype(np.int64)
    ys = (idx // w).astype(np.int64)
    locs = np.stack([xs, ys], axis=-1).astype(np.float32)
    if refine == "none" or h < 3 or w < 3:
        return locs, scores.astype(np.float32)
    if refine == "dark":
        src = hm.copy()
        if blur_kernel > 1:
            for hmap in src.reshape(n * k, h, w):
                cv2.GaussianBlur(hmap, (blur_kernel, blur_kernel), 0, dst=hmap)
        src = np.log(np.clip(src, 1e-10, None))
    else:
        src = hm
    pad = np.pad(src, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    bi = np.arange(n)[:, None]
    ki = np.arange(k)[None, :]
    cx, cy = xs + 1, ys + 1

    def at(dx: int, dy: int) -> np.ndarray:
        return np.asarray(pad[bi, ki, cy + dy, cx + dx], np.float64)

    c = at(0, 0)
    dx = 0.5 * (at(1, 0) - at(-1, 0))
    dy = 0.5 * (at(0, 1) - at(0, -1))
    dxx = at(1, 0) - 2 * c + at(-1, 0)
    dyy = at(0, 1) - 2 * c + at(0, -1)
    if refine == "quadratic":
        ox = np.where(dxx < 0, -dx / np.where(dxx < 0, dxx, 1.0), 0.0)
        oy = np.where(dyy < 0, -dy / np.where(dyy < 0, dyy, 1.0), 0.0)
    else:
        dxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
        det = dxx * dyy - dxy * dxy
        ok = (det > 1e-12) & (dxx < 0)
        safe = np.where(ok, det, 1.0)
        ox = np.where(ok, -(dyy * dx - dxy * dy) / safe, 0.0)
        oy = np.where(ok, -(dxx * dy - dxy * dx) / safe, 0.0)
    off = np.stack([np.clip(ox, -1, 1), np.clip(oy, -1, 1)], axis=-1)
    return (locs + off).astype(np.float32), scores.astype(np.float32)


def heatmap_to_input(locs: np.ndarray, heatmap_hw: tuple[int, int], input_hw: tuple[int, int]) -> (
    FloatArray
):
    """Heatmap pixels -> input pixels (pixel-centre convention on both grids)."""
    sx = input_hw[1] / heatmap_hw[1]
    sy = input_hw[0] / heatmap_hw[0]
    out = np.empty_like(np.asarray(locs, np.float32))
    out[..., 0] = (locs[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (locs[..., 1] + 0.5) * sy - 0.5
    return out


# --- direct regression --------------------------------------------------------------------

RegressionLayout = Literal["BNKV", "BKV", "BF"]
CoordSpace = Literal["normalized", "pixel"]
AxisOrder = Literal["xy", "yx"]


def decode_regression(
    output: np.ndarray,
    num_keypoints: int,
    layout: RegressionLayout,
    coords: CoordSpace,
    axis_order: AxisOrder,
    score_index: int | None,
    input_hw: tuple[int, int],
    values_per_keypoint: int | None = None,
) -> FloatArray:
    """Direct keypoint output -> ``(B, N, K, 3)`` (x, y, score) in input pixels.

    ``layout``: ``BNKV`` (batch, instances, keypoints, values), ``BKV`` (one instance),
    ``BF`` (one instance, K*V values flat). ``normalized`` coordinates span the input
    (0 = left/top edge, 1 = right/bottom edge); ``pixel`` ones are pixel centres. The
    score sits at ``score_index`` (None: score 1); the first two other values are the
    coordinates, in ``axis_order``.
    """
    out = np.asarray(output, np.float32)
    if layout == "BF":
        v = values_per_keypoint or out.shape[-1] // max(1, num_keypoints)
        out = out.reshape(out.shape[0], 1, num_keypoints, v)
    elif layout == "BKV":
        out = out.reshape(out.shape[0], 1, *out.shape[1:])
    if out.ndim != 4 or out.shape[2] != num_keypoints:
        raise ValueError(
            f"output of shape {list(np.asarray(output).shape)} does not fit layout {layout} "
            f"with {num_keypoints} keypoints"
        )
    slots = [i for i in range(out.shape[3]) if i != score_index][:2]
    if len(slots) < 2:
        raise ValueError(f"output has {out.shape[3]} values per keypoint; need 2 coordinates")
    first, second = slots if axis_order == "xy" else slots[::-1]
    x = out[..., first]
    y = out[..., second]
    if coords == "normalized":
        x = x * np.float32(input_hw[1]) - np.float32(0.5)
        y = y * np.float32(input_hw[0]) - np.float32(0.5)
    score = out[..., score_index] if score_index is not None else np.ones_like(x)
    return np.stack([x, y, score], axis=-1).astype(np.float32)
