from __future__ import annotations

import random
import statistics

import pytest

from service.sources import Backoff


class UpperBound(random.Random):
    """A random source that always draws the top of the range."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_ceilings_double_and_are_capped() -> None:
    backoff = Backoff(0.5, 30.0, rng=UpperBound())
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_delays_are_full_jitter_below_the_ceiling() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    for attempt, delay in enumerate(delays):
        assert 0.0 <= delay <= backoff.ceiling(attempt)
    # jittered: not simply the ceilings, and not all the same fraction of them
    fractions = {round(d / backoff.ceiling(i), 6) for i, d in enumerate(delays)}
    assert len(fractions) == len(delays)


def test_jitter_is_uniform_over_the_whole_range() -> None:
    rng = random.Random(1)
    draws = []
    for _ in range(2000):
        backoff = Backoff(1.0, 8.0, rng=rng)
        backoff.failures = 2  # ceiling 4 s
        draws.append(backoff.next_delay())
    assert min(draws) < 0.1 and max(draws) > 3.9
    assert statistics.mean(draws) == pytest.approx(2.0, abs=0.15)


def test_reset_starts_over_and_huge_attempts_stay_capped() -> None:
    backoff = Backoff(0.25, 2.0, rng=UpperBound())
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.25
    assert backoff.ceiling(10_000) == 2.0


def test_factor_sets_the_growth() -> None:
    backoff = Backoff(1.0, 100.0, factor=3.0, rng=UpperBound())
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]
    assert Backoff(1.0, 5.0, factor=1.0, rng=UpperBound()).ceiling(50) == 1.0


def test_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0, factor=0.5)


def test_partial_jitter_keeps_each_delay_near_its_ceiling() -> None:
    backoff = Backoff(1.0, 64.0, jitter=0.25, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(40)]
    for attempt, delay in enumerate(delays):
        ceiling = backoff.ceiling(attempt)
        assert 0.75 * ceiling <= delay <= ceiling
    assert len({round(d, 9) for d in delays[6:]}) > 20  # still random once capped
    plain = Backoff(1.0, 64.0, jitter=0.0, rng=random.Random(3))
    assert [plain.next_delay() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(ValueError, match="jitter"):
        Backoff(1.0, 2.0, jitter=1.5)


def test_the_camera_config_backoff_reaches_the_camera() -> None:
    from service.app import Runtime
    from service.bus import Hub
    from service.config import Config

    config = Config.model_validate({
        "cameras": [{"id": "c", "source": "sim://conveyor?seed=1&width=64&height=48",
                     "backoff": {"initial_s": 0.25, "max_s": 4.0, "factor": 3.0,
                                 "jitter": 0.0}}],
        "models": [{"id": "m", "path": "models/zoo/linewatch-parts-s.onnx"}],
        "store": {"url": "sqlite://"},
    })
    runtime = Runtime.build(config, Hub())
    backoff = runtime.cameras["c"]._backoff
    assert (backoff.initial_s, backoff.max_s, backoff.factor, backoff.jitter) == (
        0.25, 4.0, 3.0, 0.0
    )
    assert [backoff.next_delay() for _ in range(4)] == [0.25, 0.75, 2.25, 4.0]
