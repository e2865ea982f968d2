"""Completions and chat completions: fan a request out into engine requests, then answer with one JSON body
or a stream of SSE chunks.

Streams hold their headers until the first delta arrives, so a request the tokenizer rejects (prompt too
long, bad template) still gets its real HTTP status; failures after that become an SSE error event.
A client that goes away (or a cancelled request) aborts every engine request it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from headrace.common.messages import GenerateRequest, GrammarSpec, TextDelta
from headrace.services.api.engine_client import EngineClient, Generation, estimated_tokens
from headrace.services.api.errors import ApiError
from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest
from headrace.services.api.records import HttpRequest
from headrace.services.api.responses import ChatShape, ChoiceState, CompletionShape, Shape
from headrace.services.api.sampling import (
    chat_params,
    check_model,
    choice_params,
    completion_params,
    completion_prompts,
)
from headrace.services.api.structured import grammar_spec
from headrace.services.api.tools import ToolPlan, tool_plan
from headrace.services.api.streaming import DONE, SSEResponse, sse, sse_error

log = logging.getLogger(__name__)

T = TypeVar("T")
# Answered (never seen) when the client left before its response was ready; nginx's "client closed request".
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class ServingContext:
    """What the routes of one api instance share."""

    client: EngineClient
    model_name: str  # the name requests must use (the resolved served model name)
    max_n: int
    max_model_len: int
    model_root: str  # /v1/models' `root`: the --model the server was started with
    started: int  # unix seconds, /v1/models' `created`
    max_num_queued_reqs: int | None = None  # --max-num-queued-reqs: beyond it, 429
    max_queued_tokens: int | None = None  # --max-queued-tokens: beyond it, 429
    max_seqs_per_request: int = 256  # --max-seqs-per-request: beyond it, 400
    request_timeout: float | None = None  # --request-timeout, seconds
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    tool_call_parser: str | None = None  # --tool-call-parser
    reasoning_parser: str | None = None  # --reasoning-parser


class ClientDisconnected(Exception):
    pass


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request,
                            http: HttpRequest) -> Response:
    check_model(body.model, ctx.model_name)
    params = completion_params(body, ctx.max_n)
    prompts = completion_prompts(body)
    grammar = grammar_spec(body)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    now = time.time()
    engine_requests = [
        GenerateRequest(req_id=f"{request_id}-{p * params.n + k}", sampling_params=choice_params(params, k),
                        prompt=prompt if isinstance(prompt, str) else None,
                        prompt_token_ids=prompt if isinstance(prompt, list) else None,
                        echo=body.echo, arrival_time=now, grammar=grammar)
        for p, prompt in enumerate(prompts) for k in range(params.n)]
    shape = CompletionShape(request_id, int(now), ctx.model_name, logprobs=params.logprobs,
                            include_usage=body.include_usage, echo=body.echo, prompt_logprobs=body.prompt_logprobs,
                            score_only=body.max_tokens == 0)
    return await _generate(ctx, engine_requests, shape, http, bool(body.stream), request)


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request,
                                 http: HttpRequest) -> Response:
    check_model(body.model, ctx.model_name)
    params = chat_params(body, ctx.max_n)
    tools = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, ctx.enable_auto_tool_choice,
                      ctx.tool_call_parser)
    grammar = _chat_grammar(body, tools)
    if tools is not None and tools.mode == "auto" and tools.parser in ("mistral", "llama3_json"):
        params = params.replace(skip_special_tokens=False)  # their calls open with a special token
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    now = time.time()
    messages = [m.to_wire() for m in body.messages]
    engine_requests = [
        GenerateRequest(req_id=f"{request_id}-{k}", sampling_params=choice_params(params, k), messages=messages,
                        add_generation_prompt=body.add_generation_prompt,
                        continue_final_message=body.continue_final_message,
                        chat_template_kwargs=body.chat_template_kwargs, arrival_time=now, grammar=grammar,
                        tools=body.tools if tools is not None else None)
        for k in range(params.n)]
    shape = ChatShape(request_id, int(now), ctx.model_name, logprobs=params.logprobs is not None,
                      include_usage=body.include_usage, tools=tools, reasoning_parser=ctx.reasoning_parser)
    return await _generate(ctx, engine_requests, shape, http, bool(body.stream), request)


def _chat_grammar(body: ChatCompletionRequest, tools: ToolPlan | None) -> GrammarSpec | None:
    """The request's output constraint: its response format, or the one a required / named tool call needs."""
    grammar = grammar_spec(body)
    forced = tools.grammar() if tools is not None else None
    if forced is not None and grammar is not None:
        raise ApiError(400, f"tool_choice {body.tool_choice!r} and '{grammar.param}' both constrain the output; "
                            "send one.", param="tool_choice")
    return forced or grammar


async def _generate(ctx: ServingContext, engine_requests: list[GenerateRequest], shape: Shape, http: HttpRequest,
                    stream: bool, request: Request) -> Response:
    n = http.n
    deadline = request_deadline(ctx.request_timeout, request)
    _admit(ctx, engine_requests)
    await ctx.client.wait_for_tokenizer()
    gen = ctx.client.submit(engine_requests, http)
    states = [ChoiceState(k) for k in range(len(engine_requests))]
    streaming = False
    try:
        if stream:
            first = await unless_disconnected(before(deadline, gen.next_batch()), request)
            _raise_first_error(first)
            response = SSEResponse(_events(gen, shape, states, n, first, deadline), on_close=gen.abort)
            streaming = True  # from here on the response aborts whatever is left when it closes
            return response
        await unless_disconnected(before(deadline, _collect(gen, shape, states)), request)
        return JSONResponse(shape.response(states, n))
    except ClientDisconnected:
        log.info("client left before %s finished; aborted", shape.request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not streaming:
            gen.abort()  # a no-op once every choice finished


def request_deadline(server_timeout: float | None, request: Request) -> float | None:
    """The monotonic time the request must be done by: the X-Request-Timeout header (seconds) or the
    server's --request-timeout, whichever is sooner; None when neither is set."""
    timeouts = [] if server_timeout is None else [server_timeout]
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            seconds = float(header)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            raise ApiError(400, "X-Request-Timeout must be a positive number of seconds.", param="X-Request-Timeout")
        timeouts.append(seconds)
    return time.monotonic() + min(timeouts) if timeouts else None


async def before(deadline: float | None, work: Awaitable[T]) -> T:
    """Await `work`; past `deadline` cancel it and raise a 408 (the caller's cleanup aborts the request)."""
    if deadline is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise ApiError(408, "The request did not finish within its time limit and was aborted.") from None


def _admit(ctx: ServingContext, engine_requests: list[GenerateRequest]) -> None:
    """Overload control: refuse at once, before any engine work, a request that would start more sequences
    than one request may (400), or when the queue is past its bound in requests or tokens (429)."""
    count = len(engine_requests)
    if count > ctx.max_seqs_per_request:
        raise ApiError(400, f"This request would start {count} sequences (prompts x n); at most "
                            f"{ctx.max_seqs_per_request} are allowed per request. Split it.", param="n")
    limit = ctx.max_num_queued_reqs
    if limit is not None and ctx.client.queued_estimate + count > limit:
        raise ApiError(429, f"The server is busy: about {ctx.client.queued_estimate} requests are waiting to "
                            f"start (at most {limit}). Retry later.", headers={"Retry-After": "1"})
    limit = ctx.max_queued_tokens
    queued = ctx.client.queued_tokens_estimate
    if limit is not None and queued > 0 and queued + sum(map(estimated_tokens, engine_requests)) > limit:
        raise ApiError(429, f"The server is busy: about {queued} prompt tokens are waiting to start (at most "
                            f"{limit}). Retry later.", headers={"Retry-After": "1"})


async def _collect(gen: Generation, shape: Shape, states: list[ChoiceState]) -> None:
    async for index, delta in gen:
        if delta.error is not None:
            raise ApiError.from_info(delta.error)
        states[index].add(shape.view(delta))


def _raise_first_error(batch: list[tuple[int, TextDelta]]) -> None:
    for _, delta in batch:
        if delta.error is not None:
            raise ApiError.from_info(delta.error)


async def _events(gen: Generation, shape: Shape, states: list[ChoiceState], n: int,
                  batch: list[tuple[int, TextDelta]], deadline: float | None = None) -> AsyncIterator[str]:
    out = [sse(chunk) for chunk in shape.start_chunks(len(states))]
    while True:
        for index, delta in batch:
            if delta.error is not None:
                gen.abort()
                yield "".join(out) + sse_error(ApiError.from_info(delta.error)) + DONE
                return
            delta = shape.view(delta)
            text = states[index].add(delta)
            out.extend(sse(chunk) for chunk in shape.delta_chunks(states[index], text, delta))
        if out:
            yield "".join(out)  # one write per wake-up, however many deltas arrived together
            out = []
        if gen.finished:
            break
        try:
            batch = await before(deadline, gen.next_batch())
        except ApiError as timeout:  # the deadline passed mid-stream: say so, and the close aborts the rest
            gen.abort()
            yield sse_error(timeout) + DONE
            return
    if shape.include_usage:
        out.append(sse(shape.usage_chunk(states, n)))
    yield "".join(out) + DONE


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`, or raise ClientDisconnected as soon as the client hangs up (the body is read by now, so
    the next ASGI message can only be the disconnect)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
