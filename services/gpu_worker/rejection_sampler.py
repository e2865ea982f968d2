"""Verification of draft tokens (speculative decoding), batched on the device.

A request verifying d drafts x_1..x_d has d + 1 logits rows: row j is the target distribution p_j after its
tokens and x_1..x_j. Each row is sampled by the ordinary sampler as the request's token number
num_output + j would be (penalties over the outputs including x_1..x_j, min-tokens, temperature, min-p,
top-k, top-p, then the counter-based hash noise of that output index), giving y_j. The request emits
x_1..x_a and then y_a, where a is the length of the prefix on which y_j == x_{j+1}.

Why this is rejection sampling, exactly: an n-gram draft is deterministic (q = one-hot at x). Standard
speculative sampling accepts x with probability min(1, p(x)/q(x)) = p(x) and on rejection draws from
(p - q)+ renormalised, which is p with x removed. With the Gumbel-max draw y = argmax(log p + G),
P(y = x) = p(x), and given y != x, y is distributed as p restricted to the other tokens and renormalised:
so "accept iff y == x, else emit y" makes the accept decision and the residual draw from one uniform
vector, the sampler's own. Greedy rows are the same rule with y = argmax (an exact argmax match).

A consequence worth having: the noise a token is drawn with depends only on (seed, output index), so a
request's output with speculation is token-for-token the output without it, greedy or seeded, whatever
was drafted. (A draft model that samples its drafts, q not one-hot, needs the general min(1, p/q) test with
its own uniforms; greedy drafts from a model are one-hot again.)
"""

from __future__ import annotations

import torch

from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import SamplingRow, to_device


def verify_rows(state: RequestState, eos_token_ids: tuple[int, ...], num_pending: int,
                matcher: object | None) -> list[SamplingRow]:
    """The sampling rows of one request: one, or d + 1 when it verifies d drafts (row j sees drafts[:j] as
    outputs: its output index and, for penalties, its output tokens)."""
    drafts = state.draft_token_ids
    base = SamplingRow(state.params, state.seed, state.token_ids, state.num_prompt_tokens, eos_token_ids,
                       num_pending, matcher)
    if not drafts:
        return [base]
    rows = [base]
    for j in range(1, len(drafts) + 1):
        if state.params.has_penalties:  # penalties read the outputs themselves: the drafts join them
            rows.append(SamplingRow(state.params, state.seed, state.token_ids + drafts[:j], state.num_prompt_tokens,
                                    eos_token_ids))
        else:  # only the output count matters (the draw's index, min_tokens): no copy of the token list
            rows.append(SamplingRow(state.params, state.seed, state.token_ids, state.num_prompt_tokens,
                                    eos_token_ids, j))
    return rows


def accept_drafts(sampled: torch.Tensor, drafts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """sampled: [R] ids, the rows of each request in order (1 + len(its drafts) each). Returns ([S] the token
    each request samples after its accepted drafts, [S] how many drafts it accepted)."""
    device = sampled.device
    num = len(drafts)
    width = max(map(len, drafts))
    starts, gather, padded = 0, [], []
    for d in drafts:
        # Row j of this request, clamped to its last row past its own drafts (never read there: see below).
        gather.append([starts + min(j, len(d)) for j in range(width + 1)])
        padded.append(d + [-1] * (width - len(d)))  # -1 matches no sampled id: acceptance stops at the end
        starts += len(d) + 1
    tokens = sampled.index_select(0, to_device(gather, torch.int64, device).view(-1)).view(num, width + 1)
    match = tokens[:, :width] == to_device(padded, torch.int64, device)
    accepted = match.to(torch.int64).cumprod(dim=1).sum(dim=1)
    return tokens.gather(1, accepted[:, None]).squeeze(1), accepted
