"""End to end: a real `headrace serve` (every process), driven by the official openai client."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from tests.headrace.server_process import ServerProcess, alive, running_server, served_greedy

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server():
    with running_server("--num-tokenizers", "2", "--max-model-len", "2048", "--max-num-seqs", "64") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_capital_of_france(client):
    out = chat(client, "What is the capital of France?", max_tokens=24)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.completion_tokens == len(out.choices[0].message.content) > 0 or out.usage.completion_tokens > 0


def test_streamed_chat_equals_non_streamed(client):
    full = chat(client, "Write one sentence about rivers.", max_tokens=40)
    stream = chat(client, "Write one sentence about rivers.", max_tokens=40, stream=True,
                  stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == full.choices[0].message.content
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.total_tokens == full.usage.total_tokens


def test_completions_stream_and_usage(client):
    full = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=20,
                                     temperature=0)
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The three primary colors are", max_tokens=20, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == full.choices[0].text
    assert full.usage.completion_tokens == 20 or full.choices[0].finish_reason == "stop"


def test_64_concurrent_streams(server):
    prompts = [f"Name a fruit that starts with the letter {c}." for c in "ABCDEFGH"]
    ref_client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    reference = {p: chat(ref_client, p, max_tokens=16).choices[0].message.content for p in prompts}

    async def one(aclient, prompt):
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                       temperature=0, max_tokens=16, stream=True)
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return prompt, text

    async def all_of_them():
        # Closed inside its loop: a client left to the garbage collector closes its connections on a loop that
        # is gone by then, and that error surfaces in whichever later test's loop is running.
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(one(aclient, prompts[i % len(prompts)]) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    for prompt, text in results:
        assert text == reference[prompt]


BAD_INPUTS = [
    # (body or raw bytes, expected status, param or None)
    (b"{not json", 400, None),
    ({"model": MODEL, "messages": "hello"}, 400, None),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, None),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 10_000}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000_000}, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}, 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD_INPUTS)
def test_bad_input_gets_openai_error(server, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = server.post("/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    assert server.get("/health").status_code == 200


def test_oversized_body_is_rejected(server):
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (9 * 1024 * 1024)})
    assert r.status_code == 413
    assert "error" in r.json()


def test_client_disconnect_aborts_the_request(server):
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                      headers={"X-Request-Id": "disconnects"},
                      json={"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 1500,
                            "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream
    deadline = time.monotonic() + 20
    while "request_id=disconnects " not in server.output:  # the api saw the client leave and aborted it
        assert time.monotonic() < deadline, "the api never finished the request its client left"
        time.sleep(0.1)
    line = next(line for line in server.lines if "request_id=disconnects " in line)
    assert "finish_reason=abort" in line
    # The engine gauges are the scheduler's snapshot every 0.5 s: one taken 1 s after the abort shows the
    # request gone from the engine too (1,500 tokens would keep it running for minutes otherwise).
    time.sleep(1.0)
    while True:
        metrics = server.get("/metrics").text
        gauges = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith(("headrace:num_requests_running", "headrace:num_requests_waiting"))}
        if gauges == {"headrace:num_requests_running": 0.0, "headrace:num_requests_waiting": 0.0}:
            return
        assert time.monotonic() < deadline + 20, f"the request kept running after its client left: {gauges}"
        time.sleep(0.2)


def test_tokenizer_killed_mid_load(server):
    """Kill tokenizer-1 while requests run: the others finish, later requests succeed after the restart."""
    pid = server.child_pid("tokenizer-1")
    # The api logs "api 0: tokenizer-i (identity) connected" and "... is gone (why)".
    joined_before, gone_before = server.output.count(" connected"), server.output.count(" is gone (")

    async def one(aclient, i):
        try:
            r = await aclient.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=60,
                                                 temperature=0, extra_body={"ignore_eos": True})
            return "ok", r.choices[0].text
        except openai.APIStatusError as e:
            return "error", e.status_code

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as aclient:  # closed in its loop (see above)
            tasks = [asyncio.create_task(one(aclient, i)) for i in range(12)]
            await asyncio.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    oks = [r for r in results if r[0] == "ok"]
    errors = [r for r in results if r[0] == "error"]
    assert oks, results
    assert all(code in (502, 503) for _, code in errors), results
    assert not alive(pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the launcher restarts it; every request then succeeds
        if "started tokenizer-1 (pid" in server.output and server.child_pid("tokenizer-1") != pid:
            break
        time.sleep(0.5)
    # Until the api has dropped the dead tokenizer and heard the new one (a fixed wait was short on a loaded
    # machine).
    def swapped() -> bool:
        out = server.output
        return out.count(" is gone (") > gone_before and out.count(" connected") > joined_before

    while time.monotonic() < deadline and not swapped():
        time.sleep(0.2)
    assert swapped(), server.output[-3000:]
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        for i in range(6):
            assert c.completions.create(model=MODEL, prompt=f"Hello {i}", max_tokens=4).choices[0].text is not None


def test_a_sliding_window_model_serves_past_its_window():
    """The context limit is resolved once, in the launcher: a windowed model (window 256) serves its whole
    position range (1,024), a prompt longer than the window included."""
    with running_server("--model", "random:tiny-mistral-v0.1", "--num-tokenizers", "1") as srv:
        card = srv.get("/v1/models").json()["data"][0]
        assert card["max_model_len"] == 1024
        reply = srv.post("/v1/completions", json={"model": card["id"], "prompt": [1, 2, 3] * 100, "max_tokens": 4,
                                                  "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        too_long = srv.post("/v1/completions", json={"model": card["id"], "prompt": [1] * 1100, "max_tokens": 1})
        assert too_long.status_code == 400 and "1024" in too_long.json()["error"]["message"]


@pytest.mark.parametrize("fixture,logged", [("gptq-w4-g32-asym-descact", "(gptq int4)"),
                                            ("ct-fp8-dynamic", "(compressed-tensors fp8)")])
def test_a_quantized_checkpoint_is_served_and_answers_as_the_offline_engine(fixture, logged, embedded_source):
    """A GPTQ (act-order) and a compressed-tensors FP8 checkpoint made by the real tools, served end to end
    (the fixtures carry no tokenizer: the embedded model's stands in, and prompts are token ids)."""
    from pathlib import Path

    from headrace import LLM, SamplingParams

    folder = str(Path(__file__).parents[1] / "fixtures" / "quant" / fixture)
    prompt = [5, 17, 99, 3, 250, 42]
    served, log = served_greedy(prompt, "--model", folder, "--tokenizer", embedded_source.tokenizer_dir,
                                "--num-tokenizers", "1")
    assert logged in log  # the worker's start-up line: weights: N GiB on this rank (format kind+bits)
    llm = LLM(model=folder, tokenizer=embedded_source.tokenizer_dir, log=lambda *_: None)
    offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(offline.token_ids) == 8 and served["text"] == offline.text
