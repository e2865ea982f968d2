"""Tests for the batched sampler (services/gpu_worker/sampler.py). CPU only, fast."""

from __future__ import annotations

import math

import pytest
import torch

from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    build_sampling_inputs,
    hash_uniform,
)
from tests.kernels.kernel_testing import py_hash_uniform

CPU = torch.device("cpu")
EOS = 3


def row(seed: int = 0, output: list[int] | None = None, prompt: list[int] | None = None, **kw) -> SamplingRow:
    return SamplingRow.from_parts(
        params=SamplingParams(max_tokens=None, **kw),
        seed=seed,
        prompt_token_ids=prompt if prompt is not None else [1, 2],
        output_token_ids=output if output is not None else [],
        eos_token_ids=(EOS,),
    )


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return Sampler()(logits, build_sampling_inputs(rows, logits.shape[-1], CPU))


def gen_logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# --------------------------------------------------------------------------- hash noise


def test_hash_matches_unsigned_reference_and_is_in_open_interval():
    seeds = [0, 1, 12345, -1, 2**63 - 1, -(2**63)]
    steps = [0, 7, 1, 1000, 3, 2**40]
    u = hash_uniform(torch.tensor(seeds), torch.tensor(steps), 64)
    for b, (s, k) in enumerate(zip(seeds, steps)):
        for v in (0, 1, 31, 63):
            assert u[b, v].item() == py_hash_uniform(s & (2**64 - 1), k, v)
    big = hash_uniform(torch.arange(200), torch.zeros(200, dtype=torch.int64), 1000)
    assert 0.0 < big.min().item() and big.max().item() < 1.0
    assert abs(big.mean().item() - 0.5) < 0.01


# --------------------------------------------------------------------------- greedy


def test_greedy_is_argmax():
    logits = gen_logits(8, 50)
    inputs = build_sampling_inputs([row(temperature=0.0) for _ in range(8)], 50, CPU)
    assert inputs.all_greedy and inputs.temperature is None
    out = Sampler()(logits, inputs)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_mixed_batch_greedy_rows_unaffected():
    logits = gen_logits(10, 40, seed=1)
    rows = [row(seed=i, temperature=0.0) if i % 2 == 0 else row(seed=i, temperature=1.5, top_k=5) for i in range(10)]
    got = sample(logits, rows).sampled_token_ids
    assert torch.equal(got[0::2], logits[0::2].argmax(-1))
    # The random rows actually sampled (not all argmax) across a few steps.
    draws = [sample(logits, [row(seed=i, output=[0] * k, temperature=1.5) for i in range(10)]) for k in range(5)]
    assert any(not torch.equal(d.sampled_token_ids, logits.argmax(-1)) for d in draws)


def test_tiny_temperature_is_greedy():
    logits = gen_logits(4, 30, seed=2)
    assert torch.equal(sample(logits, [row(temperature=1e-7) for _ in range(4)]).sampled_token_ids, logits.argmax(-1))


# --------------------------------------------------------------------------- reproducibility


def test_seeded_sampling_reproducible_across_batch_positions():
    V = 500
    target = torch.zeros(V)  # uniform: the draw is entirely up to the noise
    r = row(seed=42, output=[5, 6, 7], temperature=1.0)
    a = sample(torch.stack([target, gen_logits(1, V, 3)[0]]), [r, row(seed=1, temperature=0.8)])
    b = sample(
        torch.stack([gen_logits(1, V, 4)[0], torch.zeros(V), target, torch.zeros(V)]),
        [row(seed=7, temperature=0.0), row(seed=9, top_p=0.5), r, row(seed=3, output=[1] * 9, min_p=0.1)],
    )
    assert a.sampled_token_ids[0] == b.sampled_token_ids[2]
    assert a.sampled_token_ids[0] == sample(target[None], [r]).sampled_token_ids[0]


def test_different_seeds_and_steps_give_different_draws():
    V = 1000
    logits = torch.zeros(64, V)
    by_seed = sample(logits, [row(seed=s, temperature=1.0) for s in range(64)]).sampled_token_ids
    by_step = sample(logits, [row(seed=5, output=[0] * k, temperature=1.0) for k in range(64)]).sampled_token_ids
    assert len(set(by_seed.tolist())) > 55  # ~62 expected for 64 draws over 1000 tokens
    assert len(set(by_step.tolist())) > 55


# --------------------------------------------------------------------------- statistics


def _draws(logits_row: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """n draws of one distribution: many seeds and steps, batched as n rows."""
    rows = [row(seed=1000 + i, output=[0] * (i % 7), **kw) for i in range(n)]
    return sample(logits_row.expand(n, -1).contiguous(), rows).sampled_token_ids


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    exp = probs.double() * tokens.numel()
    assert counts[exp == 0].sum() == 0, "sampled a zero-probability token"
    keep = exp > 0
    return (((counts - exp) ** 2)[keep] / exp[keep]).sum().item()


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.2, 0.7])
    probs = torch.softmax(logits / 0.7, -1)
    tokens = _draws(logits, 20000, temperature=0.7)
    # chi-square with 7 dof: 99.9999% quantile is ~ 40.
    assert _chi2(tokens, probs) < 40
    freq = torch.bincount(tokens, minlength=8).double() / tokens.numel()
    assert (freq - probs.double()).abs().max() < 0.02


def test_single_seed_over_steps_matches_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n = 20000
    inputs = build_sampling_inputs([row(seed=7, temperature=1.0)] * n, 4, CPU)
    inputs.steps = torch.arange(n)  # same as output lengths 0..n-1, without building n long lists
    tokens = Sampler()(logits.expand(n, -1).contiguous(), inputs).sampled_token_ids
    assert _chi2(tokens, torch.softmax(logits, -1)) < 30


def _ref_filtered_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    x = logits.double() / temperature
    p = torch.softmax(x, -1)
    keep = p >= min_p * p.max()
    order = torch.argsort(x, descending=True)
    if top_k:
        keep[order[top_k:]] = False
    x = x.masked_fill(~keep, -math.inf)
    p = torch.softmax(x, -1)[order]
    before = p.cumsum(0) - p
    drop = order[before >= top_p]
    x[drop] = -math.inf
    return torch.softmax(x, -1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=5),
        dict(top_p=0.6),
        dict(min_p=0.2),
        dict(top_k=8, top_p=0.8, temperature=1.3),
        dict(top_k=6, min_p=0.05, temperature=0.6),
        dict(top_p=0.9, min_p=0.1, temperature=1.7),
    ],
)
def test_filters_never_emit_filtered_tokens_and_match_distribution(kw):
    logits = torch.randn(32, generator=torch.Generator().manual_seed(11)) * 1.5
    ref = _ref_filtered_probs(logits, **kw)
    tokens = _draws(logits, 20000, **kw)
    allowed = set(torch.nonzero(ref > 0).flatten().tolist())
    assert set(tokens.unique().tolist()) <= allowed
    assert 1 < len(allowed) < 32  # the filter is doing something
    dof = len(allowed) - 1
    assert _chi2(tokens, ref) < dof + 8 * math.sqrt(2 * dof) + 10


def test_top_k_only_mixed_with_disabled_rows():
    # Exercises the partial-sort (topk) path with rows of different k, and k disabled.
    logits = gen_logits(1, 64, seed=5)[0]
    order = torch.argsort(logits, descending=True)
    n = 3000
    ks = [0, 1, 4, 9]
    rows = [row(seed=i, output=[0] * (i % 5), top_k=ks[i % 4], temperature=2.0) for i in range(n)]
    toks = sample(logits.expand(n, -1).contiguous(), rows).sampled_token_ids
    for j, k in enumerate(ks):
        got = set(toks[j::4].tolist())
        if k:
            assert got <= set(order[:k].tolist())
        else:
            assert len(got) > 20
    assert set(toks[1::4].tolist()) == {order[0].item()}


def test_tiny_top_p_keeps_top_token():
    logits = gen_logits(50, 20, seed=6)
    rows = [row(seed=i, top_p=1e-6, temperature=2.0) for i in range(50)]
    assert torch.equal(sample(logits, rows).sampled_token_ids, logits.argmax(-1))


# --------------------------------------------------------------------------- penalties


def _ref_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone()
    for b, r in enumerate(rows):
        p = r.params
        for v in range(logits.shape[1]):
            x = out[b, v].item()
            c = r.output_token_ids.count(v)
            if v in r.prompt_token_ids or c > 0:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            x -= p.frequency_penalty * c
            x -= p.presence_penalty * (c > 0)
            out[b, v] = x
    return out


def test_penalties_transform_logits_exactly():
    V = 12
    logits = gen_logits(4, V, seed=7)
    rows = [
        row(prompt=[0, 1, 1, 5], output=[2, 2, 2, 5, 9], repetition_penalty=1.7),
        row(prompt=[3], output=[4, 4, 7], frequency_penalty=0.5, presence_penalty=-0.8),
        row(prompt=[1], output=[1, 6], temperature=0.0),  # no penalties, in a batch that has some
        row(prompt=[0, 11], output=[11, 11, 10], repetition_penalty=0.6, frequency_penalty=-1.1, presence_penalty=2),
    ]
    inputs = build_sampling_inputs(rows, V, CPU)
    assert not inputs.no_penalties
    got = apply_penalties(logits, inputs)
    torch.testing.assert_close(got, _ref_penalties(logits, rows))
    assert torch.equal(got[2], logits[2])
    # Greedy picks from the penalised logits.
    torch.testing.assert_close(sample(logits, rows).sampled_token_ids[2], got[2].argmax())


def test_no_penalties_skips_work():
    logits = gen_logits(2, 10)
    inputs = build_sampling_inputs([row(output=[1, 2]), row(temperature=0.0)], 10, CPU)
    assert inputs.no_penalties and inputs.output_token_ids is None and inputs.prompt_token_ids is None
    assert apply_penalties(logits, inputs) is logits


def test_penalty_steers_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]])
    r = row(output=[1], temperature=0.0, presence_penalty=0.5)
    assert sample(logits, [r]).sampled_token_ids.item() == 2


def test_one_pass_gives_the_tokens_and_the_distributions_they_were_drawn_from():
    """with_probabilities (speculative verification) penalises once: the same tokens as a plain call, the
    same distributions as probabilities(), on greedy, random and mixed batches with penalties and filters."""
    logits = gen_logits(4, 50, seed=7)
    batches = [
        [row(output=[1, 4], temperature=0.0, presence_penalty=0.5) for _ in range(4)],
        [row(seed=i, output=[i], temperature=0.8, top_k=10, frequency_penalty=0.3) for i in range(4)],
        [row(seed=1, temperature=0.0), row(seed=2, temperature=1.2, top_p=0.9, repetition_penalty=1.3,
                                           output=[5]),
         row(seed=3, temperature=0.7, min_p=0.05), row(seed=4, temperature=0.0, presence_penalty=1.0, output=[9])],
    ]
    sampler = Sampler()
    for rows in batches:
        inputs = build_sampling_inputs(rows, logits.shape[-1], CPU)
        both = sampler(logits, inputs, with_probabilities=True)
        assert torch.equal(both.sampled_token_ids, sampler(logits, inputs).sampled_token_ids)
        assert torch.equal(both.probabilities, sampler.probabilities(logits, inputs))
        assert sampler(logits, inputs).probabilities is None
        drawn = both.probabilities.gather(1, both.sampled_token_ids[:, None])
        assert bool((drawn > 0).all())  # every token has mass in the distribution it was drawn from


# --------------------------------------------------------------------------- min_tokens


def test_min_tokens_blocks_eos_and_stop_ids():
    V = 10
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 2] = 8.0

    def tok(out_len: int, **kw) -> int:
        r = row(output=[0] * out_len, temperature=0.0, min_tokens=3, stop_token_ids=(7,), **kw)
        return sample(logits, [r]).sampled_token_ids.item()

    assert tok(0) == 2 and tok(2) == 2
    assert tok(3) == EOS
    # ignore_eos: EOS is not blocked, stop_token_ids still are.
    assert tok(1, ignore_eos=True) == EOS
    logits[0, EOS] = 0.0
    assert tok(1, ignore_eos=True) == 2
    # Random rows too; out-of-vocab stop ids are ignored.
    logits[0, EOS] = 50.0
    rows = [row(seed=s, temperature=1.0, min_tokens=1, stop_token_ids=(7, 99)) for s in range(50)]
    toks = set(sample(logits.expand(50, -1), rows).sampled_token_ids.tolist())
    assert not toks & {EOS, 7}


# --------------------------------------------------------------------------- logprobs


def test_logprobs_from_raw_logits():
    V = 40
    logits = gen_logits(4, V, seed=9)
    rows = [
        row(seed=1, logprobs=5, temperature=0.5, repetition_penalty=1.8, output=[0, 1]),
        row(seed=2),  # no logprobs
        row(seed=3, logprobs=0, temperature=0.0, presence_penalty=1.0, output=[int(logits[2].argmax())]),
        row(seed=4, logprobs=2, top_k=3),
    ]
    out = sample(logits, rows)
    lp = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.logprobs[1] is None
    for b in (0, 2, 3):
        entry = out.logprobs[b]
        assert entry is not None
        tok = out.sampled_token_ids[b].item()
        assert entry.token_logprob == pytest.approx(lp[b, tok].item(), abs=1e-6)
        n = rows[b].params.logprobs
        top = torch.topk(lp[b], n) if n else None
        assert entry.top_token_ids == ([] if top is None else top.indices.tolist())
        assert entry.top_logprobs == ([] if top is None else pytest.approx(top.values.tolist(), abs=1e-6))
    # The penalised greedy row did not pick the raw argmax, but its logprob is still the raw one.
    assert out.sampled_token_ids[2] != logits[2].argmax()


def test_logprobs_all_rows_zero():
    logits = gen_logits(3, 16)
    out = sample(logits, [row(logprobs=0, temperature=0.0) for _ in range(3)])
    assert out.logprobs is not None
    assert all(e is not None and e.top_token_ids == [] and e.top_logprobs == [] for e in out.logprobs)
