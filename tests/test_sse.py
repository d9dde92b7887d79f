"""SSEMeter, the stream metering's parser: event boundaries however the bytes are cut."""

from __future__ import annotations

from typing import Any

import orjson

from quota_proxy.sse import SSEMeter, _last_boundary

STREAM = (
    b'data: {"choices":[{"delta":{"content":"one"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"two"}}]}\r\n\r\n'
    b": a comment\r\r"
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


def searched(data: bytes) -> int:
    """The boundary found by searching for every separator (what the fast path must agree with)."""
    return max((data.rfind(sep) + len(sep) if sep in data else -1) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"))


def test_last_boundary_agrees_with_a_full_search_on_every_prefix() -> None:
    for end in range(len(STREAM) + 1):
        assert _last_boundary(STREAM[:end]) == searched(STREAM[:end]), STREAM[:end]


def test_every_cut_gives_the_same_bytes_and_the_same_usage() -> None:
    def run(pieces: list[bytes]) -> tuple[bytes, list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []

        def on_usage(event: dict[str, Any]) -> bytes:
            seen.append(event["usage"])
            return b"data: " + orjson.dumps({"usage": {"charged": 5}}) + b"\n\n"

        meter = SSEMeter(on_usage)
        out = b"".join(meter.feed(piece) for piece in pieces) + meter.flush()
        return out, seen

    whole, usage = run([STREAM])
    assert usage == [{"prompt_tokens": 3, "completion_tokens": 2}]
    assert b'{"usage":{"charged":5}}' in whole and whole.endswith(b"data: [DONE]\n\n")
    for cut in range(1, len(STREAM)):
        assert run([STREAM[:cut], STREAM[cut:]]) == (whole, usage), cut
