"""The address plan: every ZeroMQ endpoint of the engine, derived from one ServerConfig.

Only the scheduler and the apis bind; tokenizers and workers are pure clients, so any number of them can
come and go (`docker compose up --scale tokenizer=N`):

    scheduler      ROUTER bound by scheduler   <- DEALERs of every tokenizer, every api and the launcher
    api_inbox[i]   ROUTER bound by api i       <- one DEALER per tokenizer
    worker_plan    PUB bound by scheduler      -> every gpu_worker rank (SUB)
    worker_result  PULL bound by scheduler     <- every gpu_worker rank (PUSH)

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

from headrace.common.config import ConfigError, ServerConfig
from headrace.common.ipc_dir import make_temp_dir, private_dir

# Longest path a Unix domain socket accepts (sockaddr_un.sun_path is 108 bytes with the NUL on Linux).
_MAX_IPC_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    bind: str  # what the owner binds ("tcp://0.0.0.0:port" listens on every interface)
    connect: str  # what its peers connect to
    curve_key_file: str | None = None  # tcp: the engine's CURVE key (ServerConfig.engine_curve_key_file)


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
        bind_host = _url_host(server.engine_bind_host)
        eps = {}
        for k, name in enumerate(names):
            host = _url_host(_connect_host(server, name, hosts))
            eps[name] = Endpoint(bind=f"tcp://{bind_host}:{port + k}", connect=f"tcp://{host}:{port + k}",
                                 curve_key_file=server.engine_curve_key_file)
    return AddressPlan(
        scheduler=eps["scheduler"],
        api_inbox=tuple(eps[f"api-{i}"] for i in range(server.num_api_servers)),
        worker_plan=eps["worker-plan"],
        worker_result=eps["worker-result"],
    )


def _names(server: ServerConfig) -> list[str]:
    # Fixed endpoints first so their ports do not move when the api count changes.
    return ["scheduler", "worker-plan", "worker-result"] + [f"api-{i}" for i in range(server.num_api_servers)]


def _connect_host(server: ServerConfig, name: str, hosts: Mapping[str, str]) -> str:
    # The worker channels are bound by the scheduler, so they live on its host.
    owner = "scheduler" if name.startswith("worker-") else name
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


def _ipc(ipc_dir: str, name: str) -> Endpoint:
    path = os.path.join(ipc_dir, name)
    if len(path.encode()) > _MAX_IPC_PATH:
        raise ConfigError(f"ipc socket path {path!r} is longer than {_MAX_IPC_PATH} bytes; use a shorter ipc_dir")
    address = f"ipc://{path}"
    return Endpoint(bind=address, connect=address)
