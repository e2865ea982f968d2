"""/openapi.json describes every POST route's JSON body, with every schema it refers to present."""

from __future__ import annotations

import json

from headrace.common.addresses import address_plan
from headrace.services.api.app import create_app
from headrace.services.api.engine_client import EngineClient
from tests.services.api.fakes import api_config


def refs(node) -> set[str]:
    if isinstance(node, dict):
        return {node["$ref"]} if "$ref" in node else set().union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node)) if node else set()
    return set()


def test_post_routes_publish_their_request_bodies(tmp_path):
    config = api_config(ipc_dir=str(tmp_path))
    doc = create_app(config, 0, EngineClient.from_plan(address_plan(config.server), 0)).openapi()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/tokenize", "TokenizeBody"), ("/detokenize", "DetokenizeBody")):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith(model)
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["items"]["$ref"].endswith("ChatMessage")
    missing = {r for r in refs(doc) if r.removeprefix("#/components/schemas/") not in schemas}
    assert not missing, missing
    json.dumps(doc)  # served as JSON
