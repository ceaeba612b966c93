"""Write a sim clip to a video file and its ground truth to JSON lines.

H.264 comes from the system ``ffmpeg`` (libx264, no B-frames so the clip loops
smoothly over RTSP) when it is installed, else from OpenCV's own FFmpeg build when
it has an H.264 encoder; otherwise the clip is written as MJPG in an AVI, and
stderr says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, TextIO

import cv2
import numpy as np

from service.errors import LineWatchError
from service.sim.scene import Scene


@dataclass(frozen=True)
class RenderResult:
    video: Path
    truth: Path | None
    frames: int
    codec: str


class _Writer(Protocol):
    def write(self, image: np.ndarray) -> None: ...
    def close(self) -> None: ...


class _FfmpegWriter:
    def __init__(self, exe: str, out: Path, fps: float, size: tuple[int, int]) -> None:
        cmd = [
            exe,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "bgr24",
            "-s",
            f"{size[0]}x{size[1]}",
            "-r",
            f"{fps:g}",
            "-i",
            "-",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "18",
            "-bf",
            "0",
            "-g",
            str(max(1, int(fps))),
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            str(out),
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._out = out

    def write(self, image: np.ndarray) -> None:
        stdin: IO[bytes] | None = self._proc.stdin
        assert stdin is not None
        stdin.write(np.ascontiguousarray(image).tobytes())

    def close(self) -> None:
        _, err = self._proc.communicate()
        if self._proc.returncode != 0:
            raise LineWatchError(
                f"ffmpeg failed writing {self._out}: {err.decode(errors='replace').strip()}"
            )


class _CvWriter:
    def __init__(self, writer: cv2.VideoWriter) -> None:
        self._w = writer

    def write(self, image: np.ndarray) -> None:
        self._w.write(image)

    def close(self) -> None:
        self._w.release()


def _ffmpeg_has_x264(exe: str) -> bool:
    try:
        res = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"libx264" in res.stdout


def _open_writer(
    out: Path, fps: float, size: tuple[int, int], log: TextIO
) -> tuple[_Writer, Path, str]:
    if out.suffix.lower() in (".mp4", ".mkv", ".mov"):
        exe = shutil.which("ffmpeg")
        if exe and _ffmpeg_has_x264(exe):
            return _FfmpegWriter(exe, out, fps, size), out, "h264"
        w = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"avc1"), fps, size)
        if w.isOpened():
            return _CvWriter(w), out, "h264"
        w.release()
        fallback = out.with_suffix(".avi")
        print(
            f"linewatch: no H.264 encoder available (install ffmpeg with libx264); "
            f"writing MJPG to {fallback} instead",
            file=log,
        )
        out = fallback
    w = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"MJPG"), fps, size)
    if not w.isOpened():
        raise LineWatchError(f"cannot open a video writer for {out} (MJPG)")
    return _CvWriter(w), out, "mjpg"


def render_clip(
    scene: Scene,
    frames: int,
    out: Path,
    truth_path: Path | None = None,
    log: TextIO = sys.stderr,
) -> RenderResult:
    """Render ``frames`` frames of ``scene`` into ``out`` (+ JSON-lines truth)."""
    if frames <= 0:
        raise LineWatchError("--frames must be > 0")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer, out, codec = _open_writer(out, scene.fps, (scene.width, scene.height), log)
    tf = None
    if truth_path is not None:
        truth_path.parent.mkdir(parents=True, exist_ok=True)
        tf = truth_path.open("w", encoding="utf-8")
    try:
        for i in range(frames):
            image, truth = scene.render(i)
            writer.write(image)
            if tf is not None:
                tf.write(json.dumps(truth.to_json(), separators=(",", ":")) + "\n")
    finally:
        writer.close()
        if tf is not None:
            tf.close()
    return RenderResult(out, truth_path, frames, codec)
