"""Every kind of bad input gets the OpenAI error body with the right status (and nothing crashes).

These requests fail before any engine traffic, so the app runs without its lifespan (no sockets).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from headrace.common.messages import ErrorInfo
from headrace.services.api import errors
from headrace.services.api.app import create_app
from headrace.services.api.errors import ApiError
from tests.services.api.fakes import api_config

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def http(tmp_path):
    config = api_config(ipc_dir=str(tmp_path), max_n=4, max_request_bytes=2000)
    return TestClient(create_app(config, 0), raise_server_exceptions=False)


def error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("path, body, param", [
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": ["a", 1]}, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt"),
    (COMPLETIONS, {"prompt": [2**31]}, "prompt"),
    (COMPLETIONS, {}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "n": True}, "n"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, "seed"),
    (COMPLETIONS, {"prompt": "x", "stop": [1]}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    (CHAT, {"messages": USER, "top_logprobs": "3"}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": 3}, "logprobs"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, "messages.[0].content"),
    (CHAT, {"messages": [{"content": "x"}]}, "messages.[0].role"),
])
def test_wrong_types_are_400_naming_the_field(http, path, body, param):
    error(http.post(path, json=body), 400, param)


@pytest.mark.parametrize("path, body, param", [
    (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 5}, "n"),  # over max_n
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [[1], []]}, "prompt.[1]"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
    (CHAT, {"messages": [USER[0], {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.[1].content"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 4, "min_tokens": 5}, "min_tokens"),
])
def test_bad_values_are_400_naming_the_field(http, path, body, param):
    error(http.post(path, json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe", b"[" * 1900,
                                 b'{"prompt": "x", "temperature": NaN}'])
def test_malformed_bodies_are_400(http, raw):
    r = http.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_body_without_json_content_type_still_parses(http):
    r = http.post(COMPLETIONS, content=b'{"prompt": "x", "n": 9}', headers={"content-type": "text/plain"})
    error(r, 400, "n")  # reached validation: the body was read as JSON


def test_unknown_model_is_404_model_not_found(http):
    err = error(http.post(CHAT, json={"model": "gpt-5", "messages": USER}), 404, "model")
    assert err["code"] == "model_not_found" and "gpt-5" in err["message"]
    assert error(http.post("/detokenize", json={"model": "gpt-5", "tokens": [1]}), 404, "model")


def test_oversized_bodies_are_413(http):
    big = {"prompt": "x" * 3000}
    error(http.post(COMPLETIONS, json=big), 413)  # Content-Length says so

    def chunks():  # no Content-Length: counted while reading
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    error(http.post(COMPLETIONS, content=chunks()), 413)


def test_no_tokenizer_is_503_and_unimplemented_fields_are_refused_first(http):
    err = error(http.post(COMPLETIONS, json={"prompt": "x", "best_of": 1, "suffix": None, "logit_bias": {}}), 503)
    assert err["type"] == "ServiceUnavailableError"
    # A field that would change the answer but is not implemented is refused before any engine work.
    err = error(http.post(COMPLETIONS, json={"prompt": "x", "logit_bias": {"1": 2}}), 400, "logit_bias")
    assert "not supported" in err["message"]


def test_unknown_route_and_wrong_method_keep_the_shape(http):
    assert error(http.get("/v1/nothing"), 404)["type"] == "NotFoundError"
    assert error(http.get(COMPLETIONS), 405)["code"] == 405


class Typed(BaseModel):
    count: int


def test_fastapi_422_becomes_our_400():
    app = FastAPI()
    errors.install(app)

    @app.post("/typed")
    async def typed(body: Typed) -> dict:
        return {"count": body.count}

    http = TestClient(app)
    err = error(http.post("/typed", json={"count": "many"}), 400, "count")
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert error(http.post("/typed", content=b"{", headers={"content-type": "application/json"}), 400)
    assert http.post("/typed", json={"count": 2}).json() == {"count": 2}


def test_error_info_maps_code_to_status():
    assert ApiError.from_info(ErrorInfo("too long", "BadRequestError", "prompt", 400)).body() == {
        "error": {"message": "too long", "type": "BadRequestError", "param": "prompt", "code": 400}}
    lost = ApiError.from_info(ErrorInfo("gone", "ServiceUnavailableError", None, 503))
    assert lost.status == 503
    assert ApiError.from_info(ErrorInfo("junk", "X", None, 42)).status == 500  # a peer's nonsense code


def test_union_errors_name_the_field_not_the_union_arm():
    err = errors.from_validation_errors([
        {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "Input should be a valid string"},
        {"type": "list_type", "loc": ("body", "prompt", "list[str]"), "msg": "Input should be a valid list"},
    ])
    assert err.param == "prompt" and err.status == 400
