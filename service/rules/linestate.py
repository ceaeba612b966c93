"""The line-state table: from rule signals to one line state (pure).

First match wins (the table is also in docs/rules.md):

=========  =================================================================
UNKNOWN    a camera of the line is stale (no fresh frame within its max age),
           or no camera has delivered a frame yet
FAULT      a rule whose violation means FAULT is violated (default:
           zone_intrusion, stall, joint_range)
JAMMED     a conveyor rule is violated (parts present and standing still)
STOPPED    a conveyor rule sees an empty belt for its ``empty_for`` (or a rule
           with ``line_state: STOPPED`` is violated)
IDLE       no part counted by a throughput rule (no part seen at all, when the
           line has no throughput rule) for ``idle_after_s`` (or a rule with
           ``line_state: IDLE`` is violated)
RUNNING    otherwise
=========  =================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from service.domain import LineStateName

PRECEDENCE: tuple[LineStateName, ...] = (
    LineStateName.UNKNOWN,
    LineStateName.FAULT,
    LineStateName.JAMMED,
    LineStateName.STOPPED,
    LineStateName.IDLE,
)

DEFAULT_LINE_STATE: Mapping[str, LineStateName | None] = {
    "presence": None,
    "position": None,
    "orientation": None,
    "throughput": None,
    "conveyor": LineStateName.JAMMED,
    "zone_intrusion": LineStateName.FAULT,
    "joint_range": LineStateName.FAULT,
    "stall": LineStateName.FAULT,
    "stale_camera": LineStateName.UNKNOWN,
}
"""What a violated rule of each kind means for the line (None: nothing)."""


def effective_line_state(rule_type: str, override: str | None) -> LineStateName | None:
    """The line state a rule's violation implies: its ``line_state`` or its kind's."""
    if override is None:
        return DEFAULT_LINE_STATE[rule_type]
    if override == "none":
        return None
    return LineStateName(override)


def derive_line_state(
    signals: Mapping[LineStateName, Sequence[str]],
) -> tuple[LineStateName, list[str]]:
    """The line state and its reasons from ``signals``: for each state, the names of
    what calls for it (rules, stale cameras, "idle").  First in PRECEDENCE wins."""
    for state in PRECEDENCE:
        reasons = list(signals.get(state, ()))
        if reasons:
            return state, sorted(reasons)
    return LineStateName.RUNNING, []
