"""The error answers of the JSON API, written into /openapi.json as the app really gives them.

Routes document their own outcomes (201, 204, 409 …). What every operation can answer whatever it
does comes from the app around it, so it is added here once: 401 and 403 from the role check (on
every route that is not public), 404 for an id in the path that names nothing, 503 while the
database is unavailable, and 422 in the app's own shape (`detail` is one sentence, `errors` the
list), not FastAPI's default where `detail` is the list. Clients generated from the document then
expect what arrives.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

ERROR_OUT = "ErrorOut"
VALIDATION_ERROR_OUT = "HTTPValidationError"  # FastAPI's name, so every operation's 422 points at ours

ERROR_SCHEMA: dict[str, Any] = {
    "title": ERROR_OUT,
    "type": "object",
    "properties": {
        "detail": {"title": "Detail", "type": "string", "description": "What went wrong and what to do."}
    },
    "required": ["detail"],
}
VALIDATION_ERROR_SCHEMA: dict[str, Any] = {
    "title": VALIDATION_ERROR_OUT,
    "type": "object",
    "properties": {
        "detail": {
            "title": "Detail",
            "type": "string",
            "description": "Every problem, `field: message`, joined by '; '.",
        },
        "errors": {
            "title": "Errors",
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
                "required": ["loc", "msg", "type"],
            },
        },
    },
    # Routes that refuse a value the schema cannot express (a round spec's unknown setting) answer
    # with `detail` alone; the request validator adds `errors`.
    "required": ["detail"],
}

SIGNED_IN_ERRORS = {
    "401": "Not signed in, or the API token is invalid or revoked.",
    "403": "Your role may not do this (or, with a browser session, the CSRF token is missing).",
}
EVERY_OPERATION_ERRORS = {
    "503": "The database is unavailable right now; try again after `Retry-After` seconds.",
}
PATH_ID_ERRORS = {"404": "Nothing has the id in the path."}
BODY_ERRORS = {"400": "The body could not be parsed (not JSON, or a broken multipart form)."}
VALIDATION_REF = {"$ref": f"#/components/schemas/{VALIDATION_ERROR_OUT}"}


def _allowed_roles(route: APIRoute) -> frozenset[str] | None:
    """The roles the route's role dependency admits (`public` admits 'anonymous')."""
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        roles = getattr(dependant.call, "allowed_roles", None)
        if roles is not None:
            return roles
        stack.extend(dependant.dependencies)
    return None


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_OUT}"}}},
    }


def document_errors(app: FastAPI, schema: dict[str, Any]) -> None:
    """Add the app-wide error answers to every operation of `schema` (in place)."""
    public_paths = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, APIRoute) and _allowed_roles(route) == frozenset({"anonymous"})
        for method in route.methods
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            errors = dict(EVERY_OPERATION_ERRORS)
            if (path, method) not in public_paths:
                errors |= SIGNED_IN_ERRORS
            if "{" in path:
                errors |= PATH_ID_ERRORS
            if "requestBody" in operation:
                errors |= BODY_ERRORS
            responses = operation.setdefault("responses", {})
            for code, description in errors.items():
                if code not in responses:
                    responses[code] = _error_response(description)
                else:
                    responses[code].setdefault("content", _error_response("")["content"])
            _accept_validation_errors(responses.get("422"))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components[ERROR_OUT] = ERROR_SCHEMA
    components[VALIDATION_ERROR_OUT] = VALIDATION_ERROR_SCHEMA


def _accept_validation_errors(response: dict[str, Any] | None) -> None:
    """A route that documents its own 422 body (a prompt set's row errors) still answers the request
    validator's 422 for a request that does not match the schema: document both."""
    if not response:
        return
    content = response.get("content", {}).get("application/json")
    if content is None or content.get("schema") == VALIDATION_REF:
        return
    content["schema"] = {"anyOf": [content["schema"], VALIDATION_REF]}


def install(app: FastAPI) -> None:
    """Make the app's /openapi.json carry the app-wide error answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_errors(app, build())  # build() stores the document on the app
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
