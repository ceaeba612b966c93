"""Decoders: NMS against a brute-force reference, SimCC against rtmlib's own functions,
heatmap sub-pixel refinement, regression layouts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.inference.decoders import (
    PAIRWISE_NMS_MAX,
    box_iou_one,
    box_iou_pairs,
    decode_heatmaps,
    decode_regression,
    decode_simcc,
    decode_ultralytics_pose,
    decode_ultralytics_pose_batch,
    heatmap_to_input,
    nms,
)


def brute_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Textbook greedy NMS, one pair at a time."""

    def iou_of(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    for i in order:
        if all(iou_of(boxes[i], boxes[j]) <= iou for j in keep):
            keep.append(int(i))
    return keep


@pytest.mark.parametrize("n", [150, PAIRWISE_NMS_MAX + 200])  # the IoU matrix; row by row
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, n)
    scores[::7] = 0.5  # ties: the lower index first
    boxes[5] = boxes[4]  # identical boxes
    assert nms(boxes, scores, 0.5).tolist() == brute_nms(boxes, scores, 0.5)


@pytest.mark.parametrize("seed", [3, 4])
def test_nms_on_the_iou_matrix_equals_nms_row_by_row(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.inference.decoders as decoders

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], axis=1)
    scores = rng.uniform(0, 1, 300).round(2)  # many ties
    classes = rng.integers(0, 3, 300)
    for iou, cls, cap in [(0.5, None, None), (0.3, classes, None), (0.7, classes, 20)]:
        matrix = nms(boxes, scores, iou, cls, cap)
        monkeypatch.setattr(decoders, "PAIRWISE_NMS_MAX", 0)
        rows = nms(boxes, scores, iou, cls, cap)
        monkeypatch.undo()
        assert matrix.tolist() == rows.tolist() and matrix.dtype == rows.dtype
        assert len(matrix) == (cap or len(matrix))
    np.testing.assert_array_equal(box_iou_pairs(boxes[:9])[4], box_iou_one(boxes[4], boxes[:9]))


def test_nms_is_class_aware_and_capped() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], float)
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0]
    assert nms(boxes, scores, 0.5, class_ids=np.array([0, 1, 0])).tolist() == [0, 1]
    assert nms(boxes, scores, 0.99, max_det=2).tolist() == [0, 1]


def test_ultralytics_raw_decode_picks_best_class_and_keypoints() -> None:
    a = 6  # anchors
    k = 2
    pred = np.zeros((4 + 2 + k * 3, a), np.float32)
    pred[0:4, :] = np.array([[50], [50], [20], [20]], np.float32)  # all the same box
    pred[0, 3:] = 150  # anchors 3.. elsewhere
    pred[4, :] = [0.9, 0.2, 0.1, 0.3, 0.05, 0.0]  # class 0
    pred[5, :] = [0.1, 0.95, 0.1, 0.1, 0.6, 0.0]  # class 1
    pred[6:, :] = np.arange(k * 3, dtype=np.float32)[:, None]
    dec = decode_ultralytics_pose(pred, 2, (k, 3), 0.25, 0.7)
    # anchors 0 (cls 0) and 1 (cls 1) overlap but differ in class; 3 and 4 overlap: 4 (0.6) wins
    assert dec.class_ids.tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(dec.scores, [0.95, 0.9, 0.6, 0.3])
    np.testing.assert_allclose(dec.boxes[0], [40, 40, 60, 60])
    np.testing.assert_allclose(dec.keypoints[0], [[0, 1, 2], [3, 4, 5]])
    agnostic = decode_ultralytics_pose(pred, 2, (k, 3), 0.25, 0.7, agnostic=True)
    assert agnostic.class_ids.tolist() == [1, 1]


def test_simcc_matches_rtmlib_get_simcc_maximum() -> None:
    post = pytest.importorskip(
        "rtmlib.tools.pose_estimation.post_processings",
        reason="rtmlib is not installed (pip install --no-deps rtmlib)",
    )
    rng = np.random.default_rng(7)
    sx = rng.normal(0.2, 0.3, (5, 17, 384)).astype(np.float32)
    sy = rng.normal(0.2, 0.3, (5, 17, 512)).astype(np.float32)
    locs, vals = decode_simcc(sx, sy, split_ratio=2.0)
    ref_locs, ref_vals = post.get_simcc_maximum(sx.copy(), sy.copy())
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-6)
    ok = ref_vals > 0  # rtmlib marks locations of non-positive scores with -1
    np.testing.assert_allclose(locs[ok], ref_locs[ok] / 2.0)
    _, min_vals = decode_simcc(sx, sy, 2.0, score="min")
    np.testing.assert_allclose(min_vals, np.minimum(sx.max(-1), sy.max(-1)))


def gaussian_heatmaps(centres: np.ndarray, h: int, w: int, sigma: float = 2.0) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    out = np.empty((1, len(centres), h, w), np.float32)
    for i, (cx, cy) in enumerate(centres):
        out[0, i] = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    return out


@pytest.mark.parametrize("refine,tol", [("dark", 0.05), ("quadratic", 0.1), ("none", 0.71)])
def test_heatmap_refinement_finds_subpixel_peaks(refine: str, tol: float) -> None:
    centres = np.array([[10.3, 20.7], [30.8, 5.2], [40.45, 50.1]])
    hm = gaussian_heatmaps(centres, 64, 48)
    locs, scores = decode_heatmaps(hm, refine, blur_kernel=1)  # type: ignore[arg-type]
    err = np.linalg.norm(locs[0] - centres, axis=1)
    assert err.max() < tol, (refine, err)
    assert scores.shape == (1, 3) and np.all(scores > 0.8)


def test_heatmap_dark_with_blur_still_subpixel() -> None:
    centres = np.array([[12.25, 17.75]])
    locs, _ = decode_heatmaps(gaussian_heatmaps(centres, 64, 48), "dark", blur_kernel=3)
    assert np.linalg.norm(locs[0, 0] - centres[0]) < 0.1


def test_heatmap_to_input_uses_pixel_centres() -> None:
    xy = heatmap_to_input(np.array([[0.0, 0.0], [47.0, 63.0]]), (64, 48), (256, 192))
    np.testing.assert_allclose(xy, [[1.5, 1.5], [189.5, 253.5]])


def test_regression_layouts_axis_order_and_normalised_coords() -> None:
    raw = np.array([[[[0.5, 0.25, 0.9], [0.0, 1.0, 0.4]]]], np.float32)  # (y, x, s) BNKV
    kp = decode_regression(raw, 2, "BNKV", "normalized", "yx", 2, (100, 200))
    np.testing.assert_allclose(kp[0, 0], [[49.5, 49.5, 0.9], [199.5, -0.5, 0.4]])
    flat = decode_regression(raw.reshape(1, 6), 2, "BF", "normalized", "yx", 2, (100, 200))
    np.testing.assert_allclose(flat, kp)
    score_first = decode_regression(
        np.array([[[0.7, 10.0, 20.0]]], np.float32), 1, "BKV", "pixel", "xy", 0, (50, 50)
    )
    np.testing.assert_allclose(score_first[0, 0, 0], [10.0, 20.0, 0.7])
    with pytest.raises(ValueError, match="does not fit layout"):
        decode_regression(raw, 3, "BNKV", "pixel", "xy", 2, (10, 10))


def _same_decoded(got: Any, want: Any) -> bool:
    return all(
        np.array_equal(getattr(got, f), getattr(want, f))
        and getattr(got, f).dtype == getattr(want, f).dtype
        for f in ("boxes", "scores", "class_ids", "keypoints")
    )


@pytest.mark.parametrize("seed", range(6))
def test_batch_decode_equals_decoding_each_image(seed: int) -> None:
    """Random batches: score ties, several classes, detect (no keypoints) and 2-D keypoint
    models, class-aware and agnostic NMS, max_det and max_candidates caps, empty images,
    and images with more candidates than the batch decoder walks (handed to per-image)."""
    rng = np.random.default_rng(seed)
    for trial in range(40):
        b, nc = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        k, d, a = int(rng.integers(0, 4)), int(rng.choice([2, 3])), int(rng.integers(5, 320))
        pred = np.zeros((b, 4 + nc + k * d, a), np.float32)
        pred[:, 0:2] = rng.uniform(0, 200, (b, 2, a))
        pred[:, 2:4] = rng.uniform(5, 80, (b, 2, a))
        pred[:, 4:4 + nc] = (rng.choice([0.1, 0.3, 0.5, 0.5, 0.7, 0.9], (b, nc, a)) if trial % 2
                             else rng.uniform(0, 1, (b, nc, a)))
        pred[:, 4 + nc:] = rng.uniform(0, 200, (b, k * d, a))
        if trial % 5 == 0:
            pred[0, 4:4 + nc] = 0.0
        args = (nc, (k, d), float(rng.choice([0.05, 0.25, 0.5, 0.95])),
                float(rng.choice([0.3, 0.5, 0.7])), int(rng.choice([2, 5, 300])),
                bool(rng.integers(0, 2)), int(rng.choice([3, 30000])))
        got = decode_ultralytics_pose_batch(pred, *args)
        want = [decode_ultralytics_pose(pred[i], *args) for i in range(b)]
        assert len(got) == b
        assert all(_same_decoded(g, w) for g, w in zip(got, want, strict=True)), (trial, args)


def test_ultralytics_decode_of_a_detect_model_without_keypoints() -> None:
    pred = np.zeros((2, 4 + 2, 6), np.float32)
    pred[:, 0:4] = np.array([[50], [50], [20], [20]], np.float32)
    pred[0, 4, 0], pred[0, 5, 3], pred[1, 5, 1] = 0.9, 0.8, 0.7
    one = decode_ultralytics_pose(pred[0], 2, (0, 3), 0.25, 0.7)
    assert one.keypoints.shape == (2, 0, 3) and one.class_ids.tolist() == [0, 1]
    both = decode_ultralytics_pose_batch(pred, 2, (0, 3), 0.25, 0.7)
    assert [len(x.boxes) for x in both] == [2, 1] and _same_decoded(both[0], one)
    with pytest.raises(ValueError, match=r"\[B, 4 \+ 2 \+ 0\*3, A\]"):
        decode_ultralytics_pose_batch(pred[0], 2, (0, 3), 0.25, 0.7)
