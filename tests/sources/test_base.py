from __future__ import annotations

import pytest

from service.errors import SourceError
from service.sources import EndOfStream, SourceOptions, mask_credentials


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/h264", "rtsp://admin:***@10.0.0.5:554/h264"),
        ("http://u:p%40ss@cam/video.mjpg", "http://u:***@cam/video.mjpg"),
        ("rtsp://10.0.0.5/h264", "rtsp://10.0.0.5/h264"),
        ("https://cam/live.m3u8?token=abc&x=1", "https://cam/live.m3u8?token=***&x=1"),
        ("rtsp://cam/s?user=a&password=b", "rtsp://cam/s?user=a&password=***"),
        (
            "cannot open rtsp://a:b@h/x within 2 s; also rtsp://c:d@g/y",
            "cannot open rtsp://a:***@h/x within 2 s; also rtsp://c:***@g/y",
        ),
        ("/videos/line:1@night.mp4", "/videos/line:1@night.mp4"),
    ],
)
def test_mask_credentials_hides_passwords_and_tokens(text: str, expected: str) -> None:
    assert mask_credentials(text) == expected


def test_end_of_stream_is_a_source_error() -> None:
    assert issubclass(EndOfStream, SourceError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fps": 0},
        {"read_timeout_s": 0},
        {"open_timeout_s": -1},
        {"backoff_initial_s": 2, "backoff_max_s": 1},
        {"width": 0},
        {"backoff_factor": 0.5},
    ],
)
def test_source_options_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(SourceError):
        SourceOptions(**kwargs)  # type: ignore[arg-type]
