"""Inference: ONNX Runtime sessions, model metadata, adapters per model family.

Public API::

    from service.inference import OrtModel, InferenceConfig, default_model_path

    model = OrtModel(default_model_path(), InferenceConfig(intra_op_threads=1))
    detections = model.predict([frame.image for frame in frames])  # one per image
    model.provider, model.info, model.last_timing

``read_model_info(path)`` reads a model's tensors and metadata without a session;
``select_adapter(info)`` says which adapter would decode it (or refuses it).
"""

from __future__ import annotations

from pathlib import Path

from service.inference.adapters import (
    Adapter,
    AdapterChoice,
    End2EndAdapter,
    register_adapter,
    registered_adapters,
    select_adapter,
)
from service.inference.config import InferenceConfig
from service.inference.metadata import InputSpec, ModelInfo, TensorSpec, read_model_info
from service.inference.session import OrtModel, RunTiming

DEFAULT_MODEL = "models/zoo/linewatch-parts-s.onnx"


def repo_root() -> Path:
    """The directory that holds the ``service`` package (the repository in a checkout)."""
    return Path(__file__).resolve().parents[2]


def default_model_path() -> Path:
    """The shipped default model, relative to the installed package's repository root."""
    return repo_root() / DEFAULT_MODEL


__all__ = [
    "DEFAULT_MODEL",
    "Adapter",
    "AdapterChoice",
    "End2EndAdapter",
    "InferenceConfig",
    "InputSpec",
    "ModelInfo",
    "OrtModel",
    "RunTiming",
    "TensorSpec",
    "default_model_path",
    "read_model_info",
    "register_adapter",
    "registered_adapters",
    "select_adapter",
]
