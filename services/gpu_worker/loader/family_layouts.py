"""Checkpoint tensor names and fused layouts of the families whose checkpoints do not use Llama's names.

The model loads Llama-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...); `to_llama_names`
turns a Phi-3 or Falcon checkpoint's stream into that form, splitting fused tensors into their parts, and
`from_llama_names` does the reverse for the HF oracle (tests, `--baseline hf`). Families with Llama's names
pass through both unchanged.

- Phi-3 fuses q|k|v into `qkv_proj` and gate|up into `gate_up_proj`, one part after the other.
- Falcon fuses q, k and v per KV group: `query_key_value` holds, for each KV head, the query heads that
  share it, then its key head, then its value head. That one rule covers all three of its layouts:
  multi-query (one group: every query head, one key, one value), grouped (the new decoder architecture)
  and one KV head per query head (q, k, v interleaved head by head).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from headrace.common.models.arch import ModelArch

# Falcon's names for Llama's modules, inside a layer and outside.
_FALCON_LAYER = {
    "self_attention.dense.": "self_attn.o_proj.",
    "mlp.dense_h_to_4h.": "mlp.up_proj.",
    "mlp.dense_4h_to_h.": "mlp.down_proj.",
    "input_layernorm.": "input_layernorm.",
    "post_attention_layernorm.": "post_attention_layernorm.",
}
_FALCON_GLOBAL = {
    "transformer.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_f.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
}


def _falcon_layer_names(arch: ModelArch) -> dict[str, str]:
    """With two norms in the new decoder architecture, ln_attn is the input norm and ln_mlp the MLP's."""
    names = dict(_FALCON_LAYER)
    if arch.separate_mlp_norm:
        names.update({"ln_attn.": "input_layernorm.", "ln_mlp.": "mlp_layernorm."})
    return names


def to_llama_names(arch: ModelArch, weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The checkpoint's (name, tensor or safetensors slice) stream under Llama's names, fused tensors split."""
    if arch.model_type == "phi3":
        yield from _phi3_to_llama(arch, weights)
    elif arch.model_type == "falcon":
        yield from _falcon_to_llama(arch, weights)
    else:
        yield from weights


def from_llama_names(arch: ModelArch, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama-named full tensors under the family's own names, fused again (the inverse of to_llama_names)."""
    if arch.model_type == "phi3":
        return _llama_to_phi3(arch, tensors)
    if arch.model_type == "falcon":
        return _llama_to_falcon(arch, tensors)
    return tensors


def _fused_kind(name: str, fused: str) -> str:
    """'weight' or 'bias' for a fused tensor; packed quantized tensors have other layouts and are refused."""
    kind = name.rsplit(".", 1)[-1]
    if kind not in ("weight", "bias"):
        raise ValueError(f"checkpoint tensor {name!r}: quantized {fused} tensors are not supported")
    return kind


def _phi3_parts(arch: ModelArch) -> dict[str, tuple[tuple[str, ...], list[int]]]:
    return {"qkv_proj": (("q_proj", "k_proj", "v_proj"), [arch.q_size, arch.kv_size, arch.kv_size]),
            "gate_up_proj": (("gate_proj", "up_proj"), [arch.intermediate_size] * 2)}


def _phi3_to_llama(arch: ModelArch, weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    parts = _phi3_parts(arch)
    for name, tensor in weights:
        fused = next((f for f in parts if f".{f}." in name), None)
        if fused is None:
            yield name, tensor
            continue
        _fused_kind(name, fused)
        start = 0
        for part, rows in zip(*parts[fused]):
            # A safetensors slice reads only these rows; the model then keeps this rank's share of them.
            yield name.replace(fused, part), tensor[start : start + rows]
            start += rows


def _llama_to_phi3(arch: ModelArch, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for fused, (part_names, _) in _phi3_parts(arch).items():
        for name in [n for n in tensors if f".{part_names[0]}." in n]:
            out[name.replace(part_names[0], fused)] = torch.cat(
                [out.pop(name.replace(part_names[0], p)) for p in part_names])
    return out


def _falcon_groups(arch: ModelArch) -> tuple[int, int]:
    """(KV groups, rows of heads per group: its query heads, then one key and one value head)."""
    return arch.num_kv_heads, arch.num_heads // arch.num_kv_heads + 2


def _falcon_split_qkv(arch: ModelArch, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, per_group = _falcon_groups(arch)
    grouped = fused.reshape(groups, per_group, arch.head_dim, *fused.shape[1:])
    flat = (-1, *fused.shape[1:])
    return (grouped[:, :-2].reshape(flat), grouped[:, -2].reshape(flat).contiguous(),
            grouped[:, -1].reshape(flat).contiguous())


def _falcon_to_llama(arch: ModelArch, weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    layer_names = _falcon_layer_names(arch)
    for name, tensor in weights:
        if name in _FALCON_GLOBAL or "rotary_emb." in name:  # a saved inv_freq buffer: the model skips it
            yield _FALCON_GLOBAL.get(name, name), tensor
            continue
        prefix, _, rest = name.partition(".h.")
        index, _, local = rest.partition(".")
        if prefix != "transformer" or not index.isdigit():
            raise ValueError(f"checkpoint tensor {name!r} is not a Falcon tensor headrace knows")
        ours = f"model.layers.{index}."
        if local.startswith("self_attention.query_key_value."):
            kind = _fused_kind(name, "query_key_value")
            # The groups interleave q, k and v rows, so the whole tensor is read (one layer's, once).
            full = tensor if isinstance(tensor, torch.Tensor) else tensor[:]
            for part, t in zip(("q_proj", "k_proj", "v_proj"), _falcon_split_qkv(arch, full)):
                yield f"{ours}self_attn.{part}.{kind}", t
            continue
        old = next((o for o in layer_names if local.startswith(o)), None)
        if old is None:
            raise ValueError(f"checkpoint tensor {name!r} is not a Falcon tensor headrace knows")
        yield ours + layer_names[old] + local[len(old):], tensor


def _llama_to_falcon(arch: ModelArch, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ours_to_falcon = {v: k for k, v in _falcon_layer_names(arch).items()}
    globals_ = {v: k for k, v in _FALCON_GLOBAL.items()}
    groups, per_group = _falcon_groups(arch)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in globals_:
            out[globals_[name]] = t
            continue
        index, _, local = name.removeprefix("model.layers.").partition(".")
        falcon = f"transformer.h.{index}."
        if local.startswith("self_attn.q_proj."):
            kind = local.rsplit(".", 1)[-1]
            q = t.reshape(groups, per_group - 2, arch.head_dim, *t.shape[1:])
            k, v = (tensors[name.replace("q_proj", p)].reshape(groups, 1, arch.head_dim, *t.shape[1:])
                    for p in ("k_proj", "v_proj"))
            out[f"{falcon}self_attention.query_key_value.{kind}"] = torch.cat([q, k, v], 1).reshape(-1, *t.shape[1:])
        elif not local.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            old = next(o for o in ours_to_falcon if local.startswith(o))
            out[falcon + ours_to_falcon[old] + local[len(old):]] = t
    return out
