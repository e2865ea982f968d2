"""Draft verification (services/gpu_worker/rejection_sampler.py) at the sampler level, with fixed logits and
forced drafts: greedy accepts exactly the argmax prefix, and sampling with drafts draws from the target
distribution exactly (chi-square over 20,000 draws at temperature 1 with top-p 0.9)."""

from __future__ import annotations

import torch

from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.rejection_sampler import accept_drafts, verify_rows
from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import Sampler, build_sampling_inputs

CPU = torch.device("cpu")
V = 12
N = 20_000


def state(seed: int, params: SamplingParams, drafts: list[int], output: list[int] = ()) -> RequestState:
    s = RequestState(f"r{seed}", [1, 2, 3, *output], 3, [0], 3 + len(output), params, seed)
    s.draft_token_ids = list(drafts)
    return s


def verify(states: list[RequestState], logits_per_state: torch.Tensor) -> tuple[list[int], list[int]]:
    rows = [r for s in states for r in verify_rows(s, (0,), 0, None)]
    out = Sampler()(logits_per_state, build_sampling_inputs(rows, V, CPU))
    tokens, accepted = accept_drafts(out.sampled_token_ids, [s.draft_token_ids for s in states])
    return tokens.tolist(), accepted.tolist()


def test_greedy_accepts_exactly_the_matching_prefix_and_adds_the_next_argmax():
    greedy = SamplingParams(temperature=0.0)
    # Three positions whose argmaxes are 4, 7, 2, and a fourth (the bonus row) with argmax 9.
    logits = torch.full((4, V), -1.0)
    for j, t in enumerate((4, 7, 2, 9)):
        logits[j, t] = 5.0
    cases = [([4, 7, 2], 3, 9), ([4, 7, 5], 2, 2), ([1, 7, 2], 0, 4), ([4], 1, 7), ([], 0, 4)]
    states = [state(0, greedy, d) for d, _, _ in cases]
    batch = torch.cat([logits[: len(d) + 1] for d, _, _ in cases])
    tokens, accepted = verify(states, batch)
    assert accepted == [a for _, a, _ in cases]
    assert tokens == [t for _, _, t in cases]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square of counts against probs (categories expected >= 5 times)."""
    n = counts.sum()
    keep = probs * n >= 5
    assert (counts[~keep].sum() <= 10), f"draws where the target has (almost) no mass: {counts[~keep].tolist()}"
    expected = probs[keep] * n
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


def top_p_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The target distribution: softmax at temperature 1, cut to the top-p nucleus, renormalised."""
    p = logits.double().softmax(-1)
    srt, idx = p.sort(descending=True)
    keep = (srt.cumsum(-1) - srt) < top_p
    out = torch.zeros_like(p)
    out[idx[keep]] = srt[keep]
    return out / out.sum()


def test_sampling_with_drafts_draws_from_the_target_distribution():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(V, generator=g) * 1.5, torch.randn(V, generator=g) * 1.5
    p1, p2 = top_p_probs(first, 0.9), top_p_probs(second, 0.9)
    draft = int(p1.argsort(descending=True)[1])  # a likely token, not the likeliest: often rejected, often kept
    assert 0.1 < p1[draft] < 0.5

    # With speculation: every request drafts [draft, 5]; row 0 sees `first`, row 1 (after the draft) `second`.
    states = [state(seed, params, [draft, 5]) for seed in range(N)]
    rows = torch.stack([first, second, second]).repeat(N, 1)
    tokens, accepted = verify(states, rows)
    tokens_t, accepted_t = torch.tensor(tokens), torch.tensor(accepted)
    emitted_first = torch.where(accepted_t > 0, draft, tokens_t)
    assert chi_square_p_value(torch.bincount(emitted_first, minlength=V).double(), p1) > 1e-3
    # After an accepted first draft, the next token (the second draft if kept, else the correction drawn
    # from the rest) is distributed as the target at the next position.
    kept = accepted_t > 0
    emitted_second = torch.where(accepted_t == 2, 5, tokens_t)[kept]
    assert chi_square_p_value(torch.bincount(emitted_second, minlength=V).double(), p2) > 1e-3
    assert abs((accepted_t > 0).double().mean() - p1[draft]) < 0.02

    # Without speculation, the same seeds: the same target distribution, and the very same first tokens
    # (the draft only decides how many of the sampler's own draws a step keeps).
    plain = [state(seed, params, []) for seed in range(N)]
    alone, _ = verify(plain, first.repeat(N, 1))
    assert chi_square_p_value(torch.bincount(torch.tensor(alone), minlength=V).double(), p1) > 1e-3
    assert alone == emitted_first.tolist()


def test_penalised_rows_see_the_drafts_as_outputs():
    """Row j of a verifying request is sampled as output number j would be: presence penalty over the drafts."""
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    logits = torch.zeros(3, V)
    logits[:, 4] = 1.5  # 4 wins unless it was already output (then 1.5 - 2 < 1)
    logits[:, 6] = 1.0
    tokens, accepted = verify([state(0, params, [4, 4])], logits)
    # Row 0: 4 (accepted); row 1 has output 4 already: 6, so the second draft 4 is rejected and 6 follows.
    assert (accepted, tokens) == ([1], [6])
