"""The in-process hub: fan messages out to subscribers through bounded queues.

Messages are JSON-ready dicts with ``"v": 1``, ``"type"`` (``frame``, ``state``,
``event``, ``camera``, ...) and usually ``"camera"`` or ``"line"``.  A published
dict is shared by every subscriber: treat it as read-only.

Guarantees:

- :meth:`Hub.publish` is thread-safe, never blocks on a subscriber and costs
  O(subscribers): each subscriber has its own lock-protected queues, and an
  asyncio consumer is woken with ``loop.call_soon_threadsafe`` only when it waits.
- Frame messages go to a bounded queue per subscriber: a slow subscriber loses
  its *own* oldest frames, and the next frame it receives carries
  ``"dropped": n`` (frames it lost since the last frame it received).
- Every other message (state, event, camera) is never dropped: it waits in a
  second queue.  If that queue reaches its hard limit the subscriber is cut off
  (its :meth:`Subscription.get` raises :class:`HubClosed` with the reason)
  instead of growing without bound.
- Messages reach a subscriber in publish order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Collection
from types import TracebackType
from typing import Any

from service.telemetry.metrics import MESSAGES_PUBLISHED, WS_DROPPED

Message = dict[str, Any]

FRAME = "frame"
DEFAULT_FRAME_QUEUE = 64
DEFAULT_EVENT_LIMIT = 1024


class HubClosed(Exception):
    """The subscription ended: the hub closed, the consumer unsubscribed or fell too far behind."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Subscription:
    """One consumer's view of the hub: its filters and its own bounded queues.

    Create it with :meth:`Hub.subscribe`.  Read it from one consumer: ``await
    get()`` in asyncio, ``get_blocking()`` in a thread, or ``get_nowait()``.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        types: frozenset[str] | None,
        cameras: frozenset[str] | None,
        maxsize: int,
        event_limit: int,
        stream: str,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        if event_limit < 1:
            raise ValueError(f"event_limit must be at least 1, got {event_limit}")
        self._hub = hub
        self.types = types
        self.cameras = cameras
        self.maxsize = maxsize
        self.event_limit = event_limit
        self.stream = stream
        self.dropped_total = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._order = itertools.count()
        self._frames: deque[tuple[int, Message]] = deque()
        self._others: deque[tuple[int, Message]] = deque()
        self._pending_dropped = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed_reason: str | None = None
        self._dropped_metric = WS_DROPPED.labels(stream)

    # -- filters ---------------------------------------------------------------

    def wants(self, message: Message) -> bool:
        """True if ``message`` passes this subscription's type and camera filters.

        The camera filter applies only to messages that name a camera.
        """
        if self.types is not None and message.get("type") not in self.types:
            return False
        if self.cameras is not None:
            camera = message.get("camera")
            if camera is not None and camera not in self.cameras:
                return False
        return True

    # -- producer side (any thread) ----------------------------------------------

    def offer(self, message: Message) -> None:
        """Queue ``message`` without blocking (called by :meth:`Hub.publish`)."""
        dropped = 0
        overflow: str | None = None
        with self._lock:
            if self._closed_reason is not None:
                return
            entry = (next(self._order), message)
            if message.get("type") == FRAME:
                if len(self._frames) >= self.maxsize:
                    self._frames.popleft()
                    dropped = 1
                    self._pending_dropped += 1
                    self.dropped_total += 1
                self._frames.append(entry)
            elif len(self._others) >= self.event_limit:
                overflow = (
                    f"subscriber fell behind: {len(self._others)} undelivered state/event "
                    f"messages (limit {self.event_limit})"
                )
            else:
                self._others.append(entry)
            waiter = self._waiter
            self._waiter = None
            self._ready.notify()
        if dropped:
            self._dropped_metric.inc(dropped)
        if overflow is not None:
            self._end(overflow, drain=False)
            return
        if waiter is not None:
            self._wake(waiter)

    def _wake(self, waiter: asyncio.Future[None]) -> None:
        try:
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # the consumer's event loop is closed: nobody reads any more
            self._end("the subscriber's event loop is closed", drain=False)

    def _end(self, reason: str, *, drain: bool) -> None:
        """Close with ``reason``; ``drain`` keeps queued messages for the consumer."""
        with self._lock:
            if self._closed_reason is not None:
                return
            self._closed_reason = reason
            if not drain:
                self._frames.clear()
                self._others.clear()
                self._pending_dropped = 0
            waiter = self._waiter
            self._waiter = None
            self._ready.notify_all()
        self._hub._remove(self)
        if waiter is not None:
            # a closed loop: the coroutine that waited on it is gone too
            with contextlib.suppress(RuntimeError):
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    # -- consumer side --------------------------------------------------------------

    def _pop_locked(self) -> Message | None:
        frames, others = self._frames, self._others
        if frames and (not others or frames[0][0] < others[0][0]):
            message = frames.popleft()[1]
            if self._pending_dropped:
                message = {**message, "dropped": self._pending_dropped}
                self._pending_dropped = 0
            return message
        if others:
            return others.popleft()[1]
        return None

    def get_nowait(self) -> Message | None:
        """The next message, or None if none is queued; HubClosed once closed and empty."""
        with self._lock:
            message = self._pop_locked()
            if message is None and self._closed_reason is not None:
                raise HubClosed(self._closed_reason)
            return message

    def get_blocking(self, timeout: float | None = None) -> Message | None:
        """Wait in this thread for the next message; None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                message = self._pop_locked()
                if message is not None:
                    return message
                if self._closed_reason is not None:
                    raise HubClosed(self._closed_reason)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._ready.wait(left)

    async def get(self) -> Message:
        """The next message; raises :class:`HubClosed` once the subscription has ended.

        After :meth:`Hub.close`, messages already queued are delivered first.
        """
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                message = self._pop_locked()
                if message is not None:
                    return message
                if self._closed_reason is not None:
                    raise HubClosed(self._closed_reason)
                if self._waiter is not None and not self._waiter.done():
                    raise RuntimeError("Subscription.get() is already awaited by another task")
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiter = waiter
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None

    def pending(self) -> int:
        """Messages queued and not yet read."""
        with self._lock:
            return len(self._frames) + len(self._others)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason

    def close(self) -> None:
        """Unsubscribe: drop what is queued; a waiting :meth:`get` raises HubClosed."""
        self._end("unsubscribed", drain=False)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Subscription(stream={self.stream!r}, types={self.types}, cameras={self.cameras},"
            f" pending={len(self._frames) + len(self._others)}, "
            f"dropped_total={self.dropped_total}, closed={self.closed_reason!r})"
        )


class Hub:
    """Fans published messages out to every matching :class:`Subscription`."""

    def __init__(
        self, *, frame_queue: int = DEFAULT_FRAME_QUEUE, event_limit: int = DEFAULT_EVENT_LIMIT
    ) -> None:
        self.frame_queue = frame_queue
        self.event_limit = event_limit
        self._lock = threading.Lock()
        self._subscriptions: tuple[Subscription, ...] = ()  # replaced, never mutated
        self._closed = False
        self._published: dict[str, Any] = {}

    def publish(self, message: Message) -> None:
        """Hand ``message`` to every matching subscriber; thread-safe, never blocks."""
        kind = message.get("type")
        if not isinstance(kind, str):
            raise ValueError(f"a bus message needs a string 'type', got {kind!r}")
        if self._closed:
            return
        counter = self._published.get(kind)
        if counter is None:
            counter = self._published.setdefault(kind, MESSAGES_PUBLISHED.labels(kind))
        counter.inc()
        for subscription in self._subscriptions:
            if subscription.wants(message):
                subscription.offer(message)

    def subscribe(
        self,
        *,
        types: Collection[str] | None = None,
        cameras: Collection[str] | None = None,
        maxsize: int | None = None,
        event_limit: int | None = None,
        stream: str = "frames",
    ) -> Subscription:
        """A new subscription to messages of ``types`` (None: all) from ``cameras`` (None: all).

        ``maxsize`` bounds its frame queue (default: the hub's ``frame_queue``),
        ``event_limit`` its state/event queue; ``stream`` labels its drop metric.
        """
        subscription = Subscription(
            self,
            types=frozenset(types) if types is not None else None,
            cameras=frozenset(cameras) if cameras is not None else None,
            maxsize=self.frame_queue if maxsize is None else maxsize,
            event_limit=self.event_limit if event_limit is None else event_limit,
            stream=stream,
        )
        with self._lock:
            if self._closed:
                raise HubClosed("the hub is closed")
            self._subscriptions = (*self._subscriptions, subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End every subscription; each delivers what it has queued, then raises HubClosed."""
        with self._lock:
            self._closed = True
            subscriptions = self._subscriptions
        for subscription in subscriptions:
            subscription._end("the hub is closed", drain=True)
