"""The shape of a decoder, read once from a transformers config.

One dataclass covers Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (QK-norm), Phi-3 (fused checkpoint
tensors, LongRoPE) and Falcon (LayerNorm, GELU MLP, attention and MLP in parallel); the model code branches
only on the flags here, never on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "falcon")
# The `architectures` entry of config.json for each model type above (what users see on a model card).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM", "FalconForCausalLM")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float  # the norms' epsilon (LayerNorm's too, where `norm` is "layer")
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    # Tokens of full attention the model supports (None: every position); see `context_limit`.
    sliding_window: int | None = None
    # Falcon's decoder: LayerNorm with bias instead of RMSNorm, a plain (ungated) GELU MLP, attention and MLP
    # both reading the layer's input (parallel_residual; with separate_mlp_norm the MLP has its own norm of it),
    # and biases on the output and MLP projections.
    norm: str = "rms"  # "rms" or "layer"
    gated_mlp: bool = True  # down(silu(gate) * up) when True, else down(act(up))
    mlp_activation: str = "silu"  # "silu" or "gelu" (exact erf GELU)
    parallel_residual: bool = False
    separate_mlp_norm: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    # LongRoPE (Phi-3): a sequence longer than this uses the long rotary factors, a shorter one the short ones.
    longrope_original_max: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_limit(self) -> int:
        """The longest sequence served exactly: the attention kernels have no window yet, so a windowed
        model is capped at its window (full attention inside it is what the model computes there)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        attn += h if self.attn_out_bias else 0
        mlp = (3 if self.gated_mlp else 2) * h * i + ((i * (2 if self.gated_mlp else 1) + h) if self.mlp_bias else 0)
        norms = 1 if self.parallel_residual and not self.separate_mlp_norm else 2
        norm_params = norms * h * (2 if self.norm == "layer" else 1)
        layer = attn + mlp + norm_params + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h * (2 if self.norm == "layer" else 1)


def check_tp_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Tensor parallelism splits query heads evenly, and KV heads evenly or by replication."""
    if num_heads % tp_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} must divide the model's {num_heads} attention heads")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"--tensor-parallel-size {tp_size} must divide, or be a multiple of, the model's "
                         f"{num_kv_heads} key/value heads")


def arch_from_hf_config(hf_config) -> ModelArch:
    """Build a ModelArch from a `transformers.PretrainedConfig` (or anything with the same attributes)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        named = ", ".join(getattr(hf_config, "architectures", None) or []) or "no architectures entry"
        raise UnsupportedModelError(
            f"model architecture {named} (model_type {model_type!r}) is not supported; headrace serves "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    _check_rotary(hf_config)
    if model_type == "falcon":
        return _falcon_arch(hf_config)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    window = getattr(hf_config, "sliding_window", None)
    return ModelArch(
        model_type=model_type,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # Qwen2 always carries q/k/v biases; Llama-style configs say so with attention_bias.
        qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        # Qwen2 configs carry a window they only use with use_sliding_window.
        sliding_window=window if window and getattr(hf_config, "use_sliding_window", True) else None,
        longrope_original_max=_longrope_original_max(hf_config),
    )


def _falcon_arch(hf_config) -> ModelArch:
    """Falcon's two layouts: the original (7B: multi-query, attention and MLP in parallel off one LayerNorm)
    and `new_decoder_architecture` (40B/180B: grouped KV, a LayerNorm each for attention and MLP)."""
    if getattr(hf_config, "alibi", False):
        raise UnsupportedModelError("Falcon with ALiBi position biases (config.json \"alibi\": true) is not "
                                    "supported; headrace serves the rotary Falcon models")
    new_arch = bool(hf_config.new_decoder_architecture)
    parallel = new_arch or bool(hf_config.parallel_attn)
    # transformers' FalconDecoderLayer: the new layout has two norms unless num_ln_in_parallel_attn says 1.
    two_norms = new_arch and (getattr(hf_config, "num_ln_in_parallel_attn", None) or 2) == 2
    num_heads = hf_config.num_attention_heads
    if new_arch or not hf_config.multi_query:
        num_kv_heads = hf_config.num_kv_heads or num_heads
    else:
        num_kv_heads = 1
    bias = bool(hf_config.bias)
    return ModelArch(
        model_type="falcon",
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.ffn_hidden_size or 4 * hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hf_config.hidden_size // num_heads,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=hf_config.layer_norm_epsilon,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        qkv_bias=bias,
        qk_norm=False,
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        norm="layer",
        gated_mlp=False,
        mlp_activation=_falcon_activation(getattr(hf_config, "activation", "gelu")),
        parallel_residual=parallel,
        separate_mlp_norm=parallel and two_norms,
        attn_out_bias=bias,
        mlp_bias=bias,
    )


def _falcon_activation(name: str) -> str:
    if name != "gelu":
        raise UnsupportedModelError(f"Falcon activation {name!r} is not supported (headrace runs \"gelu\")")
    return name


def _rope_parameters(hf_config) -> dict:
    return getattr(hf_config, "rope_parameters", None) or {}


def _check_rotary(hf_config) -> None:
    """The attention kernels rotate the whole head: a partial rotary factor is refused by name."""
    factor = _rope_parameters(hf_config).get("partial_rotary_factor",
                                             getattr(hf_config, "partial_rotary_factor", 1.0))
    if factor not in (None, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor {factor} is not supported (rotary over the whole "
                                    "head only)")


def _longrope_original_max(hf_config) -> int | None:
    """Where LongRoPE switches from the short to the long factors (None: the model has no LongRoPE).
    transformers reads "su" and "yarn" in old Phi-3 configs as longrope; its config says which."""
    params = _rope_parameters(hf_config)
    if params.get("rope_type") != "longrope":
        return None
    return int(params.get("original_max_position_embeddings")
               or getattr(hf_config, "original_max_position_embeddings", None) or hf_config.max_position_embeddings)
