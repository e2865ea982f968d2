"""The launcher with --data-parallel-size: every replica's scheduler and ranks, and a crash in one replica
restarts that replica only (processes played by stand-ins: nothing is spawned)."""

from __future__ import annotations

import shutil

import pytest

from headrace.common.config import EngineConfig, ModelConfig, ParallelConfig, ServerConfig
from headrace.common.messages import WorkerFailed
from headrace.launcher import Launcher, check_devices


class StandIn:
    """What the launcher uses of an mp.Process."""

    def __init__(self, name: str):
        self.name, self.killed, self.exitcode, self.sentinel = name, False, None, object()

    def kill(self) -> None:
        self.killed = True

    def join(self, timeout=None) -> None:
        pass


@pytest.fixture
def launcher(monkeypatch, tmp_path):
    config = EngineConfig(model=ModelConfig(model="random:tiny-llama"), device="cpu",
                          parallel=ParallelConfig(tensor_parallel_size=2, data_parallel_size=2),
                          server=ServerConfig(ipc_dir=str(tmp_path)))
    launcher = Launcher(config)
    launcher.notified = []
    monkeypatch.setattr(launcher, "_spawn", lambda kind, index: StandIn(f"{kind}-{index}"))
    monkeypatch.setattr(launcher, "_notify_scheduler", lambda msg, replica=0: launcher.notified.append((msg, replica)))
    launcher.start()
    yield launcher
    shutil.rmtree(launcher.metrics_dir)  # start() made it; stop() would remove it


def by_name(launcher: Launcher) -> dict:
    return {c.name: c for c in launcher.children}


def test_every_replica_gets_its_scheduler_and_ranks(launcher):
    children = by_name(launcher)
    assert sorted(children) == ["api-0", "scheduler-0", "scheduler-1", "tokenizer-0",
                                "worker-0", "worker-1", "worker-2", "worker-3"]
    assert [children[f"worker-{g}"].replica for g in range(4)] == [0, 0, 1, 1]
    assert children["scheduler-1"].replica == 1


def test_a_dead_worker_restarts_its_replica_only(launcher):
    children = by_name(launcher)
    assert launcher._on_exit(children["worker-3"])
    assert launcher.notified == [(WorkerFailed(1, "exited with code None"), 1)]  # rank 1 of replica 1
    assert children["worker-2"].process.killed and children["worker-2"].due is not None
    assert all(children[n].due is None and not children[n].process.killed
               for n in ("worker-0", "worker-1", "scheduler-0", "scheduler-1"))


def test_a_dead_scheduler_restarts_with_its_ranks_and_nothing_else(launcher):
    children = by_name(launcher)
    assert launcher._on_exit(children["scheduler-0"])
    assert children["scheduler-0"].due is not None
    assert all(children[n].process.killed for n in ("worker-0", "worker-1"))
    assert not any(children[n].process.killed or children[n].due is not None
                   for n in ("worker-2", "worker-3", "scheduler-1"))


def test_replicas_times_ranks_gpus_are_needed(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(ValueError, match=r"2 worker ranks .* x --data-parallel-size 2 here needs 4 GPUs"):
        check_devices("cuda", 2, 2)
    check_devices("cuda", 1, 3)
