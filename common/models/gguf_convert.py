"""Convert a GGUF file once into an HF-style folder in the cache: config.json, safetensors weights,
tokenizer files (with the chat template) and generation_config.json.

Two kinds of folder, cached side by side:
- dequantized: every tensor float32 (the float path, `--dtype float32`, exact against transformers);
- kept quantized (`keep_quantized`, the CPU default): each quantized linear stays as its integers, read into
  gguf_blocks' affine group form (`<module>.codes/.scales/.mins`) and listed in a `quantization_config`
  of quant_method "gguf"; the worker repacks them for its kernel at load. The embedding table is stored
  dequantized (a lookup needs no kernel); a tied LM head gets its own quantized copy as `lm_head.*`.

Reading the blocks and building the tokenizer take seconds; every later start memory-maps the cached
safetensors instead, and every process (tokenizer, worker) reads the same folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager

import numpy as np

CONVERTER_VERSION = 1
QUANT_SUFFIX = "-q"  # the kept-quantized folder's name ends with it

# GGUF tensor names -> HF names (per layer names take the block index).
_LAYER_NAMES = {
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
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCH_TO_HF = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
               "qwen3": ("qwen3", "Qwen3ForCausalLM")}


class GGUFConversionError(ValueError):
    pass


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFConversionError(f"GGUF tensor {gguf_name!r} is not a Llama-family tensor headrace knows")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_from_gguf(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_TO_HF:
        raise GGUFConversionError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    model_type, cls = _ARCH_TO_HF[arch]
    get = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": [cls], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "llama" and "blk.0.attn_q.bias" in names:
        config["attention_bias"] = True
    return config


def _dequantized(t, config: dict, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = dequantize(t.data, t.tensor_type)
    arr = arr.reshape([int(d) for d in reversed(t.shape)])  # GGUF stores dims innermost-first
    return _unpermuted(arr.astype(np.float32, copy=False), config, name)


def _dequantized_tensors(reader, config: dict, keep=lambda t: True):
    for t in reader.tensors:
        if keep(t):
            name = hf_name(t.name)
            yield name, _dequantized(t, config, name)


_LINEARS = ("_proj.weight", "lm_head.weight")


def _quantized_tensors(reader, config: dict, modules: list[str]):
    """(name, array) of a kept-quantized folder; appends each quantized linear's module name to `modules`."""
    from gguf import GGMLQuantizationType

    from headrace.common.models.gguf_blocks import FORMATS, affine_groups

    raw = {t.name: t for t in reader.tensors}
    dense = dict(_dequantized_tensors(reader, config, keep=lambda t: not _kept(t, FORMATS)))
    for t in reader.tensors:
        if not _kept(t, FORMATS):
            continue
        name = hf_name(t.name)
        if name == "model.embed_tokens.weight":  # dequantized for the lookup; quantized again as the tied head
            yield name, np.ascontiguousarray(_dequantized(t, config, name))
            if "output.weight" in raw:
                continue
            name = "lm_head.weight"
        cols, rows = (int(d) for d in t.shape)
        parts = affine_groups(np.asarray(t.data), GGMLQuantizationType(t.tensor_type).name, rows, cols)
        module = name.removesuffix(".weight")
        modules.append(module)
        for suffix, arr in zip(("codes", "scales", "mins"), parts):
            yield f"{module}.{suffix}", _unpermuted(arr, config, name)
    yield from dense.items()


def _kept(t, formats) -> bool:
    from gguf import GGMLQuantizationType

    name = hf_name(t.name)
    kept_name = name.endswith(_LINEARS) or name == "model.embed_tokens.weight"
    return kept_name and len(t.shape) == 2 and GGMLQuantizationType(t.tensor_type).name in formats


def _unpermuted(arr: np.ndarray, config: dict, name: str) -> np.ndarray:
    """Q/K rows back in HF order (the same row permutation for codes, scales and mins)."""
    if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
        arr = unpermute_rope_rows(arr, heads)
    return np.ascontiguousarray(arr)


def _cache_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@contextmanager
def _file_lock(path: str):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted_folder(gguf_path: str, cache_root: str, keep_quantized: bool = False) -> str:
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    suffix = QUANT_SUFFIX if keep_quantized else ""
    return os.path.join(cache_root, "gguf", f"{stem}-{_cache_key(gguf_path)}{suffix}")


def convert_gguf(gguf_path: str, cache_root: str, log=print, keep_quantized: bool = False) -> str:
    """Return the cached HF folder for gguf_path, converting it first if needed (safe across processes)."""
    target = converted_folder(gguf_path, cache_root, keep_quantized)
    if os.path.exists(os.path.join(target, "DONE")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _file_lock(target + ".lock"):
        if os.path.exists(os.path.join(target, "DONE")):
            return target
        t0 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
        try:
            _convert_into(gguf_path, tmp, keep_quantized)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"converted {os.path.basename(gguf_path)} into {target} in {time.perf_counter() - t0:.1f}s")
    return target


def _convert_into(gguf_path: str, out_dir: str, keep_quantized: bool = False) -> None:
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    config = hf_config_from_gguf(reader)
    modules: list[str] = []
    arrays = _quantized_tensors(reader, config, modules) if keep_quantized else _dequantized_tensors(reader, config)
    tensors = {name: torch.from_numpy(arr) for name, arr in arrays}
    if keep_quantized:
        config["quantization_config"] = {"quant_method": "gguf", "modules": modules}
        config["tie_word_embeddings"] = False  # the head is stored on its own (lm_head.*), quantized
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f, indent=2)
    # transformers builds a fast tokenizer (and keeps the chat template) from the GGUF metadata.
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                              gguf_file=os.path.basename(gguf_path))
    tokenizer.save_pretrained(out_dir)
    open(os.path.join(out_dir, "DONE"), "w").close()
