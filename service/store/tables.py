"""The store's schema (SQLAlchemy Core): events and line-state history."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, Integer, MetaData, String, Table

metadata = MetaData()

events = Table(
    "events",
    metadata,
    # AUTOINCREMENT: SQLite never reuses a cursor, even after pruning every row
    Column("cursor", Integer, primary_key=True, autoincrement=True),
    Column("line", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("name", String(128), nullable=False),
    Column("old", String(32), nullable=False),
    Column("new", String(32), nullable=False),
    Column("t_wall", Float, nullable=False),
    Column("detail", JSON, nullable=False),
    Index("ix_events_line_cursor", "line", "cursor"),
    Index("ix_events_t_wall", "t_wall"),
    sqlite_autoincrement=True,
)

state_history = Table(
    "state_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("line", String(128), nullable=False),
    Column("state", String(32), nullable=False),
    Column("since", Float, nullable=False),
    Column("until", Float, nullable=True),  # NULL: the line's current state
    Column("cursor", Integer, nullable=False),  # the state event that began it
    Index("ix_state_history_line_since", "line", "since"),
    sqlite_autoincrement=True,
)
