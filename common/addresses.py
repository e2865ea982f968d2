"""The address plan: every ZeroMQ endpoint of the engine, derived from one ServerConfig.

Only the scheduler and the apis bind; tokenizers and workers are pure clients, so any number of them can
come and go (`docker compose up --scale tokenizer=N`):

    scheduler      ROUTER bound by scheduler   <- DEALERs of every tokenizer, every api and the launcher
    api_inbox[i]   ROUTER bound by api i       <- one DEALER per tokenizer
    worker_plan    PUB bound by scheduler      -> every gpu_worker rank (SUB)
    worker_result  PULL bound by scheduler     <- every gpu_worker rank (PUSH)

transport "ipc": `ipc://<ipc_dir>/<name>` (one host). transport "tcp": `tcp://<host>:<port>` where host is the
service name ("scheduler", "api-0", ...) as a container network resolves it, and ports count up from
`base_port` so no two endpoints share one even when every service runs on one host.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from headrace.common.config import ConfigError, ServerConfig
from headrace.common.ipc_dir import make_temp_dir, private_dir

# Longest path a Unix domain socket accepts (sockaddr_un.sun_path is 108 bytes with the NUL on Linux).
_MAX_IPC_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    bind: str  # what the owner binds ("tcp://*:port" listens on every interface)
    connect: str  # what its peers connect to


@dataclass(frozen=True)
class AddressPlan:
    scheduler: Endpoint
    api_inbox: tuple[Endpoint, ...]
    worker_plan: Endpoint
    worker_result: Endpoint

    def all(self) -> tuple[Endpoint, ...]:
        return (self.scheduler, *self.api_inbox, self.worker_plan, self.worker_result)


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


def ipc_socket_paths(server: ServerConfig) -> list[str]:
    """The socket files the engine binds under its ipc dir (none under tcp)."""
    if server.transport != "ipc":
        return []
    return [ep.bind[len("ipc://"):] for ep in address_plan(server).all()]


def address_plan(server: ServerConfig, *, base_port: int | None = None,
                 hosts: Mapping[str, str] | None = None) -> AddressPlan:
    """Every address of the engine. `hosts` overrides a service's host name (key: "scheduler", "api-1");
    `base_port` (tcp only) defaults to the HTTP port + 1000."""
    names = _names(server)
    if server.transport == "ipc":
        if not server.ipc_dir:
            raise ConfigError("transport 'ipc' needs ipc_dir (the launcher sets it with with_ipc_dir)")
        eps = {name: _ipc(server.ipc_dir, name) for name in names}
    else:
        port = server.port + 1000 if base_port is None else base_port
        if not (0 < port and port + len(names) <= 65536):
            raise ConfigError(f"zmq ports {port}..{port + len(names) - 1} do not fit in 1..65535")
        hosts = hosts or {}
        eps = {}
        for k, name in enumerate(names):
            host = hosts.get(name) or _default_host(name, hosts)
            eps[name] = Endpoint(bind=f"tcp://*:{port + k}", connect=f"tcp://{host}:{port + k}")
    return AddressPlan(
        scheduler=eps["scheduler"],
        api_inbox=tuple(eps[f"api-{i}"] for i in range(server.num_api_servers)),
        worker_plan=eps["worker-plan"],
        worker_result=eps["worker-result"],
    )


def _names(server: ServerConfig) -> list[str]:
    # Fixed endpoints first so their ports do not move when the api count changes.
    return ["scheduler", "worker-plan", "worker-result"] + [f"api-{i}" for i in range(server.num_api_servers)]


def _default_host(name: str, hosts: Mapping[str, str]) -> str:
    # The worker channels are bound by the scheduler, so they live on its host.
    return hosts.get("scheduler", "scheduler") if name.startswith("worker-") else name


def _ipc(ipc_dir: str, name: str) -> Endpoint:
    path = os.path.join(ipc_dir, name)
    if len(path.encode()) > _MAX_IPC_PATH:
        raise ConfigError(f"ipc socket path {path!r} is longer than {_MAX_IPC_PATH} bytes; use a shorter ipc_dir")
    address = f"ipc://{path}"
    return Endpoint(bind=address, connect=address)
