"""The scheduler and gpu_worker processes for real, over ipc sockets; the test plays a tokenizer and an api."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import zmq

from common import codec
from common.addresses import address_plan, with_ipc_dir
from common.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from common.messages import (
    AbortRequest,
    BatchRequestOutput,
    EngineStats,
    Heartbeat,
    TokenizedRequest,
    WorkerFailed,
)
from common.sampling_params import SamplingParams
from services.gpu_worker import worker
from services.scheduler import service


def _config(tmp_path) -> EngineConfig:
    server = with_ipc_dir(ServerConfig(ipc_dir=str(tmp_path)))
    return EngineConfig(model=ModelConfig(model="random:tiny-llama", max_model_len=256),
                        cache=CacheConfig(num_blocks=64), server=server, device="cpu")


class Peer:
    """A DEALER on the scheduler socket: plays a tokenizer (and an api, for stats)."""

    def __init__(self, config: EngineConfig, sender: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address_plan(config.server).scheduler.connect)
        self.sender = sender
        self.hello()

    def hello(self):
        self.send(Heartbeat(self.sender, 0, time.time()))

    def send(self, msg):
        self.sock.send(codec.encode(msg))

    def recv(self, timeout_s: float = 30.0):
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("nothing arrived")
        return codec.decode(self.sock.recv())

    def collect(self, req_ids: set[str], timeout_s: float = 60.0) -> dict:
        outs = {rid: [] for rid in req_ids}
        done = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(req_ids):
            self.hello()
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, BatchRequestOutput):
                for o in msg.outputs:
                    outs[o.req_id] += o.new_token_ids
                    if o.finished:
                        done[o.req_id] = o
        return outs, done

    def close(self):
        self.ctx.destroy(linger=0)


@pytest.fixture
def engine(tmp_path):
    config = _config(tmp_path)
    ctx = mp.get_context("spawn")
    sched = ctx.Process(target=service.main, args=(config.to_dict(),))
    work = ctx.Process(target=worker.main, args=(config.to_dict(), 0))
    sched.start()
    work.start()
    procs = {"scheduler": sched, "worker": work}
    yield config, procs, ctx
    for p in procs.values():
        p.kill()
        p.join(5)


def wait_ready(api: Peer) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        api.hello()
        try:
            msg = api.recv(1.0)
        except TimeoutError:
            continue
        if isinstance(msg, EngineStats):
            return
    raise TimeoutError("engine never became ready")


def test_requests_flow_and_aborts_free_blocks(engine):
    config, procs, _ = engine
    api, tok = Peer(config, "api"), Peer(config, "tokenizer")
    wait_ready(api)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(4):
        tok.send(TokenizedRequest(f"r{i}", list(range(5 + i, 30 + i)), params, 0, [2], time.time()))
    tok.send(TokenizedRequest("long", [3] * 20, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                              0, [2], time.time()))
    tok.send(AbortRequest("long"))
    outs, done = tok.collect({"r0", "r1", "r2", "r3", "long"})
    assert all(len(outs[f"r{i}"]) == 8 and done[f"r{i}"].finish_reason == "length" for i in range(4))
    assert done["long"].finish_reason == "abort"
    # a prompt longer than max_model_len is the client's fault: a 400-coded error, and the engine keeps serving
    tok.send(TokenizedRequest("too-long", [1] * 300, params, 0, [2], time.time()))
    _, done = tok.collect({"too-long"})
    assert done["too-long"].error_code == 400 and "max_model_len" in done["too-long"].error
    stats = None
    while not isinstance(stats, EngineStats):
        api.hello()
        stats = api.recv()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
    api.close()
    tok.close()


def test_dead_worker_fails_inflight_requests_then_recovers(engine):
    config, procs, ctx = engine
    api, tok = Peer(config, "api"), Peer(config, "tokenizer")
    wait_ready(api)
    procs["worker"].kill()  # dies before the step's result: the request is stuck in flight
    procs["worker"].join(5)
    tok.send(TokenizedRequest("slow", [5] * 10, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                              0, [2], time.time()))
    time.sleep(0.5)
    launcher = Peer(config, "launcher")
    launcher.send(WorkerFailed(0, "killed by the test"))
    _, done = tok.collect({"slow"}, timeout_s=30)
    assert done["slow"].finish_reason == "error" and "killed by the test" in done["slow"].error
    # a restarted worker brings the engine back
    procs["worker"] = ctx.Process(target=worker.main, args=(config.to_dict(), 0))
    procs["worker"].start()
    wait_ready(api)
    deadline = time.monotonic() + 60
    while True:
        tok.send(TokenizedRequest("again", [5] * 10, SamplingParams(temperature=0.0, max_tokens=4), 0, [2],
                                  time.time()))
        outs, done = tok.collect({"again"})
        if done["again"].finish_reason != "error" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(outs["again"]) == 4
    for p in (api, tok, launcher):
        p.close()
