"""CUDA graphs for decode-only steps: one captured forward per batch size of a ladder, replayed with padding.

A decode step launches a few hundred small kernels whose launch cost rivals their run time at small
batches; replaying a captured graph launches them all at once. Graphs read fixed addresses, so every
input lives in a static buffer sized for the largest batch; a step of n sequences is copied into the
first n rows and replayed at the next captured size, its extra rows padded with slot -1 (no KV write)
and seq_len 0 (attention of nothing: zeros). Graphs are captured largest first into one shared memory
pool. Only the model's forward is captured: logits and sampling run eagerly on the static hidden output.

Under tensor parallelism the graphs capture the NCCL all-reduces too (every rank captures the same sizes
in the same order, so the collectives still pair up). Off with --enforce-eager, off the GPU, and with a
backend that loops on the host (torch). On CPU this module imports and stays unused.
"""

from __future__ import annotations

import bisect
import time

import torch

from headrace.common.config import EngineConfig
from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata, KVCache
from headrace.services.gpu_worker.graph_runner import ForwardInputs, GraphRunner, capture_graph, disabled_reason
from headrace.services.gpu_worker.model.llama import ForwardContext, LlamaForCausalLM

MAX_GRAPH_BATCH = 512
_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The ladder up to min(max_num_seqs, 512), ending exactly there."""
    limit = min(max_num_seqs, MAX_GRAPH_BATCH)
    return [s for s in _LADDER if s < limit] + [limit]


def padded_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size holding n sequences (None: too many, run eagerly)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs(GraphRunner):
    """Static decode inputs for up to max(sizes) sequences and, once captured, one graph per size."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, kv_caches: list[KVCache],
                 cos_sin_cache: torch.Tensor, sizes: list[int], max_blocks_per_seq: int, block_size: int):
        self.model, self.backend, self.kv_caches, self.cos_sin_cache = model, backend, kv_caches, cos_sin_cache
        self.sizes = sizes
        self.max_seq_len = max_blocks_per_seq * block_size
        weight = model.norm.weight
        n, dev = sizes[-1], weight.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)  # the decode path never reads it
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one query per sequence
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n, model.arch.hidden_size, dtype=weight.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0

    def accepts(self, batch: ForwardInputs) -> bool:
        """A decode-only step small enough for the largest captured size."""
        attn = batch.attn
        return attn.num_decodes == attn.num_seqs and attn.num_seqs <= self.sizes[-1]

    def metadata(self, bs: int) -> AttentionMetadata:
        """Attention metadata over the first bs static rows (the views a graph is captured with)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], context_lens=self.context_lens[:bs], block_tables=self.block_tables[:bs],
            num_decodes=bs, num_decode_tokens=bs, max_query_len=1, max_seq_len=self.max_seq_len)

    def forward_static(self, bs: int) -> torch.Tensor:
        """The model over the first bs static rows into the static hidden buffer: what each graph captures."""
        ctx = ForwardContext(self.metadata(bs), self.kv_caches, self.backend, self.cos_sin_cache)
        self.hidden[:bs].copy_(self.model(self.input_ids[:bs], self.positions[:bs], ctx))
        return self.hidden[:bs]

    def stage(self, batch: ForwardInputs) -> int:
        """Copy a decode step into the static rows, pad up to its captured size; returns that size."""
        attn = batch.attn
        n = attn.num_seqs
        bs = padded_size(self.sizes, n)
        assert bs is not None and self.accepts(batch)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(attn.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.seq_lens[:n].copy_(attn.seq_lens)
        self.seq_lens[n:bs].zero_()
        # Columns past a row's last block are never read (seq_len bounds every read), so stale values
        # there, and in padded rows, are harmless; a row never needs more than max_seq_len's blocks.
        width = min(attn.block_tables.shape[1], self.block_tables.shape[1])
        self.block_tables[:n, :width].copy_(attn.block_tables[:, :width])
        return bs

    def run(self, batch: ForwardInputs) -> torch.Tensor:
        """Replay the step's graph; returns the hidden states of its n real rows (a view of the static
        buffer, valid until the next replay)."""
        bs = self.stage(batch)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.hidden[: batch.attn.num_seqs]

    @torch.no_grad()
    def capture(self, tp_size: int = 1) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
            self.graphs[bs] = capture_graph(lambda: self.forward_static(bs), pool, tp_size, self.hidden.device)
        torch.cuda.synchronize(self.hidden.device)


def maybe_capture_decode_graphs(config: EngineConfig, model: LlamaForCausalLM, backend: AttentionBackend,
                                kv_caches: list[KVCache], cos_sin_cache: torch.Tensor, device: torch.device,
                                tp_size: int, max_model_len: int, block_size: int, log=print) -> DecodeGraphs | None:
    """Captured decode graphs for this worker, or None (eager) when they are off or capture fails."""
    reason = disabled_reason(config, device, backend, tp_size)
    if reason is not None:
        return None
    sizes = capture_sizes(config.scheduler.max_num_seqs)
    t0 = time.perf_counter()
    graphs = DecodeGraphs(model, backend, kv_caches, cos_sin_cache, sizes, -(-max_model_len // block_size),
                          block_size)
    try:
        graphs.capture(tp_size)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be captured still serves, eagerly
        log(f"CUDA graphs off: capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
        return None
    log(f"CUDA graphs: captured {len(sizes)} decode batch sizes ({sizes[0]}..{sizes[-1]}) "
        f"in {time.perf_counter() - t0:.1f}s")
    return graphs
