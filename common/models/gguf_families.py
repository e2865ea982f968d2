"""The GGUF architectures headrace converts, each as the transformers checkpoint it stands for: the
config.json its metadata describes, and the HF name and layout of each of its tensors.

Only architectures that transformers' own GGUF loader also reads are here, so that loader checks every
conversion (tests/common/models/test_gguf_families.py). What a file may carry that the loader cannot read
(Mixtral's experts in a `llama` file, Falcon's grouped-KV layout, Phi-3's LongRoPE factors, any RoPE scaling
other than Gemma 3's linear one) is refused by name rather than served unchecked. Where a fact is not in the
metadata, the value is the one llama.cpp, which wrote the file, runs with (Gemma's softmax scale, Gemma 3's
local RoPE base and window pattern, Qwen3-MoE's renormalised routing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


class GGUFConversionError(ValueError):
    pass


# GGUF per-layer tensor names -> HF names, for the Llama-shaped families (others override some).
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Gemma's four norms: GGUF's ffn_norm is the pre-MLP norm, its post-attention norm has its own name.
_GEMMA_LAYER = {**_LLAMA_LAYER, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
_PHI3_LAYER = {**_LLAMA_LAYER, "attn_qkv.weight": "self_attn.qkv_proj.weight",
               "ffn_up.weight": "mlp.gate_up_proj.weight"}
# Experts stacked per layer as transformers 5 holds them; gate and up are merged into gate_up_proj later.
_MOE_LAYER = {**_LLAMA_LAYER, "ffn_gate_inp.weight": "mlp.gate.weight",
              "ffn_gate_exps.weight": "mlp.experts.gate_proj", "ffn_up_exps.weight": "mlp.experts.up_proj",
              "ffn_down_exps.weight": "mlp.experts.down_proj",
              "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
              "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
              "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
              "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"}
_FALCON_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
    "attn_qkv.weight": "self_attention.query_key_value.weight",
    "attn_qkv.bias": "self_attention.query_key_value.bias",
    "attn_output.weight": "self_attention.dense.weight",
    "ffn_up.weight": "mlp.dense_h_to_4h.weight", "ffn_down.weight": "mlp.dense_4h_to_h.weight",
}
_FALCON_GLOBAL = {
    "token_embd.weight": "transformer.word_embeddings.weight",
    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class GGUFFamily:
    architecture: str  # general.architecture
    model_type: str  # config.json's model_type
    hf_class: str  # config.json's architectures entry
    layer_names: dict[str, str]
    global_names: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_GLOBAL))
    layer_prefix: str = "model.layers."
    # Whether its linears may stay quantized (gguf_convert's kept-quantized folder): the families whose
    # projections are separate, unfused and not experts, as the worker's quantized path needs them.
    keeps_quantized: bool = False

    def hf_name(self, gguf_name: str) -> str:
        if gguf_name in self.global_names:
            return self.global_names[gguf_name]
        parts = gguf_name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in self.layer_names:
            return f"{self.layer_prefix}{parts[1]}.{self.layer_names[parts[2]]}"
        raise GGUFConversionError(f"GGUF tensor {gguf_name!r} is not a {self.architecture} tensor headrace knows")


FAMILIES = {f.architecture: f for f in (
    GGUFFamily("llama", "llama", "LlamaForCausalLM", _LLAMA_LAYER, keeps_quantized=True),
    GGUFFamily("qwen2", "qwen2", "Qwen2ForCausalLM", _LLAMA_LAYER, keeps_quantized=True),
    GGUFFamily("qwen3", "qwen3", "Qwen3ForCausalLM", _LLAMA_LAYER, keeps_quantized=True),
    GGUFFamily("gemma2", "gemma2", "Gemma2ForCausalLM", _GEMMA_LAYER, keeps_quantized=True),
    GGUFFamily("gemma3", "gemma3_text", "Gemma3ForCausalLM", _GEMMA_LAYER, keeps_quantized=True),
    GGUFFamily("phi3", "phi3", "Phi3ForCausalLM", _PHI3_LAYER),
    GGUFFamily("falcon", "falcon", "FalconForCausalLM", _FALCON_LAYER, _FALCON_GLOBAL, "transformer.h."),
    GGUFFamily("qwen2moe", "qwen2_moe", "Qwen2MoeForCausalLM", _MOE_LAYER),
    GGUFFamily("qwen3moe", "qwen3_moe", "Qwen3MoeForCausalLM", _MOE_LAYER),
)}
SUPPORTED_GGUF_ARCHITECTURES = tuple(FAMILIES)


def field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_family(reader) -> GGUFFamily:
    arch = field_value(reader, "general.architecture")
    if arch not in FAMILIES:
        raise GGUFConversionError(f"GGUF architecture {arch!r} (general.architecture) is not supported; headrace "
                                  f"converts GGUF files of {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return FAMILIES[arch]


def hf_config_from_gguf(reader) -> dict:
    """config.json for the file: the fields every family shares, then its own."""
    family = gguf_family(reader)
    arch = family.architecture
    get = _getter(reader, arch)
    scaling = _rope_scaling(reader, arch)
    heads = int(get("attention.head_count", _REQUIRED))
    hidden = int(get("embedding_length", _REQUIRED))
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": [family.hf_class], "model_type": family.model_type,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length", 0)),
        "num_hidden_layers": int(get("block_count", _REQUIRED)), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", _REQUIRED)),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if scaling:
        config["rope_scaling"] = scaling
    config.update(_FAMILY_CONFIG[arch](get, names, config))
    if arch == "falcon":  # FalconConfig derives head_dim (a read-only property) and norms with layer_norm_epsilon
        del config["head_dim"], config["rms_norm_eps"]
    return config


_REQUIRED = object()


def _getter(reader, arch: str):
    """get(key, default) of the architecture's metadata; a missing key without a default is named."""
    def get(key: str, default=None):
        value = field_value(reader, f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise GGUFConversionError(f"GGUF file lacks the metadata key {arch}.{key}")
        return value
    return get


def _rope_scaling(reader, arch: str) -> dict | None:
    """Gemma 3 (4B and up) scales its global layers' RoPE linearly, which both llama.cpp and transformers' HF
    config express; any other scaling is refused (transformers' GGUF loader, the check on every conversion,
    ignores it, and headrace would not guess it)."""
    kind = field_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if arch == "gemma3" and kind == "linear":
        return {"rope_type": "linear", "factor": float(_getter(reader, arch)("rope.scaling.factor", _REQUIRED))}
    raise GGUFConversionError(f"GGUF {arch} with RoPE scaling ({arch}.rope.scaling.type {kind!r}) is not "
                              "supported; serve the model's HF folder instead")


def _llama(get, names, config) -> dict:
    if get("expert_count", 0):
        raise GGUFConversionError("GGUF llama with experts (llama.expert_count: Mixtral) is not supported "
                                  "(transformers' GGUF loader does not read it); serve the model's HF folder")
    return {"attention_bias": True} if "blk.0.attn_q.bias" in names else {}


def _no_extra(get, names, config) -> dict:
    return {}


def _gemma_scalar(config, layers_of_27b: int) -> int:
    """llama.cpp's softmax scale for Gemma: 1/sqrt(head_dim), but 1/sqrt(hidden/heads) for the 27B models, which
    it knows by their layer count (46 in Gemma 2, 62 in Gemma 3)."""
    if config["num_hidden_layers"] == layers_of_27b:
        return config["hidden_size"] // config["num_attention_heads"]  # integer division, as llama.cpp
    return config["head_dim"]


def _gemma2(get, names, config) -> dict:
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _gemma_scalar(config, 46),
            "sliding_window": int(get("attention.sliding_window", 4096)),
            "attn_logit_softcapping": get("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": get("final_logit_softcapping", 30.0),
            # llama.cpp windows every even layer (0, 2, ...) and attends globally in the odd ones.
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(config["num_hidden_layers"])]}


def _gemma3(get, names, config) -> dict:
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _gemma_scalar(config, 62),
            "sliding_window": int(get("attention.sliding_window", 4096)),
            "final_logit_softcapping": get("final_logit_softcapping"), "attn_logit_softcapping": None,
            # llama.cpp's Gemma 3: five windowed layers, then a global one; windowed layers rotate with base 1e4.
            "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                            for i in range(config["num_hidden_layers"])],
            "rope_local_base_freq": 10000.0}


def _phi3(get, names, config) -> dict:
    if any(n.startswith("rope_factors_") for n in names):
        raise GGUFConversionError("GGUF phi3 with LongRoPE factors (rope_factors_long/short) is not supported "
                                  "(transformers' GGUF loader does not read them); serve the model's HF folder")
    return {}


def _falcon(get, names, config) -> dict:
    """Falcon-7B's layout, the one transformers' GGUF loader reads: one KV head, attention and MLP in parallel
    off one LayerNorm. The grouped-KV layout (40B/180B: a second norm, attn_norm_2) is refused."""
    if config["num_key_value_heads"] != 1 or "blk.0.attn_norm_2.weight" in names:
        raise GGUFConversionError("GGUF falcon with grouped key/value heads (the 40B/180B layout) is not supported "
                                  "(transformers' GGUF loader does not read it); serve the model's HF folder")
    return {"num_kv_heads": 1, "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True,
            "alibi": False, "bias": "blk.0.attn_qkv.bias" in names,
            "layer_norm_epsilon": float(get("attention.layer_norm_epsilon", 1e-5)),
            "ffn_hidden_size": config["intermediate_size"] or 4 * config["hidden_size"]}


def _moe(get, names, config) -> dict:
    """Qwen2/3-MoE: experts from the metadata; a layer without a router is a dense one (mlp_only_layers)."""
    layers = range(config["num_hidden_layers"])
    extra = {"num_experts": int(get("expert_count", _REQUIRED)),
             "num_experts_per_tok": int(get("expert_used_count", _REQUIRED)),
             "moe_intermediate_size": int(get("expert_feed_forward_length", _REQUIRED)), "decoder_sparse_step": 1,
             "mlp_only_layers": [n for n in layers if f"blk.{n}.ffn_gate_inp.weight" not in names]}
    if config["model_type"] == "qwen2_moe":
        extra.update(qkv_bias="blk.0.attn_q.bias" in names, norm_topk_prob=False,
                     shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0)))
    else:  # llama.cpp's Qwen3-MoE renormalises the top-k weights
        extra.update(norm_topk_prob=True)
    return extra


_FAMILY_CONFIG = {"llama": _llama, "qwen2": _no_extra, "qwen3": _no_extra, "gemma2": _gemma2, "gemma3": _gemma3,
                  "phi3": _phi3, "falcon": _falcon, "qwen2moe": _moe, "qwen3moe": _moe}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_layout(arr: np.ndarray, config: dict, name: str) -> np.ndarray:
    """A tensor (or one of the quantized parts, which share its rows) in the HF checkpoint's layout: llama's
    Q/K rows un-permuted; nothing else moves here (norm offsets and shapes are `hf_values`)."""
    if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
        arr = unpermute_rope_rows(arr, heads)
    return np.ascontiguousarray(arr)


def hf_values(arr: np.ndarray, config: dict, name: str) -> np.ndarray:
    """A dequantized tensor's HF values: llama.cpp stores Gemma's RMSNorm weights as 1 + w (HF keeps w), and
    Qwen2-MoE's shared-expert gate as a vector (HF: a [1, hidden] linear)."""
    if config["model_type"] in ("gemma2", "gemma3_text") and name.endswith("norm.weight"):
        arr = arr - np.float32(1)
    if name.endswith("shared_expert_gate.weight"):
        arr = arr.reshape(1, -1)
    return hf_layout(arr, config, name)


_EXPERT_PART = re.compile(r"(.*\.mlp\.experts)\.(gate|up)_proj")


def merge_expert_parts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each MoE layer's stacked gate [E, I, H] and up [E, I, H] as one gate_up_proj [E, 2I, H] (gate first)."""
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        match = _EXPERT_PART.fullmatch(name)
        if match is None:
            out[name] = arr
        elif match.group(2) == "gate":
            out[match.group(1) + ".gate_up_proj"] = np.concatenate([arr, tensors[match.group(1) + ".up_proj"]], 1)
    return out
