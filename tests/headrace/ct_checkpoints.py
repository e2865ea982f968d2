"""Quantized checkpoints of a dense HF folder made with compressed-tensors (the library that defines the format
llm-compressor writes and vLLM reads), plus a dense float32 folder of given dequantized weights (the oracle a
quantized model's greedy tokens are compared with).

compressed-tensors itself does what llm-compressor's model-free path does for weight quantization: attach a
preset scheme to every Linear but the LM head (`apply_quantization_config`), compute each weight's scales
and zero points from its min / max (`calculate_qparams`), compress to the checkpoint layout
(`ModelCompressor.compress_model`: float-quantized or pack-quantized) and write the quantization config
(`update_config`). The only step done here is the min / max reduction, which is llm-compressor's default
("memoryless minmax") weight observer; no calibration data is needed for these schemes (FP8_DYNAMIC quantizes
activations per token at run time; W4A16 has none).
"""

from __future__ import annotations

import json
import os
import shutil

import torch


def _weight_min_max(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel ([out, 1]) or per group of `group_size` inputs ([out, in / group_size])."""
    from compressed_tensors.quantization import QuantizationStrategy

    w = weight.float()
    if args.strategy == QuantizationStrategy.GROUP:
        w = w.view(w.shape[0], -1, args.group_size)
        return w.amin(dim=-1), w.amax(dim=-1)
    assert args.strategy == QuantizationStrategy.CHANNEL, args.strategy
    return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)


@torch.no_grad()
def build_ct_checkpoint(src_dir: str, out_dir: str, scheme: str, group_size: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """`scheme` (a compressed-tensors preset: FP8_DYNAMIC, W4A16, ...) applied to `src_dir`'s Linears but
    lm_head, written compressed to out_dir. Returns compressed-tensors' own decompression of each quantized
    weight (HF name -> bf16 tensor: it computes (q - zp) * scale in the scale's dtype). `group_size`
    overrides a group preset's (W4A16's 128 does not divide SmolLM2-135M's hidden size, 576)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16)
    qscheme = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        qscheme.weights = qscheme.weights.model_copy(update={"group_size": group_size})
    config = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    quantized = []
    for name, module in model.named_modules():
        qscheme = getattr(module, "quantization_scheme", None)
        if qscheme is None or qscheme.weights is None:
            continue
        args = qscheme.weights
        scale, zero_point = calculate_qparams(*_weight_min_max(module.weight, args), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        quantized.append(name)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    # The oracle's weights: compressed-tensors' own decompression of what it just wrote.
    compressor.decompress_model(model)
    modules = dict(model.named_modules())
    return {name + ".weight": modules[name].weight.detach().clone() for name in quantized}


def write_dense(src_dir: str, dense_dir: str, dequantized: dict[str, torch.Tensor]) -> None:
    """src_dir's model in float32 with the given (dequantized) Linear weights. Its other tensors (embeddings,
    norms) are rounded to bf16 first, as build_ct_checkpoint stored them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16).float()
    params = dict(model.named_parameters())
    for name, value in dequantized.items():
        params[name].data.copy_(value)
    model.save_pretrained(dense_dir)
    for f in os.listdir(src_dir):  # tokenizer files, where the source has them
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(src_dir, f), dense_dir)


def quantization_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["quantization_config"]
