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

# Errors on the Anthropic Messages endpoints: Anthropic's shape, plus our code.
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "code": {"type": "string"},
                "required_quota_tokens": {"type": "integer"},
                "available_quota_tokens": {"type": "integer"},
            },
        },
    },
}

_ANTHROPIC_MESSAGES = {
    "type": "object",
    "required": ["model", "max_tokens", "messages"],
    "properties": {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"enum": ["user", "assistant"]}, "content": {"type": "string"}},
            },
        },
        "system": {"type": "string"},
        "stream": {"type": "boolean"},
    },
}

_RESPONSES_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"type": "string", "minLength": 1},
        "instructions": {"type": "string"},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "store": {"type": "boolean"},
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


def _errors(*statuses: int, schema: str = "Error") -> dict[str, Any]:
    return {
        str(status): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
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
_ORDER: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "status", "package", "quota_tokens"],
    "properties": {
        "object": {"const": "order"},
        "order_id": {"type": "string"},
        "status": {"enum": ["pending", "paid", "expired", "refunded"]},
        "package": {"type": "string"},
        "amount_cents": {"type": "integer"},
        "currency": {"type": "string"},
        "quota_tokens": {"type": "integer"},
        "checkout_url": {"type": ["string", "null"]},
        "ledger_id": {"type": ["string", "null"]},
    },
}
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
        "schemas": {"Error": _ERROR, "AnthropicError": _ANTHROPIC_ERROR, "User": _USER},
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
        "/v1/messages": {
            "post": _op(
                "An Anthropic Messages request through a route alias (passed through or translated); "
                "errors in Anthropic's shape.",
                {**_json(ANY_OBJECT), **_errors(*INFERENCE_ERRORS, schema="AnthropicError")},
                requestBody=_body(_ANTHROPIC_MESSAGES),
            )
        },
        "/v1/messages/count_tokens": {
            "post": _op(
                "Count a Messages request's input tokens; never charged.",
                {**_json(ANY_OBJECT), **_errors(400, 401, 403, 404, 413, 502, 504, schema="AnthropicError")},
                requestBody=_body({**_ANTHROPIC_MESSAGES, "required": ["model", "messages"]}),
            )
        },
        "/v1/responses": {
            "post": _op(
                "An OpenAI Responses request through a route alias (passed through or translated).",
                {**_json(ANY_OBJECT), **_errors(*INFERENCE_ERRORS)},
                requestBody=_body(_RESPONSES_REQUEST),
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
        "/v1/checkout": {
            "post": _op(
                "Open a Stripe Checkout for a package: a pending order and its checkout_url (secret keys).",
                {**_json(_ORDER), **_errors(400, 401, 403, 404, 413, 502)},
                requestBody=_body(
                    {"type": "object", "required": ["package"], "properties": {"package": {"type": "string"}}}
                ),
            )
        },
        "/v1/orders": {
            "get": _op(
                "The account's package orders, newest first (secret keys).",
                {**_json({"type": "object", "properties": {"data": {"type": "array", "items": _ORDER}}}),
                 **_errors(401, 403)},
            )
        },
        "/v1/redeem": {
            "post": _op(
                "Redeem a code for its package; a code credits once.",
                {**_json(ANY_OBJECT), **_errors(400, 401, 413, 429)},
                requestBody=_body(
                    {"type": "object", "required": ["code"], "properties": {"code": {"type": "string"}}}
                ),
            )
        },
        "/v1/alerts": {
            "get": _op("Low-balance alert settings and recent deliveries (secret keys).",
                       {**_json(ANY_OBJECT), **_errors(401, 403)}),
            "put": _op(
                "Replace the low-balance alert settings (secret keys).",
                {**_json(ANY_OBJECT), **_errors(400, 401, 403, 413)},
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["webhook_url"],
                        "properties": {
                            "webhook_url": {"type": "string", "format": "uri"},
                            "thresholds": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                            "user_thresholds": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                        },
                    }
                ),
            ),
        },
        "/webhooks/stripe": {
            "post": _op(
                "Stripe's webhook: authenticated by its Stripe-Signature header only.",
                {**_json(ANY_OBJECT), **_errors(400, 404, 413, 503)},
                public=True,
                requestBody=_body(ANY_OBJECT),
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
