"""``create_bus(url)``: the bus a config names (``memory://`` is the in-process hub)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from service.bus.hub import DEFAULT_EVENT_LIMIT, DEFAULT_FRAME_QUEUE, Hub
from service.config import BUS_SCHEMES
from service.errors import ConfigError


class BusSubscription(Protocol):
    """What a consumer reads (the hub's :class:`~service.bus.hub.Subscription`)."""

    async def get(self) -> dict[str, Any]: ...

    def get_nowait(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class Bus(Protocol):
    """What the pipeline publishes to and the API subscribes to."""

    def publish(self, message: dict[str, Any]) -> None: ...

    def subscribe(
        self,
        *,
        types: Collection[str] | None = None,
        cameras: Collection[str] | None = None,
        maxsize: int | None = None,
    ) -> BusSubscription: ...

    def close(self) -> None: ...


def create_bus(
    url: str, *, frame_queue: int = DEFAULT_FRAME_QUEUE, event_limit: int = DEFAULT_EVENT_LIMIT
) -> Hub:
    """The bus for ``url``; raises ConfigError for a scheme this build does not support."""
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise ConfigError(f"bus url {url!r} is not a URL: use memory://")
    if scheme.lower() in ("mqtt", "mqtts"):
        raise ConfigError(
            f"bus url {url!r}: this command runs everything in one process on the in-process "
            "hub (bus.url: memory://). Over MQTT, run `linewatch worker` on the camera/GPU "
            "machines and `linewatch api` where the API is served (docs/mqtt.md)."
        )
    if scheme.lower() not in BUS_SCHEMES or scheme.lower() != "memory":
        raise ConfigError(
            f"bus url {url!r}: unsupported scheme {scheme!r}. Supported: memory:// (the "
            "in-process hub) and mqtt(s)://host:port (linewatch worker / linewatch api)."
        )
    return Hub(frame_queue=frame_queue, event_limit=event_limit)
