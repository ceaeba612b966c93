"""The websockets: one hub subscription per client, closed with 1001 on shutdown.

Frames: each client has its own bounded subscription on the hub.  A client that
reads slower than frames arrive loses its own oldest frame messages (the hub drops
them and the next message carries ``dropped``); the pipeline and the other clients
never wait for it.

Events: the client subscribes to the hub's ``event`` messages *first*, then the
events after its ``since`` cursor are replayed from the store, then the live ones
follow, skipping any cursor already sent.  Events are stored before they are
published, so every event is either in the replay or in the subscription: a client
that reconnects with the last cursor it saw loses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.bus import Bus, HubClosed
from service.telemetry.metrics import WS_CLIENTS

log = logging.getLogger(__name__)

GOING_AWAY = 1001
STREAM = "frames"
EVENTS_STREAM = "events"
REPLAY_PAGE = 500


class EventLog(Protocol):
    """The event store as the API reads it (service.store.EventStore)."""

    def list(
        self, line: str | None = None, since_cursor: int = 0, limit: int = 100
    ) -> tuple[list[Any], int]: ...

    def latest_cursor(self) -> int: ...


class WebsocketClients:
    """Live websocket clients of one app; :meth:`close_all` closes them with 1001.

    Each client registers an event of its own event loop, so the registry works
    across loops and threads (a signal handler or a test calls ``close_all``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self._ids = itertools.count()
        self._closing = False

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._clients)

    @property
    def closing(self) -> bool:
        return self._closing

    def enter(self, stream: str = STREAM) -> tuple[int, asyncio.Event]:
        """Register the calling client; its event is set when it must close."""
        event = asyncio.Event()
        with self._lock:
            key = next(self._ids)
            self._clients[key] = (asyncio.get_running_loop(), event)
            if self._closing:
                event.set()
        WS_CLIENTS.labels(stream).inc()
        return key, event

    def leave(self, key: int, stream: str = STREAM) -> None:
        with self._lock:
            self._clients.pop(key, None)
        WS_CLIENTS.labels(stream).dec()

    async def close_all(self, timeout: float = 5.0) -> None:
        """Tell every client handler to close with 1001 and wait until they have."""
        with self._lock:
            self._closing = True
            clients = list(self._clients.values())
        for loop, event in clients:
            with contextlib.suppress(RuntimeError):  # that loop is already closed
                loop.call_soon_threadsafe(event.set)
        deadline = time.monotonic() + timeout
        while self.count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


async def _pump(subscription: Any, websocket: WebSocket) -> str:
    """Forward hub messages to the client; returns why it stopped."""
    while True:
        try:
            message = await subscription.get()
        except HubClosed:  # the runtime stopped (or this client was cut off)
            return "hub closed"
        try:
            await websocket.send_text(_dumps(message))
        except (WebSocketDisconnect, OSError, RuntimeError):  # the client is gone
            return "client left"


async def _until_disconnect(websocket: WebSocket) -> str:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                break
    return "client left"


async def _until_set(event: asyncio.Event) -> str:
    await event.wait()
    return "shutdown"


async def stream_frames(
    websocket: WebSocket,
    hub: Bus,
    clients: WebsocketClients,
    cameras: Collection[str] | None,
    maxsize: int,
) -> None:
    """Serve one accepted client until it leaves, the hub closes, or shutdown."""
    try:
        subscription = hub.subscribe(types={"frame"}, cameras=cameras, maxsize=maxsize)
    except HubClosed:
        await websocket.close(code=GOING_AWAY, reason="server shutting down")
        return
    await _serve(websocket, subscription, clients, _pump(subscription, websocket), STREAM)


async def stream_events(
    websocket: WebSocket,
    hub: Bus,
    clients: WebsocketClients,
    events: EventLog | None,
    since: int | None,
    line: str | None,
    to_message: Callable[[Any], dict[str, Any]],
) -> None:
    """Replay the stored events after ``since`` (of ``line``), then stream live ones."""
    try:
        subscription = hub.subscribe(types={"event"})  # before the replay: no gap
    except HubClosed:
        await websocket.close(code=GOING_AWAY, reason="server shutting down")
        return
    await _serve(
        websocket, subscription, clients,
        _replay_then_pump(subscription, websocket, events, since, line, to_message),
        EVENTS_STREAM,
    )  # fmt: skip


async def _replay_then_pump(
    subscription: Any,
    websocket: WebSocket,
    events: EventLog | None,
    since: int | None,
    line: str | None,
    to_message: Callable[[Any], dict[str, Any]],
) -> str:
    last = 0
    if since is not None and events is not None:
        last = since
        store = events
        while True:
            page, _next = await anyio.to_thread.run_sync(
                functools.partial(store.list, line=line, since_cursor=last, limit=REPLAY_PAGE)
            )
            for event in page:
                try:
                    await websocket.send_text(_dumps(to_message(event)))
                except (WebSocketDisconnect, OSError, RuntimeError):
                    return "client left"
                last = int(event.cursor)
            if len(page) < REPLAY_PAGE:
                break
    while True:
        try:
            message = await subscription.get()
        except HubClosed:
            return "hub closed"
        cursor = message.get("cursor")
        if line is not None and message.get("line") != line:
            continue
        if isinstance(cursor, int):
            if cursor <= last:
                continue  # already sent by the replay
            last = cursor
        try:
            await websocket.send_text(_dumps(message))
        except (WebSocketDisconnect, OSError, RuntimeError):
            return "client left"


async def _serve(
    websocket: WebSocket, subscription: Any, clients: WebsocketClients, pump: Awaitable[str],
    stream: str,
) -> None:
    """Run ``pump`` until it ends, the client leaves or the server shuts down."""
    key, closing = clients.enter(stream)
    ended: list[str] = []
    try:
        async with anyio.create_task_group() as tg:

            async def first_to_finish(work: Awaitable[str]) -> None:
                ended.append(await work)
                tg.cancel_scope.cancel()

            tg.start_soon(first_to_finish, pump)
            tg.start_soon(first_to_finish, _until_disconnect(websocket))
            tg.start_soon(first_to_finish, _until_set(closing))
        if ended and ended[0] != "client left":
            # server side end: shutdown, or the hub closed because the runtime stopped
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                await websocket.close(code=GOING_AWAY, reason="server shutting down")
    finally:
        subscription.close()
        clients.leave(key, stream)
