"""Engine configuration: frozen, validated dataclasses built in one place (headrace.cli) and passed down.

Every process receives the same `EngineConfig` (as a msgpack-able dict via `to_dict`/`from_dict`), so no
process re-parses flags or reads the environment on its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from headrace.common.models.quant import QUANTIZATION_METHODS, QuantSpec

DTYPES = ("auto", "float32", "bfloat16", "float16")
# KV-cache element types, spelled as vLLM spells them: auto = the model's dtype; fp8 = fp8_e4m3 = float8_e4m3fn
# with a per-tensor scale per layer for K and for V (the checkpoint's, else 1.0).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


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
    # random:<preset> weights are N(0, random_init_std), norms 1: transformers' initializer_range by default. At
    # real widths that makes attention near one-hot, where bf16 noise flips which key wins: logit checks of
    # wide random models use a smaller std (bench/gpu_check.py).
    random_init_std: float = 0.02

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len > 0, "--max-model-len must be positive")
        _require(self.random_init_std > 0, "--random-init-std must be positive")
        _require(self.quantization is None or self.quantization in QUANTIZATION_METHODS,
                 f"--quantization {self.quantization!r} is not supported; choose one of {QUANTIZATION_METHODS} "
                 "(a GGUF file's own quantization is read from it: pass the .gguf path as --model)")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    # KV cache bytes on CPU (and a hard cap on GPU when set); None: 1 GiB on CPU, profiled on GPU.
    kv_cache_memory: int | None = None
    num_blocks: int | None = None  # an explicit block count overrides both (tests, benchmarks)
    enable_prefix_caching: bool = False
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size in (8, 16, 32, 64), "--block-size must be one of 8, 16, 32, 64")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"--kv-cache-dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "--gpu-memory-utilization must be in (0, 1]")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "--kv-cache-memory must be positive")
        _require(self.num_blocks is None or self.num_blocks > 0, "num_blocks must be positive")


# Tokens per step when --max-num-batched-tokens is not given, by device kind: CPUs gain nothing from huge
# steps, GPUs need them to fill their matrix units. Applied once, when the config is resolved.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # None: DEFAULT_MAX_NUM_BATCHED_TOKENS for the device, filled in by resolve_engine_config.
    max_num_batched_tokens: int | None = None
    # Long prompts are split into chunks of at most this many tokens per step (chunked prefill).
    long_prefill_token_threshold: int | None = None
    # Plan step t+1 while step t runs (the scheduler process keeps two plans in flight).
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "--max-num-seqs must be positive")
        _require(self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
                 "--max-num-batched-tokens must be positive")

    @property
    def token_budget(self) -> int:
        """Tokens per step; the config must have been resolved (resolve_engine_config) to know it."""
        if self.max_num_batched_tokens is None:
            raise ConfigError("max_num_batched_tokens is unset: resolve the config first (resolve_engine_config)")
        return self.max_num_batched_tokens


DP_ROUTING_POLICIES = ("cache_aware", "round_robin", "least_load")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # host:port where rank 0 rendezvous torch.distributed (the launcher picks a free local port).
    dist_init_addr: str | None = None
    cpu_threads: int | None = None  # threads of a CPU worker's kernels; None: every core this process may use
    # Pipeline parallelism: the layers split into this many stages, each stage tensor_parallel_size ranks
    # (global rank = stage * tensor_parallel_size + tp_rank). None partition: an even split (pipeline.py).
    pipeline_parallel_size: int = 1
    pp_layer_partition: str | None = None  # "a,b,c": layers per stage, first to last
    # Multi-node: the world's ranks in contiguous, equal blocks, one per node; node 0 also runs the scheduler,
    # tokenizers and apis unless --headless (which every other node is).
    nnodes: int = 1
    node_rank: int = 0
    headless: bool = False
    # Engine replicas (a scheduler with its own TP ranks each) behind the one pool of apis and tokenizers; the
    # tokenizers pick a replica per request by dp_routing (services/tokenizer/replica_router.py).
    data_parallel_size: int = 1
    dp_routing: str = "cache_aware"

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "--tensor-parallel-size must be >= 1")
        _require(self.data_parallel_size >= 1, "--data-parallel-size must be >= 1")
        _require(self.dp_routing in DP_ROUTING_POLICIES,
                 f"--dp-routing must be one of {', '.join(DP_ROUTING_POLICIES)}")
        _require(self.cpu_threads is None or self.cpu_threads >= 1, "--cpu-threads must be >= 1")
        _require(self.pipeline_parallel_size >= 1, "--pipeline-parallel-size must be >= 1")
        if self.pp_layer_partition is not None:
            parts = self.layer_partition_counts
            _require(len(parts) == self.pipeline_parallel_size,
                     f"--pp-layer-partition {self.pp_layer_partition!r} names {len(parts)} stages; "
                     f"--pipeline-parallel-size is {self.pipeline_parallel_size}")
        _require(self.nnodes >= 1, "--nnodes must be >= 1")
        _require(0 <= self.node_rank < self.nnodes, f"--node-rank must be in 0..{self.nnodes - 1}")
        _require(self.world_size % self.nnodes == 0,
                 f"{self.world_size} worker ranks (tensor x pipeline parallel size) do not split evenly over "
                 f"--nnodes {self.nnodes}")
        _require(self.nnodes == 1 or bool(self.dist_init_addr),
                 "--nnodes > 1 needs --dist-init-addr host:port (node 0's address, where the ranks meet)")
        _require(not self.headless or self.node_rank > 0 or self.nnodes == 1,
                 "--headless is for nodes other than node 0 (--node-rank >= 1): node 0 runs the scheduler")
        # Replicas spread over nodes would need a scheduler per replica on each node's share: not built.
        _require(self.data_parallel_size == 1 or self.nnodes == 1,
                 "--data-parallel-size > 1 runs on one node: with --nnodes > 1 use one replica per set of nodes")

    @property
    def layer_partition_counts(self) -> list[int]:
        """The --pp-layer-partition counts (ConfigError when malformed); [] when unset."""
        if self.pp_layer_partition is None:
            return []
        try:
            counts = [int(part) for part in self.pp_layer_partition.split(",")]
        except ValueError:
            raise ConfigError(f"--pp-layer-partition must be comma-separated layer counts such as \"10,12,8\", "
                              f"got {self.pp_layer_partition!r}") from None
        _require(all(c >= 1 for c in counts), "--pp-layer-partition: every stage needs at least one layer")
        return counts

    @property
    def world_size(self) -> int:
        """Worker ranks of the replica: every stage's tensor-parallel ranks."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """The global ranks this node runs: its contiguous block of the world."""
        per = self.ranks_per_node
        return range(self.node_rank * per, (self.node_rank + 1) * per)


TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # both: the reasoning sits between <think> and </think>


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
    # tcp only: the interface the engine's own sockets (scheduler, apis) listen on. Loopback keeps them on this
    # host; compose sets 0.0.0.0 so that other containers reach them.
    engine_bind_host: str = "127.0.0.1"
    # tcp only: the host every process dials for the engine's sockets. None: each socket's service name
    # ("scheduler", "api-0"), as a compose network resolves it; `headrace serve` sets the bind host.
    engine_connect_host: str | None = None
    # tcp only: the file holding the engine's CURVE secret key (`headrace keygen`). Every process reads the
    # same one; owners of sockets then admit only peers that hold it (common/curve.py).
    engine_curve_key_file: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 16
    # Engine requests waiting for a first step beyond which the api answers 429 without touching the engine
    # (None: no bound, as vLLM). The scheduler's own queue is unbounded, so this is what keeps it short.
    max_num_queued_reqs: int | None = None
    # Prompt tokens waiting for a first step beyond which the api answers 429 the same way (None: no bound).
    max_queued_tokens: int | None = None
    # Engine requests one HTTP request may start (prompts x n): past it a 400, so one body cannot queue
    # thousands of sequences ahead of every other client.
    max_seqs_per_request: int = 256
    # Seconds the apis keep serving open requests after SIGTERM/SIGINT; at the end, each one still running
    # ends cleanly (a 503, or a stream's error event and [DONE]) before the processes stop.
    shutdown_timeout: float = 10.0
    # Seconds a request may run before it is aborted (its KV freed) and answered 408; a request may ask for
    # less with an X-Request-Timeout header. None: no server default.
    request_timeout: float | None = None
    # Tool calling as vLLM spells it: with --enable-auto-tool-choice, `tool_choice: auto` lets the model decide
    # and --tool-call-parser reads the calls out of what it wrote. --reasoning-parser splits <think> text off.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # Publish each replica's prefix-cache events (vLLM's KV-event schema, common/kv_events.py) on a `kv-events`
    # PUB socket for an external router. Always on with --data-parallel-size > 1: our tokenizers route by them.
    kv_events: bool = False

    def __post_init__(self) -> None:
        _require(self.tool_call_parser in (None, *TOOL_CALL_PARSERS),
                 f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        _require(not self.enable_auto_tool_choice or self.tool_call_parser is not None,
                 "--enable-auto-tool-choice needs --tool-call-parser")
        _require(self.reasoning_parser in (None, *REASONING_PARSERS),
                 f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}")
        _require(self.max_num_queued_reqs is None or self.max_num_queued_reqs > 0,
                 "--max-num-queued-reqs must be positive")
        _require(self.max_queued_tokens is None or self.max_queued_tokens > 0, "--max-queued-tokens must be positive")
        _require(self.max_seqs_per_request >= 1, "--max-seqs-per-request must be >= 1")
        _require(self.shutdown_timeout >= 0, "--shutdown-timeout must not be negative")
        _require(self.request_timeout is None or self.request_timeout > 0, "--request-timeout must be positive")
        _require(0 < self.port < 65536, "--port must be in 1..65535")
        _require(self.num_tokenizers >= 1, "--num-tokenizers must be >= 1")
        _require(self.num_api_servers >= 1, "--api-server-count must be >= 1")
        _require(self.transport in ("ipc", "tcp"), "transport must be 'ipc' or 'tcp'")
        _require(bool(self.engine_bind_host), "--engine-bind-host must name an interface (0.0.0.0 for all)")
        _require(self.engine_connect_host is None or bool(self.engine_connect_host),
                 "--engine-connect-host must name a host")


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """--speculative-config, as vLLM spells it (JSON). `ngram`: prompt lookup, the draft tokens are what
    followed the latest earlier occurrence of the sequence's last n tokens (prompt_lookup_max >= n >=
    prompt_lookup_min); no extra model. `draft_model`: a smaller model of the same vocabulary (`model`: a
    folder, a .gguf, random:<preset>, or "embedded" for the embedded model) proposes the tokens, run by the
    worker beside the target. Steps with more running requests than disable_by_batch_size propose nothing
    (None: never disabled)."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    disable_by_batch_size: int | None = None
    model: str | None = None  # the draft model (draft_model only)

    def __post_init__(self) -> None:
        _require(self.method in SPECULATIVE_METHODS,
                 f"--speculative-config: method {self.method!r} is not supported; choose one of {SPECULATIVE_METHODS}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"--speculative-config: {name} must be an integer >= 1, got {value!r}")
        _require(self.prompt_lookup_min <= self.prompt_lookup_max,
                 "--speculative-config: prompt_lookup_min must not exceed prompt_lookup_max")
        _require(self.num_speculative_tokens <= 16, "--speculative-config: num_speculative_tokens must be <= 16")
        d = self.disable_by_batch_size
        _require(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 1),
                 f"--speculative-config: disable_by_batch_size must be an integer >= 1, got {d!r}")
        _require(self.method != "draft_model" or (isinstance(self.model, str) and bool(self.model)),
                 '--speculative-config: method "draft_model" needs "model" (a folder, a .gguf, random:<preset> '
                 'or "embedded")')
        _require(self.method == "draft_model" or self.model is None,
                 f'--speculative-config: "model" is for method "draft_model", not {self.method!r}')

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    @classmethod
    def from_json(cls, text: str | None) -> SpeculativeConfig | None:
        """The config from the flag's JSON text (None or "" -> no speculation); a ConfigError names what is wrong.
        A "model" without a "method" is a draft model, as vLLM reads it."""
        if not text:
            return None
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--speculative-config is not valid JSON: {e}") from None
        _require(isinstance(data, dict), "--speculative-config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"--speculative-config: unknown field(s) {unknown}; known: {sorted(known)}")
        if "model" in data and "method" not in data:
            data = {**data, "method": "draft_model"}
        return cls(**data)


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` turned out to be, worked out once before any process starts
    (headrace.common.models.resolve) and shipped to every process inside the config."""

    kind: str  # "hf": weights_dir holds config.json and safetensors; "random": `preset` names a shape
    name: str  # the name the api serves it under (--served-model-name, else the model's own)
    weights_dir: str | None
    tokenizer_dir: str  # "" where none is available (a random preset without the embedded model)
    preset: str | None
    max_model_len: int  # the context length every process enforces
    eos_token_ids: tuple[int, ...]  # config.json and generation_config.json together
    vocab_size: int
    quantization: QuantSpec | None = None  # how the checkpoint's linears are quantized (None: not at all)
    # A model windowed in every layer: the scheduler frees a request's KV blocks once they fall wholly
    # before this window (None: every block is kept while the request runs).
    kv_window: int | None = None


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
    # CPU: decode steps as TorchInductor graphs, compiled at start-up (services/gpu_worker/cpu_compiled_decode.py).
    compile_decode: bool = False
    # --speculative-config (None: no speculative decoding).
    speculative: SpeculativeConfig | None = None
    # Filled in once by resolve_engine_config; None until then.
    resolved: ResolvedModel | None = None
    # The speculative draft model, resolved likewise (None: no draft model).
    resolved_draft: ResolvedModel | None = None

    def __post_init__(self) -> None:
        _require(self.attention_backend in ("auto", "torch", "triton"),
                 "--attention-backend must be auto, torch or triton")
        # Under pipeline parallelism the stages that did not sample learn a request's new tokens from the plan,
        # one per step; a verify step's several accepted tokens would need more: not built.
        _require(self.speculative is None or self.parallel.pipeline_parallel_size == 1,
                 "--speculative-config is not supported with --pipeline-parallel-size > 1")
        # Each rank would run the whole draft and must propose the very same tokens as the others: not built.
        _require(self.speculative is None or not self.speculative.uses_draft_model
                 or self.parallel.tensor_parallel_size == 1,
                 '--speculative-config: method "draft_model" is not supported with --tensor-parallel-size > 1')

    def require_resolved(self) -> ResolvedModel:
        """The resolved model; a ConfigError for a config that skipped resolution."""
        if self.resolved is None:
            raise ConfigError("the model is not resolved: pass the config through resolve_engine_config first")
        return self.resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        resolved, draft = data.get("resolved"), data.get("resolved_draft")
        return cls(
            model=ModelConfig(**data["model"]),
            cache=CacheConfig(**data["cache"]),
            scheduler=SchedulerConfig(**data["scheduler"]),
            parallel=ParallelConfig(**data["parallel"]),
            server=ServerConfig(**data["server"]),
            device=data["device"],
            attention_backend=data["attention_backend"],
            enforce_eager=data["enforce_eager"],
            compile_decode=data["compile_decode"],
            speculative=None if data.get("speculative") is None else SpeculativeConfig(**data["speculative"]),
            resolved=None if resolved is None else _resolved_from_dict(resolved),
            resolved_draft=None if draft is None else _resolved_from_dict(draft),
        )

    @classmethod
    def from_flat(cls, **values: Any) -> EngineConfig:
        """A config from keyword arguments named as the sections' fields (model=..., max_model_len=...,
        max_num_seqs=..., device=...): each goes to the one section that has a field of that name."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key, value in values.items():
            owner = _FIELD_OWNER.get(key)
            if owner is None:
                raise TypeError(f"unknown engine argument {key!r}; known: {sorted(_FIELD_OWNER)}")
            (top if owner == "" else sections[owner])[key] = value
        return cls(**{name: kind(**sections[name]) for name, kind in _SECTIONS.items()}, **top)

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


_SECTIONS: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                              "parallel": ParallelConfig, "server": ServerConfig}
# Every settable field -> its section ("" for EngineConfig's own); names are unique across sections.
_FIELD_OWNER: dict[str, str] = {f.name: section for section, kind in _SECTIONS.items()
                                for f in dataclasses.fields(kind)}
_FIELD_OWNER.update({f.name: "" for f in dataclasses.fields(EngineConfig)
                     if f.name not in _SECTIONS and f.name not in ("resolved", "resolved_draft")})


def _resolved_from_dict(data: dict[str, Any]) -> ResolvedModel:
    quant = data.get("quantization")
    return ResolvedModel(**{**data, "eos_token_ids": tuple(data["eos_token_ids"]),
                            "quantization": None if quant is None else QuantSpec.from_dict(quant)})
