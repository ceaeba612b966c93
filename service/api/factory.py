"""The FastAPI app factory: routes over a :class:`RuntimeView` and a hub.

Everything a route needs is passed to :func:`create_app` and captured by the
route closures: the runtime view (read-only snapshots), the hub (websocket
subscriptions), the settings (auth, queue sizes) and the websocket client
registry (so a server can close every client with 1001 on shutdown).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service.api.auth import Scope, TokenAuth
from service.api.schemas import CameraSnapshot, ErrorBody, Health, ModelSnapshot, Readiness
from service.api.snapshot import draw_annotations, encode_jpeg
from service.api.views import RuntimeView
from service.api.ws import EventLog, WebsocketClients, stream_events, stream_frames
from service.bus import Bus
from service.pipeline import event_message

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
MAX_EVENTS_PAGE = 1000
NO_IMAGES = (
    "no images over MQTT: camera {camera!r} is served from the broker, which carries its frame "
    "messages (coordinates, see /latest) but not its images; see docs/mqtt.md"
)
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}
_AUTH: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}


@dataclass(frozen=True)
class ApiSettings:
    """What the API itself needs from the configuration."""

    auth: TokenAuth = field(default_factory=TokenAuth)
    ws_queue: int = 32  # frame messages buffered per websocket client
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    jpeg_quality: int = 85
    title: str = "LineWatch"
    version: str = "0.1.0"


CameraId = Annotated[str, Path(description="A camera id from GET /api/v1/cameras.")]
ModelId = Annotated[str, Path(description="A model id from GET /api/v1/models.")]
LineId = Annotated[str, Path(description="A line id from GET /api/v1/lines.")]
LineFilter = Annotated[
    str | None, Query(description="Only this line's events (a line id from GET /api/v1/lines).")
]
MAX_CURSOR = 2**63 - 1
SinceCursor = Annotated[
    int,
    Query(ge=0, le=MAX_CURSOR,
          description="Return events after this cursor (0: from the oldest kept)."),
]
PageLimit = Annotated[
    int, Query(ge=1, le=MAX_EVENTS_PAGE, description="At most this many events.")
]
Annotate = Annotated[bool, Query(description="Draw boxes, keypoints and skeletons.")]

_bearer = HTTPBearer(auto_error=False, description="Only when auth is enabled in the config.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _requires(auth: TokenAuth, scope: Scope) -> Callable[[Credentials], None]:
    def check(credentials: Credentials) -> None:
        header = f"Bearer {credentials.credentials}" if credentials else None
        decision = auth.check(header, scope)
        if not decision.allowed:
            headers = {"WWW-Authenticate": "Bearer"} if decision.status == 401 else None
            raise HTTPException(decision.status, decision.detail, headers=headers)

    return check


def parse_camera_list(raw: str | None, known: set[str]) -> set[str] | None:
    """``"a,b"`` -> {"a", "b"}; None/empty -> None (all cameras); ValueError when bad."""
    if raw is None or raw.strip() == "":
        return None
    wanted = [c.strip() for c in raw.split(",")]
    if any(c == "" for c in wanted):
        raise ValueError(f"cameras={raw!r} has an empty entry; use a comma-separated list of ids")
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise ValueError(
            f"unknown camera(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}"
        )
    return set(wanted)


def create_app(
    view: RuntimeView,
    hub: Bus,
    settings: ApiSettings | None = None,
    *,
    clients: WebsocketClients | None = None,
    events: EventLog | None = None,
) -> FastAPI:
    """Build the LineWatch API (OpenAPI at ``/docs``).

    ``events`` is the event store the events routes read (None: no lines are
    configured, so there are no events).
    """
    settings = settings or ApiSettings()
    clients = clients or WebsocketClients()
    auth = settings.auth
    read = [Depends(_requires(auth, "read"))]
    admin = [Depends(_requires(auth, "admin"))]

    app = FastAPI(
        title=settings.title,
        version=settings.version,
        description="Live part coordinates from camera streams: REST, websocket, metrics.",
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET"],
            allow_headers=["Authorization"],
        )

    def camera_or_404(camera_id: str) -> CameraSnapshot:
        camera = view.camera(camera_id)
        if camera is None:
            raise HTTPException(404, f"no camera with id {camera_id!r}")
        return camera

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is alive."""
        return Health()

    @app.get(
        "/readyz", response_model=Readiness, tags=["health"],
        responses={503: {"model": Readiness}},
    )
    def readyz() -> Response:
        """200 once every model is loaded and at least one camera is up, else 503."""
        readiness = view.readiness()
        return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition format."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        f"{API_PREFIX}/cameras", response_model=list[CameraSnapshot], dependencies=read,
        tags=["cameras"], responses=_AUTH,
    )
    def list_cameras() -> list[CameraSnapshot]:
        """Every camera: source (credentials masked), state, fps, counters."""
        return view.cameras()

    @app.get(
        f"{API_PREFIX}/cameras/{{camera_id}}", response_model=CameraSnapshot, dependencies=read,
        tags=["cameras"], responses={**_NOT_FOUND, **_AUTH},
    )
    def get_camera(camera_id: CameraId) -> CameraSnapshot:
        return camera_or_404(camera_id)

    @app.get(
        f"{API_PREFIX}/cameras/{{camera_id}}/latest", dependencies=read, tags=["cameras"],
        responses={**_NOT_FOUND, **_AUTH, 503: {"model": ErrorBody}},
    )
    def latest(camera_id: CameraId) -> Response:
        """The newest frame message of the camera (same JSON as the websocket)."""
        camera_or_404(camera_id)
        snap = view.latest(camera_id)
        if snap is None:
            raise HTTPException(
                503, f"camera {camera_id!r} has no processed frame yet", {"Retry-After": "1"}
            )
        return JSONResponse(snap.message)

    @app.get(
        f"{API_PREFIX}/cameras/{{camera_id}}/snapshot.jpg", dependencies=read, tags=["cameras"],
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "The newest processed frame."},
            **_NOT_FOUND, **_AUTH, 503: {"model": ErrorBody},
        },
    )
    def snapshot(
        camera_id: CameraId,
        annotated: Annotate = True,
    ) -> Response:
        """The newest processed frame as JPEG, annotated with its detections by default."""
        camera_or_404(camera_id)
        snap = view.latest(camera_id)
        if snap is None:
            raise HTTPException(
                503, f"camera {camera_id!r} has no processed frame yet", {"Retry-After": "1"}
            )
        if snap.image is None:
            raise HTTPException(404, NO_IMAGES.format(camera=camera_id))
        image = (
            draw_annotations(snap.image, snap.message, view.classes(camera_id))
            if annotated
            else snap.image
        )
        headers = {"X-Frame-Seq": str(snap.message.get("seq", "")), "Cache-Control": "no-store"}
        return Response(
            encode_jpeg(image, settings.jpeg_quality), media_type="image/jpeg", headers=headers
        )

    @app.get(
        f"{API_PREFIX}/models", response_model=list[ModelSnapshot], dependencies=read,
        tags=["models"], responses=_AUTH,
    )
    def list_models() -> list[ModelSnapshot]:
        """Every model: path, provider in use, classes, keypoints, inputs."""
        return view.models()

    @app.get(
        f"{API_PREFIX}/models/{{model_id}}", response_model=ModelSnapshot, dependencies=read,
        tags=["models"], responses={**_NOT_FOUND, **_AUTH},
    )
    def get_model(model_id: ModelId) -> ModelSnapshot:
        for model in view.models():
            if model.id == model_id:
                return model
        raise HTTPException(404, f"no model with id {model_id!r}")

    def line_or_404(line_id: str) -> dict[str, Any]:
        line = view.line(line_id)
        if line is None:
            known = ", ".join(ln["line"] for ln in view.lines()) or "none"
            raise HTTPException(404, f"no line with id {line_id!r} (lines: {known})")
        return line

    @app.get(f"{API_PREFIX}/lines", dependencies=read, tags=["lines"], responses=_AUTH)
    def list_lines() -> list[dict[str, Any]]:
        """Every line: state, since, reasons, rules, counters, belt speed, cycle time."""
        return view.lines()

    @app.get(
        f"{API_PREFIX}/lines/{{line_id}}", dependencies=read, tags=["lines"],
        responses={**_NOT_FOUND, **_AUTH},
    )
    def get_line(line_id: LineId) -> dict[str, Any]:
        """One line: its state (since when, why), every rule's status and value, the parts
        counter, belt speed (mm/s), last cycle time (s), pose fit residual, cameras."""
        return line_or_404(line_id)

    @app.get(
        f"{API_PREFIX}/events", dependencies=read, tags=["lines"],
        responses={**_NOT_FOUND, **_AUTH, 503: {"model": ErrorBody}},
    )
    def list_events(
        line: LineFilter = None, since: SinceCursor = 0, limit: PageLimit = 100
    ) -> dict[str, Any]:
        """Stored events after ``since``, oldest first; pass ``next`` as ``since`` to page on.

        ``latest`` is the newest cursor in the store: ``next == latest`` means caught up.
        """
        if line is not None:
            line_or_404(line)
        if events is None:
            return {"events": [], "next": since, "latest": 0}
        try:
            page, next_cursor = events.list(line=line, since_cursor=since, limit=limit)
            latest = events.latest_cursor()
        except Exception as exc:  # a locked or broken database: say so, never a 500
            log.exception("event store read failed")
            raise HTTPException(
                503, f"the event store cannot be read: {type(exc).__name__}", {"Retry-After": "1"}
            ) from exc
        return {
            "events": [event_message(e) for e in page],
            "next": next_cursor,
            "latest": max(latest, next_cursor),
        }

    @app.get(f"{API_PREFIX}/config", dependencies=admin, tags=["admin"], responses=_AUTH)
    def effective_config() -> dict[str, Any]:
        """The configuration in effect, secrets masked (admin scope)."""
        return view.effective_config()

    @app.websocket(f"{API_PREFIX}/ws/frames")
    async def ws_frames(websocket: WebSocket) -> None:
        """Frame messages of ``?cameras=a,b`` (all cameras when absent)."""
        params = websocket.query_params
        decision = auth.check(
            websocket.headers.get("authorization"), "read", params.get("token")
        )
        if not decision.allowed:
            await _deny(websocket, decision.status, decision.detail)
            return
        try:
            cameras = parse_camera_list(params.get("cameras"), {c.id for c in view.cameras()})
        except ValueError as exc:
            await _deny(websocket, 422, str(exc))
            return
        if clients.closing:
            await _deny(websocket, 503, "server is shutting down")
            return
        await websocket.accept()
        await stream_frames(websocket, hub, clients, cameras, settings.ws_queue)

    @app.websocket(f"{API_PREFIX}/ws/events")
    async def ws_events(websocket: WebSocket) -> None:
        """Events after ``?since=CURSOR`` from the store, then live (``&line=`` filters)."""
        params = websocket.query_params
        decision = auth.check(
            websocket.headers.get("authorization"), "read", params.get("token")
        )
        if not decision.allowed:
            await _deny(websocket, decision.status, decision.detail)
            return
        raw_since, line = params.get("since"), params.get("line")
        since: int | None = None
        if raw_since not in (None, ""):
            try:
                since = int(str(raw_since))
            except ValueError:
                since = -1
            if not 0 <= since <= MAX_CURSOR:
                await _deny(websocket, 422, f"since={raw_since!r}: give a cursor >= 0")
                return
        if line == "":
            line = None
        if line is not None and view.line(line) is None:
            known = ", ".join(ln["line"] for ln in view.lines()) or "none"
            await _deny(websocket, 404, f"no line with id {line!r} (lines: {known})")
            return
        if clients.closing:
            await _deny(websocket, 503, "server is shutting down")
            return
        await websocket.accept()
        await stream_events(websocket, hub, clients, events, since, line, event_message)

    @app.exception_handler(ValueError)
    async def value_error(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    return app


async def _deny(websocket: WebSocket, status: int, detail: str) -> None:
    """Refuse a websocket handshake with an HTTP status and a JSON body."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"detail": detail}, status_code=status))
    else:  # the server cannot send an HTTP response: close with policy violation
        await websocket.close(code=1008, reason=detail[:120])
