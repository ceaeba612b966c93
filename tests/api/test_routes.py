"""The REST routes, on a real runtime (sim cameras, a tiny real ONNX model), via TestClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.factory import create_app
from service.app import Runtime, api_settings
from service.bus import Hub
from tests.api.conftest import wait_for, wait_for_frames


@pytest.fixture
def client_factory(runtime_factory) -> Iterator[Callable[..., tuple[TestClient, Runtime]]]:
    clients: list[TestClient] = []

    def make(**options: Any) -> tuple[TestClient, Runtime]:
        runtime, hub = runtime_factory(**options)
        client = TestClient(create_app(runtime.status, hub, api_settings(runtime.config)))
        clients.append(client)
        return client, runtime

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(client_factory) -> tuple[TestClient, Runtime]:
    client, runtime = client_factory()
    wait_for_frames(runtime)
    return client, runtime


def test_healthz_and_readyz_follow_the_cameras(client_factory) -> None:
    client, runtime = client_factory(start=False)
    assert client.get("/healthz").json() == {"status": "ok"}
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["ready"] is False and not_ready.json()["cameras_up"] == 0
    runtime.start()
    wait_for(lambda: client.get("/readyz").status_code == 200, 10, "readyz 200")
    body = client.get("/readyz").json()
    assert body["ready"] and body["models_loaded"] and body["cameras_up"] == 2
    runtime.stop()
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_metrics_are_prometheus_text(client) -> None:
    c, _ = client
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'linewatch_frames_processed_total{camera="cam-1"}' in text
    assert 'linewatch_capture_to_publish_seconds_bucket{camera="cam-2"' in text
    assert 'linewatch_inference_provider{model="tiny",provider="CPUExecutionProvider"} 1.0' in text
    assert 'linewatch_model_loaded{model="tiny"} 1.0' in text


def test_cameras_list_and_one_camera(client) -> None:
    c, runtime = client
    cams = c.get("/api/v1/cameras").json()
    assert [cam["id"] for cam in cams] == ["cam-1", "cam-2"]
    one = c.get("/api/v1/cameras/cam-1").json()
    assert one["state"] == "up" and one["model"] == "tiny" and one["line"] == "line-1"
    assert one["source"].startswith("sim://conveyor")
    assert one["frames_captured"] >= 1 and one["frames_processed"] >= 1
    assert one["last_frame_time"].endswith("Z") and one["last_frame_ts"] > 1e9
    assert set(one) >= {"fps", "reason", "reconnects", "frames_dropped"}


def test_camera_sources_have_credentials_masked(client_factory) -> None:
    client, _ = client_factory(
        cameras={"door": "rtsp://admin:hunter2@127.0.0.1:9/stream?token=abc"}
    )
    cam = client.get("/api/v1/cameras/door").json()
    assert "hunter2" not in cam["source"] and "abc" not in cam["source"]
    assert cam["source"].startswith("rtsp://admin:***@127.0.0.1:9/stream")
    wait_for(
        lambda: client.get("/api/v1/cameras/door").json()["state"] == "down", 10, "camera down"
    )
    down = client.get("/api/v1/cameras/door").json()
    assert down["reason"] and "hunter2" not in down["reason"]
    assert client.get("/readyz").status_code == 503


def test_latest_is_the_newest_frame_message(client) -> None:
    c, runtime = client
    msg = c.get("/api/v1/cameras/cam-2/latest").json()
    assert msg["v"] == 1 and msg["type"] == "frame" and msg["camera"] == "cam-2"
    assert msg["model"] == "tiny" and msg["line"] == "line-1"
    assert isinstance(msg["sim_t"], float) and msg["sim_t"] >= 0  # a sim camera
    (inst,) = msg["instances"]
    assert inst["class"] == "bracket" and len(inst["keypoints"]) == 5
    wait_for(lambda: c.get("/api/v1/cameras/cam-2/latest").json()["seq"] > msg["seq"], 5, "newer")


def test_snapshot_is_a_jpeg_with_annotations_drawn(client) -> None:
    c, runtime = client
    runtime.stop()  # freeze the newest frame
    plain = c.get("/api/v1/cameras/cam-1/snapshot.jpg?annotated=false")
    drawn = c.get("/api/v1/cameras/cam-1/snapshot.jpg")
    assert plain.status_code == drawn.status_code == 200
    assert drawn.headers["content-type"] == "image/jpeg"
    a = cv2.imdecode(np.frombuffer(plain.content, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(drawn.content, np.uint8), cv2.IMREAD_COLOR)
    assert a is not None and b is not None and a.shape == b.shape == (240, 320, 3)
    diff = np.abs(a.astype(int) - b.astype(int)).sum(axis=2) > 60
    latest = runtime.latest.get("cam-1")
    assert latest is not None
    box = latest.message["instances"][0]["box"]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    assert diff[y1 - 2 : y2 + 3, x1 - 2 : x2 + 3].sum() > 50, "annotations are drawn on the box"
    assert diff[y2 + 20 :, :].sum() < 50, "nothing drawn far from the instance"


def test_models_describe_classes_keypoints_inputs(client) -> None:
    c, _ = client
    (model,) = c.get("/api/v1/models").json()
    assert model["id"] == "tiny" and model["provider"] == "CPUExecutionProvider"
    assert model["loaded"] and model["dynamic_batch"] and model["keypoints"] == 5
    assert [k["name"] for k in model["classes"]] == ["bracket", "flange", "arm"]
    assert model["classes"][2]["keypoints"] == ["base", "shoulder", "elbow", "wrist", "tool"]
    assert model["classes"][2]["skeleton"] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert model["inputs"] == [
        {"name": "images", "shape": ["batch", 240, 320, 3], "dtype": "uint8"}
    ]
    assert model["imgsz"] == [240, 320] and model["cameras"] == ["cam-1", "cam-2"]
    assert model["acceleration"] is None  # the CPU runs it: no GPU fast path
    assert model["instances"] == 1 and model["threads"] >= 1  # a light model: one session
    assert c.get("/api/v1/models/tiny").json() == model


def test_a_model_on_openvino_says_so_and_serves_frames(client_factory) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    c, runtime = client_factory(model={"providers": ["openvino", "cpu"]})
    wait_for_frames(runtime)
    (model,) = c.get("/api/v1/models").json()
    assert model["provider"] == "OpenVINO" and model["threads"] == 1
    assert model["acceleration"] == {"provider": "OpenVINO", "precision": "f32",
                                     "requested_precision": "f32"}
    msg = c.get("/api/v1/cameras/cam-1/latest").json()
    assert msg["instances"] and msg["instances"][0]["class"] == "bracket"
    metrics = c.get("/metrics").text
    assert 'linewatch_inference_provider{model="tiny",provider="OpenVINO"} 1.0' in metrics


def test_no_frame_yet_is_503_not_500(client_factory) -> None:
    client, _ = client_factory(start=False)
    for path in ("/api/v1/cameras/cam-1/latest", "/api/v1/cameras/cam-1/snapshot.jpg"):
        r = client.get(path)
        assert r.status_code == 503 and "no processed frame" in r.json()["detail"]
        assert r.headers["retry-after"] == "1"


BAD_REQUESTS = [
    ("GET", "/api/v1/cameras/nope", 404),
    ("GET", "/api/v1/cameras/nope/latest", 404),
    ("GET", "/api/v1/cameras/nope/snapshot.jpg", 404),
    ("GET", "/api/v1/cameras/cam-1/snapshot.jpg?annotated=maybe", 422),
    ("GET", "/api/v1/cameras/cam-1/snapshot.jpg?annotated=", 422),
    ("GET", "/api/v1/cameras/%00%ff/latest", 404),
    ("GET", "/api/v1/cameras/" + "x" * 5000, 404),
    ("GET", "/api/v1/models/nope", 404),
    ("GET", "/api/v1/nothing", 404),
    ("POST", "/api/v1/cameras", 405),
    ("DELETE", "/api/v1/cameras/cam-1", 405),
    ("GET", "/api/v1/ws/frames", 404),
    ("GET", "/healthz?x=%zz", 200),
]


@pytest.mark.parametrize(("method", "url", "status"), BAD_REQUESTS)
def test_bad_input_gets_a_json_4xx_never_a_500(client, method, url, status) -> None:
    c, _ = client
    r = c.request(method, url)
    assert r.status_code == status, r.text
    if status >= 400:
        assert "detail" in r.json()


def test_bad_websocket_parameters_are_refused_with_422(client) -> None:
    from starlette.testclient import WebSocketDenialResponse

    c, _ = client
    for query in ("cameras=nope", "cameras=cam-1,nope", "cameras=cam-1,,cam-2"):
        with (
            pytest.raises(WebSocketDenialResponse) as info,
            c.websocket_connect(f"/api/v1/ws/frames?{query}"),
        ):
            pass
        assert info.value.status_code == 422
        assert "detail" in info.value.json()


def test_websocket_filters_by_camera(client) -> None:
    c, _ = client
    with c.websocket_connect("/api/v1/ws/frames?cameras=cam-2") as ws:
        messages = [ws.receive_json() for _ in range(6)]
    assert {m["camera"] for m in messages} == {"cam-2"}
    assert all(m["type"] == "frame" and m["v"] == 1 for m in messages)
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(seqs)


def test_openapi_documents_every_route(client) -> None:
    c, _ = client
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/cameras",
                 "/api/v1/cameras/{camera_id}", "/api/v1/cameras/{camera_id}/latest",
                 "/api/v1/cameras/{camera_id}/snapshot.jpg", "/api/v1/models"):
        assert path in paths, path


def test_hub_of_the_app_is_the_runtime_hub(client_factory) -> None:
    client, runtime = client_factory()
    assert isinstance(runtime.hub, Hub)
    wait_for_frames(runtime)
    with client.websocket_connect("/api/v1/ws/frames") as ws:
        assert ws.receive_json()["camera"] in {"cam-1", "cam-2"}


def test_cors_origins_from_the_config(client_factory) -> None:
    client, _ = client_factory(start=False, api={"cors_origins": ["http://dash.local"]})
    allowed = client.get("/healthz", headers={"Origin": "http://dash.local"})
    assert allowed.headers["access-control-allow-origin"] == "http://dash.local"
    other = client.get("/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
