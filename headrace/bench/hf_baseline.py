"""The naive baseline: transformers' `generate` on our model's exact weights, same prompts, greedy, EOS ignored.

The HF model is built from ours (same loader, same seed for random presets) through
`export_hf_state_dict`, on the same device and dtype, so both sides run the same function. Batches are
left-padded as `generate` expects; `min_new_tokens = max_new_tokens` keeps EOS from ending a row early.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from headrace.common.config import EngineConfig, resolve_device
from headrace.services.gpu_worker.loader.model_loader import export_hf_state_dict, load_model, resolve_dtype
from headrace.common.models.resolve import resolve_engine_config


def load_hf_twin(config: EngineConfig, log=print):
    """transformers' model with the weights our engine loads for `config` (our copy is dropped after)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(resolve_device(config.device))
    if config.model.dtype == "auto" and device.type == "cpu":  # float32 on CPU; a GGUF dequantized, not kept
        config = config.replace(model=dataclasses.replace(config.model, dtype="float32"), resolved=None)
    model = resolve_engine_config(config, log=log).require_resolved()
    dtype = resolve_dtype(config.model.dtype, device)
    ours = load_model(model, device, dtype, seed=config.model.seed, init_std=config.model.random_init_std)
    # Built on the meta device and given our tensors (assign=True): one copy of the weights, not two, so a
    # model over half the GPU (Mixtral-8x7B, 94 GB) has its baseline in the same run.
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(ours.hf_config, dtype=dtype,
                                              attn_implementation=hf_attention(ours.hf_config))
    take_our_weights(hf, export_hf_state_dict(ours.model), ours.arch.tie_word_embeddings, assign=True)
    _rebuild_computed_buffers(hf, device)
    del ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return hf.eval()


def hf_attention(hf_config) -> str:
    """transformers' attention implementation for an oracle of ours: soft-capped attention (Gemma 2) has no
    SDPA form there, so eager; SDPA elsewhere."""
    return "eager" if getattr(hf_config, "attn_logit_softcapping", None) else "sdpa"


def take_our_weights(hf, state: dict[str, torch.Tensor], tied: bool, assign: bool = False) -> None:
    """Load our weights (under transformers' names) into `hf`; refused when any of its weights would be left
    at its random init. A tied LM head is the embedding itself."""
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=assign)
    missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise RuntimeError(f"HF twin does not match our weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        hf.tie_weights()


def _rebuild_computed_buffers(hf, device: torch.device) -> None:
    """Modules whose buffers are computed, not loaded (the rotary embedding's inv_freq), are still on the meta
    device after an assigning load: build them again on the device from the config."""
    for parent in list(hf.modules()):
        for name, child in parent.named_children():
            if not any(b.is_meta for b in child.buffers(recurse=False)):
                continue
            if hasattr(child, "scalar_embed_scale"):  # Gemma's scaled embedding: weights loaded, scale computed
                child.embed_scale = torch.tensor(child.scalar_embed_scale, device=device)
                continue
            with torch.device(device):
                setattr(parent, name, type(child)(config=hf.config))


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, max_len], prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.int64)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstTokenClock:
    """A generate streamer that notes when the first new token exists: generate hands it the prompt, then
    each step's tokens, so prefill and decode are split inside one call (two separate calls, one for the
    first token and one for all, made decode times negative whenever the machine jittered between them)."""

    def __init__(self, device: torch.device):
        self.device, self.calls, self.first_at = device, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            _sync(self.device)
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def timed_generate(hf, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for one batched greedy `generate` of exactly `new_tokens` tokens per prompt."""
    return timed_generate_split(hf, prompts, new_tokens)[0]


@torch.no_grad()
def timed_generate_split(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds in all, seconds to the first new token) of one batched greedy `generate` of exactly
    `new_tokens` tokens per prompt."""
    device = hf.device
    pad_id = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    ids, mask = left_padded(prompts, pad_id, device)
    clock = _FirstTokenClock(device)
    _sync(device)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=pad_id, streamer=clock)
    _sync(device)
    seconds = time.perf_counter() - t0
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"HF generate made {out.shape[1] - ids.shape[1]} tokens, asked for {new_tokens}")
    return seconds, clock.first_at - t0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
