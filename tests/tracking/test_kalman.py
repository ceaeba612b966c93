"""The batched constant-velocity box Kalman filter."""

from __future__ import annotations

import numpy as np

from service.tracking import kalman


def test_converges_to_a_constant_velocity_in_px_per_second() -> None:
    rng = np.random.default_rng(0)
    start = np.array([[100.0, 200.0, 60.0, 30.0], [400.0, 100.0, 20.0, 40.0]])
    vel = np.array([[90.0, -15.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mean, cov = kalman.initiate(start)
    for i in range(1, 90):
        mean, cov = kalman.predict(mean, cov, 1 / 30)
        mean, cov = kalman.update(mean, cov, start + vel * i / 30 + rng.normal(0, 0.5, (2, 4)))
    np.testing.assert_allclose(mean[:, 4:], vel, atol=6.0)
    np.testing.assert_allclose(mean[:, :4], start + vel * 89 / 30, atol=1.5)
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_prediction_moves_boxes_and_grows_uncertainty() -> None:
    mean, cov = kalman.initiate(np.array([[0.0, 0.0, 10.0, 10.0]]))
    mean[:, 4] = 30.0
    moved, grown = kalman.predict(mean, cov, 0.5)
    assert moved[0, 0] == 15.0 and moved[0, 2] == 10.0
    assert np.all(np.diag(grown[0]) > np.diag(cov[0]))
    same, _ = kalman.predict(mean, cov, [-1.0])  # time never runs backwards
    assert same[0, 0] == 0.0


def test_box_conversions_round_trip() -> None:
    boxes = np.array([[1.0, 2.0, 11.0, 32.0]])
    z = kalman.xyxy_to_cxcywh(boxes)
    np.testing.assert_allclose(z, [[6.0, 17.0, 10.0, 30.0]])
    np.testing.assert_allclose(kalman.cxcywh_to_xyxy(z), boxes)
