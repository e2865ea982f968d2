"""Peers of the api played by the tests over real ipc:// sockets: tokenizers (DEALERs on the api's ROUTER)
and the scheduler (a ROUTER that answers the api's hello with EngineStats)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from headrace.common import transport
from headrace.common.config import EngineConfig, ResolvedModel, ServerConfig
from headrace.common.messages import (
    AbortRequest,
    BatchTextDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    EngineStats,
    GenerateRequest,
    Heartbeat,
    TextDelta,
    TokenizeRequest,
    TokenizeResponse,
)

WAIT_S = 20.0  # a guard against hangs only; nothing is asserted about time

# The model an api under test serves (its tokenizers and scheduler are played by the test): the embedded one.
SERVED = ResolvedModel(kind="hf", name="SmolLM2-135M-Instruct", weights_dir=None, tokenizer_dir="", preset=None,
                       max_model_len=8192, eos_token_ids=(2,), vocab_size=49152)


def api_config(**server: Any) -> EngineConfig:
    """A resolved config for an api whose peers are fakes; `server` sets ServerConfig fields."""
    return EngineConfig(server=ServerConfig(**server), resolved=SERVED)

# A script maps a GenerateRequest to the BatchTextDelta batches to answer with (None: the test answers itself).
Script = Callable[[GenerateRequest], list[list[TextDelta]] | None]


def words(*texts: str, finish_reason: str = "length", prompt_tokens: int = 3, stop_reason: Any = None) -> Script:
    """Answer every request with one delta per text, one token each, the last one finishing."""

    def script(req: GenerateRequest) -> list[list[TextDelta]]:
        return [[delta(req.req_id, text, k, len(texts), finish_reason, prompt_tokens, stop_reason)]
                for k, text in enumerate(texts)]

    return script


def delta(req_id: str, text: str, k: int, total: int, finish_reason: str = "length", prompt_tokens: int = 3,
          stop_reason: Any = None, **extra: Any) -> TextDelta:
    last = k == total - 1
    return TextDelta(req_id, text=text, token_ids=[100 + k], finished=last,
                     finish_reason=finish_reason if last else None, stop_reason=stop_reason if last else None,
                     num_prompt_tokens=prompt_tokens, num_output_tokens=k + 1, **extra)


class _AsyncPeer:
    """A peer that runs a few background tasks on its own zmq context; close() stops both."""

    _tasks: list[asyncio.Task[None]]
    _ctx: Any

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ctx.destroy(linger=0)


class FakeTokenizer(_AsyncPeer):
    def __init__(self, address: str, index: int = 0, script: Script | None = None, heartbeat_s: float = 0.1):
        self.address, self.index, self.script, self.heartbeat_s = address, index, script, heartbeat_s
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.silent = False
        self._new_request = asyncio.Event()
        self._new_abort = asyncio.Event()
        self._ctx = transport.async_context()
        self._sock = transport.dealer_socket(self._ctx, address, prefix="tok")
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> FakeTokenizer:
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._serve())]
        return self


    async def send(self, msg: Any) -> None:
        await transport.dealer_send_async(self._sock, msg)

    async def next_request(self, count: int = 1) -> list[GenerateRequest]:
        """Wait until at least `count` GenerateRequests arrived in total; return them all."""
        while len(self.requests) < count:
            self._new_request.clear()
            await asyncio.wait_for(self._new_request.wait(), WAIT_S)
        return self.requests

    async def wait_aborted(self, count: int = 1) -> list[str]:
        while len(self.aborted) < count:
            self._new_abort.clear()
            await asyncio.wait_for(self._new_abort.wait(), WAIT_S)
        return self.aborted

    async def _heartbeat(self) -> None:
        while True:
            if not self.silent:
                await self.send(Heartbeat(sender="tokenizer", index=self.index))
            await asyncio.sleep(self.heartbeat_s)

    async def _serve(self) -> None:
        while True:
            msg = await transport.dealer_recv_async(self._sock)
            if isinstance(msg, AbortRequest):
                self.aborted.append(msg.req_id)
                self._new_abort.set()
            elif self.silent:
                continue
            elif isinstance(msg, GenerateRequest):
                self.requests.append(msg)
                self._new_request.set()
                for batch in (self.script(msg) if self.script else None) or []:
                    await self.send(BatchTextDelta(batch))
            elif isinstance(msg, TokenizeRequest):
                text = msg.prompt if msg.prompt is not None else " ".join(str(m["content"]) for m in msg.messages)
                ids = [len(word) for word in text.split()]
                strs = text.split() if msg.return_token_strs else None
                await self.send(TokenizeResponse(msg.req_id, ids, strs))
            elif isinstance(msg, DetokenizeRequest):
                await self.send(DetokenizeResponse(msg.req_id, "-".join(map(str, msg.token_ids))))


class FakeScheduler(_AsyncPeer):
    """Binds the scheduler ROUTER; while `sending`, sends EngineStats to every api that said hello."""

    def __init__(self, address: str, interval_s: float = 0.1, replica: int = 0):
        self.address, self.interval_s = address, interval_s
        self.replica = replica  # the data-parallel rank its stats carry
        self.hellos: list[Heartbeat] = []
        self.sending = False
        self.waiting = 0  # the num_waiting gauge it reports
        self.waiting_tokens = 0  # and num_waiting_tokens
        self.serving = True  # and whether the engine can run requests
        self._apis: set[bytes] = set()
        self._ctx = transport.async_context()
        self._sock = transport.router_socket(self._ctx, address)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> FakeScheduler:
        self._tasks = [asyncio.create_task(self._recv()), asyncio.create_task(self._stats())]
        return self


    async def _recv(self) -> None:
        while True:
            identity, msg = await transport.router_recv_async(self._sock)
            if isinstance(msg, Heartbeat):
                self.hellos.append(msg)
                self._apis.add(identity)

    async def _stats(self) -> None:
        while True:
            if self.sending:
                for identity in self._apis:
                    stats = EngineStats(num_running=1, num_waiting=self.waiting, prefix_cache_queries=40,
                                        prefix_cache_hits=16, serving=self.serving,
                                        num_waiting_tokens=self.waiting_tokens, data_parallel_rank=self.replica)
                    await transport.router_send_async(self._sock, identity, stats)
            await asyncio.sleep(self.interval_s)


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds (bounded by WAIT_S so a broken test fails instead of hanging)."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), WAIT_S)
