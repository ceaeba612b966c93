#!/usr/bin/python3
"""A looping GStreamer RTSP server for the tests (run it with /usr/bin/python3).

It serves one H.264 MP4 file, without re-encoding, at ``rtsp://127.0.0.1:PORT/PATH``
and loops it forever: a pad probe on the parser's sink pad drops the demuxer's EOS
and flush events, adds the pass's duration to the pad offset (so RTP timestamps keep
rising) and seeks the demuxer back to 0 from the main loop.  Each client gets its
own pipeline (``set_shared(False)``), so a late reader starts at the first keyframe.

Once the port is bound it prints one line, ``READY rtsp://127.0.0.1:PORT/PATH``,
and flushes stdout.  SIGTERM or SIGINT stops it cleanly.  This file runs under the
system interpreter because PyGObject (``gi``) is a Debian package, not a wheel.

Usage: /usr/bin/python3 tests/support/rtsp_server.py FILE [--port 0] [--path /stream]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


class _Looper:
    """Drop EOS/flush at the parser, shift the pad offset by one pass, seek to 0."""

    def __init__(self, demux: Gst.Element, pad: Gst.Pad) -> None:
        self._demux = demux
        self._pad = pad
        self._offset = 0
        self._pass_end = 0  # largest buffer end (pts + duration) seen in this pass
        pad.add_probe(Gst.PadProbeType.BUFFER, self._on_buffer)
        pad.add_probe(
            Gst.PadProbeType.EVENT_DOWNSTREAM | Gst.PadProbeType.EVENT_FLUSH, self._on_event
        )

    def _on_buffer(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buf = info.get_buffer()
        if buf is not None and buf.pts != Gst.CLOCK_TIME_NONE:
            dur = buf.duration if buf.duration != Gst.CLOCK_TIME_NONE else 0
            self._pass_end = max(self._pass_end, buf.pts + dur)
        return Gst.PadProbeReturn.OK

    def _on_event(self, _pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        event = info.get_event()
        if event is None:
            return Gst.PadProbeReturn.OK
        if event.type in (Gst.EventType.FLUSH_START, Gst.EventType.FLUSH_STOP):
            return Gst.PadProbeReturn.DROP
        if event.type == Gst.EventType.EOS:
            self._offset += self._pass_end
            self._pass_end = 0
            self._pad.set_offset(self._offset)
            GLib.idle_add(self._rewind)
            return Gst.PadProbeReturn.DROP
        return Gst.PadProbeReturn.OK

    def _rewind(self) -> bool:
        self._demux.seek_simple(
            Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.KEY_UNIT, 0
        )
        return False  # run once


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, location: str) -> None:
        super().__init__()
        self._location = location
        self._loopers: list[_Looper] = []
        self.set_shared(False)

    def do_create_element(self, _url: Any) -> Gst.Element:
        launch = (
            f'( filesrc location="{self._location}" ! qtdemux name=demux '
            "! h264parse name=parse config-interval=-1 "
            "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
        )
        element = Gst.parse_launch(launch)
        demux = element.get_by_name("demux")
        parse = element.get_by_name("parse")
        self._loopers.append(_Looper(demux, parse.get_static_pad("sink")))
        return element


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="H.264 MP4 to serve")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free one)")
    parser.add_argument("--path", default="/stream", help="mount path")
    args = parser.parse_args()
    if not args.file.is_file():
        print(f"no such file: {args.file}", file=sys.stderr)
        return 2

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.path, LoopingFactory(str(args.file.resolve())))
    if server.attach(None) == 0:
        print(f"cannot bind 127.0.0.1:{args.port}", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, lambda: loop.quit() or False)
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
