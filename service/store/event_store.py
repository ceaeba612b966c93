"""The event store: every rule and state change, written before it is published.

SQLite (the default) runs in WAL journal mode, so API readers never block the
writer, with ``synchronous=FULL``: every commit fsyncs the WAL, so an event that
``append`` has returned survives a SIGKILL of the process *and* an OS crash or
power cut.  (``NORMAL`` would survive SIGKILL too but may lose the last commits on
power loss; events come a few per minute, so the fsync per commit costs nothing
that matters, and "stored before published" must hold for every published event.)
"""

from __future__ import annotations

import builtins
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from service.domain import Event
from service.errors import ConfigError
from service.store import tables

SECONDS_PER_DAY = 86400.0
MAX_LIMIT = 10_000


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _dumps(obj: object) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class StateSpan:
    """One stretch of a line in one state (``until`` None: it still is)."""

    line: str
    state: str
    since: float
    until: float | None
    cursor: int


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"store url {url!r} is not a database URL: {exc}") from exc
    kwargs: dict[str, Any] = {"json_serializer": _dumps}
    sqlite = parsed.get_backend_name() == "sqlite"
    memory = sqlite and parsed.database in (None, "", ":memory:")
    if memory:
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif sqlite:
        assert parsed.database is not None
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30.0}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"store url {url!r} cannot be used: {exc}") from exc
    if sqlite and not memory:

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    return engine


def _row_event(row: sa.Row[Any]) -> Event:
    m = row._mapping
    return Event(
        line=m["line"],
        kind=m["kind"],
        name=m["name"],
        old=m["old"],
        new=m["new"],
        t_wall=float(m["t_wall"]),
        detail=dict(m["detail"] or {}),
        cursor=int(m["cursor"]),
    )


class EventStore:
    """Events and line-state history in a database (SQLite file by default).

    Thread-safe for one writer thread and any number of reader threads: appends are
    serialised by a lock, every call takes its own pooled connection, and SQLite's
    WAL lets readers run while a write commits.
    """

    def __init__(self, url: str, retention_days: float = 30.0) -> None:
        if retention_days < 0:
            raise ConfigError(
                f"store retention_days must be >= 0 (0: keep forever), got {retention_days}"
            )
        self.url = url
        self.retention_days = float(retention_days)
        self._engine = _make_engine(url)
        self._write_lock = threading.Lock()
        try:
            self._create_tables()
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise ConfigError(
                f"the event store {url!r} cannot be opened or created: {exc.__class__.__name__}: "
                f"{getattr(exc, 'orig', exc)}; check the path, its permissions and that the "
                "file is a LineWatch SQLite database"
            ) from exc

    def _create_tables(self) -> None:
        """Create the tables that are missing.  Two processes (or stores) opening the
        same new file at once race: one may see a table missing that the other then
        creates ("already exists"), or find the file locked while the other switches it
        to WAL ("database is locked": SQLite does not wait on that).  Both pass once the
        other is done: look again, with a short backoff, for up to about 10 s."""
        attempts = 40
        for attempt in range(attempts):
            try:
                tables.metadata.create_all(self._engine)
                return
            except OperationalError as exc:
                text = str(exc)
                racing = "already exists" in text or "database is locked" in text
                if not racing or attempt == attempts - 1:
                    raise
                time.sleep(min(0.5, 0.01 * (attempt + 1)))

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------
    def append(self, events: builtins.list[Event]) -> builtins.list[Event]:
        """Store ``events`` in one transaction and return them with their cursors.

        The transaction is committed (and, on SQLite, fsynced) before this returns:
        publish the returned events only after it."""
        if not events:
            return []
        stored: builtins.list[Event] = []
        with self._write_lock, self._engine.begin() as conn:
            for ev in events:
                result = conn.execute(
                    tables.events.insert().values(
                        line=ev.line,
                        kind=ev.kind,
                        name=ev.name,
                        old=ev.old,
                        new=ev.new,
                        t_wall=float(ev.t_wall),
                        detail=ev.detail,
                    )
                )
                pk = result.inserted_primary_key
                assert pk is not None
                cursor = int(pk[0])
                if ev.kind == "state":
                    self._record_state(conn, ev, cursor)
                stored.append(replace(ev, cursor=cursor))
        return stored

    @staticmethod
    def _record_state(conn: sa.Connection, ev: Event, cursor: int) -> None:
        h = tables.state_history
        conn.execute(
            h.update()
            .where(h.c.line == ev.line, h.c.until.is_(None))
            .values(until=float(ev.t_wall))
        )
        conn.execute(
            h.insert().values(
                line=ev.line, state=ev.new, since=float(ev.t_wall), until=None, cursor=cursor
            )
        )

    def prune(self, retention_days: float | None = None, now: float | None = None) -> int:
        """Delete events (and closed state spans) older than the retention; returns the
        number of events deleted.  A retention of 0 keeps everything."""
        days = self.retention_days if retention_days is None else float(retention_days)
        if days <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - days * SECONDS_PER_DAY
        h = tables.state_history
        with self._write_lock, self._engine.begin() as conn:
            deleted = conn.execute(tables.events.delete().where(tables.events.c.t_wall < cutoff))
            conn.execute(h.delete().where(h.c.until.is_not(None), h.c.until < cutoff))
        return int(deleted.rowcount or 0)

    # -- reading -------------------------------------------------------------------
    def latest_cursor(self) -> int:
        """The highest cursor ever assigned (0: none yet), pruned events included."""
        with self._engine.connect() as conn:
            top = conn.execute(sa.select(sa.func.max(tables.events.c.cursor))).scalar()
            if top is None and self._engine.dialect.name == "sqlite":
                try:
                    top = conn.execute(
                        sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
                    ).scalar()
                except SQLAlchemyError:  # no AUTOINCREMENT row has ever been written
                    top = None
        return int(top or 0)

    def state_history(
        self, line: str, since: float | None = None, until: float | None = None
    ) -> builtins.list[StateSpan]:
        """The line's state spans overlapping [since, until], oldest first."""
        h = tables.state_history
        query = sa.select(h).where(h.c.line == line).order_by(h.c.since, h.c.id)
        if since is not None:
            query = query.where(sa.or_(h.c.until.is_(None), h.c.until >= since))
        if until is not None:
            query = query.where(h.c.since <= until)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            StateSpan(
                line=r.line,
                state=r.state,
                since=float(r.since),
                until=None if r.until is None else float(r.until),
                cursor=int(r.cursor),
            )
            for r in rows
        ]

    def list(
        self, line: str | None = None, since_cursor: int = 0, limit: int = 100
    ) -> tuple[builtins.list[Event], int]:
        """Events after ``since_cursor`` (oldest first, at most ``limit``), and the cursor
        to pass next time (the last one returned, or ``since_cursor`` if none)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be in [1, {MAX_LIMIT}], got {limit}")
        ev = tables.events
        query = sa.select(ev).where(ev.c.cursor > since_cursor).order_by(ev.c.cursor).limit(limit)
        if line is not None:
            query = query.where(ev.c.line == line)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        events = [_row_event(r) for r in rows]
        next_cursor = events[-1].cursor if events else since_cursor
        assert next_cursor is not None
        return events, next_cursor
