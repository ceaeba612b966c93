"""Copy a CUDA shared library with every fatbin payload zeroed except the cubins for one
SM version (headers, sizes and offsets unchanged), so that it compresses to a fraction:
onnxruntime-gpu's CUDA provider (284 MB) keeps 77 MB of sm_90 code for an H100/H200.

    python3 scripts/devbox/fatbin_keep.py SRC.so DST.so 90

The copy runs only on a GPU of that SM version (the driver picks the sm_90 cubin by its
header; the zeroed ones are never read).  A development aid for moving onnxruntime-gpu
to an offline GPU machine through a small transfer; never shipped.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import sys

FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian
ELF_KIND = 2


def keep_only(src: str, dst: str, sm: int) -> tuple[int, int]:
    """Zero every payload but SM ``sm`` cubins; return (bytes zeroed, fatbins seen)."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        pos = zeroed = fatbins = 0
        while (i := m.find(FATBIN_MAGIC, pos)) >= 0:
            _, version, header, size = struct.unpack_from("<IHHQ", m, i)
            if version != 1 or header != 16 or i + header + size > len(m):
                pos = i + 4
                continue
            fatbins += 1
            entry, end = i + header, i + header + size
            while entry < end:
                kind, _, entry_header, padded = struct.unpack_from("<HHIQ", m, entry)
                (arch,) = struct.unpack_from("<I", m, entry + 28)
                if not (kind == ELF_KIND and arch == sm):
                    start = entry + entry_header
                    m[start : start + padded] = bytes(padded)
                    zeroed += padded
                entry += entry_header + padded
            pos = end
        m.flush()
    return zeroed, fatbins


if __name__ == "__main__":
    zeroed, fatbins = keep_only(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    print(f"{fatbins} fatbins, {zeroed / 1e6:.1f} MB zeroed")
