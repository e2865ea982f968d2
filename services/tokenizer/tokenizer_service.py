"""The tokenizer process: a pure client (it binds nothing) in one single-threaded loop.

Sockets: one DEALER to each engine replica's scheduler ROUTER (one unless --data-parallel-size), one SUB to
each replica's KV events (only with several replicas), and one DEALER per api ROUTER, so a reply to a request
goes back on the socket the request came in on, to the api that owns it. The DEALERs share one identity, fresh
for each process start: a restarted tokenizer is a new peer and the old one's requests are not confused
with its own. Every HEARTBEAT_INTERVAL_S it sends a `Heartbeat` on every socket; the first one is its hello
(a ROUTER learns a peer's identity from its first message).

In:  api -> GenerateRequest / AbortRequest / TokenizeRequest / DetokenizeRequest
     scheduler -> BatchRequestOutput, EngineStats (load and health, for the replica router)
     kv events -> KVEventBatch (which blocks each replica's prefix cache holds)
     either -> Shutdown
Out: scheduler <- TokenizedRequest, AbortRequest (client gone, a stop string matched, or outputs for a
                  request this process does not hold, e.g. from before a restart), Heartbeat
     api <- BatchTextDelta (one per step per api), TextDelta (errors), Tokenize/DetokenizeResponse, Heartbeat

Each request's detokenizer state lives here from its GenerateRequest until it finishes, so requests stick to
one tokenizer instance, and to the replica this tokenizer chose for it (services/tokenizer/replica_router.py):
its aborts go there. Bad input fails that request only; the loop never dies of a message. Only Shutdown or the
parent's death ends the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from headrace.common import transport
from headrace.common.addresses import AddressPlan, plan_for
from headrace.common.codec import MessageDecodeError
from headrace.common.config import EngineConfig
from headrace.common.error_types import error_type
from headrace.common.kv_events import KVEventDecodeError, decode_frames
from headrace.common.messages import (
    AbortRequest,
    BatchRequestOutput,
    BatchTextDelta,
    DetokenizeRequest,
    DetokenizeResponse,
    EngineStats,
    ErrorInfo,
    GenerateRequest,
    Heartbeat,
    RequestOutput,
    RequestTimings,
    Shutdown,
    TextDelta,
    TokenizedRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from headrace.common.process import freeze_startup_heap
from headrace.services.tokenizer.errors import RequestError
from headrace.services.tokenizer.grammar import GrammarBuilder
from headrace.services.tokenizer.replica_router import ReplicaRouter
from headrace.services.tokenizer.text_codec import OutputText, TextCodec

log = logging.getLogger(__name__)

# Messages taken from one socket per poll round: under a flood the loop still gets back to its heartbeat
# well inside PEER_TIMEOUT_S, and one busy api cannot starve the scheduler's outputs.
_RECV_BUDGET = 64


@dataclass
class _Request:
    api: int  # position of the api socket the request came in on; its outputs go back there
    output: OutputText
    num_prompt_tokens: int
    prompt_text: str | None  # sent once, on the first delta (echo)
    prompt_token_ids: list[int] | None = None  # kept only to name the tokens of prompt logprobs
    num_output_tokens: int = 0
    # The scheduler's prefill time and when its first-token output arrived here (time.time()): a request
    # this tokenizer ends on a stop string never gets the scheduler's finish, so its decode is timed here.
    prefill_time: float | None = None
    first_token_seen: float | None = None
    replica: int = 0  # the engine replica running it (its aborts go there)


class TokenizerService:
    def __init__(self, index: int, codec: TextCodec, plan: AddressPlan, *, identity: bytes | None = None,
                 heartbeat_interval_s: float = transport.HEARTBEAT_INTERVAL_S, router: ReplicaRouter | None = None):
        self.index = index  # for logs and heartbeats only: the identity is what routes
        self.codec = codec
        self.grammars = GrammarBuilder()
        self.requests: dict[str, _Request] = {}
        self.heartbeat_interval_s = heartbeat_interval_s

        self.identity = identity if identity is not None else transport.new_identity("tok")
        self.ctx = zmq.Context()
        replicas = plan.replicas or (None,)
        self.to_schedulers = [transport.dealer_socket(self.ctx, r.scheduler if r else plan.scheduler, self.identity)
                              for r in replicas]
        self.to_scheduler = self.to_schedulers[0]
        self.router = router if router is not None else ReplicaRouter(len(self.to_schedulers))
        self.to_api = [transport.dealer_socket(self.ctx, ep, self.identity) for ep in plan.api_inbox]
        # Which api a socket leads to (None: a scheduler, whose replica is replica_of[sock]).
        self.api_of: dict[zmq.Socket, int | None] = dict.fromkeys(self.to_schedulers)
        self.api_of.update({sock: i for i, sock in enumerate(self.to_api)})
        self.replica_of = {sock: d for d, sock in enumerate(self.to_schedulers)}
        self.poller = zmq.Poller()
        for sock in self.api_of:
            self.poller.register(sock, zmq.POLLIN)
        self.kv_events = {transport.sub_socket(self.ctx, r.kv_events): d
                          for d, r in enumerate(replicas) if r and r.kv_events}
        for sock in self.kv_events:
            self.poller.register(sock, zmq.POLLIN)
        # Connection monitors: a peer that dies closes its connection, which we hear at once (see on_peer_lost).
        self.monitor_of: dict[zmq.Socket, zmq.Socket] = {transport.monitor_socket(sock): sock for sock in self.api_of}
        for mon in self.monitor_of:
            self.poller.register(mon, zmq.POLLIN)
        self.running = True
        self.api_handlers: dict[type, Callable[[Any, int], None]] = {
            GenerateRequest: self.on_generate,
            AbortRequest: self.on_abort,
            TokenizeRequest: self.on_tokenize,
            DetokenizeRequest: self.on_detokenize,
        }

    # ------------------------------------------------------------------ loop

    def run(self, parent_pid: int | None = None) -> None:
        next_beat = 0.0  # the first heartbeat goes out at once: it is the hello
        while self.running:
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + self.heartbeat_interval_s
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.error("tokenizer %d: parent process died; exiting", self.index)
                    break
            wait_ms = math.ceil(max(0.0, next_beat - time.monotonic()) * 1000)
            for sock, _ in self.poller.poll(wait_ms):
                if sock in self.monitor_of:
                    self._on_connection_events(sock)
                    continue
                if sock in self.kv_events:
                    self._drain_kv_events(sock)
                    continue
                self._drain(sock)
                if not self.running:
                    break

    def heartbeat(self) -> None:
        beat = Heartbeat("tokenizer", self.index, time.time())
        for sock in self.api_of:
            transport.dealer_send(sock, beat)

    def _drain_kv_events(self, sock: zmq.Socket) -> None:
        for _ in range(_RECV_BUDGET):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.router.on_events(self.kv_events[sock], decode_frames(frames)[2])
            except KVEventDecodeError as e:
                log.warning("tokenizer %d: dropped a malformed KV event batch: %s", self.index, e)

    def _drain(self, sock: zmq.Socket) -> None:
        api = self.api_of[sock]
        for _ in range(_RECV_BUDGET):
            try:
                msg = transport.dealer_recv(sock, 0)
            except MessageDecodeError as e:
                log.warning("tokenizer %d: dropped a malformed message from %s: %s", self.index,
                            "the scheduler" if api is None else f"api {api}", e)
                continue
            if msg is None:
                return
            try:
                self._dispatch(msg, api, self.replica_of.get(sock, 0))
            except Exception:  # a bug on one message must not take every other request down
                log.exception("tokenizer %d: failed on %s", self.index, type(msg).__name__)
            if not self.running:
                return

    def _dispatch(self, msg: Any, api: int | None, replica: int = 0) -> None:
        kind = type(msg)
        if kind is Shutdown:
            self.on_shutdown(msg)
        elif kind is Heartbeat:
            pass
        elif api is None and kind is BatchRequestOutput:
            self.on_outputs(msg, replica)
        elif api is None and kind is EngineStats:
            self.router.on_stats(replica, msg)
        elif api is not None and kind in self.api_handlers:
            self.api_handlers[kind](msg, api)
        else:
            log.warning("tokenizer %d: unexpected %s from %s", self.index, kind.__name__,
                        "the scheduler" if api is None else f"api {api}")

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    # ------------------------------------------------------------------ peers that die

    def _on_connection_events(self, mon: zmq.Socket) -> None:
        if zmq.EVENT_DISCONNECTED in transport.drain_monitor(mon):
            sock = self.monitor_of[mon]
            api = self.api_of[sock]
            if api is None:
                self.on_scheduler_lost(self.replica_of[sock])
            else:
                self.on_api_lost(api)

    def on_scheduler_lost(self, replica: int = 0) -> None:
        """A scheduler's connection closed: it died (or stopped), and every request this tokenizer sent it
        died with it, KV cache included (its blocks lived in the workers under that scheduler's plan). Each
        fails now with a 503 that says so. The router sends no new request there until its scheduler reports
        serving again; with a single replica, requests that arrive from here on wait in the socket's queue and
        reach the restarted scheduler, which holds them until its workers are ready."""
        self.router.on_replica_lost(replica)
        lost = [req_id for req_id, state in self.requests.items() if state.replica == replica]
        if not lost:
            return
        log.error("tokenizer %d: the scheduler of replica %d is gone; failing its %d requests", self.index, replica,
                  len(lost))
        error = ErrorInfo("The scheduler serving this request died; the request's KV cache state was lost with "
                          "it. Retry the request.", "ServiceUnavailableError", None, 503)
        by_api: dict[int, list[TextDelta]] = {}
        for req_id in lost:
            state = self.requests.pop(req_id)
            by_api.setdefault(state.api, []).append(TextDelta(
                req_id, finished=True, finish_reason="error", error=error,
                num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens))
        for api, deltas in by_api.items():
            self._reply(api, BatchTextDelta(deltas))

    def on_api_lost(self, api: int) -> None:
        """The api at socket `api` went away: no client can read its requests any more, so they stop here
        and at the scheduler (freeing their KV blocks) instead of generating for nobody."""
        orphans = [req_id for req_id, state in self.requests.items() if state.api == api]
        if orphans:
            log.warning("tokenizer %d: api %d is gone; aborting its %d requests", self.index, api, len(orphans))
        for req_id in orphans:
            self._abort_at_engine(req_id, self.requests.pop(req_id).replica)

    def on_shutdown(self, msg: Shutdown) -> None:
        log.info("tokenizer %d: shutdown (%s)", self.index, msg.reason)
        self.running = False

    # ------------------------------------------------------------------ api -> scheduler

    def on_generate(self, req: GenerateRequest, api: int) -> None:
        codec = self.codec
        try:
            if req.req_id in self.requests:
                raise RequestError(f"duplicate request id {req.req_id!r}", "request_id")
            ids, text = codec.encode(req.prompt, req.prompt_token_ids, req.messages,
                                     add_special_tokens=req.add_special_tokens,
                                     add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     template_kwargs=_template_kwargs(req))
            codec.check_length(len(ids), req.sampling_params.max_tokens, "messages" if req.messages else "prompt")
            grammar = self.grammars.build(req.grammar) if req.grammar is not None else None
        except Exception as e:
            self._reply(api, TextDelta(req.req_id, finished=True, finish_reason="error",
                                       error=self._error(e, req.req_id)))
            return
        params = req.sampling_params
        prompt_text = (text if text is not None else codec.decode(ids)) if req.echo else None
        replica = self.router.pick(req.req_id, ids)
        self.requests[req.req_id] = _Request(api, codec.output_text(params, ids), len(ids), prompt_text,
                                             ids if params.prompt_logprobs is not None else None, replica=replica)
        transport.dealer_send(self.to_schedulers[replica],
                              TokenizedRequest(req.req_id, ids, params, req.arrival_time, grammar))

    def on_abort(self, msg: AbortRequest, api: int) -> None:
        state = self.requests.pop(msg.req_id, None)
        self.router.finished(msg.req_id)
        if state is not None:
            transport.dealer_send(self.to_schedulers[state.replica], msg)
            return
        for sock in self.to_schedulers:  # not ours (any more): wherever it may still run
            transport.dealer_send(sock, msg)

    def _abort_at_engine(self, req_id: str, replica: int) -> None:
        self.router.finished(req_id)
        transport.dealer_send(self.to_schedulers[replica], AbortRequest(req_id))

    # ------------------------------------------------------------------ scheduler -> api

    def on_outputs(self, batch: BatchRequestOutput, replica: int = 0) -> None:
        by_api: dict[int, list[TextDelta]] = {}
        for out in batch.outputs:
            state = self.requests.get(out.req_id)
            if state is None:
                # Aborted or stopped by a stop string here while the scheduler had it in flight (the abort is on
                # its way), or held by this tokenizer's previous life: abort again so its KV blocks are freed.
                if not out.finished:
                    self._abort_at_engine(out.req_id, replica)
                continue
            try:
                delta = self._delta(out, state)
            except Exception as e:  # fail this request, keep the batch
                log.exception("tokenizer %d: detokenizing %s failed", self.index, out.req_id)
                delta = TextDelta(out.req_id, finished=True, finish_reason="error",
                                  error=ErrorInfo(f"detokenization failed: {e}", "InternalServerError", None, 500))
                self._abort_at_engine(out.req_id, state.replica)
            if delta.finished:
                del self.requests[out.req_id]
                self.router.finished(out.req_id)
            elif out.new_token_ids:
                self.router.started(out.req_id)
            by_api.setdefault(state.api, []).append(delta)
        for api, deltas in by_api.items():
            self._reply(api, BatchTextDelta(deltas))

    def _delta(self, out: RequestOutput, state: _Request) -> TextDelta:
        text, stop_string, logprobs = state.output.update(out)
        finished, finish_reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
        timings = out.timings
        if timings is not None and timings.prefill is not None:  # the output with the first token
            state.prefill_time, state.first_token_seen = timings.prefill, time.time()
        if stop_string is not None:
            finished, finish_reason, stop_reason = True, "stop", stop_string
            if not out.finished:
                self._abort_at_engine(out.req_id, state.replica)
                timings = _timed_here(state, timings)
        state.num_output_tokens += len(out.new_token_ids)
        error = None
        if out.error:
            # The engine says whose fault it is: 400 for a request it cannot run (a token id outside the
            # vocabulary), 503 when a worker died; anything unlabelled is a server error.
            code = out.error_code or 500
            error = ErrorInfo(out.error, error_type(code), None, code)
            finished, finish_reason = True, finish_reason or "error"
        prompt_text, state.prompt_text = state.prompt_text, None
        prompt_logprobs = None
        if out.prompt_logprobs is not None and state.prompt_token_ids is not None:
            prompt_logprobs = self.codec.prompt_logprobs_text(state.prompt_token_ids, out.prompt_logprobs)
        return TextDelta(
            req_id=out.req_id, text=text, token_ids=out.new_token_ids, logprobs=logprobs,
            finished=finished, finish_reason=finish_reason, stop_reason=stop_reason,
            num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens,
            num_cached_tokens=out.num_cached_tokens, prompt_text=prompt_text, error=error,
            timings=timings, num_preemptions=out.num_preemptions, prompt_logprobs=prompt_logprobs)

    # ------------------------------------------------------------------ /tokenize, /detokenize

    def on_tokenize(self, req: TokenizeRequest, api: int) -> None:
        try:
            ids, _ = self.codec.encode(req.prompt, None, req.messages, add_special_tokens=req.add_special_tokens,
                                       add_generation_prompt=req.add_generation_prompt)
            strs = self.codec.token_strs(ids) if req.return_token_strs else None
        except Exception as e:
            self._reply(api, TokenizeResponse(req.req_id, error=self._error(e, req.req_id)))
            return
        self._reply(api, TokenizeResponse(req.req_id, ids, strs))

    def on_detokenize(self, req: DetokenizeRequest, api: int) -> None:
        try:
            text = self.codec.decode(self.codec.check_ids(req.token_ids, "tokens"))
        except Exception as e:
            self._reply(api, DetokenizeResponse(req.req_id, error=self._error(e, req.req_id)))
            return
        self._reply(api, DetokenizeResponse(req.req_id, text))

    # ------------------------------------------------------------------ helpers

    def _error(self, e: Exception, req_id: str) -> ErrorInfo:
        """The request's fault (400 with the param) or ours (500, logged); either way the api gets an answer."""
        if isinstance(e, RequestError):
            return e.info()
        log.exception("tokenizer %d: request %s failed", self.index, req_id)
        return ErrorInfo(f"tokenizer failed: {type(e).__name__}: {e}", "InternalServerError", None, 500)

    def _reply(self, api: int, msg: Any) -> None:
        transport.dealer_send(self.to_api[api], msg)


def _template_kwargs(req: GenerateRequest) -> dict[str, Any] | None:
    """The request's chat_template_kwargs, plus its `tools` (templates render them into the prompt)."""
    if not req.tools:
        return req.chat_template_kwargs
    return {**(req.chat_template_kwargs or {}), "tools": req.tools}


def _timed_here(state: _Request, timings: RequestTimings | None) -> RequestTimings | None:
    """The timings of a request this tokenizer ends on a stop string: the scheduler never times its finish,
    so its decode runs from the first token's output arriving here until now."""
    if state.first_token_seen is None:
        return timings
    decode = time.time() - state.first_token_seen
    merged = RequestTimings() if timings is None else dataclasses.replace(timings)
    merged.update(RequestTimings(decode=decode, inference=state.prefill_time + decode))
    return merged


def main(config_dict: dict[str, Any], index: int) -> None:
    """Process entrypoint for the launcher: `main(config.to_dict(), index)`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tokenizer-{index} %(levelname)s %(message)s")
    config = EngineConfig.from_dict(config_dict)
    model = config.require_resolved()
    codec = TextCodec.load(model.tokenizer_dir, config.model.chat_template, model.max_model_len)
    GrammarBuilder.warm_up()
    parallel = config.parallel
    router = ReplicaRouter(parallel.data_parallel_size, parallel.dp_routing,
                           config.cache.block_size if config.cache.enable_prefix_caching else None,
                           config.scheduler.max_num_batched_tokens or 0)
    service = TokenizerService(index, codec, plan_for(config), router=router)
    log.info("tokenizer %d ready as %r", index, service.identity)
    freeze_startup_heap()
    try:
        service.run(parent_pid=os.getppid())
    finally:
        service.close()
