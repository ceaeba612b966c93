"""service.overrides: ``--providers`` / ``--precision`` over a config entry or an
InferenceConfig, checked as the config checks them."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ModelConfig
from service.errors import ConfigError
from service.inference.config import InferenceConfig
from service.overrides import NO_OVERRIDE, RuntimeOverride


def entry(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"id": "m", "path": Path("m.onnx"), **fields})


def test_no_override_keeps_both_kinds_of_settings() -> None:
    config = InferenceConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert NO_OVERRIDE.apply(config) == config
    mod = entry(providers=["openvino", "cpu"], openvino={"precision": "bf16"})
    assert NO_OVERRIDE.apply(mod) == mod


def test_providers_become_onnx_runtime_names_for_a_session_and_stay_config_names_in_an_entry(
) -> None:
    override = RuntimeOverride("OpenVINO, cpu", "bf16")
    config = override.apply(InferenceConfig())
    assert config.providers == ["OpenVINO", "CPUExecutionProvider"]
    assert config.openvino.precision == "bf16"
    assert config.openvino.uint8_input  # the rest of the section is kept
    mod = override.apply(entry(openvino={"uint8_input": False}))
    assert mod.providers == ["openvino", "cpu"]
    assert mod.openvino.precision == "bf16" and not mod.openvino.uint8_input
    assert RuntimeOverride("auto").apply(entry(providers=["cpu"])).providers == "auto"


def test_precision_alone_applies_to_a_model_that_already_runs_on_openvino() -> None:
    config = InferenceConfig(providers=["openvino", "cpu"])
    assert RuntimeOverride(precision="bf16").apply(config).openvino.precision == "bf16"
    mod = entry(providers=["openvino"])
    assert RuntimeOverride(precision="bf16").apply(mod).openvino.precision == "bf16"


@pytest.mark.parametrize(("override", "settings", "message"), [
    (RuntimeOverride(precision="bf16"), InferenceConfig(),
     "--precision bf16 is OpenVINO's setting, and this model runs on auto: add --providers "
     "openvino,cpu"),
    (RuntimeOverride("cuda,cpu", "bf16"), InferenceConfig(providers=["openvino"]),
     "this model runs on cuda"),
    (RuntimeOverride(precision="f32"), entry(providers=["cpu"]), "this model runs on cpu"),
    (RuntimeOverride("cpu,openvino"), InferenceConfig(), "openvino replaces ONNX Runtime"),
    (RuntimeOverride("gpu"), InferenceConfig(), "--providers gpu: unknown provider(s) 'gpu'"),
    (RuntimeOverride(","), InferenceConfig(), "providers is empty"),
    (RuntimeOverride("cpu,cpu"), entry(), "lists a provider twice"),
])
def test_bad_options_are_refused_with_what_to_do(
    override: RuntimeOverride, settings: InferenceConfig | ModelConfig, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        override.apply(settings)
    assert message in str(err.value)
