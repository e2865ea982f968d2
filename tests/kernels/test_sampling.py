"""The fused seeded-sampling kernel (kernels/sampling.py) against the sampler's torch path.

Bit-exact uniforms (kernel == torch twin == services' hash_uniform == pure-Python splitmix64), the same
argmax as the torch path (up to exact float near-ties), determinism, and the softmax distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from headrace.common.sampling_params import SamplingParams  # noqa: E402
from headrace.kernels import sampling  # noqa: E402
from headrace.kernels.sampling import (  # noqa: E402
    hash_gumbel_argmax,
    hash_gumbel_argmax_ref,
    hash_uniform,
    hash_uniform_ref,
)
from headrace.services.gpu_worker import sampler as sampler_mod  # noqa: E402
from tests.kernels.kernel_testing import py_hash_uniform  # noqa: E402

SEEDS = [0, 1, 12345, -1, 2**63 - 1, -(2**63)]
STEPS = [0, 7, 1, 1000, 3, 2**40]


def _random_ids(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = torch.tensor(SEEDS + torch.randint(-(2**63), 2**63 - 1, (n,)).tolist(), device=device)
    steps = torch.tensor(STEPS + torch.randint(0, 2**40, (n,)).tolist(), device=device)
    return seeds, steps


def _gumbel_scores(x: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The values the torch path takes the argmax of (float32, on the CPU)."""
    u = hash_uniform_ref(seeds.cpu(), steps.cpu(), x.shape[-1])
    return x.cpu().float() - u.log().neg().log()


def _assert_same_tokens(got: torch.Tensor, x: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> None:
    """Equal to the torch path, except on rows whose two candidates tie to float precision (log may differ
    by an ulp between the kernel and torch); at most one such row."""
    expected = hash_gumbel_argmax_ref(x.cpu(), seeds.cpu(), steps.cpu())
    got = got.cpu()
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert ((got >= 0) & (got < x.shape[-1])).all()
    diff = torch.nonzero(got != expected).flatten().tolist()
    if diff:
        scores = _gumbel_scores(x, seeds, steps)
        for b in diff:
            a, e = scores[b, got[b]].item(), scores[b, expected[b]].item()
            assert math.isclose(a, e, rel_tol=1e-5, abs_tol=1e-5), f"row {b}: token {got[b]} vs {expected[b]}"
    assert len(diff) <= 1, f"rows {diff} differ from the torch path"


# --------------------------------------------------------------------------- the noise itself


@pytest.mark.parametrize("V,block", [(1, None), (37, 16), (300, 64)])
def test_uniforms_bit_exact(dev: tuple[torch.device, torch.dtype], V: int, block: int | None) -> None:
    device, _ = dev
    seeds, steps = _random_ids(4, device)
    got = hash_uniform(seeds, steps, V, block=block).cpu()
    ref = hash_uniform_ref(seeds.cpu(), steps.cpu(), V)
    assert torch.equal(got, ref)
    assert torch.equal(ref, sampler_mod.hash_uniform(seeds.cpu(), steps.cpu(), V))
    for b in range(len(SEEDS)):
        for v in sorted({0, min(1, V - 1), V // 2, V - 1}):
            assert got[b, v].item() == py_hash_uniform(SEEDS[b] & (2**64 - 1), STEPS[b], v), (b, v)
    assert 0.0 < got.min().item() and got.max().item() < 1.0


# --------------------------------------------------------------------------- the draw


def _special_rows(x: torch.Tensor) -> None:
    """Rows 1..5 of x (in place): partly -inf, one survivor, all -inf, a +inf tie, a NaN."""
    V = x.shape[1]
    x[1].masked_fill_(torch.rand(V, device=x.device) < 0.6, float("-inf"))
    keep = int(torch.randint(0, V, ()))
    x[2].fill_(float("-inf"))[keep] = 1.0
    x[3].fill_(float("-inf"))  # torch.argmax: index 0
    if V >= 3:
        x[4, V // 3] = x[4, V - 1] = float("inf")  # tie at +inf: the smaller index
        x[5, V - 2] = float("nan")  # torch ranks NaN highest; the kernel takes it as +inf


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("B,V,block", [(1, 5, None), (7, 300, 64), (6, 1000, 128)])
def test_argmax_matches_torch_path(dev: tuple[torch.device, torch.dtype], B: int, V: int, block: int | None,
                                   num_splits: int | None) -> None:
    device, _ = dev
    x = 3 * torch.randn(B, V, device=device)
    if B >= 6:
        _special_rows(x)
    seeds, steps = _random_ids(B, device)
    seeds, steps = seeds[:B].contiguous(), steps[:B].contiguous()
    x_before = x.clone()
    got = hash_gumbel_argmax(x, seeds, steps, num_splits=num_splits, block=block)
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())
    _assert_same_tokens(got, x, seeds, steps)
    if B >= 6:
        assert got[2].item() == int(torch.nonzero(x[2] == 1.0)) and got[3].item() == 0
        assert got[4].item() == V // 3 and got[5].item() == V - 2


def test_noise_matters_in_argmax_test(dev: tuple[torch.device, torch.dtype]) -> None:
    """The argmax test above would catch a wrong noise stream (say an off-by-one in the counter): at its
    logit scale the noise picks a token other than the argmax, and a shifted stream picks other tokens."""
    device, _ = dev
    B, V = 16, 300
    x = 3 * torch.randn(B, V, device=device)
    seeds, steps = _random_ids(B, device)
    seeds, steps = seeds[:B].contiguous(), steps[:B].contiguous()
    got = hash_gumbel_argmax(x, seeds, steps).cpu()
    assert (got != x.argmax(-1).cpu()).sum() >= 4
    u = hash_uniform_ref(seeds.cpu(), steps.cpu(), V + 1)[:, 1:]  # the stream shifted by one token
    shifted = (x.cpu() - u.log().neg().log()).argmax(-1)
    assert (got != shifted).sum() >= 4


def test_same_seed_and_step_same_token_in_any_batch(dev: tuple[torch.device, torch.dtype]) -> None:
    device, _ = dev
    V = 500
    target = torch.zeros(V, device=device)  # uniform: the draw is entirely up to the noise
    one = hash_gumbel_argmax(target[None], torch.tensor([42], device=device), torch.tensor([3], device=device))
    x = torch.stack([torch.randn(V, device=device), target, target, torch.randn(V, device=device)])
    seeds = torch.tensor([7, 42, 9, 42], device=device)
    steps = torch.tensor([3, 3, 3, 4], device=device)
    many = hash_gumbel_argmax(x, seeds, steps, block=64)
    assert many[1] == one[0] and many[2] != one[0]  # row 2: another seed, the same logits
    again = hash_gumbel_argmax(x, seeds, steps, num_splits=4, block=128)
    assert torch.equal(many, again)


def test_seeds_and_steps_change_the_draw(dev: tuple[torch.device, torch.dtype]) -> None:
    device, _ = dev
    n, V = 48, 1000
    x = torch.zeros(n, V, device=device)
    by_seed = hash_gumbel_argmax(x, torch.arange(n, device=device), torch.zeros(n, dtype=torch.int64, device=device))
    by_step = hash_gumbel_argmax(x, torch.full((n,), 5, device=device), torch.arange(n, device=device))
    # ~47 distinct expected for 48 uniform draws over 1000 tokens.
    assert len(set(by_seed.tolist())) > 40 and len(set(by_step.tolist())) > 40


def test_draws_follow_softmax(dev: tuple[torch.device, torch.dtype]) -> None:
    """Many (seed, step) pairs, fixed: a deterministic chi-square check, it cannot flake."""
    device, _ = dev
    n = 1500 if device.type == "cpu" else 20000  # the interpreter runs one program per row
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.2, 0.7, float("-inf")]) / 0.7
    probs = torch.softmax(logits.double(), -1)
    x = logits.to(device).expand(n, -1).contiguous()
    idx = torch.arange(n, device=device)
    tokens = hash_gumbel_argmax(x, 1000 + idx, idx % 7).cpu()
    counts = torch.bincount(tokens, minlength=9).double()
    assert counts[8] == 0, "sampled a -inf token"
    exp = probs[:8] * n
    chi2 = (((counts[:8] - exp) ** 2) / exp).sum().item()
    assert chi2 < 40  # 7 degrees of freedom: the 99.9999% quantile is ~ 40
    assert ((counts[:8] / n - probs[:8]).abs() <= 5 * (probs[:8] * (1 - probs[:8]) / n).sqrt()).all()


# --------------------------------------------------------------------------- wiring


def test_sampler_takes_the_kernel_and_draws_the_same_tokens(dev: tuple[torch.device, torch.dtype],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's CUDA branch (forced here on any device) gives the torch path's tokens, filters included."""
    device, _ = dev
    V = 200
    logits = torch.randn(7, V, generator=torch.Generator().manual_seed(3)).mul_(3).to(device)
    kw = [dict(temperature=0.8), dict(top_k=5), dict(top_p=0.7, temperature=1.3), dict(min_p=0.1),
          dict(temperature=0.0), dict(top_k=20, top_p=0.9, min_p=0.02), dict(temperature=2.0)]
    rows = [sampler_mod.SamplingRow.from_parts(
        params=SamplingParams(max_tokens=None, **k), seed=100 + i, prompt_token_ids=[1, 2],
        output_token_ids=[0] * i, eos_token_ids=(3,)) for i, k in enumerate(kw)]
    inputs = sampler_mod.build_sampling_inputs(rows, V, device)

    monkeypatch.setattr(sampler_mod, "_fused_sampling", lambda device: None)
    torch_tokens = sampler_mod.Sampler()(logits, inputs).sampled_token_ids.cpu()

    calls = []

    def fused(x, seeds, steps):
        calls.append(x.shape)
        return hash_gumbel_argmax(x, seeds, steps)

    monkeypatch.setattr(sampler_mod, "_fused_sampling", lambda device: sampling)
    monkeypatch.setattr(sampling, "hash_gumbel_argmax", fused)
    kernel_tokens = sampler_mod.Sampler()(logits, inputs).sampled_token_ids.cpu()
    assert calls == [torch.Size([7, V])]
    assert torch.equal(kernel_tokens, torch_tokens)
    assert kernel_tokens[4] == logits[4].argmax().item()  # the greedy row


def test_fused_sampling_only_on_cuda() -> None:
    assert sampler_mod._fused_sampling(torch.device("cpu")) is None


def test_bench_sampling_entry(dev: tuple[torch.device, torch.dtype]) -> None:
    from headrace.bench import kernels as kernel_bench

    device, _ = dev
    r = kernel_bench.bench_sampling(3, 200, device, copy_bytes_per_s=1e9, reps=1)
    assert r["kernel"] == "hash_gumbel_argmax" and (r["batch"], r["vocab"]) == (3, 200)
    assert r["bytes"] == 3 * 200 * 4 and r["time_us"] > 0 and r["torch_time_us"] > 0
    assert r["token_agreement"] >= 2 / 3  # equal but for float near-ties
