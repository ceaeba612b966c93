from __future__ import annotations

import pytest

from service.domain import LineStateName as S
from service.rules.linestate import derive_line_state, effective_line_state


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        ({}, S.RUNNING),
        ({S.IDLE: ["no parts"]}, S.IDLE),
        ({S.IDLE: ["no parts"], S.STOPPED: ["belt"]}, S.STOPPED),
        ({S.STOPPED: ["belt"], S.JAMMED: ["belt"]}, S.JAMMED),
        ({S.JAMMED: ["belt"], S.FAULT: ["danger"]}, S.FAULT),
        ({S.FAULT: ["danger"], S.UNKNOWN: ["camera cam-1 stale"]}, S.UNKNOWN),
        ({S.FAULT: [], S.IDLE: ["no parts"]}, S.IDLE),  # an empty list is no signal
    ],
)
def test_first_match_wins(signals: dict[S, list[str]], expected: S) -> None:
    state, reasons = derive_line_state(signals)
    assert state == expected
    assert reasons == sorted(signals.get(expected, []))


def test_kind_defaults_and_overrides() -> None:
    assert effective_line_state("zone_intrusion", None) == S.FAULT
    assert effective_line_state("stall", None) == S.FAULT
    assert effective_line_state("joint_range", None) == S.FAULT
    assert effective_line_state("conveyor", None) == S.JAMMED
    assert effective_line_state("presence", None) is None
    assert effective_line_state("presence", "FAULT") == S.FAULT
    assert effective_line_state("zone_intrusion", "none") is None
    assert effective_line_state("throughput", "IDLE") == S.IDLE
