"""The decoder of every supported family (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, Falcon, Gemma 2/3) over
the paged KV cache.

Written once: QKV bias, QK-norm, LayerNorm, an ungated MLP, Falcon's parallel attention + MLP, the
mixture-of-experts block (model/moe.py) that replaces the MLP in Mixtral's and Qwen-MoE's MoE layers,
per-layer sliding windows and Gemma's differences (norms with offset around attention and MLP, GeGLU,
soft-capping, scaled embeddings, local RoPE) are switched on by ModelArch flags; other families' checkpoint names are mapped onto these modules by
loader/family_layouts. Q/K/V and gate/up are merged into single GEMMs at load. Everything a forward needs
for attention arrives in an explicit `ForwardContext`; no module keeps per-step state.
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
    ACTIVATIONS,
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    QKVParallelLinear,
    QuantizedLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    gelu_tanh_and_mul,
    silu_and_mul,
    store_k_major,
)
from headrace.services.gpu_worker.model.kv_scales import kv_scale_checkpoint_name, scale_value, set_kv_scale
from headrace.services.gpu_worker.model.moe import MoEBlock, moe_checkpoint_name, warm_up_fused_kernel
from headrace.services.gpu_worker.model.quant import linear_method
from headrace.services.gpu_worker.model.quant.gguf_weights import share_tied_dense
from headrace.services.gpu_worker.model.quant.unquantized import UnquantizedLinear
from headrace.services.gpu_worker.parallel import TPGroup
from headrace.services.gpu_worker.pipeline import StageLayers


def make_norm(arch: ModelArch, size: int, dtype: torch.dtype, device: torch.device) -> RMSNorm | LayerNorm:
    if arch.norm == "layer":
        return LayerNorm(size, arch.rms_norm_eps, dtype, device)
    return RMSNorm(size, arch.rms_norm_eps, dtype, device, arch.norm_offset)


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    kv_caches: list[KVCache]
    backend: AttentionBackend
    # [max_pos, head_dim]; for a model with a local RoPE base (Gemma 3) [2, max_pos, head_dim]: the global
    # table, then the one windowed layers use (rope.rope_cos_sin_cache builds both).
    cos_sin_cache: torch.Tensor


def layer_rope_table(cos_sin_cache: torch.Tensor, local: bool) -> torch.Tensor:
    """The [max_pos, head_dim] table one layer rotates with."""
    if cos_sin_cache.dim() == 2:
        return cos_sin_cache
    return cos_sin_cache[1 if local else 0]


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None, cache_index: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        # Which of this worker's KV caches is this layer's: a pipeline stage holds caches for its layers only.
        self.cache_index = layer_idx if cache_index is None else cache_index
        self.head_dim = arch.head_dim
        prefix = f"model.layers.{layer_idx}.self_attn."
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                          arch.qkv_bias, tp, dtype, device,
                                          linear_method(quant, [prefix + p for p in ("q_proj", "k_proj", "v_proj")]))
        self.num_heads, self.num_kv_heads = self.qkv_proj.local_heads
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.attn_out_bias, tp,
                                        dtype, device, linear_method(quant, [prefix + "o_proj"]))
        norm = arch.norm_offset
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, device, norm) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, device, norm) if arch.qk_norm else None
        self.scale = arch.attn_scale
        # Per-layer constants (CUDA graphs capture them): the window (None: global) and logit soft-cap.
        self.window = arch.layer_window(layer_idx)
        self.softcap = arch.attn_logit_softcap
        self.local_rope = arch.local_rope and arch.is_sliding_layer(layer_idx)
        # An fp8 KV cache's (k, v) scales: the checkpoint's (model/kv_scales.py), else 1.0; another cache ignores them.
        self.kv_scale: tuple[float, float] = (1.0, 1.0)

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
        q, k = ctx.backend.write_cache(q, k, v, positions, layer_rope_table(ctx.cos_sin_cache, self.local_rope),
                                       ctx.kv_caches[self.cache_index], ctx.attn.slot_mapping, self.kv_scale)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention over the paged cache; [T, heads * head_dim]."""
        out = ctx.backend.attend(q, k, v, ctx.kv_caches[self.cache_index], ctx.attn, self.scale,
                                 window=self.window, softcap=self.softcap, kv_scale=self.kv_scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.project_qkv(positions, x, ctx)
        return self.o_proj(self.attend(q, k, v, ctx))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None):
        super().__init__()
        i, bias = arch.intermediate_size, arch.mlp_bias
        prefix = f"model.layers.{layer_idx}.mlp."
        # Gated (SwiGLU): gate|up merged into one GEMM. Ungated (Falcon): up alone, then the activation.
        self.gate_up_proj = self.up_proj = None
        if arch.gated_mlp:
            self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [i, i], bias, tp, dtype, device,
                                                     linear_method(quant, [prefix + "gate_proj", prefix + "up_proj"]))
        else:
            self.up_proj = ColumnParallelLinear(arch.hidden_size, [i], bias, tp, dtype, device,
                                                linear_method(quant, [prefix + "up_proj"]))
        self.activation = ACTIVATIONS[arch.mlp_activation]
        self.act_and_mul = gelu_tanh_and_mul if arch.mlp_activation == "gelu_tanh" else silu_and_mul
        self.down_proj = RowParallelLinear(i, arch.hidden_size, bias, tp, dtype, device,
                                           linear_method(quant, [prefix + "down_proj"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
        return self.down_proj(self.activation(self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 quant: QuantSpec | None = None, cache_index: int | None = None):
        super().__init__()
        h = arch.hidden_size
        self.input_layernorm = make_norm(arch, h, dtype, device)
        self.self_attn = LlamaAttention(arch, layer_idx, tp, dtype, device, quant, cache_index)
        # Parallel residual (Falcon): x + attn(norm(x)) + mlp(norm'(x)), norm' being input_layernorm itself
        # or, with separate_mlp_norm, mlp_layernorm. Sequential: the MLP reads post_attention_layernorm.
        self.parallel_residual = arch.parallel_residual
        self.post_attention_layernorm = None if arch.parallel_residual else make_norm(arch, h, dtype, device)
        self.mlp_layernorm = make_norm(arch, h, dtype, device) if arch.separate_mlp_norm else None
        # Gemma ("sandwich"): post_attention_layernorm normalises attention's output before the residual add,
        # and two more norms wrap the MLP.
        self.pre_feedforward_layernorm = make_norm(arch, h, dtype, device) if arch.sandwich_norms else None
        self.post_feedforward_layernorm = make_norm(arch, h, dtype, device) if arch.sandwich_norms else None
        self.mlp = MoEBlock(arch, tp, dtype, device) if arch.is_moe_layer(layer_idx) else \
            LlamaMLP(arch, layer_idx, tp, dtype, device, quant)

    # A layer in two halves around attention, so piecewise CUDA graphs can capture everything but attention.
    def before_attention(self, positions, x, residual, ctx: ForwardContext):
        """Input norm (fused with the residual add) and project_qkv; returns q, k, v, residual. With a
        parallel residual the MLP runs here too (it does not read attention's output) and its output is
        folded into the returned residual."""
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm(x, residual)
        q, k, v = self.self_attn.project_qkv(positions, normed, ctx)
        if self.parallel_residual:
            mlp_in = normed if self.mlp_layernorm is None else self.mlp_layernorm(residual)
            residual = residual + self.mlp(mlp_in)
        return q, k, v, residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        """Output projection, post-attention norm (fused add) and the MLP; returns (x, residual). With a
        parallel residual the MLP already ran: attention's output is this layer's x."""
        out = self.self_attn.o_proj(attn_out)
        if self.parallel_residual:
            return out, residual
        if self.pre_feedforward_layernorm is not None:
            x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(out), residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        x, residual = self.post_attention_layernorm(out, residual)
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
                 quant: QuantSpec | None = None, stage: StageLayers | None = None):
        super().__init__()
        self.arch = arch
        # A pipeline stage builds its own layers only (self.layers[k] is layer start + k), the embedding on the
        # first stage and the final norm and LM head on the last (which, with tied embeddings, also holds
        # the embedding: it is the LM head's weight).
        stage = stage or StageLayers()
        self.start_layer, self.end_layer = stage.start, stage.stop(arch.num_layers)
        self.is_first_stage, self.is_last_stage = stage.is_first, stage.is_last(arch.num_layers)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp, dtype, device) \
            if self.is_first_stage or (self.is_last_stage and arch.tie_word_embeddings) else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, tp, dtype, device, quant, i - self.start_layer)
                                    for i in range(self.start_layer, self.end_layer))
        self.embed_scale = float(torch.tensor(arch.hidden_size ** 0.5, dtype=dtype)) if arch.scale_embeddings \
            else None
        if not self.is_last_stage:
            self.norm = self.lm_head = None
            return
        self.norm = make_norm(arch, arch.hidden_size, dtype, device)
        if quant is not None and quant.kind == "gguf" and quant.is_quantized("lm_head"):
            self.lm_head = QuantizedLMHead(arch.vocab_size, arch.hidden_size, tp, dtype, device,
                                           linear_method(quant, ["lm_head"]))
        else:
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp, dtype, device)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states; on a stage before the last, [2, tokens, hidden]: the last layer's output
        and the residual stream for the next stage, which passes them back in as `intermediate` (a stage
        after the first given none, as when profiling memory, starts from zeros)."""
        ctx.backend.prepare(ctx.attn)
        if self.is_first_stage:
            x, residual = self.embed(input_ids), None
        else:
            if intermediate is None:
                intermediate = torch.zeros(2, input_ids.shape[0], self.arch.hidden_size, device=input_ids.device,
                                           dtype=self.layers[0].input_layernorm.weight.dtype)
            x, residual = intermediate[0], intermediate[1]
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        if not self.is_last_stage:
            return torch.stack((x, residual))
        x, _ = self.norm(x, residual)
        return x

    def warm_up_experts(self, max_tokens: int) -> int:
        """Compile the fused MoE kernel's variants for steps of up to max_tokens tokens (CUDA; a dense model
        has none). Returns how many were run."""
        blocks = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]
        return warm_up_fused_kernel(blocks[0].experts, max_tokens) if blocks else 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input (piecewise graphs call it too)."""
        x = self.embed_tokens(input_ids)
        return x if self.embed_scale is None else x * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)
        cap = self.arch.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

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
            name = self._stage_name(hf_name.removeprefix("model."))
            if name is None or "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if (kv_scale := kv_scale_checkpoint_name(name)) is not None:
                self._load_kv_scale(*kv_scale, tensor)
                continue
            shard: Any = None
            moe = moe_checkpoint_name(name)
            if moe is not None:  # an MoE block's expert (into its layer's stack) or router
                name, shard = moe
            else:
                for hf_part, (ours, idx) in _MERGED.items():
                    if f".{hf_part}." in name and name not in params:  # an ungated MLP's up_proj is its own
                        name, shard = name.replace(hf_part, ours), idx
                        break
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
            param = params[name]
            param.weight_loader(param, tensor, shard)
            loaded.add(name)
        return loaded

    def _stage_name(self, name: str) -> str | None:
        """A checkpoint name as this pipeline stage holds it (its layers counted from its first), or None
        for a tensor another stage holds."""
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            k = int(idx) - self.start_layer
            return f"layers.{k}.{rest}" if 0 <= k < len(self.layers) else None
        top = name.split(".", 1)[0]
        if top == "embed_tokens" and self.embed_tokens is None:
            return None
        if top in ("norm", "lm_head") and not self.is_last_stage:
            return None
        return name

    def _load_kv_scale(self, layer_idx: int, which: str, loaded: Any) -> None:
        """A layer's K / V cache scale; layer_idx counts this stage's layers, as _stage_name renamed them
        (-1: a scale this engine does not use)."""
        if 0 <= layer_idx < len(self.layers):
            attn = self.layers[layer_idx].self_attn
            attn.kv_scale = set_kv_scale(attn.kv_scale, which, scale_value(loaded))

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
        if self.lm_head is not None and self.embed_tokens is not None:  # a GGUF's quantized copy of a tied head
            share_tied_dense(self.lm_head, self.embed_tokens.weight.data)
