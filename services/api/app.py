"""The FastAPI app: OpenAI routes, /tokenize, /detokenize, /health, /version, /metrics, and the chat page at /.

Bodies are parsed here (not by FastAPI) so a body without a JSON content type still parses, and every
failure is one of our 400s. The EngineClient starts and stops with the app's lifespan. Routes find the
api's state (`ServingContext`, `Metrics`) on `request.app.state`, set once by `create_app`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from headrace.common.addresses import plan_for
from headrace.common.config import EngineConfig
from headrace.common.messages import DetokenizeRequest, TokenizeRequest
from headrace.common.version import VERSION
from headrace.services.api import errors, openapi, protocol
from headrace.services.api.chat_page import chat_page_routes
from headrace.services.api.engine_client import EngineClient
from headrace.services.api.errors import ApiError
from headrace.services.api.metrics import Metrics
from headrace.services.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, api_key_check
from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeBody, TokenizeBody
from headrace.services.api.records import HttpRequest
from headrace.services.api.sampling import check_model
from headrace.services.api.serving import ServingContext, create_chat_completion, create_completion

B = TypeVar("B", bound=BaseModel)


def create_app(config: EngineConfig, index: int = 0, client: EngineClient | None = None) -> FastAPI:
    """The app of api instance `index`; `client` defaults to one on the config's address plan."""
    model = config.require_resolved()
    if client is None:
        client = EngineClient.from_plan(plan_for(config), index)
    ctx = ServingContext(client=client, model_name=model.name, max_n=config.server.max_n,
                         max_model_len=model.max_model_len, model_root=config.model.model or model.name,
                         started=int(time.time()), max_num_queued_reqs=config.server.max_num_queued_reqs,
                         request_timeout=config.server.request_timeout,
                         enable_auto_tool_choice=config.server.enable_auto_tool_choice,
                         tool_call_parser=config.server.tool_call_parser,
                         reasoning_parser=config.server.reasoning_parser,
                         max_queued_tokens=config.server.max_queued_tokens,
                         max_seqs_per_request=config.server.max_seqs_per_request)
    metrics = Metrics(ctx.model_name, model.max_model_len)
    client.on_generation_finished = lambda gen: metrics.observe(gen.records, gen.http)
    client.on_stats = metrics.on_stats

    app = FastAPI(title="headrace", version=VERSION, lifespan=_client_lifespan(client))
    app.state.serving = ctx
    app.state.metrics = metrics
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.server.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: its header and 500 cover everything inside
    app.include_router(openai_routes, dependencies=[Depends(api_key_check(config.server.api_key))])
    app.include_router(operator_routes)
    app.include_router(chat_page_routes)
    openapi.install(app, [CompletionRequest, ChatCompletionRequest, TokenizeBody, DetokenizeBody])
    return app


def _client_lifespan(client: EngineClient) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            await client.close()

    return lifespan


def _serving(request: Request) -> ServingContext:
    return request.app.state.serving


# --------------------------------------------------------------------------- OpenAI routes (behind the API key)

openai_routes = APIRouter()


@openai_routes.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    ctx = _serving(request)
    return {"object": "list", "data": [{
        "id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "headrace",
        "root": ctx.model_root, "parent": None, "max_model_len": ctx.max_model_len}]}


@openai_routes.post("/v1/completions", openapi_extra=openapi.request_body(CompletionRequest))
async def completions(request: Request) -> Response:
    body = await _read(request, CompletionRequest)
    return await create_completion(_serving(request), body, request,
                                   _http_request(request, body.n, score_only=body.max_tokens == 0))


@openai_routes.post("/v1/chat/completions", openapi_extra=openapi.request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    body = await _read(request, ChatCompletionRequest)
    return await create_chat_completion(_serving(request), body, request, _http_request(request, body.n))


@openai_routes.post("/tokenize", openapi_extra=openapi.request_body(TokenizeBody))
async def tokenize(request: Request) -> dict[str, Any]:
    ctx = _serving(request)
    body = await _read(request, TokenizeBody)
    check_model(body.model, ctx.model_name)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "Give exactly one of `prompt` or `messages`.", param="prompt")
    messages = [m.to_wire() for m in body.messages] if body.messages is not None else None
    reply = await ctx.client.tokenize(TokenizeRequest(
        req_id=f"tok-{uuid.uuid4().hex}", prompt=body.prompt, messages=messages,
        add_special_tokens=body.add_special_tokens, add_generation_prompt=body.add_generation_prompt,
        return_token_strs=body.return_token_strs))
    if reply.error is not None:
        raise ApiError.from_info(reply.error)
    return {"count": len(reply.token_ids), "max_model_len": ctx.max_model_len,
            "tokens": reply.token_ids, "token_strs": reply.token_strs}


@openai_routes.post("/detokenize", openapi_extra=openapi.request_body(DetokenizeBody))
async def detokenize(request: Request) -> dict[str, Any]:
    ctx = _serving(request)
    body = await _read(request, DetokenizeBody)
    check_model(body.model, ctx.model_name)
    reply = await ctx.client.detokenize(DetokenizeRequest(req_id=f"detok-{uuid.uuid4().hex}",
                                                          token_ids=body.tokens))
    if reply.error is not None:
        raise ApiError.from_info(reply.error)
    return {"prompt": reply.text}


# --------------------------------------------------------------------------- operator routes (no API key)

operator_routes = APIRouter()
REPLICAS_HEADER = "X-Headrace-Replicas-Serving"


@operator_routes.get("/health")
async def health(request: Request) -> Response:
    client = _serving(request).client
    if not client.engine_alive:
        return ApiError(503, "The engine is not ready (loading, or not reporting).").response()
    if client.num_live_tokenizers == 0:
        return ApiError(503, "No tokenizer is connected.").response()
    # 200 while any replica serves; the header says how many of them do (the launcher waits for all at start).
    serving = f"{client.num_serving_replicas}/{client.num_replicas}"
    return Response(status_code=200, headers={REPLICAS_HEADER: serving})


@operator_routes.get("/version")
async def server_version() -> dict[str, str]:
    return {"version": VERSION}


@operator_routes.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


# --------------------------------------------------------------------------- bodies


def _http_request(request: Request, n: int, score_only: bool = False) -> HttpRequest:
    """What the engine client records about the HTTP request behind its engine requests."""
    return HttpRequest(getattr(request.state, "request_id", None), n, score_only)


async def _read(request: Request, model: type[B]) -> B:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ApiError(400, f"Malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if unexpected := protocol.unexpected_field(model, data):
        raise ApiError(400, unexpected[1], param=unexpected[0])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise errors.from_validation_errors(e.errors()) from None
