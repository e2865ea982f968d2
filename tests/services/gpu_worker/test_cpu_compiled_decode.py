"""The compiled CPU decode path (--compile-decode): its attention operator equals the torch backend's
attention after the cache write, it says why it is off where it does not apply, and a graph that fails to
compile leaves the worker eager. Its end-to-end agreement with the float32 forward is in
tests/headrace/test_gguf_quantized_agreement.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from headrace.services.gpu_worker import cpu_compiled_decode
from headrace.services.gpu_worker.attention.base import AttentionMetadata
from headrace.services.gpu_worker.attention.torch_backend import TorchAttentionBackend, attend, write_kv
from headrace.services.gpu_worker.kv_cache import allocate_kv_caches


@pytest.mark.parametrize("num_keys", [1, 37, 300])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_one_row_attention_equals_the_backends_attend(num_keys, softcap):
    """The one-row graph's attention (sums over broadcast operands) against `attend` (SDPA, or the soft-capped
    form), eagerly and compiled: float32 either way, so within float32 rounding."""
    g = torch.Generator().manual_seed(num_keys)
    q = torch.randn(1, 9, 64, generator=g).bfloat16()
    k, v = (torch.randn(num_keys, 3, 64, generator=g).bfloat16() for _ in range(2))
    expected = attend(q[:, None], k[None], v[None], None, 0.125, softcap)[:, 0].float()
    compiled = torch.compile(cpu_compiled_decode.one_row_attention, fullgraph=True)
    for fn in (cpu_compiled_decode.one_row_attention, compiled):
        got = fn(q, k, v, 0.125, softcap).float()
        torch.testing.assert_close(got, expected, rtol=0, atol=2 ** -7)  # bf16 outputs: one rounding step apart


@pytest.mark.parametrize("lens", [[40], [17], [40, 17, 33, 64]])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_decode_attention_equals_the_backend_after_the_cache_write(lens, softcap):
    g = torch.Generator().manual_seed(len(lens))
    heads, kv_heads, dim, bs, num_blocks = 6, 2, 16, 16, 32
    (k_cache, v_cache), = allocate_kv_caches(1, num_blocks, bs, kv_heads, dim, torch.bfloat16, torch.device("cpu"))
    k_cache.copy_(torch.randn(k_cache.shape, generator=g))
    v_cache.copy_(torch.randn(v_cache.shape, generator=g))
    rows = len(lens)
    width = max(-(-n // bs) for n in lens)
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: rows * width].view(rows, width).to(torch.int32)
    q = torch.randn(rows, heads, dim, generator=g).bfloat16()
    k = torch.randn(rows, kv_heads, dim, generator=g).bfloat16()
    v = torch.randn(rows, kv_heads, dim, generator=g).bfloat16()
    slots = torch.tensor([int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(lens)])

    n = torch.tensor(lens)
    visible = torch.arange(max(lens))[None, :] < n[:, None]
    blocks = tables[:, : -(-max(lens) // bs)].reshape(-1).long()
    ours = torch.ops.headrace.decode_attention(q, k, v, k_cache, v_cache, blocks, visible, n - 1, 0.25, softcap)

    write_kv(k, v, (k_cache, v_cache), slots)  # the eager path: write, then attend over the cache
    meta = AttentionMetadata(slots, torch.arange(rows + 1, dtype=torch.int32), n.to(torch.int32),
                             n.to(torch.int32) - 1, tables, rows, rows, 1, max(lens), seq_lens_host=lens,
                             query_lens_host=[1] * rows)
    backend = TorchAttentionBackend(bs)
    backend.prepare(meta)
    expected = backend.attend(q, k, v, (k_cache, v_cache), meta, 0.25, softcap=softcap or None)
    assert torch.equal(ours, expected)


def _model(window=None, moe=False):
    mlp = cpu_compiled_decode.MoEBlock.__new__(cpu_compiled_decode.MoEBlock) if moe else object()
    return SimpleNamespace(layers=[SimpleNamespace(self_attn=SimpleNamespace(window=window), mlp=mlp)],
                           modules=lambda: [])


def test_it_says_why_it_is_off():
    cpu = torch.device("cpu")
    caches = allocate_kv_caches(1, 4, 16, 2, 8, torch.bfloat16, cpu)
    reason = cpu_compiled_decode.unsupported_reason
    assert reason(_model(), caches, None, 1, 1, cpu) is None
    assert "cuda" in reason(_model(), caches, None, 1, 1, torch.device("cuda"))
    assert "parallelism" in reason(_model(), caches, None, 2, 1, cpu)
    assert "parallelism" in reason(_model(), caches, None, 1, 2, cpu)
    assert "LongRoPE" in reason(_model(), caches, object(), 1, 1, cpu)
    assert "window" in reason(_model(window=4096), caches, None, 1, 1, cpu)
    assert "mixture-of-experts" in reason(_model(moe=True), caches, None, 1, 1, cpu)
    fp8 = allocate_kv_caches(1, 4, 16, 2, 8, torch.float8_e4m3fn, cpu)
    assert "float8" in reason(_model(), fp8, None, 1, 1, cpu)


def test_a_graph_that_does_not_compile_leaves_the_worker_eager(monkeypatch):
    def fail(self, log=None):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_compiled_decode.CompiledDecode, "warm_up", fail)
    lines = []
    cpu = torch.device("cpu")
    caches = allocate_kv_caches(1, 4, 16, 2, 8, torch.bfloat16, cpu)
    runner = cpu_compiled_decode.maybe_compile_decode(True, _model(), caches, torch.zeros(8, 8), 16, 16, None, 1, 1,
                                                      cpu, lines.append)
    assert runner is None
    assert lines == ["--compile-decode: compiling failed (RuntimeError: no C++ compiler); decode steps run eagerly"]
    assert cpu_compiled_decode.maybe_compile_decode(False, _model(), caches, torch.zeros(8, 8), 16, 16, None, 1, 1,
                                                    cpu, lines.append) is None
    assert len(lines) == 1  # not asked for: nothing said


@pytest.mark.slow
def test_float32_decode_steps_compiled_equal_eager_token_for_token():
    """A float32 model (QK-norm, grouped KV) decoded alone and twelve at a time: the compiled graphs give the
    eager path's tokens (measured equal for tiny Llama, Qwen3, Falcon and Mistral presets)."""
    from headrace.common.sampling_params import SamplingParams
    from headrace.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[5 + i, 17, 33, 2 + i] * (5 + i) for i in range(12)]
    outputs, replays = {}, None
    for compiled in (False, True):
        llm = LLM("random:tiny-qwen3", compile_decode=compiled, cpu_threads=2, max_model_len=256, dtype="float32",
                  log=lambda *_: None)
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:2]]
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        outputs[compiled] = (alone, together)
        if compiled:
            replays = llm.engine.runner.compiled_decode.num_replays
            assert llm.engine.runner.compiled_decode.num_direct == 2  # one row; 2+ rows (no branch on rows)
            graphs = llm.engine.runner.compiled_decode
            assert (graphs.graph_for(1).wrapper, graphs.graph_for(2).wrapper) == ("C++", "Python")
    assert outputs[True] == outputs[False]
    assert replays >= 2 * (40 - 16) + 20  # both graphs ran: each prompt alone, then the twelve


@pytest.mark.slow
def test_a_cpp_wrapper_that_fails_leaves_the_one_row_graph_on_the_python_wrapper(monkeypatch):
    import torch._inductor.compile_fx as inductor

    from headrace.common.sampling_params import SamplingParams
    from headrace.llm import LLM

    compile_fx = inductor.compile_fx

    def no_cpp_wrapper(gm, example_inputs, config_patches=None, **kwargs):
        if (config_patches or {}).get("cpp_wrapper"):
            raise RuntimeError("C++ wrapper not built")
        return compile_fx(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", no_cpp_wrapper)
    llm = LLM("random:tiny-qwen3", compile_decode=True, cpu_threads=2, max_model_len=256, dtype="float32",
              log=lambda *_: None)
    graphs = llm.engine.runner.compiled_decode
    assert graphs.graph_for(1).wrapper == "Python" and graphs.num_direct == 2
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    assert len(llm.generate([[5, 17, 33] * 8], params, use_tqdm=False)[0].outputs[0].token_ids) == 30
    assert graphs.num_replays > 0
