"""The tokenizer in front of two engine replicas (--data-parallel-size 2), over real ipc sockets: it routes
each request to one replica's scheduler, sends its aborts there, follows the replicas' health and KV events,
and a replica whose scheduler dies fails only its own requests."""

from __future__ import annotations

import time

import pytest
import zmq

from headrace.common import transport
from headrace.common.addresses import address_plan
from headrace.common.block_hash import prompt_block_hashes
from headrace.common.config import ServerConfig
from headrace.common.kv_events import BlockStored, KVEventBatch, batch_frames
from headrace.common.messages import AbortRequest, EngineStats, GenerateRequest, TokenizedRequest
from headrace.common.sampling_params import SamplingParams
from headrace.services.tokenizer.replica_router import ReplicaRouter
from headrace.services.tokenizer.text_codec import TextCodec
from headrace.services.tokenizer.tokenizer_service import TokenizerService
from tests.services.tokenizer.test_tokenizer_service import BEAT_S, TIMEOUT_S, Peers, start, stop

BS = 16


class ReplicaPeers(Peers):
    """Peers with a second scheduler ROUTER and each replica's KV-event PUB."""

    def __init__(self, plan):
        super().__init__(plan)
        self.schedulers = [self.scheduler, transport.router_socket(self.ctx, plan.replicas[1].scheduler)]
        self.events = [transport.pub_socket(self.ctx, r.kv_events) for r in plan.replicas]

    def routed_to(self, req_id: str) -> int:
        """Which scheduler the request's TokenizedRequest reached."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            for d, sock in enumerate(self.schedulers):
                got = transport.router_recv(sock, 20)
                if got is not None and isinstance(got[1], (TokenizedRequest, AbortRequest)):
                    assert got[1].req_id == req_id, got
                    return d
        raise AssertionError(f"{req_id} reached no scheduler")

    def stats(self, d: int, serving: bool = True) -> None:
        transport.router_send(self.schedulers[d], self.tok, EngineStats(serving=serving, data_parallel_rank=d))


def _rig(tmp_path, hf_tokenizer, policy: str):
    plan = address_plan(ServerConfig(ipc_dir=str(tmp_path)), replicas=2)
    peers = ReplicaPeers(plan)
    router = ReplicaRouter(2, policy, BS)
    service = TokenizerService(0, TextCodec(hf_tokenizer, max_model_len=4096), plan, heartbeat_interval_s=BEAT_S,
                               router=router)
    thread = start(service)
    peers.tok = peers.hello(peers.apis[0])
    assert peers.hello(peers.schedulers[0]) == peers.hello(peers.schedulers[1]) == peers.tok
    return peers, service, thread, router


def until(condition) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def generate(peers, req_id: str, ids: list[int]) -> int:
    peers.from_api(GenerateRequest(req_id, SamplingParams(max_tokens=4), prompt_token_ids=ids))
    return peers.routed_to(req_id)


@pytest.fixture
def round_robin(tmp_path, hf_tokenizer):
    peers, service, thread, router = _rig(tmp_path, hf_tokenizer, "round_robin")
    yield peers, router
    stop(peers, service, thread)
    peers.ctx.destroy(linger=0)


def test_requests_alternate_aborts_follow_and_a_sick_replica_gets_nothing(round_robin):
    peers, router = round_robin
    first, second = generate(peers, "a", [5] * 20), generate(peers, "b", [6] * 20)
    assert {first, second} == {0, 1}
    peers.from_api(AbortRequest("b"))
    assert peers.routed_to("b") == second  # the abort reaches the replica running it, only that one
    peers.stats(0)
    peers.stats(1, serving=False)  # replica 1's workers died
    until(lambda: not router.replicas[1].serving and router.replicas[0].serving)
    assert [generate(peers, f"c{k}", [7, k] * 10) for k in range(3)] == [0, 0, 0]


def test_a_dead_replicas_scheduler_fails_only_its_requests(round_robin):
    peers, router = round_robin
    where = {req_id: generate(peers, req_id, [9, k] * 10) for k, req_id in enumerate(("x", "y"))}
    dead = where["y"]
    peers.schedulers[dead].close(linger=0)
    failed = peers.deltas()
    assert [(d.req_id, d.error.code) for d in failed] == [("y", 503)]
    assert router.replica_of("x") == where["x"] and not router.replicas[dead].connected


def test_kv_events_draw_a_prompt_to_the_replica_that_holds_it(tmp_path, hf_tokenizer):
    peers, service, thread, router = _rig(tmp_path, hf_tokenizer, "cache_aware")
    try:
        prompt = list(range(100, 165))  # four cacheable blocks
        peers.stats(0)
        peers.stats(1)
        stored = KVEventBatch(0.0, [BlockStored(prompt_block_hashes(prompt, BS), None, prompt[:64], BS)], 1)
        seq = 0
        while not router.replicas[1].blocks:  # a SUB hears nothing until its subscription has reached the PUB
            peers.events[1].send_multipart(batch_frames(b"", seq, stored))
            seq += 1
            time.sleep(0.02)
            assert seq < TIMEOUT_S / 0.02
        assert generate(peers, "follow", prompt + [1, 2]) == 1
        assert generate(peers, "fresh", [3] * 40) == 0  # no hit anywhere: the other (least loaded) replica
    finally:
        stop(peers, service, thread)
        peers.ctx.destroy(linger=0)
