"""EngineClient against tokenizers and a scheduler played over real ipc sockets."""

from __future__ import annotations

import asyncio

import pytest

from headrace.common.addresses import address_plan
from headrace.common.config import ServerConfig
from headrace.common.messages import BatchTextDelta, GenerateRequest, TokenizeRequest
from headrace.common.sampling_params import SamplingParams
from headrace.services.api.engine_client import EngineClient, _Peer
from headrace.services.api.errors import ApiError
from tests.services.api.fakes import WAIT_S, FakeScheduler, FakeTokenizer, delta, until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def rig(tmp_path):
    plan = address_plan(ServerConfig(ipc_dir=str(tmp_path)))
    finished = []
    client = EngineClient.from_plan(plan, 0, heartbeat_interval_s=0.1, peer_timeout_s=1.0,
                                    on_finished=finished.append)
    await client.start()
    tokenizers: list[FakeTokenizer] = []

    async def tokenizer() -> FakeTokenizer:
        tok = await FakeTokenizer(plan.api_inbox[0].connect, index=len(tokenizers)).start()
        tokenizers.append(tok)
        await until(lambda: client.num_live_tokenizers == len(tokenizers))
        return tok

    try:
        yield client, tokenizer, finished, plan
    finally:
        for tok in tokenizers:
            await tok.close()
        await client.close()


def requests(name: str, n: int = 1) -> list[GenerateRequest]:
    return [GenerateRequest(f"{name}-{k}", SamplingParams(), prompt="x") for k in range(n)]


async def drain(gen) -> list:
    async def run():
        return [item async for item in gen]

    return await asyncio.wait_for(run(), WAIT_S)


async def test_round_robin_and_a_silent_tokenizer_fails_only_its_own_requests(rig):
    client, tokenizer, finished, _ = rig
    a, b = await tokenizer(), await tokenizer()
    gen_1, gen_2 = client.submit(requests("one", 2)), client.submit(requests("two"))
    await until(lambda: len(a.requests) + len(b.requests) == 3)
    assert gen_1.tokenizer is not gen_2.tokenizer
    quiet, busy = (a, b) if a.requests and a.requests[0].req_id.startswith("one") else (b, a)
    await quiet.send(BatchTextDelta([delta("one-0", "seen", 0, 2)]))  # answered: it can no longer move
    await until(lambda: gen_1.answered)
    quiet.silent = True
    failed = [item for item in await drain(gen_1) if item[1].finished]
    assert sorted(k for k, _ in failed) == [0, 1]
    assert all(d.finished and d.error.code == 503 and "stopped responding" in d.error.message for _, d in failed)
    assert client.num_live_tokenizers == 1
    await busy.send(BatchTextDelta([delta("two-0", "fine", 0, 1)]))
    [(index, last)] = await drain(gen_2)
    assert (index, last.text, last.finished) == (0, "fine", True)
    assert sorted(r.req_id for r in finished) == ["one-0", "one-1", "two-0"]
    assert client.num_running == 0


async def test_a_request_its_dead_tokenizer_never_answered_moves_to_a_live_one(rig):
    client, tokenizer, finished, _ = rig
    a, b = await tokenizer(), await tokenizer()
    gen = client.submit(requests("one", 2))
    await until(lambda: len(a.requests) + len(b.requests) == 2)
    dead, live = (a, b) if a.requests else (b, a)
    dead.silent = True
    await until(lambda: len(live.requests) == 2)  # the same ids, on the live tokenizer
    assert [r.req_id for r in live.requests] == ["one-0", "one-1"] and client.num_live_tokenizers == 1
    await live.send(BatchTextDelta([delta("one-0", "x", 0, 1), delta("one-1", "y", 0, 1)]))
    assert sorted((k, d.text, d.error) for k, d in await drain(gen)) == [(0, "x", None), (1, "y", None)]
    assert sorted(r.finish_reason for r in finished) == ["length", "length"]


async def test_abort_tells_the_tokenizer_once_and_late_deltas_are_dropped(rig):
    client, tokenizer, finished, _ = rig
    tok = await tokenizer()
    gen = client.submit(requests("r", 2))
    await tok.send(BatchTextDelta([delta("r-0", "done", 0, 1)]))  # choice 0 finishes
    await until(lambda: client.num_running == 1)
    gen.abort()
    gen.abort()
    assert await tok.wait_aborted() == ["r-1"]
    await tok.send(BatchTextDelta([delta("r-1", "late", 0, 1)]))
    other = client.submit(requests("s"))  # the client still serves: the late delta was dropped quietly
    await tok.send(BatchTextDelta([delta("s-0", "ok", 0, 1)]))
    [(_, d)] = await drain(other)
    assert d.text == "ok" and tok.aborted == ["r-1"]
    assert [(r.req_id, r.finish_reason) for r in finished] == [("r-0", "length"), ("r-1", "abort"), ("s-0", "length")]


async def test_malformed_frames_are_dropped(rig):
    client, tokenizer, _, _ = rig
    tok = await tokenizer()
    await tok._sock.send(b"\x00 not a message")
    gen = client.submit(requests("r"))
    await tok.send(BatchTextDelta([delta("r-0", "still here", 0, 1)]))
    assert (await drain(gen))[0][1].text == "still here"


async def test_a_disconnected_identity_is_skipped_and_forgotten(rig):
    client, tokenizer, _, _ = rig
    tok = await tokenizer()
    # A peer the ROUTER no longer knows (its DEALER went away before the watchdog noticed).
    client._peers[b"ghost"] = _Peer(b"ghost", "tokenizer-9", last_seen=float("inf"))
    for name in ("a", "b"):
        gen = client.submit(requests(name))
        assert gen.tokenizer.identity != b"ghost"
    assert [q.req_id for q in await tok.next_request(2)] == ["a-0", "b-0"]
    assert client.num_live_tokenizers == 1


async def test_tokenize_fails_with_503_when_its_tokenizer_goes_silent(rig):
    client, tokenizer, _, _ = rig
    tok = await tokenizer()
    reply = await asyncio.wait_for(client.tokenize(TokenizeRequest("t1", prompt="a bc")), WAIT_S)
    assert reply.token_ids == [1, 2]
    tok.silent = True
    with pytest.raises(ApiError) as e:
        await asyncio.wait_for(client.tokenize(TokenizeRequest("t2", prompt="x")), WAIT_S)
    assert e.value.status == 503
    with pytest.raises(ApiError):
        client.submit(requests("r"))  # nobody left


async def test_engine_stats_mark_the_engine_alive_and_their_absence_dead(rig):
    client, _, _, plan = rig
    scheduler = await FakeScheduler(plan.scheduler.bind).start()
    try:
        assert not client.engine_alive
        scheduler.sending = True
        await until(lambda: client.engine_alive)
        assert client.stats.num_running == 1
        assert {(h.sender, h.index) for h in scheduler.hellos} == {("api", 0)}
        scheduler.sending = False
        await until(lambda: not client.engine_alive)
    finally:
        await scheduler.close()



async def test_a_request_to_an_api_no_tokenizer_has_reached_yet_waits_for_one(rig):
    """A restarted api takes HTTP requests as soon as it binds the shared port: a call made before any
    tokenizer has said hello waits for the first one instead of failing; with none, 503 after the wait."""
    client, tokenizer, _, _ = rig
    await client.wait_for_tokenizer(0.2)  # nobody comes: returns, and the request is a 503
    with pytest.raises(ApiError) as e:
        client.submit(requests("early"))
    assert e.value.status == 503
    call = asyncio.ensure_future(client.tokenize(TokenizeRequest("t-early", prompt="a bc")))
    await asyncio.sleep(0.3)
    assert not call.done()  # waiting for a tokenizer, not failed
    await tokenizer()
    reply = await asyncio.wait_for(call, WAIT_S)
    assert reply.token_ids == [1, 2]


async def test_with_two_replicas_the_engine_is_alive_while_either_serves(tmp_path):
    plan = address_plan(ServerConfig(ipc_dir=str(tmp_path)), replicas=2)
    seen = []
    client = EngineClient.from_plan(plan, 0, heartbeat_interval_s=0.1, peer_timeout_s=1.0, on_stats=seen.append)
    await client.start()
    schedulers = [await FakeScheduler(r.scheduler.bind, replica=d).start() for d, r in enumerate(plan.replicas)]
    try:
        for s in schedulers:
            s.sending, s.waiting = True, 2
        await until(lambda: client.engine_alive and {st.data_parallel_rank for st in seen} == {0, 1})
        assert client.stats.num_waiting == 4  # the queues of both add up
        schedulers[1].serving = False  # replica 1's workers died: the other still serves
        await until(lambda: client.replica_stats[1] is not None and not client.replica_stats[1].serving)
        assert client.engine_alive and client.stats.num_waiting == 2
        schedulers[0].sending = False  # and replica 0 goes silent: nothing serves
        await until(lambda: not client.engine_alive)
        schedulers[1].serving = True
        await until(lambda: client.engine_alive)
    finally:
        for s in schedulers:
            await s.close()
        await client.close()
