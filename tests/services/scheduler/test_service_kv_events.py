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
