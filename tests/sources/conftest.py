"""Fixtures for the source tests: real clips, real RTSP and MJPEG servers on loopback."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
VIDEOS = (REPO / "../shared/data/videos").resolve()
CLIP_NAME = "intel_bolt-multi-size-detection_preview_h264.mp4"  # 480x270, 15 fps, 37 frames
CLIP_FRAMES = 37
CLIP_FPS = 15.0
CLIP_SHAPE = (270, 480, 3)
RTSP_SERVER = REPO / "tests/support/rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def camera_id() -> str:
    """A unique camera id (Prometheus metrics are process-global)."""
    return f"cam-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def clip() -> Path:
    path = VIDEOS / CLIP_NAME
    if not path.is_file():
        pytest.skip(f"test clip {path} is absent (the shared test data is not mounted)")
    return path


@pytest.fixture(scope="session")
def loop_clip(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clip without B-frames and a keyframe every second, so RTSP loops smoothly."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return clip  # loops with a ~0.5 s stall at each boundary; still below the timeouts
    out = tmp_path_factory.mktemp("clips") / "bolt-nobf.mp4"
    subprocess.run(
        [ffmpeg, "-v", "error", "-y", "-i", str(clip), "-an", "-c:v", "libx264", "-bf", "0",
         "-g", "15", "-preset", "veryfast", str(out)],
        check=True,
        timeout=60,
    )
    return out


def _rtsp_unavailable() -> str | None:
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is absent"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
         "from gi.repository import GstRtspServer"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        return (
            f"gi/GstRtspServer is not importable by {SYSTEM_PYTHON} (apt-get install python3-gi "
            "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
            f"gstreamer1.0-plugins-bad): {probe.stderr.strip().splitlines()[-1:]}"
        )
    return None


@dataclass
class RtspServer:
    """One running tests/support/rtsp_server.py process."""

    process: subprocess.Popen[str]
    url: str
    port: int
    stopped: bool = field(default=False)

    def kill(self) -> None:
        """SIGKILL, like a crashed camera or server."""
        self.resume()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its connections open."""
        self.process.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        if self.stopped and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.stopped = False


def _start_server(clip: Path, port: int, log: Path) -> RtspServer:
    stderr = log.open("a")
    process = subprocess.Popen(
        [SYSTEM_PYTHON, str(RTSP_SERVER), str(clip), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "GST_DEBUG": "0"},
    )
    stderr.close()
    assert process.stdout is not None
    deadline = time.monotonic() + 20.0
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = process.stdout.readline()
                if line.startswith("READY "):
                    url = line.split()[1]
                    return RtspServer(process, url, int(url.rsplit(":", 1)[1].split("/")[0]))
                if not line:  # EOF: it exited
                    break
    process.kill()
    process.wait(timeout=10)
    process.stdout.close()
    raise RuntimeError(f"RTSP server did not start on port {port}: {log.read_text()[-2000:]}")


@pytest.fixture
def rtsp_server(
    loop_clip: Path, tmp_path: Path
) -> Iterator[Callable[..., RtspServer]]:
    """Start a real RTSP server on loopback: ``start(port=0)`` -> RtspServer.

    Start it again with the same ``port`` to simulate a restart.  Every server
    started is killed at teardown.
    """
    reason = _rtsp_unavailable()
    if reason is not None:
        pytest.skip(reason)
    started: list[RtspServer] = []

    def start(port: int = 0) -> RtspServer:
        server = _start_server(loop_clip, port, tmp_path / "rtsp_server.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


class _MjpegHandler(BaseHTTPRequestHandler):
    """multipart/x-mixed-replace JPEGs at ~20 fps; frame i is a flat gray of i % 256.

    ``server.frames_per_client`` frames per connection, then the server hangs up
    (a camera that drops its stream).
    """

    server: MjpegServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for i in range(self.server.frames_per_client):
                ok, jpg = cv2.imencode(".jpg", np.full((120, 160, 3), i % 256, np.uint8))
                assert ok
                data = jpg.tobytes()
                self.wfile.write(
                    b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                    % len(data) + data + b"\r\n"
                )
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            return


class MjpegServer(ThreadingHTTPServer):
    daemon_threads = True
    frames_per_client = 40

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/video.mjpg"


@pytest.fixture
def mjpeg_server() -> Iterator[MjpegServer]:
    """A real MJPEG-over-HTTP server on a free loopback port."""
    server = MjpegServer(("127.0.0.1", 0), _MjpegHandler)
    thread = threading.Thread(target=server.serve_forever, name="mjpeg-server", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)
