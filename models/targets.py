"""Training targets and augmentation for ``KeypointNet`` (pure numpy + OpenCV).

``encode(sample, spec)`` turns a :class:`~models.data.Sample` into the dense and
sparse arrays the losses in ``models.train`` read.  Grid coordinates relate to
input pixels by ``x_px = stride * g + (stride - 1) / 2`` (``models.nets.grid_to_px``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from models.data import Sample

# Instances at least this much in view are taught as positives; those under
# NEG_IN_VIEW are background (the model learns not to report mostly-hidden parts,
# whose few keypoints it cannot place well); in between, neither.
POS_IN_VIEW = 0.6
NEG_IN_VIEW = 0.45

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TargetSpec:
    num_classes: int = 3
    num_keypoints: int = 5
    input_hw: tuple[int, int] = (240, 320)
    stride: int = 4
    max_instances: int = 32
    kpt_sigma: float = 0.8  # keypoint heatmap Gaussian, grid cells
    min_centre_sigma: float = 0.6

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.input_hw[0] // self.stride, self.input_hw[1] // self.stride


def px_to_grid(x: npt.NDArray[np.floating] | float, stride: int) -> F32:
    return np.asarray((np.asarray(x, np.float64) - (stride - 1) / 2.0) / stride, np.float32)


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: a corner shift that keeps IoU >= min_overlap."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(max(b1**2 - 4 * a1 * c1, 0.0))) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(max(b2**2 - 4 * a2 * c2, 0.0))) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(max(b3**2 - 4 * a3 * c3, 0.0))) / 2
    return min(r1, r2, r3)


def draw_gaussian(heat: F32, cx: int, cy: int, sigma: float, value: float = 1.0) -> None:
    """Max-combine an (unnormalised) Gaussian peak of height ``value`` at cell (cx, cy)."""
    h, w = heat.shape
    r = max(1, int(math.ceil(3 * sigma)))
    x0, x1 = max(0, cx - r), min(w, cx + r + 1)
    y0, y1 = max(0, cy - r), min(h, cy + r + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ys = np.arange(y0, y1)[:, None] - cy
    xs = np.arange(x0, x1)[None, :] - cx
    g = value * np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma)).astype(np.float32)
    np.maximum(heat[y0:y1, x0:x1], g, out=heat[y0:y1, x0:x1])


def encode(sample: Sample, spec: TargetSpec) -> dict[str, npt.NDArray[np.generic]]:
    """Dense heatmaps and sparse regression targets of one sample.

    Dense: ``hm`` [C, H, W], ``hm_weight`` [C, H, W] (0 around ignored instances and
    those between NEG_IN_VIEW and POS_IN_VIEW in view),
    ``khm`` [C*K, H, W].  Sparse, for up to ``max_instances`` instances (``mask``):
    ``ind`` centre cell, ``wh``, ``off``, ``kreg`` [M, K, 2] (+ ``kreg_mask``), and
    for each visible keypoint its 3x3 neighbourhood ``koff_index`` [M, K, 9] (into
    the flattened per-(class, keypoint) grid, ``chan * H * W + cell``) with
    ``koff`` [M, K, 9, 2] targets and ``koff_mask``.
    """
    c, k, m_max, s = spec.num_classes, spec.num_keypoints, spec.max_instances, spec.stride
    gh, gw = spec.grid_hw
    hm = np.zeros((c, gh, gw), np.float32)
    hm_weight = np.ones((c, gh, gw), np.float32)
    khm = np.zeros((c * k, gh, gw), np.float32)
    ind = np.zeros(m_max, np.int64)
    mask = np.zeros(m_max, np.float32)
    wh = np.zeros((m_max, 2), np.float32)
    off = np.zeros((m_max, 2), np.float32)
    kreg = np.zeros((m_max, k, 2), np.float32)
    kreg_mask = np.zeros((m_max, k), np.float32)
    koff_index = np.zeros((m_max, k, 9), np.int64)
    koff = np.zeros((m_max, k, 9, 2), np.float32)
    koff_mask = np.zeros((m_max, k, 9), np.float32)

    in_h, in_w = spec.input_hw
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(-0.5, in_w - 0.5)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(-0.5, in_h - 0.5)
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    n = 0
    for j in order:
        cls = int(sample.class_ids[j])
        x1, y1, x2, y2 = px_to_grid(boxes[j], s).tolist()
        bw, bh = x2 - x1, y2 - y1
        if bw <= 0 or bh <= 0:
            continue
        gx, gy = (x1 + x2) / 2, (y1 + y2) / 2
        cx = min(max(int(math.floor(gx + 0.5)), 0), gw - 1)
        cy = min(max(int(math.floor(gy + 0.5)), 0), gh - 1)
        radius = max(0.0, gaussian_radius(bh, bw))
        sigma = max(spec.min_centre_sigma, (2 * radius + 1) / 6)
        in_view = float(sample.in_view[j])
        if in_view < NEG_IN_VIEW and not sample.ignore[j]:
            continue
        if sample.ignore[j] or in_view < POS_IN_VIEW:
            r = max(1, int(math.ceil(2 * sigma)))
            hm_weight[cls, max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1] = 0.0
            continue
        if n >= m_max:
            continue
        draw_gaussian(hm[cls], cx, cy, sigma)
        ind[n] = cy * gw + cx
        mask[n] = 1.0
        wh[n] = (bw, bh)
        off[n] = (gx - cx, gy - cy)
        kg = px_to_grid(sample.keypoints[j], s)  # (K, 2)
        kk = min(k, kg.shape[0])
        kreg[n, :kk] = kg[:kk] - np.array([cx, cy], np.float32)
        kreg_mask[n, :kk] = sample.labeled[j, :kk]
        for q in range(kk):
            if not sample.visible[j, q]:
                continue
            kx, ky = float(kg[q, 0]), float(kg[q, 1])
            px, py = int(math.floor(kx + 0.5)), int(math.floor(ky + 0.5))
            if not (0 <= px < gw and 0 <= py < gh):
                continue
            chan = cls * k + q
            draw_gaussian(khm[chan], px, py, spec.kpt_sigma)
            t = 0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    qx, qy = px + dx, py + dy
                    if 0 <= qx < gw and 0 <= qy < gh:
                        koff_index[n, q, t] = chan * gh * gw + qy * gw + qx
                        koff[n, q, t] = (kx - qx, ky - qy)
                        koff_mask[n, q, t] = 1.0 if (dx, dy) == (0, 0) else 0.5
                    t += 1
        n += 1
    return {
        "hm": hm, "hm_weight": hm_weight, "khm": khm, "ind": ind, "mask": mask, "wh": wh,
        "off": off, "kreg": kreg, "kreg_mask": kreg_mask, "koff_index": koff_index,
        "koff": koff, "koff_mask": koff_mask,
    }


# --- augmentation ------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentSpec:
    scale: tuple[float, float] = (0.85, 1.2)
    shift_px: float = 24.0
    rotate_deg: float = 0.0
    prob_geometric: float = 0.6
    brightness: float = 0.25
    contrast: float = 0.25
    noise_sigma: float = 4.0
    prob_blur: float = 0.15


@functools.lru_cache(maxsize=4)
def _noise_bank(shape: tuple[int, ...]) -> F32:
    """Unit Gaussian noise of one image's shape (rolled by a random amount per use)."""
    return np.random.default_rng(12345).standard_normal(shape).astype(np.float32)


def augment(sample: Sample, rng: np.random.Generator, spec: AugmentSpec) -> Sample:
    """Random scale/shift(/rotation) and photometric jitter; returns a new sample."""
    image = sample.image
    h, w = image.shape[:2]
    boxes, kpts, visible = sample.boxes, sample.keypoints, sample.visible
    in_view = sample.in_view
    if rng.random() < spec.prob_geometric:
        s = float(rng.uniform(*spec.scale))
        angle = float(rng.uniform(-spec.rotate_deg, spec.rotate_deg)) if spec.rotate_deg else 0.0
        cx, cy = (w - 1) / 2 + rng.uniform(-1, 1) * spec.shift_px, (h - 1) / 2 + rng.uniform(
            -1, 1
        ) * spec.shift_px
        mat = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, s)
        mat[0, 2] += (w - 1) / 2 - cx
        mat[1, 2] += (h - 1) / 2 - cy
        image = np.asarray(cv2.warpAffine(image, mat, (w, h), flags=cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_REPLICATE), np.uint8)
        kpts = (kpts @ mat[:, :2].T + mat[:, 2]).astype(np.float32)
        corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2) @ mat[:, :2].T + mat[:, 2]
        new_boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1).astype(np.float32)
        area0 = np.prod(new_boxes[:, 2:] - new_boxes[:, :2], axis=1)
        clipped = new_boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(-0.5, w - 0.5)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(-0.5, h - 0.5)
        area1 = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
        frac = area1 / np.maximum(area0, 1e-6)
        in_view = (in_view * np.clip(frac, 0.0, 1.0)).astype(np.float32)
        boxes = clipped
        inside = (
            (kpts[..., 0] >= -0.5) & (kpts[..., 0] <= w - 0.5)
            & (kpts[..., 1] >= -0.5) & (kpts[..., 1] <= h - 0.5)
        )
        visible = visible & inside
    # contrast, brightness and a per-channel gain as one lookup table per channel
    alpha = 1.0 + float(rng.uniform(-spec.contrast, spec.contrast))
    beta = 255.0 * float(rng.uniform(-spec.brightness, spec.brightness)) * 0.5
    gain = 1.0 + rng.uniform(-0.08, 0.08, 3)
    levels = np.arange(256, dtype=np.float64)
    lut = np.clip(((levels - 128.0) * alpha + 128.0 + beta)[None, :] * gain[:, None], 0, 255)
    lut_u8 = np.round(lut).astype(np.uint8).T.reshape(256, 1, 3)
    out = np.asarray(cv2.LUT(image, lut_u8), np.uint8)
    if spec.noise_sigma > 0:
        sigma = float(rng.uniform(0, spec.noise_sigma))
        bank = _noise_bank(out.shape)
        shift = int(rng.integers(0, bank.shape[0]))
        noise = np.roll(bank, shift, axis=0) * np.float32(sigma)
        out = np.clip(out + noise, 0, 255).astype(np.uint8)
    if rng.random() < spec.prob_blur:
        ksize = int(rng.choice([3, 5]))
        out = np.asarray(cv2.GaussianBlur(out, (ksize, ksize), 0), np.uint8)
    return Sample(
        image=out,
        class_ids=sample.class_ids,
        boxes=boxes,
        keypoints=kpts,
        visible=visible,
        labeled=sample.labeled,
        ignore=sample.ignore,
        in_view=in_view,
        meta=sample.meta,
    )
