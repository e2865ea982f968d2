"""The shape of a decoder, read once from a transformers config.

One dataclass covers Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (QK-norm), Phi-3 (fused checkpoint
tensors, LongRoPE), Falcon (LayerNorm, GELU MLP, attention and MLP in parallel) and the mixture-of-experts
families Mixtral, Qwen2-MoE and Qwen3-MoE (`num_experts` > 0: a routed MoE block replaces the MLP in the
layers `is_moe_layer` names), and Gemma 2/3 (the Gemma flags below); the model code branches only on the flags here, never on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_GEMMA_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "falcon", *MOE_MODEL_TYPES, *_GEMMA_TYPES)
# The `architectures` entry of config.json for each model type above (what users see on a model card).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM", "FalconForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                           "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


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
    # Keys a windowed layer attends to, its own included (None: no layer is windowed); see `layer_window`.
    sliding_window: int | None = None
    # Which layers are windowed (None: every layer), from `layer_types`; none is without sliding_window.
    window_layers: tuple[bool, ...] | None = None
    # Falcon's decoder: LayerNorm with bias instead of RMSNorm, a plain (ungated) GELU MLP, attention and MLP
    # both reading the layer's input (parallel_residual; with separate_mlp_norm the MLP has its own norm of it),
    # and biases on the output and MLP projections.
    norm: str = "rms"  # "rms" or "layer"
    gated_mlp: bool = True  # down(silu(gate) * up) when True, else down(act(up))
    mlp_activation: str = "silu"  # "silu", "gelu" (exact erf GELU) or "gelu_tanh" (Gemma's GeGLU gate)
    parallel_residual: bool = False
    separate_mlp_norm: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    # LongRoPE (Phi-3): a sequence longer than this uses the long rotary factors, a shorter one the short ones.
    longrope_original_max: int | None = None
    # Mixture of experts (0 experts: a dense MLP in every layer). Each token goes to its top `num_experts_per_tok`
    # experts by softmax score, weighted by those scores (renormalised to sum to 1 when `norm_topk_prob`).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # Qwen2-MoE's shared expert (0: none): a dense MLP every token runs, scaled by sigmoid(its own gate).
    shared_expert_intermediate_size: int = 0
    # Which layers are MoE (Qwen2/3-MoE): every `decoder_sparse_step`-th one, except `mlp_only_layers`.
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Gemma 2/3. RMSNorm scales by (1 + w); norms around attention output and MLP (pre/post feed-forward);
    # GeGLU (mlp_activation "gelu_tanh"); embeddings times sqrt(hidden); softmax scale
    # query_pre_attn_scalar ** -0.5; tanh soft-capping of attention and final logits (None: none).
    norm_offset: bool = False
    sandwich_norms: bool = False
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

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0
                and layer not in self.mlp_only_layers)

    def num_params(self, experts_read: float | None = None) -> int:
        """Parameter count (embeddings included once when tied). `experts_read`: count only that many
        experts per MoE layer (`num_active_params` passes top-k, a benchmark the mean a batch reads);
        None counts them all."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        attn += h if self.attn_out_bias else 0
        dense = (3 if self.gated_mlp else 2) * h * i + ((i * (2 if self.gated_mlp else 1) + h) if self.mlp_bias else 0)
        norms = 1 if self.parallel_residual and not self.separate_mlp_norm else (4 if self.sandwich_norms else 2)
        norm_params = norms * h * (2 if self.norm == "layer" else 1)
        layer = attn + norm_params + (2 * self.head_dim if self.qk_norm else 0)
        experts = self.num_experts if experts_read is None else experts_read
        moe = (self.num_experts * h + experts * 3 * h * self.moe_intermediate_size  # router + experts
               + (3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0))
        mlps = sum(moe if self.is_moe_layer(n) else dense for n in range(self.num_layers))
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return round(self.num_layers * layer + mlps + embed + h * (2 if self.norm == "layer" else 1))

    def num_active_params(self) -> int:
        """Parameters one token's forward reads: attention, the router, its top-k experts, the shared expert.
        Equal to num_params for a dense model."""
        return self.num_params(experts_read=self.num_experts_per_tok)


def check_tp_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Tensor parallelism splits query heads evenly, and KV heads evenly or by replication."""
    if num_heads % tp_size:
        raise ValueError(f"--tensor-parallel-size {tp_size} must divide the model's {num_heads} attention heads")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"--tensor-parallel-size {tp_size} must divide, or be a multiple of, the model's "
                         f"{num_kv_heads} key/value heads")


def check_tp_experts(arch: ModelArch, tp_size: int) -> None:
    """Tensor parallelism splits every expert's (and the shared expert's) intermediate dimension evenly."""
    for what, size in (("experts'", arch.moe_intermediate_size),
                       ("shared expert's", arch.shared_expert_intermediate_size)):
        if size % tp_size:
            raise ValueError(f"--tensor-parallel-size {tp_size} must divide the model's {what} intermediate size "
                             f"{size}")


def check_supported(model_type: str | None, architectures: list[str] | None) -> None:
    """A config.json's model is one headrace serves, or an error naming it and listing those it serves (checked
    on the raw file too, before transformers, which stops at a model type it does not know with its own words)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        named = ", ".join(architectures or []) or "no architectures entry"
        raise UnsupportedModelError(
            f"model architecture {named} (model_type {model_type!r}) is not supported; headrace serves "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def arch_from_hf_config(hf_config) -> ModelArch:
    """Build a ModelArch from a `transformers.PretrainedConfig` (or anything with the same attributes)."""
    model_type = getattr(hf_config, "model_type", None)
    check_supported(model_type, getattr(hf_config, "architectures", None))
    _check_rotary(hf_config)
    if model_type == "falcon":
        return _falcon_arch(hf_config)
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
        qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        or (model_type == "qwen2_moe" and bool(getattr(hf_config, "qkv_bias", True))),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        # Qwen2 configs carry a window they only use with use_sliding_window.
        sliding_window=window,
        window_layers=_window_layers(hf_config),
        longrope_original_max=_longrope_original_max(hf_config),
        **_moe_fields(hf_config, model_type),
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


def _moe_fields(hf_config, model_type: str) -> dict:
    """ModelArch's mixture-of-experts fields: Mixtral names its experts `num_local_experts` and sizes them
    with `intermediate_size`; Qwen2/3-MoE use `num_experts` and `moe_intermediate_size` (transformers 5 maps
    Qwen3-MoE's to `num_local_experts` too). Mixtral always renormalises its top-k weights."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    num_experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", 0)
    mixtral = model_type == "mixtral"
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        moe_intermediate_size=hf_config.intermediate_size if mixtral else hf_config.moe_intermediate_size,
        norm_topk_prob=True if mixtral else bool(getattr(hf_config, "norm_topk_prob", False)),
        shared_expert_intermediate_size=getattr(hf_config, "shared_expert_intermediate_size", 0) or 0,
        decoder_sparse_step=getattr(hf_config, "decoder_sparse_step", 1) or 1,
        mlp_only_layers=tuple(getattr(hf_config, "mlp_only_layers", None) or ()),
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
