"""Debouncing a rule's raw condition into its status (``for`` and ``clear_for``)."""

from __future__ import annotations

from dataclasses import dataclass

from service.domain import RuleStatus


@dataclass
class Debouncer:
    """Turns a raw per-frame condition into ok / violated / unknown.

    ``update(raw, t)``: ``raw`` True (violating), False (clear) or None (no evidence:
    nothing changes, a pending change keeps its clock).  The status turns VIOLATED
    once the condition has held continuously for ``for_s`` seconds, and OK once it
    has been clear for ``clear_for_s`` seconds; a condition that flips back before
    then cancels the pending change.  The first evaluation starts from UNKNOWN, so
    a rule never reports OK before it has evidence.  ``force_unknown(t)`` (stale
    camera) drops any pending change.
    """

    for_s: float = 0.0
    clear_for_s: float = 0.0
    status: RuleStatus = RuleStatus.UNKNOWN
    since: float | None = None
    _pending: RuleStatus | None = None
    _pending_since: float = 0.0
    _last_t: float = float("-inf")

    def update(self, raw: bool | None, t: float) -> RuleStatus | None:
        """Feed one evaluation; returns the new status when it changed, else None."""
        t = max(t, self._last_t)  # several cameras may deliver slightly out of order
        self._last_t = t
        if raw is None:
            return self._maybe_commit(t)
        target = RuleStatus.VIOLATED if raw else RuleStatus.OK
        if target == self.status:
            self._pending = None
            return None
        if self._pending != target:
            self._pending, self._pending_since = target, t
        return self._maybe_commit(t)

    def force_unknown(self, t: float) -> RuleStatus | None:
        self._pending = None
        self._last_t = max(t, self._last_t)
        if self.status == RuleStatus.UNKNOWN:
            return None
        self.status, self.since = RuleStatus.UNKNOWN, t
        return self.status

    def _maybe_commit(self, t: float) -> RuleStatus | None:
        if self._pending is None:
            return None
        hold = self.for_s if self._pending == RuleStatus.VIOLATED else self.clear_for_s
        if t - self._pending_since + 1e-9 < hold:
            return None
        self.status, self.since, self._pending = self._pending, t, None
        return self.status
