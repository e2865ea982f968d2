"""Every message kind round-trips through the codec; malformed bytes raise MessageDecodeError only."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import msgpack
import pytest

from headrace.common import codec
from headrace.common.codec import MessageDecodeError, decode, encode
from headrace.common.messages import (
    AbortRequest,
    BatchRequestOutput,
    BatchTextDelta,
    CachedRequestData,
    DetokenizeRequest,
    DetokenizeResponse,
    EngineStats,
    ErrorInfo,
    GenerateRequest,
    GrammarSpec,
    Heartbeat,
    NewRequestData,
    PromptLogprobs,
    PromptLogprobsText,
    RequestOutput,
    RequestTimings,
    Shutdown,
    StepPlan,
    StepResult,
    TextDelta,
    TokenizedRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobs,
    TopLogprobs,
    WorkerError,
    WorkerFailed,
    WorkerReady,
)
from headrace.common.sampling_params import SamplingParams

SP = SamplingParams(temperature=0.5, top_k=5, seed=7, max_tokens=32, stop=("###", "END"), stop_token_ids=(2,),
                    logprobs=3, prompt_logprobs=2, extra={"k": [1, "v"]})
LP = TopLogprobs(token_logprob=-0.25, top_token_ids=[5, 9], top_logprobs=[-0.25, -1.5])
PLP = PromptLogprobs(token_logprobs=[-1.0, -2.5], token_ranks=[1, 7], top_token_ids=[3, 4, 8, 1],
                     top_logprobs=[-1.0, -1.5, -0.5, -0.75], num_top=2)
OUT = RequestOutput(req_id="r1", new_token_ids=[11, 12], new_logprobs=[LP, LP], finished=True,
                    finish_reason="stop", stop_reason=2, num_prompt_tokens=4, num_cached_tokens=2,
                    timings=RequestTimings(queue=0.5, ingest=0.25, decode=1.5, inference=2.0), num_preemptions=1,
                    prompt_logprobs=PLP)
DELTA = TextDelta(req_id="r1", text="héllo 世界 🎉", token_ids=[1, 2],
                  logprobs=[TokenLogprobs("hé", -0.5, [1, 3], ["hé", "x"], [-0.5, -2.0])] * 2,
                  finished=True, finish_reason="stop", stop_reason="###", num_prompt_tokens=3,
                  num_output_tokens=2, num_cached_tokens=1, prompt_text="p",
                  timings=RequestTimings(queue=0.5, ingest=0.25, prefill=0.125), num_preemptions=1,
                  prompt_logprobs=PromptLogprobsText([2, 3, 4], ["a", "é", "世"], PLP, ["x", "y", "z", "w"]))

# One or more instances per message kind; test_every_message_kind_has_a_sample keeps this list complete.
SAMPLES = [
    StepPlan(step_id=1,
             new_requests=[NewRequestData("r1", [1, 2, 3], [], SP, [0, 1], 0, 42),
                           NewRequestData("r2", [1], [4], SP, [2], 1, 43, grammar='root ::= "a" | "b"')],
             cached_requests=[CachedRequestData("r0", [7], 17, [5])],
             num_scheduled_tokens={"r1": 3, "r0": 4}, finished_req_ids=["r9"], preempted_req_ids=["r8"],
             spec_token_ids={"r0": [11, 12, 13]}),
    StepPlan(step_id=2, cached_requests=[CachedRequestData("r0", [], 20)], num_scheduled_tokens={"r0": 3},
             num_draft_tokens={"r0": 2}),
    StepPlan(step_id=0),
    StepResult(step_id=1, req_ids=["r1", "r0"], sampled_token_ids=[5, 6], logprobs=[LP, None], execute_time=0.01,
               prompt_logprobs={"r1": PLP, "r0": PromptLogprobs()}, failed={"r2": "bad grammar"},
               num_accepted_drafts={"r0": 2}, draft_token_ids={"r0": [11, 12, 13]}),
    GenerateRequest("r1", SP, prompt="hi", echo=True, arrival_time=1.5),
    GenerateRequest("r2", SamplingParams(), prompt_token_ids=[1, 2, 3], add_special_tokens=False),
    GenerateRequest("r3", SamplingParams(), messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                    chat_template_kwargs={"enable_thinking": False}, continue_final_message=True),
    AbortRequest("r1"),
    TokenizeRequest("t1", prompt="hello", return_token_strs=True),
    TokenizeRequest("t2", messages=[{"role": "user", "content": "hi"}], add_generation_prompt=False),
    DetokenizeRequest("d1", [1, 2, 3]),
    TokenizedRequest("r1", [1, 2, 3], SP, arrival_time=3.0),
    TokenizedRequest("r2", [1], SP, grammar='root ::= [0-9]+'),
    GenerateRequest("r4", SP, messages=[{"role": "user", "content": "x"}],
                    grammar=GrammarSpec("json_schema", '{"type": "object"}'),
                    tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    BatchRequestOutput([OUT, RequestOutput("r2", [], error="boom", finished=True, finish_reason="error")], step_id=5),
    DELTA,
    TextDelta("r2", finished=True, finish_reason="error", error=ErrorInfo("bad", param="messages.[0].role")),
    BatchTextDelta([DELTA, TextDelta("r3", "x")]),
    TokenizeResponse("t1", [1, 2], ["a", "b"]),
    TokenizeResponse("t2", error=ErrorInfo("no", code=500, type="InternalServerError")),
    DetokenizeResponse("d1", "abc"),
    EngineStats(num_running=3, num_waiting=1, kv_cache_usage=0.5, prefix_cache_queries=8, prefix_cache_hits=4),
    EngineStats(num_waiting=2, serving=False, num_waiting_tokens=40),
    EngineStats(num_running=1, num_waiting_tokens=7, data_parallel_rank=3, num_running_tokens=129),
    EngineStats(spec_num_drafts=3, spec_num_draft_tokens=9, spec_num_accepted_tokens=5, spec_accepted_per_pos=[3, 2, 0]),
    Heartbeat("tokenizer", 1, 99.0),
    Shutdown("test"),
    WorkerReady(1, 4096, 3.5, "cuda:1"),
    WorkerFailed(0, "exited with code -9"),
    WorkerError(12, "RuntimeError: boom"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is type(msg)
    assert back == msg


def test_every_message_kind_has_a_sample():
    assert set(codec.registered().values()) <= {type(m) for m in SAMPLES}


def test_sampling_params_keep_types_and_extra():
    back = decode(encode(SAMPLES[0])).new_requests[0].sampling_params
    assert back.stop == ("###", "END") and back.stop_token_ids == (2,)
    assert back.extra == {"k": [1, "v"]}


def test_token_ids_are_packed_int32_bytes_on_the_wire():
    ids = [0, 1, 2**31 - 1, 49151]
    raw = msgpack.unpackb(encode(TokenizedRequest("r", ids, SP)), raw=False)
    assert raw[0] == "tokenized_request"
    assert raw[2] == struct.pack("<4i", *ids)
    # Block ids too, nested in a plan.
    raw = msgpack.unpackb(encode(SAMPLES[0]), raw=False)
    assert raw[2][0][4] == struct.pack("<2i", 0, 1) and raw[3][0][1] == struct.pack("<i", 7)
    # Nested and optional TokenIds too.
    raw = msgpack.unpackb(encode(StepResult(1, ["a"], [7], [LP])), raw=False)
    assert raw[3] == struct.pack("<i", 7)
    assert raw[4][0][1] == struct.pack("<2i", 5, 9)
    raw = msgpack.unpackb(encode(GenerateRequest("r", SP, prompt_token_ids=[3, 4])), raw=False)
    assert raw[4] == struct.pack("<2i", 3, 4)


def _tampered(msg, index, value) -> bytes:
    raw = msgpack.unpackb(encode(msg), raw=False)
    raw[index] = value
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # never used in msgpack
    b"\x93\x01",  # truncated array
    b"garbage bytes \xff\x00",
    msgpack.packb({"tag": "step_plan"}),
    msgpack.packb([]),
    msgpack.packb([1, 2, 3]),
    msgpack.packb(["no_such_message", 1]),
    msgpack.packb(["abort_request"]),  # missing field
    msgpack.packb(["abort_request", "r", "extra"]),  # too many fields
    encode(AbortRequest("r")) + b"\x00",  # trailing bytes
    _tampered(TokenizedRequest("r", [1], SP), 2, b"\x01\x02\x03"),  # ids not a multiple of 4 bytes
    _tampered(TokenizedRequest("r", [1], SP), 2, [1, 2]),  # ids as a list, not bytes
    _tampered(TokenizedRequest("r", [1], SP), 3, {"temperature": -1.0}),  # fails SamplingParams validation
    _tampered(TokenizedRequest("r", [1], SP), 3, {"no_such_param": 1}),
    _tampered(TokenizedRequest("r", [1], SP), 3, "not a map"),
    _tampered(BatchRequestOutput([OUT]), 1, [["r1"]]),  # nested message with too few fields
    _tampered(BatchRequestOutput([OUT]), 1, "not a list"),
    _tampered(StepPlan(1), 4, []),  # dict field given a list
    _tampered(TokenizedRequest("r", [1], SP, grammar="root ::= \"a\""), 5, 7),  # grammar not a string
    _tampered(GenerateRequest("r", SP, prompt="p", grammar=GrammarSpec("regex", "a")), 11, ["regex"]),  # too short
])
def test_malformed_input_raises_message_decode_error(data):
    with pytest.raises(MessageDecodeError):
        decode(data)


def test_encode_rejects_unregistered_objects():
    with pytest.raises(TypeError):
        encode(ErrorInfo("nested types are not top-level messages"))
    with pytest.raises(TypeError):
        encode({"a": 1})


def test_register_adds_a_message_kind_with_one_decorator():
    @codec.register
    @dataclass
    class Ping:
        TAG: ClassVar[str] = "test_ping"
        ids: list[int]  # plain list annotation: travels as a msgpack array
        n: int = 0

    assert decode(encode(Ping([1, 2], 3))) == Ping([1, 2], 3)
    with pytest.raises(TypeError):
        @codec.register
        @dataclass
        class Clash:
            TAG: ClassVar[str] = "test_ping"


def test_encode_is_lean_at_256_requests():
    # Not a benchmark: a guard against an accidental deep copy or per-field reflection in the hot path.
    import time

    batch = BatchRequestOutput([RequestOutput(f"req-{i}", [i]) for i in range(256)])
    result = StepResult(1, [f"req-{i}" for i in range(256)], list(range(256)), [None] * 256)
    start = time.perf_counter()
    for _ in range(100):
        encode(batch)
        encode(result)
    assert (time.perf_counter() - start) / 100 < 0.005
