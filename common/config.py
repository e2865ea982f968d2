"""Engine configuration: frozen, validated dataclasses built in one place (headrace.cli) and passed down.

Every process receives the same `EngineConfig` (as a msgpack-able dict via `to_dict`/`from_dict`), so no
process re-parses flags or reads the environment on its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration the engine cannot run with; the message names the offending setting."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    # A local HF folder, a .gguf file, "random:<preset>", or "" for the embedded SmolLM2-135M-Instruct.
    model: str = ""
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    served_model_name: str | None = None
    tokenizer: str | None = None  # None: the tokenizer beside the weights
    chat_template: str | None = None  # path of a Jinja file that overrides the model's template
    quantization: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len > 0, "--max-model-len must be positive")
        _require(self.quantization in (None, "gguf"), f"--quantization {self.quantization!r} is not supported "
                 "(GGUF files are dequantized at load; pass the .gguf path as --model)")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    # KV cache bytes on CPU (and a hard cap on GPU when set); None: 1 GiB on CPU, profiled on GPU.
    kv_cache_memory: int | None = None
    num_blocks: int | None = None  # an explicit block count overrides both (tests, benchmarks)
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        _require(self.block_size in (8, 16, 32, 64), "--block-size must be one of 8, 16, 32, 64")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "--gpu-memory-utilization must be in (0, 1]")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "--kv-cache-memory must be positive")
        _require(self.num_blocks is None or self.num_blocks > 0, "num_blocks must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Long prompts are split into chunks of at most this many tokens per step (chunked prefill).
    long_prefill_token_threshold: int | None = None
    # Plan step t+1 while step t runs (the scheduler process keeps two plans in flight).
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "--max-num-seqs must be positive")
        _require(self.max_num_batched_tokens > 0, "--max-num-batched-tokens must be positive")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # host:port where rank 0 rendezvous torch.distributed (the launcher picks a free local port).
    dist_init_addr: str | None = None

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "--tensor-parallel-size must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    num_tokenizers: int = 1
    num_api_servers: int = 1
    # Where the processes' sockets live: "ipc" (one host, sockets under ipc_dir) or "tcp" (containers).
    transport: str = "ipc"
    ipc_dir: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "--port must be in 1..65535")
        _require(self.num_tokenizers >= 1, "--num-tokenizers must be >= 1")
        _require(self.num_api_servers >= 1, "--api-server-count must be >= 1")
        _require(self.transport in ("ipc", "tcp"), "transport must be 'ipc' or 'tcp'")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    attention_backend: str = "auto"  # "auto" | "torch" | "triton"
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        _require(self.attention_backend in ("auto", "torch", "triton"),
                 "--attention-backend must be auto, torch or triton")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        return cls(
            model=ModelConfig(**data["model"]),
            cache=CacheConfig(**data["cache"]),
            scheduler=SchedulerConfig(**data["scheduler"]),
            parallel=ParallelConfig(**data["parallel"]),
            server=ServerConfig(**data["server"]),
            device=data["device"],
            attention_backend=data["attention_backend"],
            enforce_eager=data["enforce_eager"],
        )

    def replace(self, **sections: Any) -> EngineConfig:
        """A new config with whole sections swapped (configs are never mutated in place)."""
        return dataclasses.replace(self, **sections)


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. Imported lazily so config stays torch-free."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> str:
    """Where converted models (the embedded GGUF, other GGUF files) are cached between starts."""
    root = os.environ.get("HEADRACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "headrace")
    return root
