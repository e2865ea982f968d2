"""Tiny random GGUF files of each family, written as llama.cpp writes them (its tensor names, its metadata
keys, Gemma's norms stored as 1 + w, 1-D tensors in F32), with a byte-level tokenizer of 260 tokens (the
256 bytes, one merge, three specials).

Where transformers' GGUF loader (the oracle) does not read a metadata key, the file's value is the one
transformers defaults to, so both sides build the same model: Gemma's head_dim 256 (its softmax scale is
query_pre_attn_scalar 256 there, 1/sqrt(head_dim) in llama.cpp), Gemma 2's soft-caps 50/30, the MoE expert
sizes (1,408 and 5,632 for Qwen2-MoE, 768 for Qwen3-MoE). Those sizes keep the files under a few MB.
"""

from __future__ import annotations

import numpy as np

VOCAB = 260


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, one merged token, then the specials."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)] + ["ab", "<pad>", "<eos>", "<bos>"]


# Per family: metadata (under the architecture's prefix) and the per-layer tensors as {name: shape}.
def _spec(arch: str) -> tuple[dict, dict[str, tuple[int, ...]], bool]:
    """(metadata, per-layer tensor shapes, has an output.weight of its own)."""
    if arch in ("gemma2", "gemma3"):
        h, heads, kv, d, ff = 64, 2, 1, 256, 128
        meta = {"embedding_length": h, "feed_forward_length": ff, "attention.head_count": heads,
                "attention.head_count_kv": kv, "attention.key_length": d, "attention.value_length": d,
                "attention.sliding_window": 4, "rope.freq_base": 10000.0 if arch == "gemma2" else 1e6,
                "block_count": 3 if arch == "gemma2" else 7}
        if arch == "gemma2":
            meta.update({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
        layer = {"attn_norm.weight": (h,), "attn_q.weight": (heads * d, h), "attn_k.weight": (kv * d, h),
                 "attn_v.weight": (kv * d, h), "attn_output.weight": (h, heads * d),
                 "post_attention_norm.weight": (h,), "ffn_norm.weight": (h,), "ffn_gate.weight": (ff, h),
                 "ffn_up.weight": (ff, h), "ffn_down.weight": (h, ff), "post_ffw_norm.weight": (h,)}
        if arch == "gemma3":
            layer.update({"attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,)})
        return meta, layer, False
    if arch == "phi3":
        h, heads, ff = 64, 4, 128
        meta = {"embedding_length": h, "feed_forward_length": ff, "attention.head_count": heads,
                "attention.head_count_kv": heads, "block_count": 2, "rope.freq_base": 10000.0}
        layer = {"attn_norm.weight": (h,), "attn_qkv.weight": (3 * h, h), "attn_output.weight": (h, h),
                 "ffn_norm.weight": (h,), "ffn_up.weight": (2 * ff, h), "ffn_down.weight": (h, ff)}
        return meta, layer, True
    if arch == "falcon":
        h, heads, ff = 64, 4, 256  # Falcon-7B's layout: one KV head, ffn 4 x hidden, no biases
        meta = {"embedding_length": h, "feed_forward_length": ff, "attention.head_count": heads,
                "attention.head_count_kv": 1, "attention.layer_norm_epsilon": 1e-5, "block_count": 2,
                "rope.freq_base": 10000.0}
        layer = {"attn_norm.weight": (h,), "attn_norm.bias": (h,), "attn_qkv.weight": (h + 2 * h // heads, h),
                 "attn_output.weight": (h, h), "ffn_up.weight": (ff, h), "ffn_down.weight": (h, ff)}
        return meta, layer, False
    return _moe_spec(arch)


def _moe_spec(arch: str) -> tuple[dict, dict[str, tuple[int, ...]], bool]:
    h, heads, kv, experts = 32, 4, 2, 4
    d = 8 if arch == "qwen2moe" else 16  # Qwen2-MoE has no head_dim of its own: hidden / heads
    inter = 1408 if arch == "qwen2moe" else 768
    meta = {"embedding_length": h, "feed_forward_length": 5632, "attention.head_count": heads,
            "attention.head_count_kv": kv, "block_count": 2, "rope.freq_base": 10000.0,
            "expert_count": experts, "expert_used_count": 2, "expert_feed_forward_length": inter}
    layer = {"attn_norm.weight": (h,), "attn_q.weight": (heads * d, h), "attn_k.weight": (kv * d, h),
             "attn_v.weight": (kv * d, h), "attn_output.weight": (h, heads * d), "ffn_norm.weight": (h,),
             "ffn_gate_inp.weight": (experts, h), "ffn_gate_exps.weight": (experts, inter, h),
             "ffn_up_exps.weight": (experts, inter, h), "ffn_down_exps.weight": (experts, h, inter)}
    if arch == "qwen2moe":
        shared = 5632
        meta["expert_shared_feed_forward_length"] = shared
        layer.update({"attn_q.bias": (heads * d,), "attn_k.bias": (kv * d,), "attn_v.bias": (kv * d,),
                      "ffn_gate_inp_shexp.weight": (h,), "ffn_gate_shexp.weight": (shared, h),
                      "ffn_up_shexp.weight": (shared, h), "ffn_down_shexp.weight": (h, shared)})
    else:
        meta["attention.key_length"] = d
        layer.update({"attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,)})
    return meta, layer, True


def write_tiny_gguf(path: str, arch: str, seed: int = 0, quant: str = "Q8_0", meta_overrides: dict | None = None,
                    extra_tensors: dict[str, tuple[int, ...]] | None = None,
                    tensor_quant: dict[str, str] | None = None) -> str:
    """A random model of `arch`; 2-D and 3-D weights whose rows split into 32s stored as `quant` (F32: none),
    or as `tensor_quant` says for a layer tensor's name (`attn_q.weight`: `Q5_0`). `meta_overrides` replace
    metadata values (None leaves a key out); `extra_tensors` add tensors."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    meta, layer, own_head = _spec(arch)
    meta = {**meta, "context_length": 256, "attention.layer_norm_rms_epsilon": 1e-6, **(meta_overrides or {})}
    meta = {key: value for key, value in meta.items() if value is not None}  # None: the key left out
    h = meta["embedding_length"]
    tensors = {"token_embd.weight": (VOCAB, h), "output_norm.weight": (h,)}
    if arch == "falcon":
        tensors["output_norm.bias"] = (h,)
    if own_head:
        tensors["output.weight"] = (VOCAB, h)
    for n in range(meta["block_count"]):
        tensors.update({f"blk.{n}.{name}": shape for name, shape in layer.items()})
    tensors.update(extra_tensors or {})
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    for key, value in meta.items():
        _add(writer, f"{arch}.{key}", value)
    _add_tokenizer(writer)
    for name, shape in tensors.items():
        qtype = GGMLQuantizationType[(tensor_quant or {}).get(name.split(".", 2)[-1], quant)]
        if name.endswith("norm.weight"):  # llama.cpp stores Gemma's (1 + w); norms near 1 either way
            arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) >= 2 and shape[-1] % 32 == 0 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(name, quantize(arr, qtype), raw_shape=quantize(arr, qtype).shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


def _add_tokenizer(writer) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_byte_tokens())
    writer.add_token_types([1] * 256 + [3] * 4)
    writer.add_token_merges(["a b"])
    writer.add_pad_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_bos_token_id(259)
