"""The scheduler and gpu_worker processes for real, over ipc sockets; the test plays a tokenizer and an api."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import zmq

from headrace.common import codec
from headrace.common.addresses import address_plan, with_ipc_dir
from headrace.common.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from headrace.common.messages import (
    AbortRequest,
    BatchRequestOutput,
    EngineStats,
    Heartbeat,
    TokenizedRequest,
    WorkerFailed,
)
from headrace.common.sampling_params import SamplingParams
from headrace.services.gpu_worker import worker
from headrace.services.scheduler import service
from tests.configs import resolved


def _config(tmp_path) -> EngineConfig:
    server = with_ipc_dir(ServerConfig(ipc_dir=str(tmp_path)))
    return resolved(EngineConfig(model=ModelConfig(model="random:tiny-llama", max_model_len=256),
                                 cache=CacheConfig(num_blocks=64), server=server, device="cpu"))


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
            self.hello()  # every second at least: a silent tokenizer's requests are aborted
            try:
                msg = self.recv(min(1.0, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                continue
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
        if isinstance(msg, EngineStats) and msg.serving:
            return
    raise TimeoutError("engine never became ready")


def test_requests_flow_and_aborts_free_blocks(engine):
    config, procs, _ = engine
    api, tok = Peer(config, "api"), Peer(config, "tokenizer")
    wait_ready(api)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(4):
        tok.send(TokenizedRequest(f"r{i}", list(range(5 + i, 30 + i)), params, time.time()))
    tok.send(TokenizedRequest("long", [3] * 20, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                              time.time()))
    tok.send(AbortRequest("long"))
    outs, done = tok.collect({"r0", "r1", "r2", "r3", "long"})
    assert all(len(outs[f"r{i}"]) == 8 and done[f"r{i}"].finish_reason == "length" for i in range(4))
    assert done["long"].finish_reason == "abort"
    # a prompt longer than max_model_len is the client's fault: a 400-coded error, and the engine keeps serving
    tok.send(TokenizedRequest("too-long", [1] * 300, params, time.time()))
    _, done = tok.collect({"too-long"})
    assert done["too-long"].error_code == 400 and "max_model_len" in done["too-long"].error
    # Stats sent while the requests ran may still be queued for us: wait for the gauges to settle at zero.
    deadline = time.monotonic() + 10
    while True:
        api.hello()
        stats = api.recv()
        if isinstance(stats, EngineStats) and (stats.num_running, stats.kv_cache_usage) == (0, 0.0):
            break
        assert time.monotonic() < deadline, f"the engine gauges never settled: {stats}"
    api.close()
    tok.close()


def test_dead_worker_fails_inflight_requests_then_recovers(engine):
    config, procs, ctx = engine
    api, tok = Peer(config, "api"), Peer(config, "tokenizer")
    wait_ready(api)
    procs["worker"].kill()  # dies before the step's result: the request is stuck in flight
    procs["worker"].join(5)
    tok.send(TokenizedRequest("slow", [5] * 10, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
                              time.time()))
    time.sleep(0.5)
    launcher = Peer(config, "launcher")
    launcher.send(WorkerFailed(0, "killed by the test"))
    _, done = tok.collect({"slow"}, timeout_s=30)
    assert done["slow"].finish_reason == "error" and "killed by the test" in done["slow"].error
    assert "KV cache state was lost" in done["slow"].error and done["slow"].error_code == 503
    # A request that arrives while no worker is up is held, not refused, and runs on the restarted worker.
    tok.send(TokenizedRequest("again", [5] * 10, SamplingParams(temperature=0.0, max_tokens=4), time.time()))
    procs["worker"] = ctx.Process(target=worker.main, args=(config.to_dict(), 0))
    procs["worker"].start()
    outs, done = tok.collect({"again"}, timeout_s=120)
    assert len(outs["again"]) == 4 and done["again"].error is None
    for p in (api, tok, launcher):
        p.close()


# --------------------------------------------------------------------------- request phases (no processes)


_monotonic = time.monotonic


class _Clock:
    """Stands for the `time` module in the scheduler's modules: time() is set by the test."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    monotonic = staticmethod(_monotonic)


class _Frontend:
    """Stands for the scheduler's ROUTER: keeps what _route sends, decoded from the wire."""

    def __init__(self):
        self.outputs: list = []

    def send_multipart(self, frames, **_):
        msg = codec.decode(frames[1])
        assert isinstance(msg, BatchRequestOutput)
        self.outputs += msg.outputs


PHASES = ("ingest", "queue", "prefill", "decode", "inference")


def test_phases_ride_on_the_first_token_and_the_finish_of_their_own_request(tmp_path, monkeypatch):
    """Requests queued, scheduled and finished at different (fake) times, one of them preempted after its
    first token, one aborted while waiting: each phase comes once, on the right output, computed from its
    own request's times."""
    from headrace.services.scheduler import request as request_mod
    from headrace.services.scheduler import scheduler as scheduler_mod
    from headrace.services.scheduler.scheduler import Scheduler
    from tests.services.scheduler.test_scheduler import FakeWorker, make_scheduler

    clock = _Clock(100.0)
    for module in (service, scheduler_mod, request_mod):
        monkeypatch.setattr(module, "time", clock)
    svc = service.SchedulerService(_config(tmp_path), address_plan(_config(tmp_path).server))
    try:
        svc.frontend = sent = _Frontend()
        sched: Scheduler = make_scheduler(num_blocks=4, block_size=8)  # tight: b is preempted while a grows
        svc.scheduler = sched
        worker = FakeWorker(4, 8)
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        queued, first_scheduled, first_token, finished = {}, {}, {}, {}
        arrival = {"a": 99.0, "b": 101.5, "c": 250.0, "gone": 103.0}  # c's api clock runs ahead: ingest 0

        def add(req_id: str, prompt: list[int]) -> None:
            queued[req_id] = clock.now
            svc._on_frontend(b"tok", TokenizedRequest(req_id, prompt, params, arrival[req_id]))

        add("a", list(range(1, 15)))
        for step in range(200):
            if step == 1:
                add("b", list(range(20, 30)))
                add("gone", [7] * 8)
            if step == 2:
                add("c", [9] * 5)
                assert "gone" not in first_scheduled  # no KV left for it beside a and b
                svc._abort(["gone"])
            if not sched.has_unfinished_requests():
                break
            clock.now = 100.0 + 10 * step + step * step / 100  # every step at its own, uneven time
            plan = sched.schedule()
            for new in plan.new_requests:
                first_scheduled.setdefault(new.req_id, clock.now)
            clock.now += 3.0 + step / 7
            svc.inflight.append(plan)
            before = len(sent.outputs)
            svc._on_result(worker.execute(plan))
            for out in sent.outputs[before:]:
                if out.new_token_ids:
                    first_token.setdefault(out.req_id, clock.now)
                if out.finished:
                    finished[out.req_id] = clock.now
        else:
            pytest.fail("requests did not finish")
        assert sched.requests == {} and svc.owner == {}

        by_req: dict[str, list] = {}
        for out in sent.outputs:
            by_req.setdefault(out.req_id, []).append(out)
        assert set(by_req) == {"a", "b", "c", "gone"}
        assert by_req["b"][-1].num_preemptions == 1 and sched.num_preemptions >= 1

        for req_id in ("a", "b", "c"):
            outs = by_req[req_id]
            first = next(i for i, o in enumerate(outs) if o.new_token_ids)
            last = len(outs) - 1
            assert outs[last].finished and first < last
            carriers = [i for i, o in enumerate(outs)
                        if o.timings is not None and any(getattr(o.timings, p) is not None for p in PHASES)]
            assert carriers == [first, last], req_id  # nothing on the tokens in between
            ingest = max(0.0, queued[req_id] - arrival[req_id])
            queue = first_scheduled[req_id] - queued[req_id]
            prefill = first_token[req_id] - first_scheduled[req_id]
            decode = finished[req_id] - first_token[req_id]
            got_first, got_last = outs[first], outs[last]
            assert (got_first.timings.ingest, got_first.timings.queue) == (ingest, queue), req_id
            assert got_first.timings.prefill == pytest.approx(prefill), req_id
            assert got_first.timings.decode is None and got_first.timings.inference is None
            assert (got_last.timings.ingest, got_last.timings.queue) == (ingest, queue), req_id
            assert got_last.timings.prefill is None, req_id  # sent once: the api must not count it twice
            assert got_last.timings.decode == pytest.approx(decode), req_id
            assert got_last.timings.inference == pytest.approx(finished[req_id] - first_scheduled[req_id])
            assert got_last.timings.inference == pytest.approx(got_first.timings.prefill + got_last.timings.decode)
        assert by_req["c"][0].timings.ingest == 0.0  # clamped
        assert by_req["a"][0].timings.ingest == 1.0 and by_req["b"][0].timings.ingest == 1.5
        # b's preemption came after its first token: its wait and recomputation are decode time.
        assert by_req["b"][-1].timings.decode > by_req["a"][-1].timings.decode

        (gone,) = by_req["gone"]  # aborted before it was ever scheduled: only its ingest is known
        assert gone.finished and gone.finish_reason == "abort"
        assert gone.timings.ingest == queued["gone"] - arrival["gone"]
        assert [getattr(gone.timings, p) for p in PHASES[1:]] == [None] * 4
    finally:
        svc.ctx.destroy(linger=0)
