"""Overload and a fuzzed API on a real `headrace serve` with a small queue bound and a request deadline.

- Overload: 3x the queue bound at once. Every excess request is a 429 in OpenAI's shape with Retry-After,
  answered in under 50 ms (the api refuses before any tokenizer or engine work); every admitted one completes.
- schemathesis generates requests (valid and invalid) from the server's own /openapi.json for every
  endpoint: no 5xx, and every error is OpenAI-shaped. `X-Request-Timeout: 5` bounds the fuzzer's long
  generations (a 408 is an answer too).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.headrace.server_process import running_server
from tests.reliability.harness import completion_body, wait_idle

pytestmark = pytest.mark.slow

QUEUE_BOUND = 4
REFUSAL_WITHIN_S = 0.050
FUZZ_EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", "512", "--max-num-seqs", "2",
                        "--max-num-queued-reqs", str(QUEUE_BOUND)) as srv:
        yield srv
    assert "Traceback" not in srv.output, srv.output[-4000:]


def assert_openai_error(r: httpx.Response) -> None:
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    assert err["code"] == r.status_code


def test_overload_is_refused_at_once_and_admitted_requests_complete(server):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(server.base_url + "/v1/completions",
                                  json=completion_body(f"Count to {i}:", 8, ignore_eos=True))

    async def burst() -> list[httpx.Response]:
        # The first wave fills the running seats and the queue; the rest arrive while the engine works on it.
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            first = [asyncio.create_task(one(client, i)) for i in range(QUEUE_BOUND + 2)]
            await asyncio.sleep(1.0)
            rest = [await one(client, i) for i in range(QUEUE_BOUND + 2, 3 * QUEUE_BOUND)]  # each timed alone
            return await asyncio.gather(*first) + rest

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 429]
    admitted = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(admitted) == len(responses), [r.text for r in responses]
    assert refused and len(admitted) >= QUEUE_BOUND, [r.status_code for r in responses]
    for r in refused:
        assert_openai_error(r)
        assert r.headers["retry-after"] == "1"
    latencies = sorted(r.elapsed.total_seconds() for r in refused)
    print(f"overload: {len(admitted)} admitted, {len(refused)} refused, 429 latencies (ms): "
          f"{[round(t * 1000, 1) for t in latencies]}")
    assert latencies[-1] < REFUSAL_WITHIN_S
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in admitted)
    wait_idle(server.base_url)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzzed_requests_get_no_5xx_and_openai_shaped_errors(server, mode):
    """Every operation of the server's own schema, with generated valid (positive) and invalid (negative)
    requests: no 5xx, and every 4xx carries OpenAI's error object."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.method.upper() == "POST" and op.path == "/v1/chat/completions" for op in operations)
    seen: dict[int, int] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form to generate
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(base_url=server.base_url, timeout=60, headers={"X-Request-Timeout": "5"})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert set(body["error"]) >= {"message", "type", "param", "code"}, (case.path, body)

        call()
    print(f"schemathesis ({mode.value}): status codes {dict(sorted(seen.items()))}")
