"""The api over real HTTP (uvicorn) and real ipc sockets, with the tokenizers and the scheduler played here."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from headrace.common.messages import BatchTextDelta, ErrorInfo, TextDelta, TokenLogprobs
from tests.services.api.fakes import delta, until, words

pytestmark = pytest.mark.anyio


def events(body: str) -> list:
    """SSE body -> decoded `data:` payloads ("[DONE]" kept as the string)."""
    assert body.endswith("data: [DONE]\n\n")
    out = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_completion_non_streamed(stack):
    tok = await stack.add_tokenizer(words("Hello", " world", stop_reason=None))
    r = await stack.http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Say hi",
                                                       "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "SmolLM2-135M-Instruct" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "length",
                                "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    (req,) = tok.requests
    assert req.prompt == "Say hi" and req.prompt_token_ids is None
    assert req.sampling_params.max_tokens == 2 and req.sampling_params.temperature == 0.0
    assert req.req_id == f"{body['id']}-0"
    assert r.headers["x-request-id"]


async def test_completion_n_and_batched_prompts_index_and_usage(stack):
    tok = await stack.add_tokenizer(words("a", "b", "c"))
    r = await stack.http.post("/v1/completions", json={"prompt": [[1, 2], [3, 4, 5]], "n": 2, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "abc" for c in body["choices"])
    # prompt tokens once per prompt (2 prompts x 3 scripted), completion tokens summed over 4 choices
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    reqs = sorted(tok.requests, key=lambda q: q.req_id)
    assert [q.req_id for q in reqs] == [f"{body['id']}-{k}" for k in range(4)]
    assert [q.prompt_token_ids for q in reqs] == [[1, 2], [1, 2], [3, 4, 5], [3, 4, 5]]
    assert all(q.sampling_params.n == 1 for q in reqs)
    assert [q.sampling_params.seed for q in reqs] == [7, 8, 7, 8]  # distinct per choice, same per prompt


async def test_completion_streamed_with_usage(stack):
    await stack.add_tokenizer(words("Hel", "lo", "!", finish_reason="stop", stop_reason=2))
    r = await stack.http.post("/v1/completions", json={"prompt": "x", "stream": True,
                                                       "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    chunks, usage = ev[:-2], ev[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello!"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["usage"] is None
               for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert chunks[-1]["choices"][0]["stop_reason"] == 2
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                          "total_tokens": 6}


async def test_chat_streamed_role_first_then_content_then_finish(stack):
    tok = await stack.add_tokenizer(words("Hi", " there"))
    r = await stack.http.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "stream": True, "n": 2, "max_completion_tokens": 5})
    assert r.status_code == 200, r.text
    ev = events(r.text)
    assert ev[-1] == "[DONE]" and all("usage" not in c for c in ev[:-1])
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    for k in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hi there"
        assert [c["finish_reason"] for c in mine] == [None, None, "length"]
    req = tok.requests[0]
    assert req.messages == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert req.sampling_params.max_tokens == 5 and req.add_generation_prompt


async def test_chat_non_streamed_with_logprobs(stack):
    def script(req):
        lp = TokenLogprobs("Hi", -0.5, [7, 8], ["Hi", "Yo"], [-0.5, float("-inf")])
        return [[delta(req.req_id, "Hi", 0, 1, "stop", logprobs=[lp])]]

    tok = await stack.add_tokenizer(script)
    r = await stack.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hi"}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {"content": [{
        "token": "Hi", "logprob": -0.5, "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                         {"token": "Yo", "logprob": -9999.0, "bytes": [89, 111]}]}]}
    assert tok.requests[0].sampling_params.logprobs == 2


async def test_tokenizer_error_maps_to_its_http_status(stack):
    def too_long(req):
        info = ErrorInfo("This model's maximum context length is 8 tokens.", "BadRequestError", "prompt", 400)
        return [[TextDelta(req.req_id, finished=True, finish_reason="error", error=info)]]

    await stack.add_tokenizer(too_long)
    for stream in (False, True):  # a stream holds its headers until the first delta, so both get a real 400
        r = await stack.http.post("/v1/completions", json={"prompt": "x", "stream": stream})
        assert r.status_code == 400
        assert r.json() == {"error": {"message": "This model's maximum context length is 8 tokens.",
                                      "type": "BadRequestError", "param": "prompt", "code": 400}}


async def test_unencodable_values_are_a_400_not_a_crash(stack):
    await stack.add_tokenizer(words("ok"))
    r = await stack.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"big": 2**70}})
    assert r.status_code == 400 and "cannot be encoded" in r.json()["error"]["message"]
    r = await stack.http.post("/v1/completions", json={"prompt": "x"})  # the server carries on
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"


async def test_silent_tokenizer_fails_its_requests_with_503(stack):
    tok = await stack.add_tokenizer()  # answers nothing by itself
    pending = asyncio.create_task(stack.http.post("/v1/completions", json={"prompt": "x"}))
    await tok.next_request()
    tok.silent = True
    r = await pending
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailableError" and "stopped responding" in err["message"]
    assert stack.client.num_live_tokenizers == 0
    r = await stack.http.post("/v1/completions", json={"prompt": "x"})  # nobody left: 503 at once
    assert r.status_code == 503 and "No tokenizer" in r.json()["error"]["message"]


async def test_silent_tokenizer_mid_stream_sends_an_error_event(stack):
    tok = await stack.add_tokenizer()
    pending = asyncio.create_task(stack.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "stream": True}))
    (req,) = await tok.next_request()
    await tok.send(BatchTextDelta([delta(req.req_id, "partial", 0, 2)]))
    tok.silent = True
    r = await pending
    assert r.status_code == 200
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    assert ev[-2]["error"]["code"] == 503 and ev[-2]["error"]["type"] == "ServiceUnavailableError"
    assert ev[1]["choices"][0]["delta"] == {"content": "partial"}


async def test_requests_round_robin_and_stick_to_their_tokenizer(stack):
    a, b = await stack.add_tokenizer(words("a")), await stack.add_tokenizer(words("b"))
    texts = []
    for _ in range(4):
        r = await stack.http.post("/v1/completions", json={"prompt": "x", "n": 2})
        texts.append({c["text"] for c in r.json()["choices"]})
    assert sorted(map(sorted, texts)) == [["a"], ["a"], ["b"], ["b"]]  # both choices of one request on one
    assert len(a.requests) == len(b.requests) == 4


async def test_streaming_client_disconnect_aborts(stack):
    # Choice 0 says one word and choice 1 nothing; neither finishes.
    tok = await stack.add_tokenizer(lambda req: [[delta(req.req_id, "one", 0, 5)]] if req.req_id.endswith("-0")
                                    else None)
    async with stack.http.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True, "n": 2}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"][0]["text"] == "one"
                break  # now hang up with both choices unfinished
    reqs = await tok.next_request(2)
    assert sorted(await tok.wait_aborted(2)) == sorted(q.req_id for q in reqs)
    await until(lambda: stack.client.num_running == 0)


async def test_non_streamed_client_disconnect_aborts(stack):
    tok = await stack.add_tokenizer()
    pending = asyncio.create_task(stack.http.post("/v1/completions", json={"prompt": "x"}))
    (req,) = await tok.next_request()
    pending.cancel()  # the client gives up: httpx drops the connection
    assert await tok.wait_aborted() == [req.req_id]
    await until(lambda: stack.client.num_running == 0)


async def test_health_follows_engine_stats_and_tokenizers(stack):
    assert (await stack.http.get("/health")).status_code == 503  # nothing yet
    await stack.ready()
    assert (await stack.http.get("/health")).status_code == 503  # engine up, no tokenizer
    await stack.add_tokenizer()
    assert (await stack.http.get("/health")).status_code == 200
    assert stack.scheduler.hellos and stack.scheduler.hellos[0].sender == "api"
    stack.scheduler.sending = False
    await until(lambda: not stack.client.engine_alive)
    r = await stack.http.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == 503


async def test_tokenize_and_detokenize(stack):
    await stack.add_tokenizer()
    r = await stack.http.post("/tokenize", json={"prompt": "ab cde", "return_token_strs": True})
    assert r.json() == {"count": 2, "max_model_len": 8192, "tokens": [2, 3], "token_strs": ["ab", "cde"]}
    r = await stack.http.post("/tokenize", json={"messages": [{"role": "user", "content": "four"}]})
    assert r.json()["tokens"] == [4]
    r = await stack.http.post("/detokenize", json={"tokens": [5, 6]})
    assert r.json() == {"prompt": "5-6"}
    r = await stack.http.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    assert r.status_code == 400


async def test_models_and_version(stack):
    r = await stack.http.get("/v1/models")
    assert [m["id"] for m in r.json()["data"]] == ["SmolLM2-135M-Instruct"] and r.json()["object"] == "list"
    assert (await stack.http.get("/version")).json()["version"]


async def test_api_key_guards_v1_but_not_health_or_version(make_stack):
    async with make_stack(api_key="sekret") as stack:
        r = await stack.http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await stack.http.get("/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await stack.http.post("/tokenize", json={"prompt": "x"})).status_code == 401
        assert (await stack.http.get("/v1/models", headers={"Authorization": "Bearer sekret"})).status_code == 200
        assert (await stack.http.get("/version")).status_code == 200
        assert (await stack.http.get("/health")).status_code == 503  # open (not 401), just not ready


async def test_request_id_is_echoed_or_generated(stack):
    r = await stack.http.get("/version", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await stack.http.post("/v1/completions", json={"prompt": "x", "model": "other"},
                              headers={"X-Request-Id": "mine"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "mine"
    assert r.json()["error"]["code"] == "model_not_found"
    first, second = (await stack.http.get("/version")).headers["x-request-id"], \
        (await stack.http.get("/version")).headers["x-request-id"]
    assert first and second and first != second


async def test_overload_is_429_with_retry_after_before_any_engine_work(make_stack):
    async with make_stack(max_num_queued_reqs=3) as stack:
        tok = await stack.add_tokenizer(words("a"))
        await stack.ready()
        ok = await stack.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert ok.status_code == 200, ok.text
        stack.scheduler.waiting = 3  # the scheduler reports a full queue
        await until(lambda: stack.client.queued_estimate == 3)
        t0 = time.monotonic()
        r = await stack.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "RateLimitError" and "at most 3" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 0.5
        assert len(tok.requests) == 1  # the refused request never reached a tokenizer
        stack.scheduler.waiting = 1  # room for 2 engine requests: n=3 is refused, n=2 admitted
        await until(lambda: stack.client.queued_estimate == 1)
        r = await stack.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "n": 3, "max_tokens": 1})
        assert r.status_code == 429
        r = await stack.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "n": 2, "max_tokens": 1})
        assert r.status_code == 200, r.text


async def test_queued_tokens_past_the_bound_are_429_and_one_request_may_start_only_so_many_sequences(make_stack):
    async with make_stack(max_queued_tokens=100, max_seqs_per_request=8) as stack:
        tok = await stack.add_tokenizer(words("a"))
        await stack.ready()
        stack.scheduler.waiting_tokens = 90
        await until(lambda: stack.client.queued_tokens_estimate == 90)
        r = await stack.http.post("/v1/completions", json={"prompt": [[1] * 11], "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "prompt tokens" in r.json()["error"]["message"] and "at most 100" in r.json()["error"]["message"]
        r = await stack.http.post("/v1/completions", json={"prompt": [[1] * 10], "max_tokens": 1})
        assert r.status_code == 200, r.text
        # prompts x n past the cap: a 400 naming it, before any engine work
        r = await stack.http.post("/v1/completions", json={"prompt": ["x"] * 3, "n": 3, "max_tokens": 1})
        assert r.status_code == 400 and "9 sequences" in r.json()["error"]["message"]
        assert "at most 8" in r.json()["error"]["message"] and len(tok.requests) == 1


async def test_health_is_503_as_soon_as_the_engine_says_it_cannot_serve(stack):
    await stack.add_tokenizer(words("a"))
    await stack.ready()
    assert (await stack.http.get("/health")).status_code == 200
    stack.scheduler.serving = False  # a worker died: ranks restarting
    await until(lambda: not stack.client.engine_alive)
    assert (await stack.http.get("/health")).status_code == 503
    stack.scheduler.serving = True
    await until(lambda: stack.client.engine_alive)
    assert (await stack.http.get("/health")).status_code == 200


def _stalls(req):
    return [[delta(req.req_id, "a", 0, 5)]]  # one token of five, then nothing: the request never finishes


async def test_a_request_past_its_deadline_is_aborted_and_answered_408(make_stack):
    async with make_stack(request_timeout=30.0) as stack:
        tok = await stack.add_tokenizer(_stalls)
        t0 = time.monotonic()
        r = await stack.http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Timeout": "0.3"})
        assert r.status_code == 408 and r.json()["error"]["type"] == "RequestTimeoutError"
        assert 0.3 <= time.monotonic() - t0 < 5
        await until(lambda: tok.requests[0].req_id in tok.aborted)  # its KV is freed, not left generating
        # Streamed: the first chunk arrives, then an error event and [DONE] when the deadline passes.
        r = await stack.http.post("/v1/completions", json={"prompt": "x", "stream": True},
                                  headers={"X-Request-Timeout": "0.3"})
        assert r.status_code == 200
        chunks = events(r.text)
        assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == 408
        assert any(c["choices"][0]["text"] == "a" for c in chunks[:-2] if isinstance(c, dict) and c.get("choices"))
        await until(lambda: tok.requests[1].req_id in tok.aborted)
        bad = await stack.http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Timeout": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"
        assert len(tok.requests) == 2  # the bad header was refused before any engine work
