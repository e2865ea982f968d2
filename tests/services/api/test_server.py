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

from headrace.common.addresses import address_plan
from headrace.common.config import EngineConfig
from headrace.services.api.server import bind_socket
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
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


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
