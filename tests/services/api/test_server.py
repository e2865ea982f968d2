"""The process entry: SO_REUSEPORT binding, and `main()` in a real child process (serve, SIGTERM, orphaned)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from headrace.common.addresses import address_plan
from headrace.common.config import EngineConfig
from headrace.common.ports import free_port_base
from headrace.services.api import errors
from headrace.services.api.middleware import BodyLimitMiddleware
from headrace.services.api.server import HTTP_PROTOCOL, bind_socket, build_server, openai_400_protocol, serve
from tests.services.api.fakes import WAIT_S, FakeScheduler, FakeTokenizer, api_config, until, words

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_several_sockets_share_one_port():
    first = bind_socket("127.0.0.1", 0)
    try:
        second = bind_socket("127.0.0.1", first.getsockname()[1])
        second.close()
    finally:
        first.close()


def _free_port() -> int:
    return free_port_base()


def _main_command(config: EngineConfig) -> list[str]:
    code = "import json, sys; from headrace.services.api.server import main; main(json.loads(sys.argv[1]), 0)"
    return [sys.executable, "-c", code, json.dumps(config.to_dict())]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.fixture
def config(tmp_path) -> EngineConfig:
    return api_config(port=_free_port(), ipc_dir=str(tmp_path))


@pytest.mark.anyio
async def test_main_serves_then_stops_on_sigterm(config):
    plan = address_plan(config.server)
    scheduler = await FakeScheduler(plan.scheduler.bind).start()
    scheduler.sending = True
    tok = await FakeTokenizer(plan.api_inbox[0].connect, script=words("served")).start()
    proc = subprocess.Popen(_main_command(config), cwd=REPO)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.server.port}") as http:
            async def healthy() -> None:
                while True:
                    try:
                        if (await http.get("/health")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass  # still starting
                    assert proc.poll() is None, "the api process exited"
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(healthy(), WAIT_S)
            r = await http.post("/v1/completions", json={"prompt": "x"})
            assert r.json()["choices"][0]["text"] == "served"
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), WAIT_S)
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await tok.close()
        await scheduler.close()


@pytest.mark.anyio
async def test_main_exits_when_its_parent_dies(config):
    # A middle process starts the api and lives until we close its stdin: then the api is an orphan.
    middle = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); "
         "sys.stdin.read()", *_main_command(config)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    api_pid = int(middle.stdout.readline())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.server.port}") as http:
            async def listening() -> None:
                while True:
                    try:
                        await http.get("/version")
                        return
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)

            await asyncio.wait_for(listening(), WAIT_S)
        middle.stdin.close()
        middle.wait()
        await until(lambda: not _alive(api_pid))
    finally:
        if _alive(api_pid):
            os.kill(api_pid, signal.SIGKILL)
        if middle.poll() is None:
            middle.kill()
            middle.wait()


async def _raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request, read to the server's close: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), WAIT_S)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.anyio
@pytest.mark.parametrize("http_protocol", [HTTP_PROTOCOL, openai_400_protocol(H11Protocol)],
                         ids=["auto", "h11"])
async def test_a_bad_content_length_gets_the_openai_json_400(http_protocol):
    """uvicorn's parser rejects these before any middleware runs; the answer is still the OpenAI error body."""
    app = FastAPI()
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=100)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    sock = bind_socket("127.0.0.1", 0)
    server = build_server(app, http=http_protocol)
    task = asyncio.create_task(serve(server, sock))
    try:
        await until(lambda: server.started or task.done())
        port = sock.getsockname()[1]
        for length in (b"abc", b"-3", b"+3", b"99999999999999999999999999"):
            request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\nabc"
            status, headers, body = await _raw_exchange(port, request)
            assert status == 400, length
            assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"}, length
            assert error["code"] == 400 and error["type"] == "BadRequestError", error
            assert "Content-Length" in error["message"], error  # the parser's own words name the bad header
        # A good request on the same server still works.
        status, _, body = await _raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                                    b"Connection: close\r\n\r\nabc")
        assert status == 200 and json.loads(body) == {"size": 3}
    finally:
        server.should_exit = True
        await task
        sock.close()
