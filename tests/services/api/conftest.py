"""An api instance served by real uvicorn on 127.0.0.1, with tokenizers and a scheduler played by the test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from headrace.common.addresses import address_plan
from headrace.services.api.app import create_app
from headrace.services.api.engine_client import EngineClient
from headrace.services.api.server import bind_socket, build_server, serve
from tests.services.api.fakes import FakeScheduler, FakeTokenizer, Script, api_config, until

# Short liveness so "a tokenizer went silent" takes about a second, not three.
PEER_TIMEOUT_S = 1.0


@pytest.fixture
def anyio_backend():
    return "asyncio"


@dataclasses.dataclass
class Stack:
    http: httpx.AsyncClient
    client: EngineClient
    scheduler: FakeScheduler
    inbox: str
    tokenizers: list[FakeTokenizer]

    async def add_tokenizer(self, script: Script | None = None) -> FakeTokenizer:
        tok = await FakeTokenizer(self.inbox, index=len(self.tokenizers), script=script).start()
        self.tokenizers.append(tok)
        await until(lambda: self.client.num_live_tokenizers == sum(not t.silent for t in self.tokenizers))
        return tok

    async def ready(self) -> None:
        """Engine stats flowing: /health can answer 200."""
        self.scheduler.sending = True
        await until(lambda: self.client.engine_alive)


@contextlib.asynccontextmanager
async def running_stack(tmp_path, **server: object) -> AsyncIterator[Stack]:
    config = api_config(ipc_dir=str(tmp_path), **server)
    plan = address_plan(config.server)
    client = EngineClient.from_plan(plan, 0, heartbeat_interval_s=0.1, peer_timeout_s=PEER_TIMEOUT_S)
    scheduler = await FakeScheduler(plan.scheduler.bind).start()
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server_ = build_server(create_app(config, 0, client))
    task = asyncio.create_task(serve(server_, sock))
    stack = Stack(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30), client, scheduler,
                  plan.api_inbox[0].connect, [])
    try:
        await until(lambda: server_.started or task.done())
        yield stack
    finally:
        await stack.http.aclose()
        for tok in stack.tokenizers:
            await tok.close()
        server_.should_exit = True
        await task
        await scheduler.close()
        sock.close()


@pytest.fixture
async def stack(tmp_path) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path) as s:
        yield s


@pytest.fixture
def make_stack(tmp_path) -> Callable[..., contextlib.AbstractAsyncContextManager[Stack]]:
    """A stack with other server settings (api key, limits)."""
    return lambda **server: running_stack(tmp_path, **server)
