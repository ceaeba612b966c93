"""glibc's mmap threshold: frames freed by a long-running process go back to the OS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from service.telemetry.memory import keep_frames_out_of_the_heap

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only"
)

# In a fresh process: malloc a 1 MB block, free it, malloc it again, and say whether the
# second one was served by mmap (glibc's mallinfo2: hblkhd = bytes in mmapped blocks).
PROBE = textwrap.dedent("""
    import ctypes, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "fixed":
        from service.telemetry.memory import keep_frames_out_of_the_heap
        assert keep_frames_out_of_the_heap()
    libc.free(libc.malloc(1 << 20))  # glibc raises its threshold past a freed mmapped block
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(1 << 20)
    print(libc.mallinfo2().hblkhd - before >= 1 << 20)
    libc.free(block)
""")


def _second_frame_is_mmapped(mode: str) -> bool:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env, timeout=60)
    return out.stdout.strip() == "True"


def test_a_freed_frame_goes_back_to_the_os_with_the_fixed_threshold() -> None:
    assert not _second_frame_is_mmapped("default")  # glibc's dynamic threshold: the heap
    assert _second_frame_is_mmapped("fixed")


def test_an_operators_malloc_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert keep_frames_out_of_the_heap() is False
