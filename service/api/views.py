"""The read-only window the API has on the runtime.

``create_app`` is given one :class:`RuntimeView` (the composition root implements
it); the routes call its methods and never touch cameras, models or loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.api.schemas import CameraSnapshot, ModelSnapshot, Readiness
from service.domain import ClassInfo, ImageArray


@dataclass(frozen=True, slots=True)
class LatestSnapshot:
    """The newest processed frame of a camera: its image (not copied) and message.

    ``image`` is None where the API has no images (``linewatch api`` over MQTT).
    """

    image: ImageArray | None
    message: dict[str, Any]


class RuntimeView(Protocol):
    def cameras(self) -> list[CameraSnapshot]: ...

    def camera(self, camera_id: str) -> CameraSnapshot | None: ...

    def models(self) -> list[ModelSnapshot]: ...

    def readiness(self) -> Readiness: ...

    def latest(self, camera_id: str) -> LatestSnapshot | None: ...

    def classes(self, camera_id: str) -> Sequence[ClassInfo]: ...

    def effective_config(self) -> dict[str, Any]: ...

    def lines(self) -> list[dict[str, Any]]:
        """Every configured line's newest snapshot (the ``state`` message's fields)."""
        ...

    def line(self, line_id: str) -> dict[str, Any] | None:
        """One line's newest snapshot, None for an unknown line."""
        ...
