"""Training targets and augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from models.data import Sample
from models.targets import AugmentSpec, TargetSpec, augment, encode, px_to_grid

SPEC = TargetSpec(num_classes=4, num_keypoints=5)


def make_sample(
    kpts: list[list[tuple[float, float]]],
    classes: list[int] | None = None,
    visible: list[list[bool]] | None = None,
    ignore: list[bool] | None = None,
    in_view: list[float] | None = None,
) -> Sample:
    """A grey 240x320 image with a bright 2x2 dot at every keypoint."""
    k = np.array(kpts, np.float32).reshape(-1, 5, 2)
    image = np.full((240, 320, 3), 90, np.uint8)
    for inst in k:
        for x, y in inst:
            xi, yi = int(np.floor(x)), int(np.floor(y))  # dot centred on (xi+0.5, yi+0.5)
            if 0 <= xi < 319 and 0 <= yi < 239:
                image[yi : yi + 2, xi : xi + 2] = 250
    m = len(k)
    boxes = np.concatenate([k.min(1) - 4, k.max(1) + 4], axis=1).astype(np.float32)
    vis = np.array(visible if visible is not None else [[True] * 5] * m, bool)
    return Sample(
        image=image,
        class_ids=np.array(classes if classes is not None else [0] * m, np.int64),
        boxes=boxes,
        keypoints=k,
        visible=vis,
        labeled=np.ones_like(vis),
        ignore=np.array(ignore if ignore is not None else [False] * m, bool),
        in_view=np.array(in_view if in_view is not None else [1.0] * m, np.float32),
    )


PART = [(100.5, 60.5), (130.5, 60.5), (100.5, 90.5), (121.5, 70.5), (108.5, 81.5)]


def test_encode_puts_peaks_and_offsets_where_the_instance_is() -> None:
    sample = make_sample([PART], classes=[2], visible=[[True, True, True, True, False]])
    t = encode(sample, SPEC)
    cx, cy = px_to_grid(np.array([(96.5 + 134.5) / 2, (56.5 + 94.5) / 2]), 4)
    ci, cj = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    assert t["mask"].sum() == 1 and t["ind"][0] == cj * 80 + ci
    assert t["hm"][2, cj, ci] == 1.0 and t["hm"][[0, 1, 3]].max() == 0.0
    np.testing.assert_allclose(t["off"][0], [cx - ci, cy - cj], atol=1e-6)
    np.testing.assert_allclose(t["wh"][0], [38 / 4, 38 / 4], atol=1e-6)
    kg = px_to_grid(np.array(PART), 4)
    np.testing.assert_allclose(t["kreg"][0], kg - [ci, cj], atol=1e-5)
    # visible keypoints peak in their own (class, keypoint) channel; the hidden one does not
    for q in range(4):
        px, py = np.floor(kg[q] + 0.5).astype(int)
        assert t["khm"][2 * 5 + q, py, px] == 1.0
        centre = t["koff_index"][0, q, 4]
        assert centre == (2 * 5 + q) * 60 * 80 + py * 80 + px
        np.testing.assert_allclose(t["koff"][0, q, 4], kg[q] - [px, py], atol=1e-6)
    assert t["khm"][2 * 5 + 4].max() == 0.0 and t["koff_mask"][0, 4].sum() == 0
    assert t["kreg_mask"][0].tolist() == [1.0] * 5


def test_ignored_instances_mask_the_heatmap_loss_instead_of_being_negatives() -> None:
    other = [(x + 150, y + 80) for x, y in PART]
    sample = make_sample([PART, other], classes=[1, 1], ignore=[False, True])
    t = encode(sample, SPEC)
    assert t["mask"].sum() == 1
    assert t["hm_weight"][1].min() == 0.0 and t["hm_weight"][[0, 2, 3]].min() == 1.0
    zero = np.argwhere(t["hm_weight"][1] == 0)
    centre = px_to_grid(np.array(other).mean(0), 4)
    assert np.abs(zero.mean(0)[::-1] - centre).max() < 2.0


def test_mostly_hidden_instances_are_background_and_half_hidden_ones_are_ignored() -> None:
    parts = [PART, [(x + 150, y) for x, y in PART], [(x, y + 100) for x, y in PART]]
    sample = make_sample(parts, classes=[0, 0, 0], in_view=[0.9, 0.5, 0.3])
    t = encode(sample, SPEC)
    assert t["mask"].sum() == 1  # only the first is taught
    zero = np.argwhere(t["hm_weight"][0] == 0)
    centre = px_to_grid(np.array(parts[1]).mean(0), 4)
    assert len(zero) and np.abs(zero.mean(0)[::-1] - centre).max() < 2.0
    hidden = np.floor(px_to_grid(np.array(parts[2]).mean(0), 4) + 0.5).astype(int)
    assert t["hm_weight"][0, hidden[1], hidden[0]] == 1.0  # a negative: scores must fall
    assert t["hm"][0, hidden[1], hidden[0]] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_augment_moves_the_keypoints_with_the_image(seed: int) -> None:
    sample = make_sample([PART])
    spec = AugmentSpec(prob_geometric=1.0, noise_sigma=0.0, prob_blur=0.0, brightness=0.0,
                       contrast=0.0)
    out = augment(sample, np.random.default_rng(seed), spec)
    assert out.image.shape == sample.image.shape
    gray = out.image[..., 1].astype(float)
    for (x, y), vis in zip(out.keypoints[0], out.visible[0], strict=True):
        if not vis:
            continue
        xi, yi = int(round(x)), int(round(y))
        patch = gray[max(yi - 4, 0) : yi + 5, max(xi - 4, 0) : xi + 5]
        ys, xs = np.nonzero(patch > 120)
        assert len(xs) > 0, "the dot should be near its keypoint"
        w = patch[ys, xs] - 90
        cx = (xs * w).sum() / w.sum() + max(xi - 4, 0)
        cy = (ys * w).sum() / w.sum() + max(yi - 4, 0)
        assert abs(cx - x) < 0.35 and abs(cy - y) < 0.35


def test_augment_hides_keypoints_pushed_out_of_the_image() -> None:
    edge = [(x + 180, y) for x, y in PART]  # x up to 310
    sample = make_sample([edge])
    spec = AugmentSpec(scale=(1.2, 1.2), shift_px=0.0, prob_geometric=1.0)
    out = augment(sample, np.random.default_rng(0), spec)
    outside = out.keypoints[0, :, 0] > 319.5
    assert outside.any()
    assert not out.visible[0][outside].any()
    assert out.boxes[0, 2] <= 319.5
    assert 0.0 < out.in_view[0] < 1.0  # less of it is in view after the shift
