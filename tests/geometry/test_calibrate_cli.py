"""``linewatch calibrate``: real files in, one JSON object or a one-paragraph error out."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml
from typer.testing import CliRunner

from service.cli import app
from service.sim.world import project


def _run(*args: str):
    return CliRunner().invoke(app, ["calibrate", *args])


def test_points_csv_prints_one_json_object(tmp_path: Path, sim_scene) -> None:
    mm = np.array([[-300, -80], [300, -80], [300, 80], [-300, 80], [0, 150], [100, 0]], float)
    px = project(sim_scene.homography, mm)
    csv_file = tmp_path / "points.csv"
    csv_file.write_text("u_px,v_px,x_mm,y_mm\n" + "\n".join(
        f"{u:.4f}, {v:.4f}, {x:g}, {y:g}" for (u, v), (x, y) in zip(px, mm, strict=True)) + "\n")
    result = _run("--points", str(csv_file), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["reprojection_error_px"]["points"] == 6
    assert report["reprojection_error_px"]["rms"] < 0.01
    expected = np.linalg.inv(sim_scene.homography)
    np.testing.assert_allclose(report["calibration"]["homography"], expected / expected[2, 2],
                               rtol=1e-4, atol=1e-4)
    human = _run("--points", str(csv_file))
    assert human.exit_code == 0 and "reprojection error: rms" in human.output


def test_collinear_points_exit_2_with_a_paragraph(tmp_path: Path) -> None:
    csv_file = tmp_path / "line.csv"
    csv_file.write_text("".join(f"{10 * i}, {5 * i}, {i}, 0\n" for i in range(6)))
    result = _run("--points", str(csv_file), "--json")
    assert result.exit_code == 2
    assert "one line" in result.output and "Traceback" not in result.output


def test_too_few_points_and_bad_rows(tmp_path: Path) -> None:
    few = tmp_path / "few.csv"
    few.write_text("0,0,0,0\n10,0,1,0\n0,10,0,1\n")
    result = _run("--points", str(few))
    assert result.exit_code == 2 and "at least 4" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("0,0,0,0\n10,0,1\n")
    result = _run("--points", str(bad))
    assert result.exit_code == 2 and "bad.csv:2" in result.output
    result = _run("--points", str(tmp_path / "missing.csv"))
    assert result.exit_code == 2 and "cannot read" in result.output


def test_checkerboard_image_with_intrinsics(
    tmp_path: Path, warp_onto_plane, checkerboard_canvas
) -> None:
    image = warp_onto_plane(checkerboard_canvas(9, 6, 100), 4.0, (-170.0, 110.0))
    img_file = tmp_path / "board.png"
    cv2.imwrite(str(img_file), image)
    intr = tmp_path / "camera.yaml"
    intr.write_text(yaml.safe_dump({
        "camera_matrix": [[760.0, 0, 319.5], [0, 760.0, 239.5], [0, 0, 1]],
        "dist_coeffs": [0.0, 0.0, 0.0, 0.0, 0.0]}))
    result = _run("--checkerboard", str(img_file), "--pattern", "9x6", "--square-mm", "25",
                  "--intrinsics", str(intr), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["reprojection_error_px"]["points"] == 54
    assert report["reprojection_error_px"]["rms"] < 0.3
    assert report["calibration"]["camera_matrix"][0][0] == 760.0


def test_checkerboard_errors(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 255, np.uint8))
    result = _run("--checkerboard", str(blank), "--pattern", "9x6")
    assert result.exit_code == 2 and "no checkerboard" in result.output
    result = _run("--checkerboard", str(blank), "--pattern", "nine")
    assert result.exit_code == 2 and "COLSxROWS" in result.output
    result = _run("--checkerboard", str(blank), "--points", str(blank))
    assert result.exit_code == 2 and "exactly one" in result.output
