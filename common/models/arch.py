"""The shape of a Llama-family decoder, read once from a transformers config.

One dataclass covers Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (QK-norm) and Gemma 2/3 (the Gemma flags
below); the model code branches only on the flags here, never on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_GEMMA_TYPES = ("gemma2", "gemma3_text")


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
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    # Keys a windowed layer attends to, its own included (None: no layer is windowed); see `layer_window`.
    sliding_window: int | None = None
    # Which layers are windowed (None: every layer), from `layer_types`; none is without sliding_window.
    window_layers: tuple[bool, ...] | None = None
    # Gemma 2/3. RMSNorm scales by (1 + w); norms around attention output and MLP (pre/post feed-forward);
    # GeGLU (tanh GELU) instead of SwiGLU; embeddings times sqrt(hidden); softmax scale
    # query_pre_attn_scalar ** -0.5; tanh soft-capping of attention and final logits (None: none).
    norm_offset: bool = False
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Gemma 3: windowed layers rotate with their own RoPE base (rope_parameters["sliding_attention"]).
    local_rope: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_limit(self) -> int:
        """The longest sequence served: the attention kernels honour each layer's window, so a windowed
        model serves its whole position range."""
        return self.max_position_embeddings

    def is_sliding_layer(self, layer_idx: int) -> bool:
        """Whether the config makes this layer a windowed ("local") one, window set or not."""
        return self.window_layers is None or self.window_layers[layer_idx]

    def layer_window(self, layer_idx: int) -> int | None:
        """The attention window of one layer (None: global attention)."""
        return self.sliding_window if self.sliding_window and self.is_sliding_layer(layer_idx) else None

    @property
    def kv_window(self) -> int | None:
        """The window when every layer has it (Mistral v0.1): no layer then reads a key before it, so its KV
        blocks can be freed as a sequence grows. None where any layer is global."""
        windows = {self.layer_window(i) for i in range(self.num_layers)}
        return self.sliding_window if windows == {self.sliding_window} and self.sliding_window else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        norms = (4 if self.sandwich_norms else 2) * h
        layer = attn + 3 * h * i + norms + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h


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
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; headrace serves {', '.join(SUPPORTED_MODEL_TYPES)}")
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    window = getattr(hf_config, "sliding_window", None)
    window = window if window and getattr(hf_config, "use_sliding_window", True) else None
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
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        # Qwen2 configs carry a window they only use with use_sliding_window.
        sliding_window=window,
        window_layers=_window_layers(hf_config),
        **(_gemma_fields(hf_config) if model_type in _GEMMA_TYPES else {}),
    )


def _window_layers(hf_config) -> tuple[bool, ...] | None:
    """Per layer, whether it attends within the window: `layer_types` says so where a config has it
    (Gemma 2/3, Qwen2 past max_window_layers); without it every layer is windowed (Mistral v0.1)."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        return None
    return tuple(t == "sliding_attention" for t in layer_types)


def _gemma_fields(hf_config) -> dict:
    activation = getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"hidden_activation {activation!r} is not supported (gelu_pytorch_tanh is)")
    return dict(
        norm_offset=True, sandwich_norms=True, mlp_activation="gelu_tanh", scale_embeddings=True,
        query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
        attn_logit_softcap=getattr(hf_config, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(hf_config, "final_logit_softcapping", None),
        local_rope=hf_config.model_type == "gemma3_text",
    )
