"""Reconnect delays: exponential backoff with jitter (full by default), capped."""

from __future__ import annotations

import random


class Backoff:
    """Delays for consecutive failures.

    The n-th delay (n = 0, 1, ...) is drawn uniformly from ``[(1 - jitter) * c, c]``
    with ``c = min(max_s, initial_s * factor**n)``; the default ``jitter=1`` is "full
    jitter" (``[0, c]``), which best spreads the reconnects of many cameras that
    failed together; 0 gives the plain exponential sequence.  ``reset()`` after a
    success.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        factor: float = 2.0,
        jitter: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        if not factor >= 1.0:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {jitter}")
        self.jitter = jitter
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._rng = rng if rng is not None else random.Random()
        self.failures = 0

    def ceiling(self, attempt: int) -> float:
        """The largest delay of attempt ``attempt`` (0-based)."""
        try:
            return min(self.max_s, self.initial_s * self.factor**attempt)
        except OverflowError:
            return self.max_s

    def next_delay(self) -> float:
        ceiling = self.ceiling(self.failures)
        delay = self._rng.uniform((1.0 - self.jitter) * ceiling, ceiling)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
