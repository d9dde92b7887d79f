"""Odd JSON never crashes a translator: a request is translated or refused with a 400, and
a stream translator takes any chunk."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from quota_proxy.errors import BadRequest
from quota_proxy.protocols import anthropic, responses
from quota_proxy.usage import from_anthropic, from_chat, from_responses

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.text(max_size=8))
KEYS = ["type", "role", "content", "text", "messages", "input", "system", "tools", "tool_choice", "name",
        "source", "id", "tool_use_id", "call_id", "arguments", "output", "instructions", "max_tokens",
        "stream", "delta", "choices", "usage", "index", "function", "tool_calls", "finish_reason",
        "prompt_tokens", "cached_tokens", "prompt_tokens_details", "input_tokens", "output_tokens",
        "cache_creation", "image_url", "metadata", "text_format"]  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)
bodies = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_requests_translate_or_refuse(body: dict[str, Any]) -> None:
    for translate in (anthropic.to_chat_request, responses.to_chat_request):
        try:
            chat = translate(body)
        except BadRequest:
            continue
        assert isinstance(chat["messages"], list) and chat["messages"]


@settings(max_examples=300, deadline=None)
@given(st.lists(bodies, max_size=5))
def test_stream_translators_take_any_chunk(chunks: list[dict[str, Any]]) -> None:
    claude, codex = anthropic.StreamTranslator(), responses.StreamTranslator({})
    for chunk in chunks:
        claude.feed(chunk)
        codex.feed(chunk)
        anthropic.from_chat_response(chunk)
        responses.from_chat_response(chunk, {})
        for read in (from_chat, from_anthropic, from_responses):
            buckets = read(chunk.get("usage"))
            assert buckets is None or min(buckets.input, buckets.output, buckets.cache_read) >= 0
    assert claude.finish().endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert codex.finish().startswith(b"event: response.")
