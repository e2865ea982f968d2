"""Request bodies -> SamplingParams, prompts and per-choice params."""

from __future__ import annotations

import pytest

from headrace.common.sampling_params import SamplingParams
from headrace.services.api.errors import ApiError
from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest
from headrace.services.api.sampling import (
    chat_params,
    check_model,
    choice_params,
    completion_params,
    completion_prompts,
)

USER = [{"role": "user", "content": "hi"}]


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **fields})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def test_absent_knobs_keep_openai_defaults():
    assert completion_params(completion(), 16) == SamplingParams(max_tokens=16)
    assert chat_params(chat(), 16) == SamplingParams(max_tokens=None)  # chat: up to the context length


def test_every_field_reaches_sampling_params():
    params = completion_params(completion(
        n=3, max_tokens=7, temperature=0.2, top_p=0.9, top_k=-1, min_p=0.05, seed=11, stop="END",
        stop_token_ids=[2, 3], ignore_eos=True, min_tokens=1, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, logprobs=2, skip_special_tokens=False, include_stop_str_in_output=True), 16)
    assert params == SamplingParams(
        n=3, max_tokens=7, temperature=0.2, top_p=0.9, top_k=0, min_p=0.05, seed=11, stop=("END",),
        stop_token_ids=(2, 3), ignore_eos=True, min_tokens=1, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, logprobs=2, skip_special_tokens=False, include_stop_str_in_output=True)
    assert completion_params(completion(stop=["a", "b"]), 16).stop == ("a", "b")


def test_scoring_asks_the_engine_for_prompt_logprobs():
    assert completion_params(completion(echo=True, logprobs=2), 16).prompt_logprobs == 2
    assert completion_params(completion(logprobs=2), 16).prompt_logprobs is None  # no echo: output logprobs only
    assert completion_params(completion(echo=True, logprobs=1, prompt_logprobs=5), 16).prompt_logprobs == 5
    scoring_only = completion_params(completion(echo=True, logprobs=0, max_tokens=0), 16)
    assert scoring_only.max_tokens == 1 and scoring_only.prompt_logprobs == 0  # the one token is dropped
    assert completion_params(completion(prompt_logprobs=0, max_tokens=0), 16).max_tokens == 1


def test_chat_token_limits_and_logprobs():
    assert chat_params(chat(max_tokens=9), 16).max_tokens == 9
    assert chat_params(chat(max_tokens=9, max_completion_tokens=4), 16).max_tokens == 4
    assert chat_params(chat(logprobs=False), 16).logprobs is None
    assert chat_params(chat(logprobs=True), 16).logprobs == 0
    assert chat_params(chat(logprobs=True, top_logprobs=5), 16).logprobs == 5


@pytest.mark.parametrize("body, param", [
    (completion(n=17), "n"), (completion(temperature=3.0), "temperature"), (completion(min_p=1.5), "min_p"),
    (completion(max_tokens=2, min_tokens=3), "min_tokens"), (completion(max_tokens=0), "max_tokens"),
    (completion(max_tokens=0, echo=True, min_tokens=1), "min_tokens"),
    (completion(echo=True, logprobs=21), "logprobs"), (completion(prompt_logprobs=-1), "prompt_logprobs"),
    (completion(stop=[""]), "stop"),
])
def test_completion_rejections_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        completion_params(body, 16)
    assert e.value.status == 400 and e.value.param == param


def test_chat_rejections_name_the_field():
    for body, param in [(chat(top_logprobs=3), "top_logprobs"), (chat(logprobs=True, top_logprobs=21), "logprobs")]:
        with pytest.raises(ApiError) as e:
            chat_params(body, 16)
        assert e.value.param == param


def test_choice_params_split_n_and_give_each_choice_its_seed():
    params = SamplingParams(n=3, seed=5)
    assert [choice_params(params, k) for k in range(3)] == [SamplingParams(seed=s) for s in (5, 6, 7)]
    assert choice_params(SamplingParams(n=2), 1).seed is None
    assert choice_params(SamplingParams(n=2, seed=2**63 - 1), 1).seed == -(2**63)  # wraps, stays int64


def test_prompts_come_out_as_a_list_of_text_or_ids():
    assert completion_prompts(completion(prompt="a")) == ["a"]
    assert completion_prompts(completion(prompt=["a", "b"])) == ["a", "b"]
    assert completion_prompts(completion(prompt=[1, 2])) == [[1, 2]]
    assert completion_prompts(completion(prompt=[[1], [2, 3]])) == [[1], [2, 3]]
    for empty, param in (([], "prompt"), ([[1], []], "prompt.[1]")):
        with pytest.raises(ApiError) as e:
            completion_prompts(completion(prompt=empty))
        assert e.value.param == param


def test_check_model():
    check_model(None, "llama")
    check_model("llama", "llama")
    with pytest.raises(ApiError) as e:
        check_model("gpt", "llama")
    assert e.value.status == 404 and e.value.code == "model_not_found"
