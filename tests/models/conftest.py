"""Shared fixtures of the model workspace tests."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "../shared/data"
COCO_SAMPLE = SHARED_DATA / "coco-sample" / "test_coco.json"


@pytest.fixture
def coco_sample() -> Path:
    if not COCO_SAMPLE.exists():
        pytest.skip(f"shared test data not found at {COCO_SAMPLE.resolve()}")
    return COCO_SAMPLE
