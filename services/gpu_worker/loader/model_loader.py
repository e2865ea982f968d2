"""Build a model on its target device and fill its weights: safetensors (memory-mapped, each rank reading
only its slice), or random values drawn on the device itself (benchmarks of real shapes)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from headrace.common.models.arch import ModelArch, arch_from_hf_config
from headrace.common.models.quant import QuantSpec
from headrace.common.models.source import WeightsLocation, load_hf_config
from headrace.services.gpu_worker.model.llama import LlamaForCausalLM
from headrace.services.gpu_worker.parallel import SINGLE, TPGroup

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    arch: ModelArch
    hf_config: Any
    dtype: torch.dtype


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU (exact, and what CPUs run fastest), bfloat16 on GPUs."""
    if requested == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[requested]


def safetensors_weights(folder: str) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) for every tensor of every shard; slices read only what is indexed."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def checkpoint_shapes(arch: ModelArch) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of an HF checkpoint of this shape, with its full (unsharded) shape."""
    h, i, q, kv, d = arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size, arch.head_dim
    yield "model.embed_tokens.weight", (arch.vocab_size, h)
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield p + f"self_attn.{name}.weight", (rows, h)
            if arch.qkv_bias:
                yield p + f"self_attn.{name}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (h, q)
        if arch.qk_norm:
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", (arch.vocab_size, h)


def random_weights(arch: ModelArch, seed: int, device: torch.device, dtype: torch.dtype
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors drawn on the device (no host round trip), N(0, 0.02) matrices and unit norms. Each
    tensor's generator is seeded from (seed, its index), so every TP rank slices the same full weights."""
    gen = torch.Generator(device=device)
    for index, (name, shape) in enumerate(checkpoint_shapes(arch)):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen.manual_seed(seed * 1_000_003 + index)
        yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def load_model(source: WeightsLocation, device: torch.device, dtype: torch.dtype, tp: TPGroup = SINGLE,
               seed: int = 0, quant: QuantSpec | None = None) -> LoadedModel:
    hf_config = load_hf_config(source)
    arch = arch_from_hf_config(hf_config)
    model = LlamaForCausalLM(arch, tp, dtype, device, quant)
    weights = random_weights(arch, seed, device, dtype) if source.kind == "random" else \
        safetensors_weights(source.weights_dir)
    missing = model.expected_parameter_names() - model.load_weights(weights)
    if missing:
        raise ValueError(f"checkpoint {source.weights_dir or source.preset} lacks {len(missing)} tensors, e.g. "
                         f"{sorted(missing)[:3]}")
    model.process_weights_after_loading()
    model.eval()
    if device.type == "cpu":
        model.use_cpu_weight_layout()
    return LoadedModel(model, arch, hf_config, dtype)


def export_hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our (TP=1) weights under transformers' names, merged projections split back and quantized linears
    dequantized (the HF oracle runs the same weights in float)."""
    arch = model.arch
    tensors = {name: p for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(name + ".") or k == name + ".bias"}
            tensors[name + ".weight"] = method.dense_weight(module)
    out: dict[str, torch.Tensor] = {}
    split = {
        "qkv_proj": (("q_proj", "k_proj", "v_proj"), [arch.q_size, arch.kv_size, arch.kv_size]),
        "gate_up_proj": (("gate_proj", "up_proj"), [arch.intermediate_size] * 2),
    }
    for name, p in tensors.items():
        hf = name if name.startswith("lm_head") else f"model.{name}"
        for merged, (parts, sizes) in split.items():
            if f".{merged}." in hf:
                for part, tensor in zip(parts, p.split(sizes, dim=0)):
                    out[hf.replace(merged, part)] = tensor
                break
        else:
            out[hf] = p
    if arch.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
