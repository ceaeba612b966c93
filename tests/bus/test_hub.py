"""service.bus.hub: fan-out, bounded per-subscriber queues, thread -> asyncio hand-off."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.bus import Hub, HubClosed, Subscription

Msg = dict[str, Any]


@pytest.fixture
def frame() -> Callable[..., Msg]:
    def make(seq: int, camera: str = "cam-1") -> Msg:
        return {"v": 1, "type": "frame", "camera": camera, "seq": seq, "instances": []}

    return make


@pytest.fixture
def event() -> Callable[..., Msg]:
    def make(n: int, line: str = "line-1") -> Msg:
        return {"v": 1, "type": "event", "line": line, "id": n}

    return make


def drain(sub: Subscription) -> list[Msg]:
    out: list[Msg] = []
    while (message := sub.get_nowait()) is not None:
        out.append(message)
    return out


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_fan_out_to_every_matching_subscriber(frame: Callable[..., Msg]) -> None:
    hub = Hub()
    everything = hub.subscribe()
    cam2 = hub.subscribe(types={"frame"}, cameras={"cam-2"})
    states = hub.subscribe(types={"state"})
    hub.publish(frame(1, "cam-1"))
    hub.publish(frame(2, "cam-2"))
    hub.publish({"v": 1, "type": "state", "line": "line-1", "state": "running"})
    assert [m["seq"] for m in drain(cam2)] == [2]
    assert [m["type"] for m in drain(everything)] == ["frame", "frame", "state"]
    assert [m["state"] for m in drain(states)] == ["running"]


def test_camera_filter_lets_line_messages_through(event: Callable[..., Msg]) -> None:
    hub = Hub()
    sub = hub.subscribe(cameras={"cam-1"})
    hub.publish(event(1))
    hub.publish({"v": 1, "type": "camera", "camera": "cam-9", "state": "up"})
    assert drain(sub) == [event(1)]


def test_slow_subscriber_drops_its_oldest_frames_only(frame: Callable[..., Msg]) -> None:
    hub = Hub()
    fast = hub.subscribe(types={"frame"}, maxsize=64, stream="test-fast")
    slow = hub.subscribe(types={"frame"}, maxsize=4, stream="test-slow")
    before = metric("linewatch_websocket_dropped_messages_total", stream="test-slow")
    for seq in range(10):
        hub.publish(frame(seq))
    got_fast = drain(fast)
    got_slow = drain(slow)
    assert [m["seq"] for m in got_fast] == list(range(10))
    assert all("dropped" not in m for m in got_fast)
    assert [m["seq"] for m in got_slow] == [6, 7, 8, 9]
    assert got_slow[0]["dropped"] == 6
    assert all("dropped" not in m for m in got_slow[1:])
    assert slow.dropped_total == 6 and fast.dropped_total == 0
    after = metric("linewatch_websocket_dropped_messages_total", stream="test-slow")
    assert after - before == 6
    # the shared message is not modified by the per-subscriber 'dropped' annotation
    assert "dropped" not in got_fast[6]


def test_dropped_counts_since_the_last_frame_delivered(frame: Callable[..., Msg]) -> None:
    hub = Hub()
    sub = hub.subscribe(maxsize=2)
    for seq in range(5):
        hub.publish(frame(seq))
    assert sub.get_nowait() == {**frame(3), "dropped": 3}
    for seq in range(5, 8):
        hub.publish(frame(seq))
    assert [(m["seq"], m.get("dropped")) for m in drain(sub)] == [(6, 2), (7, None)]
    assert sub.dropped_total == 5


def test_events_are_never_dropped_and_order_is_kept(
    frame: Callable[..., Msg], event: Callable[..., Msg]
) -> None:
    hub = Hub()
    sub = hub.subscribe(maxsize=2, event_limit=100)
    for i in range(50):
        hub.publish(frame(i))
        if i % 5 == 0:
            hub.publish(event(i))
    got = drain(sub)
    assert [m["id"] for m in got if m["type"] == "event"] == list(range(0, 50, 5))
    assert [m["seq"] for m in got if m["type"] == "frame"] == [48, 49]
    # publish order is kept across the two queues: event 45 came before frames 48, 49
    assert [m["type"] for m in got] == ["event"] * 10 + ["frame", "frame"]


def test_event_overflow_cuts_the_subscriber_off(event: Callable[..., Msg]) -> None:
    hub = Hub()
    sub = hub.subscribe(event_limit=5)
    other = hub.subscribe()
    for i in range(6):
        hub.publish(event(i))
    assert sub.closed and "fell behind" in (sub.closed_reason or "")
    with pytest.raises(HubClosed, match="fell behind"):
        sub.get_nowait()
    assert hub.subscriber_count == 1  # removed, so it cannot grow any more
    assert len(drain(other)) == 6


def test_publish_does_not_wait_for_readers(frame: Callable[..., Msg]) -> None:
    hub = Hub()
    subs = [hub.subscribe(maxsize=8) for _ in range(50)]
    start = time.perf_counter()
    for seq in range(2000):
        hub.publish(frame(seq))
    elapsed = time.perf_counter() - start
    assert all(s.pending() == 8 for s in subs)  # memory stays bounded
    assert elapsed < 5.0  # 100k offers; generous on a loaded 2-core machine


def test_publish_needs_a_type() -> None:
    with pytest.raises(ValueError, match="type"):
        Hub().publish({"v": 1})


def test_messages_published_metric(event: Callable[..., Msg]) -> None:
    hub = Hub()
    before = metric("linewatch_messages_published_total", type="event")
    hub.publish(event(1))
    hub.publish(event(2))
    assert metric("linewatch_messages_published_total", type="event") - before == 2


def test_many_threads_publish_while_asyncio_reads(
    frame: Callable[..., Msg], event: Callable[..., Msg]
) -> None:
    threads_n, per_thread = 4, 400
    hub = Hub()

    async def consume(sub: Subscription) -> list[Msg]:
        got: list[Msg] = []
        with pytest.raises(HubClosed):
            while True:
                got.append(await sub.get())
        return got

    def produce(k: int) -> None:
        for i in range(per_thread):
            hub.publish(frame(i, camera=f"cam-{k}"))
            if i % 10 == 0:
                hub.publish(event(k * 10_000 + i))

    async def main() -> tuple[list[Msg], list[Msg]]:
        lossless = hub.subscribe(maxsize=threads_n * per_thread)
        lossy = hub.subscribe(maxsize=3)
        readers = asyncio.gather(consume(lossless), consume(lossy))
        workers = [threading.Thread(target=produce, args=(k,)) for k in range(threads_n)]
        for t in workers:
            t.start()
        for t in workers:
            await asyncio.to_thread(t.join)
        hub.close()
        full, partial = await asyncio.wait_for(readers, timeout=30)
        return full, partial

    full, partial = asyncio.run(main())
    frames = [m for m in full if m["type"] == "frame"]
    assert len(frames) == threads_n * per_thread
    for k in range(threads_n):  # each publisher's frames arrive in its order
        seqs = [m["seq"] for m in frames if m["camera"] == f"cam-{k}"]
        assert seqs == list(range(per_thread))
    events_sent = threads_n * (per_thread // 10)
    assert sum(m["type"] == "event" for m in full) == events_sent
    # the lossy reader lost frames but no events, and was told about every lost frame
    assert sum(m["type"] == "event" for m in partial) == events_sent
    partial_frames = [m for m in partial if m["type"] == "frame"]
    told = sum(m.get("dropped", 0) for m in partial_frames)
    assert len(partial_frames) + told == threads_n * per_thread


def test_close_wakes_waiting_consumers_after_draining(frame: Callable[..., Msg]) -> None:
    hub = Hub()

    async def main() -> tuple[list[Msg], str, float]:
        sub = hub.subscribe()
        idle = hub.subscribe(types={"state"})
        hub.publish(frame(1))
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(idle.get())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        start = loop.time()
        threading.Timer(0.05, hub.close).start()
        with pytest.raises(HubClosed) as info:
            await asyncio.wait_for(waiting, timeout=5)
        woke_after = loop.time() - start
        got = [await sub.get()]  # queued before close: still delivered
        with pytest.raises(HubClosed):
            await sub.get()
        return got, info.value.reason, woke_after

    got, reason, woke_after = asyncio.run(main())
    assert [m["seq"] for m in got] == [1]
    assert reason == "the hub is closed"
    assert woke_after < 2.0
    assert hub.subscriber_count == 0
    with pytest.raises(HubClosed):
        hub.subscribe()
    hub.publish(frame(2))  # after close: ignored, never raises


def test_unsubscribe_wakes_waiter_and_detaches(frame: Callable[..., Msg]) -> None:
    hub = Hub()

    async def main() -> None:
        sub = hub.subscribe()
        waiting = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0.01)
        sub.close()
        with pytest.raises(HubClosed, match="unsubscribed"):
            await asyncio.wait_for(waiting, timeout=5)

    asyncio.run(main())
    assert hub.subscriber_count == 0


def test_cancelled_get_leaves_messages_queued(frame: Callable[..., Msg]) -> None:
    hub = Hub()

    async def main() -> Msg:
        sub = hub.subscribe()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sub.get(), timeout=0.05)
        hub.publish(frame(7))
        return await asyncio.wait_for(sub.get(), timeout=5)

    assert asyncio.run(main())["seq"] == 7


def test_get_blocking_from_a_thread(frame: Callable[..., Msg]) -> None:
    hub = Hub()
    sub = hub.subscribe()
    assert sub.get_blocking(timeout=0.01) is None
    threading.Timer(0.05, hub.publish, args=(frame(3),)).start()
    message = sub.get_blocking(timeout=5)
    assert message is not None and message["seq"] == 3
    threading.Timer(0.05, hub.close).start()
    with pytest.raises(HubClosed):
        sub.get_blocking(timeout=5)


def test_subscriber_whose_loop_closed_is_cut_off(frame: Callable[..., Msg]) -> None:
    hub = Hub()
    healthy = hub.subscribe()
    orphan = hub.subscribe()
    loop = asyncio.new_event_loop()
    getter = orphan.get()

    async def start_waiting() -> None:
        getter.send(None)  # runs get() up to its await, then leaves it suspended

    loop.run_until_complete(start_waiting())
    loop.close()  # the consumer's loop is gone while get() waits on it
    try:
        hub.publish(frame(1))  # must not raise
        assert orphan.closed and "event loop is closed" in (orphan.closed_reason or "")
        assert drain(healthy) == [frame(1)]
        assert hub.subscriber_count == 1
    finally:
        getter.close()
