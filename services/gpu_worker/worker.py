"""The gpu_worker process (one per GPU; rank r of T tensor-parallel ranks).

It subscribes to the scheduler's step plans, runs each through its ModelRunner and, on rank 0, pushes
the sampled tokens back. Every rank announces itself with WorkerReady once its weights and KV cache
exist, and heartbeats from a side thread so the scheduler notices a rank that hangs or dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch
import zmq

from common import codec
from common.addresses import address_plan
from common.codec import MessageDecodeError
from common.config import EngineConfig, resolve_device
from common.messages import Heartbeat, Shutdown, StepPlan, WorkerError, WorkerReady
from common.process import freeze_startup_heap
from services.gpu_worker.model_runner import ModelRunner
from services.gpu_worker.parallel import TPGroup

log = logging.getLogger("headrace.worker")

HEARTBEAT_INTERVAL_S = 1.0
POLL_MS = 500


def init_tensor_parallel(config: EngineConfig, rank: int, device: torch.device) -> TPGroup:
    size = config.parallel.tensor_parallel_size
    if size == 1:
        return TPGroup(0, 1)
    import torch.distributed as dist

    addr = config.parallel.dist_init_addr or "127.0.0.1:29500"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}", rank=rank, world_size=size)
    return TPGroup(rank, size)


def worker_device(config: EngineConfig, rank: int) -> torch.device:
    kind = resolve_device(config.device)
    if kind == "cuda":
        count = torch.cuda.device_count()
        if rank >= count:
            raise RuntimeError(f"--tensor-parallel-size {config.parallel.tensor_parallel_size} needs "
                               f"{config.parallel.tensor_parallel_size} GPUs; this host has {count}")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _heartbeat(ctx: zmq.Context, address: str, rank: int, ready: list[WorkerReady], stop: threading.Event) -> None:
    """Once loaded, the heartbeat IS the WorkerReady message: a restarted scheduler re-learns every rank
    within a second, and a rank the scheduler dropped after a failure re-registers by itself."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    while not stop.wait(HEARTBEAT_INTERVAL_S):
        sock.send(codec.encode(ready[0] if ready else Heartbeat("gpu_worker", rank, time.time())))
    sock.close()


def main(config_dict: dict[str, Any], rank: int = 0) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{rank} %(levelname)s %(message)s")
    config = EngineConfig.from_dict(config_dict)
    plan = address_plan(config.server)
    ctx = zmq.Context()
    # Subscribe before loading the model: by the time WorkerReady arrives, no plan can be missed.
    plans = ctx.socket(zmq.SUB)
    plans.setsockopt(zmq.LINGER, 0)
    plans.setsockopt(zmq.SUBSCRIBE, b"")
    plans.connect(plan.worker_plan.connect)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 0)
    results.connect(plan.worker_result.connect)
    stop = threading.Event()
    announced: list[WorkerReady] = []
    beat = threading.Thread(target=_heartbeat, args=(ctx, plan.worker_result.connect, rank, announced, stop),
                            daemon=True)
    beat.start()
    parent = os.getppid()
    try:
        device = worker_device(config, rank)
        tp = init_tensor_parallel(config, rank, device)
        runner = ModelRunner(config, tp=tp, device=str(device), log=log.info)
        ready = WorkerReady(rank, runner.num_blocks, runner.max_model_len, list(runner.eos_token_ids),
                            runner.load_seconds, str(device), runner.arch.vocab_size)
        freeze_startup_heap()
        results.send(codec.encode(ready))
        announced.append(ready)
        log.info("ready: %d KV blocks, model loaded in %.1fs", runner.num_blocks, runner.load_seconds)
        _serve(runner, plans, results, rank, ready, parent)
    finally:
        stop.set()
        ctx.destroy(linger=0)


def _serve(runner: ModelRunner, plans: zmq.Socket, results: zmq.Socket, rank: int, ready: WorkerReady,
           parent: int) -> None:
    while True:
        if not plans.poll(POLL_MS):
            if os.getppid() != parent:
                log.error("parent process died; exiting")
                return
            continue
        try:
            msg = codec.decode(plans.recv())
        except MessageDecodeError as e:
            log.warning("dropped a malformed plan: %s", e)
            continue
        if isinstance(msg, Shutdown):
            log.info("shutdown: %s", msg.reason)
            return
        if not isinstance(msg, StepPlan):
            continue
        try:
            result = runner.execute(msg)
        except Exception as e:  # noqa: BLE001 - report, reset, and keep serving
            log.exception("step %d failed", msg.step_id)
            runner.requests.clear()
            if rank == 0:
                results.send(codec.encode(WorkerError(msg.step_id, f"{type(e).__name__}: {e}")))
            results.send(codec.encode(ready))  # the scheduler starts over with a clean slate
            continue
        if rank == 0 and not msg.is_empty:
            results.send(codec.encode(result))
