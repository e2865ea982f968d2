"""Build a model on its target device and fill its weights: safetensors (memory-mapped, each rank reading
only its slice), or random values drawn on the device itself (benchmarks of real shapes)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from services.gpu_worker.loader.source import ModelSource
from services.gpu_worker.model.arch import ModelArch, arch_from_hf_config
from services.gpu_worker.model.llama import LlamaForCausalLM
from services.gpu_worker.parallel import SINGLE, TPGroup

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


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Draw weights on the model's device (no host round trip): N(0, 0.02) matrices, unit norms."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:  # matrices and biases
            p.normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, tp: TPGroup = SINGLE,
               seed: int = 0) -> LoadedModel:
    hf_config = source.hf_config()
    arch = arch_from_hf_config(hf_config)
    model = LlamaForCausalLM(arch, tp, dtype, device)
    if source.kind == "random":
        init_random_weights(model, seed)
    else:
        loaded = model.load_weights(safetensors_weights(source.config_dir))
        missing = model.expected_parameter_names() - loaded
        if missing:
            raise ValueError(f"checkpoint in {source.config_dir} lacks {len(missing)} tensors, e.g. "
                             f"{sorted(missing)[:3]}")
    model.eval()
    return LoadedModel(model, arch, hf_config, dtype)


def export_hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our (TP=1) weights under transformers' names, merged projections split back (for the HF oracle)."""
    arch = model.arch
    out: dict[str, torch.Tensor] = {}
    split = {
        "qkv_proj": (("q_proj", "k_proj", "v_proj"), [arch.q_size, arch.kv_size, arch.kv_size]),
        "gate_up_proj": (("gate_proj", "up_proj"), [arch.intermediate_size] * 2),
    }
    for name, p in model.named_parameters():
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
