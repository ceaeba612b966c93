"""Noticing that a playing video file was removed, replaced or truncated.

An open ``VideoCapture`` keeps reading a deleted file through its descriptor, and
FFmpeg keeps looping what it buffered of a truncated one, so a file camera whose
file is gone would go on "delivering" forever.  :class:`FileWatch` compares the
path with the file that was opened (device, inode, size) and says what changed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import SourceError
from service.sources.base import Clock

DEFAULT_CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file a path named, and how big it was."""

    device: int
    inode: int
    size: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity | None:
        """The identity of the file at ``path`` now; None when there is none."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:  # a parent directory was replaced by a file
            return None
        return cls(st.st_dev, st.st_ino, st.st_size)


def file_change(opened: FileIdentity, now: FileIdentity | None) -> str | None:
    """What happened to the opened file: ``removed``, ``replaced``, ``truncated`` or None.

    A file that grew (a recording still being written) is not a change.
    """
    if now is None:
        return "removed"
    if (now.device, now.inode) != (opened.device, opened.inode):
        return "replaced"
    if now.size < opened.size:
        return "truncated"
    return None


class FileWatch:
    """Checks that the file opened at ``path`` is still the file there.

    ``check()`` stats the path at most every ``interval_s`` seconds (so a loop
    reading as fast as it decodes pays for one ``stat`` per interval);
    ``check(force=True)`` stats it now (at each rewind).  It raises
    :class:`SourceError` naming what happened, which makes the camera go down,
    close the file and retry with backoff until a readable file is back.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        label: str,
        *,
        interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Clock = time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.path = Path(path)
        self.label = label
        self.interval_s = interval_s
        self._clock = clock
        opened = FileIdentity.of(self.path)
        if opened is None:
            raise SourceError(f"video file {label} does not exist")
        self.opened = opened
        self._next_check = clock.monotonic() + interval_s

    def check(self, *, force: bool = False) -> None:
        now = self._clock.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + self.interval_s
        change = file_change(self.opened, FileIdentity.of(self.path))
        if change is not None:
            raise SourceError(f"video file {self.label} was {change} while playing")
