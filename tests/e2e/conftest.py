"""Run ``linewatch serve`` as a real process on a free port, with a temp config."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "models" / "zoo" / "linewatch-parts-s.onnx"


def linewatch_command() -> list[str]:
    """The installed ``linewatch`` entry point beside this interpreter, else ``-m``."""
    entry = Path(sys.executable).with_name("linewatch")
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "service.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*linewatch_command(), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=cwd or REPO,
    )


class LineWatchProcess:
    """A ``linewatch serve|worker|api`` process on a free port, logging to a file;
    ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, command: str, config: Path | None, tmp_path: Path,
                 env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.port = free_port()
        self.name = name or f"{command}-{self.port}"
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{self.name}.log"
        self._log = self.log_path.open("w")
        args = [command, "--port", str(self.port), "--host", "127.0.0.1"]
        if config is not None:
            args += ["--config", str(config)]
        self.proc = subprocess.Popen(
            [*linewatch_command(), *args], stdout=self._log, stderr=subprocess.STDOUT,
            cwd=tmp_path, env={**os.environ, **(env or {})},
        )

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=5)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log}"
                    )
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log}")

    def close_log(self) -> None:
        if not self._log.closed:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                message = f"{self.name} ignored SIGTERM for {timeout} s:\n{self.log}"
                raise AssertionError(message) from None
        self.close_log()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL (no clean shutdown), then reap it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.close_log()

    def cleanup(self) -> None:
        """Kill it if it still runs (a test's fixture teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.close_log()


Served = LineWatchProcess  # a ``linewatch serve`` process


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def make(config: dict[str, Any] | None, env: dict[str, str] | None = None) -> Served:
        path = None
        if config is not None:
            path = tmp_path / f"config-{len(started)}.yaml"
            path.write_text(yaml.safe_dump(config))
        served = LineWatchProcess("serve", path, tmp_path, env)
        started.append(served)
        return served

    yield make
    for served in started:
        served.cleanup()
