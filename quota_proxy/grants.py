"""What a grant is, for the Funding API and `quota-proxy grant` alike.

Both must agree on who can receive one and on what makes two grants "the same request"
under one idempotency key (a grant made by the CLI can be replayed through the API).
"""

from __future__ import annotations

import hashlib
import re

import orjson

EXTERNAL_USER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def grant_request_hash(external_user_id: str, amount: int, description: str) -> str:
    """What makes two grants "the same request" for an idempotency key."""
    return hashlib.sha256(orjson.dumps([external_user_id, amount, description])).hexdigest()
