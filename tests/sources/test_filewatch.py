from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.errors import SourceError
from service.sources.filewatch import FileIdentity, FileWatch, file_change


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


def test_identity_of_a_real_file_and_of_none(tmp_path: Path) -> None:
    path = tmp_path / "a.mp4"
    path.write_bytes(b"x" * 10)
    ident = FileIdentity.of(path)
    assert ident is not None and ident.size == 10 and ident.inode == os.stat(path).st_ino
    assert FileIdentity.of(tmp_path / "missing.mp4") is None
    assert FileIdentity.of(path / "below-a-file.mp4") is None


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (FileIdentity(1, 2, 100), None),
        (FileIdentity(1, 2, 150), None),  # grew: a recording still being written
        (None, "removed"),
        (FileIdentity(1, 3, 100), "replaced"),
        (FileIdentity(9, 2, 100), "replaced"),
        (FileIdentity(1, 2, 99), "truncated"),
    ],
)
def test_file_change(now: FileIdentity | None, expected: str | None) -> None:
    assert file_change(FileIdentity(1, 2, 100), now) == expected


def test_watch_notices_removal_only_after_its_interval_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "a.mp4"
    path.write_bytes(b"x" * 10)
    clock = FakeClock()
    watch = FileWatch(path, "a.mp4", interval_s=1.0, clock=clock)
    watch.check()
    path.unlink()
    clock.now += 0.5
    watch.check()  # not due yet: no stat
    with pytest.raises(SourceError, match=r"video file a\.mp4 was removed while playing"):
        watch.check(force=True)
    clock.now += 1.0  # one interval after the forced check
    with pytest.raises(SourceError, match="removed"):
        watch.check()


def test_watch_notices_a_replaced_and_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "a.mp4"
    path.write_bytes(b"x" * 10)
    watch = FileWatch(path, "a.mp4", interval_s=1.0, clock=FakeClock())
    other = tmp_path / "b.mp4"
    other.write_bytes(b"y" * 10)
    shutil.move(other, path)  # rename over it: a new inode at the same path
    with pytest.raises(SourceError, match="replaced"):
        watch.check(force=True)
    watch = FileWatch(path, "a.mp4", interval_s=1.0, clock=FakeClock())
    with path.open("r+b") as f:
        f.truncate(4)
    with pytest.raises(SourceError, match="truncated"):
        watch.check(force=True)


def test_watch_of_a_missing_file_and_a_bad_interval(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        FileWatch(tmp_path / "nope.mp4", "nope.mp4")
    (tmp_path / "a.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="interval_s"):
        FileWatch(tmp_path / "a.mp4", "a.mp4", interval_s=0)
