"""Build a model on its target device and fill its weights: safetensors (memory-mapped, each rank reading
only its slice), or random values drawn on the device itself (benchmarks of real shapes)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from headrace.common.models.arch import ModelArch, arch_from_hf_config
from headrace.common.models.quant import QuantSpec
from headrace.common.models.source import WeightsLocation, load_hf_config
from headrace.services.gpu_worker.loader.family_layouts import from_llama_names, to_llama_names
from headrace.services.gpu_worker.model.llama import LlamaForCausalLM
from headrace.services.gpu_worker.parallel import SINGLE, TPGroup
from headrace.services.gpu_worker.pipeline import StageLayers

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
    """Every tensor of an HF checkpoint of this shape (under Llama's names), with its full (unsharded) shape."""
    h, i, q, kv, d = arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size, arch.head_dim
    yield "model.embed_tokens.weight", (arch.vocab_size, h)
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        norms = ["input_layernorm"] + ([] if arch.parallel_residual else ["post_attention_layernorm"])
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if arch.sandwich_norms else []
        yield from _norm_shapes(arch, [p + norm for norm in norms])
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield p + f"self_attn.{name}.weight", (rows, h)
            if arch.qkv_bias:
                yield p + f"self_attn.{name}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (h, q)
        if arch.attn_out_bias:
            yield p + "self_attn.o_proj.bias", (h,)
        if arch.qk_norm:
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        if arch.separate_mlp_norm:
            yield from _norm_shapes(arch, [p + "mlp_layernorm"])
        if arch.is_moe_layer(n):
            yield from _moe_shapes(arch, p + "mlp.")
        else:
            yield from _mlp_shapes(arch, p + "mlp.", h, i)
    yield from _norm_shapes(arch, ["model.norm"])
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", (arch.vocab_size, h)


def _norm_shapes(arch: ModelArch, norms: list[str]) -> Iterator[tuple[str, tuple[int, ...]]]:
    for norm in norms:
        yield norm + ".weight", (arch.hidden_size,)
        if arch.norm == "layer":
            yield norm + ".bias", (arch.hidden_size,)


def _mlp_shapes(arch: ModelArch, prefix: str, h: int, i: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """A dense MLP's tensors: gate (when gated), up and down, with biases where the model has them."""
    for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        if name != "gate_proj" or arch.gated_mlp:
            yield prefix + f"{name}.weight", shape
            if arch.mlp_bias:
                yield prefix + f"{name}.bias", shape[:1]


def _moe_shapes(arch: ModelArch, prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """An MoE block's tensors, the experts stacked as transformers 5 holds them (one tensor per layer)."""
    h, i, e = arch.hidden_size, arch.moe_intermediate_size, arch.num_experts
    yield prefix + "gate.weight", (e, h)
    yield prefix + "experts.gate_up_proj", (e, 2 * i, h)
    yield prefix + "experts.down_proj", (e, h, i)
    if arch.shared_expert_intermediate_size:
        yield from _mlp_shapes(arch, prefix + "shared_expert.", h, arch.shared_expert_intermediate_size)
        yield prefix + "shared_expert_gate.weight", (1, h)


def random_weights(arch: ModelArch, seed: int, device: torch.device, dtype: torch.dtype,
                   keep: Callable[[str], bool] | None = None, std: float = 0.02
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors drawn on the device (no host round trip), N(0, std) matrices and unit norms. Each
    tensor's generator is seeded from (seed, its index), so every TP rank slices the same full weights (and a
    pipeline stage, drawing only the tensors `keep` accepts, the same ones as a single stage)."""
    gen = torch.Generator(device=device)
    for index, (name, shape) in enumerate(checkpoint_shapes(arch)):
        if keep is not None and not keep(name):
            continue
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen.manual_seed(seed * 1_000_003 + index)
        yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)


@torch.no_grad()
def load_model(source: WeightsLocation, device: torch.device, dtype: torch.dtype, tp: TPGroup = SINGLE,
               seed: int = 0, quant: QuantSpec | None = None, stage: StageLayers | None = None,
               init_std: float = 0.02) -> LoadedModel:
    """The model (a pipeline stage's part of it when `stage` says so: other stages' tensors are skipped);
    `seed` and `init_std` draw a random preset's weights."""
    hf_config = load_hf_config(source)
    arch = arch_from_hf_config(hf_config)
    model = LlamaForCausalLM(arch, tp, dtype, device, quant, stage)
    keep = lambda name: model._stage_name(name.removeprefix("model.")) is not None  # noqa: E731
    weights = random_weights(arch, seed, device, dtype, keep, init_std) if source.kind == "random" else \
        to_llama_names(arch, safetensors_weights(source.weights_dir))
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
    """Our (TP=1) weights under transformers' names for the model's family, merged projections split back
    (or fused as the family's checkpoints fuse them) and quantized linears dequantized (the HF oracle runs
    the same weights in float)."""
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
        "gate_up_proj": (("gate_proj", "up_proj"), None),  # halves (a shared expert has its own size)
    }
    for name, p in tensors.items():
        hf = name if name.startswith("lm_head") else f"model.{name}"
        for merged, (parts, sizes) in split.items():
            if f".{merged}." in hf:
                for part, tensor in zip(parts, p.split(sizes or p.shape[0] // 2, dim=0)):
                    out[hf.replace(merged, part)] = tensor
                break
        else:
            out[hf] = p
    if arch.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return from_llama_names(arch, out)
