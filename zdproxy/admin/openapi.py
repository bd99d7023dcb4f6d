"""The OpenAPI 3.1 document of the admin API, generated from the route table and
the pydantic models of admin/models.py."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaValue, models_json_schema

from zdproxy import __version__
from zdproxy.admin.app import PROBLEM_JSON, Route
from zdproxy.admin.models import Problem

Mode = Literal["validation", "serialization"]
_PATH_PARAM = re.compile(r"{(\w+)}")


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    wanted: list[tuple[type[BaseModel], Mode]] = [(Problem, "serialization")]
    for route in routes:
        if route.body is not None:
            wanted.append((route.body, "validation"))
        if route.query is not None:
            wanted.append((route.query, "validation"))
        if route.response is not None:
            wanted.append((route.response, "serialization"))
    refs, top = models_json_schema(
        list(dict.fromkeys(wanted)), ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route, refs, schemas)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "zdproxy admin API",
            "version": __version__,
            "description": "Drive zdproxy: pools, split, drain, pin rules, events. Every /v1 "
            "call needs `Authorization: Bearer <token>`. Errors are application/problem+json "
            "(RFC 9457) naming each field in `errors`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(
    route: Route,
    refs: Mapping[tuple[Any, Mode], JsonSchemaValue],
    schemas: dict[str, Any],
) -> dict[str, Any]:
    problem = {PROBLEM_JSON: {"schema": refs[(Problem, "serialization")]}}
    operation: dict[str, Any] = {
        "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z]+', '_', route.path).strip('_')}",
        "summary": route.summary,
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": ["blue", "green"]},
            }
            for name in _PATH_PARAM.findall(route.path)
        ],
        "responses": {"default": {"description": "An error", "content": problem}},
    }
    if route.description:
        operation["description"] = route.description
    if route.query is not None:
        schema = schemas[refs[(route.query, "validation")]["$ref"].rpartition("/")[2]]
        required = set(schema.get("required", []))
        operation["parameters"] += [
            {"name": name, "in": "query", "required": name in required, "schema": prop}
            for name, prop in schema["properties"].items()
        ]
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
        }
    if route.response is not None:
        content: dict[str, Any] = {
            route.media_type: {"schema": refs[(route.response, "serialization")]}
        }
    else:
        plain = {"type": "object"} if route.media_type == "application/json" else {"type": "string"}
        content = {route.media_type: {"schema": plain}}
    if route.streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    operation["responses"]["200"] = {"description": route.summary, "content": content}
    if route.auth:
        operation["security"] = [{"bearer": []}]
        operation["responses"]["401"] = {"description": "No or wrong token", "content": problem}
    if route.body is not None or route.query is not None:
        operation["responses"]["400"] = {"description": "Invalid input", "content": problem}
    return operation
