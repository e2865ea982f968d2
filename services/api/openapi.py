"""Request-body schemas in /openapi.json.

The routes read their bodies themselves (so a body without a JSON content type still parses, see app.py),
which leaves FastAPI nothing to describe; schema-driven clients and fuzzers then see POST routes without a
body. Each route names its pydantic model here, and the models' JSON schemas join the document's
components once, when it is first built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def install(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the models' schemas (and those they refer to) to the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
            document.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
