"""Tracker behaviour against the sim's ground truth and hand-made streams."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.optimize import linear_sum_assignment

from service.domain import Detections, Tracks
from service.sim import InstanceTruth
from service.tracking import Tracker, TrackerConfig
from service.tracking.association import iou_matrix


def _match(instances: list[InstanceTruth], tracks: Tracks) -> dict[str, int]:
    """uid -> row in tracks, by best same-class IoU >= 0.3."""
    if not instances or not len(tracks):
        return {}
    iou = iou_matrix(np.array([i.box for i in instances]), tracks.detections.boxes)
    same = np.array([i.class_id for i in instances])[:, None] == tracks.detections.class_ids
    iou = np.where(same, iou, 0.0)
    rows, cols = linear_sum_assignment(-iou)
    return {instances[r].uid: int(c) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= 0.3}


def _box(x: float, y: float = 100.0, w: float = 40.0, h: float = 30.0) -> list[float]:
    return [x, y, x + w, y + h]


def _dets(boxes: list[list[float]], scores: list[float] | None = None,
          classes: list[int] | None = None, k: int = 0) -> Detections:
    n = len(boxes)
    if n == 0:
        return Detections.empty(k)
    b = np.array(boxes, float)
    kp = np.zeros((n, k, 3))
    if k:
        kp[:, :, 0] = b[:, :1] + np.linspace(5, 35, k)
        kp[:, :, 1] = b[:, 1:2] + 15
        kp[:, :, 2] = 0.9
    return Detections(b.astype(np.float32), np.asarray(scores or [0.9] * n, np.float32),
                      np.asarray(classes or [0] * n, np.int32), kp.astype(np.float32))


@pytest.mark.slow
def test_ids_stay_one_to_one_over_a_sim_clip(sim_truths, detections_from_truth) -> None:
    truths = sim_truths("conveyor", seed=3, frames=600)
    rng = np.random.default_rng(1)
    tracker = Tracker()
    ids: dict[str, list[int]] = {}
    seen: Counter[str] = Counter()
    for truth in truths:
        dets, kept = detections_from_truth(truth.instances, rng, noise_px=1.5, drop=0.05)
        tracks = tracker.update(dets, truth.t)
        # the station part is replaced every 6 s (same uid, maybe another part): leave it out
        judged = [i for i in kept if i.in_view >= 0.5 and i.uid != "station"]
        rows = _match(judged, tracks)
        for inst in judged:
            seen[inst.uid] += 1
            if seen[inst.uid] > tracker.config.min_hits:  # confirmation takes min_hits frames
                row = rows.get(inst.uid)
                ids.setdefault(inst.uid, []).append(-1 if row is None else
                                                    int(tracks.track_ids[row]))
    assert len(ids) >= 10  # parts came and went, and the arm stayed
    majority = {uid: Counter(v).most_common(1)[0][0] for uid, v in ids.items()}
    assert -1 not in majority.values()
    assert len(set(majority.values())) == len(majority)  # no track id shared by two parts
    total = sum(len(v) for v in ids.values())
    consistent = sum(sum(1 for x in v if x == majority[uid]) for uid, v in ids.items())
    assert consistent / total >= 0.95


def test_keypoints_are_smoothed_without_lag_on_the_belt(
    sim_truths, detections_from_truth
) -> None:
    truths = sim_truths("conveyor", seed=3, frames=300)
    rng = np.random.default_rng(2)
    tracker = Tracker()
    raw_err, smooth_err = [], []
    for truth in truths:
        dets, kept = detections_from_truth(truth.instances, rng, noise_px=1.5)
        tracks = tracker.update(dets, truth.t)
        parts = [i for i in kept if i.class_id in (0, 1) and i.uid != "station"]
        rows = _match(parts, tracks)
        for inst in parts:
            if inst.uid in rows and truth.index > 30:
                vis = inst.visible
                got = tracks.detections.keypoints[rows[inst.uid], vis, :2]
                raw = dets.keypoints[kept.index(inst), vis, :2]
                smooth_err.append(np.linalg.norm(got - inst.keypoints_px[vis], axis=1).mean())
                raw_err.append(np.linalg.norm(raw - inst.keypoints_px[vis], axis=1).mean())
    assert len(smooth_err) > 500
    # parts move ~2.5 px per frame: a lagging smoother would be worse than raw
    assert np.mean(smooth_err) < 0.6 * np.mean(raw_err)


def test_velocity_in_px_per_second_matches_the_belt(sim_truths, detections_from_truth) -> None:
    truths = sim_truths("calm", seed=4, frames=120)
    rng = np.random.default_rng(3)
    tracker = Tracker()
    errors = []
    for k, truth in enumerate(truths):
        dets, kept = detections_from_truth(truth.instances, rng, noise_px=0.5)
        tracks = tracker.update(dets, truth.t)
        if k < 60 or k + 1 >= len(truths):
            continue
        nxt = {i.uid: i for i in truths[k + 1].instances}
        prev = {i.uid: i for i in truths[k - 1].instances}
        rows = _match([i for i in kept if i.in_view == 1.0 and i.class_id in (0, 1)], tracks)
        for uid, row in rows.items():
            if uid in nxt and uid in prev and uid != "station":
                centre = lambda i: (i.box[:2] + i.box[2:]) / 2  # noqa: E731
                true_v = (centre(nxt[uid]) - centre(prev[uid])) * 30.0 / 2
                errors.append(np.abs(tracks.velocity_px_s[row] - true_v))
    errors_arr = np.array(errors)
    assert len(errors_arr) > 50
    assert np.median(errors_arr[:, 0]) < 8.0  # belt runs at ~75 px/s in x here
    assert np.median(errors_arr[:, 1]) < 4.0


def test_a_new_track_moves_with_its_part_from_the_second_frame() -> None:
    # a part entering at 300 px/s (10 px a frame at 30 fps), keypoints on its box
    tracker = Tracker(TrackerConfig(min_hits=2))
    speed, fps = 300.0, 30.0
    for k in range(4):
        x = 20.0 + speed * k / fps
        tracks = tracker.update(_dets([_box(x)], k=3), k / fps)
        if k == 0:
            continue
        # from the second sighting on: the box velocity is the part's, and the smoothed
        # keypoints sit on the part, not behind it (a zero start velocity lagged both)
        assert tracks.velocity_px_s[0, 0] == pytest.approx(speed, rel=0.05), k
        want = x + np.linspace(5, 35, 3)
        np.testing.assert_allclose(tracks.detections.keypoints[0, :, 0], want, atol=1.0)


def test_short_occlusion_keeps_the_id() -> None:
    tracker = Tracker(TrackerConfig(max_lost_s=1.0))
    ids_before = set()
    for i in range(40):
        boxes = [_box(10 + 3 * i), _box(300 - 2 * i, y=300)]
        hidden = 20 <= i < 30  # the first object vanishes for 1/3 s
        tracks = tracker.update(_dets(boxes[1:] if hidden else boxes, k=4), i / 30)
        if i == 19:
            ids_before = set(tracks.track_ids.tolist())
        if hidden:
            assert len(tracks) == 1  # a lost track is not reported
    assert len(ids_before) == 2
    assert set(tracks.track_ids.tolist()) == ids_before
    # the lost track kept moving with its velocity: the box is where the object is
    row = int(np.argmin(tracks.detections.boxes[:, 1]))
    assert abs(float(tracks.detections.boxes[row, 0]) - (10 + 3 * 39)) < 3.0


def test_a_track_lost_longer_than_max_lost_gets_a_new_id() -> None:
    tracker = Tracker(TrackerConfig(max_lost_s=0.2))
    for i in range(10):
        first = tracker.update(_dets([_box(100)]), i / 30).track_ids.tolist()
    assert tracker.num_tracks == 1
    for i in range(10, 20):
        tracker.update(_dets([]), i / 30)
    assert tracker.num_tracks == 0  # pruned
    for i in range(20, 25):
        again = tracker.update(_dets([_box(100)]), i / 30).track_ids.tolist()
    assert len(first) == len(again) == 1 and first != again


def test_tentative_tracks_are_never_reported() -> None:
    cfg = TrackerConfig(min_hits=3)
    tracker = Tracker(cfg)
    counts = []
    for i in range(6):
        boxes = [_box(10 + i)]
        if i == 2:
            boxes.append(_box(400))  # a one-frame false positive
        counts.append(len(tracker.update(_dets(boxes), i / 30)))
    assert counts == [0, 0, 1, 1, 1, 1]
    assert tracker.num_tracks == 1  # the unconfirmed one-frame track is gone


def test_low_score_detections_extend_tracks_but_never_start_them() -> None:
    tracker = Tracker()
    for i in range(5):
        tracker.update(_dets([_box(10 + i)]), i / 30)
    ids = set()
    for i in range(5, 15):  # a partial occlusion: the detector is unsure
        tracks = tracker.update(_dets([_box(10 + i), _box(400)], scores=[0.3, 0.3]), i / 30)
        ids.update(tracks.track_ids.tolist())
    assert len(ids) == 1
    assert tracker.num_tracks == 1


def test_classes_never_match_each_other() -> None:
    tracker = Tracker()
    for i in range(5):
        a = tracker.update(_dets([_box(100)], classes=[0]), i / 30)
    for i in range(5, 10):
        b = tracker.update(_dets([_box(100)], classes=[1]), i / 30)
    assert a.track_ids.tolist() != b.track_ids.tolist()
    assert b.detections.class_ids.tolist() == [1]


def test_empty_inputs_and_keypointless_models() -> None:
    tracker = Tracker()
    out = tracker.update(Detections.empty(), 0.0)
    assert len(out) == 0 and out.velocity_px_s.shape == (0, 2)
    for i in range(1, 5):
        out = tracker.update(_dets([_box(50)], k=0), i / 30)
    assert len(out) == 1 and out.detections.num_keypoints == 0
    empty = tracker.update(Detections.empty(), 5 / 30)
    assert len(empty) == 0


def test_keypoint_count_must_stay_the_same() -> None:
    tracker = Tracker()
    tracker.update(_dets([_box(50)], k=3), 0.0)
    with pytest.raises(ValueError, match="one tracker per model"):
        tracker.update(_dets([_box(50)], k=5), 0.1)


def test_extra_columns_follow_their_detection() -> None:
    tracker = Tracker(TrackerConfig(min_hits=1))
    dets = _dets([_box(10), _box(200)])
    dets.extra["det_id"] = np.array([7, 8])
    tracks = tracker.update(dets, 0.0)
    by_x = np.argsort(tracks.detections.boxes[:, 0])
    assert tracks.detections.extra["det_id"][by_x].tolist() == [7, 8]


def test_hidden_keypoints_keep_their_low_score_and_do_not_update_the_filter() -> None:
    tracker = Tracker(TrackerConfig(min_hits=1))
    for i in range(10):
        tracker.update(_dets([_box(100)], k=3), i / 30)
    dets = _dets([_box(100)], k=3)
    dets.keypoints[0, 1] = [500.0, 500.0, 0.05]  # keypoint 1 hidden, junk position
    tracks = tracker.update(dets, 10 / 30)
    assert tracks.detections.keypoints[0, 1, 2] == pytest.approx(0.05)
    # back in view elsewhere: the filter restarts there instead of dragging old values
    dets = _dets([_box(100)], k=3)
    dets.keypoints[0, 1, :2] = [130.0, 120.0]
    tracks = tracker.update(dets, 11 / 30)
    np.testing.assert_allclose(tracks.detections.keypoints[0, 1, :2], [130.0, 120.0], atol=1e-4)
    assert tracks.detections.keypoints[0, 1, 2] == pytest.approx(0.9)


@pytest.mark.slow
def test_memory_stays_bounded_over_100k_updates_with_churn() -> None:
    cfg = TrackerConfig(max_lost_s=0.5)
    tracker = Tracker(cfg)
    rng = np.random.default_rng(5)
    # objects live 5..60 frames at random places; at most 6 at a time
    live: list[tuple[int, float, float]] = []  # (frames left, x, y)
    peak = 0
    max_id = 0
    for i in range(100_000):
        live = [(n - 1, x + 2.0, y) for n, x, y in live if n > 1]
        while len(live) < 6 and rng.random() < 0.3:
            live.append((int(rng.integers(5, 60)), float(rng.uniform(0, 500)),
                         float(rng.uniform(0, 400))))
        boxes = [_box(x, y) for _, x, y in live if rng.random() > 0.1]
        tracks = tracker.update(_dets(boxes), i / 30)
        peak = max(peak, tracker.num_tracks)
        if len(tracks):
            max_id = max(max_id, int(tracks.track_ids.max()))
    # at most 6 live objects, each lost one kept for 0.5 s: 15 frames of arrivals
    assert peak <= 6 + 15 * 2
    assert max_id > 1000  # the churn really happened


def test_config_rejects_unknown_keys_and_inverted_thresholds() -> None:
    with pytest.raises(ValidationError):
        TrackerConfig.model_validate({"track_thresh": 0.5})
    with pytest.raises(ValidationError, match="must not exceed"):
        TrackerConfig(track_low_thresh=0.6, track_high_thresh=0.5)
    with pytest.raises(ValidationError):
        TrackerConfig.model_validate({"one_euro": {"min_cutoff": 0}})
