"""Request bodies that must be one JSON object: one parser for every endpoint.

`exact=True` reads numbers with a fraction as Decimal (0.1 stays 0.1) for money fields,
and refuses NaN and Infinity; otherwise orjson parses (floats as floats).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

from quota_proxy.asgi import Receive, Scope, read_body
from quota_proxy.errors import BadRequest


def parse_object(body: bytes, *, exact: bool = False) -> dict[str, Any]:
    """The body as a dict, or BadRequest (400) saying what is wrong with it."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_refuse) if exact else orjson.loads(body)
    except (ValueError, RecursionError):  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


async def read_object(scope: Scope, receive: Receive, limit: int, *, exact: bool = False) -> dict[str, Any]:
    """Read the body (at most limit bytes, else 413) and parse it with parse_object."""
    return parse_object(await read_body(scope, receive, limit), exact=exact)


def _refuse(name: str) -> Any:
    raise ValueError(name)
