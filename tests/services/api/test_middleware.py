"""X-Request-Id, the body limit, the last-resort 500 and the API key, on a small app of their own."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from headrace.services.api import errors
from headrace.services.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, api_key_check


@pytest.fixture
def http():
    app = FastAPI()
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=10)
    app.add_middleware(RequestIdMiddleware)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body()), "request_id": request.state.request_id}

    @app.get("/bug")
    async def bug() -> dict:
        raise RuntimeError("a bug")

    @app.get("/secret", dependencies=[Depends(api_key_check("k"))])
    async def secret() -> dict:
        return {}

    @app.get("/open", dependencies=[Depends(api_key_check(None))])
    async def open_() -> dict:
        return {}

    return TestClient(app, raise_server_exceptions=False)


def test_request_id_reaches_the_route_and_the_response(http):
    r = http.post("/echo", content=b"12345", headers={"X-Request-Id": "client-1"})
    assert r.json() == {"size": 5, "request_id": "client-1"} and r.headers["x-request-id"] == "client-1"
    r = http.post("/echo", content=b"1", headers={"X-Request-Id": "has space"})  # unsafe: replaced
    assert r.headers["x-request-id"] != "has space" and r.headers["x-request-id"] == r.json()["request_id"]


def test_unhandled_errors_become_a_500_body_with_the_request_id(http):
    r = http.get("/bug", headers={"X-Request-Id": "q"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "q"
    assert r.json()["error"]["type"] == "InternalServerError" and "a bug" not in r.text


def test_body_limit(http):
    assert http.post("/echo", content=b"x" * 10).json()["size"] == 10
    assert http.post("/echo", content=b"x" * 11).status_code == 413
    assert http.post("/echo", content=iter([b"x" * 6, b"x" * 6])).status_code == 413  # chunked, no length
    r = http.post("/echo", content=b"x", headers={"Content-Length": "-3"})
    assert r.status_code == 400


def test_api_key(http):
    assert http.get("/secret").status_code == 401
    assert http.get("/secret", headers={"Authorization": "Bearer x"}).status_code == 401
    assert http.get("/secret", headers={"Authorization": "k"}).status_code == 401
    assert http.get("/secret", headers={"Authorization": "Bearer k"}).status_code == 200
    assert http.get("/open").status_code == 200


def test_api_key_scheme_is_case_insensitive(http):
    # RFC 7235: the auth-scheme token is case-insensitive; the key itself is not.
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert http.get("/secret", headers={"Authorization": f"{scheme} k"}).status_code == 200, scheme
    assert http.get("/secret", headers={"Authorization": "Bearer  k"}).status_code == 200  # 1*SP
    assert http.get("/secret", headers={"Authorization": "bearer K"}).status_code == 401
    assert http.get("/secret", headers={"Authorization": "Basic k"}).status_code == 401
    assert http.get("/secret", headers={"Authorization": "bearer"}).status_code == 401
    assert http.get("/secret", headers={"Authorization": "bearerk"}).status_code == 401
