"""The offline Python API on the embedded model: same tokens as the engine, input order, n, stops, chat."""

from __future__ import annotations

import pytest

from headrace.common.sampling_params import SamplingParams
from headrace.llm import LLM, engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # The float path: these tests compare a batch's greedy tokens with each prompt's alone (docs/cpu.md).
    return LLM(max_model_len=512, num_blocks=128, device="cpu", dtype="float32", log=lambda *_: None)


def engine_tokens(llm: LLM, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """The same prompt through the bare engine, no LLM wrapper."""
    llm.engine.add_request("bare", prompt_ids, params)
    tokens = []
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            tokens += out.new_token_ids
    return tokens


def test_engine_config_maps_keywords_onto_sections():
    cfg = engine_config("random:tiny-llama", dtype="float32", max_model_len=256, max_num_seqs=4, seed=7,
                        max_num_batched_tokens=64, enable_prefix_caching=True, kv_cache_memory=1 << 20,
                        device="cpu", attention_backend="torch")
    assert cfg.model.model == "random:tiny-llama" and cfg.model.dtype == "float32" and cfg.model.seed == 7
    assert cfg.model.max_model_len == 256
    assert cfg.scheduler.max_num_seqs == 4 and cfg.scheduler.max_num_batched_tokens == 64
    assert cfg.cache.enable_prefix_caching and cfg.cache.kv_cache_memory == 1 << 20
    assert cfg.device == "cpu" and cfg.attention_backend == "torch"
    with pytest.raises(TypeError, match="max_num_seq"):
        engine_config(max_num_seq=4)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tensor_parallel_size=2, device="cpu")  # refused before any weights load


def test_generate_greedy_matches_the_engine_in_input_order(llm):
    prompts = ["The capital of France is", "Hello, my name is", "1, 2, 3, 4,"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        (choice,) = out.outputs
        assert choice.token_ids == engine_tokens(llm, ids, GREEDY)
        assert choice.text == llm.tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        assert choice.finish_reason == "length" and choice.logprobs is None
    assert "Paris" in outs[0].outputs[0].text
    # Token-id prompts: one list of ids, or several.
    ids = outs[1].prompt_token_ids
    assert llm.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    again = llm.generate([ids, outs[0].prompt_token_ids], GREEDY, use_tqdm=False)
    assert [o.prompt for o in again] == [None, None]
    assert again[1].outputs[0].text == outs[0].outputs[0].text


def test_n_choices_with_a_seed_differ_and_repeat(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    first = llm.generate("Once upon a time", params, use_tqdm=True)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    texts = [c.text for c in first.outputs]
    assert len(set(texts)) == 3  # each choice samples its own stream (seed + index)
    second = llm.generate("Once upon a time", params, use_tqdm=False)[0]
    assert [c.token_ids for c in second.outputs] == [c.token_ids for c in first.outputs]
    # Per-prompt params: a list of the same length, in order.
    outs = llm.generate(["a", "b"], [GREEDY, GREEDY.replace(max_tokens=3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 3]


def test_stop_string_cuts_the_text_and_ends_the_request(llm):
    full = llm.generate("The capital of France is", GREEDY.replace(max_tokens=12), use_tqdm=False)[0].outputs[0]
    stop = full.text[4:7]
    cut = full.text[:full.text.index(stop)]
    stopped = llm.generate("The capital of France is", GREEDY.replace(max_tokens=12, stop=(stop,)),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.text == cut
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert len(stopped.token_ids) < len(full.token_ids)  # the engine stopped, it did not run to max_tokens
    kept = llm.generate("The capital of France is", GREEDY.replace(max_tokens=12, stop=(stop,),
                                                                   include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == cut + stop
    assert not llm.engine.has_unfinished_requests()


def test_logprobs_follow_the_tokens(llm):
    (choice,) = llm.generate("Hello, my name is", GREEDY.replace(logprobs=2), use_tqdm=False)[0].outputs
    assert len(choice.logprobs) == len(choice.token_ids) == 8
    for token_id, lp in zip(choice.token_ids, choice.logprobs):
        assert lp.token == llm.tokenizer.decode([token_id])
        assert len(lp.top_token_ids) == len(lp.top_tokens) == 2
        assert lp.top_token_ids[0] == token_id and lp.logprob == pytest.approx(lp.top_logprobs[0])  # greedy
    assert choice.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in choice.logprobs))


def test_chat_answers_with_the_template(llm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(question, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert "<|im_start|>user\nWhat is the capital of France?" in out.prompt
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # EOS: not part of the text
    assert "<|im_end|>" not in out.outputs[0].text
    several = llm.chat([question, [{"role": "user", "content": "Say hi."}]], GREEDY, use_tqdm=False)
    assert several[0].outputs[0].text.startswith(out.outputs[0].text[:10])
    assert "Say hi." in several[1].prompt


def test_bad_input_raises_and_leaves_the_engine_empty(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["short", "word " * 600], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**9]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["x"], [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="wizard"):
        llm.chat([{"role": "wizard", "content": "hi"}], GREEDY, use_tqdm=False)
    # The engine still serves the next call.
    assert len(llm.generate("ok", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
