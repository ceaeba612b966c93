from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.inference.onnx_factory import build_model

ModelFactory = Callable[..., Path]


@pytest.fixture
def model_factory(tmp_path: Path) -> ModelFactory:
    """Build a tiny constant-output ONNX model: ``model_factory(name, rows=..., **options)``."""

    def make(name: str = "model", rows: Any = None, **options: Any) -> Path:
        return build_model(tmp_path / f"{name}.onnx", rows, **options)

    return make
