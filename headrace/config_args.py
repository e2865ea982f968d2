"""Engine flags, spelled as `vllm serve` spells them, and the one place they become an EngineConfig.

Every flag also reads an environment variable HEADRACE_<FLAG> (e.g. HEADRACE_MAX_NUM_SEQS) so compose
files and containers configure processes without command lines.
"""

from __future__ import annotations

import argparse
import os

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, ServerConfig


def _env(name: str, default, kind=str):
    raw = os.environ.get("HEADRACE_" + name.upper().replace("-", "_"))
    if raw is None:
        return default
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return kind(raw)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=_env("model", ""),
                   help="HF folder, .gguf file, or random:<preset>; empty: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--tokenizer", default=_env("tokenizer", None))
    g.add_argument("--dtype", default=_env("dtype", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=_env("max_model_len", None, int))
    g.add_argument("--served-model-name", default=_env("served_model_name", None))
    g.add_argument("--chat-template", default=_env("chat_template", None),
                   help="a Jinja file that overrides the model's chat template")
    g.add_argument("--quantization", default=_env("quantization", None), choices=[None, "gguf"])
    g.add_argument("--seed", type=int, default=_env("seed", 0, int))
    g = p.add_argument_group("cache")
    g.add_argument("--block-size", type=int, default=_env("block_size", 16, int))
    g.add_argument("--gpu-memory-utilization", type=float, default=_env("gpu_memory_utilization", 0.90, float))
    g.add_argument("--kv-cache-memory", type=int, default=_env("kv_cache_memory", None, int),
                   help="KV cache bytes (CPU default 1 GiB; on GPU a cap on the profiled size)")
    g.add_argument("--num-gpu-blocks-override", dest="num_blocks", type=int, default=_env("num_blocks", None, int))
    g.add_argument("--enable-prefix-caching", action="store_true", default=_env("enable_prefix_caching", False, bool))
    g = p.add_argument_group("scheduler")
    g.add_argument("--max-num-seqs", type=int, default=_env("max_num_seqs", 256, int))
    g.add_argument("--max-num-batched-tokens", type=int, default=_env("max_num_batched_tokens", None, int))
    g.add_argument("--long-prefill-token-threshold", type=int, default=_env("long_prefill_token_threshold", None, int))
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   default=_env("async_scheduling", True, bool),
                   help="plan each step only after the previous one returned")
    g = p.add_argument_group("parallel and device")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=_env("tensor_parallel_size", 1, int))
    g.add_argument("--dist-init-addr", default=_env("dist_init_addr", None),
                   help="host:port for torch.distributed rendezvous between worker ranks")
    g.add_argument("--device", default=_env("device", "auto"), choices=["auto", "cpu", "cuda"])
    g.add_argument("--attention-backend", default=_env("attention_backend", "auto"),
                   choices=["auto", "torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", default=_env("enforce_eager", False, bool),
                   help="no CUDA graphs")


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default=_env("host", "127.0.0.1"))
    g.add_argument("--port", type=int, default=_env("port", 8000, int))
    g.add_argument("--api-key", default=_env("api_key", None))
    g.add_argument("--num-tokenizers", type=int, default=_env("num_tokenizers", 1, int))
    g.add_argument("--api-server-count", type=int, default=_env("api_server_count", 1, int))
    g.add_argument("--transport", default=_env("transport", "ipc"), choices=["ipc", "tcp"])
    g.add_argument("--ipc-dir", default=_env("ipc_dir", None))
    g.add_argument("--max-request-bytes", type=int, default=_env("max_request_bytes", 8 * 1024 * 1024, int))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The single place flags become configuration; everything downstream receives the frozen result."""
    device = args.device
    batched = args.max_num_batched_tokens
    if batched is None:  # CPUs gain nothing from huge steps; GPUs need them to fill the matrix units
        batched = 2048 if device == "cpu" or (device == "auto" and not _cuda_available()) else 8192
    server = ServerConfig(
        host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 8000),
        api_key=getattr(args, "api_key", None), num_tokenizers=getattr(args, "num_tokenizers", 1),
        num_api_servers=getattr(args, "api_server_count", 1), transport=getattr(args, "transport", "ipc"),
        ipc_dir=getattr(args, "ipc_dir", None),
        max_request_bytes=getattr(args, "max_request_bytes", 8 * 1024 * 1024),
    )
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                          served_model_name=args.served_model_name, tokenizer=args.tokenizer,
                          chat_template=args.chat_template, quantization=args.quantization, seed=args.seed),
        cache=CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory=args.kv_cache_memory, num_blocks=args.num_blocks,
                          enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=batched,
                                  long_prefill_token_threshold=args.long_prefill_token_threshold,
                                  async_scheduling=args.async_scheduling),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, dist_init_addr=args.dist_init_addr),
        server=server,
        device=device,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
