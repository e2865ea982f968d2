"""The scheduler publishes its block manager's KV events on its kv-events PUB (vLLM's frames and schema):
a fresh engine and a lost one clear everything; committed blocks follow as BlockStored, numbered in order."""

from __future__ import annotations

import time

import zmq

from headrace.common import transport
from headrace.common.addresses import plan_for, with_ipc_dir
from headrace.common.block_hash import prompt_block_hashes
from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from headrace.common.kv_events import AllBlocksCleared, BlockStored, decode_frames
from headrace.common.messages import TokenizedRequest, WorkerReady
from headrace.common.sampling_params import SamplingParams
from headrace.services.scheduler import service
from tests.configs import resolved
from tests.services.scheduler.test_scheduler import FakeWorker


def test_the_scheduler_publishes_its_prefix_cache(tmp_path):
    server = with_ipc_dir(ServerConfig(ipc_dir=str(tmp_path), kv_events=True))
    config = resolved(EngineConfig(model=ModelConfig(model="random:tiny-llama", max_model_len=256), server=server,
                                   cache=CacheConfig(num_blocks=32, block_size=8, enable_prefix_caching=True),
                                   device="cpu"))
    plan = plan_for(config)
    svc = service.SchedulerService(config, plan)
    ctx = zmq.Context()
    sub = transport.sub_socket(ctx, plan.replicas[0].kv_events)
    try:
        while not sub.poll(50):  # until the subscription has reached the PUB (nothing before it is heard)
            svc._publish_kv_events([AllBlocksCleared()])

        def batches() -> list:
            out = []
            while sub.poll(200):
                out.append(decode_frames(sub.recv_multipart()))
            return out

        batches()
        svc._on_worker_ready(WorkerReady(0, 32, 0.0, "cpu"))  # the engine starts: whatever was known is gone
        [(topic, first, ready)] = batches()
        assert topic == b"" and ready.events == [AllBlocksCleared()] and ready.data_parallel_rank == 0
        prompt = list(range(1, 21))  # two full blocks of 8
        svc._on_frontend(b"tok", TokenizedRequest("a", prompt, SamplingParams(max_tokens=1), time.time()))
        step = svc.scheduler.schedule()
        svc.inflight.append(step)
        svc._on_result(FakeWorker(32, 8).execute(step))
        svc._publish_kv_events()
        [(_, second, stored)] = batches()
        assert second == first + 1
        assert stored.events == [BlockStored(prompt_block_hashes(prompt, 8), None, prompt[:16], 8)]
        svc._worker_failed("rank 0 died")  # the ranks' KV cache died with them
        [(_, third, lost)] = batches()
        assert third == second + 1 and lost.events == [AllBlocksCleared()]
    finally:
        ctx.destroy(linger=0)
        svc.close()


def test_a_subscriber_that_missed_batches_gets_them_replayed(tmp_path):
    from headrace.common.addresses import address_plan
    from headrace.common.kv_events import BlockRemoved, decode_batch
    from headrace.services.scheduler.kv_event_publisher import END_OF_REPLAY, KVEventPublisher

    plan = address_plan(ServerConfig(ipc_dir=str(tmp_path), kv_events=True))
    ctx = zmq.Context()
    try:
        publisher = KVEventPublisher(ctx, plan.replicas[0], replica=0)
        for k in range(3):
            publisher.publish([BlockRemoved([bytes([k]) * 16])])
        publisher.publish([])  # nothing to say: no batch, no sequence number spent
        client = ctx.socket(zmq.REQ)  # vLLM's example subscriber asks with a REQ
        client.connect(plan.replicas[0].kv_replay.connect)
        client.send((1).to_bytes(8, "big"))
        assert publisher.replay.poll(5000)
        publisher.serve_replay()
        assert client.poll(5000)
        seq, payload = client.recv_multipart()
        assert int.from_bytes(seq, "big") == 1 and decode_batch(payload).events == [BlockRemoved([b"\x01" * 16])]
        dealer = ctx.socket(zmq.DEALER)  # a DEALER reads every reply
        dealer.connect(plan.replicas[0].kv_replay.connect)
        dealer.send((1).to_bytes(8, "big"))
        assert publisher.replay.poll(5000)
        publisher.serve_replay()
        got = [dealer.recv_multipart() for _ in range(3)]
        assert [int.from_bytes(seq, "big") for seq, _ in got[:2]] == [1, 2]
        assert got[2] == [END_OF_REPLAY, b""]
    finally:
        ctx.destroy(linger=0)
