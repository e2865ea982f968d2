"""Piecewise CUDA graphs for prefill and mixed steps: everything but attention replayed from graphs.

A step that is not decode-only (a prefill chunk, or prefills beside decodes) cannot replay a whole
captured forward: its attention launches depend on how the tokens split into sequences. Run eagerly,
though, such a step spends far longer launching ~15 kernels per layer from Python than the GPU spends
on them at a few hundred tokens (an 8B model's 128-token prefill: ~15 ms of host time for ~6 ms of
kernels), and that is time to first token.

So the forward is cut at attention. For each size T of a token ladder, L + 1 graphs are captured:

    piece 0      embedding, layer 0 up to attention (input norm, QKV, QK-norm, RoPE + KV write)
    piece i      layer i-1 after attention (o_proj, norms, MLP), then layer i up to attention
    piece L      layer L-1 after attention, final norm

and a step of n <= T tokens replays them in order with each layer's attention launched eagerly in
between, on the n real rows. Rows n..T are padding: slot -1 (no KV write), position 0; attention never
writes them, so they carry stale values through row-wise ops that never mix rows, and are never read.

Pieces hand tensors to each other and to attention through static buffers (q/k/v, the residual, the
attention output, the final hidden state); each piece copies its outputs there, so every intermediate
dies inside its piece, and all pieces of all sizes share one memory pool. Under tensor parallelism the
pieces capture the all-reduces too, as the decode graphs do.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable

import torch

from headrace.common.config import EngineConfig
from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata, KVCache
from headrace.services.gpu_worker.graph_runner import ForwardInputs, GraphRunner, capture_graph, disabled_reason
from headrace.services.gpu_worker.model.llama import ForwardContext, LlamaForCausalLM

# Padding is nearly free while a step's GEMMs are bound by reading the weights (a few hundred tokens on
# an H100), so the ladder is coarse there and finer above. Past the top, the GPU time of a step dwarfs
# its launch cost: eager.
_TOKEN_LADDER = (16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024)
MAX_TOKENS = 1024  # steps of up to this many tokens that are not decode-only run from the pieces


def capture_token_sizes(max_tokens: int, max_num_batched_tokens: int) -> list[int]:
    """The ladder up to min(max_tokens, max_num_batched_tokens), ending exactly there."""
    limit = min(max_tokens, max_num_batched_tokens)
    return [s for s in _TOKEN_LADDER if s < limit] + [limit]


class PiecewiseGraphs(GraphRunner):
    """Static buffers for up to max(sizes) tokens and, per size, the L + 1 pieces of the forward.

    Built by `build_uncaptured` the pieces are plain calls of the same functions on the same buffers: the
    CPU tests check the cut, the buffers and the padding that way, without a GPU."""

    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, kv_caches: list[KVCache],
                 cos_sin_cache: torch.Tensor, sizes: list[int]):
        self.model, self.backend, self.kv_caches, self.cos_sin_cache = model, backend, kv_caches, cos_sin_cache
        self.sizes = sizes
        attn = model.layers[0].self_attn
        n, dev, dtype = sizes[-1], model.norm.weight.device, model.norm.weight.dtype
        hidden, d = model.arch.hidden_size, attn.head_dim
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.q = torch.zeros(n, attn.num_heads, d, dtype=dtype, device=dev)
        self.k = torch.zeros(n, attn.num_kv_heads, d, dtype=dtype, device=dev)
        self.v = torch.zeros(n, attn.num_kv_heads, d, dtype=dtype, device=dev)
        self.residual = torch.zeros(n, hidden, dtype=dtype, device=dev)
        self.attn_out = torch.zeros(n, attn.num_heads * d, dtype=dtype, device=dev)
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=dev)
        self.pieces: dict[int, list[Callable[[], None]]] = {}
        self.num_replays = 0

    def accepts(self, batch: ForwardInputs) -> bool:
        """Any step of up to the largest captured token count."""
        return batch.input_ids.shape[0] <= self.sizes[-1]

    # ------------------------------------------------------------------ the pieces

    def _ctx(self, size: int) -> ForwardContext:
        """What a piece's RoPE + KV write reads: the static positions' slots. Pieces never attend, so the
        rest of the metadata is unused."""
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size], query_start_loc=self.slot_mapping[:0],
                                 seq_lens=self.slot_mapping[:0], context_lens=self.slot_mapping[:0],
                                 block_tables=self.slot_mapping[:0], num_decodes=0, num_decode_tokens=0,
                                 max_query_len=0, max_seq_len=0)
        return ForwardContext(meta, self.kv_caches, self.backend, self.cos_sin_cache)

    def _piece(self, size: int, index: int) -> Callable[[], None]:
        """Piece `index` of the forward over the first `size` static rows, as a closure over the buffers."""
        layers, num_layers = self.model.layers, len(self.model.layers)
        ctx = self._ctx(size)
        positions = self.positions[:size]

        def stash(q, k, v, residual) -> None:
            self.q[:size].copy_(q)
            self.k[:size].copy_(k)
            self.v[:size].copy_(v)
            self.residual[:size].copy_(residual)

        def piece() -> None:
            if index == 0:
                x = self.model.embed(self.input_ids[:size])
                stash(*layers[0].before_attention(positions, x, None, ctx))
                return
            x, residual = layers[index - 1].after_attention(self.attn_out[:size], self.residual[:size])
            if index < num_layers:
                stash(*layers[index].before_attention(positions, x, residual, ctx))
            else:
                self.hidden[:size].copy_(self.model.norm(x, residual)[0])

        return piece

    # ------------------------------------------------------------------ running a step

    def run(self, batch: ForwardInputs) -> torch.Tensor:
        """The model over one step's n tokens; returns their hidden states (a view of the static buffer,
        valid until the next run)."""
        attn = batch.attn
        n = batch.input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.positions[n:size].zero_()
        self.slot_mapping[:n].copy_(attn.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.backend.prepare(attn)  # the pieces bypass the model's forward, which would do it
        ctx = ForwardContext(attn, self.kv_caches, self.backend, self.cos_sin_cache)
        pieces = self.pieces[size]
        for i, layer in enumerate(self.model.layers):
            pieces[i]()
            out = layer.self_attn.attend(self.q[:n], self.k[:n], self.v[:n], ctx)
            self.attn_out[:n].copy_(out)
        pieces[-1]()
        self.num_replays += 1
        return self.hidden[:n]

    # ------------------------------------------------------------------ capture

    def build_uncaptured(self) -> None:
        """Pieces as plain calls (CPU tests, or a device without graphs)."""
        for size in self.sizes:
            self.pieces[size] = [self._piece(size, i) for i in range(len(self.model.layers) + 1)]

    @torch.no_grad()
    def capture(self, tp_size: int = 1) -> None:
        pool = torch.cuda.graph_pool_handle()
        dev = self.hidden.device
        for size in reversed(self.sizes):  # largest first: smaller sizes fit in the pool it grew
            # Each graph lives on in its bound replay method.
            self.pieces[size] = [capture_graph(self._piece(size, i), pool, tp_size, dev).replay
                                 for i in range(len(self.model.layers) + 1)]
        torch.cuda.synchronize(dev)


def maybe_capture_piecewise_graphs(config: EngineConfig, model: LlamaForCausalLM, backend: AttentionBackend,
                                   kv_caches: list[KVCache], cos_sin_cache: torch.Tensor, device: torch.device,
                                   tp_size: int, log=print) -> PiecewiseGraphs | None:
    """Captured piecewise graphs for this worker, or None (eager prefill) when graphs are off (the same
    reasons as decode graphs) or capture fails."""
    if disabled_reason(config, device, backend, tp_size) is not None:
        return None
    sizes = capture_token_sizes(MAX_TOKENS, config.scheduler.token_budget)
    t0 = time.perf_counter()
    graphs = PiecewiseGraphs(model, backend, kv_caches, cos_sin_cache, sizes)
    try:
        graphs.capture(tp_size)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be captured still serves, eagerly
        log(f"piecewise CUDA graphs off: capture failed ({type(exc).__name__}: {exc}); prefill runs eagerly")
        return None
    log(f"CUDA graphs: captured {len(sizes)} prefill token sizes ({sizes[0]}..{sizes[-1]}) x "
        f"{len(model.layers) + 1} pieces in {time.perf_counter() - t0:.1f}s")
    return graphs
