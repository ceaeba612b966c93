"""A command's ``--providers`` / ``--precision`` over a model's configured runtime.

``linewatch predict``, ``model eval`` and ``bench`` try a model on another runtime
without a config file per try (``--providers openvino,cpu --precision bf16``). The
options are checked as the config's ``providers:`` and ``openvino.precision:`` are
(the same names, openvino only first) and precision, which only OpenVINO reads, is
refused where OpenVINO would not run the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from service.config import ORT_PROVIDERS, ModelConfig, normalize_providers
from service.errors import ConfigError
from service.inference.config import PROVIDER_ALIASES, InferenceConfig

if TYPE_CHECKING:
    from service.inference.config import OpenVinoConfig

Precision = Literal["f32", "bf16"]
_Settings = TypeVar("_Settings", ModelConfig, InferenceConfig)


@dataclass(frozen=True, slots=True)
class RuntimeOverride:
    """``providers`` as the config writes them (``"openvino,cpu"``, ``"auto"``) and
    OpenVINO's ``precision``; None keeps the model's own setting."""

    providers: str | None = None
    precision: Precision | None = None

    def apply(self, settings: _Settings) -> _Settings:
        """``settings`` (a config's model entry or an ``InferenceConfig``) with the options
        over its providers and OpenVINO precision; ConfigError names a bad option."""
        names = self._names()
        first = _first(settings) if names is None else None if names == "auto" else names[0]
        if self.precision is not None and first != "openvino":
            raise ConfigError(
                f"--precision {self.precision} is OpenVINO's setting, and this model runs on "
                f"{'auto' if first is None else first}: add --providers openvino,cpu."
            )
        update: dict[str, object] = {}
        if names is not None:
            update["providers"] = (
                names if names == "auto" or isinstance(settings, ModelConfig)
                else [ORT_PROVIDERS[n] for n in names]
            )
        if self.precision is not None:
            openvino: OpenVinoConfig = settings.openvino
            update["openvino"] = openvino.model_copy(update={"precision": self.precision})
        return settings.model_copy(update=update)

    def _names(self) -> Literal["auto"] | list[str] | None:
        if self.providers is None:
            return None
        try:
            names: Literal["auto"] | list[str] = normalize_providers(self.providers)
        except ValueError as exc:
            raise ConfigError(f"--providers {self.providers}: {exc}.") from None
        return names


def _first(settings: ModelConfig | InferenceConfig) -> str | None:
    """The configured first provider as a config name (None for auto)."""
    if settings.providers == "auto":
        return None
    first = settings.providers[0]
    if isinstance(settings, ModelConfig):
        return first
    return "openvino" if PROVIDER_ALIASES.get(first.lower(), first) == "OpenVINO" else first


NO_OVERRIDE = RuntimeOverride()
"""The model's own settings, unchanged."""
