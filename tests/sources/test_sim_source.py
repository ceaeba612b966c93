from __future__ import annotations

import time

import numpy as np
import pytest

from service.sources import SimSource, SourceOptions, open_source

sim = pytest.importorskip("service.sim", reason="service.sim (the synthetic line) does not import")


def test_renders_consecutive_frames_as_fast_as_possible() -> None:
    source = open_source("sim://conveyor?seed=2&fps=10&width=320&height=240",
                         SourceOptions(realtime=False))
    assert isinstance(source, SimSource)
    source.open()
    scene = sim.Scene("conveyor", seed=2, width=320, height=240, fps=10.0)
    for index in range(3):
        image = source.read()
        expected, truth = scene.render(index)
        assert image.shape == (240, 320, 3) and image.dtype == np.uint8
        assert np.array_equal(image, expected)
        assert source.last_t == pytest.approx(index / 10.0)
        assert source.last_truth is not None
        assert len(source.last_truth.instances) == len(truth.instances)


def test_realtime_is_paced_and_shows_the_elapsed_time() -> None:
    source = open_source("sim://conveyor?seed=1&fps=20&width=160&height=120", SourceOptions())
    assert isinstance(source, SimSource)
    source.open()
    started = time.monotonic()
    for _ in range(11):  # 10 intervals at 20 fps
        image = source.read()
    elapsed = time.monotonic() - started
    assert image.shape == (120, 160, 3)
    assert 0.45 <= elapsed < 0.9
    assert source.last_t == pytest.approx(elapsed, abs=0.1)


def test_options_fps_paces_below_the_scene_rate() -> None:
    source = open_source("sim://calm?fps=30&width=160&height=120", SourceOptions(fps=10))
    assert isinstance(source, SimSource)
    assert source.nominal_fps == 10.0
    source.open()
    started = time.monotonic()
    for _ in range(6):
        source.read()
    assert 0.45 <= time.monotonic() - started < 0.9
