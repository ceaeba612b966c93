"""Camera calibration to the work plane: a homography from pixels to millimetres.

A camera looking at a flat work plane (a belt, a table) maps plane millimetres to
pixels by a homography.  :class:`Homography` holds that mapping, built from

- at least 4 point pairs (pixel, millimetre) measured by hand (``from_points``),
- a checkerboard lying on the plane (``from_checkerboard``), or
- a ChArUco board (``from_charuco``: corners are identified, so a partly hidden
  board works and the board's orientation is never ambiguous),

optionally with the camera's intrinsics and lens distortion: pixels are
undistorted before the homography (and distorted again on the way back).

``matrix`` maps *undistorted* pixels (x, y, 1) to work-plane mm (X, Y, W); the
config key ``homography`` holds it.  Degenerate input (too few pairs, points on
a line, repeated points) raises :class:`CalibrationError` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import CalibrationError

F64 = npt.NDArray[np.float64]

MIN_POINTS = 4
COLLINEAR_RATIO = 1e-2  # smallest / largest spread of a point set below this: a line


class CalibrationConfig(BaseModel):
    """``calibration:`` of a camera in the config: points or a homography (px -> mm)."""

    model_config = ConfigDict(extra="forbid")

    points: list[tuple[float, float, float, float]] | None = Field(
        default=None, description="Point pairs [u_px, v_px, x_mm, y_mm], at least 4."
    )
    homography: list[list[float]] | None = Field(
        default=None, description="3x3 matrix, undistorted pixels -> work-plane mm."
    )
    camera_matrix: list[list[float]] | None = Field(
        default=None, description="3x3 intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]."
    )
    dist_coeffs: list[float] | None = Field(
        default=None, description="OpenCV distortion coefficients (k1, k2, p1, p2[, k3...])."
    )

    @field_validator("homography", "camera_matrix")
    @classmethod
    def _three_by_three(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is not None and (len(value) != 3 or any(len(row) != 3 for row in value)):
            raise ValueError("must be a 3x3 matrix (three rows of three numbers)")
        return value

    @field_validator("dist_coeffs")
    @classmethod
    def _opencv_lengths(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) not in (4, 5, 8, 12, 14):
            raise ValueError(f"needs 4, 5, 8, 12 or 14 coefficients, got {len(value)}")
        return value


@dataclass(frozen=True)
class ReprojectionError:
    """How far the calibration points land from where they were seen, in pixels."""

    rms_px: float
    max_px: float
    points: int


def _as_points(values: npt.ArrayLike, name: str) -> F64:
    arr = np.asarray(values, np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CalibrationError(f"{name} must be a list of (x, y) pairs, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise CalibrationError(f"{name} contain a value that is not a finite number")
    return arr


def _check_spread(points: F64, name: str) -> None:
    """Refuse repeated or collinear points, saying which."""
    n = len(points)
    diff = points[:, None, :] - points[None, :, :]
    dist = np.sqrt((diff**2).sum(axis=2))
    scale = float(dist.max())
    close = np.argwhere(np.triu(dist <= 1e-6 * max(scale, 1.0), k=1))
    if scale == 0.0 or len(close):
        i, j = close[0] if len(close) else (0, 1)
        raise CalibrationError(
            f"{name} {i + 1} and {j + 1} are the same point ({points[i, 0]:g}, {points[i, 1]:g}); "
            "a homography needs at least 4 distinct points spread over the area to calibrate."
        )
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    if spread[1] < COLLINEAR_RATIO * spread[0]:
        raise CalibrationError(
            f"the {n} {name} lie on (or very near) one line, so they fix no homography; "
            "pick points that span the area in both directions, e.g. the four corners of "
            "the belt section the camera sees."
        )
    if n == MIN_POINTS:
        for skip in range(4):
            a, b, c = np.delete(points, skip, axis=0)
            area = abs((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])) / 2
            if area < COLLINEAR_RATIO * scale**2 / 2:
                raise CalibrationError(
                    f"with only 4 {name}, three of them (all but point {skip + 1}) lie on one "
                    "line, which leaves the homography undetermined; move a point off the "
                    "line or add more points."
                )


def _apply(h: F64, points: F64) -> F64:
    q = points @ h[:, :2].T + h[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(q[:, :2] / q[:, 2:3], np.float64)


class Homography:
    """Pixels <-> work-plane millimetres for one camera."""

    def __init__(
        self,
        matrix: npt.ArrayLike,
        camera_matrix: npt.ArrayLike | None = None,
        dist_coeffs: npt.ArrayLike | None = None,
        points_px: npt.ArrayLike | None = None,
        points_mm: npt.ArrayLike | None = None,
    ) -> None:
        m = np.asarray(matrix, np.float64)
        if m.shape != (3, 3) or not np.isfinite(m).all():
            raise CalibrationError(f"a homography is a finite 3x3 matrix, got shape {m.shape}")
        if abs(np.linalg.det(m)) < 1e-12 * max(float(np.abs(m).max()), 1e-300) ** 3:
            raise CalibrationError("the homography is singular (it maps the image onto a line)")
        self.matrix: F64 = m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m
        self.inverse: F64 = np.linalg.inv(self.matrix)
        self.camera_matrix: F64 | None = None
        self.dist_coeffs: F64 | None = None
        if camera_matrix is not None:
            k = np.asarray(camera_matrix, np.float64)
            if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
                raise CalibrationError("camera_matrix must be 3x3 with positive focal lengths")
            self.camera_matrix = k
            self.dist_coeffs = (
                np.zeros(5) if dist_coeffs is None else np.asarray(dist_coeffs, np.float64).ravel()
            )
        elif dist_coeffs is not None:
            raise CalibrationError("dist_coeffs need a camera_matrix (the intrinsics) as well")
        self.points_px: F64 | None = None if points_px is None else _as_points(points_px, "px")
        self.points_mm: F64 | None = None if points_mm is None else _as_points(points_mm, "mm")

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_points(
        cls,
        px: npt.ArrayLike,
        mm: npt.ArrayLike,
        camera_matrix: npt.ArrayLike | None = None,
        dist_coeffs: npt.ArrayLike | None = None,
    ) -> Homography:
        """Least-squares homography from N >= 4 pairs of pixel and mm points (N, 2)."""
        p = _as_points(px, "pixel points")
        w = _as_points(mm, "mm points")
        if len(p) != len(w):
            raise CalibrationError(
                f"got {len(p)} pixel points but {len(w)} mm points; give them in pairs"
            )
        if len(p) < MIN_POINTS:
            raise CalibrationError(
                f"a homography needs at least {MIN_POINTS} point pairs, got {len(p)}; "
                "measure more points on the work plane (the corners of the visible area "
                "are a good start)."
            )
        _check_spread(p, "pixel points")
        _check_spread(w, "mm points")
        probe = cls(np.eye(3), camera_matrix, dist_coeffs)
        undist = probe.undistort(p)
        # fit mm -> px: the measurement noise is in pixels, so that is where the
        # least-squares (and OpenCV's Levenberg-Marquardt refinement) should work
        h_inv, _ = cv2.findHomography(w, undist, 0)
        h = None
        if h_inv is not None and np.isfinite(h_inv).all() and abs(np.linalg.det(h_inv)) > 0:
            h = np.linalg.inv(h_inv)
        if h is None or not np.isfinite(h).all():
            raise CalibrationError(
                "no homography fits these point pairs (OpenCV found none); check that each "
                "pixel point is paired with its own mm point."
            )
        projected = undist @ h[:, :2].T + h[:, 2]
        if not (np.all(projected[:, 2] > 0) or np.all(projected[:, 2] < 0)):
            raise CalibrationError(
                "the point pairs are inconsistent: no plane-to-image mapping keeps them all "
                "on one side of the horizon (a pixel point is probably paired with the wrong "
                "mm point)."
            )
        return cls(h, camera_matrix, dist_coeffs, points_px=p, points_mm=w)

    @classmethod
    def from_checkerboard(
        cls,
        image: npt.ArrayLike,
        pattern: tuple[int, int],
        square_mm: float,
        camera_matrix: npt.ArrayLike | None = None,
        dist_coeffs: npt.ArrayLike | None = None,
    ) -> Homography:
        """Homography from a checkerboard on the work plane.

        ``pattern`` counts the *inner* corners (cols, rows).  The mm frame is the
        board's: origin at the inner corner nearest the image's top-left, X along
        the board's rows, Y along its columns.
        """
        cols, rows = int(pattern[0]), int(pattern[1])
        if cols < 2 or rows < 2 or square_mm <= 0:
            raise CalibrationError(
                f"a checkerboard needs at least 2x2 inner corners and a positive square size, "
                f"got {cols}x{rows} and {square_mm} mm"
            )
        gray = _gray(image)
        found, corners = cv2.findChessboardCornersSB(gray, (cols, rows), flags=0)
        if not found:
            flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE
            found, corners = cv2.findChessboardCorners(gray, (cols, rows), flags=flags)
            if found:
                criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-3)
                corners = cv2.cornerSubPix(gray, corners, (5, 5), (-1, -1), criteria)
        if not found:
            raise CalibrationError(
                f"no checkerboard with {cols}x{rows} inner corners found in the image "
                f"({gray.shape[1]}x{gray.shape[0]} px); the pattern counts inner corners "
                "(squares minus one per side), and the whole board must be in view, sharp "
                "and evenly lit."
            )
        px = np.asarray(corners, np.float64).reshape(-1, 2)
        if px[0].sum() > px[-1].sum():  # OpenCV may start at either end of the board
            px = px[::-1].copy()
        i = np.arange(cols * rows)
        mm = np.column_stack([(i % cols) * square_mm, (i // cols) * square_mm]).astype(np.float64)
        return cls.from_points(px, mm, camera_matrix, dist_coeffs)

    @classmethod
    def from_charuco(
        cls,
        image: npt.ArrayLike,
        squares: tuple[int, int],
        square_mm: float,
        marker_mm: float,
        dictionary: str = "DICT_5X5_100",
        camera_matrix: npt.ArrayLike | None = None,
        dist_coeffs: npt.ArrayLike | None = None,
    ) -> Homography:
        """Homography from a ChArUco board (``squares`` = (cols, rows) of squares).

        The mm frame is the board's own (OpenCV's ``CharucoBoard`` chessboard
        corners): it does not depend on how the board lies in the image.
        """
        aruco = getattr(cv2, "aruco", None)
        if aruco is None or not hasattr(aruco, "CharucoDetector"):
            raise CalibrationError(
                "ChArUco calibration needs OpenCV's aruco module (OpenCV >= 4.7); "
                "use a checkerboard or point pairs instead"
            )
        if not 0 < marker_mm < square_mm:
            raise CalibrationError(
                f"the marker size ({marker_mm} mm) must be positive and smaller than the "
                f"square size ({square_mm} mm)"
            )
        dict_id = getattr(aruco, dictionary, None)
        if not isinstance(dict_id, int) or not dictionary.startswith("DICT_"):
            raise CalibrationError(
                f"unknown ArUco dictionary {dictionary!r}; use one of OpenCV's names, "
                "e.g. DICT_4X4_50, DICT_5X5_100, DICT_6X6_250"
            )
        board = aruco.CharucoBoard(
            (int(squares[0]), int(squares[1])), float(square_mm), float(marker_mm),
            aruco.getPredefinedDictionary(dict_id),
        )  # fmt: skip
        corners, ids, _, _ = aruco.CharucoDetector(board).detectBoard(_gray(image))
        count = 0 if ids is None else len(ids)
        if count < MIN_POINTS:
            raise CalibrationError(
                f"found {count} ChArUco corners of the {squares[0]}x{squares[1]} board "
                f"({dictionary}), need at least {MIN_POINTS}; check the board size, the "
                "dictionary and that the board is in view and sharp."
            )
        obj = np.asarray(board.getChessboardCorners(), np.float64)[np.ravel(ids)][:, :2]
        px = np.asarray(corners, np.float64).reshape(-1, 2)
        return cls.from_points(px, obj, camera_matrix, dist_coeffs)

    @classmethod
    def from_config(cls, config: CalibrationConfig) -> Homography:
        """Build from the config: ``homography`` when given (points kept for the error)."""
        pts = None if config.points is None else np.asarray(config.points, np.float64)
        if config.homography is not None:
            return cls(
                config.homography, config.camera_matrix, config.dist_coeffs,
                points_px=None if pts is None else pts[:, :2],
                points_mm=None if pts is None else pts[:, 2:],
            )  # fmt: skip
        if pts is None:
            raise CalibrationError(
                "calibration needs 'points' ([u_px, v_px, x_mm, y_mm] rows) or 'homography'"
            )
        return cls.from_points(pts[:, :2], pts[:, 2:], config.camera_matrix, config.dist_coeffs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Homography:
        """Build from a ``calibration:`` mapping (see :class:`CalibrationConfig`)."""
        try:
            config = CalibrationConfig.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'calibration'}: {e['msg']}"
                for e in exc.errors()
            )
            raise CalibrationError(f"invalid calibration: {problems}") from None
        return cls.from_config(config)

    def to_dict(self) -> dict[str, Any]:
        """The config form: homography (px -> mm), intrinsics, and the points if known."""
        out: dict[str, Any] = {"homography": [[float(v) for v in row] for row in self.matrix]}
        if self.camera_matrix is not None and self.dist_coeffs is not None:
            out["camera_matrix"] = [[float(v) for v in row] for row in self.camera_matrix]
            out["dist_coeffs"] = [float(v) for v in self.dist_coeffs]
        if self.points_px is not None and self.points_mm is not None:
            out["points"] = [
                [float(u), float(v), float(x), float(y)]
                for (u, v), (x, y) in zip(self.points_px, self.points_mm, strict=True)
            ]
        return out

    # -- mapping -------------------------------------------------------------------
    def undistort(self, points_px: npt.ArrayLike) -> F64:
        """Pixels (..., 2) as seen -> pixels of the ideal pinhole camera."""
        p = np.asarray(points_px, np.float64)
        if self.camera_matrix is None or self.dist_coeffs is None or p.size == 0:
            return p.copy()
        flat = p.reshape(-1, 1, 2)
        out = cv2.undistortPoints(flat, self.camera_matrix, self.dist_coeffs, P=self.camera_matrix)
        return np.asarray(out, np.float64).reshape(p.shape)

    def distort(self, points_px: npt.ArrayLike) -> F64:
        """Pixels (..., 2) of the ideal pinhole camera -> pixels as seen."""
        p = np.asarray(points_px, np.float64)
        if self.camera_matrix is None or self.dist_coeffs is None or p.size == 0:
            return p.copy()
        flat = p.reshape(-1, 2)
        k = self.camera_matrix
        rays = np.column_stack([flat, np.ones(len(flat))]) @ np.linalg.inv(k).T
        out, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), k, self.dist_coeffs)
        return np.asarray(out, np.float64).reshape(p.shape)

    def px_to_mm(self, points: npt.ArrayLike) -> F64:
        """Image pixels (..., 2) -> work-plane mm (..., 2); NaN stays NaN."""
        p = np.asarray(points, np.float64)
        return _apply(self.matrix, self.undistort(p).reshape(-1, 2)).reshape(p.shape)

    def mm_to_px(self, points: npt.ArrayLike) -> F64:
        """Work-plane mm (..., 2) -> image pixels (..., 2)."""
        p = np.asarray(points, np.float64)
        return self.distort(_apply(self.inverse, p.reshape(-1, 2))).reshape(p.shape)

    def jacobian(self, points_px: npt.ArrayLike, step_px: float = 0.5) -> F64:
        """d(mm)/d(px) at pixels (N, 2) -> (N, 2, 2): turns px/s into mm/s locally."""
        p = np.asarray(points_px, np.float64).reshape(-1, 2)
        offsets = np.array([[step_px, 0.0], [-step_px, 0.0], [0.0, step_px], [0.0, -step_px]])
        mm = self.px_to_mm(p[:, None, :] + offsets[None]).reshape(-1, 4, 2)
        d_du = (mm[:, 0] - mm[:, 1]) / (2 * step_px)
        d_dv = (mm[:, 2] - mm[:, 3]) / (2 * step_px)
        return np.stack([d_du, d_dv], axis=2)

    def reprojection_error_px(self) -> ReprojectionError:
        """RMS and max distance (px) between the seen points and the mapped mm points."""
        if self.points_px is None or self.points_mm is None or len(self.points_px) == 0:
            return ReprojectionError(float("nan"), float("nan"), 0)
        d = np.linalg.norm(self.mm_to_px(self.points_mm) - self.points_px, axis=1)
        return ReprojectionError(float(np.sqrt(np.mean(d**2))), float(d.max()), len(d))


def _gray(image: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise CalibrationError(
            f"a calibration image must be 8-bit grey or BGR, got {img.dtype} {img.shape}"
        )
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(gray, np.uint8)
