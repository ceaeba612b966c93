"""Events and line-state history (SQLAlchemy; a SQLite file by default).

Public API::

    from service.store import EventStore

    store = EventStore("sqlite:///linewatch.db", retention_days=30)
    stored = store.append(events)          # committed + fsynced; cursors assigned
    page, next_cursor = store.list(line="line-1", since_cursor=0, limit=100)
    store.latest_cursor()
    store.state_history("line-1", since=t0)
    store.prune()                          # drop events older than the retention
"""

from service.store.event_store import EventStore, StateSpan

__all__ = ["EventStore", "StateSpan"]
