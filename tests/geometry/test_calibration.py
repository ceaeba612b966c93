"""Homography calibration against the sim's true camera."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml

from service.errors import CalibrationError
from service.geometry import CalibrationConfig, Homography
from service.sim.world import project
from tests.geometry.conftest import canvas_to_world

BELT_X = (-300.0, 300.0)  # the part of the belt the sim camera sees well
BELT_Y = (-80.0, 80.0)


def _belt_grid(nx: int = 13, ny: int = 5) -> np.ndarray:
    gx, gy = np.meshgrid(np.linspace(*BELT_X, nx), np.linspace(*BELT_Y, ny))
    return np.column_stack([gx.ravel(), gy.ravel()])


def test_recovers_the_true_homography_from_noisy_points(sim_scene) -> None:
    rng = np.random.default_rng(0)
    # 40 surveyed marks around the belt, clicked with 0.5 px of noise
    mm = np.column_stack([rng.uniform(-420, 420, 40), rng.uniform(-140, 300, 40)])
    px = project(sim_scene.homography, mm) + rng.normal(0, 0.5, (len(mm), 2))
    h = Homography.from_points(px, mm)
    truth = _belt_grid()
    err = np.linalg.norm(h.px_to_mm(project(sim_scene.homography, truth)) - truth, axis=1)
    # 0.5 px is 0.6-1.3 mm on this plane: the fit averages it down
    assert np.sqrt(np.mean(err**2)) < 0.5
    assert err.max() < 1.0
    back = h.mm_to_px(truth)
    assert np.abs(back - project(sim_scene.homography, truth)).max() < 0.5
    rep = h.reprojection_error_px()
    assert rep.points == 40 and 0.1 < rep.rms_px < 1.0 and rep.max_px >= rep.rms_px


def test_four_exact_points_give_the_exact_homography(sim_scene) -> None:
    mm = np.array([[-300, -80], [300, -80], [300, 80], [-300, 80]], float)
    h = Homography.from_points(project(sim_scene.homography, mm), mm)
    expected = np.linalg.inv(sim_scene.homography)
    np.testing.assert_allclose(h.matrix, expected / expected[2, 2], rtol=1e-6, atol=1e-5)
    assert h.reprojection_error_px().max_px < 1e-3


def test_px_to_mm_keeps_the_shape_and_passes_nan_through(sim_scene) -> None:
    mm = np.array([[-300, -80], [300, -80], [300, 80], [-300, 80]], float)
    h = Homography.from_points(project(sim_scene.homography, mm), mm)
    pts = np.full((2, 3, 2), 100.0)
    pts[1, 2] = np.nan
    out = h.px_to_mm(pts)
    assert out.shape == (2, 3, 2)
    assert np.isnan(out[1, 2]).all() and np.isfinite(out[0]).all()


@pytest.mark.parametrize(
    ("px", "mm", "match"),
    [
        ([[0, 0], [10, 0], [0, 10]], [[0, 0], [1, 0], [0, 1]], "at least 4"),
        ([[0, 0], [10, 0], [20, 0], [30, 0.01], [40, 0]],
         [[0, 0], [1, 0], [0, 1], [1, 1], [2, 2]], "one line"),
        ([[0, 0], [100, 0], [0, 100], [100, 100]],
         [[0, 0], [10, 0], [20, 0], [5, 50]], "three of them"),
        ([[0, 0], [100, 0], [100, 0], [0, 100]],
         [[0, 0], [10, 0], [10, 10], [0, 10]], "same point"),
        ([[0, 0], [100, 0], [100, 100], [0, 100]], [[0, 0], [10, 0], [10, 10]], "in pairs"),
        ([[0, 0], [100, 0], [100, np.nan], [0, 100]],
         [[0, 0], [10, 0], [10, 10], [0, 10]], "finite"),
    ],
)
def test_degenerate_input_is_refused_with_the_reason(px, mm, match) -> None:
    with pytest.raises(CalibrationError, match=match):
        Homography.from_points(px, mm)


def test_a_swapped_pair_that_folds_the_plane_is_refused(sim_scene) -> None:
    mm = np.array([[-300, -80], [300, -80], [300, 80], [-300, 80], [0, 300]], float)
    px = project(sim_scene.homography, mm)
    px[[0, 4]] = px[[4, 0]]
    # either refused outright, or the error makes the mismatch obvious
    try:
        h = Homography.from_points(px, mm)
    except CalibrationError as exc:
        assert "inconsistent" in str(exc)
    else:
        assert h.reprojection_error_px().max_px > 20


def test_checkerboard_image_gives_the_board_frame(
    sim_scene, warp_onto_plane, checkerboard_canvas
) -> None:
    cols, rows, square_mm, ppm = 9, 6, 25.0, 4.0
    canvas = checkerboard_canvas(cols, rows, int(square_mm * ppm))
    origin = (-170.0, 110.0)  # canvas top-left on the plane
    image = warp_onto_plane(canvas, ppm, origin)
    h = Homography.from_checkerboard(image, (cols, rows), square_mm)
    assert h.reprojection_error_px().rms_px < 0.3
    # board frame: origin at the first inner corner, 2 squares in from the canvas corner
    # (margin + first square), X right, Y down the canvas = -Y of the work plane
    world = np.array([[x, y] for y in np.linspace(-60, 50, 6) for x in np.linspace(-90, 110, 9)])
    board = np.column_stack([world[:, 0] - (origin[0] + 2 * square_mm),
                             (origin[1] - 2 * square_mm) - world[:, 1]])
    err = np.linalg.norm(h.px_to_mm(project(sim_scene.homography, world)) - board, axis=1)
    assert err.max() < 0.5


def test_checkerboard_not_found_says_what_was_looked_for(warp_onto_plane) -> None:
    blank = np.full((400, 400, 3), 200, np.uint8)
    with pytest.raises(CalibrationError, match="9x6 inner corners"):
        Homography.from_checkerboard(warp_onto_plane(blank, 4.0, (0.0, 0.0)), (9, 6), 25.0)


def test_charuco_image_gives_the_board_frame(sim_scene, warp_onto_plane) -> None:
    aruco = cv2.aruco
    squares, square_mm, marker_mm, ppm = (7, 5), 40.0, 30.0, 4.0
    board = aruco.CharucoBoard(squares, square_mm, marker_mm,
                               aruco.getPredefinedDictionary(aruco.DICT_5X5_100))
    size = (int(squares[0] * square_mm * ppm), int(squares[1] * square_mm * ppm))
    canvas = cv2.cvtColor(board.generateImage(size, marginSize=0), cv2.COLOR_GRAY2BGR)
    canvas = np.pad(canvas, ((40, 40), (40, 40), (0, 0)), constant_values=255)
    origin = (-160.0, 120.0)
    image = warp_onto_plane(canvas, ppm, origin)
    h = Homography.from_charuco(image, squares, square_mm, marker_mm, "DICT_5X5_100")
    assert h.reprojection_error_px().points >= 12
    margin_mm = 40 / ppm
    world = np.array([[x, y] for y in np.linspace(-70, 100, 5) for x in np.linspace(-140, 100, 7)])
    board_mm = np.column_stack([world[:, 0] - (origin[0] + margin_mm),
                                (origin[1] - margin_mm) - world[:, 1]])
    err = np.linalg.norm(h.px_to_mm(project(sim_scene.homography, world)) - board_mm, axis=1)
    assert err.max() < 0.7


def test_charuco_rejects_an_unknown_dictionary() -> None:
    with pytest.raises(CalibrationError, match="unknown ArUco dictionary"):
        Homography.from_charuco(np.zeros((100, 100), np.uint8), (5, 7), 30, 20, "DICT_NOPE")


def _distorted_view():
    k = np.array([[700.0, 0, 320], [0, 700.0, 240], [0, 0, 1]])
    dist = np.array([-0.25, 0.08, 0.0005, -0.0004, 0.0])
    rvec = np.array([2.6, 0.0, 0.0])  # looking down at the plane, tilted
    tvec = np.array([0.0, 60.0, 900.0])
    gx, gy = np.meshgrid(np.linspace(-300, 300, 9), np.linspace(-150, 150, 7))
    mm = np.column_stack([gx.ravel(), gy.ravel()])
    obj = np.column_stack([mm, np.zeros(len(mm))])
    px, _ = cv2.projectPoints(obj, rvec, tvec, k, dist)
    return k, dist, mm, px.reshape(-1, 2)


def test_intrinsics_and_distortion_are_undone_before_the_homography() -> None:
    k, dist, mm, px = _distorted_view()
    assert px.min() > 0 and px[:, 0].max() < 640 and px[:, 1].max() < 480
    plain = Homography.from_points(px, mm)
    assert plain.reprojection_error_px().max_px > 3  # the lens bends straight lines
    h = Homography.from_points(px, mm, k, dist)
    assert h.reprojection_error_px().max_px < 1e-3
    np.testing.assert_allclose(h.px_to_mm(px), mm, atol=1e-3)
    np.testing.assert_allclose(h.mm_to_px(mm), px, atol=1e-3)


def test_jacobian_turns_pixel_velocity_into_mm_velocity(sim_scene) -> None:
    mm = np.array([[-300, -80], [300, -80], [300, 80], [-300, 80]], float)
    h = Homography.from_points(project(sim_scene.homography, mm), mm)
    p0 = np.array([[0.0, 0.0], [120.0, 40.0]])
    v_mm = np.array([[100.0, 0.0], [0.0, -50.0]])
    dt = 1e-3
    px0 = project(sim_scene.homography, p0)
    v_px = (project(sim_scene.homography, p0 + v_mm * dt) - px0) / dt
    got = np.einsum("nij,nj->ni", h.jacobian(px0), v_px)
    np.testing.assert_allclose(got, v_mm, atol=0.1)


def test_config_round_trip_through_yaml(sim_scene) -> None:
    k, dist, mm, px = _distorted_view()
    h = Homography.from_points(px, mm, k, dist)
    data = yaml.safe_load(yaml.safe_dump({"calibration": h.to_dict()}))["calibration"]
    assert set(data) == {"homography", "camera_matrix", "dist_coeffs", "points"}
    again = Homography.from_dict(data)
    np.testing.assert_allclose(again.matrix, h.matrix, rtol=1e-12)
    assert again.reprojection_error_px().max_px < 1e-3
    # points alone are enough
    only_points = Homography.from_dict({"points": data["points"], "camera_matrix":
                                        data["camera_matrix"], "dist_coeffs": data["dist_coeffs"]})
    np.testing.assert_allclose(only_points.px_to_mm(px), mm, atol=1e-3)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"homography": [[1, 0, 0], [0, 1, 0]]}, "3x3"),
        ({"points": [[0, 0, 0, 0]] * 4, "scale": 2}, "scale"),
        ({}, "needs 'points'"),
        ({"homography": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "dist_coeffs": [0, 0, 0, 0]},
         "need a camera_matrix"),
        ({"homography": [[1, 2, 0], [2, 4, 0], [0, 0, 1]]}, "singular"),
        ({"points": [[0, 0, 0, 0], [1, 0, 1, 0], [2, 0, 2, 0], [3, 0, 3, 0]]}, "one line"),
    ],
)
def test_bad_config_is_refused(data, match) -> None:
    with pytest.raises(CalibrationError, match=match):
        Homography.from_dict(data)


def test_config_model_forbids_unknown_keys() -> None:
    assert "points" in CalibrationConfig.model_fields
    with pytest.raises(ValueError):
        CalibrationConfig.model_validate({"homografy": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]})


def test_canvas_mapping_helper_is_consistent() -> None:
    a = canvas_to_world(4.0, (10.0, 20.0))
    np.testing.assert_allclose(project(a, np.array([[-0.5, -0.5]])), [[10.0, 20.0]])
