"""Bearer-token auth with read and admin scopes (off by default)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from service.api.auth import TokenAuth, bearer_token
from service.api.factory import create_app
from service.app import api_settings

AUTH = {
    "enabled": True,
    "tokens": [{"token": "reader-1", "scope": "read"}, {"token": "admin-1", "scope": "admin"}],
}
READ_ROUTES = ["/api/v1/cameras", "/api/v1/cameras/cam-1", "/api/v1/models"]


@pytest.fixture
def secured(runtime_factory) -> TestClient:
    runtime, hub = runtime_factory(api={"auth": AUTH})
    return TestClient(create_app(runtime.status, hub, api_settings(runtime.config)))


@pytest.mark.parametrize("path", READ_ROUTES)
def test_read_routes_need_a_token(secured: TestClient, path: str) -> None:
    missing = secured.get(path)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "detail" in missing.json()
    assert secured.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert secured.get(path, headers={"Authorization": "Bearer reader-1"}).status_code == 200
    assert secured.get(path, headers={"Authorization": "Bearer admin-1"}).status_code == 200


def test_admin_route_needs_the_admin_scope(secured: TestClient) -> None:
    assert secured.get("/api/v1/config").status_code == 401
    forbidden = secured.get("/api/v1/config", headers={"Authorization": "Bearer reader-1"})
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["detail"]
    ok = secured.get("/api/v1/config", headers={"Authorization": "Bearer admin-1"})
    assert ok.status_code == 200
    assert "reader-1" not in ok.text and "admin-1" not in ok.text
    assert ok.json()["api"]["auth"]["tokens"][0]["token"] == "***"


def test_probes_and_metrics_stay_open(secured: TestClient) -> None:
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/readyz").status_code in (200, 503)
    assert secured.get("/metrics").status_code == 200


def test_websocket_takes_the_token_from_header_or_query(secured: TestClient) -> None:
    with pytest.raises(WebSocketDenialResponse) as info, secured.websocket_connect(
        "/api/v1/ws/frames"
    ):
        pass
    assert info.value.status_code == 401
    with secured.websocket_connect("/api/v1/ws/frames?token=reader-1") as ws:
        assert ws.receive_json()["type"] == "frame"
    with secured.websocket_connect(
        "/api/v1/ws/frames", headers={"Authorization": "Bearer admin-1"}
    ) as ws:
        assert ws.receive_json()["type"] == "frame"


def test_auth_off_allows_everything() -> None:
    auth = TokenAuth()
    assert not auth.enabled and auth.check(None, "admin").allowed


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None
