"""quantization_config -> QuantSpec: every supported format, and a one-line refusal for the rest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from headrace.common.config import ConfigError, EngineConfig, ModelConfig
from headrace.common.models.quant import QuantizationError, QuantSpec, quant_spec
from headrace.common.models.resolve import resolve_engine_config


def cfg(qc=None):
    return SimpleNamespace(quantization_config=qc)


def ct(fmt: str, weights: dict, acts=None, ignore=("lm_head",)):
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


def test_each_supported_format():
    gptq = quant_spec(cfg({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": True}), None)
    assert (gptq.kind, gptq.bits, gptq.group_size, gptq.symmetric, gptq.desc_act, gptq.gptq_zero_offset) == \
        ("int", 4, 128, False, True, 1)
    assert quant_spec(cfg({"quant_method": "gptq", "bits": 8, "group_size": -1}), None).group_size is None
    awq = quant_spec(cfg({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                          "version": "gemm"}), "awq")
    assert (awq.checkpoint_format, awq.symmetric) == ("awq", False)
    w4 = quant_spec(cfg(ct("pack-quantized", {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32,
                                               "symmetric": True})), None)
    assert (w4.checkpoint_format, w4.bits, w4.group_size, w4.ignore) == ("compressed-tensors", 4, 32, ("lm_head",))
    fp8 = quant_spec(cfg(ct("float-quantized", {"type": "float", "num_bits": 8, "strategy": "channel"},
                            {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True})), None)
    assert (fp8.kind, fp8.weight_scale, fp8.activation_scale) == ("fp8", "channel", "dynamic")
    block = quant_spec(cfg({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}),
                       None)
    assert (block.weight_scale, block.block_size) == ("block", (128, 128))
    online = quant_spec(cfg(), "fp8")
    assert (online.kind, online.checkpoint_format) == ("fp8", "online")
    assert quant_spec(cfg(), None) is None


@pytest.mark.parametrize("qc,requested,match", [
    ({"quant_method": "bitsandbytes"}, None, "quant_method 'bitsandbytes' is not supported; supported: GPTQ"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, None, "GPTQ with 3-bit weights"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 48}, None, "group size 48 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, None, "only the GEMM layout"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "awq", "does not match the checkpoint's"),
    (None, "gptq", "needs a checkpoint quantized with it"),
    (ct("marlin-24", {"type": "int", "num_bits": 4}), None, "format 'marlin-24' is not supported"),
    (ct("pack-quantized", {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128},
        {"type": "int", "num_bits": 8}), None, "16-bit activations only"),
])
def test_unsupported_quantization_is_one_clear_line(qc, requested, match):
    with pytest.raises(QuantizationError, match=match) as info:
        quant_spec(cfg(qc), requested)
    assert "\n" not in str(info.value)


def test_ignored_modules_by_name_and_by_regex():
    spec = QuantSpec(kind="int", checkpoint_format="gptq", ignore=("lm_head", "re:.*mlp\\.down_proj"))
    assert spec.is_quantized("model.layers.0.self_attn.q_proj")
    assert not spec.is_quantized("model.layers.3.mlp.down_proj") and not spec.is_quantized("lm_head")
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_resolution_ships_the_spec_and_random_presets_quantize_at_load():
    config = resolve_engine_config(EngineConfig(model=ModelConfig(model="random:tiny-llama", quantization="gptq"),
                                                device="cpu"), log=lambda *_: None)
    spec = config.resolved.quantization
    assert (spec.kind, spec.checkpoint_format, spec.bits, spec.group_size) == ("int", "random", 4, 32)
    assert EngineConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="'bogus' is not supported; choose one of"):
        ModelConfig(model="random:tiny-llama", quantization="bogus")
