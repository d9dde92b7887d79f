"""API key generation, hashing and parsing.

Keys are shown once; the store keeps only a SHA-256 digest and a short display prefix.
A SHA-256 (not a slow KDF) is right here: keys carry ~190 bits of randomness, so the
digest cannot be brute-forced, and authentication stays on the hot path's budget.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import string
import time

BASE62 = string.digits + string.ascii_letters
LIVE_PREFIX = "qta_live_"
SECRET_PREFIX = "sk-quota-"
KIND_LIVE = "live"
KIND_SECRET = "secret"
_BODY_LENGTH = {KIND_LIVE: 32, KIND_SECRET: 40}
_PREFIX = {KIND_LIVE: LIVE_PREFIX, KIND_SECRET: SECRET_PREFIX}
DISPLAY_CHARS = 4
_BASE62_SET = frozenset(BASE62)


def generate_key(kind: str) -> str:
    body = "".join(secrets.choice(BASE62) for _ in range(_BODY_LENGTH[kind]))
    return _PREFIX[kind] + body


def key_kind(key: str) -> str | None:
    """The kind of a well-formed key, or None: malformed keys never reach the store."""
    for kind, prefix in _PREFIX.items():
        if key.startswith(prefix):
            body = key[len(prefix) :]
            if len(body) == _BODY_LENGTH[kind] and _BASE62_SET.issuperset(body):
                return kind
    return None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """'qta_live_AbCd' — enough to tell keys apart in a list, far too little to use."""
    kind = key_kind(key)
    prefix = _PREFIX[kind] if kind else ""
    return key[: len(prefix) + DISPLAY_CHARS]


def new_id(prefix: str) -> str:
    """Opaque ids such as 'acct_3f9a…' for rows that users see."""
    return f"{prefix}_{secrets.token_hex(12)}"


def time_ordered_hex() -> str:
    """24 hex digits that sort by creation time: the millisecond clock (12), then 48 random
    bits. For the ids of rows written on every request (request and ledger ids): their
    unique indexes then grow at the end, so a group of settlements writes one index page
    instead of one random page per row, and checkpoints have that much less to copy. Not
    for anything that must stay unguessable: half of it is the clock."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def new_ledger_id() -> str:
    """'ledg_…', time-ordered (see time_ordered_hex)."""
    return "ledg_" + time_ordered_hex()
