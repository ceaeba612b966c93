from __future__ import annotations

from collections.abc import Sequence

from service.domain import RuleStatus
from service.rules.debounce import Debouncer

OK, BAD, UNK = RuleStatus.OK, RuleStatus.VIOLATED, RuleStatus.UNKNOWN


def run(deb: Debouncer, seq: Sequence[tuple[float, bool | None]]) -> list[tuple[float, RuleStatus]]:
    out = []
    for t, raw in seq:
        new = deb.update(raw, t)
        if new is not None:
            out.append((t, new))
    return out


def test_for_delays_violation_and_a_short_blip_never_fires() -> None:
    deb = Debouncer(for_s=2.0)
    seq = [(0.0, False), (1.0, True), (2.5, False), (3.0, True), (4.0, True), (5.0, True)]
    assert run(deb, seq) == [(0.0, OK), (5.0, BAD)]
    assert deb.since == 5.0


def test_clear_for_delays_recovery() -> None:
    deb = Debouncer(for_s=0.0, clear_for_s=1.0)
    seq = [(0.0, True), (1.0, False), (1.5, True), (2.0, False), (2.9, False), (3.0, False)]
    assert run(deb, seq) == [(0.0, BAD), (3.0, OK)]


def test_no_evidence_holds_and_keeps_the_pending_clock() -> None:
    deb = Debouncer(for_s=2.0)
    assert run(deb, [(0.0, False), (1.0, True), (2.0, None), (3.0, None)]) == [
        (0.0, OK),
        (3.0, BAD),
    ]


def test_starts_unknown_and_stays_unknown_without_evidence() -> None:
    deb = Debouncer(for_s=1.0)
    assert run(deb, [(0.0, None), (1.0, True), (1.5, True)]) == []
    assert deb.status == UNK
    assert run(deb, [(2.0, True)]) == [(2.0, BAD)]


def test_force_unknown_drops_pending_change() -> None:
    deb = Debouncer(for_s=1.0)
    run(deb, [(0.0, False), (1.0, True)])
    assert deb.force_unknown(1.5) == UNK
    assert deb.force_unknown(1.6) is None
    # the condition must hold a full `for` again after the camera comes back
    assert run(deb, [(2.0, True), (2.9, True), (3.0, True)]) == [(3.0, BAD)]


def test_time_going_backwards_does_not_shorten_for() -> None:
    deb = Debouncer(for_s=1.0)
    run(deb, [(10.0, False), (10.5, True)])
    assert deb.update(True, 10.2) is None  # an older frame of another camera
    assert deb.update(True, 11.5) == BAD
