"""Fixtures: the sim's true camera, and boards drawn and warped onto its work plane."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from service.sim import Scene

SIM_W, SIM_H = 640, 480


@pytest.fixture(scope="session")
def sim_scene() -> Scene:
    return Scene("conveyor", seed=1, width=SIM_W, height=SIM_H)


def canvas_to_world(ppm: float, origin_mm: tuple[float, float]) -> npt.NDArray[np.float64]:
    """Board canvas pixel (pixel-centre convention) -> world mm; canvas y runs to -Y."""
    x0, y0 = origin_mm
    return np.array([[1 / ppm, 0, x0 + 0.5 / ppm], [0, -1 / ppm, y0 - 0.5 / ppm], [0, 0, 1]])


BoardImage = Callable[..., npt.NDArray[np.uint8]]


@pytest.fixture
def warp_onto_plane(sim_scene: Scene) -> BoardImage:
    """warp_onto_plane(canvas, ppm, origin_mm) -> the sim camera's image of the canvas
    lying flat on the work plane, canvas top-left at origin_mm (X right, Y up)."""

    def make(canvas: npt.NDArray[np.uint8], ppm: float,
             origin_mm: tuple[float, float]) -> npt.NDArray[np.uint8]:
        h = sim_scene.homography @ canvas_to_world(ppm, origin_mm)
        # anti-alias: the canvas is sampled down ~5x
        soft = cv2.GaussianBlur(canvas, (0, 0), 1.5)
        out = cv2.warpPerspective(soft, h, (SIM_W, SIM_H), flags=cv2.INTER_AREA,
                                  borderValue=(110, 115, 120))
        return np.asarray(out, np.uint8)

    return make


@pytest.fixture
def checkerboard_canvas() -> Callable[..., npt.NDArray[np.uint8]]:
    """checkerboard_canvas(cols, rows, square_px) -> BGR image of a board with
    (cols+1) x (rows+1) squares and a one-square white margin."""

    def make(cols: int, rows: int, square_px: int) -> npt.NDArray[np.uint8]:
        ny, nx = rows + 1, cols + 1
        cells = (np.add.outer(np.arange(ny), np.arange(nx)) % 2 == 0).astype(np.uint8) * 255
        board = np.kron(255 - cells, np.ones((square_px, square_px), np.uint8))
        board = np.pad(board, square_px, constant_values=255)
        return np.asarray(cv2.cvtColor(board, cv2.COLOR_GRAY2BGR), np.uint8)

    return make
