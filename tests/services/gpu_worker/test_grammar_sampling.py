"""Grammar masks in the batched sampler, with real xgrammar matchers over a small vocabulary: a constrained
row only ever samples what its grammar allows (greedy and random), unconstrained rows of the same batch are
untouched, and a matcher rebuilt from a request's outputs (preemption) stands where the old one stood."""

from __future__ import annotations

import re
from concurrent.futures import Future

import torch
import xgrammar as xgr

from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.grammar import GrammarRuntime
from headrace.services.gpu_worker.request_state import RequestState
from headrace.services.gpu_worker.sampler import Sampler, SamplingRow, build_sampling_inputs

VOCAB = ["<eos>", "a", "b", "c", "ab", "ba", "0", "1", "12", "-", "x", "yz"] + [f"w{i}" for i in range(52)]
EOS = 0


def _compiled(regex: str) -> Future:
    info = xgr.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS])
    future: Future = Future()
    future.set_result(xgr.GrammarCompiler(info, max_threads=1).compile_regex(regex))
    return future


def _generate(regex: str, params: SamplingParams, steps: int, rows_before: int = 2) -> tuple[str, list[list[int]]]:
    """Sample `steps` tokens for one constrained row between unconstrained ones; the text of the constrained
    row, and every row's tokens."""
    torch.manual_seed(0)
    runtime = GrammarRuntime("", len(VOCAB), (EOS,))
    state = RequestState("g", [5], 1, [0], 1, params, seed=7, grammar=_compiled(regex))
    state.matcher = runtime.matcher(state.grammar, [])
    free = [RequestState(f"u{i}", [5], 1, [0], 1, params, seed=i) for i in range(rows_before)]
    sampler, tokens = Sampler(), []
    for _ in range(steps):
        states = free + [state]
        rows = [SamplingRow(s.params, s.seed, s.token_ids, 1, (EOS,), 0, s.matcher) for s in states]
        logits = torch.randn(len(states), len(VOCAB))
        logits[:, 10] += 5.0  # "x" is the favourite of every row; the grammar never allows it
        out = sampler(logits, build_sampling_inputs(rows, len(VOCAB), torch.device("cpu"))).sampled_token_ids
        for s, tok in zip(states, out.tolist()):
            s.append_token(tok)
        tokens = [s.token_ids[1:] for s in states]
        if state.token_ids[-1] == EOS:
            break
    text = "".join(VOCAB[t] for t in state.token_ids[1:] if t != EOS)
    return text, tokens


def test_a_constrained_row_follows_its_grammar_greedy_and_random():
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)):
        text, tokens = _generate(r"(ab|ba){1,3}c?-[01]", params, steps=12)
        assert re.fullmatch(r"(ab|ba){1,3}c?-[01]", text), text
        assert tokens[-1][-1] == EOS  # the grammar completed, so the row could only end
        assert any(10 in row for row in tokens[:-1])  # unconstrained rows still pick their favourite


def test_a_matcher_rebuilt_from_outputs_stands_where_the_old_one_stood():
    runtime = GrammarRuntime("", len(VOCAB), (EOS,))
    compiled = _compiled(r"a(b|c)+-1")
    first = runtime.matcher(compiled, [])
    for tok in (1, 2, 3):  # a b c
        assert first.accept_token(tok)
    replayed = runtime.matcher(compiled, [1, 2, 3])
    masks = [torch.empty(1, (len(VOCAB) + 31) // 32, dtype=torch.int32) for _ in range(2)]
    first.fill_next_token_bitmask(masks[0], 0)
    replayed.fill_next_token_bitmask(masks[1], 0)
    assert torch.equal(masks[0], masks[1])
