"""Factories for the API tests: a real runtime (sim cameras, a tiny real ONNX model, the
real hub) and a real uvicorn server on a free port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn

from service.app import Runtime
from service.bus import Hub
from service.config import Config
from tests.inference.onnx_factory import build_model, make_row


def _rows(n: int) -> np.ndarray:
    rows = []
    for i in range(n):
        x = 10.0 + 30.0 * i
        kps = np.array([[x, 20.0], [x + 10, 20.0], [x + 10, 40.0], [x, 40.0], [x + 5, 30.0]])
        rows.append(make_row((x, 15.0, x + 20.0, 45.0), 0.9, i % 3, kps))
    return np.stack(rows)


def runtime_config(
    model_path: Path, cameras: dict[str, str], *, lines: list[dict[str, Any]] | None = None,
    store_url: str | None = None, camera_lines: dict[str, str] | None = None,
    model: dict[str, Any] | None = None, **api: Any,
) -> Config:
    data: dict[str, Any] = {
        "cameras": [
            {"id": cid, "source": src, "model": "tiny", "open_timeout_s": 1.0,
             "read_timeout_s": 1.0, "line": (camera_lines or {}).get(cid, "line-1")}
            for cid, src in cameras.items()
        ],
        "models": [
            {"id": "tiny", "path": str(model_path), "intra_op_threads": 1, "warmup_runs": 1,
             **(model or {})}
        ],
        "api": api,
    }
    if lines is not None:
        data["lines"] = lines
    if store_url is not None:
        data["store"] = {"url": store_url}
    return Config.model_validate(data)


class RuntimeFactory:
    """``make(cameras={id: source}, instances=1, start=True, api={...}, frame_queue=64,
    lines=[...], camera_lines={camera: line}, model={model entry keys})``.

    Builds a real runtime: sim cameras, a tiny real ONNX model that outputs
    ``instances`` fixed detections per frame (classes 0, 1, 2, ...), the real hub;
    with ``lines``, rule engines and a SQLite event store in the test's tmp dir.
    ``close()`` stops every runtime it built.
    """

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._built: list[Runtime] = []

    def __call__(
        self,
        cameras: dict[str, str] | None = None,
        *,
        instances: int = 1,
        start: bool = True,
        api: dict[str, Any] | None = None,
        frame_queue: int = 64,
        lines: list[dict[str, Any]] | None = None,
        camera_lines: dict[str, str] | None = None,
        model: dict[str, Any] | None = None,
    ) -> tuple[Runtime, Hub]:
        path = build_model(self._tmp / f"tiny-{len(self._built)}.onnx", _rows(instances))
        cams = cameras or {
            "cam-1": "sim://conveyor?seed=1&fps=20&width=320&height=240",
            "cam-2": "sim://conveyor?seed=2&fps=20&width=320&height=240",
        }
        hub = Hub(frame_queue=frame_queue)
        store = f"sqlite:///{self._tmp / f'events-{len(self._built)}.db'}" if lines else None
        config = runtime_config(
            path, cams, lines=lines, store_url=store, camera_lines=camera_lines, model=model,
            **(api or {})
        )
        runtime = Runtime.build(config, hub)
        self._built.append(runtime)
        if start:
            runtime.start()
        return runtime, hub

    def close(self) -> None:
        for runtime in self._built:
            runtime.stop()


@pytest.fixture
def runtime_factory(tmp_path: Path) -> Iterator[RuntimeFactory]:
    factory = RuntimeFactory(tmp_path)
    yield factory
    factory.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def wait_for_frames(runtime: Runtime, *cameras: str, timeout: float = 10.0) -> None:
    wait_for(
        lambda: all(runtime.latest.get(c) is not None for c in cameras or runtime.cameras),
        timeout, "processed frames",
    )


class _Server(uvicorn.Server):
    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)


class ServerThread:
    """A real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app: Any, *, sndbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf is not None:  # inherited by accepted sockets: a small TCP send buffer
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", log_config=None)
        self.server = _Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def server_loop(self) -> asyncio.AbstractEventLoop:
        assert self.server.loop is not None
        return self.server.loop

    def start(self) -> ServerThread:
        self.thread.start()
        wait_for(lambda: self.server.started, 10.0, "uvicorn to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10.0)
        self.sock.close()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def make(app: Any, **options: Any) -> ServerThread:
        server = ServerThread(app, **options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
