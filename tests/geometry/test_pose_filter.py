"""The per-track orientation filter: smoothing, outliers, turns, ids and bounded memory."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pydantic
import pytest

from service.geometry import OrientationFilter, PoseFilterConfig
from service.geometry.pose_filter import orientation_step, wrap_rad

VAR = np.radians(2.0) ** 2  # a fit's angle variance: 2 degrees standard deviation


def _angle_diff(a: npt.ArrayLike, b: npt.ArrayLike) -> np.ndarray:
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def _one(f: OrientationFilter, theta: float, track: int = 1, cls: int = 0,
         var: float = VAR) -> float:
    return float(f.filter([track], [cls], [theta], [var])[0])


def test_a_step_moves_by_the_kalman_gain_and_ignores_outliers() -> None:
    theta, var, inlier = orientation_step([0.0, 0.0], [0.01, 0.01], [0.1, 1.0], [0.01, 0.01],
                                          q=0.0, gate_sigma=3.0)
    assert inlier.tolist() == [True, False]
    assert theta[0] == pytest.approx(0.05)  # gain 0.01 / (0.01 + 0.01)
    assert var[0] == pytest.approx(0.005)
    assert theta[1] == 0.0 and var[1] == pytest.approx(0.01)  # 1 rad is 7 sigma away


def test_a_step_wraps_across_plus_minus_180_degrees() -> None:
    theta, _, inlier = orientation_step([np.radians(179.0)], [0.01], [np.radians(-179.0)],
                                        [0.01], q=0.0, gate_sigma=3.0)
    assert inlier[0]
    assert _angle_diff(np.degrees(theta[0]), 180.0) < 1e-9  # half-way: +180, not 0
    assert wrap_rad(np.pi) == pytest.approx(-np.pi)


def test_a_constant_angle_is_averaged_over_the_track() -> None:
    rng = np.random.default_rng(3)
    f = OrientationFilter()
    raw = 30.0 + rng.normal(0.0, 2.0, 200)
    out = np.array([_one(f, z) for z in raw])
    assert _angle_diff(out[0], raw[0]) < 1e-9  # a new track starts at its first fit
    raw_err = _angle_diff(raw[50:], 30.0).mean()
    out_err = _angle_diff(out[50:], 30.0).mean()
    assert raw_err > 1.2
    assert out_err < 0.3 * raw_err


def test_fits_count_by_their_variance() -> None:
    f = OrientationFilter()
    _one(f, 0.0, var=VAR)
    sure = OrientationFilter()
    _one(sure, 0.0, var=VAR)
    # the same 2-degree innovation moves the estimate far less when the fit is poor
    unsure_step = _one(f, 2.0, var=VAR * 9)
    sure_step = _one(sure, 2.0, var=VAR / 9)
    assert unsure_step == pytest.approx(2.0 * 1 / (1 + 9), abs=0.01)  # gain P / (P + R)
    assert sure_step == pytest.approx(2.0 * 9 / (9 + 1), abs=0.01)


def test_a_single_wild_fit_does_not_move_the_estimate() -> None:
    f = OrientationFilter()
    for _ in range(20):
        _one(f, 10.0)
    assert _one(f, 50.0) == pytest.approx(10.0, abs=1e-6)
    assert _one(f, 10.5) == pytest.approx(10.0, abs=0.5)


def test_a_part_that_really_turns_is_followed_after_a_few_frames() -> None:
    cfg = PoseFilterConfig(max_outliers=3)
    f = OrientationFilter(cfg)
    for _ in range(30):
        _one(f, 0.0)
    out = [_one(f, 90.0) for _ in range(cfg.max_outliers + 1)]
    assert all(_angle_diff(o, 0.0) < 1e-6 for o in out[:-1])
    assert _angle_diff(out[-1], 90.0) < 1e-6


def test_tracks_are_filtered_independently_and_in_any_order() -> None:
    f, g = OrientationFilter(), OrientationFilter()
    rng = np.random.default_rng(0)
    for _ in range(30):
        z = np.array([0.0, 120.0, -60.0]) + rng.normal(0, 2.0, 3)
        a = f.filter([1, 2, 3], [0, 1, 0], z, np.full(3, VAR))
        b = g.filter([3, 1, 2], [0, 0, 1], z[[2, 0, 1]], np.full(3, VAR))
        np.testing.assert_allclose(a[[2, 0, 1]], b, atol=1e-9)
    assert _angle_diff(a, [0.0, 120.0, -60.0]).max() < 2.0


def test_no_fit_gives_nan_and_keeps_the_state() -> None:
    f = OrientationFilter()
    for _ in range(10):
        _one(f, 45.0)
    out = f.filter([1, 2], [0, 0], [np.nan, 10.0], [VAR, np.nan])
    assert np.isnan(out).all()  # track 2's fit has no variance: not used
    assert len(f) == 1
    assert _one(f, 45.2) == pytest.approx(45.0, abs=0.2)


def test_an_id_seen_with_another_class_starts_afresh() -> None:
    f = OrientationFilter()
    for _ in range(10):
        _one(f, 0.0, cls=0)
    assert _one(f, 90.0, cls=1) == pytest.approx(90.0)
    assert len(f) == 1


def test_memory_stays_bounded_with_endless_new_tracks() -> None:
    cfg = PoseFilterConfig(forget_after=20)
    f = OrientationFilter(cfg)
    for i in range(2000):
        f.filter([i, i + 100000], [0, 1], [1.0, 2.0], [VAR, VAR])
    assert len(f) <= 2 * (cfg.forget_after + 1)
    # a track away for fewer updates than forget_after keeps its state
    f = OrientationFilter(cfg)
    for _ in range(10):
        _one(f, 5.0, track=7)
    for i in range(cfg.forget_after - 1):
        f.filter([1000 + i], [0], [0.0], [VAR])
    assert _one(f, 5.5, track=7) == pytest.approx(5.0, abs=0.3)


def test_the_config_refuses_unknown_keys() -> None:
    with pytest.raises(pydantic.ValidationError):
        PoseFilterConfig.model_validate({"drift": 0.1})
    with pytest.raises(pydantic.ValidationError):
        PoseFilterConfig(keypoint_sigma_mm=0.0)


def _res(f: OrientationFilter, theta: float, residual: float, track: int = 1) -> float:
    return float(f.filter([track], [0], [theta], [VAR], [residual])[0])


def test_poor_fits_never_move_the_estimate_nor_restart_it() -> None:
    cfg = PoseFilterConfig(max_residual_mm=3.0, max_outliers=3)
    f = OrientationFilter(cfg)
    for _ in range(20):
        _res(f, 0.0, 1.0)
    # a long run of fits that do not match the template (residual 5 mm), 25 degrees off
    held = [_res(f, 25.0, 5.0) for _ in range(5 * cfg.max_outliers)]
    assert held == pytest.approx([0.0] * len(held), abs=1e-9)
    assert _res(f, 0.4, 1.0) == pytest.approx(0.0, abs=0.4)  # good fits go on averaging
    # the same run of well-fitting fits is a turn: followed after max_outliers + 1
    turned = [_res(f, 25.0, 1.0) for _ in range(cfg.max_outliers + 1)]
    assert _angle_diff(turned[-1], 25.0) < 1e-6


def test_a_track_without_a_good_fit_reports_its_frame_angles() -> None:
    f = OrientationFilter(PoseFilterConfig(max_residual_mm=3.0))
    # NaN: no estimate, the caller keeps the frame-by-frame fit (not a running mean)
    assert all(np.isnan(_res(f, z, 5.0)) for z in (20.0, 35.0, 22.0))
    assert len(f) == 0
    assert _res(f, 10.0, 2.0) == pytest.approx(10.0)  # the first good fit starts it
    assert _res(f, 30.0, 5.0) == pytest.approx(10.0)
    # a NaN residual is no evidence against the fit
    assert _res(f, 10.5, float("nan")) == pytest.approx(10.0, abs=0.5)


def test_without_a_residual_limit_poor_fits_count_less() -> None:
    f = OrientationFilter(PoseFilterConfig(max_residual_mm=None))
    for _ in range(20):
        _res(f, 0.0, 1.0)
    moved = _res(f, 4.0, 5.0)
    assert 0.0 < moved < 1.0
    assert not np.isnan(OrientationFilter(PoseFilterConfig(max_residual_mm=None)).filter(
        [1], [0], [20.0], [VAR], [5.0])[0])
