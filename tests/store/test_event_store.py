"""The event store on real SQLite files: cursors, pagination, WAL, retention,
threads, and durability across a SIGKILL of a real writer process."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from service.domain import Event
from service.errors import ConfigError
from service.store import EventStore

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0

StoreFactory = Callable[..., EventStore]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[StoreFactory]:
    stores: list[EventStore] = []

    def make(name: str = "events.db", retention_days: float = 30.0) -> EventStore:
        store = EventStore(f"sqlite:///{tmp_path / name}", retention_days=retention_days)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def make_event(
    i: int, line: str = "line-1", kind: str = "rule", t: float = 1_700_000_000.0
) -> Event:
    if kind == "state":
        return Event(line, "state", "state", "RUNNING", "JAMMED", t + i, {"reasons": ["belt"]})
    return Event(line, kind, f"rule-{i}", "ok", "violated", t + i, {"i": i, "value": 1.5})


def test_append_assigns_cursors_and_round_trips(make_store: StoreFactory) -> None:
    store = make_store()
    stored = store.append([make_event(i) for i in range(3)])
    assert [e.cursor for e in stored] == [1, 2, 3]
    assert store.latest_cursor() == 3
    events, nxt = store.list()
    assert events == stored
    assert nxt == 3
    assert events[1].detail == {"i": 1, "value": 1.5}
    assert store.append([]) == []


def test_numpy_values_in_detail_are_stored_as_json(make_store: StoreFactory) -> None:
    store = make_store()
    ev = Event(
        "line-1",
        "rule",
        "r",
        "ok",
        "violated",
        1.0,
        {"value": np.float32(2.5), "ids": np.array([1, 2], np.int32)},
    )
    store.append([ev])
    (got,), _ = store.list()
    assert got.detail == {"value": 2.5, "ids": [1, 2]}


def test_cursor_pagination_per_line(make_store: StoreFactory) -> None:
    store = make_store()
    store.append([make_event(i, line="line-1" if i % 3 else "line-2") for i in range(25)])
    seen: list[int] = []
    cursor = 0
    pages = 0
    while True:
        page, cursor = store.list(line="line-1", since_cursor=cursor, limit=4)
        if not page:
            break
        pages += 1
        assert len(page) <= 4
        assert all(e.line == "line-1" for e in page)
        seen.extend(e.cursor for e in page if e.cursor is not None)
    expected = [i + 1 for i in range(25) if i % 3]
    assert seen == expected
    assert pages == 4  # 16 events, 4 per page
    # the cursor returned when nothing is left does not move
    assert store.list(line="line-1", since_cursor=cursor)[1] == cursor
    all_events, last = store.list(limit=1000)
    assert len(all_events) == 25 and last == 25
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=0)


def test_sqlite_file_is_in_wal_mode(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("wal.db")
    store.append([make_event(0)])
    with sqlite3.connect(tmp_path / "wal.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "wal.db-wal").exists()


def test_prune_drops_old_events_and_never_reuses_cursors(make_store: StoreFactory) -> None:
    now = 1_800_000_000.0
    store = make_store(retention_days=30)
    store.append([make_event(0, t=now - 40 * DAY), make_event(0, t=now - 31 * DAY)])
    store.append([make_event(0, t=now - 1 * DAY)])
    assert store.prune(now=now) == 2
    events, _ = store.list()
    assert [e.cursor for e in events] == [3]
    assert store.prune(retention_days=0.5, now=now) == 1  # explicit retention wins
    assert store.list()[0] == []
    assert store.latest_cursor() == 3  # pruned, but cursors stay taken
    (fresh,) = store.append([make_event(1, t=now)])
    assert fresh.cursor == 4


def test_retention_zero_keeps_everything(make_store: StoreFactory) -> None:
    store = make_store(retention_days=0)
    store.append([make_event(0, t=0.0)])
    assert store.prune(now=1e12) == 0
    assert len(store.list()[0]) == 1


def test_state_history_spans(make_store: StoreFactory) -> None:
    store = make_store()
    t = 1000.0
    store.append(
        [
            Event("line-1", "state", "state", "UNKNOWN", "RUNNING", t),
            Event("line-2", "state", "state", "UNKNOWN", "IDLE", t + 1),
            Event("line-1", "rule", "belt", "ok", "violated", t + 9),
            Event("line-1", "state", "state", "RUNNING", "JAMMED", t + 10),
        ]
    )
    store.append([Event("line-1", "state", "state", "JAMMED", "RUNNING", t + 25)])
    spans = store.state_history("line-1")
    assert [(s.state, s.since, s.until) for s in spans] == [
        ("RUNNING", t, t + 10),
        ("JAMMED", t + 10, t + 25),
        ("RUNNING", t + 25, None),
    ]
    assert spans[1].cursor == 4
    assert [s.state for s in store.state_history("line-1", since=t + 12, until=t + 20)] == [
        "JAMMED"
    ]
    assert [s.state for s in store.state_history("line-2")] == ["IDLE"]


def test_reopening_keeps_events(make_store: StoreFactory) -> None:
    first = make_store("same.db")
    first.append([make_event(i) for i in range(5)])
    first.close()
    again = make_store("same.db")
    assert again.latest_cursor() == 5
    assert again.append([make_event(9)])[0].cursor == 6


def test_one_writer_and_readers_in_threads(make_store: StoreFactory) -> None:
    store = make_store()
    n = 200
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(n):
                store.append([make_event(i)])
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        try:
            cursor = 0
            while not done.is_set() or cursor < n:
                page, nxt = store.list(since_cursor=cursor, limit=7)
                cursors = [e.cursor for e in page]
                assert cursors == list(range(cursor + 1, cursor + 1 + len(page)))
                cursor = nxt
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert store.latest_cursor() == n


def test_bad_store_urls_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        EventStore("no scheme here")
    (tmp_path / "adir.db").mkdir()
    with pytest.raises(ConfigError, match="cannot be opened"):
        EventStore(f"sqlite:///{tmp_path / 'adir.db'}")
    with pytest.raises(ConfigError, match="retention_days"):
        EventStore("sqlite://", retention_days=-1)


def test_in_memory_store_works_across_threads() -> None:
    store = EventStore("sqlite://")
    result: list[int] = []

    def write() -> None:
        result.append(store.append([make_event(0)])[0].cursor or 0)

    th = threading.Thread(target=write)
    th.start()
    th.join()
    assert result == [1]
    assert store.list()[1] == 1
    store.close()


@pytest.mark.slow
def test_no_stored_event_is_lost_when_the_writer_is_sigkilled(tmp_path: Path) -> None:
    db = tmp_path / "kill.db"
    url = f"sqlite:///{db}"
    acknowledged: dict[int, int] = {}  # cursor -> i, for every append that returned
    for _round in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.store.writer_process", url, "line-k"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        got = 0
        while got < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            cursor, i = (int(v) for v in line.split())
            acknowledged[cursor] = i
            got += 1
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: it is appending as fast as it can
        proc.wait(timeout=10)
        for line in proc.stdout:  # anything printed before the kill was acknowledged too
            cursor, i = (int(v) for v in line.split())
            acknowledged[cursor] = i
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        assert got == 150, "the writer did not get going"

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = EventStore(url)
    events, _ = store.list(line="line-k", limit=10_000)
    store.close()
    stored = {e.cursor or 0: e.detail["i"] for e in events}
    missing = {c: i for c, i in acknowledged.items() if stored.get(c) != i}
    assert not missing, f"acknowledged events lost after SIGKILL: {sorted(missing)[:10]}"
    cursors = sorted(stored)
    assert cursors == sorted(set(cursors))
    # the restarted writer went on after the first one's last cursor
    assert len(acknowledged) >= 300


def test_processes_creating_the_same_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    code = (
        "import sys, time\n"
        "from service.store import EventStore\n"
        "start = float(sys.argv[2])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "EventStore('sqlite:///' + sys.argv[1]).close()\n"
    )
    start = time.time() + 2.0  # all import first, then open together
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(db), str(start)],
                         stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    with EventStore(f"sqlite:///{db}") as store:
        assert store.list(limit=1) == ([], 0)
