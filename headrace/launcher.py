"""`headrace serve`: every process of the pipeline on one host, under one supervisor.

The launcher resolves the model once (converting a GGUF into the cache before anyone needs it), fixes
every address, starts scheduler, worker ranks, tokenizers and api servers as separate processes, and
then only watches them: a dead tokenizer or api is restarted, a dead worker is reported to the
scheduler (which fails its in-flight requests) and the ranks are restarted, a dead scheduler is restarted
with its replica's ranks. With --data-parallel-size D each replica (scheduler d, worker indices
d*W .. d*W + W-1 for W = tensor x pipeline parallel ranks) is watched and restarted on its own: a crash in
one leaves the others serving. With --nnodes, a node runs its block of each replica's ranks (a --headless
node nothing else). A process that dies again before the server is healthy again is restarted after a
growing pause; one that keeps doing so ends the server with exit code 1 and a log line naming it.
SIGINT/SIGTERM drain the api servers first, then stop everything; no process is left behind.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from headrace.common.config import EngineConfig, ServerConfig
from headrace.common.messages import Shutdown, WorkerFailed
from headrace.common.ports import free_port_base

log = logging.getLogger("headrace.launcher")

# A process that dies before the server has been healthy since its last start is crash-looping: its k-th
# such death in a row waits BACKOFF_S * 2**(k-2) before the restart (the first restarts at once), and the
# MAX_CRASHES-th ends the server.
BACKOFF_S = 1.0
MAX_CRASHES = 4
# The server counts as healthy again only with every restart done and this long behind it, so that a process
# that dies shortly after each start is caught even while its siblings keep /health at 200.
STABLE_S = 5.0
# How long past --shutdown-timeout the apis get to close their last responses and exit.
DRAIN_MARGIN_S = 5.0
STOP_TIMEOUT_S = 10.0


def _child_entry(kind: str, config_dict: dict[str, Any], index: int, env: dict[str, str]) -> None:
    """Runs in the child: die with the launcher (PR_SET_PDEATHSIG), then the service's main."""
    os.environ.update(env)  # before the service imports anything that reads it (prometheus_client)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the services' own parent-pid checks still end them
    from headrace.service_entries import run_service

    run_service(kind, config_dict, index)


@dataclass
class Child:
    kind: str
    index: int
    process: mp.Process
    crashes: int = 0  # deaths in a row before the server was healthy again (see BACKOFF_S)
    due: float | None = None  # when a restart pending its backoff starts (monotonic)
    reason: str = ""  # why it last died

    replica: int = 0  # the data-parallel replica of a scheduler or worker

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index}"


def check_pipeline(config: EngineConfig) -> None:
    """Fail before starting anything when the stages cannot split the model's layers, or when nodes could
    not reach the scheduler (ipc sockets, or a CURVE key each node would make its own of)."""
    from headrace.common.config import ConfigError
    from headrace.common.models.arch import arch_from_hf_config
    from headrace.common.models.source import load_hf_config
    from headrace.common.pipeline_layout import stage_layer_ranges

    par = config.parallel
    if par.pipeline_parallel_size > 1:
        num_layers = arch_from_hf_config(load_hf_config(config.require_resolved())).num_layers
        stage_layer_ranges(num_layers, par.pipeline_parallel_size, par.layer_partition_counts)
    if par.nnodes > 1:
        if config.server.transport != "tcp":
            raise ConfigError("--nnodes > 1 needs --transport tcp: the other nodes' workers dial the scheduler")
        if config.server.engine_curve_key_file is None:
            raise ConfigError("--nnodes > 1 needs --engine-curve-key-file: one key (`headrace keygen FILE`) "
                              "copied to every node, so that the nodes' processes admit each other")


def check_devices(device: str, ranks: int, dp: int = 1) -> None:
    """Fail before starting anything when this host has fewer GPUs than ranks."""
    from headrace.common.config import resolve_device

    if resolve_device(device) == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count < ranks * dp:
            what = f"{ranks} worker ranks (tensor x pipeline parallel size / nodes)" + (
                f" x --data-parallel-size {dp}" if dp > 1 else "")
            raise ValueError(f"running {what} here needs {ranks * dp} GPUs; this host has {count}")


@dataclass
class RuntimeFiles:
    """What the launcher made on disk for one run, so that shutdown removes exactly that: never a folder, or a
    file in it, that was there before."""

    ipc_dir: str | None = None  # the ipc folder, only when the launcher created it
    key_dir: str | None = None  # the private folder of a one-off CURVE key (tcp without --engine-curve-key-file)


def prepare_config(config: EngineConfig, log_fn=print, files: RuntimeFiles | None = None) -> EngineConfig:
    """Resolve everything every process must agree on, once, before any process starts. What it creates on
    disk is noted in `files` (for Launcher.stop)."""
    from headrace.common.addresses import claim_ipc_dir
    from headrace.common.models.resolve import resolve_engine_config

    config = resolve_engine_config(config, log=log_fn)
    parallel = config.parallel
    check_devices(config.device, parallel.ranks_per_node, parallel.data_parallel_size)
    check_pipeline(config)
    if parallel.world_size > 1 and not parallel.dist_init_addr:
        # Replica d's ranks meet on this port + d (pipeline.replica_dist_init_addr): all of them free.
        port = free_port_base(range(parallel.data_parallel_size))
        parallel = dataclasses.replace(parallel, dist_init_addr=f"127.0.0.1:{port}")
    # Last: nothing is made on disk (a one-off key, the ipc folder) for a start that fails earlier.
    files = files if files is not None else RuntimeFiles()
    server = tcp_on_one_host(config.server, files, parallel.data_parallel_size)
    server, created = claim_ipc_dir(server)
    if created:
        files.ipc_dir = server.ipc_dir
    return config.replace(parallel=parallel, server=server)


def tcp_on_one_host(server: ServerConfig, files: RuntimeFiles, replicas: int = 1) -> ServerConfig:
    """tcp with every process on this host: peers dial the host the engine binds on (the compose service
    names do not resolve here), every host they dial must resolve now, and without a key of the user's the
    processes share a one-off CURVE key, so no other local user's process can reach the engine's ports."""
    from headrace.common.addresses import address_plan, check_bindable, check_resolves, loopback_peer_host
    from headrace.common.curve import read_key_file, write_new_key_file
    from headrace.common.ipc_dir import make_temp_dir

    if server.transport != "tcp":
        return server
    if server.engine_connect_host is None:
        server = dataclasses.replace(server, engine_connect_host=loopback_peer_host(server.engine_bind_host))
    for endpoint in address_plan(server, replicas=replicas).all():
        check_resolves(endpoint.connect)
        check_bindable(endpoint.bind)
    if server.engine_curve_key_file is not None:
        read_key_file(server.engine_curve_key_file)  # one line now rather than every process failing on it
        return server
    files.key_dir = make_temp_dir()
    key_file = os.path.join(files.key_dir, "engine_curve.key")
    write_new_key_file(key_file)
    return dataclasses.replace(server, engine_curve_key_file=key_file)


class Launcher:
    def __init__(self, config: EngineConfig, files: RuntimeFiles | None = None):
        self.config = config
        self.files = files if files is not None else RuntimeFiles()
        self.config_dict = config.to_dict()
        self.ctx = mp.get_context("spawn")
        self.children: list[Child] = []
        # The api processes' shared Prometheus files (services/api/metrics.py); made in start(), removed in stop().
        self.metrics_dir: str | None = None
        self.stopping = False
        self.announced = False
        self.down_since: float | None = None  # a process died and /health has not been 200 since
        self.down_what = ""
        self.last_spawn = 0.0  # when the last process started (monotonic)
        self.node0 = None  # a headless node's watch on node 0's scheduler (node_watch.py)

    # ------------------------------------------------------------------ processes

    @property
    def replicas(self) -> int:
        return self.config.parallel.data_parallel_size

    def _spawn(self, kind: str, index: int) -> mp.Process:
        env = {"PROMETHEUS_MULTIPROC_DIR": self.metrics_dir} if self.metrics_dir else {}
        proc = self.ctx.Process(target=_child_entry, args=(kind, self.config_dict, index, env),
                                name=f"headrace-{kind}-{index}")
        proc.start()
        self.last_spawn = time.monotonic()
        log.info("started %s-%d (pid %d)", kind, index, proc.pid)
        return proc

    def start(self) -> None:
        s = self.config.server
        self.metrics_dir = tempfile.mkdtemp(prefix="headrace-metrics-")
        par = self.config.parallel
        plan = []
        for d in range(self.replicas):  # replica d: scheduler d, workers d*W + this node's block of ranks
            workers = [("worker", d * par.world_size + r, d) for r in par.node_ranks]
            plan += workers if par.headless else [("scheduler", d, d), *workers]
        if par.headless:
            from headrace.node_watch import SchedulerWatch

            self.node0 = SchedulerWatch(s)
        else:
            plan += [("tokenizer", j, 0) for j in range(s.num_tokenizers)]
            plan += [("api", i, 0) for i in range(s.num_api_servers)]
        for kind, index, replica in plan:
            self.children.append(Child(kind, index, self._spawn(kind, index), replica=replica))

    def _notify_scheduler(self, msg: Any, replica: int = 0) -> None:
        import zmq

        from headrace.common import transport
        from headrace.common.addresses import plan_for

        sock = transport.dealer_socket(zmq.Context.instance(), plan_for(self.config).replicas[replica].scheduler,
                                       prefix="launcher", linger_ms=1000)
        transport.dealer_send(sock, msg)
        sock.close()

    def _restart(self, child: Child, reason: str, died: bool = True) -> bool:
        """Restart child now, or after its backoff when it is crash-looping; False when it has crashed
        MAX_CRASHES times in a row (the server cannot become healthy). `died`: False for a process stopped
        here to restart with its replica, which is no crash of its own."""
        now = time.monotonic()
        if died and (not self.announced or self.down_since is not None):  # dead before healthy again
            child.crashes += 1
        if self.down_since is None:
            self.down_since, self.down_what = now, child.name
        child.reason = reason
        if child.crashes >= MAX_CRASHES:
            log.error("giving up: %s crash-looped, dying %d times in a row before the server became healthy "
                      "(last: %s); stopping the server", child.name, child.crashes, reason)
            return False
        delay = 0.0 if child.crashes <= 1 else BACKOFF_S * 2 ** (child.crashes - 2)  # 0, 0, 1, 2, ...
        log.warning("%s %s; restarting it%s", child.name, reason, f" in {delay:.0f}s" if delay else "")
        child.due = now + delay
        return True

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.due is not None and child.due <= now and not self.stopping:
                child.due = None
                child.process = self._spawn(child.kind, child.index)

    def _on_exit(self, child: Child) -> bool:
        """Handle one child's exit; False means the server cannot go on."""
        reason = f"exited with code {child.process.exitcode}"
        if self.config.parallel.headless and child.kind == "worker" and child.process.exitcode == 0:
            # A rank exits cleanly only on the scheduler's Shutdown: node 0 is stopping, so this node stops too.
            log.info("%s stopped with node 0's scheduler; stopping this node", child.name)
            self.stopping = True
            return True
        if child.kind == "scheduler":
            # The ranks' per-request state and in-flight steps belong to the dead scheduler's plans, and their KV
            # blocks to its block table: a new scheduler can rebuild neither, so the replica restarts together
            # (its requests were failed by the tokenizers, which saw the scheduler's connection close).
            return self._restart(child, reason) and self._restart_workers(child, "restarted with its scheduler")
        if child.kind == "worker":
            rank = child.index % self.config.parallel.world_size
            self._notify_scheduler(WorkerFailed(rank, reason), child.replica)
            # A lost rank leaves the others stuck in collectives: restart every rank of the replica.
            return self._restart(child, reason) and self._restart_workers(child, "restarted with its replica")
        return self._restart(child, reason)

    def _restart_workers(self, dead: Child, reason: str) -> bool:
        """Restart the workers of dead's replica (all but dead itself); other replicas keep running."""
        ok = True
        for other in self.children:
            if (other.kind == "worker" and other is not dead and other.replica == dead.replica
                    and other.due is None):
                other.process.kill()
                other.process.join(5)
                ok = self._restart(other, reason, died=False) and ok
        return ok

    # ------------------------------------------------------------------ supervision

    def supervise(self) -> int:
        while not self.stopping:
            if self.node0 is not None and self.node0.lost():
                log.info("node 0's scheduler went away; stopping this node (its ranks belong to that world)")
                return 0
            self._start_due()
            sentinels = {c.process.sentinel: c for c in self.children if c.due is None}
            for sentinel in wait(list(sentinels), timeout=0.5):
                child = sentinels[sentinel]
                child.process.join(1)  # dead by its sentinel; join(0) could come before the reaping (code None)
                if self.stopping or child.due is not None:  # stopping, or killed by a replica restart above
                    break
                if not self._on_exit(child):
                    return 1
            if not self.announced and self._healthy():
                self._on_healthy()
            elif self.down_since is not None and self._recovered():
                self._on_healthy()
        return 0

    def _recovered(self) -> bool:
        settled = time.monotonic() - self.last_spawn >= STABLE_S
        return settled and all(c.due is None for c in self.children) and self._healthy()

    def _on_healthy(self) -> None:
        for child in self.children:
            child.crashes = 0
        if self.down_since is not None:
            log.info("recovered: healthy again %.1fs after %s died", time.monotonic() - self.down_since,
                     self.down_what)
            self.down_since = None
        if not self.announced:
            self.announced = True
            s, par = self.config.server, self.config.parallel
            if par.headless:
                print(f"headrace node {par.node_rank} is up: worker ranks {par.node_ranks.start}.."
                      f"{par.node_ranks.stop - 1}", flush=True)
                return
            print(f"headrace is ready: http://{s.host}:{s.port}/v1 (model {self.config.require_resolved().name})",
                  flush=True)

    def _healthy(self) -> bool:
        """/health is 200 and every replica serves (/health alone is 200 while any one does): the server is
        announced ready, and counts as recovered from a crash, only with all of them."""
        import httpx

        if self.config.parallel.headless:  # no api here: healthy while its ranks run (node 0 reports the rest)
            return all(c.process.is_alive() for c in self.children)
        s = self.config.server
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        try:
            reply = httpx.get(f"http://{host}:{s.port}/health", timeout=1.0)
        except httpx.HTTPError:
            return False
        serving, _, total = reply.headers.get("X-Headrace-Replicas-Serving", "1/1").partition("/")
        return reply.status_code == 200 and serving == total

    def stop(self, drain: bool = True) -> None:
        """Drain the api servers (they finish in-flight requests), then stop every process."""
        self.stopping = True
        apis = [c.process for c in self.children if c.kind == "api" and c.process.is_alive()]
        for p in apis:
            p.terminate()  # uvicorn's graceful shutdown: stop accepting, finish open responses
        deadline = time.monotonic() + (self.config.server.shutdown_timeout + DRAIN_MARGIN_S if drain else 2.0)
        for p in apis:
            p.join(max(0.0, deadline - time.monotonic()))
        for d in range(0 if self.config.parallel.headless else self.replicas):  # node 0's schedulers serve on
            try:
                self._notify_scheduler(Shutdown("launcher stopping"), d)
            except Exception:  # noqa: BLE001 - best effort; terminate below covers it
                pass
        rest = [c.process for c in self.children if c.process.is_alive()]
        for p in rest:
            p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in rest:
            p.join(max(0.0, deadline - time.monotonic()))
        for c in self.children:
            if c.process.is_alive():
                log.warning("%s did not stop; killing it", c.name)
                c.process.kill()
                c.process.join(5)
        if self.node0 is not None:
            self.node0.close()
        self._remove_runtime_files()

    def _remove_runtime_files(self) -> None:
        """The sockets the processes bound (a killed one leaves its file), the ipc folder if the launcher made
        it and nothing else is in it, the metrics folder (made by the launcher, written only by the apis)."""
        from headrace.common.addresses import ipc_socket_paths
        from headrace.common.ipc_dir import remove_sockets

        remove_sockets(ipc_socket_paths(self.config.server, self.replicas))
        if self.files.ipc_dir:
            try:
                os.rmdir(self.files.ipc_dir)
            except OSError as e:
                log.warning("left the ipc folder %s in place: %s", self.files.ipc_dir, e.strerror)
        if self.files.key_dir:  # made by the launcher, holding only the key it wrote
            shutil.rmtree(self.files.key_dir, ignore_errors=True)
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def serve(config: EngineConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per /health poll
    files = RuntimeFiles()
    try:
        config = prepare_config(config, log_fn=log.info, files=files)
    except (ValueError, OSError) as e:  # a ConfigError, a missing model, an ipc folder we may not create
        print(f"headrace: error: {e}", file=sys.stderr)
        return 2
    launcher = Launcher(config, files)

    def on_signal(signum, _frame):
        log.info("received %s; draining", signal.Signals(signum).name)
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    launcher.start()
    code = 1
    try:
        code = launcher.supervise()
    finally:
        launcher.stop(drain=code == 0)
    return code
