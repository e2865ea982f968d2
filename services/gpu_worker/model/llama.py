"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

Written once: QKV bias and QK-norm are switched on by ModelArch flags. Q/K/V and gate/up are merged
into single GEMMs at load. Everything a forward needs for attention arrives in an explicit
`ForwardContext`; no module keeps per-step state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata, KVCache
from headrace.common.models.arch import ModelArch
from headrace.common.models.quant import QuantSpec
from headrace.services.gpu_worker.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    QuantizedLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    silu_and_mul,
    store_k_major,
)
from headrace.services.gpu_worker.model.quant import linear_method
from headrace.services.gpu_worker.model.quant.unquantized import UnquantizedLinear
from headrace.services.gpu_worker.parallel import TPGroup


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_caches: list[KVCache]
    backend: AttentionBackend
    cos_sin_cache: torch.Tensor


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = arch.head_dim
        prefix = f"model.layers.{layer_idx}.self_attn."
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                          arch.qkv_bias, tp, dtype, device,
                                          linear_method(quant, [prefix + p for p in ("q_proj", "k_proj", "v_proj")]))
        self.num_heads, self.num_kv_heads = self.qkv_proj.local_heads
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, False, tp, dtype, device,
                                        linear_method(quant, [prefix + "o_proj"]))
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        self.scale = arch.head_dim ** -0.5

    def project_qkv(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext):
        """QKV projection, QK-norm, RoPE and the KV-cache write: everything before attention, all of it
        shaped by the token count alone. Returns q, k, v [T, heads, head_dim] after RoPE."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.backend.write_cache(q, k, v, positions, ctx.cos_sin_cache, ctx.kv_caches[self.layer_idx],
                                       ctx.attn.slot_mapping)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention over the paged cache; [T, heads * head_dim]."""
        out = ctx.backend.attend(q, k, v, ctx.kv_caches[self.layer_idx], ctx.attn, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.project_qkv(positions, x, ctx)
        return self.o_proj(self.attend(q, k, v, ctx))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None):
        super().__init__()
        i = arch.intermediate_size
        prefix = f"model.layers.{layer_idx}.mlp."
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [i, i], False, tp, dtype, device,
                                                 linear_method(quant, [prefix + "gate_proj", prefix + "up_proj"]))
        self.down_proj = RowParallelLinear(i, arch.hidden_size, False, tp, dtype, device,
                                           linear_method(quant, [prefix + "down_proj"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(arch, layer_idx, tp, dtype, device, quant)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(arch, layer_idx, tp, dtype, device, quant)

    # A layer in two halves around attention, so piecewise CUDA graphs can capture everything but attention.
    def before_attention(self, positions, x, residual, ctx: ForwardContext):
        """Input norm (fused with the residual add) and project_qkv; returns q, k, v, residual."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        q, k, v = self.self_attn.project_qkv(positions, x, ctx)
        return q, k, v, residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        """Output projection, post-attention norm (fused add) and the MLP; returns (x, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return self.mlp(x), residual

    def forward(self, positions, x, residual, ctx: ForwardContext):
        q, k, v, residual = self.before_attention(positions, x, residual, ctx)
        return self.after_attention(self.self_attn.attend(q, k, v, ctx), residual)


# HF checkpoint names that land in one of our merged parameters: (our name, shard index).
_MERGED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None):
        super().__init__()
        self.arch = arch
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, tp, dtype, device, quant)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        if quant is not None and quant.kind == "gguf" and quant.is_quantized("lm_head"):
            self.lm_head = QuantizedLMHead(arch.vocab_size, arch.hidden_size, tp, dtype, device,
                                           linear_method(quant, ["lm_head"]))
        else:
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp, dtype, device)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ctx.backend.prepare(ctx.attn)
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def use_cpu_weight_layout(self) -> int:
        """After loading, on a CPU: the attention projections (q|k|v, o) and the LM head K-major
        (layers.store_k_major); the MLP keeps its layout. Returns the number of weights relaid.

        Why these: CPU BLAS streams a K-major weight faster for one row and as fast for eight, but the MLP's
        products would lose at eight rows what they gain at one (per-product timings: docs/benchmarks.md,
        fourth session). cuBLAS has no such gap, so GPUs keep the loaded layout. A single-row product may
        round differently in the last bits (another summation order)."""
        attn = [m for layer in self.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj)
                if isinstance(m.quant_method, UnquantizedLinear)]
        head = [self.lm_head] if isinstance(self.lm_head, ParallelLMHead) else []
        return store_k_major([*attn, *head])

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Load HF-named weights (tensors or safetensors slices); returns the parameter names filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            shard: int | None = None
            for hf_part, (ours, idx) in _MERGED.items():
                if f".{hf_part}." in name:
                    name, shard = name.replace(hf_part, ours), idx
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
            param = params[name]
            param.weight_loader(param, tensor, shard)
            loaded.add(name)
        return loaded

    def expected_parameter_names(self) -> set[str]:
        """Every parameter a checkpoint must fill (tensors some checkpoints of a format lack are optional)."""
        names = {name for name, p in self.named_parameters() if not getattr(getattr(p, "tensor_layout", None),
                                                                                  "optional", False)}
        if self.arch.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names

    def process_weights_after_loading(self) -> None:
        """Quantized linears turn their checkpoint tensors into the layout their kernels read."""
        for module in self.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_after_loading(module)
