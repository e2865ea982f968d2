"""The tokenizer loop over real ipc:// sockets, with the api and the scheduler played by this test."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import zmq

from common import transport
from common.addresses import address_plan
from common.config import EngineConfig, ModelConfig, ServerConfig
from common.messages import (
    AbortRequest,
    BatchRequestOutput,
    BatchTextDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    RequestOutput,
    Shutdown,
    TextDelta,
    TokenizedRequest,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprobs,
)
from common.sampling_params import SamplingParams
from services.tokenizer.tokenizer_service import TokenizerService, main

TIMEOUT_MS = 5000
EOS = 2


class Peers:
    """The test's side of the sockets: api instance 0 and the scheduler."""

    def __init__(self, plan):
        self.ctx = zmq.Context()
        self.api_inbox = transport.pull_socket(self.ctx, plan.api_inbox[0])
        self.scheduler_inbox = transport.pull_socket(self.ctx, plan.scheduler_inbox)
        self.api_out = transport.push_socket(self.ctx, plan.tokenizer_inbox[0])
        self.scheduler_out = transport.push_socket(self.ctx, plan.tokenizer_inbox[0])

    def from_api(self, msg) -> None:
        transport.send(self.api_out, msg)

    def from_scheduler(self, *outputs: RequestOutput) -> None:
        transport.send(self.scheduler_out, BatchRequestOutput(list(outputs)))

    def at_scheduler(self):
        msg = transport.recv(self.scheduler_inbox, TIMEOUT_MS)
        assert msg is not None, "nothing reached the scheduler"
        return msg

    def at_api(self):
        msg = transport.recv(self.api_inbox, TIMEOUT_MS)
        assert msg is not None, "nothing reached the api"
        return msg

    def deltas(self) -> list[TextDelta]:
        msg = self.at_api()
        return msg.deltas if isinstance(msg, BatchTextDelta) else [msg]


@pytest.fixture
def plan(tmp_path):
    return address_plan(ServerConfig(ipc_dir=str(tmp_path)))


@pytest.fixture
def peers(plan, hf_tokenizer):
    service = TokenizerService(0, hf_tokenizer, plan, eos_token_ids=[EOS], max_model_len=4096)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    p = Peers(plan)
    yield p
    p.from_api(Shutdown("test over"))
    thread.join(timeout=10)
    assert not thread.is_alive()
    service.close()
    p.ctx.destroy(linger=0)


def generate(peers, req_id: str, params: SamplingParams | None = None, **prompt) -> TokenizedRequest:
    peers.from_api(GenerateRequest(req_id, 0, params or SamplingParams(max_tokens=64), **prompt))
    msg = peers.at_scheduler()
    assert isinstance(msg, TokenizedRequest) and msg.req_id == req_id
    return msg


def test_stream_reaches_the_api_as_text_deltas(peers, hf_tokenizer):
    req = generate(peers, "r1", prompt="Say hi:")
    assert req.prompt_token_ids == hf_tokenizer.encode("Say hi:")
    assert req.tokenizer_index == 0 and req.eos_token_ids == [EOS]

    out_ids = hf_tokenizer.encode("héllo 世界 🎉", add_special_tokens=False) + [EOS]
    texts = []
    for k, token in enumerate(out_ids):
        last = k == len(out_ids) - 1
        peers.from_scheduler(RequestOutput("r1", [token], finished=last, finish_reason="stop" if last else None,
                                           num_prompt_tokens=len(req.prompt_token_ids)))
        (delta,) = peers.deltas()
        assert delta.req_id == "r1" and delta.token_ids == [token] and "\ufffd" not in delta.text
        texts.append(delta.text)
    assert "".join(texts) == "héllo 世界 🎉"
    assert delta.finished and delta.finish_reason == "stop" and delta.stop_reason is None
    assert delta.num_output_tokens == len(out_ids) and delta.num_prompt_tokens == len(req.prompt_token_ids)


def test_one_batch_per_step_for_many_requests(peers, hf_tokenizer):
    for i in range(3):
        generate(peers, f"r{i}", prompt_token_ids=[1, 2, 3])
    ids = hf_tokenizer.encode(" ok", add_special_tokens=False)
    peers.from_scheduler(*[RequestOutput(f"r{i}", ids) for i in range(3)])
    deltas = peers.deltas()
    assert [(d.req_id, d.text) for d in deltas] == [(f"r{i}", " ok") for i in range(3)]


def test_stop_string_finishes_and_aborts_in_the_scheduler(peers, hf_tokenizer):
    generate(peers, "s1", SamplingParams(stop=("END",)), prompt="Count:")
    ids = hf_tokenizer.encode(" one two END three", add_special_tokens=False)
    shown = []
    for token in ids:
        peers.from_scheduler(RequestOutput("s1", [token]))
        (delta,) = peers.deltas()
        shown.append(delta.text)
        if delta.finished:
            break
    assert "".join(shown) == " one two "
    assert delta.finish_reason == "stop" and delta.stop_reason == "END"
    assert peers.at_scheduler() == AbortRequest("s1")
    # Tokens the scheduler had in flight are dropped; other requests carry on.
    generate(peers, "s2", prompt="x")
    peers.from_scheduler(RequestOutput("s1", [ids[-1]]), RequestOutput("s2", ids[:1]))
    assert [d.req_id for d in peers.deltas()] == ["s2"]


def test_malformed_bytes_and_bad_requests_fail_alone(peers):
    peers.api_out.send(b"\xc1\xc1 definitely not a message")
    peers.api_out.send(b"")
    peers.from_api(GenerateRequest("bad1", 0, SamplingParams(), messages=[{"role": "wizard", "content": "x"}]))
    peers.from_api(GenerateRequest("bad2", 0, SamplingParams(), prompt_token_ids=[1, 10**9]))
    peers.from_api(GenerateRequest("bad3", 0, SamplingParams(max_tokens=4000), prompt="a " * 200))
    peers.from_api(GenerateRequest("bad4", 7, SamplingParams(), prompt="no such api instance"))
    errors = [peers.deltas()[0] for _ in range(3)]
    assert [(e.req_id, e.finish_reason, e.error.param) for e in errors] == [
        ("bad1", "error", "messages.[0].role"), ("bad2", "error", "prompt"), ("bad3", "error", "max_tokens")]
    assert all(e.finished and e.error.code == 400 for e in errors)
    generate(peers, "good", prompt="still alive")


def test_chat_messages_use_the_model_template(peers, hf_tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "héllo"}]}]
    req = generate(peers, "c1", messages=messages)
    expected = hf_tokenizer.apply_chat_template([{"role": "user", "content": "héllo"}],
                                                add_generation_prompt=True, tokenize=False)
    assert req.prompt_token_ids == hf_tokenizer.encode(expected, add_special_tokens=False)


def test_client_abort_is_forwarded_and_state_dropped(peers, hf_tokenizer):
    generate(peers, "a1", prompt="hi")
    peers.from_api(AbortRequest("a1"))
    assert peers.at_scheduler() == AbortRequest("a1")
    generate(peers, "a2", prompt="hi")
    peers.from_scheduler(RequestOutput("a1", [100]), RequestOutput("a2", [100]))
    assert [d.req_id for d in peers.deltas()] == ["a2"]


def test_echo_and_logprobs(peers, hf_tokenizer):
    generate(peers, "e1", SamplingParams(logprobs=2), prompt_token_ids=hf_tokenizer.encode("Echo me"), echo=True)
    ids = hf_tokenizer.encode(" yes no", add_special_tokens=False)
    lps = [TopLogprobs(-0.1, [ids[0], ids[1]], [-0.1, -2.5]), TopLogprobs(-0.3, [ids[1]], [-0.3])]
    peers.from_scheduler(RequestOutput("e1", ids, new_logprobs=lps))
    (delta,) = peers.deltas()
    assert delta.prompt_text == "Echo me" and delta.text == " yes no"
    assert [(lp.token, lp.top_tokens) for lp in delta.logprobs] == [(" yes", [" yes", " no"]), (" no", [" no"])]
    peers.from_scheduler(RequestOutput("e1", [ids[0]], finished=True, finish_reason="length"))
    (delta,) = peers.deltas()
    assert delta.prompt_text is None and delta.finish_reason == "length"


def test_scheduler_errors_reach_the_api(peers):
    generate(peers, "x1", prompt="hi")
    peers.from_scheduler(RequestOutput("x1", [], finished=True, finish_reason="error", error="worker died"))
    (delta,) = peers.deltas()
    assert delta.finished and delta.error.message == "worker died" and delta.error.code == 500


def test_tokenize_and_detokenize(peers, hf_tokenizer):
    peers.from_api(TokenizeRequest("t1", 0, prompt="héllo", return_token_strs=True))
    resp = peers.at_api()
    assert isinstance(resp, TokenizeResponse) and resp.token_ids == hf_tokenizer.encode("héllo")
    assert resp.token_strs == hf_tokenizer.convert_ids_to_tokens(resp.token_ids)
    peers.from_api(DetokenizeRequest("d1", 0, resp.token_ids))
    assert peers.at_api() == DetokenizeResponse("d1", hf_tokenizer.decode(resp.token_ids))
    peers.from_api(DetokenizeRequest("d2", 0, [-1]))
    assert peers.at_api().error.param == "tokens"


def test_main_entrypoint_runs_as_a_process(tmp_path, tokenizer_dir, hf_tokenizer):
    config = EngineConfig(model=ModelConfig(tokenizer=tokenizer_dir), server=ServerConfig(ipc_dir=str(tmp_path)))
    plan = address_plan(config.server)
    p = Peers(plan)
    proc = multiprocessing.get_context("spawn").Process(target=main, args=(config.to_dict(), 0))
    proc.start()
    try:
        p.from_api(GenerateRequest("m1", 0, SamplingParams(), prompt="from a process"))
        msg = transport.recv(p.scheduler_inbox, 60_000)  # the child imports transformers first
        assert msg.prompt_token_ids == hf_tokenizer.encode("from a process")
        assert msg.eos_token_ids == [hf_tokenizer.eos_token_id]
        p.from_api(Shutdown("done"))
        proc.join(timeout=10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        p.ctx.destroy(linger=0)
