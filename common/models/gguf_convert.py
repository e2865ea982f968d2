"""Convert a GGUF file once into an HF-style folder in the cache: config.json, safetensors weights,
tokenizer files (with the chat template) and generation_config.json. What each GGUF architecture's
config and tensors are in transformers' terms is gguf_families'; this module reads, caches and writes.

Two kinds of folder, cached side by side:
- dequantized: every tensor float32 (the float path, `--dtype float32`, exact against transformers);
- kept quantized (`keep_quantized`: a CPU with `--dtype bfloat16`): each quantized linear stays as its
  integers, read into gguf_blocks' affine group form (`<module>.codes/.scales/.mins`) and listed in a
  `quantization_config` of quant_method "gguf"; the worker repacks them for its kernel at load. The embedding
  table is stored dequantized (a lookup needs no kernel); a tied LM head gets its own quantized copy as
  `lm_head.*`. Only families with separate projections keep them (Llama, Qwen2/3, Gemma 2/3); Phi-3's and
  Falcon's fused ones and MoE experts are stored dequantized, and so is any block format gguf_blocks does
  not read (Q5_0, ...), with the parts merged beside it (q|k|v, gate|up).

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

from headrace.common.models.gguf_families import (  # noqa: F401  (GGUFConversionError: raised from here)
    GGUFConversionError,
    GGUFFamily,
    gguf_family,
    hf_config_from_gguf,
    hf_layout,
    hf_values,
    merge_expert_parts,
)

CONVERTER_VERSION = 2  # part of the cache key: a new version converts cached files again
QUANT_SUFFIX = "-q"  # the kept-quantized folder's name ends with it


def _dequantized(t, config: dict, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = dequantize(t.data, t.tensor_type)
    arr = arr.reshape([int(d) for d in reversed(t.shape)])  # GGUF stores dims innermost-first
    return hf_values(arr.astype(np.float32, copy=False), config, name)


def _dequantized_tensors(reader, family: GGUFFamily, config: dict, keep=lambda t: True):
    for t in reader.tensors:
        if keep(t):
            name = family.hf_name(t.name)
            yield name, _dequantized(t, config, name)


_LINEARS = ("_proj.weight", "lm_head.weight")


def _quantized_tensors(reader, family: GGUFFamily, config: dict, modules: list[str]):
    """(name, array) of a kept-quantized folder; appends each quantized linear's module name to `modules`."""
    from gguf import GGMLQuantizationType

    from headrace.common.models.gguf_blocks import affine_groups

    raw = {t.name: t for t in reader.tensors}
    kept_names = _kept_names(reader, family)
    kept = lambda t: t.name in kept_names  # noqa: E731
    dense = dict(_dequantized_tensors(reader, family, config, keep=lambda t: not kept(t)))
    for t in reader.tensors:
        if not kept(t):
            continue
        name = family.hf_name(t.name)
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
            yield f"{module}.{suffix}", hf_layout(arr, config, name)
    yield from dense.items()


def keeps_linears_quantized(gguf_path: str, cache_root: str) -> bool:
    """Whether a kept-quantized conversion of this file would keep any linear quantized (its family's
    projections are separate, and some are in a block format gguf_blocks reads): what decides that `--dtype
    auto` serves it kept quantized on a CPU. The answer is cached beside the converted folders: reading the
    file's metadata takes ~2 s (the vocabulary), and every start asks."""
    marker = converted_folder(gguf_path, cache_root) + ".keeps-quantized"
    try:
        with open(marker) as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        pass
    answer = _keeps_linears_quantized(gguf_path)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(marker), prefix=".keeps-")
    with os.fdopen(fd, "w") as f:
        f.write("1" if answer else "0")
    os.replace(tmp, marker)  # atomic: processes starting together read a whole answer or none
    return answer


def _keeps_linears_quantized(gguf_path: str) -> bool:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    return any(name.startswith("blk.") for name in _kept_names(reader, gguf_family(reader)))


def _kept_names(reader, family: GGUFFamily) -> set[str]:
    """The GGUF names of the tensors a kept-quantized folder keeps quantized (none for a family whose linears
    cannot stay quantized)."""
    from headrace.common.models.gguf_blocks import FORMATS

    if not family.keeps_quantized:
        return set()
    return _whole_merge_groups({t.name for t in reader.tensors if _kept(family.hf_name(t.name), t, FORMATS)})


_MERGE_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def _whole_merge_groups(keepable: set[str]) -> set[str]:
    """The worker merges q|k|v and gate|up into one linear each, quantized or not as a whole: a part whose
    partners are not all kept (a Q4_K_M file's Q5_0 q and k beside its Q8_0 v) is dequantized with them."""
    kept = set(keepable)
    for name in keepable:
        parts = name.split(".")
        for group in _MERGE_GROUPS:
            if parts[0] == "blk" and parts[2] in group and \
                    any(f"blk.{parts[1]}.{g}.weight" not in keepable for g in group):
                kept.discard(name)
    return kept


def _kept(name: str, t, formats) -> bool:
    from gguf import GGMLQuantizationType

    kept_name = name.endswith(_LINEARS) or name == "model.embed_tokens.weight"
    return kept_name and len(t.shape) == 2 and GGMLQuantizationType(t.tensor_type).name in formats


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
    family = gguf_family(reader)
    config = hf_config_from_gguf(reader)
    modules: list[str] = []
    arrays = _quantized_tensors(reader, family, config, modules) if keep_quantized else \
        _dequantized_tensors(reader, family, config)
    tensors = {name: torch.from_numpy(arr) for name, arr in merge_expert_parts(dict(arrays)).items()}
    if modules:  # families whose linears cannot stay quantized are stored dequantized (GGUFFamily.keeps_quantized)
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
