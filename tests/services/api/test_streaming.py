"""SSE framing, and the stream's cleanup however it ends."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.testclient import TestClient

from headrace.services.api.errors import ApiError
from headrace.services.api.streaming import DONE, SSEResponse, sse, sse_error


def test_sse_framing():
    assert sse({"a": "é", "b": [1]}) == 'data: {"a":"é","b":[1]}\n\n'
    assert DONE == "data: [DONE]\n\n"
    frame = sse_error(ApiError(503, "gone"))
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    assert json.loads(frame[6:])["error"] == {"message": "gone", "type": "ServiceUnavailableError", "param": None,
                                              "code": 503}


def test_sse_response_streams_and_cleans_up_once_done_or_failed():
    closed: list[str] = []
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> SSEResponse:
        async def events():
            yield sse({"n": 1})
            yield DONE

        return SSEResponse(events(), on_close=lambda: closed.append("ok"))

    @app.get("/broken")
    async def broken() -> SSEResponse:
        async def events():
            yield sse({"n": 1})
            raise RuntimeError("mid-stream bug")

        return SSEResponse(events(), on_close=lambda: closed.append("broken"))

    http = TestClient(app, raise_server_exceptions=False)
    r = http.get("/ok")
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["cache-control"] == "no-cache"
    assert r.text == 'data: {"n":1}\n\ndata: [DONE]\n\n'
    http.get("/broken")
    assert closed == ["ok", "broken"]
