from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SourceError
from service.sources import OpenCVSource, SimSource, SourceOptions, open_source


@pytest.mark.parametrize(
    ("spec", "kind", "target"),
    [
        ("rtsp://user:pw@10.0.0.5:554/h264?channel=1", "stream", None),
        ("rtsps://cam.local/live", "stream", None),
        ("http://cam.local/video.mjpg", "stream", None),
        ("https://cdn.example/line.m3u8", "stream", None),
        ("rtmp://media.local/live/line1", "stream", None),
        ("udp://239.0.0.1:1234", "stream", None),
        ("tcp://10.0.0.9:5000", "stream", None),
        ("/dev/video2", "usb", "/dev/video2"),
        ("0", "usb", 0),
        (3, "usb", 3),
        ("file:///data/line%201.mp4", "file", "/data/line 1.mp4"),
        ("recordings/line.mkv", "file", "recordings/line.mkv"),
    ],
)
def test_specs_map_to_opencv_sources(spec: str | int, kind: str, target: object) -> None:
    source = open_source(spec, SourceOptions())
    assert isinstance(source, OpenCVSource)
    assert source.kind == kind
    assert source.target == (spec if target is None else target)


def test_stream_label_masks_credentials() -> None:
    source = open_source("rtsp://user:pw@10.0.0.5/h264", SourceOptions())
    assert isinstance(source, OpenCVSource)
    assert source.label == "rtsp://user:***@10.0.0.5/h264"


@pytest.mark.parametrize("spec", ["ftp://host/x.mp4", "gopher://cam", "srt://h:1"])
def test_unsupported_scheme_names_the_supported_ones(spec: str) -> None:
    with pytest.raises(SourceError, match=r"unsupported .*scheme.*supported: sim://.*rtsp://"):
        open_source(spec, SourceOptions())


def test_unsupported_scheme_masks_credentials() -> None:
    with pytest.raises(SourceError) as info:
        open_source("ftp://bob:secret@host/x", SourceOptions())
    assert "secret" not in str(info.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="directory"):
        open_source(str(tmp_path), SourceOptions())


def test_sim_spec_parameters() -> None:
    source = open_source("sim://conveyor?seed=3&fps=12&width=320&height=240", SourceOptions())
    assert isinstance(source, SimSource)
    assert (source.scenario, source.seed, source.width, source.height) == ("conveyor", 3, 320, 240)
    assert source.scene_fps == 12.0 and source.nominal_fps == 12.0


def test_sim_spec_falls_back_to_options_then_defaults() -> None:
    source = open_source("sim://calm", SourceOptions(fps=5, width=200, height=100))
    assert isinstance(source, SimSource)
    assert (source.width, source.height, source.scene_fps) == (200, 100, 5.0)
    source = open_source("sim://calm", SourceOptions())
    assert isinstance(source, SimSource)
    assert (source.width, source.height, source.scene_fps) == (640, 480, 15.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sim://", "names no scenario"),
        ("sim://nowhere", "unknown scenario 'nowhere'"),
        ("sim://conveyor?speed=2", "unknown parameter 'speed'.*supported: seed, fps"),
        ("sim://conveyor?fps=fast", "not a number"),
        ("sim://conveyor?fps=0", "must be positive"),
        ("sim://conveyor?width=320.5", "must be an integer"),
        ("sim://conveyor?width=8", "too small"),
    ],
)
def test_bad_sim_specs(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(spec, SourceOptions())
