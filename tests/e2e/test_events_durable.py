"""Events survive SIGKILL: ``linewatch serve`` as a real process with a SQLite store.

Events are stored (committed, fsynced) before they are published, so every event a
websocket client received before the process was killed is in the store, and the
restarted process goes on with the next cursors: no loss, no reused cursor."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from service.store import EventStore
from tests.api.conftest import _rows
from tests.e2e.conftest import Served
from tests.inference.onnx_factory import build_model

pytestmark = pytest.mark.slow

WHOLE_IMAGE = [[-1e4, -1e4], [1e4, -1e4], [1e4, 1e4], [-1e4, 1e4]]


def durable_config(model: Path, db: Path) -> dict[str, Any]:
    """A line whose rules fire at once and keep changing: a zone over the whole image
    (the stand-in model's instance is always in it) and a camera freshness limit
    shorter than the frame interval, so the once-a-second tick keeps finding the camera
    stale and the next frame fresh again."""
    return {
        "cameras": [{"id": "cam-1", "source": "sim://conveyor?seed=3&fps=10&width=320&height=240",
                     "line": "line-1"}],
        "models": [{"id": "tiny", "path": str(model), "warmup_runs": 1, "intra_op_threads": 1}],
        "lines": [{
            "id": "line-1", "cameras": ["cam-1"],
            "rules": [
                {"type": "zone_intrusion", "name": "anything", "units": "px",
                 "zone": WHOLE_IMAGE},
                {"type": "stale_camera", "name": "fresh", "max_age_s": 0.05},
            ],
        }],
        "store": {"url": f"sqlite:///{db}"},
        "logging": {"level": "WARNING"},
    }  # fmt: skip


async def _receive(url: str, n: int, timeout: float) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    async with connect(url, proxy=None) as ws:
        while len(got) < n and time.monotonic() < deadline:
            try:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 2.0)))
            except TimeoutError:
                continue
    return got


def test_no_event_is_lost_or_reused_across_sigkill(serve_factory, tmp_path: Path) -> None:
    model = build_model(tmp_path / "stand-in.onnx", _rows(1))
    db = tmp_path / "events.db"
    first: Served = serve_factory(durable_config(model, db))
    first.wait_ready()
    published = asyncio.run(_receive(f"{first.ws_base}/api/v1/ws/events?since=0", 8, 60.0))
    first.proc.send_signal(signal.SIGKILL)  # while events keep coming
    assert first.proc.wait(10) == -signal.SIGKILL
    first.close_log()
    assert len(published) >= 4, (published, first.log)
    cursors = [m["cursor"] for m in published]
    assert cursors == list(range(1, len(cursors) + 1)), "published in cursor order, no gap"

    with EventStore(f"sqlite:///{db}") as store:
        stored, _ = store.list(limit=10_000)
        last_before = store.latest_cursor()
    by_cursor = {e.cursor: e for e in stored}
    for message in published:  # every published event is durable, as published
        event = by_cursor.get(message["cursor"])
        assert event is not None, f"event {message['cursor']} published but lost"
        assert (event.line, event.kind, event.name, event.old, event.new) == (
            message["line"], message["kind"], message["name"], message["old"], message["new"]
        )
    assert last_before >= cursors[-1]

    second: Served = serve_factory(durable_config(model, db))
    second.wait_ready()
    with httpx.Client(base_url=second.base, timeout=5) as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = http.get("/api/v1/events", params={"since": last_before}).json()
            if page["events"]:
                break
            time.sleep(0.2)
        new = page["events"]
        assert new and new[0]["cursor"] == last_before + 1, "the cursor goes on after a restart"
        everything = http.get("/api/v1/events", params={"limit": 1000}).json()["events"]
    all_cursors = [e["cursor"] for e in everything]
    assert len(all_cursors) == len(set(all_cursors))
    assert all_cursors[: len(cursors)] == cursors
    assert second.stop() == 0
