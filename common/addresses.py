"""The address plan: every ZeroMQ endpoint of the engine, derived from one ServerConfig.

Only the scheduler and the apis bind; tokenizers and workers are pure clients, so any number of them can
come and go (`docker compose up --scale tokenizer=N`):

    scheduler      ROUTER bound by scheduler   <- DEALERs of every tokenizer, every api and the launcher
    api_inbox[i]   ROUTER bound by api i       <- one DEALER per tokenizer
    worker_plan    PUB bound by scheduler      -> every gpu_worker rank (SUB)
    worker_result  PULL bound by scheduler     <- every gpu_worker rank (PUSH)
    kv_events      PUB bound by scheduler      -> every tokenizer (SUB), any external router (SUB)
    kv_replay      ROUTER bound by scheduler   <- an external router that missed KV events (REQ/DEALER)

With --data-parallel-size D every replica d has its own scheduler, worker_plan, worker_result and kv_events
(named "scheduler-d", ... for d >= 1; replica 0 keeps the names above, so D = 1 is unchanged and has no
kv_events unless --kv-events asks for it). The apis and tokenizers are shared by all replicas and dial each one's scheduler.

transport "ipc": `ipc://<ipc_dir>/<name>` (one host). transport "tcp": owners bind
`tcp://<engine_bind_host>:<port>` (127.0.0.1 unless told otherwise; compose says 0.0.0.0) and peers dial
`tcp://<host>:<port>`, where host is `engine_connect_host` when set (`headrace serve` sets it to the bind host)
or else the service name ("scheduler", "api-0", ...) as a container network resolves it. Ports count up from
`base_port` so no two endpoints share one even when every service runs on one host. A tcp endpoint carries
the engine's CURVE key file, if any, for common/transport.py to secure the socket with.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from headrace.common.config import ConfigError, EngineConfig, ServerConfig
from headrace.common.ipc_dir import make_temp_dir, private_dir
from headrace.common.ports import bind_error

# Longest path a Unix domain socket accepts (sockaddr_un.sun_path is 108 bytes with the NUL on Linux).
_MAX_IPC_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    bind: str  # what the owner binds ("tcp://0.0.0.0:port" listens on every interface)
    connect: str  # what its peers connect to
    curve_key_file: str | None = None  # tcp: the engine's CURVE key (ServerConfig.engine_curve_key_file)


@dataclass(frozen=True)
class ReplicaEndpoints:
    """The sockets one engine replica's scheduler binds."""

    scheduler: Endpoint
    worker_plan: Endpoint
    worker_result: Endpoint
    kv_events: Endpoint | None  # None with a single replica unless --kv-events (nobody routes between replicas)
    kv_replay: Endpoint | None = None  # present with kv_events


@dataclass(frozen=True)
class AddressPlan:
    scheduler: Endpoint  # replica 0's three (see replica() for another's)
    api_inbox: tuple[Endpoint, ...]
    worker_plan: Endpoint
    worker_result: Endpoint
    replicas: tuple[ReplicaEndpoints, ...] = ()  # every replica's, replica 0 first

    def all(self) -> tuple[Endpoint, ...]:
        extra = tuple(ep for r in self.replicas[1:] for ep in (r.scheduler, r.worker_plan, r.worker_result))
        events = tuple(ep for r in self.replicas for ep in (r.kv_events, r.kv_replay) if ep is not None)
        return (self.scheduler, *self.api_inbox, self.worker_plan, self.worker_result, *extra, *events)

    def replica(self, d: int) -> AddressPlan:
        """This plan seen from replica d's scheduler and workers: its endpoints in the top fields."""
        r = self.replicas[d]
        return dataclasses.replace(self, scheduler=r.scheduler, worker_plan=r.worker_plan,
                                   worker_result=r.worker_result)


def plan_for(config: EngineConfig) -> AddressPlan:
    """The address plan of a whole engine: every replica's sockets."""
    return address_plan(config.server, replicas=config.parallel.data_parallel_size)


def with_ipc_dir(server: ServerConfig) -> ServerConfig:
    """`claim_ipc_dir` without the word on who made the folder."""
    return claim_ipc_dir(server)[0]


def claim_ipc_dir(server: ServerConfig) -> tuple[ServerConfig, bool]:
    """The launcher calls this once, before any process starts, so every process derives the same socket
    paths, in a folder only this user may enter (common.ipc_dir): a fresh temp folder when none is given; a
    given one is made 0700 when missing and refused when others may enter it. True when this call made the
    folder: shutdown removes it then (if it is empty), and never a folder that was there before."""
    if server.transport != "ipc":
        return server, False
    if not server.ipc_dir:
        return dataclasses.replace(server, ipc_dir=make_temp_dir()), True
    return server, private_dir(server.ipc_dir)


def ipc_socket_paths(server: ServerConfig, replicas: int = 1) -> list[str]:
    """The socket files the engine binds under its ipc dir (none under tcp)."""
    if server.transport != "ipc":
        return []
    return [ep.bind[len("ipc://"):] for ep in address_plan(server, replicas=replicas).all()]


def address_plan(server: ServerConfig, *, base_port: int | None = None,
                 hosts: Mapping[str, str] | None = None, replicas: int = 1) -> AddressPlan:
    """Every address of the engine. `hosts` overrides a service's host name (key: "scheduler", "api-1");
    `base_port` (tcp only) defaults to the HTTP port + 1000; `replicas`: --data-parallel-size."""
    names = _names(server, replicas)
    if server.transport == "ipc":
        if not server.ipc_dir:
            raise ConfigError("transport 'ipc' needs ipc_dir (the launcher sets it with with_ipc_dir)")
        eps = {name: _ipc(server.ipc_dir, name) for name in names}
    else:
        port = server.port + 1000 if base_port is None else base_port
        if not (0 < port and port + len(names) <= 65536):
            raise ConfigError(f"zmq ports {port}..{port + len(names) - 1} do not fit in 1..65535")
        hosts = hosts or {}
        bind_host = _url_host(server.engine_bind_host)
        eps = {}
        for k, name in enumerate(names):
            host = _url_host(_connect_host(server, name, hosts))
            eps[name] = Endpoint(bind=f"tcp://{bind_host}:{port + k}", connect=f"tcp://{host}:{port + k}",
                                 curve_key_file=server.engine_curve_key_file)
    reps = tuple(ReplicaEndpoints(eps[_replica_name("scheduler", d)], eps[_replica_name("worker-plan", d)],
                                  eps[_replica_name("worker-result", d)],
                                  eps.get(_replica_name("kv-events", d)), eps.get(_replica_name("kv-replay", d)))
                 for d in range(replicas))
    return AddressPlan(
        scheduler=eps["scheduler"],
        api_inbox=tuple(eps[f"api-{i}"] for i in range(server.num_api_servers)),
        worker_plan=eps["worker-plan"],
        worker_result=eps["worker-result"],
        replicas=reps,
    )


def _replica_name(name: str, d: int) -> str:
    return name if d == 0 else f"{name}-{d}"


def _names(server: ServerConfig, replicas: int = 1) -> list[str]:
    # Fixed endpoints first so their ports do not move when the api count changes; a single replica's plan is
    # the same as before replicas existed.
    names = ["scheduler", "worker-plan", "worker-result"] + [f"api-{i}" for i in range(server.num_api_servers)]
    events = ["kv-events", "kv-replay"] if replicas > 1 or server.kv_events else []
    for d in range(replicas):
        own = events if d == 0 else ["scheduler", "worker-plan", "worker-result", *events]
        names += [_replica_name(name, d) for name in own]
    return names


def _connect_host(server: ServerConfig, name: str, hosts: Mapping[str, str]) -> str:
    # The worker channels and KV events are bound by the scheduler (of the same replica), so they live on its host.
    owner = name
    for channel in ("worker-plan", "worker-result", "kv-events", "kv-replay"):
        if name.startswith(channel):
            owner = "scheduler" + name[len(channel):]
    return hosts.get(name) or hosts.get(owner) or server.engine_connect_host or owner


def _url_host(host: str) -> str:
    # An IPv6 literal goes in brackets in a ZeroMQ tcp address, as in a URL.
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def tcp_host_port(address: str) -> tuple[str, int]:
    """("10.0.0.2", 9000) from "tcp://10.0.0.2:9000" (brackets of an IPv6 literal removed)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether a tcp address stays on this host ("tcp://127.0.0.1:9000" does, "tcp://0.0.0.0:9000" does not)."""
    host, _ = tcp_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", or a host name that may resolve to anything


def loopback_peer_host(bind_host: str) -> str:
    """The host a peer on this machine dials to reach an owner bound on `bind_host`."""
    return {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(bind_host, bind_host)


def check_resolves(address: str) -> None:
    """A ConfigError naming the host when a tcp address to dial does not resolve. ZeroMQ itself would accept
    the address and retry it forever in silence, leaving the engine at 503 with no word of why."""
    host, port = tcp_host_port(address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"the engine peer host {host!r} (in {address}) does not resolve: {e.strerror}. Service "
                          "names such as 'scheduler' resolve on a compose network; elsewhere set "
                          "--engine-connect-host (headrace serve sets it to --engine-bind-host)") from None


def check_bindable(address: str) -> None:
    """A ConfigError naming the port when a tcp address to bind is taken on this host. Without it the owner
    (the scheduler, an api) dies on its bind after the others started, and the launcher restarts it until it
    gives up; this says which port at once."""
    host, port = tcp_host_port(address)
    error = bind_error(port, "" if host in ("*", "0.0.0.0") else host, reuse_addr=True)
    if error is not None:
        raise ConfigError(f"the engine's port {port} ({address}) cannot be bound: {error.strerror}. Over tcp the "
                          "engine binds --port + 1000 and the ports after it; pick another --port")


def _ipc(ipc_dir: str, name: str) -> Endpoint:
    path = os.path.join(ipc_dir, name)
    if len(path.encode()) > _MAX_IPC_PATH:
        raise ConfigError(f"ipc socket path {path!r} is longer than {_MAX_IPC_PATH} bytes; use a shorter ipc_dir")
    address = f"ipc://{path}"
    return Endpoint(bind=address, connect=address)
