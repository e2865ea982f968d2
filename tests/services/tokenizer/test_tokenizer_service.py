"""The tokenizer loop over real ipc:// sockets, with the scheduler's and the apis' ROUTERs played by this test."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest
import zmq

from headrace.common import codec, transport
from headrace.common.addresses import address_plan
from headrace.common.config import EngineConfig, ModelConfig, ServerConfig
from headrace.common.messages import (
    AbortRequest,
    BatchRequestOutput,
    BatchTextDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    Heartbeat,
    RequestOutput,
    RequestTimings,
    Shutdown,
    TextDelta,
    TokenizedRequest,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprobs,
)
from headrace.common.models.resolve import resolve_engine_config
from headrace.common.sampling_params import SamplingParams
from headrace.services.tokenizer.text_codec import TextCodec
from headrace.services.tokenizer.tokenizer_service import TokenizerService, main

TIMEOUT_S = 5.0
EOS = 2
BEAT_S = 0.05  # fast heartbeats, so every test also sees them interleaved with its traffic


class Peers:
    """The test's side of the sockets: the scheduler's ROUTER and one ROUTER per api, bound as they are."""

    def __init__(self, plan):
        self.ctx = zmq.Context()
        self.scheduler = transport.router_socket(self.ctx, plan.scheduler)
        self.apis = [transport.router_socket(self.ctx, ep) for ep in plan.api_inbox]
        self.tok = b""  # the (first) tokenizer's identity, learnt from its hello

    def receive(self, sock: zmq.Socket, *, heartbeats: bool = False) -> tuple[bytes, Any]:
        """The next (identity, message) on a ROUTER; heartbeats are skipped unless asked for."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            got = transport.router_recv(sock, 100)
            if got is not None and (heartbeats or not isinstance(got[1], Heartbeat)):
                return got
        raise AssertionError("nothing arrived")

    def hello(self, sock: zmq.Socket) -> bytes:
        identity, msg = self.receive(sock, heartbeats=True)
        assert isinstance(msg, Heartbeat) and msg.sender == "tokenizer"
        return identity

    def from_api(self, msg: Any, api: int = 0, to: bytes | None = None) -> None:
        transport.router_send(self.apis[api], to or self.tok, msg)

    def from_scheduler(self, *outputs: RequestOutput, to: bytes | None = None) -> None:
        transport.router_send(self.scheduler, to or self.tok, BatchRequestOutput(list(outputs)))

    def at_scheduler(self, sender: bytes | None = None) -> Any:
        identity, msg = self.receive(self.scheduler)
        assert identity == (sender or self.tok)
        return msg

    def at_api(self, api: int = 0, sender: bytes | None = None) -> Any:
        identity, msg = self.receive(self.apis[api])
        assert identity == (sender or self.tok)
        return msg

    def deltas(self, api: int = 0, sender: bytes | None = None) -> list[TextDelta]:
        msg = self.at_api(api, sender)
        return msg.deltas if isinstance(msg, BatchTextDelta) else [msg]


def start(service: TokenizerService) -> threading.Thread:
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return thread


def stop(peers: Peers, service: TokenizerService, thread: threading.Thread) -> None:
    peers.from_api(Shutdown("test over"), to=service.identity)
    thread.join(timeout=10)
    assert not thread.is_alive()
    service.close()


@pytest.fixture
def plan(tmp_path):
    return address_plan(ServerConfig(ipc_dir=str(tmp_path), num_api_servers=2))


@pytest.fixture
def make_service(plan, hf_tokenizer):
    def make(index: int = 0) -> TokenizerService:
        return TokenizerService(index, TextCodec(hf_tokenizer, max_model_len=4096), plan, heartbeat_interval_s=BEAT_S)
    return make


@pytest.fixture
def peers(plan, make_service):
    p = Peers(plan)
    service = make_service()
    thread = start(service)
    # Both ROUTERs learn the tokenizer from its hello; until then a reply to it would be dropped.
    p.tok = p.hello(p.apis[0])
    assert p.hello(p.scheduler) == p.tok == service.identity and p.hello(p.apis[1]) == p.tok
    yield p
    stop(p, service, thread)
    p.ctx.destroy(linger=0)


def generate(peers, req_id: str, params: SamplingParams | None = None, api: int = 0, **prompt) -> TokenizedRequest:
    peers.from_api(GenerateRequest(req_id, params or SamplingParams(max_tokens=64), **prompt), api)
    msg = peers.at_scheduler()
    assert isinstance(msg, TokenizedRequest) and msg.req_id == req_id
    return msg


def test_hello_then_heartbeats_on_every_socket(plan, make_service):
    p = Peers(plan)
    service = make_service(index=5)
    thread = start(service)
    try:
        for sock in (p.scheduler, *p.apis):
            beats = [p.receive(sock, heartbeats=True) for _ in range(3)]
            assert {identity for identity, _ in beats} == {service.identity}
            assert all(b.sender == "tokenizer" and b.index == 5 for _, b in beats)
            assert beats[0][1].timestamp < beats[1][1].timestamp < beats[2][1].timestamp
        assert service.identity.startswith(b"tok-")
    finally:
        stop(p, service, thread)
        p.ctx.destroy(linger=0)


def test_stream_reaches_the_api_as_text_deltas(peers, hf_tokenizer):
    req = generate(peers, "r1", prompt="Say hi:")
    assert req.prompt_token_ids == hf_tokenizer.encode("Say hi:")

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


@pytest.mark.parametrize("code, kind", [(400, "BadRequestError"), (503, "ServiceUnavailableError"),
                                        (None, "InternalServerError")])
def test_engine_errors_keep_their_status(peers, code, kind):
    """The scheduler names whose fault an error is (400: a token id outside the vocabulary); the api must
    answer with that status, not a blanket 500."""
    generate(peers, "e1", prompt="x")
    peers.from_scheduler(RequestOutput("e1", [], finished=True, finish_reason="error", error="bad id",
                                       error_code=code))
    (delta,) = peers.deltas()
    assert delta.finished and delta.error is not None
    assert (delta.error.code, delta.error.type) == (code or 500, kind) and delta.error.message == "bad id"


def test_one_batch_per_step_per_api(peers, hf_tokenizer):
    for i in range(4):
        # api_index names the sender for its logs only: the socket a request came on routes its replies.
        peers.from_api(GenerateRequest(f"r{i}", SamplingParams(), prompt_token_ids=[1, 2, 3]), api=i % 2)
        assert peers.at_scheduler().req_id == f"r{i}"
    ids = hf_tokenizer.encode(" ok", add_special_tokens=False)
    peers.from_scheduler(*[RequestOutput(f"r{i}", ids) for i in range(4)])
    assert [(d.req_id, d.text) for d in peers.deltas(api=0)] == [("r0", " ok"), ("r2", " ok")]
    assert [(d.req_id, d.text) for d in peers.deltas(api=1)] == [("r1", " ok"), ("r3", " ok")]


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
    # Tokens the scheduler had in flight are dropped (and the abort repeated); other requests carry on.
    generate(peers, "s2", prompt="x")
    peers.from_scheduler(RequestOutput("s1", [ids[-1]]), RequestOutput("s2", ids[:1]))
    assert [d.req_id for d in peers.deltas()] == ["s2"]
    assert peers.at_scheduler() == AbortRequest("s1")


def phases(delta) -> list[float | None]:
    t = delta.timings or RequestTimings()
    return [t.ingest, t.queue, t.prefill, t.decode, t.inference]


def test_request_phases_pass_through_and_a_stop_string_times_the_decode_here(peers, hf_tokenizer):
    """The scheduler's phases reach the api on the deltas they came with; a request this tokenizer ends on a
    stop string gets its decode timed here (the scheduler never reports that finish to the api)."""
    generate(peers, "p1", SamplingParams(max_tokens=3), prompt="Count:")
    generate(peers, "p2", SamplingParams(stop=("END",)), prompt="Count:")
    one, two, end = (hf_tokenizer.encode(w, add_special_tokens=False) for w in (" one", " two", " END"))
    first = RequestTimings(ingest=0.001, queue=0.002, prefill=0.25)
    sent_first = time.time()
    peers.from_scheduler(RequestOutput("p1", one, timings=first), RequestOutput("p2", one, timings=first))
    assert [phases(d) for d in peers.deltas()] == [[0.001, 0.002, 0.25, None, None]] * 2
    peers.from_scheduler(RequestOutput("p1", two), RequestOutput("p2", two))
    assert [phases(d) for d in peers.deltas()] == [[None] * 5] * 2
    last = RequestTimings(ingest=0.001, queue=0.002, decode=0.5, inference=0.75)
    peers.from_scheduler(RequestOutput("p1", end, finished=True, finish_reason="length", timings=last),
                         RequestOutput("p2", end))
    p1, p2 = peers.deltas()
    got_last = time.time()
    assert p1.finished and phases(p1) == [0.001, 0.002, None, 0.5, 0.75]
    assert p2.finished and p2.stop_reason == "END" and p2.timings.prefill is None
    assert 0 < p2.timings.decode < got_last - sent_first  # from " one" arriving here to " END" arriving here
    assert p2.timings.inference == pytest.approx(0.25 + p2.timings.decode)
    assert peers.at_scheduler() == AbortRequest("p2")


def test_outputs_for_unknown_requests_are_aborted(peers):
    # Finished ones hold no KV any more; unfinished ones (e.g. from this tokenizer's previous life) do.
    peers.from_scheduler(RequestOutput("gone", [5], finished=True, finish_reason="length"),
                         RequestOutput("orphan", [5]))
    assert peers.at_scheduler() == AbortRequest("orphan")
    generate(peers, "after", prompt="next")  # nothing else came before it: no abort for "gone"


def test_malformed_bytes_and_bad_requests_fail_alone(peers):
    api = peers.apis[0]
    api.send_multipart([peers.tok, b"\xc1\xc1 definitely not a message"])
    api.send_multipart([peers.tok, b""])
    api.send_multipart([peers.tok, codec.encode(AbortRequest("z")), b"a second frame"])
    peers.scheduler.send_multipart([peers.tok, b"\x00junk"])
    peers.from_scheduler(RequestOutput("x", [1]))
    # Outputs only count from the scheduler, requests only from an api.
    api.send_multipart([peers.tok, codec.encode(BatchRequestOutput([RequestOutput("y", [1])]))])
    peers.scheduler.send_multipart([peers.tok, codec.encode(AbortRequest("w"))])
    peers.from_api(GenerateRequest("bad1", SamplingParams(), messages=[{"role": "wizard", "content": "x"}]))
    peers.from_api(GenerateRequest("bad2", SamplingParams(), prompt_token_ids=[1, 10**9]))
    peers.from_api(GenerateRequest("bad3", SamplingParams(max_tokens=4000), prompt="a " * 200))
    errors = [peers.deltas()[0] for _ in range(3)]
    assert [(e.req_id, e.finish_reason, e.error.param) for e in errors] == [
        ("bad1", "error", "messages.[0].role"), ("bad2", "error", "prompt"), ("bad3", "error", "max_tokens")]
    assert all(e.finished and e.error.code == 400 for e in errors)
    assert peers.at_scheduler() == AbortRequest("x")  # for the unknown "x" only: no "z", "y" or "w"
    generate(peers, "good", prompt="still alive")


def test_chat_messages_use_the_model_template(peers, hf_tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "héllo"}]}]
    req = generate(peers, "c1", messages=messages)
    expected = hf_tokenizer.apply_chat_template([{"role": "user", "content": "héllo"}],
                                                add_generation_prompt=True, tokenize=False)
    assert req.prompt_token_ids == hf_tokenizer.encode(expected, add_special_tokens=False)


def test_client_abort_is_forwarded_and_state_dropped(peers):
    generate(peers, "a1", prompt="hi")
    peers.from_api(AbortRequest("a1"))
    assert peers.at_scheduler() == AbortRequest("a1")
    generate(peers, "a2", prompt="hi")
    peers.from_scheduler(RequestOutput("a1", [100], finished=True, finish_reason="abort"),
                         RequestOutput("a2", [100]))
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


def test_tokenize_and_detokenize_answer_the_asking_api(peers, hf_tokenizer):
    peers.from_api(TokenizeRequest("t1", prompt="héllo", return_token_strs=True), api=1)
    resp = peers.at_api(api=1)
    assert isinstance(resp, TokenizeResponse) and resp.token_ids == hf_tokenizer.encode("héllo")
    assert resp.token_strs == hf_tokenizer.convert_ids_to_tokens(resp.token_ids)
    peers.from_api(DetokenizeRequest("d1", resp.token_ids))
    assert peers.at_api() == DetokenizeResponse("d1", hf_tokenizer.decode(resp.token_ids))
    peers.from_api(DetokenizeRequest("d2", [-1]))
    assert peers.at_api().error.param == "tokens"


def test_two_tokenizers_each_answer_their_own_requests(plan, make_service, hf_tokenizer):
    p = Peers(plan)
    services = [make_service(index=i) for i in range(2)]
    threads = [start(s) for s in services]
    try:
        for sock in (p.scheduler, p.apis[0]):  # both must know both tokenizers before anything is routed
            seen: set[bytes] = set()
            while len(seen) < 2:  # one tokenizer may beat several times before the other's hello
                seen.add(p.hello(sock))
            assert seen == {s.identity for s in services}
        a, b = (s.identity for s in services)
        p.from_api(GenerateRequest("ra", SamplingParams(), prompt="alpha"), to=a)
        p.from_api(GenerateRequest("rb", SamplingParams(), prompt="beta"), to=b)
        got = dict(p.receive(p.scheduler) for _ in range(2))
        assert (got[a].req_id, got[b].req_id) == ("ra", "rb")

        word = hf_tokenizer.encode(" done", add_special_tokens=False)
        p.from_scheduler(RequestOutput("ra", word, finished=True, finish_reason="length"), to=a)
        p.from_scheduler(RequestOutput("rb", word, finished=True, finish_reason="length"), to=b)
        replies = dict(p.receive(p.apis[0]) for _ in range(2))
        assert [(d.req_id, d.text) for d in replies[a].deltas] == [("ra", " done")]
        assert [(d.req_id, d.text) for d in replies[b].deltas] == [("rb", " done")]
    finally:
        for s, t in zip(services, threads):
            stop(p, s, t)
        p.ctx.destroy(linger=0)


def test_a_dead_parent_ends_the_loop(plan, make_service):
    service = make_service()
    thread = threading.Thread(target=service.run, kwargs={"parent_pid": -1}, daemon=True)  # -1: never our parent
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    service.close()


def test_main_entrypoint_runs_as_a_process(tmp_path, tokenizer_dir, hf_tokenizer):
    config = resolve_engine_config(EngineConfig(model=ModelConfig(tokenizer=tokenizer_dir),
                                                server=ServerConfig(ipc_dir=str(tmp_path)), device="cpu"))
    p = Peers(address_plan(config.server))
    proc = multiprocessing.get_context("spawn").Process(target=main, args=(config.to_dict(), 0))
    proc.start()
    try:
        deadline = time.monotonic() + 60  # the child imports transformers before its hello
        while (got := transport.router_recv(p.apis[0], 100)) is None:
            assert time.monotonic() < deadline and proc.is_alive(), "no hello from the tokenizer process"
        p.tok, hello = got
        assert hello.sender == "tokenizer" and p.tok.startswith(b"tok-")
        p.from_api(GenerateRequest("m1", SamplingParams(), prompt="from a process"))
        msg = p.at_scheduler()
        assert msg.prompt_token_ids == hf_tokenizer.encode("from a process")
        p.from_api(Shutdown("done"))
        proc.join(timeout=10)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        p.ctx.destroy(linger=0)


def test_a_dead_apis_requests_are_aborted_and_a_dead_schedulers_fail_with_503(peers):
    generate(peers, "kept", prompt="hi", api=0)
    generate(peers, "orphan", prompt="hi", api=1)
    peers.apis[1].close(linger=0)  # api 1's process is gone: its connection closes
    assert peers.at_scheduler() == AbortRequest("orphan")  # nobody can read it: its KV is freed
    peers.scheduler.close(linger=0)  # the scheduler is gone: what it held is lost, and each request says so
    (delta,) = peers.deltas()
    assert delta.req_id == "kept" and delta.finished and delta.finish_reason == "error"
    assert delta.error.code == 503 and "scheduler" in delta.error.message
    assert "KV cache state was lost" in delta.error.message
