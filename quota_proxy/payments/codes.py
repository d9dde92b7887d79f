"""Redemption codes: `QP-XXXXX-XXXXX-XXXXX-XXXXX`, 100 random bits in Crockford base32.

Printed once by `quota-proxy codes create`; the store keeps only the SHA-256 of the
normalised code. Normalising forgives what people do when they copy a code by hand:
lower case, spaces, missing dashes, O for 0 and I/L for 1.
"""

from __future__ import annotations

import hashlib
import secrets

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U
PREFIX = "QP"
GROUPS, GROUP_LEN = 4, 5
_FORGIVEN = str.maketrans({"O": "0", "I": "1", "L": "1"})


def generate_code() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(GROUPS * GROUP_LEN))
    groups = [body[i : i + GROUP_LEN] for i in range(0, len(body), GROUP_LEN)]
    return "-".join([PREFIX, *groups])


def normalise(code: str) -> str | None:
    """The canonical body of a code, or None if it cannot be one (never reaches the store)."""
    text = "".join(code.split()).replace("-", "").upper()
    if text.startswith(PREFIX):
        text = text[len(PREFIX) :]
    text = text.translate(_FORGIVEN)
    if len(text) != GROUPS * GROUP_LEN or any(c not in ALPHABET for c in text):
        return None
    return text


def code_digest(code: str) -> str | None:
    body = normalise(code)
    return hashlib.sha256(body.encode()).hexdigest() if body is not None else None
