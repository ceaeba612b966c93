"""The frame websocket over a real network connection (uvicorn + the websockets client)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.api.factory import ApiSettings, create_app
from service.api.ws import WebsocketClients
from service.app import api_settings
from tests.api.conftest import wait_for_frames

WS = "/api/v1/ws/frames"


async def _receive(ws: Any, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), timeout)) for _ in range(n)]


def test_a_real_client_streams_frame_messages(runtime_factory, server_factory) -> None:
    runtime, hub = runtime_factory()
    server = server_factory(create_app(runtime.status, hub, api_settings(runtime.config)))
    wait_for_frames(runtime)

    async def main() -> list[dict[str, Any]]:
        async with connect(f"ws://{server.base}{WS}?cameras=cam-1", proxy=None) as ws:
            return await _receive(ws, 5)

    messages = asyncio.run(main())
    assert {m["camera"] for m in messages} == {"cam-1"}
    for m in messages:
        assert m["v"] == 1 and m["type"] == "frame" and m["model"] == "tiny"
        assert m["capture_time"].endswith("Z") and 0 <= m["age_ms"] < 1000
        (inst,) = m["instances"]
        base = {"class", "class_id", "score", "box", "keypoints", "track_id"}
        # an uncalibrated camera: a tracked instance adds its velocity in px/s only
        assert set(inst) in (base, base | {"velocity"})
        if inst["track_id"] is not None:
            assert set(inst["velocity"]) == {"px_s"}


def test_unknown_camera_is_refused_before_the_upgrade(runtime_factory, server_factory) -> None:
    runtime, hub = runtime_factory(start=False)
    server = server_factory(create_app(runtime.status, hub))

    async def main() -> InvalidStatus:
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://{server.base}{WS}?cameras=cam-9", proxy=None):
                pass
        return info.value

    refused = asyncio.run(main())
    assert refused.response.status_code == 422
    assert "cam-9" in json.loads(refused.response.body)["detail"]


def test_runtime_stop_closes_clients_with_1001(runtime_factory, server_factory) -> None:
    runtime, hub = runtime_factory()
    server = server_factory(create_app(runtime.status, hub))
    wait_for_frames(runtime)

    async def main() -> int | None:
        async with connect(f"ws://{server.base}{WS}", proxy=None) as ws:
            await _receive(ws, 2)
            await asyncio.to_thread(runtime.stop)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd is not None
            return info.value.rcvd.code

    assert asyncio.run(main()) == 1001


def test_close_all_closes_every_client_with_1001(runtime_factory, server_factory) -> None:
    runtime, hub = runtime_factory()
    clients = WebsocketClients()
    app = create_app(runtime.status, hub, clients=clients)
    server = server_factory(app)
    wait_for_frames(runtime)

    async def client(codes: list[int]) -> None:
        async with connect(f"ws://{server.base}{WS}", proxy=None) as ws:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as exc:
                codes.append(exc.rcvd.code if exc.rcvd else -1)

    async def main() -> list[int]:
        codes: list[int] = []
        tasks = [asyncio.create_task(client(codes)) for _ in range(3)]
        deadline = time.monotonic() + 10
        while clients.count < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # close_all runs on the server's loop, as the SIGTERM handler does
        loop = server.server_loop()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(clients.close_all(5), loop))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return codes

    assert asyncio.run(main()) == [1001, 1001, 1001]
    assert clients.count == 0


@pytest.mark.slow
def test_a_slow_client_loses_its_own_oldest_frames_and_stalls_nobody(
    runtime_factory, server_factory
) -> None:
    runtime, hub = runtime_factory(instances=8, frame_queue=4)
    app = create_app(runtime.status, hub, ApiSettings(ws_queue=4))
    server = server_factory(app, sndbuf=4096)  # small TCP buffers: backpressure comes soon
    wait_for_frames(runtime)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        slow_ws = await connect(
            f"ws://{server.base}{WS}?cameras=cam-1", sock=sock, proxy=None, compression=None,
            max_queue=1, close_timeout=1,
        )
        async with connect(f"ws://{server.base}{WS}?cameras=cam-1", proxy=None) as fast:
            fast_msgs: list[dict[str, Any]] = []
            t_end = time.monotonic() + 4.0  # the slow client reads nothing meanwhile
            while time.monotonic() < t_end:
                fast_msgs.append(json.loads(await asyncio.wait_for(fast.recv(), 5)))
        slow_msgs = []
        try:
            while True:  # now read everything the slow client has waiting, and a bit more
                slow_msgs.append(json.loads(await asyncio.wait_for(slow_ws.recv(), 5.0)))
                if any(m.get("dropped") for m in slow_msgs) and len(slow_msgs) > 10:
                    break
        finally:
            await slow_ws.close()
        return fast_msgs, slow_msgs

    fast_msgs, slow_msgs = asyncio.run(main())
    # the fast client kept getting every frame at the camera's pace (20 fps for 4 s)
    assert len(fast_msgs) >= 50, len(fast_msgs)
    assert not any(m.get("dropped") for m in fast_msgs)
    seqs = [m["seq"] for m in fast_msgs]
    assert max(b - a for a, b in zip(seqs, seqs[1:], strict=False)) <= 3
    # the slow one lost frames and was told how many
    dropped = [m["dropped"] for m in slow_msgs if m.get("dropped")]
    assert dropped and sum(dropped) >= 10
    slow_seqs = [m["seq"] for m in slow_msgs]
    assert slow_seqs == sorted(slow_seqs)
