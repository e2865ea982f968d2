"""The triton backend equals the torch oracle: on random mixed batches (decodes + chunked prefills over
cached prefixes, GQA, random block tables) and as the attention of a whole model (same greedy tokens).

Without CUDA the kernels run in Triton's CPU interpreter, switched on before any kernel module is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from headrace.common.sampling_params import SamplingParams  # noqa: E402
from headrace.services.gpu_worker.attention.base import AttentionMetadata  # noqa: E402
from headrace.services.gpu_worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from headrace.services.gpu_worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from headrace.services.gpu_worker.model_runner import ModelRunner  # noqa: E402
from tests.services.gpu_worker.plan_driver import PlanDriver, capture_logits  # noqa: E402
from tests.configs import resolved

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ATOL = 5e-2 if DTYPE == torch.bfloat16 else 1e-4  # bf16: P is rounded before the PV dot


def make_batch(shapes: list[tuple[int, int]], num_decodes: int, heads: int, kv_heads: int, head_dim: int,
               block_size: int, g: torch.Generator):
    """A flat batch over a random paged cache. shapes: (tokens already cached, tokens this step) per
    sequence, decodes (one token) first. q/k/v are strided views of one fused qkv tensor, as in the model."""
    num_blocks = sum(-(-(c + n) // block_size) for c, n in shapes) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables, slots, positions = [], [], []
    for ctx, n in shapes:
        tables.append([perm.pop() for _ in range(-(-(ctx + n) // block_size))])
        positions += range(ctx, ctx + n)
        slots += [tables[-1][p // block_size] * block_size + p % block_size for p in range(ctx, ctx + n)]
    width = max(len(t) for t in tables) + 2  # spare columns point at a real (unused) block: never read
    table = torch.tensor(perm[:1] * width * len(shapes), dtype=torch.int32).view(len(shapes), width)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    qlens = [n for _, n in shapes]
    t = sum(qlens)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0] + qlens).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor([c + n for c, n in shapes], dtype=torch.int32),
        context_lens=torch.tensor([c for c, _ in shapes], dtype=torch.int32),
        block_tables=table, num_decodes=num_decodes, num_decode_tokens=num_decodes, max_query_len=max(qlens),
        max_seq_len=max(c + n for c, n in shapes),
        seq_lens_host=[c + n for c, n in shapes], query_lens_host=qlens)
    cos_sin = torch.randn(max(positions) + 1, head_dim, generator=g)
    return (q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim),
            torch.tensor(positions, dtype=torch.int64), cos_sin, (k_cache, v_cache), meta)


def to_device(x):
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE, DTYPE if x.is_floating_point() else x.dtype)
    if isinstance(x, tuple):
        return tuple(to_device(y) for y in x)
    return x


def run_both(batch, scale: float, window: int | None = None, softcap: float | None = None):
    """(torch output, torch caches, triton output, triton caches) on private copies of the batch."""
    q, k, v, pos, cos_sin, (kc, vc), meta = batch
    cos_sin = cos_sin.to(DEVICE)  # float32, as the runner keeps it
    results = []
    for backend in (TorchAttentionBackend(block_size=kc.shape[1]), TritonAttentionBackend()):
        qkv = torch.cat([q, k, v], dim=1).reshape(q.shape[0], -1)  # fresh fused storage per backend
        qkv = to_device(qkv)
        hq, hk = q.shape[1], k.shape[1]
        d = q.shape[2]
        q2, k2, v2 = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        caches = (to_device(kc.clone()), to_device(vc.clone()))
        m = AttentionMetadata(**{f: to_device(getattr(meta, f)) for f in meta.__dataclass_fields__})
        out = backend.forward(q2.view(-1, hq, d), k2.view(-1, hk, d), v2.view(-1, hk, d), pos.to(DEVICE),
                              cos_sin, caches, m, scale, window, softcap)
        results += [out.float().cpu(), tuple(c.float().cpu() for c in caches)]
    return results


@pytest.mark.parametrize("seed", range(4))
def test_random_mixed_batch_matches_torch(seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))  # noqa: E731
    kv_heads, group = rand(1, 3), rand(1, 4)
    head_dim = [16, 32][rand(0, 2)]
    block_size = [8, 16][rand(0, 2)]
    decodes = [(rand(0, 70), 1) for _ in range(rand(0, 4))]
    # chunked prefills: some with a cached prefix (a later chunk), some from scratch
    prefills = [(rand(0, 2) * rand(1, 40), rand(2, 30)) for _ in range(rand(1 if not decodes else 0, 4))]
    shapes = decodes + prefills
    batch = make_batch(shapes, len(decodes), kv_heads * group, kv_heads, head_dim, block_size, g)
    ref_out, ref_caches, out, caches = run_both(batch, head_dim ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=ATOL)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["decode-only", "prefill-only", "one-token-prompt"])
def test_batch_kinds(kind):
    g = torch.Generator().manual_seed(7)
    shapes, nd = {"decode-only": ([(40, 1), (3, 1), (17, 1)], 3),
                  "prefill-only": ([(0, 19), (16, 9)], 0),
                  "one-token-prompt": ([(0, 1), (8, 1), (0, 12)], 2)}[kind]
    batch = make_batch(shapes, nd, 8, 2, 32, 16, g)
    ref_out, ref_caches, out, caches = run_both(batch, 0.2)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=ATOL)
    for got, want in zip(caches, ref_caches):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("window,softcap", [(1, None), (7, None), (20, 1.5), (None, 1.5)])
def test_window_and_softcap_match_torch(window, softcap):
    """Decodes and chunked prefills (cached prefixes longer than the window) through a windowed or
    soft-capped layer."""
    g = torch.Generator().manual_seed(11)
    shapes = [(40, 1), (3, 1), (30, 1), (0, 27), (25, 9), (50, 3)]
    batch = make_batch(shapes, 3, 8, 2, 32, 8, g)
    ref_out, _, out, _ = run_both(batch, 0.2, window, softcap)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=ATOL)


def make_runner(backend: str, model: str = "tiny-llama") -> ModelRunner:
    # float32 on a GPU too: the comparison below is about attention, not bf16 rounding.
    cfg = EngineConfig(model=ModelConfig(model=f"random:{model}", dtype="float32", max_model_len=256, seed=3),
                       cache=CacheConfig(num_blocks=64, block_size=8), attention_backend=backend,
                       device=DEVICE.type, enforce_eager=True)
    return ModelRunner(resolved(cfg), log=lambda *_: None)




class Lockstep:
    """Runs every plan on the torch oracle and on the triton runner. Each step's logits must agree; the
    tokens must too (on a GPU, where Triton's fp32 dots run in tf32, except at a near tie of the oracle's
    top two). The triton runner then continues from the oracle's token, so one near tie cannot derail
    the rest of the comparison."""

    def __init__(self, oracle: ModelRunner, other: ModelRunner):
        self.oracle, self.other, self.block_size = oracle, other, oracle.block_size
        self.oracle_logits, self.other_logits = capture_logits(oracle), capture_logits(other)
        self.compared = 0

    def execute(self, plan):
        want, got = self.oracle.execute(plan), self.other.execute(plan)
        assert got.req_ids == want.req_ids
        if want.req_ids:
            ref, out = self.oracle_logits[-1], self.other_logits[-1]
            torch.testing.assert_close(out, ref, atol=LOGIT_TOL, rtol=0)
            top2 = ref.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1] > 2 * LOGIT_TOL).tolist()
            for rid, a, b, must in zip(want.req_ids, got.sampled_token_ids, want.sampled_token_ids, clear):
                assert a == b or (DEVICE.type == "cuda" and not must), f"{rid}: token {a} vs {b}"
                self.other.requests[rid].token_ids[-1] = b
            self.compared += len(want.req_ids)
        return want


LOGIT_TOL = 1e-2 if DEVICE.type == "cuda" else 1e-4


def test_tiny_model_greedy_tokens_match_torch_backend():
    """Prompts of mixed lengths, prefilled in chunks of 5 (later chunks read a cached prefix) and decoded
    together: the triton backend gives the torch backend's logits and greedy tokens at every step."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 11, 17)]
    triton_runner = make_runner("triton")
    assert triton_runner.backend.name == "triton"
    lockstep = Lockstep(make_runner("torch"), triton_runner)
    outs = PlanDriver(lockstep, chunk_size=5).generate(prompts, SamplingParams(temperature=0.0), 6)
    assert [len(o) for o in outs] == [6, 6, 6] and lockstep.compared == 18


@pytest.mark.parametrize("model", ["tiny-gemma2", "tiny-gemma3"])
def test_windowed_models_greedy_tokens_match_torch_backend(model):
    """Windowed and global layers, soft-caps and Gemma 3's local RoPE through the triton backend: prompts
    longer than the window, chunks of 5, then decode steps past the window."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (8, 19)]
    lockstep = Lockstep(make_runner("torch", model), make_runner("triton", model))
    outs = PlanDriver(lockstep, chunk_size=6).generate(prompts, SamplingParams(temperature=0.0), 4)
    assert [len(o) for o in outs] == [4, 4] and lockstep.compared == 8


def _compiled_variants(kernel) -> int | None:
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        return None
    return sum(len(entry[0]) for entry in caches.values())


def test_warm_up_compiles_every_variant_serving_reaches():
    """After warm_up no step shape compiles a new kernel variant (a mid-serving compile stalls every
    request for about a second). In the interpreter nothing compiles: warm_up just has to run."""
    from headrace.kernels import paged_decode_attention as dec
    from headrace.kernels import prefill_attention as pre

    heads, kv_heads, head_dim, block_size = 8, 2, 64 if DEVICE.type == "cuda" else 16, 16
    cache = [torch.zeros(64 if DEVICE.type == "cuda" else 8, block_size, kv_heads, head_dim, dtype=DTYPE,
                         device=DEVICE) for _ in range(2)]
    backend = TritonAttentionBackend()
    max_seqs, max_query = (256, 2048) if DEVICE.type == "cuda" else (4, 32)
    backend.warm_up(tuple(cache), heads, max_seqs, max_query)
    kernels = [dec._decode_stage1_kernel, dec._decode_stage2_kernel, pre._prefill_kernel]
    before = [_compiled_variants(k) for k in kernels]
    if DEVICE.type != "cuda" or None in before:
        return
    g = torch.Generator().manual_seed(0)
    # Widths and batch sizes that hit every integer class (1, multiples of 16, others) and split count.
    for batch in (1, 2, 3, 16, 17, 64, 255):
        for width in (1, 2, 16, 17, 33, 64, 128):
            q = torch.randn(batch, heads, head_dim, generator=g).to(DEVICE, DTYPE)
            tables = torch.randint(0, 64, (batch, width), dtype=torch.int32).to(DEVICE)
            lens = torch.full((batch,), width * block_size, dtype=torch.int32, device=DEVICE)
            dec.paged_decode_attention(q, cache[0], cache[1], tables, lens, 1.0)
    for tokens in (1, 5, 16, 100, 2048):
        q = torch.randn(tokens, heads, head_dim, generator=g).to(DEVICE, DTYPE)
        width = -(-tokens // block_size)
        tables = torch.randint(0, 64, (1, width), dtype=torch.int32).to(DEVICE)
        qsl = torch.tensor([0, tokens], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([tokens], dtype=torch.int32, device=DEVICE)
        # Serving passes this step's K/V as views of the QKV output (eager) or as contiguous buffers (graphs).
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, DTYPE)
        k_view = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        for k_new in (k_view, k_view.contiguous()):
            pre.paged_prefill_attention(q, cache[0], cache[1], tables, qsl, lens, torch.zeros_like(lens), tokens,
                                        1.0, k_new=k_new, v_new=k_new)
    torch.cuda.synchronize()
    assert [_compiled_variants(k) for k in kernels] == before
