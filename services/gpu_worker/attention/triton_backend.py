"""The `triton` attention backend: fused RoPE + KV write, then paged attention kernels (GPU).

One step's flat batch is decodes first, then prefill chunks. RoPE and the cache write run once over the
whole batch (`write_cache`, one kernel whose launch depends on the token count alone: piecewise CUDA
graphs capture it); the decode rows go to the split-K decode kernel, the prefill rows to the prefill
kernel (`attend`). Neither reads a device value on the host, so a decode-only step can be captured whole
in a CUDA graph: every launch parameter (grid, number of KV splits) depends only on tensor shapes.
An fp8 cache is written quantized by the RoPE kernel and read back by both attention kernels; prefill rows
then read this step's keys from the cache too (quantized like the rest), not from the contiguous k / v.
"""

from __future__ import annotations

import torch

from headrace.kernels import _utils
from headrace.kernels.kv_fp8 import is_fp8
from headrace.kernels.paged_decode_attention import default_num_kv_splits, paged_decode_attention
from headrace.kernels.prefill_attention import paged_prefill_attention
from headrace.kernels.rope_kv import rope_and_cache
from headrace.services.gpu_worker.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    # The decode path has no host syncs or host loops, and there is nothing to prepare per step.
    supports_cuda_graphs = True

    def write_cache(self, q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping, kv_scale=(1.0, 1.0)):
        if not q.is_cuda and not _utils.interpret_mode():
            raise RuntimeError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                               "use --attention-backend torch")
        return rope_and_cache(q, k, v, positions, cos_sin_cache, kv_cache[0], kv_cache[1], slot_mapping, kv_scale)

    def attend(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, window=None, softcap=None,
               kv_scale=(1.0, 1.0)):
        # window and softcap are the layer's constants (a captured graph bakes them in, as it does the scale).
        k_cache, v_cache = kv_cache
        nd, ns = meta.num_decodes, meta.num_seqs
        decode_out = None
        if nd:
            tables = meta.block_tables[:nd]
            # From shapes only (the table width is static in a captured graph), never from seq_lens values; a
            # windowed layer reads at most `window` keys, so it splits those, not the table's width.
            max_context = tables.shape[1] * k_cache.shape[1]
            if window:
                max_context = min(max_context, window)
            splits = default_num_kv_splits(nd, k_cache.shape[2], k_cache.shape[3], max_context, q.device)
            decode_out = paged_decode_attention(q[:nd], k_cache, v_cache, tables, meta.seq_lens[:nd], scale, splits,
                                                window=window, softcap=softcap, kv_scale=kv_scale)
            if nd == ns:
                return decode_out
        # Prefill rows keep their absolute offsets into the flat batch: the kernel writes only the rows that
        # query_start_loc[nd:] covers, so the decode rows are filled from decode_out below (no rebase, no cat).
        # This step's keys/values are read from k and v (contiguous rows), the cached prefix from the cache
        # (with an fp8 cache, everything from the cache).
        new = (None, None) if is_fp8(k_cache.dtype) else (k, v)
        out = paged_prefill_attention(q, k_cache, v_cache, meta.block_tables[nd:], meta.query_start_loc[nd:],
                                      meta.seq_lens[nd:], meta.context_lens[nd:], meta.max_query_len, scale,
                                      k_new=new[0], v_new=new[1], window=window, softcap=softcap, kv_scale=kv_scale)
        if decode_out is not None:
            out[: meta.num_decode_tokens].copy_(decode_out)
        return out

    def warm_up(self, kv_cache, num_heads: int, max_num_seqs: int, max_query_len: int,
                softcap: float | None = None, q_dtype: torch.dtype | None = None) -> None:
        """Compile every launch configuration serving can pick: the decode kernel's two tile sizes (few vs
        many programs), each with one split (stage 1 writes the output) and with several, and the prefill
        kernel's short- and long-prompt tiles, all with the model's soft-cap (a compile-time switch; the
        window is a plain argument). The kernels do not specialise on the integers that vary per step, so
        these are all the variants there are for this model."""
        k_cache, v_cache = kv_cache
        _, block_size, _, head_dim = k_cache.shape
        dev, dtype = k_cache.device, q_dtype or k_cache.dtype
        max_blocks = -(-max(max_query_len, 1) // block_size)
        for batch in sorted({1, max_num_seqs}):
            q = torch.zeros(batch, num_heads, head_dim, dtype=dtype, device=dev)
            tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=dev)
            lens = torch.ones(batch, dtype=torch.int32, device=dev)
            for splits in (1, 2):
                paged_decode_attention(q, k_cache, v_cache, tables, lens, 1.0, splits, softcap=softcap)
        for tokens in sorted({min(16, max_query_len), min(2048, max_query_len)}):
            q = torch.zeros(tokens, num_heads, head_dim, dtype=dtype, device=dev)
            tables = torch.zeros(1, -(-tokens // block_size), dtype=torch.int32, device=dev)
            qsl = torch.tensor([0, tokens], dtype=torch.int32, device=dev)
            lens = torch.tensor([tokens], dtype=torch.int32, device=dev)
            ctx = torch.zeros(1, dtype=torch.int32, device=dev)
            kv = None if is_fp8(k_cache.dtype) else torch.zeros(tokens, k_cache.shape[2], head_dim, dtype=dtype,
                                                                 device=dev)
            paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, ctx, tokens, 1.0, k_new=kv, v_new=kv,
                                    softcap=softcap)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
