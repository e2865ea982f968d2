"""The shape of a Llama-family decoder, read once from a transformers config.

One dataclass covers Llama 2/3, Mistral, Qwen2 (QKV bias) and Qwen3 (QK-norm); the model code branches
only on the flags here, never on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
    # Tokens of full attention the model supports (None: every position); see `context_limit`.
    sliding_window: int | None = None

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
        layer = attn + 3 * h * i + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
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
    )
