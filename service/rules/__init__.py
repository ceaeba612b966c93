"""Rules, line states and events: the judging stage after geometry.

Public API::

    from service.rules import LineConfig, RuleEngine

    line = LineConfig.model_validate(yaml_mapping)         # extra="forbid"
    engine = RuleEngine(line, classes=model_classes)        # ClassInfo per class id
    events = engine.update(camera, tracks, t_wall, frame_age_s)
    events += engine.tick(t_wall)                           # staleness, idleness
    engine.snapshot()                                       # for the API / bus

Rule kinds (``type``): presence, position, orientation, throughput, conveyor,
zone_intrusion, joint_range, stall, stale_camera.  Reference: docs/rules.md.
"""

from service.rules.config import RULE_TYPES, LineConfig, RuleConfig
from service.rules.engine import RuleEngine
from service.rules.linestate import derive_line_state

__all__ = ["RULE_TYPES", "LineConfig", "RuleConfig", "RuleEngine", "derive_line_state"]
