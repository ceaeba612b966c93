"""Run the API with uvicorn and shut down gracefully on SIGTERM / SIGINT.

On the first signal: run ``drain`` in a worker thread (the runtime stops its
cameras, finishes the in-flight batch and closes the hub), close every websocket
client with 1001 (going away), then let uvicorn finish open HTTP requests and
exit.  The process then exits 0: the signal is handled, not re-raised.  A second
SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from service.api.ws import WebsocketClients
from service.errors import LineWatchError

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a busy port is a clear error (port 0 = any)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LineWatchError(
            f"Cannot listen on {host}:{port} ({exc.strerror or exc}). Another process may "
            "be using the port: pick another with --port (or api.port in the config), or "
            "stop the other process."
        ) from None
    sock.set_inheritable(True)
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


class GracefulServer(uvicorn.Server):
    """uvicorn, with LineWatch's drain-then-close sequence on the first signal."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Callable[[], None],
        clients: WebsocketClients,
        close_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._clients = clients
        self._close_timeout_s = close_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            if sig == signal.SIGINT and self._draining:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        log.info("received %s: stopping cameras, draining, closing websockets",
                 signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._graceful())

    async def _graceful(self) -> None:
        try:
            await asyncio.to_thread(self._drain)
        except LineWatchError as exc:
            log.error("drain failed: %s", exc)
        finally:
            await self._clients.close_all(self._close_timeout_s)
            self.should_exit = True


def run_server(
    app: Any,
    sock: socket.socket,
    *,
    drain: Callable[[], None],
    clients: WebsocketClients,
    log_level: str = "info",
) -> None:
    """Serve ``app`` on the bound socket until a signal; returns after the drain."""
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=5,
        log_config=None,  # keep LineWatch's logging setup
    )
    server = GracefulServer(config, drain=drain, clients=clients)
    server.run(sockets=[sock])
