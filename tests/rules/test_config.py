from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.errors import ConfigError
from service.rules import LineConfig, RuleEngine
from service.rules.config import ConveyorRule, PresenceRule

from .conftest import CLASSES

ZONE = [[0, 0], [10, 0], [10, 10]]


def line(*rules: dict[str, Any], **kw: Any) -> LineConfig:
    return LineConfig.model_validate({"id": "line-1", "rules": list(rules), **kw})


def test_for_and_camera_aliases() -> None:
    cfg = line({"type": "presence", "name": "st", "camera": "cam-1", "for": 2.5, "zone": ZONE})
    rule = cfg.rules[0]
    assert isinstance(rule, PresenceRule)
    assert rule.cameras == ["cam-1"] and rule.for_s == 2.5 and rule.clear_for_s == 0


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"type": "presence", "name": "a", "zone": ZONE, "colour": 1}, "Extra inputs"),
        ({"type": "presence", "name": "a"}, "zone"),
        ({"type": "teleport", "name": "a"}, "does not match any of the expected tags"),
        ({"type": "presence", "name": "a", "zone": [[0, 0], [1, 1], [2, 2]]}, "collinear"),
        ({"type": "presence", "name": "Bad Name", "zone": ZONE}, "not a valid id"),
        ({"type": "presence", "name": "a", "zone": ZONE, "for": -1}, "greater than or equal"),
        (
            {"type": "presence", "name": "a", "zone": ZONE, "camera": "c", "cameras": ["c"]},
            "either 'camera' or 'cameras'",
        ),
        (
            {"type": "position", "name": "a", "tolerance_mm": 5},
            "exactly one of 'target'",
        ),
        (
            {
                "type": "position",
                "name": "a",
                "target": [0, 0],
                "tolerance_mm": 5,
                "hysteresis_mm": 5,
            },
            "hysteresis_mm must be smaller",
        ),  # fmt: skip
        (
            {"type": "orientation", "name": "a", "tolerance_deg": 100, "symmetry_deg": 180},
            "below half of symmetry_deg",
        ),
        (
            {
                "type": "throughput",
                "name": "a",
                "count_line": [[0, 0], [0, 10]],
                "direction": [0, 1],
            },
            "parallel",
        ),  # fmt: skip
        (
            {
                "type": "joint_range",
                "name": "a",
                "class": "arm",
                "chain": ["a", "b"],
                "min_deg": 10,
                "max_deg": 0,
            },
            "min_deg",
        ),  # fmt: skip
        ({"type": "stall", "name": "a", "class": "arm", "line_state": "BROKEN"}, "line_state"),
        ({"type": "presence", "name": "a", "zone": [[0, 0], [1, float("nan")], [2, 0]]}, "finite"),
    ],
)
def test_invalid_rules_are_refused(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        line(rule)


def test_line_level_checks() -> None:
    with pytest.raises(ValidationError, match="unique"):
        line(
            {"type": "presence", "name": "a", "zone": ZONE},
            {"type": "stale_camera", "name": "a"},
        )
    with pytest.raises(ValidationError, match="not cameras of line"):
        line({"type": "presence", "name": "a", "zone": ZONE, "camera": "cam-9"}, cameras=["cam-1"])


def test_defaults_of_a_conveyor_rule() -> None:
    rule = line({"type": "conveyor", "name": "belt", "min_speed_mm_s": 20}).rules[0]
    assert isinstance(rule, ConveyorRule)
    assert rule.direction == (1.0, 0.0) and rule.zone is None and rule.units == "mm"


def test_unknown_class_or_keypoint_names_fail_when_the_engine_is_built() -> None:
    cfg = line({"type": "presence", "name": "a", "zone": ZONE, "classes": ["widget"]})
    with pytest.raises(ConfigError, match="class 'widget'.*bracket, flange, arm, hand"):
        RuleEngine(cfg, classes=CLASSES)
    with pytest.raises(ConfigError, match="class names are not known"):
        RuleEngine(cfg)
    cfg = line(
        {"type": "joint_range", "name": "j", "class": "arm", "chain": ["base", "knee"],
         "min_deg": 0, "max_deg": 90}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no keypoint 'knee'"):
        RuleEngine(cfg, classes=CLASSES)
    # ids work without names
    RuleEngine(line({"type": "presence", "name": "a", "zone": ZONE, "classes": [0, 1]}))
