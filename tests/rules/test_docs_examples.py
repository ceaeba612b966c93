"""Every YAML and JSON example in docs/rules.md is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.rules import LineConfig, RuleEngine

from .conftest import CLASSES

DOC = Path(__file__).resolve().parents[2] / "docs/rules.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_yaml_example_builds_an_engine() -> None:
    found = blocks("yaml")
    assert len(found) >= 10
    kinds: set[str] = set()
    for text in found:
        data: Any = yaml.safe_load(text)
        cfg = (
            LineConfig.model_validate(data)
            if isinstance(data, dict)
            else LineConfig.model_validate({"id": "docs", "rules": data})
        )
        RuleEngine(cfg, classes=CLASSES)  # class and keypoint names resolve
        kinds.update(r.type for r in cfg.rules)
    from service.rules import RULE_TYPES

    assert kinds == set(RULE_TYPES)


@pytest.mark.parametrize("text", blocks("json"))
def test_json_examples_parse(text: str) -> None:
    for chunk in re.split(r"\n(?=\{)", text.strip()):
        json.loads(chunk)
