"""The api's ZeroMQ side: tokenizers on our ROUTER, the scheduler's EngineStats on a DEALER.

    api_inbox[i] ROUTER (bound)  <- every tokenizer's DEALER: Heartbeat hello, BatchTextDelta/TextDelta,
                                    Tokenize/DetokenizeResponse
                                 -> one tokenizer by identity: GenerateRequest, AbortRequest, Tokenize/Detokenize
    scheduler ROUTER (connect)   <- EngineStats (every ENGINE_STATS_INTERVAL_S)
                                 -> Heartbeat(sender="api") every HEARTBEAT_INTERVAL_S (the first is our hello)
    (one DEALER per engine replica's scheduler with --data-parallel-size: the engine is alive while any
    replica's stats say it serves; the gauges are per replica)

A tokenizer is live while we heard from it within PEER_TIMEOUT_S; requests go round-robin to live ones and
stay with theirs for life. When one goes silent, every request it holds fails with a 503 (no request ever
waits on a dead peer; there is no other timeout, since long generations are legitimate).

Sends to tokenizers are synchronous and non-blocking (queues are unbounded, see common.transport.DEFAULT_HWM),
so they can be made from anywhere on the event loop, including a cancelled request's cleanup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from headrace.common import codec, transport
from headrace.common.addresses import AddressPlan, Endpoint
from headrace.common.codec import MessageDecodeError
from headrace.common.messages import (
    AbortRequest,
    BatchTextDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    EngineStats,
    ErrorInfo,
    GenerateRequest,
    Heartbeat,
    TextDelta,
    TokenizeRequest,
    TokenizeResponse,
)
from headrace.common.transport import HEARTBEAT_INTERVAL_S, PEER_TIMEOUT_S
from headrace.services.api.errors import ApiError
from headrace.services.api.records import HttpRequest, RequestRecord

# How long a request waits for a tokenizer to connect before a 503 (a restarted api, see wait_for_tokenizer):
# one peer timeout, the time a live tokenizer takes to be heard from at worst.
TOKENIZER_WAIT_S = PEER_TIMEOUT_S

log = logging.getLogger(__name__)


@dataclass
class _Peer:
    identity: bytes
    name: str
    last_seen: float


@dataclass
class _EngineLink:
    """One engine replica's scheduler, as this api hears it."""

    replica: int
    address: Endpoint
    dealer: zmq.asyncio.Socket | None = None
    stats: EngineStats | None = None
    stats_seen: float = 0.0
    alive: bool = False  # its last EngineStats said serving, recently, and its connection is open


class Generation:
    """The engine requests behind one HTTP request (n choices x prompts), multiplexed onto one queue.

    Iterating yields (choice index, TextDelta) until every choice has delivered its finished delta; a
    tokenizer that dies delivers an error delta for each choice it held.
    """

    def __init__(self, client: EngineClient, tokenizer: _Peer, requests: list[GenerateRequest], now: float,
                 http: HttpRequest = HttpRequest()):
        self._client = client
        self.tokenizer = tokenizer
        self.req_ids = [r.req_id for r in requests]
        self.records = [RequestRecord(r.req_id, arrival=now) for r in requests]
        self.http = http if http.n >= 1 and len(requests) % http.n == 0 else \
            HttpRequest(http.request_id, score_only=http.score_only)
        self._queue: asyncio.Queue[tuple[int, TextDelta]] = asyncio.Queue()
        self._unfinished = set(range(len(requests)))  # not yet finished as delivered by the engine
        self._unread = len(requests)  # finished deltas the consumer has not taken yet
        self.payloads: list[bytes] = []  # the encoded requests, to move them if their tokenizer dies unheard
        self.answered = False  # a delta arrived: the client may have seen output, so it can no longer move

    @property
    def finished(self) -> bool:
        """Every choice's last delta has been read."""
        return self._unread == 0

    async def next_batch(self) -> list[tuple[int, TextDelta]]:
        """At least one (index, delta), plus whatever else is already waiting."""
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        self._unread -= sum(delta.finished for _, delta in items)
        return items

    async def __aiter__(self) -> AsyncIterator[tuple[int, TextDelta]]:
        while not self.finished:
            for item in await self.next_batch():
                yield item

    def abort(self) -> None:
        """Stop every choice still running (client gone, or one choice failed). Safe to call twice."""
        self._client._abort(self)

    def _deliver(self, index: int, delta: TextDelta, now: float) -> None:
        if index not in self._unfinished:
            return
        self.answered = True
        self.records[index].on_delta(delta, now)
        if delta.finished:
            self._unfinished.discard(index)
        self._queue.put_nowait((index, delta))


class EngineClient:
    def __init__(self, api_index: int, inbox: Endpoint, scheduler: Endpoint | tuple[Endpoint, ...], *,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S, peer_timeout_s: float = PEER_TIMEOUT_S,
                 on_finished: Callable[[RequestRecord], None] | None = None,
                 on_generation_finished: Callable[[Generation], None] | None = None,
                 on_stats: Callable[[EngineStats], None] | None = None):
        self.api_index = api_index
        self._inbox_address = inbox
        schedulers = scheduler if isinstance(scheduler, tuple) else (scheduler,)
        self._links = [_EngineLink(d, address) for d, address in enumerate(schedulers)]
        self.heartbeat_interval_s = heartbeat_interval_s
        self.peer_timeout_s = peer_timeout_s
        # Called once per engine request when it finishes, fails or is aborted (the metrics hook).
        self.on_finished = on_finished or (lambda record: None)
        # Called once per Generation, after on_finished for each of its records (the metrics and request log).
        self.on_generation_finished = on_generation_finished or (lambda gen: None)
        # Called with every EngineStats the scheduler sends (the engine gauges).
        self.on_stats = on_stats or (lambda stats: None)

        self._sent_since_stats = 0  # engine requests this api sent after the last EngineStats was taken
        self._tokens_since_stats = 0  # and their prompt tokens, estimated (see estimated_tokens)
        self._peers: dict[bytes, _Peer] = {}
        self._peer_joined = asyncio.Event()  # set whenever a tokenizer says hello (see wait_for_tokenizer)
        self._round_robin = 0
        self._requests: dict[str, tuple[Generation, int]] = {}
        self._generations: set[Generation] = set()
        self._calls: dict[str, tuple[bytes, asyncio.Future[Any]]] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def from_plan(cls, plan: AddressPlan, api_index: int, **kwargs: Any) -> EngineClient:
        schedulers = tuple(r.scheduler for r in plan.replicas) or (plan.scheduler,)
        return cls(api_index, plan.api_inbox[api_index], schedulers, **kwargs)

    async def start(self) -> None:
        self._ctx = transport.async_context()
        self._router = transport.router_socket(self._ctx, self._inbox_address)
        # Unlike the engine's other ROUTERs: a send to an identity that is gone raises (our _send handles it),
        # so a request never goes to a tokenizer that has already disconnected.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for link in self._links:
            link.dealer = transport.dealer_socket(self._ctx, link.address, prefix=f"api{self.api_index}")
        self._tasks = [asyncio.create_task(coro) for coro in
                       (self._recv_tokenizers(), *(self._recv_scheduler(link) for link in self._links),
                        self._say_hello(), self._watch_peers(), self._watch_connections())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for gen in list(self._generations):
            self._fail(gen, ErrorInfo("the server is shutting down.", "ServiceUnavailableError", None, 503))
        for _, future in self._calls.values():
            if not future.done():
                future.set_exception(ApiError(503, "the server is shutting down."))
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def end_all(self, message: str) -> int:
        """Fail every request in flight with a 503 saying `message` (the end of a drain); how many there were."""
        error = ErrorInfo(message, "ServiceUnavailableError", None, 503)
        generations = list(self._generations)
        for gen in generations:
            self._fail(gen, error)
        return len(generations)

    # ------------------------------------------------------------------ state the routes read

    @property
    def stats(self) -> EngineStats | None:
        """The engine's last EngineStats; with several replicas, the serving ones' summed (their queues add up)."""
        got = [link.stats for link in self._links if link.stats is not None]
        if len(self._links) == 1 or not got:
            return got[0] if got else None
        alive = [link.stats for link in self._links if link.alive and link.stats is not None] or got
        return EngineStats(num_running=sum(st.num_running for st in alive),
                           num_waiting=sum(st.num_waiting for st in alive),
                           num_waiting_tokens=sum(st.num_waiting_tokens for st in alive),
                           serving=any(link.alive for link in self._links))

    @property
    def replica_stats(self) -> list[EngineStats | None]:
        return [link.stats for link in self._links]

    @property
    def num_replicas(self) -> int:
        return len(self._links)

    @property
    def num_serving_replicas(self) -> int:
        return sum(link.alive for link in self._links)

    @property
    def queued_estimate(self) -> int:
        """Engine requests waiting to start, as far as this api knows without asking: the scheduler's last
        count plus what this api sent since (other apis' recent requests show up with the next count)."""
        return (self.stats.num_waiting if self.stats is not None else 0) + self._sent_since_stats

    @property
    def queued_tokens_estimate(self) -> int:
        """Prompt tokens waiting to start, the same way: the scheduler's last count plus an estimate of what
        this api sent since (it has not been tokenized yet)."""
        return (self.stats.num_waiting_tokens if self.stats is not None else 0) + self._tokens_since_stats

    @property
    def engine_alive(self) -> bool:
        """EngineStats keeps arriving (the scheduler is up and its engine loaded), from at least one replica."""
        return any(link.alive for link in self._links)

    @property
    def num_live_tokenizers(self) -> int:
        return len(self._peers)

    @property
    def num_running(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ requests

    def submit(self, requests: list[GenerateRequest], http: HttpRequest = HttpRequest()) -> Generation:
        """Send every engine request of one HTTP request (`http`: its id and n, for metrics and the request
        log) to one live tokenizer."""
        payloads = [_encode(req) for req in requests]
        while True:
            peer = self._pick()
            gen = Generation(self, peer, requests, time.monotonic(), http)
            gen.payloads = payloads
            for k, req in enumerate(requests):
                self._requests[req.req_id] = (gen, k)
            self._generations.add(gen)
            try:
                for data in payloads:
                    self._send_bytes(peer, data)
                self._sent_since_stats += len(requests)
                self._tokens_since_stats += sum(estimated_tokens(req) for req in requests)
                return gen
            except _PeerGone:
                self._unregister(gen)  # it never started: retry the whole request on the next live tokenizer
                self._forget(peer, "it disconnected")

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        return await self._call(req.req_id, req)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        return await self._call(req.req_id, req)

    async def wait_for_tokenizer(self, timeout_s: float = TOKENIZER_WAIT_S) -> None:
        """Return once a tokenizer is connected, or after `timeout_s` (then `_pick` answers 503). The apis share
        one listening port, so an api restarted after a crash takes HTTP requests as soon as it binds, before
        any tokenizer has said hello to it; such a request waits for one instead of failing."""
        if self._peers:
            return
        self._peer_joined.clear()
        try:
            await asyncio.wait_for(self._peer_joined.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def _call(self, req_id: str, msg: Any) -> Any:
        await self.wait_for_tokenizer()
        data = _encode(msg)
        while True:
            peer = self._pick()
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._calls[req_id] = (peer.identity, future)
            try:
                self._send_bytes(peer, data)
            except _PeerGone:
                self._calls.pop(req_id, None)
                self._forget(peer, "it disconnected")
                continue
            try:
                return await future
            finally:
                self._calls.pop(req_id, None)

    def _pick(self) -> _Peer:
        peers = list(self._peers.values())
        if not peers:
            raise ApiError(503, "No tokenizer is available; the server is starting or recovering. Retry shortly.")
        self._round_robin = (self._round_robin + 1) % len(peers)
        return peers[self._round_robin]

    def _abort(self, gen: Generation) -> None:
        if not gen._unfinished:
            return  # every choice finished already
        now = time.monotonic()
        for k in sorted(gen._unfinished):
            req_id = gen.req_ids[k]
            self._requests.pop(req_id, None)
            gen.records[k].on_finish("abort", now)
            self.on_finished(gen.records[k])
            if gen.tokenizer.identity in self._peers:
                try:
                    self._send(gen.tokenizer, AbortRequest(req_id))
                except _PeerGone:
                    pass  # it is gone: nothing left to stop there
        gen._unfinished.clear()
        self._generations.discard(gen)
        self._generation_finished(gen)

    def _unregister(self, gen: Generation) -> None:
        for req_id in gen.req_ids:
            self._requests.pop(req_id, None)
        self._generations.discard(gen)

    def _fail(self, gen: Generation, error: ErrorInfo) -> None:
        now = time.monotonic()
        for k in sorted(gen._unfinished):
            self._deliver(gen, k, TextDelta(gen.req_ids[k], finished=True, finish_reason="error", error=error), now)

    def _deliver(self, gen: Generation, k: int, delta: TextDelta, now: float) -> None:
        gen._deliver(k, delta, now)
        if delta.finished:
            self._requests.pop(gen.req_ids[k], None)
            self.on_finished(gen.records[k])
            if not gen._unfinished:
                self._generations.discard(gen)
                self._generation_finished(gen)

    def _generation_finished(self, gen: Generation) -> None:
        try:
            self.on_generation_finished(gen)
        except Exception:  # metrics must never fail a request
            log.exception("api %d: the finished-request hook failed", self.api_index)

    # ------------------------------------------------------------------ sockets

    def _send(self, peer: _Peer, msg: Any) -> None:
        self._send_bytes(peer, _encode(msg))

    def _send_bytes(self, peer: _Peer, data: bytes) -> None:
        assert self._router is not None, "EngineClient.start() was not awaited"
        sent = self._router.send_multipart([peer.identity, data], flags=zmq.DONTWAIT)
        error = sent.exception() if sent.done() else None
        if isinstance(error, zmq.ZMQError) and error.errno == zmq.EHOSTUNREACH:
            raise _PeerGone()
        if error is not None:
            raise error

    async def _recv_tokenizers(self) -> None:
        assert self._router is not None
        while True:
            try:
                identity, msg = await transport.router_recv_async(self._router)
            except MessageDecodeError as e:
                log.warning("api %d: dropped a malformed message from a tokenizer: %s", self.api_index, e)
                continue
            now = time.monotonic()
            self._heard_from(identity, msg, now)
            try:
                self._dispatch(msg, now)
            except Exception:  # one bad message must not stop every request's deltas
                log.exception("api %d: failed on %s", self.api_index, type(msg).__name__)

    def _heard_from(self, identity: bytes, msg: Any, now: float) -> None:
        peer = self._peers.get(identity)
        if peer is None:
            index = msg.index if isinstance(msg, Heartbeat) else "?"
            name = f"tokenizer-{index} ({identity.decode('ascii', 'replace')})"
            peer = self._peers[identity] = _Peer(identity, name, now)
            self._peer_joined.set()
            log.info("api %d: %s connected", self.api_index, peer.name)
        peer.last_seen = now

    def _dispatch(self, msg: Any, now: float) -> None:
        if isinstance(msg, BatchTextDelta):
            for delta in msg.deltas:
                self._on_delta(delta, now)
        elif isinstance(msg, TextDelta):
            self._on_delta(msg, now)
        elif isinstance(msg, (TokenizeResponse, DetokenizeResponse)):
            call = self._calls.get(msg.req_id)
            if call is not None and not call[1].done():
                call[1].set_result(msg)
        elif not isinstance(msg, Heartbeat):
            log.warning("api %d: unexpected %s from a tokenizer", self.api_index, type(msg).__name__)

    def _on_delta(self, delta: TextDelta, now: float) -> None:
        entry = self._requests.get(delta.req_id)
        if entry is not None:  # else aborted or failed already; the tokenizer had it in flight
            self._deliver(entry[0], entry[1], delta, now)

    async def _recv_scheduler(self, link: _EngineLink) -> None:
        assert link.dealer is not None
        while True:
            try:
                msg = await transport.dealer_recv_async(link.dealer)
            except MessageDecodeError as e:
                log.warning("api %d: dropped a malformed message from the scheduler: %s", self.api_index, e)
                continue
            if isinstance(msg, EngineStats):
                link.stats, link.stats_seen, link.alive = msg, time.monotonic(), msg.serving
                self._sent_since_stats = self._tokens_since_stats = 0
                try:
                    self.on_stats(msg)
                except Exception:  # a metrics failure must not stop the engine's heartbeat
                    log.exception("api %d: the engine stats hook failed", self.api_index)

    async def _say_hello(self) -> None:
        while True:
            for link in self._links:
                assert link.dealer is not None
                await transport.dealer_send_async(link.dealer, Heartbeat("api", self.api_index, time.time()))
            await asyncio.sleep(self.heartbeat_interval_s)

    # ------------------------------------------------------------------ liveness

    async def _watch_peers(self) -> None:
        tick = min(self.heartbeat_interval_s, self.peer_timeout_s / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            stalled = now - last > 2 * tick + 0.1
            last = now
            if stalled:
                # Our own loop was busy: messages may be waiting unread. Judge peers on the next tick.
                continue
            for link in self._links:
                if link.alive and now - link.stats_seen > self.peer_timeout_s:
                    log.warning("api %d: no EngineStats from replica %d for %.1f s; it is unhealthy", self.api_index,
                                link.replica, now - link.stats_seen)
                    link.alive = False
            for peer in [p for p in self._peers.values() if now - p.last_seen > self.peer_timeout_s]:
                self._forget(peer, f"it sent nothing for {now - peer.last_seen:.1f} s")

    async def _watch_connections(self) -> None:
        """A peer process that dies closes its connection at once (see common.transport's monitors): the
        scheduler's makes /health 503 now; a tokenizer's makes us find which one is gone now (a send to it
        fails) rather than after PEER_TIMEOUT_S of silence."""
        assert self._router is not None
        engines = {transport.monitor_socket(link.dealer): link for link in self._links}
        tokenizers = transport.monitor_socket(self._router)
        poller = zmq.asyncio.Poller()
        for engine in engines:
            poller.register(engine, zmq.POLLIN)
        poller.register(tokenizers, zmq.POLLIN)
        while True:
            for sock, _ in await poller.poll():
                event = transport.monitor_events(await sock.recv_multipart())
                if event != zmq.EVENT_DISCONNECTED:
                    continue
                link = engines.get(sock)
                if link is not None and link.alive:
                    log.error("api %d: the scheduler's connection closed (replica %d); it is unhealthy",
                              self.api_index, link.replica)
                    link.alive = False
                elif sock is tokenizers:
                    await self._find_gone_tokenizers()

    async def _find_gone_tokenizers(self) -> None:
        """A tokenizer connection closed: the ROUTER drops that peer's identity once its own thread has seen the
        close, so a probe (a Heartbeat, which tokenizers ignore) to each peer fails for the gone one."""
        for delay in (0.0, 0.05, 0.25):
            await asyncio.sleep(delay)
            for peer in list(self._peers.values()):
                try:
                    self._send(peer, Heartbeat("api", self.api_index, time.time()))
                except _PeerGone:
                    self._forget(peer, "its connection closed")

    def _forget(self, peer: _Peer, why: str) -> None:
        """Stop routing to a tokenizer and fail every request it holds."""
        self._peers.pop(peer.identity, None)
        log.error("api %d: %s is gone (%s); failing its requests", self.api_index, peer.name, why)
        error = ErrorInfo(f"The tokenizer serving this request ({peer.name}) stopped responding ({why}); "
                          "the request was lost. Retry it.", "ServiceUnavailableError", None, 503)
        for gen in [g for g in self._generations if g.tokenizer.identity == peer.identity]:
            if not self._move(gen):
                self._fail(gen, error)
        for req_id, (identity, future) in list(self._calls.items()):
            if identity == peer.identity and not future.done():
                future.set_exception(ApiError.from_info(error))


    def _move(self, gen: Generation) -> bool:
        """Send a request whose tokenizer died before answering anything to a live one, ids unchanged (the
        scheduler drops the dead tokenizer's copy when the id comes back from another). False when it had
        answered already, or no tokenizer is left."""
        if gen.answered:
            return False
        while self._peers:
            peer = self._pick()
            try:
                for data in gen.payloads:
                    self._send_bytes(peer, data)
            except _PeerGone:
                self._forget(peer, "it disconnected")
                continue
            log.warning("api %d: moved %d requests from %s to %s", self.api_index, len(gen.req_ids),
                        gen.tokenizer.name, peer.name)
            gen.tokenizer = peer
            return True
        return False


def estimated_tokens(req: GenerateRequest) -> int:
    """A request's prompt tokens before the tokenizer has seen it: exact for token ids, else about one token
    per four bytes of text (what BPE vocabularies average on English)."""
    if req.prompt_token_ids is not None:
        return len(req.prompt_token_ids)
    text = req.prompt if req.prompt is not None else repr(req.messages)
    return max(1, len(text.encode("utf-8", "replace")) // 4)


def _encode(msg: Any) -> bytes:
    try:
        return codec.encode(msg)
    except (OverflowError, TypeError, ValueError) as e:  # e.g. a >64-bit integer inside chat messages
        raise ApiError(400, f"the request holds a value that cannot be encoded: {e}") from None


class _PeerGone(Exception):
    """The ROUTER no longer knows this identity (the tokenizer disconnected)."""
