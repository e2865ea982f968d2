"""Engine flags, spelled as `vllm serve` spells them, and the one place they become an EngineConfig.

Every default is the config dataclass's own (read from its field), so a default is written once. Every flag
also reads an environment variable HEADRACE_<FLAG> (e.g. HEADRACE_MAX_NUM_SEQS) so compose files and
containers configure processes without command lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from headrace.common.config import (
    DP_ROUTING_POLICIES,
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATION_METHODS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
)


def _field_default(section: type, name: str) -> Any:
    """The dataclass default of `section.name` (a default factory's value where it has one)."""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _env(name: str, default: Any, kind: type = str) -> Any:
    raw = os.environ.get("HEADRACE_" + name.upper().replace("-", "_"))
    if raw is None:
        return default
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return kind(raw)


def _flag(group: argparse._ArgumentGroup, flag: str, section: type, field_name: str | None = None,
          env: str | None = None, **kwargs: Any) -> None:
    """A flag whose default is the config field's, overridden by HEADRACE_<env> when set."""
    dest = kwargs.pop("dest", None) or flag.lstrip("-").replace("-", "_")
    field_name = field_name or dest
    default = _field_default(section, field_name)
    kind = kwargs.get("type", bool if isinstance(default, bool) else str)
    group.add_argument(flag, dest=dest, default=_env(env or dest, default, kind), **kwargs)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    _flag(g, "--model", ModelConfig,
          help="HF folder, .gguf file, or random:<preset>; empty: the embedded SmolLM2-135M-Instruct")
    _flag(g, "--tokenizer", ModelConfig)
    _flag(g, "--dtype", ModelConfig, choices=DTYPES,
          help="auto: bfloat16 on GPUs; on a CPU, a GGUF kept quantized (bfloat16 products) where its linears "
               "can be, else float32. float32 on a CPU: every weight dequantized, exact against transformers")
    _flag(g, "--max-model-len", ModelConfig, type=int)
    _flag(g, "--served-model-name", ModelConfig)
    _flag(g, "--chat-template", ModelConfig, help="a Jinja file that overrides the model's chat template")
    _flag(g, "--quantization", ModelConfig, choices=QUANTIZATION_METHODS)
    _flag(g, "--seed", ModelConfig, type=int)
    _flag(g, "--random-init-std", ModelConfig, type=float, help="random:<preset> weights are N(0, this)")
    g = p.add_argument_group("cache")
    _flag(g, "--block-size", CacheConfig, type=int)
    _flag(g, "--gpu-memory-utilization", CacheConfig, type=float)
    _flag(g, "--kv-cache-memory", CacheConfig, type=int,
          help="KV cache bytes (CPU default 1 GiB; on GPU a cap on the profiled size)")
    _flag(g, "--num-gpu-blocks-override", CacheConfig, "num_blocks", dest="num_blocks", type=int)
    _flag(g, "--enable-prefix-caching", CacheConfig, action="store_true")
    _flag(g, "--kv-cache-dtype", CacheConfig, choices=KV_CACHE_DTYPES,
          help="fp8 (= fp8_e4m3): K and V stored as float8 e4m3 with per-layer scales, twice the blocks")
    g = p.add_argument_group("scheduler")
    _flag(g, "--max-num-seqs", SchedulerConfig, type=int)
    _flag(g, "--max-num-batched-tokens", SchedulerConfig, type=int,
          help="tokens per step (default: 2048 on CPU, 8192 on GPU)")
    _flag(g, "--long-prefill-token-threshold", SchedulerConfig, type=int)
    _flag(g, "--no-async-scheduling", SchedulerConfig, "async_scheduling", dest="async_scheduling",
          action="store_false", help="plan each step only after the previous one returned")
    g = p.add_argument_group("parallel and device")
    _flag(g, "--tensor-parallel-size", ParallelConfig, type=int)
    _flag(g, "--data-parallel-size", ParallelConfig, type=int,
          help="engine replicas (a scheduler and its tensor-parallel ranks each, on their own GPUs)")
    _flag(g, "--dp-routing", ParallelConfig, choices=list(DP_ROUTING_POLICIES),
          help="how tokenizers pick a replica per request (cache_aware: prefix-cache hit minus load)")
    _flag(g, "--dist-init-addr", ParallelConfig,
          help="host:port for torch.distributed rendezvous between worker ranks")
    _flag(g, "--pipeline-parallel-size", ParallelConfig, type=int,
          help="pipeline stages; each runs --tensor-parallel-size ranks")
    _flag(g, "--pp-layer-partition", ParallelConfig,
          help="layers per pipeline stage, e.g. \"10,12,8\" (default: even, extra layers before the last stage)")
    _flag(g, "--nnodes", ParallelConfig, type=int, help="nodes the worker ranks span (contiguous, equal blocks)")
    _flag(g, "--node-rank", ParallelConfig, type=int, help="this node's index; node 0 runs the scheduler and apis")
    _flag(g, "--headless", ParallelConfig, action="store_true",
          help="run only this node's worker ranks (every node but node 0)")
    _flag(g, "--device", EngineConfig, choices=["auto", "cpu", "cuda"])
    _flag(g, "--cpu-threads", ParallelConfig, type=int,
          help="threads of the CPU worker's kernels (default: every core it may use)")
    _flag(g, "--attention-backend", EngineConfig, choices=["auto", "torch", "triton"])
    _flag(g, "--enforce-eager", EngineConfig, action="store_true", help="no CUDA graphs, no --compile-decode")
    _flag(g, "--compile-decode", EngineConfig, action="store_true",
          help="CPU: run decode steps as TorchInductor-compiled graphs (about 1.4x faster per step at one row); "
               "compiled at start-up, a minute or two on two cores the first time, cached on disk after")
    g.add_argument("--speculative-config", default=_env("speculative_config", None),
                   help='speculative decoding as JSON, e.g. {"method": "ngram", "num_speculative_tokens": 3, '
                        '"prompt_lookup_min": 2, "prompt_lookup_max": 4, "disable_by_batch_size": 8}, or with a '
                        'draft model {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}')


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    _flag(g, "--host", ServerConfig)
    _flag(g, "--port", ServerConfig, type=int)
    _flag(g, "--api-key", ServerConfig)
    _flag(g, "--num-tokenizers", ServerConfig, type=int)
    _flag(g, "--api-server-count", ServerConfig, "num_api_servers", type=int)
    _flag(g, "--transport", ServerConfig, choices=["ipc", "tcp"])
    _flag(g, "--ipc-dir", ServerConfig, help="ipc: the folder of the engine's sockets (default: a fresh temp "
          "folder); it must be yours and closed to others (mode 0700), or missing")
    _flag(g, "--engine-bind-host", ServerConfig,
          help="tcp: the interface the scheduler and apis bind the engine's sockets on (compose: 0.0.0.0)")
    _flag(g, "--engine-connect-host", ServerConfig,
          help="tcp: the host every process dials (default: the compose service names; serve: the bind host)")
    _flag(g, "--engine-curve-key-file", ServerConfig,
          help="tcp: the engine's CURVE secret key (`headrace keygen FILE`); peers without it are refused "
               "(serve makes a one-off key when unset)")
    _flag(g, "--kv-events", ServerConfig, action="store_true",
          help="publish the prefix cache's block events (vLLM's KV-event schema) on each scheduler's kv-events "
               "ZeroMQ PUB socket for an external router (always on with --data-parallel-size > 1)")
    _flag(g, "--max-request-bytes", ServerConfig, type=int)
    _flag(g, "--max-num-queued-reqs", ServerConfig, type=int,
          help="engine requests waiting to start beyond which new requests get 429 with Retry-After")
    _flag(g, "--max-queued-tokens", ServerConfig, type=int,
          help="prompt tokens waiting to start beyond which new requests get 429 with Retry-After")
    _flag(g, "--max-seqs-per-request", ServerConfig, type=int,
          help="sequences (prompts x n) one request may start; past it the request is a 400")
    _flag(g, "--shutdown-timeout", ServerConfig, type=float,
          help="seconds open requests may run on after SIGTERM; then each ends with a 503 / an SSE error event")
    _flag(g, "--request-timeout", ServerConfig, type=float,
          help="seconds a request may run before it is aborted and answered 408 (X-Request-Timeout may ask less)")
    _flag(g, "--enable-auto-tool-choice", ServerConfig, action="store_true",
          help="let `tool_choice: auto` requests call tools (needs --tool-call-parser)")
    _flag(g, "--tool-call-parser", ServerConfig, choices=TOOL_CALL_PARSERS,
          help="how the model writes tool calls: hermes (Qwen2.5/Qwen3), llama3_json, mistral")
    _flag(g, "--reasoning-parser", ServerConfig, choices=REASONING_PARSERS,
          help="return the model's <think>...</think> text as reasoning_content")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The single place flags become configuration; everything downstream receives the frozen result."""
    def section(kind: type, **renamed: str) -> Any:
        """The section built from the parsed flags named as its fields (or as `renamed` says)."""
        values = {}
        for f in dataclasses.fields(kind):
            dest = renamed.get(f.name, f.name)
            if hasattr(args, dest):
                values[f.name] = getattr(args, dest)
        return kind(**values)

    return EngineConfig(
        model=section(ModelConfig),
        cache=section(CacheConfig),
        scheduler=section(SchedulerConfig),
        parallel=section(ParallelConfig),
        server=section(ServerConfig, num_api_servers="api_server_count"),
        device=args.device,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        compile_decode=args.compile_decode,
        speculative=SpeculativeConfig.from_json(getattr(args, "speculative_config", None)),
    )
