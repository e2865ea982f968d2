"""Process entry of one api instance: `main(config.to_dict(), index)`.

We bind the HTTP socket ourselves with SO_REUSEPORT, so every api instance listens on the same port and the
kernel spreads connections across them. SIGTERM/SIGINT shut uvicorn down gracefully (in-flight requests get
`--shutdown-timeout` to finish; then each one still running ends cleanly, a stream with an error event and
`[DONE]`, before uvicorn would cancel it); the process also leaves when its parent (the launcher) dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from headrace.common.config import EngineConfig
from headrace.common.process import event_loop_factory, freeze_startup_heap
from headrace.services.api.app import create_app
from headrace.services.api.engine_client import EngineClient
from headrace.services.api.errors import ApiError

log = logging.getLogger(__name__)

# uvicorn's own limit, past the drain deadline: by then every response has ended (see _end_at_deadline).
GRACEFUL_MARGIN_S = 5.0
_PARENT_POLL_S = 1.0


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket that other processes may bind too (SO_REUSEPORT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def openai_400_protocol(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol `base` (httptools or h11), except that a request its parser rejects gets the
    OpenAI error body as JSON instead of uvicorn's plain text. A non-numeric or negative Content-Length, a
    malformed request line or header never reaches the app (its middleware cannot answer it), yet clients
    parse every error the same way."""

    class OpenAI400Protocol(base):  # type: ignore[valid-type, misc]
        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this inside its `except` for the parser's error, whose text names the bad part
            # ("Invalid character in Content-Length"); its own `msg` only says the request was invalid.
            error = sys.exc_info()[1]
            detail = str(error) if error is not None and str(error) else msg
            self.transport.write(_bad_request_bytes(detail))
            self.transport.close()

    OpenAI400Protocol.__name__ = OpenAI400Protocol.__qualname__ = f"OpenAI400{base.__name__}"
    return OpenAI400Protocol


def _bad_request_bytes(detail: str) -> bytes:
    body = json.dumps(ApiError(400, f"Invalid HTTP request: {detail.rstrip('.')}.").body()).encode()
    head = ("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


# The HTTP/1.1 protocol uvicorn would pick (httptools when installed, else h11), with the JSON 400 above.
HTTP_PROTOCOL = openai_400_protocol(AutoHTTPProtocol)


def build_server(app: FastAPI, http: type[asyncio.Protocol] = HTTP_PROTOCOL,
                 shutdown_timeout: float = 10.0) -> uvicorn.Server:
    """The api's uvicorn server; `http` is its HTTP/1.1 protocol class (tests pass the h11 one too)."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", ws="none",
                                         http=http, timeout_graceful_shutdown=shutdown_timeout + GRACEFUL_MARGIN_S))


async def serve(server: uvicorn.Server, sock: socket.socket, parent_pid: int | None = None,
                drain: tuple[EngineClient, float] | None = None) -> None:
    """Run uvicorn on `sock` until a signal, a failed startup, or (with `parent_pid`) the parent's death.
    `drain`: the engine client and --shutdown-timeout, to end what still runs at the drain's deadline."""
    watchers = [asyncio.create_task(_watch_parent(server, parent_pid))] if parent_pid is not None else []
    if drain is not None:
        watchers.append(asyncio.create_task(_end_at_deadline(server, *drain)))
    try:
        await server.serve(sockets=[sock])
    finally:
        for watcher in watchers:
            watcher.cancel()


async def _end_at_deadline(server: uvicorn.Server, client: EngineClient, shutdown_timeout: float) -> None:
    """Once shutdown starts, give open requests `shutdown_timeout` seconds; then end each one that still runs
    with a 503 (a stream: an error event, then [DONE]), so that every response closes by itself and uvicorn
    never has to cancel one (which would cut a stream with neither and log a traceback)."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(shutdown_timeout)
    ended = client.end_all("The server is shutting down; this request was stopped before it finished.")
    if ended:
        log.warning("shutdown deadline (%.0fs) reached: ended %d requests still running", shutdown_timeout, ended)


async def _watch_parent(server: uvicorn.Server, parent_pid: int) -> None:
    while not server.should_exit:
        await asyncio.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            log.error("parent process %d is gone; shutting down", parent_pid)
            server.should_exit = True


def main(config_dict: dict[str, Any], index: int) -> None:
    """Process entrypoint for the launcher and `headrace api --index i`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s api-{index} %(levelname)s %(message)s")
    config = EngineConfig.from_dict(config_dict)
    parent_pid = os.getppid()
    app = create_app(config, index)
    sock = bind_socket(config.server.host, config.server.port)
    freeze_startup_heap()
    log.info("api %d listening on http://%s:%d", index, config.server.host, config.server.port)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            server = build_server(app, shutdown_timeout=config.server.shutdown_timeout)
            runner.run(serve(server, sock, parent_pid, (app.state.serving.client, config.server.shutdown_timeout)))
    finally:
        sock.close()
