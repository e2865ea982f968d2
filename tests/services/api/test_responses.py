"""OpenAI response bodies and chunks from accumulated deltas."""

from __future__ import annotations

from headrace.common.messages import PromptLogprobs, PromptLogprobsText, TextDelta, TokenLogprobs
from headrace.services.api.responses import ChatShape, ChoiceState, CompletionShape, usage


def lp(token: str, value: float = -1.0) -> TokenLogprobs:
    return TokenLogprobs(token, value, [1, 2], [token, "alt"], [value, float("-inf")])


def test_usage_counts_each_prompt_once_and_every_choice():
    # 2 prompts x n=2: prompt sizes 3 and 5; outputs 1, 2, 3, 4
    states = [ChoiceState(k, num_prompt_tokens=p, num_output_tokens=k + 1) for k, p in enumerate((3, 3, 5, 5))]
    assert usage(states, 2) == {"prompt_tokens": 8, "completion_tokens": 10, "total_tokens": 18}
    assert usage(states, 1) == {"prompt_tokens": 16, "completion_tokens": 10, "total_tokens": 26}


def test_choice_state_folds_deltas_and_echo():
    state = ChoiceState(0)
    assert state.add(TextDelta("r", text="lo", token_ids=[1], prompt_text="Hel", num_prompt_tokens=2,
                               num_output_tokens=1)) == "Hello"
    assert state.add(TextDelta("r", text="", token_ids=[2], finished=True, finish_reason="stop", stop_reason="!",
                               num_prompt_tokens=2, num_output_tokens=2)) == ""
    assert (state.full_text, state.finish_reason, state.stop_reason, state.num_output_tokens) == \
        ("Hello", "stop", "!", 2)
    assert state.echo_chars == 3


def test_completion_response_and_logprobs_offsets():
    shape = CompletionShape("cmpl-1", 123, "m", logprobs=1, include_usage=False)
    state = ChoiceState(0)
    state.add(TextDelta("r", text="ab c", token_ids=[1, 2], logprobs=[lp("ab"), lp(" c", -0.5)], finished=True,
                        finish_reason="length", num_prompt_tokens=1, num_output_tokens=2))
    body = shape.response([state], 1)
    assert body["object"] == "text_completion" and body["id"] == "cmpl-1" and body["created"] == 123
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["ab", " c"], "token_logprobs": [-1.0, -0.5],
        "top_logprobs": [{"ab": -1.0, "alt": -9999.0}, {" c": -0.5, "alt": -9999.0}], "text_offset": [0, 2]}
    assert body["usage"]["total_tokens"] == 3


def test_streamed_completion_offsets_continue_across_chunks():
    shape = CompletionShape("cmpl-1", 1, "m", logprobs=1, include_usage=True)
    state = ChoiceState(0)
    offsets = []
    for text in ("ab", "cde"):
        delta = TextDelta("r", text=text, token_ids=[1], logprobs=[lp(text)])
        (chunk,) = shape.delta_chunks(state, state.add(delta), delta)
        offsets += chunk["choices"][0]["logprobs"]["text_offset"]
        assert chunk["usage"] is None
    assert offsets == [0, 2]


def test_every_token_makes_a_chunk_even_without_text():
    """As vLLM: a token whose text is held back still makes a chunk (clients see progress, TTFT is the
    first token); a delta with neither token nor finish makes none."""
    shape = ChatShape("chatcmpl-1", 1, "m", logprobs=False, include_usage=False)
    state = ChoiceState(1)
    held = TextDelta("r", text="", token_ids=[5])  # text held back (a stop string may be starting)
    (chunk,) = shape.delta_chunks(state, state.add(held), held)
    assert chunk["choices"][0]["delta"] == {"content": ""} and chunk["choices"][0]["finish_reason"] is None
    nothing = TextDelta("r", text="")
    assert shape.delta_chunks(state, state.add(nothing), nothing) == []
    done = TextDelta("r", text="", token_ids=[6], finished=True, finish_reason="stop", stop_reason=6)
    (chunk,) = shape.delta_chunks(state, state.add(done), done)
    assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
    assert chunk["choices"] == [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop",
                                 "stop_reason": 6}]


def test_chat_start_chunks_open_every_choice_with_the_role():
    chunks = ChatShape("chatcmpl-1", 1, "m", logprobs=False, include_usage=True).start_chunks(2)
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1]
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} and c["usage"] is None
               for c in chunks)
    assert CompletionShape("cmpl-1", 1, "m", logprobs=None, include_usage=False).start_chunks(2) == []


def test_usage_chunk_has_no_choices():
    shape = ChatShape("chatcmpl-1", 1, "m", logprobs=False, include_usage=True)
    chunk = shape.usage_chunk([ChoiceState(0, num_prompt_tokens=4, num_output_tokens=2)], 1)
    assert chunk["choices"] == [] and chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 2,
                                                         "total_tokens": 6}


# A 3-token prompt "Hi there!": tokens 1 and 2 scored, top 2 each (token 2 is not its position's top).
PROMPT = PromptLogprobsText([7, 8, 9], ["Hi", " there", "!"],
                            PromptLogprobs([-0.5, -3.0], [1, 4], [8, 5, 6, 5], [-0.5, -1.0, -0.25, -1.5], 2),
                            [" there", " you", "?", " you"])


def scored(**fields) -> TextDelta:
    return TextDelta("r", text=" Yes", token_ids=[11], logprobs=[lp(" Yes")], prompt_text="Hi there!",
                     prompt_logprobs=PROMPT, num_prompt_tokens=3, num_output_tokens=1, **fields)


def test_echo_logprobs_put_the_prompt_first_in_openai_shape():
    shape = CompletionShape("cmpl-1", 1, "m", logprobs=1, include_usage=False, echo=True)
    state = ChoiceState(0)
    state.add(scored(finished=True, finish_reason="length"))
    choice = shape.response([state], 1)["choices"][0]
    assert choice["text"] == "Hi there! Yes" and "prompt_logprobs" not in choice
    assert choice["logprobs"] == {
        "tokens": ["Hi", " there", "!", " Yes"], "token_logprobs": [None, -0.5, -3.0, -1.0],
        # the top 1 of each position, and the prompt token itself when it is not among them
        "top_logprobs": [None, {" there": -0.5}, {"?": -0.25, "!": -3.0}, {" Yes": -1.0, "alt": -9999.0}],
        "text_offset": [0, 2, 8, 9]}


def test_prompt_logprobs_in_vllm_shape_and_score_only_drops_the_output():
    shape = CompletionShape("cmpl-1", 1, "m", logprobs=None, include_usage=False, prompt_logprobs=2,
                            score_only=True)
    state = ChoiceState(0)
    delta = shape.view(scored(finished=True, finish_reason="stop", stop_reason=2))
    (chunk,) = shape.delta_chunks(state, state.add(delta), delta)
    assert chunk["choices"][0]["text"] == "Hi there!" and chunk["choices"][0]["finish_reason"] == "length"
    body = shape.response([state], 1)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    expected = [None,
                {"8": {"logprob": -0.5, "rank": 1, "decoded_token": " there"},
                 "5": {"logprob": -1.0, "rank": 2, "decoded_token": " you"}},
                {"6": {"logprob": -0.25, "rank": 1, "decoded_token": "?"},
                 "5": {"logprob": -1.5, "rank": 2, "decoded_token": " you"},
                 "9": {"logprob": -3.0, "rank": 4, "decoded_token": "!"}}]
    assert body["choices"][0]["prompt_logprobs"] == expected == chunk["choices"][0]["prompt_logprobs"]
    assert body["choices"][0]["text"] == "Hi there!" and body["choices"][0]["stop_reason"] is None


def test_streamed_echo_logprobs_start_with_the_prompt():
    shape = CompletionShape("cmpl-1", 1, "m", logprobs=0, include_usage=False, echo=True)
    state = ChoiceState(0)
    first = scored()
    (chunk,) = shape.delta_chunks(state, state.add(first), first)
    block = chunk["choices"][0]["logprobs"]
    assert block["tokens"] == ["Hi", " there", "!", " Yes"] and block["text_offset"] == [0, 2, 8, 9]
    assert block["top_logprobs"][1:3] == [{" there": -0.5}, {"!": -3.0}]  # logprobs 0: the token alone
    later = TextDelta("r", text=".", token_ids=[12], logprobs=[lp(".")])
    (chunk,) = shape.delta_chunks(state, state.add(later), later)
    assert chunk["choices"][0]["logprobs"]["text_offset"] == [13]
