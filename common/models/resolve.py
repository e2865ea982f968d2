"""Resolve an EngineConfig's model once: the files, the architecture, and the facts every process needs.

The launcher calls `resolve_engine_config` before it starts any process (a service started on its own, as
compose does, calls it in its CLI entry), so no service reads the model's files to learn a fact another
service also needs, and a GGUF is converted before anyone waits for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from headrace.common.config import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    ConfigError,
    EngineConfig,
    ResolvedModel,
    resolve_device,
)
from headrace.common.models.arch import ModelArch, arch_from_hf_config, check_tp_experts, check_tp_heads
from headrace.common.models.quant import QuantizationError, QuantSpec, quant_spec
from headrace.common.models.source import ModelNotFoundError, ModelSource, eos_token_ids, resolve_model


def resolve_engine_config(config: EngineConfig, log: Callable[[str], None] = print) -> EngineConfig:
    """`config` with `resolved` filled in and the device-dependent defaults applied (parts already resolved
    are kept). Raises ConfigError (or ModelNotFoundError) for a model that cannot be served as asked."""
    resolved = config.resolved
    if resolved is None:
        if config.model.dtype == "auto":
            config = config.replace(model=dataclasses.replace(config.model, dtype=default_dtype(config)))
        source = resolve_model(config.model.model, config.model.tokenizer, log=log,
                               keep_quantized=keeps_gguf_quantized(config))
        resolved = resolve_source(source, config)
    draft = config.resolved_draft
    if draft is None and config.speculative is not None and config.speculative.uses_draft_model:
        draft = resolve_draft(config.speculative.model, resolved, config, log)
    scheduler = config.scheduler
    if scheduler.max_num_batched_tokens is None:
        default = DEFAULT_MAX_NUM_BATCHED_TOKENS[resolve_device(config.device).split(":")[0]]
        scheduler = dataclasses.replace(scheduler, max_num_batched_tokens=default)
    return config.replace(resolved=resolved, resolved_draft=draft, scheduler=scheduler)


def resolve_draft(model: str, target: ResolvedModel, config: EngineConfig, log: Callable[[str], None]
                  ) -> ResolvedModel:
    """The speculative draft model ("embedded": the embedded model), checked against the target it drafts for:
    the same vocabulary (the drafts are target token ids), and KV it can keep in the target's block tables."""
    source = resolve_model("" if model == "embedded" else model, log=log)
    hf_config = source.hf_config()
    arch = arch_from_hf_config(hf_config)
    prefix = f"--speculative-config: the draft model {model!r}"
    if getattr(hf_config, "quantization_config", None):
        raise ConfigError(f"{prefix} is a quantized checkpoint; a draft model is loaded unquantized (pass its "
                          "16-bit checkpoint, or a .gguf)")
    if arch.vocab_size != target.vocab_size:
        raise ConfigError(f"{prefix} has a vocabulary of {arch.vocab_size} tokens, the target {target.vocab_size}: "
                          "a draft model must share the target's tokenizer")
    if arch.longrope_original_max is not None:
        raise ConfigError(f"{prefix} uses LongRoPE, which a draft model does not support")
    if arch.context_limit < target.max_model_len:
        raise ConfigError(f"{prefix} holds {arch.context_limit} tokens, fewer than --max-model-len "
                          f"{target.max_model_len}: pass a smaller --max-model-len")
    # The scheduler frees a windowed target's old blocks; a draft that attends further back would read them.
    if target.kv_window is not None and (arch.kv_window is None or arch.kv_window > target.kv_window):
        raise ConfigError(f"{prefix} attends further back than the target's sliding window, whose old KV "
                          "blocks are freed; a draft model is not supported with this target")
    return ResolvedModel(kind=source.kind, name=model, weights_dir=source.weights_dir,
                         tokenizer_dir=source.tokenizer_dir, preset=source.preset,
                         max_model_len=target.max_model_len, eos_token_ids=target.eos_token_ids,
                         vocab_size=arch.vocab_size, kv_window=arch.kv_window)


def default_dtype(config: EngineConfig) -> str:
    """What `--dtype auto` means for this config: "bfloat16" for a GGUF on a CPU whose linears can stay
    quantized (the embedded default included), which `keeps_gguf_quantized` then serves kept quantized;
    "auto" otherwise (float32 on CPU, bfloat16 on GPU: model_loader.resolve_dtype). Kept quantized, a decode
    step streams a quarter of the bytes and runs ~4x faster than the dequantized float32 path (docs/cpu.md);
    that path stays one flag away (`--dtype float32`): exact against transformers on the same weights, and
    a row's result independent of what it is batched with, which the quantized path's kernels are not."""
    if config.model.quantization is not None or not resolve_device(config.device).startswith("cpu"):
        return "auto"
    from headrace.common.models.gguf_convert import keeps_linears_quantized
    from headrace.common.models.source import cache_dir, gguf_file

    try:
        path = gguf_file(config.model.model)
    except ModelNotFoundError:  # the embedded model is missing: resolve_model says so, with the install command
        return "auto"
    if path is None or not keeps_linears_quantized(path, cache_dir()):
        return "auto"
    return "bfloat16"


def keeps_gguf_quantized(config: EngineConfig) -> bool:
    """A GGUF served on CPU in bfloat16 keeps its weights quantized (the int4 CPU kernel, bf16 products):
    `--dtype auto` picks bfloat16 for one whose linears can stay quantized (`default_dtype`). It agrees with
    the float forward on ~99% of greedy tokens. GPUs serve GGUF dequantized for now (no kernel reads the
    layout there yet)."""
    on_cpu = resolve_device(config.device).startswith("cpu")
    return on_cpu and config.model.dtype == "bfloat16" and config.model.quantization is None


def resolve_source(source: ModelSource, config: EngineConfig) -> ResolvedModel:
    """The facts of an already located model, checked against what the config asks of it."""
    hf_config = source.hf_config()
    arch = arch_from_hf_config(hf_config)
    check_tp_heads(arch.num_heads, arch.num_kv_heads, config.parallel.tensor_parallel_size)
    limit = arch.context_limit
    requested = config.model.max_model_len
    if requested is not None and requested > limit:
        raise ConfigError(f"--max-model-len {requested} exceeds the model's context length {limit}")
    _check_long_rope(arch, requested or limit, config)
    try:
        quantization = _quantization(source, hf_config, config.model.quantization, arch)
    except QuantizationError as e:
        raise ConfigError(str(e)) from None
    check_tp_experts(arch, config.parallel.tensor_parallel_size)
    if quantization is not None and arch.num_experts:
        raise ConfigError(f"quantized mixture-of-experts models ({arch.model_type}) are not supported yet; "
                          "serve the 16-bit checkpoint without --quantization")
    return ResolvedModel(
        kind=source.kind,
        name=config.model.served_model_name or source.name,
        weights_dir=source.weights_dir,
        tokenizer_dir=source.tokenizer_dir,
        preset=source.preset,
        max_model_len=requested or limit,
        eos_token_ids=eos_token_ids(hf_config, source.weights_dir),
        vocab_size=arch.vocab_size,
        quantization=quantization,
        kv_window=arch.kv_window,
    )


def _check_long_rope(arch: ModelArch, max_model_len: int, config: EngineConfig) -> None:
    """Past its switch point LongRoPE rotates a sequence's keys with the short or the long factors by the
    sequence's length, and the step that crosses it recomputes the whole sequence. So cached blocks of one
    request are not another's (prefix caching would change outputs), and a verify step may cross the switch
    (speculation is refused)."""
    switch = arch.longrope_original_max
    if switch is None or max_model_len <= switch:
        return
    if config.cache.enable_prefix_caching:
        raise ConfigError(f"--enable-prefix-caching is not supported with LongRoPE past its {switch} tokens "
                          f"(cached keys depend on each prompt's length); pass --max-model-len {switch} or "
                          "leave prefix caching off")
    if config.speculative is not None:
        raise ConfigError("--speculative-config is not supported with LongRoPE models (a verify step may cross "
                          f"the switch to the long factors, which recomputes the sequence); pass --max-model-len "
                          f"{switch} or leave speculation off")


def _quantization(source: ModelSource, hf_config, requested: str | None, arch: ModelArch) -> QuantSpec | None:
    """A random-weight preset is quantized as asked, so GPU benchmarks need no quantized checkpoint: the
    integer methods give 4-bit weights in groups of 128 (the common W4A16 checkpoint; 32 for the tiny test
    shapes 128 does not divide), fp8 per-channel."""
    if source.kind == "random" and requested in ("gptq", "awq", "compressed-tensors"):
        inputs = (arch.hidden_size, arch.intermediate_size, arch.q_size)
        group = 128 if all(n % 128 == 0 for n in inputs) else 32
        return QuantSpec(kind="int", checkpoint_format="random", bits=4, group_size=group)
    spec = quant_spec(hf_config, requested)
    fused_family = arch.model_type in ("phi3", "falcon")
    if spec is not None and spec.checkpoint_format not in ("online", "random") and fused_family:
        # Their checkpoints fuse q|k|v (and Phi-3 gate|up) into one linear, whose packed quantized tensors the
        # loader does not split; a 16-bit checkpoint quantized at load is fine.
        raise QuantizationError(f"quantized {arch.model_type} checkpoints are not supported (their fused "
                                "projections); serve the 16-bit checkpoint, with --quantization fp8 if wanted")
    return spec
