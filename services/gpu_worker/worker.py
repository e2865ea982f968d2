"""The gpu_worker process (one per GPU; global rank r = stage * T + tp_rank of P pipeline stages x T
tensor-parallel ranks).

It subscribes to the scheduler's step plans, runs each through its ModelRunner and, on tp-rank 0 of the
last stage (rank 0 without pipelines), pushes the sampled tokens back. Every rank announces itself with
WorkerReady once its weights and KV cache exist, and heartbeats from a side thread so the scheduler
notices a rank that hangs or dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch
import zmq

from headrace.common import transport
from headrace.common.addresses import Endpoint, plan_for
from headrace.common.codec import MessageDecodeError
from headrace.common.config import EngineConfig, resolve_device
from headrace.common.messages import Heartbeat, Shutdown, StepPlan, WorkerError, WorkerReady
from headrace.common.process import freeze_startup_heap
from headrace.services.gpu_worker.model_runner import ModelRunner
from headrace.services.gpu_worker.parallel import TPGroup
from headrace.services.gpu_worker.pipeline import init_distributed

log = logging.getLogger("headrace.worker")

POLL_MS = 500
SLOW_STEP_S = 1.0  # a step slower than this is logged: it stalls every request in flight


def init_tensor_parallel(config: EngineConfig, rank: int, device: torch.device) -> TPGroup:
    """The TP group of a single-stage world (tests that run TP ranks by hand)."""
    return init_distributed(config, rank, device)[0]


def worker_device(config: EngineConfig, index: int) -> torch.device:
    """index: the worker's index over every replica (d * world_size + global rank). Its GPU counts within this
    node's processes: replica d's ranks take GPUs d*W .. d*W + W-1 (one node), a node's block of a replica's
    ranks its first GPUs (several nodes, one replica)."""
    kind = resolve_device(config.device)
    if kind == "cuda":
        par = config.parallel
        count, here = torch.cuda.device_count(), par.ranks_per_node * par.data_parallel_size
        local = index - par.node_ranks.start
        if local >= count:
            raise RuntimeError(f"{here} worker ranks on this node need {here} GPUs; this host has {count}")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _heartbeat(ctx: zmq.Context, address: Endpoint, rank: int, ready: list[WorkerReady], stop: threading.Event) -> None:
    """Once loaded, the heartbeat IS the WorkerReady message: a restarted scheduler re-learns every rank
    within a second, and a rank the scheduler dropped after a failure re-registers by itself."""
    sock = transport.push_socket(ctx, address)
    while not stop.wait(transport.HEARTBEAT_INTERVAL_S):
        transport.send(sock, ready[0] if ready else Heartbeat("gpu_worker", rank, time.time()))
    sock.close()


def main(config_dict: dict[str, Any], index: int = 0) -> None:
    """index: d * world_size + rank for global rank `rank` (stage * T + tp_rank) of data-parallel replica d."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{index} %(levelname)s %(message)s")
    config = EngineConfig.from_dict(config_dict)
    replica, rank = divmod(index, config.parallel.world_size)
    plan = plan_for(config).replica(replica)
    ctx = zmq.Context()
    # Subscribe before loading the model: by the time WorkerReady arrives, no plan can be missed.
    plans = transport.sub_socket(ctx, plan.worker_plan)
    results = transport.push_socket(ctx, plan.worker_result)
    stop = threading.Event()
    announced: list[WorkerReady] = []
    beat = threading.Thread(target=_heartbeat, args=(ctx, plan.worker_result, rank, announced, stop),
                            daemon=True)
    beat.start()
    parent = os.getppid()
    try:
        device = worker_device(config, index)
        tp, stage = init_distributed(config, rank, device, replica)
        runner = ModelRunner(config, tp=tp, device=str(device), log=log.info, stage=stage)
        if stage.size > 1:
            log.info("pipeline stage %d of %d: layers %d..%d", stage.rank, stage.size, runner.model.start_layer,
                     runner.model.end_layer - 1)
        runner.grammars.prepare_in_background()
        ready = WorkerReady(rank, runner.num_blocks, runner.load_seconds, str(device))
        freeze_startup_heap()
        if runner.device.type == "cuda":
            from headrace.kernels.compile_watch import watch_compiles

            watch_compiles(lambda what: log.warning("Triton compiles a kernel variant while serving (every "
                                                    "request waits for it): %s", what))
        transport.send(results, ready)
        announced.append(ready)
        log.info("ready: %d KV blocks, model loaded in %.1fs", runner.num_blocks, runner.load_seconds)
        # One rank reports each step's tokens: tp-rank 0 of the last stage, which sampled them.
        _serve(runner, plans, results, stage.is_last and tp.rank == 0, ready, parent)
    finally:
        stop.set()
        ctx.destroy(linger=0)


def _serve(runner: ModelRunner, plans: zmq.Socket, results: zmq.Socket, reports: bool, ready: WorkerReady,
           parent: int) -> None:
    """Launch each plan as soon as it arrives, before waiting for the step already on the device: the
    scheduler sends step t+1 while step t runs (async scheduling), so the host prepares t+1 while the GPU
    computes t, and the GPU finds t+1 queued when t ends. A finished step's result goes out at once."""
    while True:
        msg = _next_message(plans, runner, parent)
        if msg is _PARENT_GONE:
            log.error("parent process died; exiting")
            return
        if msg is None:  # the oldest step is done: hand its result back
            _finish_oldest(runner, results, reports, ready)
            continue
        if isinstance(msg, Shutdown):
            log.info("shutdown: %s", msg.reason)
            return
        if not isinstance(msg, StepPlan):
            continue
        try:
            runner.launch(msg)
        except Exception as e:  # noqa: BLE001 - report, reset, and keep serving
            _fail(runner, msg.step_id, e, results, reports, ready)
            continue
        while runner.num_in_flight > 1:  # the new step is queued behind these: wait for them now
            if not _finish_oldest(runner, results, reports, ready):
                break


_PARENT_GONE = object()
_SPIN_S = 50e-6


def _next_message(plans: zmq.Socket, runner: ModelRunner, parent: int):
    """The next decoded message, None once the oldest launched step is done, or _PARENT_GONE. While a step
    runs on the device, both are watched with a short spin."""
    while True:
        if runner.num_in_flight:
            if runner.oldest_done():  # a finished step's tokens go out first (on CPU every step is done here)
                return None
            if plans.poll(0):
                got = _recv(plans)
                if got is not None:
                    return got
                continue
            time.sleep(_SPIN_S)
            continue
        if not plans.poll(POLL_MS):
            if os.getppid() != parent:
                return _PARENT_GONE
            continue
        got = _recv(plans)
        if got is not None:
            return got


def _recv(plans: zmq.Socket):
    try:
        return transport.recv_nowait(plans)
    except MessageDecodeError as e:
        log.warning("dropped a malformed plan: %s", e)
        return None


def _finish_oldest(runner: ModelRunner, results: zmq.Socket, reports: bool, ready: WorkerReady) -> bool:
    step_id = runner.oldest_plan.step_id  # named in the error report if finishing fails
    try:
        plan, result = runner.finish_oldest()
    except Exception as e:  # noqa: BLE001
        _fail(runner, step_id, e, results, reports, ready)
        return False
    if reports and not plan.is_empty:
        transport.send(results, result)
    if result.execute_time > SLOW_STEP_S:
        log.warning("step %d took %.2fs: %d tokens, %d requests", plan.step_id, result.execute_time,
                    plan.total_num_scheduled_tokens, len(plan.num_scheduled_tokens))
    return True


def _fail(runner: ModelRunner, step_id: int, error: Exception, results: zmq.Socket, reports: bool,
          ready: WorkerReady) -> None:
    """A step failed: drop every step in flight and all request state, tell the scheduler, start over."""
    log.error("step %d failed", step_id, exc_info=error)
    runner.reset()
    if runner.stage.size > 1:
        # The stages' transfers are out of step now (or a neighbour is gone): no step can be trusted. Exit, so
        # that the launcher restarts the replica's ranks and the scheduler fails what was in flight.
        transport.send(results, WorkerError(step_id, f"pipeline stage {runner.stage.rank}: {type(error).__name__}: "
                                                     f"{error}"))
        raise SystemExit(1)
    if reports:
        transport.send(results, WorkerError(step_id, f"{type(error).__name__}: {error}"))
    transport.send(results, ready)  # the scheduler starts over with a clean slate
