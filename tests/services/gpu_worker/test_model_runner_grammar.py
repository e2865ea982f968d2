"""Constrained requests in the model runner (the embedded model and its tokenizer): overlapped steps (the
runner queues the forward, then waits for a constrained request's pending token before sampling) and a
preemption (the matcher is rebuilt from the outputs) give exactly the tokens of one step at a time, and the
text follows the grammar; many rows' masks filled at once equal each matcher's own."""

from __future__ import annotations

import re

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig
from headrace.common.messages import CachedRequestData, GrammarSpec, NewRequestData, StepPlan
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker.model_runner import ModelRunner
from headrace.services.tokenizer.grammar import to_ebnf
from tests.configs import resolved

REGEX = r"[a-z]{2,5}-[0-9]{2}\.[a-z]{1,3}"
PROMPTS = {"g": [1, 504, 13, 3060, 28, 2], "u": [1, 504, 13, 42, 9]}  # g: constrained, u: free
STEPS = 8


@pytest.fixture(scope="module")
def runner():
    cfg = EngineConfig(model=ModelConfig(model="", max_model_len=256), cache=CacheConfig(num_blocks=32))
    return ModelRunner(resolved(cfg), log=lambda *_: None)


def _new(rid: str, outputs: list[int], grammar: str, params: SamplingParams) -> NewRequestData:
    blocks = [0, 1] if rid == "g" else [2, 3]
    return NewRequestData(rid, PROMPTS[rid], list(outputs), params, blocks, 0, 5,
                          grammar if rid == "g" else None)


def _run(runner: ModelRunner, overlap: bool, preempt_at: int | None = None) -> dict[str, list[int]]:
    grammar = to_ebnf(GrammarSpec("regex", REGEX))
    params = SamplingParams(temperature=0.7, seed=11, max_tokens=64)
    out: dict[str, list[int]] = {"g": [], "u": []}
    computed = {rid: 0 for rid in PROMPTS}

    def collect(result):
        for rid, tok in zip(result.req_ids, result.sampled_token_ids):
            out[rid].append(tok)

    def finish_all():
        while runner.num_in_flight:
            collect(runner.finish_oldest()[1])

    for step in range(STEPS):
        plan = StepPlan(step_id=step)
        for rid, prompt in PROMPTS.items():
            total = len(prompt) + (len(out[rid]) if not overlap or step == 0 else step)
            if step == 0 or (rid == "g" and step == preempt_at):
                if step:
                    plan.preempted_req_ids.append(rid)
                plan.new_requests.append(_new(rid, out[rid], grammar, params))
                computed[rid] = 0
            else:
                plan.cached_requests.append(CachedRequestData(rid, [], computed[rid]))
            plan.num_scheduled_tokens[rid] = total - computed[rid]
            computed[rid] = total
        if overlap:
            runner.launch(plan)
            if runner.num_in_flight == 2:
                collect(runner.finish_oldest()[1])
        else:
            collect(runner.execute(plan))
    finish_all()
    runner.execute(StepPlan(step_id=STEPS, finished_req_ids=list(PROMPTS)))
    return out


def test_overlap_and_preemption_keep_constrained_tokens(runner):
    want = _run(runner, overlap=False)
    assert _run(runner, overlap=True) == want
    assert _run(runner, overlap=False, preempt_at=4) == want
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runner.config.require_resolved().tokenizer_dir)
    assert want["g"][-1] in runner.eos_token_ids  # the grammar completed within the steps, then only EOS
    assert re.fullmatch(REGEX, tokenizer.decode(want["g"], skip_special_tokens=True))


def test_a_grammar_that_does_not_compile_fails_its_request_alone(runner, monkeypatch):
    good, bad = to_ebnf(GrammarSpec("regex", REGEX)), to_ebnf(GrammarSpec("regex", "[0-9]{3}"))
    compile_grammar = runner.grammars.compile

    def compile_or_fail(ebnf):  # the failure injected where xgrammar compiles
        if ebnf == bad:
            raise RuntimeError("[12:00:00] compiler.cc:1: out of states\nstack trace")
        return compile_grammar(ebnf)

    monkeypatch.setattr(runner.grammars, "compile", compile_or_fail)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompt = PROMPTS["g"]
    plan = StepPlan(step_id=0, new_requests=[
        NewRequestData("bad", prompt, [], params, [0, 1], 0, 1, bad),
        NewRequestData("good", prompt, [], params, [2, 3], 0, 1, good),
        NewRequestData("free", prompt, [], params, [4, 5], 0, 1, None)],
        num_scheduled_tokens={"bad": len(prompt), "good": len(prompt), "free": len(prompt)})
    result = runner.execute(plan)
    assert list(result.failed) == ["bad"]
    assert "could not be compiled" in result.failed["bad"] and "out of states" in result.failed["bad"]
    assert "stack trace" not in result.failed["bad"]
    assert set(result.req_ids) == {"bad", "good", "free"}  # the step went on for everyone
    second = StepPlan(step_id=1, cached_requests=[CachedRequestData(r, [], len(prompt)) for r in ("bad", "good")],
                      num_scheduled_tokens={"bad": 1, "good": 1})
    assert not runner.execute(second).failed  # reported once: the scheduler has ended it by now
    runner.execute(StepPlan(step_id=2, finished_req_ids=["bad", "good", "free"]))


def test_masks_filled_at_once_equal_each_matchers_own(runner):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runner.config.require_resolved().tokenizer_dir)
    compiled = runner.grammars.start(to_ebnf(GrammarSpec("regex", REGEX)))
    prefixes = ["", "ab", "abc-1", "abcd-12.", "xy-34.q"]
    matchers = [runner.grammars.matcher(compiled, tokenizer.encode(p, add_special_tokens=False)) for p in prefixes]
    width = (runner.grammars.vocab_size + 31) // 32
    together = torch.zeros(len(matchers), width, dtype=torch.int32)
    runner.grammars.fill_bitmasks(matchers, together)
    for j, matcher in enumerate(matchers):
        alone = torch.zeros(1, width, dtype=torch.int32)
        matcher.fill_next_token_bitmask(alone, 0)
        assert torch.equal(together[j], alone[0]), prefixes[j]
    assert len({tuple(row.tolist()) for row in together}) > 2  # the states differ, and so do their masks
