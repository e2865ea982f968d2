"""Verification of a draft model's drafts (rejection_sampler.accept_model_drafts): drafts drawn from a q that is
not one-hot are accepted with probability min(1, p/q) and corrected from (p - q)+, so what a request emits is
distributed as the target p (chi-square over 20,000 draws at temperature 1 with top-p 0.9); a draft equal to the
target reproduces the output without speculation; greedy rows accept exactly the argmax prefix."""

from __future__ import annotations

import torch

from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.rejection_sampler import accept_model_drafts, verify_rows
from headrace.services.gpu_worker.sampler import Sampler, build_sampling_inputs, gumbel_argmax_
from tests.services.gpu_worker.test_rejection_sampler import CPU, N, V, chi_square_p_value, state, top_p_probs


def draw_drafts(q: torch.Tensor, seeds: list[int], first_output: int) -> torch.Tensor:
    """[S, d] drafts drawn from q ([d, V], the same for every request) as the draft model draws them: with the
    sampler's noise of each output index."""
    d = q.shape[0]
    logq = q.log().repeat(len(seeds), 1)
    seed_t = torch.tensor(seeds, dtype=torch.int64).repeat_interleave(d)
    steps = torch.arange(first_output, first_output + d).repeat(len(seeds))
    return gumbel_argmax_(logq, seed_t, steps).view(len(seeds), d)


def total_variation(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((torch.bincount(tokens, minlength=V).double() / len(tokens) - probs).abs().sum())


def verify(states, logits: torch.Tensor, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [r for s in states for r in verify_rows(s, (0,), 0, None)]
    inputs = build_sampling_inputs(rows, V, CPU)
    sampler = Sampler()
    out = sampler(logits, inputs)
    drafts = [s.draft_token_ids for s in states]
    return accept_model_drafts(out.sampled_token_ids, sampler.probabilities(logits, inputs), drafts,
                               [q[: len(d)] if d else None for d in drafts], [s.seed for s in states],
                               [len(s.token_ids) - s.num_prompt_tokens for s in states])


def distributions() -> tuple[torch.Tensor, torch.Tensor]:
    """([3, V] the target's logits, [2, V] the draft's distributions: different from the target's, with mass
    where the target has none after its top-p cut)."""
    g = torch.Generator().manual_seed(3)
    target = torch.stack([torch.randn(V, generator=g) * 1.5 for _ in range(3)])
    return target, torch.stack([torch.randn(V, generator=g).softmax(-1) for _ in range(2)])


def test_drafts_from_a_draft_distribution_leave_the_target_distribution_unchanged():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    target, q = distributions()
    p1, p2 = top_p_probs(target[0], 0.9), top_p_probs(target[1], 0.9)
    assert (q[0] - p1.float()).abs().sum() > 0.5 and (p2 > 0).sum() > 4
    drafts = draw_drafts(q, list(range(N)), 0)
    states = [state(seed, params, drafts[seed].tolist()) for seed in range(N)]
    tokens, accepted = verify(states, target.repeat(N, 1), q)
    emitted_first = torch.where(accepted > 0, drafts[:, 0], tokens)
    assert chi_square_p_value(torch.bincount(emitted_first, minlength=V).double(), p1) > 1e-3
    assert total_variation(emitted_first, p1) < 0.02
    # Given the first draft was accepted, the second emitted token is distributed as the target's next row.
    kept = accepted > 0
    emitted_second = torch.where(accepted == 2, drafts[:, 1], tokens)[kept]
    assert chi_square_p_value(torch.bincount(emitted_second, minlength=V).double(), p2) > 1e-3
    # The first draft passes with probability sum_x min(p(x), q(x)).
    assert abs(kept.double().mean() - torch.minimum(p1, q[0].double()).sum()) < 0.02


def test_one_hot_acceptance_would_fail_the_test():
    """The test above can fail: accepting every draft (no min(1, p/q) test) emits q, far from p."""
    target, q = distributions()
    p1 = top_p_probs(target[0], 0.9)
    naive = draw_drafts(q[:1], list(range(N)), 0)[:, 0]
    assert total_variation(naive, p1) > 0.2


def test_a_draft_equal_to_the_target_reproduces_the_output_without_speculation():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    g = torch.Generator().manual_seed(2)
    target = torch.stack([torch.randn(V, generator=g) * 1.5 for _ in range(3)])
    sampler, n = Sampler(), 2000
    # q = the target's own distributions (as a draft model identical to the target computes them).
    q = sampler.probabilities(target, build_sampling_inputs(
        [r for r in verify_rows(state(0, params, [1, 1]), (0,), 0, None)], V, CPU))
    drafts = draw_drafts(q[:2], list(range(n)), 0)
    tokens, accepted = verify([state(seed, params, drafts[seed].tolist()) for seed in range(n)],
                              target.repeat(n, 1), q)
    assert accepted.tolist() == [2] * n
    # Without speculation: three single steps, each the sampler's own draw of that output index.
    outputs = [[] for _ in range(n)]
    for j in range(3):
        plain = [state(seed, params, [], outputs[seed]) for seed in range(n)]
        step = Sampler()(target[j].repeat(n, 1), build_sampling_inputs(
            [r for s in plain for r in verify_rows(s, (0,), 0, None)], V, CPU)).sampled_token_ids
        for seed in range(n):
            outputs[seed].append(int(step[seed]))
    assert torch.cat([drafts, tokens[:, None]], dim=1).tolist() == outputs


def test_greedy_rows_accept_the_argmax_prefix():
    greedy = SamplingParams(temperature=0.0)
    logits = torch.full((4, V), -1.0)
    for j, t in enumerate((4, 7, 2, 9)):
        logits[j, t] = 5.0
    cases = [([4, 7, 2], 3, 9), ([4, 7, 5], 2, 2), ([1, 7, 2], 0, 4), ([], 0, 4)]
    states = [state(0, greedy, d) for d, _, _ in cases]
    rows = torch.cat([logits[: len(d) + 1] for d, _, _ in cases])
    q_rows = [torch.nn.functional.one_hot(torch.tensor(d), V).float() if d else None for d, _, _ in cases]
    sampler = Sampler()
    flat = [r for s in states for r in verify_rows(s, (0,), 0, None)]
    inputs = build_sampling_inputs(flat, V, CPU)
    tokens, accepted = accept_model_drafts(sampler(rows, inputs).sampled_token_ids, sampler.probabilities(rows, inputs),
                                           [s.draft_token_ids for s in states], q_rows, [0] * 4, [0] * 4)
    assert accepted.tolist() == [a for _, a, _ in cases]
    assert tokens.tolist() == [t for _, _, t in cases]
