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
was drafted.

A draft model samples its drafts from its own distribution q (draft_model.py), which is not one-hot, so its
drafts take the general test (accept_model_drafts): x_j is accepted with probability min(1, p_j(x)/q_j(x)),
the first rejected position draws from max(p_j - q_j, 0) renormalised, and if all pass the bonus token is the
sampler's own draw from p_{d+1}. The draft draws x_j with the sampler's own noise for that output index (the
Gumbel noise the target's token would be drawn with), while the test's uniforms and the residual draw have
streams of their own; all are keyed by (seed, output index), so a seeded request stays reproducible. The
shared noise is what makes a draft that matches the target (q == p) reproduce the output without speculation
token for token: x_j is then the very token the sampler would have drawn, accepted with probability 1. It is
still exact for any q: the noise of an output index decides at most that index's draft, and an index whose
draft was rejected is emitted from the residual's stream, never drawn again. Greedy rows have one-hot p and
q: a draft is accepted iff it is the target's argmax, and the residual is that argmax.
"""

from __future__ import annotations

import torch

from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import SamplingRow, wrap_int64, gumbel_argmax_, hash_uniform, to_device

# Noise streams of draft-model verification, xor-ed into a request's seed: distinct from the sampler's own
# stream (which the draft model draws with) and from each other, so the accept test and the residual draw are
# independent of the drafts.
ACCEPT_NOISE = wrap_int64(0x3C6EF372FE94F82B)
RESIDUAL_NOISE = wrap_int64(0x1F83D9ABFB41BD6B)


def noise_seeds(seeds: list[int], stream: int, device: torch.device) -> torch.Tensor:
    """[B] int64 seeds of one noise stream."""
    return to_device([wrap_int64(seed) ^ stream for seed in seeds], torch.int64, device)


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


def accept_model_drafts(sampled: torch.Tensor, probs: torch.Tensor, drafts: list[list[int]],
                        draft_probs: list[torch.Tensor | None], seeds: list[int], num_outputs: list[int],
                        all_greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of drafts sampled from a draft model. sampled: [R] the sampler's draws and probs
    [R, V] the target distributions p of the rows (1 + len(drafts[i]) per request, in order); draft_probs[i]:
    [len(drafts[i]), V] the q each draft was drawn from; num_outputs[i]: request i's output count before this
    step (row j draws output num_outputs[i] + j). Returns ([S] the token after the accepted drafts, [S] how
    many were accepted). A request whose drafts all pass, or that has none, keeps its sampled token.
    all_greedy: every row is greedy (one-hot p and q), so the residual is one-hot too and needs no noise."""
    device, vocab = probs.device, probs.shape[1]
    num, width = len(drafts), max(map(len, drafts))
    lengths = to_device([len(d) for d in drafts], torch.int64, device)
    firsts, gather, start = [], [], 0
    for d in drafts:  # row j of each request, clamped to its last row past its own drafts (as accept_drafts)
        firsts.append(start)
        gather.append([start + min(j, len(d)) for j in range(width + 1)])
        start += len(d) + 1
    p = probs.index_select(0, to_device(gather, torch.int64, device).view(-1)).view(num, width + 1, vocab)
    q = torch.zeros_like(p)  # rows past a request's drafts stay 0: the bonus row draws from p itself
    for i, qi in enumerate(draft_probs):
        if qi is not None:
            q[i, : qi.shape[0]] = qi
    tokens = to_device([d + [0] * (width - len(d)) for d in drafts], torch.int64, device)[:, :, None]
    p_x, q_x = p[:, :width].gather(2, tokens).squeeze(2), q[:, :width].gather(2, tokens).squeeze(2)
    base = to_device(num_outputs, torch.int64, device)
    index = base[:, None] + torch.arange(width, device=device)
    u = hash_uniform(noise_seeds(seeds, ACCEPT_NOISE, device).repeat_interleave(width), index.view(-1), 1)
    ok = (u.view(num, width) * q_x <= p_x) & (torch.arange(width, device=device) < lengths[:, None])
    accepted = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)
    rows = torch.arange(num, device=device)
    p_a, q_a = p[rows, accepted], q[rows, accepted]
    residual = (p_a - q_a).clamp_(min=0.0)
    # p == q where a draft was rejected can only be rounding (the rejection had probability ~0): draw from p.
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_a)
    drawn = residual.argmax(dim=1) if all_greedy else \
        gumbel_argmax_(residual.log(), noise_seeds(seeds, RESIDUAL_NOISE, device), base + accepted)
    own = sampled.index_select(0, to_device([f + len(d) for f, d in zip(firsts, drafts)], torch.int64, device))
    return torch.where(accepted == lengths, own, drawn), accepted
