"""The FastAPI app: OpenAI routes, /tokenize, /detokenize, /health, /version, /metrics.

Bodies are parsed here (not by FastAPI) so a body without a JSON content type still parses, and every
failure is one of our 400s. The EngineClient starts and stops with the app's lifespan.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from headrace.common.addresses import address_plan
from headrace.common.config import EngineConfig
from headrace.common.messages import DetokenizeRequest, TokenizeRequest
from headrace.services.api import errors
from headrace.services.api.engine_client import EngineClient, current_http_request
from headrace.services.api.errors import ApiError
from headrace.services.api.metrics import Metrics
from headrace.services.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, api_key_check
from headrace.services.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeBody, TokenizeBody
from headrace.services.api.records import HttpRequest
from headrace.services.api.sampling import check_model, served_model_name
from headrace.services.api.serving import ServingContext, create_chat_completion, create_completion

B = TypeVar("B", bound=BaseModel)

try:
    VERSION = version("headrace")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+unknown"


def create_app(config: EngineConfig, index: int = 0, client: EngineClient | None = None) -> FastAPI:
    """The app of api instance `index`; `client` defaults to one on the config's address plan."""
    if client is None:
        client = EngineClient.from_plan(address_plan(config.server), index)
    ctx = ServingContext(client=client, api_index=index, model_name=served_model_name(config.model),
                         max_n=config.server.max_n)
    started = int(time.time())
    metrics = Metrics(ctx.model_name, config.model.max_model_len)
    client.on_generation_finished = lambda gen: metrics.observe(gen.records, gen.http)
    client.on_stats = metrics.on_stats

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="headrace", version=VERSION, lifespan=lifespan)
    app.state.serving = ctx
    app.state.metrics = metrics
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.server.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: its header and 500 cover everything inside

    v1 = APIRouter(dependencies=[Depends(api_key_check(config.server.api_key))])

    @v1.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": ctx.model_name, "object": "model", "created": started, "owned_by": "headrace",
            "root": config.model.model or ctx.model_name, "parent": None,
            "max_model_len": config.model.max_model_len}]}

    @v1.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _read(request, CompletionRequest)
        _name_request(request, body.n)
        return await create_completion(ctx, body, request)

    @v1.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read(request, ChatCompletionRequest)
        _name_request(request, body.n)
        return await create_chat_completion(ctx, body, request)

    @v1.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _read(request, TokenizeBody)
        check_model(body.model, ctx.model_name)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "Give exactly one of `prompt` or `messages`.", param="prompt")
        messages = [m.to_wire() for m in body.messages] if body.messages is not None else None
        reply = await client.tokenize(TokenizeRequest(
            req_id=f"tok-{uuid.uuid4().hex}", api_index=index, prompt=body.prompt, messages=messages,
            add_special_tokens=body.add_special_tokens, add_generation_prompt=body.add_generation_prompt,
            return_token_strs=body.return_token_strs))
        if reply.error is not None:
            raise ApiError.from_info(reply.error)
        return {"count": len(reply.token_ids), "max_model_len": config.model.max_model_len,
                "tokens": reply.token_ids, "token_strs": reply.token_strs}

    @v1.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _read(request, DetokenizeBody)
        check_model(body.model, ctx.model_name)
        reply = await client.detokenize(DetokenizeRequest(req_id=f"detok-{uuid.uuid4().hex}", api_index=index,
                                                          token_ids=body.tokens))
        if reply.error is not None:
            raise ApiError.from_info(reply.error)
        return {"prompt": reply.text}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if not client.engine_alive:
            return ApiError(503, "The engine is not ready (loading, or not reporting).").response()
        if client.num_live_tokenizers == 0:
            return ApiError(503, "No tokenizer is connected.").response()
        return Response(status_code=200)

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _name_request(request: Request, n: int) -> None:
    """Tell the engine client which HTTP request its next submit() serves (see current_http_request)."""
    current_http_request.set(HttpRequest(getattr(request.state, "request_id", None), n))


async def _read(request: Request, model: type[B]) -> B:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ApiError(400, f"Malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise errors.from_validation_errors(e.errors()) from None
