"""Association: IoU, OKS, the class gate and thresholded assignment."""

from __future__ import annotations

import numpy as np
import pytest

from service.tracking.association import assign, iou_matrix, oks_matrix, similarity_matrix


def test_iou_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    iou = iou_matrix(a, b)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])
    np.testing.assert_allclose(iou[1], 0.0)  # a degenerate box overlaps nothing


def test_oks_uses_only_keypoints_visible_in_both() -> None:
    a = np.array([[[0, 0, 0.9], [10, 0, 0.9], [50, 50, 0.1]]], float)
    b = np.array([[[0, 0, 0.9], [10, 0, 0.9], [0, 0, 0.9]], [[0, 0, 0.1]] * 3], float)
    oks, has = oks_matrix(a, b, np.array([100.0, 100.0]), 0.1, 0.3)
    assert has.tolist() == [[True, False]]
    assert oks[0, 0] == pytest.approx(1.0)  # the hidden third keypoint does not count


def test_keypoints_break_a_box_tie_and_classes_never_mix() -> None:
    box = np.array([[0, 0, 40, 40]], float)
    kp_track = np.array([[[5, 5, 0.9], [35, 35, 0.9]]], float)
    boxes = np.array([[0, 0, 40, 40], [0, 0, 40, 40], [0, 0, 40, 40]], float)
    kps = np.array([[[35, 35, 0.9], [5, 5, 0.9]],   # same box, keypoints swapped round
                    [[5, 5, 0.9], [35, 35, 0.9]],   # same box, same keypoints
                    [[5, 5, 0.9], [35, 35, 0.9]]], float)
    sim = similarity_matrix(box, kp_track, [0], boxes, kps, [0, 0, 1],
                            oks_weight=0.5, oks_sigma=0.1, keypoint_thresh=0.3)
    assert sim[0, 1] == pytest.approx(1.0)
    assert 0.5 <= sim[0, 0] < 0.6
    assert sim[0, 2] == -1.0


def test_assign_respects_the_threshold() -> None:
    cost = np.array([[0.1, 0.9], [0.95, 0.99]])
    matches, um_rows, um_cols = assign(cost, 0.8)
    assert matches.tolist() == [[0, 0]]
    assert um_rows.tolist() == [1] and um_cols.tolist() == [1]
    m, r, c = assign(np.zeros((0, 3)), 0.8)
    assert m.shape == (0, 2) and r.size == 0 and c.tolist() == [0, 1, 2]
