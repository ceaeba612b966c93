"""Lines and events: REST routes over the real store, and the events websocket's resume.

The runtime is real (sim cameras, a tiny ONNX model, rule engines, a SQLite store in
the test's tmp dir) but not started, so the only events are the ones a test records
through the real recorder (store first, then the hub) at the moment it chooses."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from service.api.factory import create_app
from service.app import Runtime, api_settings
from service.bus import Hub
from service.domain import Event
from service.pipeline import EventRecorder

WS = "/api/v1/ws/events"
LINES = [
    {"id": "line-a", "cameras": ["cam-1"],
     "rules": [{"type": "stale_camera", "name": "fresh", "max_age_s": 2.0}]},
    {"id": "line-b", "cameras": ["cam-2"], "rules": []},
]  # fmt: skip


@pytest.fixture
def lines_runtime(runtime_factory) -> tuple[Runtime, Hub, EventRecorder]:
    runtime, hub = runtime_factory(
        start=False, lines=LINES, camera_lines={"cam-1": "line-a", "cam-2": "line-b"}
    )
    assert runtime.store is not None
    return runtime, hub, EventRecorder(runtime.store, hub, runtime.states)


def record(recorder: EventRecorder, runtime: Runtime, line: str, n: int, t0: float = 1e9
           ) -> None:
    engine = runtime.engines[line]
    for i in range(n):
        recorder.record(engine, [Event(line, "rule", "fresh", "ok", "violated", t0 + i, {"i": i})])


def _client(runtime: Runtime, hub: Hub) -> TestClient:
    return TestClient(
        create_app(runtime.status, hub, api_settings(runtime.config), events=runtime.store)
    )


def test_lines_list_and_detail(lines_runtime) -> None:
    runtime, hub, recorder = lines_runtime
    with _client(runtime, hub) as http:
        lines = http.get("/api/v1/lines").json()
        assert [ln["line"] for ln in lines] == ["line-a", "line-b"]
        assert lines[0]["state"] == "UNKNOWN"  # no frame yet: never a silent OK
        record(recorder, runtime, "line-a", 1)  # publishes the line's state message too
        line = http.get("/api/v1/lines/line-a").json()
        for key in ("state", "since", "reasons", "rules", "counters", "belt_speed_mm_s",
                    "cycle_time_s", "cameras"):
            assert key in line, key
        assert [r["name"] for r in line["rules"]] == ["fresh"]
        assert "v" not in line and "type" not in line
        missing = http.get("/api/v1/lines/nope")
        assert missing.status_code == 404 and "line-a" in missing.json()["detail"]


def test_events_page_by_cursor_and_filter_by_line(lines_runtime) -> None:
    runtime, hub, recorder = lines_runtime
    record(recorder, runtime, "line-a", 3)
    record(recorder, runtime, "line-b", 2)
    with _client(runtime, hub) as http:
        seen, since = [], 0
        while True:
            page = http.get("/api/v1/events", params={"since": since, "limit": 2}).json()
            assert page["latest"] == 5 and len(page["events"]) <= 2
            if not page["events"]:
                break
            seen += page["events"]
            since = page["next"]
        assert [e["cursor"] for e in seen] == [1, 2, 3, 4, 5]
        first = seen[0]
        assert first["type"] == "event" and first["v"] == 1 and first["line"] == "line-a"
        assert (first["kind"], first["name"], first["new"]) == ("rule", "fresh", "violated")
        assert first["time"].endswith("Z") and first["detail"] == {"i": 0}
        only_b = http.get("/api/v1/events", params={"line": "line-b"}).json()
        assert [e["cursor"] for e in only_b["events"]] == [4, 5] and only_b["next"] == 5
        caught_up = http.get("/api/v1/events", params={"since": 5}).json()
        assert caught_up["events"] == [] and caught_up["next"] == 5


@pytest.mark.parametrize(
    "params",
    [{"since": -1}, {"since": "x"}, {"since": 2**64}, {"limit": 0}, {"limit": 100_000},
     {"limit": "a"}],
)
def test_bad_event_params_are_422(lines_runtime, params: dict[str, Any]) -> None:
    runtime, hub, _ = lines_runtime
    with _client(runtime, hub) as http:
        response = http.get("/api/v1/events", params=params)
        assert response.status_code == 422, response.text


def test_unknown_line_is_404_and_no_store_means_no_events(lines_runtime, runtime_factory
                                                          ) -> None:
    runtime, hub, _ = lines_runtime
    with _client(runtime, hub) as http:
        response = http.get("/api/v1/events", params={"line": "nope"})
        assert response.status_code == 404 and "line-a" in response.json()["detail"]
    bare, bare_hub = runtime_factory(start=False)  # no lines: no store
    assert bare.store is None
    with TestClient(create_app(bare.status, bare_hub)) as http:
        assert http.get("/api/v1/lines").json() == []
        assert http.get("/api/v1/events").json() == {"events": [], "next": 0, "latest": 0}


async def _collect(url: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    async with connect(url, proxy=None) as ws:
        return [json.loads(await asyncio.wait_for(ws.recv(), timeout)) for _ in range(n)]


def test_ws_resume_replays_the_missed_events_then_streams_live(lines_runtime, server_factory
                                                               ) -> None:
    runtime, hub, recorder = lines_runtime
    server = server_factory(
        create_app(runtime.status, hub, api_settings(runtime.config), events=runtime.store)
    )
    record(recorder, runtime, "line-a", 5)  # cursors 1..5; the client saw up to 2

    async def main() -> list[dict[str, Any]]:
        async with connect(f"ws://{server.base}{WS}?since=2", proxy=None) as ws:
            got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(3)]
            await asyncio.to_thread(record, recorder, runtime, "line-a", 2, 2e9)
            got += [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
            with pytest.raises(TimeoutError):  # and nothing else (no state, no duplicate)
                await asyncio.wait_for(ws.recv(), 0.5)
            return got

    got = asyncio.run(main())
    assert [m["cursor"] for m in got] == [3, 4, 5, 6, 7]
    assert all(m["type"] == "event" for m in got)


def test_ws_resume_under_concurrent_events_has_no_gap_and_no_duplicate(
    lines_runtime, server_factory
) -> None:
    runtime, hub, recorder = lines_runtime
    server = server_factory(create_app(runtime.status, hub, events=runtime.store))
    total = 120
    record(recorder, runtime, "line-a", 20)

    def writer() -> None:
        for i in range(total - 20):
            record(recorder, runtime, "line-a", 1, 3e9 + i)
            time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()  # events keep coming while the client subscribes and replays
    try:
        got = asyncio.run(_collect(f"ws://{server.base}{WS}?since=0&line=line-a", total))
    finally:
        thread.join()
    assert [m["cursor"] for m in got] == list(range(1, total + 1))


def test_ws_line_filter_and_live_only_without_since(lines_runtime, server_factory) -> None:
    runtime, hub, recorder = lines_runtime
    server = server_factory(create_app(runtime.status, hub, events=runtime.store))
    record(recorder, runtime, "line-a", 2)

    async def main() -> list[dict[str, Any]]:
        async with connect(f"ws://{server.base}{WS}?line=line-b", proxy=None) as ws:
            await asyncio.sleep(0.2)  # subscribed
            await asyncio.to_thread(record, recorder, runtime, "line-a", 1)
            await asyncio.to_thread(record, recorder, runtime, "line-b", 1)
            return [json.loads(await asyncio.wait_for(ws.recv(), 10))]

    (only,) = asyncio.run(main())
    assert only["line"] == "line-b" and only["cursor"] == 4  # no replay without since


@pytest.mark.parametrize(
    ("query", "status"),
    [("since=-3", 422), ("since=abc", 422), (f"since={2**64}", 422), ("line=nope", 404)],
)
def test_ws_bad_query_is_refused_before_the_upgrade(
    lines_runtime, server_factory, query: str, status: int
) -> None:
    runtime, hub, _ = lines_runtime
    server = server_factory(create_app(runtime.status, hub, events=runtime.store))

    async def main() -> None:
        async with connect(f"ws://{server.base}{WS}?{query}", proxy=None):
            pass

    with pytest.raises(InvalidStatus) as info:
        asyncio.run(main())
    assert info.value.response.status_code == status
