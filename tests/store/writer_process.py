"""A writer process for the SIGKILL test: appends events forever, one per
transaction, and prints each cursor once ``append`` has returned.

Usage: python -m tests.store.writer_process sqlite:///path.db LINE
"""

from __future__ import annotations

import sys
import time

from service.domain import Event
from service.store import EventStore


def main() -> None:
    url, line = sys.argv[1], sys.argv[2]
    store = EventStore(url)
    i = 0
    while True:
        ev = Event(line, "rule", f"rule-{i % 7}", "ok", "violated", time.time(), {"i": i})
        (stored,) = store.append([ev])
        print(f"{stored.cursor} {i}", flush=True)
        i += 1


if __name__ == "__main__":
    main()
