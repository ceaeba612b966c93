"""The One-Euro filter: less jitter at rest, little lag in motion, visibility resets."""

from __future__ import annotations

import numpy as np
import pytest

from service.tracking import OneEuroConfig, OneEuroFilter
from service.tracking.one_euro import one_euro_step, smoothing_factor


def test_reduces_jitter_on_a_noisy_static_point() -> None:
    rng = np.random.default_rng(0)
    f = OneEuroFilter()
    out = np.array([f.filter([[100.0, 50.0]] + rng.normal(0, 1.0, (1, 2)), i / 30)
                    for i in range(600)])[60:, 0]
    assert out.std(axis=0).max() < 0.5  # raw: 1.0
    assert np.abs(out.mean(axis=0) - [100.0, 50.0]).max() < 0.2


def test_lags_little_on_a_moving_point() -> None:
    rng = np.random.default_rng(1)
    f = OneEuroFilter()
    lag = []
    for i in range(300):
        t = i / 30
        true = np.array([[100.0 + 200.0 * t, 50.0 + 30 * np.sin(t)]])
        lag.append(np.linalg.norm(true - f.filter(true + rng.normal(0, 1.0, (1, 2)), t)))
    # 200 px/s is ~6.7 px per frame: the filter stays within a third of a frame
    assert np.mean(lag[30:]) < 2.5
    heavy = OneEuroFilter(OneEuroConfig(beta=0.0))  # a plain low-pass lags far more
    lag0 = [np.linalg.norm(np.array([[200.0 * i / 30, 0.0]]) -
                           heavy.filter([[200.0 * i / 30, 0.0]], i / 30)) for i in range(300)]
    assert np.mean(lag0[30:]) > 4 * np.mean(lag[30:])


def test_invalid_entries_pass_through_and_reset_on_return() -> None:
    f = OneEuroFilter(OneEuroConfig(min_cutoff=0.1, beta=0.0))
    for i in range(10):
        f.filter([[0.0, 0.0], [5.0, 5.0]], i / 30)
    hidden = f.filter([[0.0, 0.0], [99.0, 99.0]], 10 / 30, valid=[True, False])
    np.testing.assert_allclose(hidden[1], [99.0, 99.0])  # reported as given
    back = f.filter([[0.0, 0.0], [40.0, 40.0]], 11 / 30, valid=[True, True])
    np.testing.assert_allclose(back[1], [40.0, 40.0])  # restarted, not dragged from 5
    nxt = f.filter([[0.0, 0.0], [41.0, 41.0]], 12 / 30)
    assert 40.0 < nxt[1, 0] < 41.0  # and smoothing again from there
    assert np.isfinite(f.filter([[np.nan, 0.0], [41.0, 41.0]], 13 / 30)[1]).all()


def test_same_timestamp_returns_the_previous_estimate() -> None:
    f = OneEuroFilter()
    a = f.filter([[1.0, 1.0]], 0.0)
    f.filter([[2.0, 2.0]], 0.1)
    b = f.filter([[9.0, 9.0]], 0.1)
    assert a.shape == b.shape == (1, 2)
    assert b[0, 0] < 2.0


def test_step_matches_the_paper_formula() -> None:
    cfg = OneEuroConfig(min_cutoff=1.0, beta=0.5, d_cutoff=1.0)
    x, prev, dprev, dt = np.array([[3.0, 4.0]]), np.zeros((1, 2)), np.zeros((1, 2)), 0.1
    got, dx = one_euro_step(x, prev, dprev, dt, cfg)
    a_d = smoothing_factor(dt, 1.0)
    np.testing.assert_allclose(dx, a_d * x / dt)
    a = smoothing_factor(dt, 1.0 + 0.5 * np.linalg.norm(dx))
    np.testing.assert_allclose(got, a * x)
    assert smoothing_factor(1 / 30, 1.0) == pytest.approx((2 * np.pi / 30) / (2 * np.pi / 30 + 1))
