from __future__ import annotations

import numpy as np
import pytest

from service.rules import measure

from .conftest import Part, make_tracks


def test_points_in_concave_polygon() -> None:
    # an L shape: the notch at the top right is outside
    poly = np.array([[0, 0], [10, 0], [10, 5], [5, 5], [5, 10], [0, 10]], float)
    pts = np.array([[1, 1], [8, 2], [8, 8], [2, 8], [-1, 5], [np.nan, 1]], float)
    assert measure.points_in_polygon(pts, poly).tolist() == [True, True, False, True, False, False]


@pytest.mark.parametrize(
    ("theta", "symmetry", "expected"),
    [(10, 360, 10), (-350, 360, 10), (180, 360, 180), (178, 180, 2), (90, 180, 90), (-119, 120, 1)],
)
def test_angle_error_wraps_by_symmetry(theta: float, symmetry: float, expected: float) -> None:
    err = measure.angle_error_deg(np.array([theta], float), 0.0, symmetry)
    assert err[0] == pytest.approx(expected)


def test_chain_angles() -> None:
    # a link along +Y, then turning right by 90 degrees (to +X): -90
    chain = np.array([[[0, 0], [0, 10], [10, 10]]], float)
    assert measure.chain_angle_deg(chain)[0] == pytest.approx(-90.0)
    assert measure.chain_angle_deg(chain[:, :2])[0] == pytest.approx(90.0)
    # wrap: 170 -> -170 is a +20 turn, not -340
    c2 = np.array([[[0, 0], [np.cos(np.radians(170)), np.sin(np.radians(170))], [0, 0]]])
    c2[0, 2] = c2[0, 1] + [np.cos(np.radians(-170)), np.sin(np.radians(-170))]
    assert measure.chain_angle_deg(c2)[0] == pytest.approx(20.0)


def test_distances_and_crossings() -> None:
    pts = np.array([[3.0, 4.0], [0.0, -2.0]])
    assert measure.distance_to_point(pts, (0, 0)).tolist() == [5.0, 2.0]
    assert measure.distance_to_line(pts, (-1, 0), (1, 0)).tolist() == [4.0, 2.0]
    assert measure.crossing_normal((0, -1), (0, 1), None) == pytest.approx((1.0, 0.0))
    assert measure.crossing_normal((0, -1), (0, 1), (-1, 0.2)) == pytest.approx((-1.0, 0.0))
    a, b = (0.0, -10.0), (0.0, 10.0)
    assert measure.crossing_within_segment(np.array([-1.0, 5]), np.array([1.0, 5]), a, b)
    assert not measure.crossing_within_segment(np.array([-1.0, 15]), np.array([1.0, 15]), a, b)


def test_part_positions_prefer_pose_then_keypoints_then_box() -> None:
    tracks = make_tracks(Part(1, xy=(5, 6)), Part(2, xy=(50, 60), kp_score=0.1))
    assert tracks.poses is not None
    tracks.poses[0] = [np.nan, np.nan, np.nan]
    pos = measure.part_positions(tracks, "mm", 0.3)
    assert pos is not None
    assert pos[0].tolist() == pytest.approx([5, 6])  # the mean of its visible keypoints
    assert pos[1].tolist() == pytest.approx([50, 60])  # its pose
    px = measure.part_positions(tracks, "px", 0.3)
    assert px is not None and px[1].tolist() == pytest.approx([50, 60])  # the box centre
    assert measure.part_positions(make_tracks(Part(1), with_mm=False), "mm", 0.3) is None
    assert measure.median_speed_along(np.array([[10.0, 0], [30, 5], [20, 1]]), (2, 0)) == 20.0
    assert measure.median_speed_along(np.zeros((0, 2)), (1, 0)) is None
