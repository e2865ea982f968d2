"""Prompt logprobs (scoring requests) from the engine equal transformers' float32 log-softmax on the same
weights, whether the prompt runs in one step or in chunks, beside other requests, and with a prefix cache
that already holds the prompt's blocks (a scoring request never reads it)."""

from __future__ import annotations

import pytest
import torch

from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from headrace.common.messages import PromptLogprobs
from headrace.common.sampling_params import SamplingParams
from headrace.engine import LLMEngine
from headrace.services.gpu_worker.model_runner import ModelRunner
from headrace.services.gpu_worker.prompt_logprobs import PromptScores
from tests.configs import resolved

TEXT = ("The river ran past the old mill, under the stone bridge and out to the sea, where the boats "
        "waited for the morning tide.")
K = 3


@pytest.fixture(scope="module")
def runner():
    # CPU, float32: the oracle is transformers in float32 (scripts/check_scoring.py measures a GPU server).
    cfg = resolved(EngineConfig(model=ModelConfig(dtype="float32", max_model_len=512), cache=CacheConfig(num_blocks=120),
                                device="cpu"))
    return ModelRunner(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def prompt(embedded_tokenizer):
    return embedded_tokenizer(TEXT)["input_ids"]


@pytest.fixture(scope="module")
def reference(embedded_hf_model, prompt):
    """transformers' log-softmax at positions 0..P-2, scoring tokens 1..P-1."""
    with torch.no_grad():
        logits = embedded_hf_model(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(dim=-1)[:-1]


def run(engine: LLMEngine, prompts: dict[str, list[int]], params: dict[str, SamplingParams]):
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params[rid])
    scores: dict[str, PromptLogprobs | None] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.req_id] += out.new_token_ids
            if out.prompt_logprobs is not None:
                assert out.req_id not in scores, "prompt logprobs are delivered once"
                scores[out.req_id] = out.prompt_logprobs
    return scores, tokens


def check(scores: PromptLogprobs, reference: torch.Tensor, prompt: list[int]) -> None:
    targets = torch.tensor(prompt[1:])
    own = reference.gather(1, targets[:, None]).squeeze(1)
    assert len(scores.token_logprobs) == len(prompt) - 1 and scores.num_top == K
    torch.testing.assert_close(torch.tensor(scores.token_logprobs), own, atol=2e-4, rtol=1e-4)
    assert scores.token_ranks == ((reference > own[:, None]).sum(-1) + 1).tolist()
    top = reference.topk(K, dim=-1)
    torch.testing.assert_close(torch.tensor(scores.top_logprobs).view(-1, K), top.values, atol=2e-4, rtol=1e-4)
    got_ids = torch.tensor(scores.top_token_ids).view(-1, K)
    # Ids must agree except where two logprobs tie to within float noise.
    same = got_ids == top.indices
    assert same.float().mean() > 0.99, "top ids differ from transformers'"


PLAIN = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(runner, embedded_tokenizer):
    """A plain request and its greedy tokens alone."""
    ids = embedded_tokenizer("Seven blue engines")["input_ids"]
    return ids, run(LLMEngine(runner.config, runner=runner), {"plain": ids}, {"plain": PLAIN})[1]["plain"]


@pytest.mark.parametrize("budget", [512, 7])
def test_prompt_logprobs_match_transformers_chunked_or_not(runner, prompt, reference, plain, budget):
    """Budget 7 splits the prompt into chunks that do not line up with 16-token blocks, while a plain
    request decodes beside it; its greedy tokens do not change."""
    engine = LLMEngine(runner.config.replace(scheduler=SchedulerConfig(max_num_batched_tokens=budget)),
                       runner=runner)
    params = {"score": SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=K), "plain": PLAIN}
    scores, tokens = run(engine, {"plain": plain[0], "score": prompt}, params)
    assert set(scores) == {"score"}
    check(scores["score"], reference, prompt)
    assert tokens["plain"] == plain[1]


def test_prefix_cache_is_bypassed_for_scoring(runner, prompt, reference):
    cfg = runner.config.replace(cache=CacheConfig(num_blocks=runner.num_blocks, enable_prefix_caching=True),
                                scheduler=SchedulerConfig(max_num_batched_tokens=16))
    engine = LLMEngine(cfg, runner=runner)
    run(engine, {"warm": prompt}, {"warm": SamplingParams(temperature=0.0, max_tokens=1)})
    assert engine.scheduler.block_manager.get_computed_blocks(
        engine_request(prompt, SamplingParams(max_tokens=1)))[1] > 0, "the prompt's blocks are cached"
    scores, _ = run(engine, {"score": prompt}, {"score": SamplingParams(temperature=0.0, max_tokens=1,
                                                                        prompt_logprobs=K)})
    check(scores["score"], reference, prompt)


def test_one_token_prompt_scores_nothing(runner):
    engine = LLMEngine(runner.config, runner=runner)
    scores, tokens = run(engine, {"one": [504]}, {"one": SamplingParams(temperature=0.0, max_tokens=1,
                                                                        prompt_logprobs=0)})
    assert scores["one"] == PromptLogprobs(num_top=0) and len(tokens["one"]) == 1


def test_a_recomputed_chunk_replaces_its_scores():
    scores = PromptScores(1)
    scores.add(0, [-1.0, -2.0], [1, 2], [5, 6], [-1.0, -0.5])
    scores.add(2, [-3.0], [3], [7], [-0.1])
    scores.add(1, [-2.5, -3.5], [2, 4], [8, 9], [-0.2, -0.3])
    assert scores.take() == PromptLogprobs([-1.0, -2.5, -3.5], [1, 2, 4], [5, 8, 9], [-1.0, -0.2, -0.3], 1)
    with pytest.raises(AssertionError):
        scores.add(5, [-1.0], [1], [1], [-1.0])


def engine_request(prompt: list[int], params: SamplingParams):
    from headrace.services.scheduler.request import Request

    return Request("probe", prompt, params, 0, (0,), max_model_len=512)
