"""A step's model inputs: one flat batch of decode tokens and prefill chunks, built on the host as named
numpy arrays and uploaded in two packed copies.

Decode requests (one token each) come first, then prefill chunks, in plan order. Per-request Python work is
one token lookup (decodes) or one slice (prefills) plus one table-row copy; positions, slots and lengths are
computed as arrays.

A decode whose input is the token the pending step (launched, still running on the device) is sampling
reads it from that step's device tensor (an index_copy_ into the input ids), so a step launches before the
one before it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from headrace.services.gpu_worker.attention.base import AttentionMetadata
from headrace.services.gpu_worker.inflight import InflightStep
from headrace.services.gpu_worker.model.rope import LongRopeRows
from headrace.services.gpu_worker.prompt_logprobs import PromptSpan, prompt_spans
from headrace.services.gpu_worker.request_state import RequestState


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor  # each token's row in the cos/sin cache (its position but for LongRoPE, see HostArrays)
    attn: AttentionMetadata
    req_order: list[str]  # batch order (decodes first)
    sample_req_ids: list[str]
    logits_indices: torch.Tensor  # flat-batch index of the last token of each sampling request
    sample_states: list[RequestState] = field(default_factory=list)  # parallel to sample_req_ids
    prompt_spans: list[PromptSpan] = field(default_factory=list)  # rows that score prompt tokens


@dataclass
class BatchLayout:
    """Which requests a step holds, in batch order, and which of their tokens: per sequence, positions
    starts..ends of the `known` tokens it has (the pending step's token included)."""

    order: list[str]
    states: list[RequestState]
    num_decodes: int
    starts: np.ndarray  # [S] int64: tokens computed before this step
    counts: np.ndarray  # [S] int64: tokens this step
    ends: np.ndarray  # [S] int64: starts + counts
    known: np.ndarray  # [S] int64

    @property
    def samples(self) -> np.ndarray:
        """[S] bool: the chunk reaches the newest token, so the step samples the next one."""
        return self.ends == self.known


@dataclass
class HostArrays:
    """A step's inputs on the host. The int64 fields travel in one upload, the int32 fields in another."""

    token_ids: np.ndarray  # [T]; 0 where fill_positions points: read from the pending step on the device
    positions: np.ndarray  # [T]: each token's position, its row in the cos/sin cache (LongRoPE: see _rope_rows)
    slots: np.ndarray  # [T]: where each token's K/V is written (block * block_size + offset)
    logits_indices: np.ndarray  # [R]: flat index of the last token of each sampling sequence
    fill_positions: np.ndarray  # [F]: token_ids entries the pending step is sampling
    fill_rows: np.ndarray  # [F]: their rows in the pending step's sampled ids
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32: ends
    context_lens: np.ndarray  # [S] int32: starts
    block_table: np.ndarray  # [S, max_blocks] int32

    INT64: ClassVar = ("token_ids", "positions", "slots", "logits_indices", "fill_positions", "fill_rows")
    INT32: ClassVar = ("query_start_loc", "seq_lens", "context_lens", "block_table")


def prepare_batch(requests: dict[str, RequestState], scheduled: dict[str, int], block_size: int,
                  device: torch.device, pending: InflightStep | None = None,
                  long_rope: LongRopeRows | None = None) -> PreparedBatch:
    """The batch of `scheduled` (request id -> tokens this step) on `device`. `pending` is the step still
    running on the device, whose sampled tokens some decodes of this step take as input. `long_rope`: the
    model's cos/sin cache holds LongRoPE's long-factor table too."""
    pending_rows = pending.row_of_state if pending is not None else {}
    restarts = long_rope_restarts(requests, scheduled, long_rope) if long_rope is not None else set()
    if restarts:  # recomputed from their first token: all their known tokens this step
        scheduled = {rid: len(requests[rid].token_ids) if rid in restarts else n for rid, n in scheduled.items()}
    layout = batch_layout(requests, scheduled, pending_rows, restarts)
    host = host_arrays(layout, block_size, pending_rows, long_rope)
    dev = upload_host_arrays(host, device)
    if host.fill_positions.size:
        assert pending is not None and pending.sampled is not None
        dev["token_ids"].index_copy_(0, dev["fill_positions"], pending.sampled.index_select(0, dev["fill_rows"]))
    samples = layout.samples.tolist()
    return PreparedBatch(
        input_ids=dev["token_ids"],
        positions=dev["positions"],
        attn=attention_metadata(layout, host, dev),
        req_order=layout.order,
        sample_req_ids=[rid for rid, yes in zip(layout.order, samples) if yes],
        logits_indices=dev["logits_indices"],
        sample_states=[st for st, yes in zip(layout.states, samples) if yes],
        prompt_spans=prompt_spans(layout.states, layout.starts, layout.ends, host.query_start_loc[:-1]),
    )


def batch_layout(requests: dict[str, RequestState], scheduled: dict[str, int],
                 pending_rows: dict[int, int], restarts: set[str] = frozenset()) -> BatchLayout:
    """Decodes first, then prefills, each in plan order; raises if a request is scheduled past its tokens.
    `restarts` are computed from their first token whatever they computed before."""
    decodes = [rid for rid, n in scheduled.items() if n == 1]
    order = decodes + [rid for rid, n in scheduled.items() if n != 1]
    states = [requests[rid] for rid in order]
    num_seqs = len(order)
    starts = np.fromiter((0 if rid in restarts else st.num_computed_tokens for rid, st in zip(order, states)),
                         np.int64, num_seqs)
    counts = np.fromiter((scheduled[rid] for rid in order), np.int64, num_seqs)
    known = np.fromiter((len(st.token_ids) + len(st.draft_token_ids) for st in states), np.int64, num_seqs)
    if pending_rows:
        known += np.fromiter((id(st) in pending_rows for st in states), np.int64, num_seqs)
    ends = starts + counts
    if (ends > known).any():
        i = int(np.argmax(ends > known))
        raise ValueError(f"request {order[i]}: scheduled tokens {starts[i]}..{ends[i]} past its {known[i]} tokens")
    return BatchLayout(order, states, len(decodes), starts, counts, ends, known)


def host_arrays(layout: BatchLayout, block_size: int, pending_rows: dict[int, int],
                long_rope: LongRopeRows | None = None) -> HostArrays:
    token_ids, fill_positions, fill_rows = _token_ids(layout, pending_rows)
    positions = _positions(layout)
    table = _block_table(layout.states)
    query_start_loc = np.zeros(len(layout.order) + 1, dtype=np.int32)
    np.cumsum(layout.counts, out=query_start_loc[1:])
    return HostArrays(
        token_ids=token_ids,
        positions=positions if long_rope is None else _rope_rows(layout, positions, long_rope),
        slots=_slots(table, layout.counts, positions, block_size),
        logits_indices=_logits_indices(layout, query_start_loc),
        fill_positions=fill_positions,
        fill_rows=fill_rows,
        query_start_loc=query_start_loc,
        seq_lens=layout.ends.astype(np.int32),
        context_lens=layout.starts.astype(np.int32),
        block_table=table,
    )


def _token_ids(layout: BatchLayout, pending_rows: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat token ids, and (flat index, pending row) of each decode input still on the device."""
    nd = layout.num_decodes
    fill_positions: list[int] = []
    fill_rows: list[int] = []
    flat_ids = []
    for i, (st, p) in enumerate(zip(layout.states[:nd], layout.starts[:nd].tolist())):
        if p < len(st.token_ids):
            flat_ids.append(st.token_ids[p])
        else:  # the token the running step is sampling: taken from the device after the upload
            flat_ids.append(0)
            fill_positions.append(i)
            fill_rows.append(pending_rows[id(st)])
    for st, a, b in zip(layout.states[nd:], layout.starts[nd:].tolist(), layout.ends[nd:].tolist()):
        flat_ids.extend((st.token_ids + st.draft_token_ids if st.draft_token_ids else st.token_ids)[a:b])
    return (np.asarray(flat_ids, dtype=np.int64), np.asarray(fill_positions, dtype=np.int64),
            np.asarray(fill_rows, dtype=np.int64))


def _logits_indices(layout: BatchLayout, query_start_loc: np.ndarray) -> np.ndarray:
    """Flat indices of the tokens whose logits sample: each sampling sequence's last token, and before it
    the input token and drafts of one that verifies d drafts (its last d + 1 tokens, in order)."""
    last = query_start_loc[1:][layout.samples].astype(np.int64) - 1
    rows = np.fromiter((len(st.draft_token_ids) + 1 for st, yes in zip(layout.states, layout.samples) if yes),
                       np.int64, len(last))
    if not len(rows) or rows.max() == 1:
        return last
    first_of_seq = np.repeat(last - rows + 1, rows)
    offset = np.arange(int(rows.sum())) - np.repeat(np.cumsum(rows) - rows, rows)
    return first_of_seq + offset


def _positions(layout: BatchLayout) -> np.ndarray:
    """The position of every token: decodes are their start; prefills an arange each."""
    nd, starts, ends = layout.num_decodes, layout.starts, layout.ends
    if len(layout.order) > nd:
        return np.concatenate([starts[:nd]] + [np.arange(a, b) for a, b in zip(starts[nd:], ends[nd:])])
    return starts


def long_rope_restarts(requests: dict[str, RequestState], scheduled: dict[str, int],
                       long_rope: LongRopeRows) -> set[str]:
    """Requests whose cached keys must be recomputed with LongRoPE's long factors this step.

    transformers rotates all of a sequence's tokens with the short factors while it is at most
    `original_max` tokens long and with the long ones after: `generate` drops its cache and recomputes the
    whole sequence on the step that crosses (Phi3ForCausalLM.prepare_inputs_for_generation). A request
    crosses at the decode of position `original_max` when its prompt was short; that step recomputes it
    from its first token (its blocks are already allocated). The scheduler counted one token for it. A
    request recomputed after a preemption with more tokens than that was long from its first chunk."""
    switch = long_rope.original_max
    return {rid for rid, n in scheduled.items()
            if n == 1 and requests[rid].num_computed_tokens == switch and requests[rid].num_prompt_tokens <= switch
            and len(requests[rid].token_ids) <= switch + 1}  # the newest token may still be on the device


def _rope_rows(layout: BatchLayout, positions: np.ndarray, long_rope: LongRopeRows) -> np.ndarray:
    """Each token's row in a LongRoPE cos/sin cache: in the long table when its sequence is longer than
    the switch point (every known token counted, so a prompt split into chunks, or recomputed after a
    preemption, is rotated as transformers rotates it in one pass)."""
    long_seqs = layout.known > long_rope.original_max
    return positions + long_rope.long_offset * np.repeat(long_seqs, layout.counts)


def _block_table(states: list[RequestState]) -> np.ndarray:
    """[S, max_blocks] int32; entries past a request's blocks are 0 (never read)."""
    max_blocks = max(st.num_blocks for st in states)
    table = np.zeros((len(states), max_blocks), dtype=np.int32)
    for i, st in enumerate(states):
        table[i, : st.num_blocks] = st.block_table[: st.num_blocks]
    return table


def _slots(table: np.ndarray, counts: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    seq_of_token = np.repeat(np.arange(len(counts)), counts)
    return table[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size


def attention_metadata(layout: BatchLayout, host: HostArrays, dev: dict[str, torch.Tensor]) -> AttentionMetadata:
    nd = layout.num_decodes
    return AttentionMetadata(
        slot_mapping=dev["slots"],
        query_start_loc=dev["query_start_loc"],
        seq_lens=dev["seq_lens"],
        context_lens=dev["context_lens"],
        block_tables=dev["block_table"].view(host.block_table.shape),
        num_decodes=nd,
        num_decode_tokens=nd,
        max_query_len=int(layout.counts.max()),
        max_seq_len=int(layout.ends.max()),
        seq_lens_host=host.seq_lens.tolist(),
        query_lens_host=layout.counts.tolist(),
    )


def upload_host_arrays(host: HostArrays, device: torch.device) -> dict[str, torch.Tensor]:
    """Views of the device copy, by field name. Two host-to-device copies per step (one per dtype) from
    pinned staging buffers: a copy from pageable memory may wait for the device, which would serialise the
    host with the running step."""
    views: dict[str, torch.Tensor] = {}
    for names, dtype in ((HostArrays.INT64, np.int64), (HostArrays.INT32, np.int32)):
        views.update(zip(names, upload([getattr(host, n).reshape(-1) for n in names], dtype, device)))
    return views


def upload(arrays: list[np.ndarray], dtype: type, device: torch.device) -> list[torch.Tensor]:
    """Pack same-dtype host arrays into one (pinned, on CUDA) buffer, copy it to the device without
    blocking, and return per-array views of the device copy.

    Every array starts on a 16-byte boundary: Triton compiles one kernel variant per pointer alignment
    class, so views at offsets that vary from step to step would compile new variants mid-serving
    (about a second each, every request waiting)."""
    itemsize = 8 if dtype is np.int64 else 4
    per_16 = 16 // itemsize
    sizes = [a.size for a in arrays]
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += -(-n // per_16) * per_16
    tdtype = torch.int64 if dtype is np.int64 else torch.int32
    cuda = device.type == "cuda"
    host = torch.empty(max(total, 1), dtype=tdtype, pin_memory=cuda)
    packed = host.numpy()
    for a, start, n in zip(arrays, starts, sizes):
        packed[start : start + n] = a
    dev = host.to(device, non_blocking=True) if cuda else host
    return [dev[start : start + n] for start, n in zip(starts, sizes)]
