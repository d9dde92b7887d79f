"""The gateway's own OpenAPI 3.1 document, served at GET /openapi.json.

Written by hand, beside the endpoints it describes: it is what schemathesis fuzzes in
tests/stress, and what a client generator can read. Bodies of the OpenAI-compatible
endpoints are described loosely (the upstream owns their full shape); everything the
gateway itself defines — errors, balances, grants, users — is described exactly.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "type"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string"},
                "required_quota_tokens": {"type": "integer"},
                "available_quota_tokens": {"type": "integer"},
            },
        }
    },
}

_USER_ID = {
    "name": "external_user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$"},
}

_USER = {
    "type": "object",
    "required": ["external_user_id", "balance", "balance_quota_tokens", "billing_mode"],
    "properties": {
        "object": {"const": "user"},
        "external_user_id": {"type": "string"},
        "balance": {"type": "string", "pattern": r"^-?\$[0-9]+\.[0-9]{2,}$"},
        "balance_quota_tokens": {"type": "integer"},
        "available_quota_tokens": {"type": "integer"},
        "billing_mode": {"enum": ["user", "developer"]},
    },
}

_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": _MESSAGES,
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "stream_options": {"type": "object"},
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status in statuses
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


def _op(summary: str, responses: dict[str, Any], *, public: bool = False, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if public:
        op["security"] = []
    return op


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


INFERENCE_ERRORS = (400, 401, 402, 403, 404, 413, 429, 502, 503, 504)  # 503: store_unavailable
ANY_OBJECT: dict[str, Any] = {"type": "object"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "quota-proxy",
        "version": "0.1.0",
        "description": "An OpenAI-compatible LLM gateway with prepaid balances.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": _ERROR, "User": _USER},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/chat/completions": {
            "post": _op(
                "A chat completion through a route alias; streaming with stream: true.",
                {**_json(ANY_OBJECT), **_errors(*INFERENCE_ERRORS)},
                requestBody=_body(_CHAT_REQUEST),
            )
        },
        "/v1/completions": {
            "post": _op(
                "A legacy text completion.",
                {**_json(ANY_OBJECT), **_errors(*INFERENCE_ERRORS)},
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["model", "prompt"],
                        "properties": {
                            "model": {"type": "string"},
                            "prompt": {"type": "string"},
                            "max_tokens": {"type": "integer", "minimum": 1},
                        },
                    }
                ),
            )
        },
        "/v1/embeddings": {
            "post": _op(
                "Embeddings (input tokens only).",
                {**_json(ANY_OBJECT), **_errors(*INFERENCE_ERRORS)},
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["model", "input"],
                        "properties": {"model": {"type": "string"}, "input": {"type": "string", "minLength": 1}},
                    }
                ),
            )
        },
        "/v1/models": {"get": _op("The aliases this key may use.", {**_json(ANY_OBJECT), **_errors(401)})},
        "/v1/balance": {
            "get": _op(
                "The developer's balance, or an app user's with ?external_user_id=.",
                {**_json(ANY_OBJECT), **_errors(400, 401, 404)},
                parameters=[
                    {"name": "external_user_id", "in": "query", "required": False, "schema": {"type": "string"}}
                ],
            )
        },
        "/v1/me": {"get": _op("Account, key and 30-day usage.", {**_json(ANY_OBJECT), **_errors(401)})},
        "/v1/usage": {
            "get": _op(
                "Usage summed per day, route, key, app user or agent session, as JSON or CSV.",
                {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": ANY_OBJECT},
                                    "text/csv": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 401),
                },
                parameters=[
                    {"name": "group_by", "in": "query", "required": False,
                     "schema": {"enum": ["day", "route", "key", "user", "session"]}},
                    {"name": "days", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 366}},
                    {"name": "format", "in": "query", "required": False, "schema": {"enum": ["json", "csv"]}},
                ],
            )
        },
        "/v1/packages": {"get": _op("Purchasable packages, cheapest first.", _json(ANY_OBJECT), public=True)},
        "/v1/funding/grant": {
            "post": _op(
                "Move dollars from the developer's grant pool to an app user (idempotent).",
                {
                    **_json(
                        {
                            "type": "object",
                            "required": [
                                "external_user_id", "amount_granted", "balance_before",
                                "balance_after", "ledger_id", "duplicate",
                            ],
                            "properties": {
                                "external_user_id": {"type": "string"},
                                "amount_granted": {"type": "string"},
                                "balance_before": {"type": "string"},
                                "balance_after": {"type": "string"},
                                "ledger_id": {"type": "string"},
                                "duplicate": {"type": "boolean"},
                            },
                        }
                    ),
                    **_errors(400, 401, 402, 403, 409, 413, 503),
                },
                parameters=[
                    {"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
                ],
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["external_user_id", "amount"],
                        "properties": {
                            "external_user_id": _USER_ID["schema"],
                            "amount": {"type": "number", "exclusiveMinimum": 0},
                            "description": {"type": "string", "maxLength": 500},
                        },
                    }
                ),
            )
        },
        "/v1/users/{external_user_id}/balance": {
            "get": _op(
                "An app user's balance.",
                {**_json({"$ref": "#/components/schemas/User"}), **_errors(400, 401, 403, 404)},
                parameters=[_USER_ID],
            )
        },
        "/v1/users/{external_user_id}": {
            "patch": _op(
                "Set whose balance the user's completions charge.",
                {**_json({"$ref": "#/components/schemas/User"}), **_errors(400, 401, 403, 404)},
                parameters=[_USER_ID],
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["billing_mode"],
                        "properties": {"billing_mode": {"enum": ["user", "developer"]}},
                    }
                ),
            )
        },
        "/v1/users/{external_user_id}/chat/completions": {
            "post": _op(
                "A chat completion billed per the user's billing mode.",
                {**_json(ANY_OBJECT), **_errors(*INFERENCE_ERRORS)},
                parameters=[_USER_ID],
                requestBody=_body(_CHAT_REQUEST),
            )
        },
        "/healthz": {"get": _op("The process is up.", _json(ANY_OBJECT), public=True)},
        "/readyz": {"get": _op("The store and config are usable.", {**_json(ANY_OBJECT), **_errors(503)}, public=True)},
        "/metrics": {
            "get": _op(
                "Prometheus text metrics.",
                {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                public=True,
            )
        },
        "/openapi.json": {"get": _op("This document.", _json(ANY_OBJECT), public=True)},
    },
}
