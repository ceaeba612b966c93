"""Rigid part poses, PnP and joint angles against exact answers and the sim."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from service.domain import Detections, Tracks
from service.geometry import (
    Homography,
    PoseEstimator,
    PoseFilterConfig,
    fit_rigid_2d,
    fit_rigid_2d_batch,
    joint_angles,
    rotation_variance,
    solve_pnp,
)
from service.sim import CLASSES, Scene
from service.sim.world import ARM_LINKS_MM, arm_keypoints, place, project


def _angle_diff(a: npt.ArrayLike, b: npt.ArrayLike) -> np.ndarray:
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def _template(cls: int) -> np.ndarray:
    template = CLASSES[cls].template_mm
    assert template is not None
    return template


def _f32(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return np.asarray(x, np.float32)


def _i32(x: npt.ArrayLike) -> npt.NDArray[np.int32]:
    return np.asarray(x, np.int32)


@pytest.mark.parametrize("cls", [0, 1])
@pytest.mark.parametrize("pose", [(12.5, -40.0, 33.0), (-300.0, 80.0, -170.0), (0.0, 0.0, 179.9)])
def test_rigid_fit_recovers_a_known_pose_exactly(cls, pose) -> None:
    template = _template(cls)
    points = place(template, *pose)
    x, y, theta, rms = fit_rigid_2d(template, points, np.ones(5))
    assert (x, y) == pytest.approx(pose[:2], abs=1e-9)
    assert _angle_diff(theta, pose[2]) < 1e-9
    assert rms < 1e-9


def test_rigid_fit_ignores_zero_weight_and_nan_points() -> None:
    template = _template(0)
    points = place(template, 10.0, 20.0, 45.0)
    points[1] += 50.0  # an outlier, weight 0
    points[3] = np.nan  # a keypoint that was not seen
    x, y, theta, rms = fit_rigid_2d(template, points, [1.0, 0.0, 1.0, 0.7, 1.0])
    assert (x, y, theta) == pytest.approx((10.0, 20.0, 45.0), abs=1e-9)
    assert rms < 1e-9


def test_rigid_fit_needs_two_points() -> None:
    template = _template(1)
    points = place(template, 1.0, 2.0, 3.0)
    assert np.isnan(fit_rigid_2d(template, points, [0, 0, 1, 0, 0])).all()
    two = fit_rigid_2d(template, points, [0, 1, 1, 0, 0])
    assert two[:3] == pytest.approx((1.0, 2.0, 3.0), abs=1e-9)


def test_rigid_fit_with_pixel_noise_through_the_sim_camera() -> None:
    scene = Scene("conveyor", seed=2)
    h = Homography(np.linalg.inv(scene.homography))
    rng = np.random.default_rng(0)
    pos_err, ang_err, resid = [], [], []
    for i in range(0, 300, 10):
        _, truth = scene.render(i)
        for inst in truth.instances:
            if CLASSES[inst.class_id].template_mm is None or inst.in_view < 1.0:
                continue
            template = _template(inst.class_id)
            px = inst.keypoints_px + rng.normal(0, 1.0, (5, 2))
            x, y, theta, rms = fit_rigid_2d(template, h.px_to_mm(px), inst.visible.astype(float))
            pos_err.append(np.hypot(x - inst.pose_mm[0], y - inst.pose_mm[1]))
            ang_err.append(_angle_diff(theta, inst.pose_mm[2]))
            resid.append(rms)
    assert len(pos_err) > 100
    # 1 px is ~1.3 mm on the belt; the fit averages over 5 keypoints
    assert np.mean(pos_err) < 1.0
    assert np.mean(ang_err) < 2.0
    assert 0.3 < np.mean(resid) < 2.5


def test_batch_fit_matches_single_fits() -> None:
    rng = np.random.default_rng(1)
    template = _template(0)
    poses = np.column_stack([rng.uniform(-100, 100, (6, 2)), rng.uniform(-180, 180, 6)])
    pts = np.stack([place(template, *p) for p in poses]) + rng.normal(0, 0.5, (6, 5, 2))
    w = rng.uniform(0.2, 1.0, (6, 5))
    w[2, :4] = 0.0  # one row with a single usable keypoint
    batch = fit_rigid_2d_batch(template, pts, w)
    for i in range(6):
        np.testing.assert_allclose(batch[i], np.array(fit_rigid_2d(template, pts[i], w[i])),
                                   equal_nan=True)
    assert np.isnan(batch[2]).all() and np.isfinite(batch[[0, 1, 3, 4, 5]]).all()


def test_rigid_fit_with_a_given_angle_fits_only_the_translation() -> None:
    rng = np.random.default_rng(4)
    template = _template(0)
    pts = place(template, 40.0, -12.0, 25.0) + rng.normal(0, 0.5, (5, 2))
    w = np.array([[1.0, 0.5, 1.0, 0.8, 1.0]])
    free = fit_rigid_2d_batch(template, pts[None], w)[0]
    same = fit_rigid_2d_batch(template, pts[None], w, theta_deg=[np.nan])[0]
    np.testing.assert_allclose(same, free)
    off = fit_rigid_2d_batch(template, pts[None], w, theta_deg=[free[2] + 3.0])[0]
    assert _angle_diff(off[2], free[2] + 3.0) < 1e-9
    # the translation puts the weighted centroids together: the best one for that angle
    placed = place(template, off[0], off[1], off[2])
    np.testing.assert_allclose((w[0, :, None] * placed).sum(0), (w[0, :, None] * pts).sum(0),
                               atol=1e-9)
    rms = np.sqrt((w[0] * ((placed - pts) ** 2).sum(1)).sum() / w.sum())
    assert off[3] == pytest.approx(rms) and off[3] > free[3]


def test_rotation_variance_predicts_the_scatter_of_fitted_angles() -> None:
    rng = np.random.default_rng(5)
    sigma = 1.0
    for cls in (0, 1):
        template = _template(cls)
        for weights in ([1, 1, 1, 1, 1], [1, 1, 0, 1, 0]):
            w = np.asarray(weights, float)
            pts = place(template, 0.0, 0.0, 10.0) + rng.normal(0, sigma, (4000, 5, 2))
            theta = fit_rigid_2d_batch(template, pts, np.broadcast_to(w, (4000, 5)))[:, 2]
            seen = np.var(np.radians(theta - 10.0))
            predicted = rotation_variance(template, w[None], [0.0], sigma)[0]
            assert seen == pytest.approx(predicted, rel=0.15), (cls, weights)
    # keypoints far from the centre pin the angle down; a poor fit counts less
    bracket = _template(0)
    tips = rotation_variance(bracket, [[0, 1, 1, 0, 0]], [0.0], 1.0)[0]
    holes = rotation_variance(bracket, [[0, 0, 0, 1, 1]], [0.0], 1.0)[0]
    poor = rotation_variance(bracket, [[0, 1, 1, 0, 0]], [2.0], 1.0, residual_gain=2.0)[0]
    assert tips < holes and poor == pytest.approx(tips * 17.0)
    assert np.isnan(rotation_variance(bracket, [[0, 1, 0, 0, 0]], [0.0], 1.0)[0])


def _noisy_track_run(seconds: float, smoothing: PoseFilterConfig, noise_px: float = 1.0
                     ) -> tuple[list[tuple[str, float, float, float]], list[Tracks]]:
    """The calm line at 15 fps with exact keypoints plus pixel noise and stable ids per
    part; (uid, position error, angle error, residual check) per fitted part, tracks."""
    scene = Scene("calm", seed=11, fps=15.0)
    h = Homography(np.linalg.inv(scene.homography))
    est = PoseEstimator({c: _template(c) for c in (0, 1)}, smoothing=smoothing)
    rng = np.random.default_rng(7)
    ids: dict[str, int] = {}
    errors, outs = [], []
    for i in range(int(seconds * 15)):
        _, truth = scene.render(i)
        inst = [x for x in truth.instances if x.class_id in (0, 1) and x.in_view == 1.0]
        if not inst:
            continue
        px = np.array([x.keypoints_px for x in inst]) + rng.normal(0, noise_px, (len(inst), 5, 2))
        kp = np.concatenate([px, np.where([x.visible for x in inst], 0.9, 0.05)[..., None]], 2)
        dets = Detections(_f32([x.box for x in inst]), _f32(np.full(len(inst), 0.9)),
                          _i32([x.class_id for x in inst]), _f32(kp))
        tid = _i32([ids.setdefault(x.uid, len(ids) + 1) for x in inst])
        out = est.update(Tracks(dets, tid, _f32(np.zeros((len(inst), 2)))), h)
        assert out.poses is not None and out.keypoints_mm is not None
        assert out.pose_residual_mm is not None
        outs.append(out)
        for row, x in enumerate(inst):
            pose = out.poses[row].astype(float)
            if not np.isfinite(pose).all():
                continue
            placed = place(_template(x.class_id), *pose)
            seen = np.isfinite(out.keypoints_mm[row]).all(1)
            rms = np.sqrt(((placed - out.keypoints_mm[row]) ** 2).sum(1)[seen].mean())
            errors.append((x.uid, float(np.hypot(*(pose[:2] - x.pose_mm[:2]))),
                           float(_angle_diff(pose[2], x.pose_mm[2])),
                           float(rms - out.pose_residual_mm[row])))
    return errors, outs


@pytest.mark.slow
def test_pose_estimator_filters_the_angle_over_each_track() -> None:
    raw, _ = _noisy_track_run(12.0, PoseFilterConfig(enabled=False))
    smooth, _ = _noisy_track_run(12.0, PoseFilterConfig())
    assert [e[0] for e in raw] == [e[0] for e in smooth] and len(raw) > 300
    raw_ang = np.mean([e[2] for e in raw])
    smooth_ang = np.mean([e[2] for e in smooth])
    assert raw_ang > 0.8
    assert smooth_ang < 0.5 * raw_ang
    # the translation is refitted with the better angle: no worse than frame by frame
    assert np.mean([e[1] for e in smooth]) <= 1.02 * np.mean([e[1] for e in raw])
    # the residual is that of the reported pose
    assert max(abs(e[3]) for e in smooth) < 1e-3


def _flange_track(est: PoseEstimator, points_mm: npt.ArrayLike) -> float:
    """One update of track 1 (a flange, class 1) with keypoints at points_mm (work
    plane = pixels); the reported angle."""
    kp = np.concatenate([np.asarray(points_mm, np.float64), np.full((5, 1), 0.9)], 1)[None]
    tracks = Tracks(Detections(_f32([[0, 0, 60, 60]]), _f32([0.9]), _i32([1]), _f32(kp)),
                    _i32([1]), _f32([[0.0, 0.0]]))
    out = est.update(tracks, Homography(np.eye(3)))
    assert out.poses is not None
    return float(out.poses[0, 2])


def test_pose_estimator_does_not_average_fits_that_miss_the_template() -> None:
    flange = _template(1)
    est = PoseEstimator({1: flange})
    misplaced = place(flange, 100.0, 0.0, 0.0)
    misplaced[3] += (0.0, 12.0)  # one keypoint 12 mm off: residual > 3 mm, angle off
    frame = fit_rigid_2d(flange, misplaced)
    limit = est.smoothing.max_residual_mm
    assert limit is not None and frame[3] > limit and abs(frame[2]) > 5.0
    # no good fit yet: each frame's own angle, as without the filter
    raw = PoseEstimator({1: flange}, smoothing=PoseFilterConfig(enabled=False))
    assert _flange_track(est, misplaced) == pytest.approx(_flange_track(raw, misplaced), abs=1e-3)
    good = PoseEstimator({1: flange})
    for _ in range(5):
        _flange_track(good, place(flange, 100.0, 0.0, 2.0))
    # a track with good fits keeps its angle through a run of poor ones
    assert [_flange_track(good, misplaced) for _ in range(10)] == pytest.approx([2.0] * 10,
                                                                                 abs=1e-3)


def test_each_pose_estimator_keeps_its_own_tracks() -> None:
    template = _template(0)
    h = Homography(np.eye(3))

    def tracks(theta: float) -> Tracks:
        kp = np.concatenate([place(template, 100.0, 50.0, theta), np.full((5, 1), 0.9)], 1)
        dets = Detections(_f32([[0, 0, 200, 200]]), _f32([0.9]), _i32([0]), _f32(kp[None]))
        return Tracks(dets, _i32([4]), _f32([[0.0, 0.0]]))

    a, b = PoseEstimator({0: template}), PoseEstimator({0: template})
    for _ in range(20):
        a.update(tracks(10.0), h)
    out_a = a.update(tracks(10.5), h)
    out_b = b.update(tracks(10.5), h)
    assert out_a.poses is not None and out_b.poses is not None
    assert out_a.poses[0, 2] == pytest.approx(10.0, abs=0.1)  # averaged over the track
    assert out_b.poses[0, 2] == pytest.approx(10.5, abs=1e-4)  # a new track: its own fit


def _tracks_from_truth(truth, dt: float, nxt) -> Tracks:
    inst = truth.instances
    kp = np.concatenate([np.array([i.keypoints_px for i in inst]),
                         np.where(np.array([i.visible for i in inst]), 0.9, 0.05)[..., None]], 2)
    after = {i.uid: i for i in nxt.instances}
    centre = lambda i: (i.box[:2] + i.box[2:]) / 2  # noqa: E731
    vel = np.array([(centre(after[i.uid]) - centre(i)) / dt if i.uid in after else [0.0, 0.0]
                    for i in inst])
    dets = Detections(_f32([i.box for i in inst]), _f32(np.full(len(inst), 0.9)),
                      _i32([i.class_id for i in inst]), _f32(kp))
    return Tracks(dets, _i32(np.arange(len(inst))), _f32(vel))


def test_pose_estimator_fills_the_millimetre_fields() -> None:
    scene = Scene("calm", seed=5)
    _, truth = scene.render(40)
    _, nxt = scene.render(41)
    tracks = _tracks_from_truth(truth, 1 / 30, nxt)
    h = Homography(np.linalg.inv(scene.homography))
    templates = {c: _template(c) for c in range(len(CLASSES))
                 if CLASSES[c].template_mm is not None}
    out = PoseEstimator(templates).update(tracks, h)
    assert out.track_ids.tolist() == tracks.track_ids.tolist()
    assert out.keypoints_mm is not None and out.poses is not None
    assert out.pose_residual_mm is not None and out.velocity_mm_s is not None
    moving = 0
    for row, inst in enumerate(truth.instances):
        vis = inst.visible
        np.testing.assert_allclose(out.keypoints_mm[row, vis], inst.keypoints_mm[vis], atol=1e-2)
        assert np.isnan(out.keypoints_mm[row, ~vis]).all()
        if inst.class_name == "arm":
            assert np.isnan(out.poses[row]).all() and np.isnan(out.pose_residual_mm[row])
            continue
        if vis.sum() >= 2:
            np.testing.assert_allclose(out.poses[row, :2], inst.pose_mm[:2], atol=1e-2)
            assert _angle_diff(out.poses[row, 2], inst.pose_mm[2]) < 1e-2
            assert out.pose_residual_mm[row] < 1e-2
        later = next(x for x in nxt.instances if x.uid == inst.uid)
        inside = all(b[0] > 0 and b[2] < 639 for b in (inst.box, later.box))
        if "at_station" not in inst.flags and inside:
            # box-centre motion over one frame, mapped at the centre: the belt speed
            np.testing.assert_allclose(out.velocity_mm_s[row], [100.0, 0.0], atol=3.0)
            moving += 1
    assert moving >= 2


def test_pose_estimator_without_calibration_leaves_tracks_alone() -> None:
    dets = Detections(_f32([[0, 0, 10, 10]]), _f32([0.9]), _i32([0]), _f32(np.zeros((1, 5, 3))))
    tracks = Tracks(dets, _i32([1]), _f32([[1.0, 2.0]]))
    out = PoseEstimator({0: _template(0)}).update(tracks, None)
    assert out is tracks and out.poses is None


def test_pose_estimator_handles_no_tracks() -> None:
    h = Homography(np.eye(3))
    out = PoseEstimator({0: _template(0)}).update(
        Tracks(Detections.empty(5), _i32(np.zeros(0)), _f32(np.zeros((0, 2)))), h)
    assert out.poses is not None and out.poses.shape == (0, 3)
    assert out.keypoints_mm is not None and out.keypoints_mm.shape == (0, 5, 2)


def _camera() -> np.ndarray:
    return np.array([[800.0, 0, 320], [0, 800.0, 240], [0, 0, 1]])


@pytest.mark.parametrize("planar", [True, False])
def test_solve_pnp_recovers_a_synthetic_camera_pose(planar) -> None:
    obj = np.array([[0, 0, 0], [80, 0, 0], [80, 50, 0], [0, 50, 0], [40, 25, 0], [20, 40, 0]],
                   float)
    if not planar:
        obj[4, 2] = 30.0
        obj[5, 2] = -15.0
    rvec = np.array([0.3, -0.2, 0.1])
    tvec = np.array([-20.0, 10.0, 600.0])
    k = _camera()
    dist = np.array([0.05, -0.01, 0, 0, 0])
    px, _ = cv2.projectPoints(obj, rvec, tvec, k, dist)
    res = solve_pnp(obj, px.reshape(-1, 2), k, dist)
    assert res.ok
    np.testing.assert_allclose(res.rvec, rvec, atol=1e-4)
    np.testing.assert_allclose(res.tvec, tvec, atol=1e-2)
    assert res.reprojection_rms_px < 1e-3
    noisy = px.reshape(-1, 2) + np.random.default_rng(0).normal(0, 0.5, (6, 2))
    res = solve_pnp(obj, noisy, k, dist)
    assert res.ok and 0.05 < res.reprojection_rms_px < 1.0
    assert np.abs(res.tvec - tvec).max() < 15.0


def test_solve_pnp_needs_four_seen_points() -> None:
    obj = np.array([[0, 0, 0], [80, 0, 0], [80, 50, 0], [0, 50, 0]], float)
    px, _ = cv2.projectPoints(obj, np.zeros(3), np.array([0, 0, 500.0]), _camera(), None)
    res = solve_pnp(obj, px.reshape(-1, 2), _camera(), valid=[True, True, False, True])
    assert not res.ok and np.isnan(res.tvec).all()


def test_joint_angles_of_the_sim_arm() -> None:
    scene = Scene("conveyor", seed=6)
    h = Homography(np.linalg.inv(scene.homography))
    checked = 0
    for i in range(0, 600, 20):
        _, truth = scene.render(i)
        arm = next(x for x in truth.instances if x.class_name == "arm")
        np.testing.assert_allclose(_angle_diff(joint_angles(arm.keypoints_mm), arm.joints_deg),
                                   0.0, atol=1e-9)
        # from the pixels, through the calibration
        got = joint_angles(h.px_to_mm(arm.keypoints_px))
        assert _angle_diff(got, arm.joints_deg).max() < 1e-6
        checked += 1
    assert checked == 30


def test_joint_angles_are_batched_and_wrapped() -> None:
    q = np.array([[170.0, 20.0, -30.0, 100.0], [-90.0, -170.0, 175.0, 5.0]])
    chains = np.stack([arm_keypoints(np.zeros(2), qi) for qi in q])
    got = joint_angles(chains)
    assert got.shape == (2, 4)
    assert _angle_diff(got, q).max() < 1e-9
    assert (got >= -180).all() and (got < 180).all()
    assert len(ARM_LINKS_MM) == 4
    assert project(np.eye(3), np.zeros((1, 2))).shape == (1, 2)


def test_a_fit_without_angle_information_keeps_its_translation() -> None:
    """Two visible keypoints at the same template point: no angle to filter, but the
    position is still known."""
    template = np.array([[0.0, 0.0], [0.0, 0.0], [30.0, 0.0]])
    kp = np.array([[[10.0, 20.0, 0.9], [10.0, 20.0, 0.9], [0.0, 0.0, 0.0]]])
    tracks = Tracks(Detections(_f32([[0, 0, 40, 40]]), _f32([0.9]), _i32([0]), _f32(kp)),
                    _i32([1]), _f32([[0.0, 0.0]]))
    out = PoseEstimator({0: template}).update(tracks, Homography(np.eye(3)))
    assert out.poses is not None
    assert out.poses[0, :2].tolist() == pytest.approx([10.0, 20.0])
