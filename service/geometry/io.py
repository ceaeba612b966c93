"""Files and reports of ``linewatch calibrate``: point CSVs, intrinsics, the printout."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import yaml

from service.errors import CalibrationError
from service.geometry.calibration import Homography

F64 = npt.NDArray[np.float64]


def parse_grid(text: str, what: str = "pattern") -> tuple[int, int]:
    """'9x6' -> (9, 6)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        cols, rows = (int(p) for p in parts)
    except ValueError:
        raise CalibrationError(
            f"{what} {text!r} is not COLSxROWS (two whole numbers, e.g. 9x6)"
        ) from None
    if cols < 2 or rows < 2:
        raise CalibrationError(f"{what} {text!r} needs at least 2 in each direction")
    return cols, rows


def read_points_csv(path: Path) -> tuple[F64, F64]:
    """A CSV of ``u_px, v_px, x_mm, y_mm`` rows (an optional header line) -> (px, mm)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationError(f"cannot read the points file {path}: {exc.strerror}") from None
    rows: list[list[float]] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row if c.strip()]
        if not cells or cells[0].startswith("#"):
            continue
        try:
            values = [float(c) for c in cells]
        except ValueError:
            if not rows and lineno == 1:
                continue  # a header line
            raise CalibrationError(
                f"{path}:{lineno}: expected four numbers u_px, v_px, x_mm, y_mm, got {row}"
            ) from None
        if len(values) != 4:
            raise CalibrationError(
                f"{path}:{lineno}: expected four numbers u_px, v_px, x_mm, y_mm, "
                f"got {len(values)}"
            )
        rows.append(values)
    arr = np.array(rows, np.float64).reshape(-1, 4)
    return arr[:, :2], arr[:, 2:]


def read_intrinsics(path: Path) -> tuple[F64, F64 | None]:
    """YAML/JSON with ``camera_matrix`` (3x3) and optional ``dist_coeffs``."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibrationError(f"cannot read the intrinsics file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CalibrationError(f"{path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or "camera_matrix" not in data:
        raise CalibrationError(f"{path} needs a 'camera_matrix' (3x3) and may give 'dist_coeffs'")
    k = np.asarray(data["camera_matrix"], np.float64)
    if k.shape != (3, 3):
        raise CalibrationError(f"{path}: camera_matrix must be 3x3, got shape {k.shape}")
    dist = data.get("dist_coeffs")
    return k, None if dist is None else np.asarray(dist, np.float64).ravel()


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CalibrationError(f"cannot read an image from {path} (missing, or not an image)")
    return np.asarray(image, np.uint8)


def calibration_report(h: Homography, source: str) -> dict[str, Any]:
    """The JSON the CLI prints: the config block plus the reprojection error."""
    err = h.reprojection_error_px()
    return {
        "source": source,
        "calibration": h.to_dict(),
        "reprojection_error_px": {
            "rms": None if err.points == 0 else round(err.rms_px, 4),
            "max": None if err.points == 0 else round(err.max_px, 4),
            "points": err.points,
        },
    }


def render_report(report: dict[str, Any]) -> str:
    """Human-readable form: the homography, the error, a config snippet."""
    cal = report["calibration"]
    err = report["reprojection_error_px"]
    lines = [f"calibrated from {report['source']}", "homography (px -> mm):"]
    lines += ["  [" + ", ".join(f"{v: .6g}" for v in row) + "]" for row in cal["homography"]]
    lines.append(
        f"reprojection error: rms {err['rms']} px, max {err['max']} px over {err['points']} points"
    )
    snippet = {k: v for k, v in cal.items() if k != "points"}
    lines.append("config (cameras[].calibration):")
    lines.append(json.dumps(snippet))
    return "\n".join(lines)
