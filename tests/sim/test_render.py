"""`linewatch sim render` writes a real video and one truth line per frame."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.sim import Scene


def test_sim_render_writes_video_and_truth(tmp_path: Path) -> None:
    out, truth = tmp_path / "clip.mp4", tmp_path / "truth.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "sim",
            "render",
            "--seed",
            "4",
            "--frames",
            "12",
            "--fps",
            "15",
            "--width",
            "320",
            "--height",
            "240",
            "--out",
            str(out),
            "--truth",
            str(truth),
        ],
    )
    assert res.exit_code == 0, res.output
    video = out if out.exists() else out.with_suffix(".avi")
    cap = cv2.VideoCapture(str(video))
    assert cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 320
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    assert len(frames) == 12
    lines = truth.read_text().splitlines()
    assert len(lines) == 12
    rec = [json.loads(x) for x in lines]
    assert [r["frame"] for r in rec] == list(range(12))
    assert rec[3]["t"] == pytest.approx(3 / 15)
    # the decoded frame is close to the rendered one (lossy codec)
    expected, t = Scene("conveyor", seed=4, width=320, height=240, fps=15).render(5)
    assert rec[5]["instances"] == [i.to_json() for i in t.instances]
    assert np.abs(frames[5].astype(int) - expected.astype(int)).mean() < 6


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="system ffmpeg (libx264) not installed")
def test_sim_render_is_h264_with_ffmpeg(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    res = CliRunner().invoke(app, ["sim", "render", "--frames", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "h264" in res.output
    assert out.exists() and out.stat().st_size > 1000


def test_sim_render_mjpg_avi_and_bad_scenario(tmp_path: Path) -> None:
    out = tmp_path / "clip.avi"
    res = CliRunner().invoke(app, ["sim", "render", "--frames", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "mjpg" in res.output and out.exists()
    res = CliRunner().invoke(app, ["sim", "render", "--scenario", "bogus", "--out", str(out)])
    assert res.exit_code == 2
    assert "unknown scenario" in res.output and "Traceback" not in res.output
