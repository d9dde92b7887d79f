"""The one parser for request bodies that must be a JSON object (pure; no server)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quota_proxy.errors import BadRequest
from quota_proxy.json_body import parse_object

NOT_JSON = "The request body is not valid JSON."
NOT_OBJECT = "The request body must be a JSON object."


@pytest.mark.parametrize("exact", [False, True])
def test_an_object_parses(exact: bool) -> None:
    assert parse_object(b'{"model": "quota/fast", "n": 2, "stream": true}', exact=exact) == {
        "model": "quota/fast",
        "n": 2,
        "stream": True,
    }


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", NOT_JSON),
        (b"{", NOT_JSON),
        (b'{"a": 1} trailing', NOT_JSON),
        (b"\xff\xfe{}", NOT_JSON),
        (b'{"a": NaN}', NOT_JSON),
        (b'{"a": Infinity}', NOT_JSON),
        (b"[" * 100_000 + b"]" * 100_000, NOT_JSON),
        (b"[]", NOT_OBJECT),
        (b'"text"', NOT_OBJECT),
        (b"null", NOT_OBJECT),
        (b"42", NOT_OBJECT),
    ],
)
def test_bad_bodies_are_a_400_that_says_why(body: bytes, message: str, exact: bool) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_object(body, exact=exact)
    assert caught.value.status == 400
    assert caught.value.message == message


def test_exact_keeps_decimal_fractions_and_integers_exact() -> None:
    data = parse_object(b'{"amount": 0.1, "big": 12345678901234567890, "small": 1e-7}', exact=True)
    assert data == {"amount": Decimal("0.1"), "big": 12345678901234567890, "small": Decimal("1e-7")}
    assert type(parse_object(b'{"amount": 0.1}')["amount"]) is float
