"""Unit tests for the pure parts of the request path: parsing, usage, stream sniffing."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quota_proxy.errors import BadRequest
from quota_proxy.inference_request import Kind, endpoint_kind, parse_inference_request
from quota_proxy.reply import read_usage
from quota_proxy.sse import completion_texts
from quota_proxy.upstream import looks_like_event_stream, looks_like_json_object

FIELD_NAMES = ["role", "content", "type", "text", "name", "tool_calls", "function", "arguments", "image_url",
               "refusal", "tools", "n", "max_tokens", "stream", "stream_options", "include_usage", "json_schema",
               "response_format", "functions", "function_call", "suffix", "prompt", "input", "x"]
CHAT = {"model": "quota/fast", "messages": [{"role": "user", "content": "hi"}]}


def parse(path: str = "/v1/chat/completions", **fields: object) -> object:
    return parse_inference_request(path, orjson.dumps({**CHAT, **fields}))


def test_endpoint_kinds() -> None:
    assert endpoint_kind("/v1/chat/completions") is Kind.CHAT
    assert endpoint_kind("/v1/embeddings") is Kind.EMBEDDINGS
    assert endpoint_kind("/v1/completions") is Kind.COMPLETIONS
    assert endpoint_kind("/mine/chat/completions") is Kind.CHAT


def test_parse_reads_caps_choices_and_usage_wish() -> None:
    request = parse_inference_request(
        "/v1/chat/completions",
        orjson.dumps({**CHAT, "max_tokens": 50, "max_completion_tokens": 20, "n": 3, "stream": True,
                      "stream_options": {"include_usage": True}}),
    )
    assert (request.cap_field, request.caller_cap, request.choices) == ("max_completion_tokens", 20, 3)
    assert request.stream and request.wants_usage
    assert request.prompt_estimate > 0
    body = orjson.loads(request.rewrite("upstream-model", 10))
    assert body["model"] == "upstream-model"
    assert body["max_completion_tokens"] == 10 and body["max_tokens"] == 10
    assert body["stream_options"] == {"include_usage": True}


def test_completions_prompts_multiply_choices() -> None:
    request = parse_inference_request(
        "/v1/completions", orjson.dumps({"model": "m", "prompt": ["a", "b"], "n": 2})
    )
    assert request.choices == 4


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": 3}, "model"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": []}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"n": 129}, "n"),
        ({"best_of": -0}, "best_of"),
    ],
)
def test_bad_fields_name_their_param(fields: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse(**fields)
    assert caught.value.extra.get("param") == param


@pytest.mark.parametrize("body", [b"", b"[]", b"1e400", b'{"model": "m", "messages": [}'])
def test_bodies_that_are_not_objects(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_inference_request("/v1/chat/completions", body)


def test_embeddings_cannot_stream() -> None:
    with pytest.raises(BadRequest):
        parse_inference_request("/v1/embeddings", orjson.dumps({"model": "m", "input": "x", "stream": True}))


def test_read_usage() -> None:
    usage = read_usage({"prompt_tokens": 7, "completion_tokens": 5})
    assert usage is not None and (usage.input_tokens, usage.output_tokens, usage.estimated) == (7, 5, False)
    total_only = read_usage({"prompt_tokens": 7, "total_tokens": 12})
    assert total_only is not None and total_only.output_tokens == 5
    for bad in (None, [], {}, {"prompt_tokens": -1}, {"prompt_tokens": True}, {"prompt_tokens": "7"}):
        assert read_usage(bad) is None


def test_completion_texts_cover_messages_deltas_and_tools() -> None:
    whole = {
        "choices": [
            {"message": {"content": "a", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}},
            {"text": "b"},
        ]
    }
    assert completion_texts(whole) == "a{}b"
    delta = {"choices": [{"delta": {"reasoning_content": "r", "content": "c", "refusal": "n"}}]}
    assert completion_texts(delta) == "crn"
    assert completion_texts([1]) == "" and completion_texts({"choices": [None, 3]}) == ""


@pytest.mark.parametrize(
    ("content_type", "first", "ok"),
    [
        (b"text/event-stream; charset=utf-8", b"data: {}\n\n", True),
        (b"text/event-stream", b"\xef\xbb\xbf: keep-alive\n\n", True),
        (b"text/event-stream", b"\n\nevent: message_start\n", True),
        (b"text/html", b"data: {}\n\n", False),
        (None, b"data: {}\n\n", False),
        (b"text/event-stream", b"<html>", False),
        (b"text/event-stream", b"", False),
    ],
)
def test_event_stream_sniffing(content_type: bytes | None, first: bytes, ok: bool) -> None:
    assert looks_like_event_stream(content_type, first) is ok


def test_json_object_sniffing() -> None:
    assert looks_like_json_object(b' \n{"id": 1}')
    assert not looks_like_json_object(b"<html>")
    assert not looks_like_json_object(b"")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    messages=st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=5), min_size=1, max_size=3),
    extra=st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4),
    kind=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
)
def test_any_json_is_parsed_or_refused_with_a_bad_request(
    messages: list[dict[str, object]], extra: dict[str, object], kind: str
) -> None:
    """The review's 500: a content part whose "type" was an object made the estimator raise
    TypeError (unhashable) before the hold. Any JSON object is a request or a 400."""
    body = {"model": "m", "messages": messages, "prompt": extra.get("prompt", "p"), "input": "x", **extra}
    with contextlib.suppress(BadRequest):
        parse_inference_request(kind, orjson.dumps(body))


def test_a_content_part_typed_by_an_object_is_counted_not_raised() -> None:
    message = {"role": "user", "content": [{"type": {"include_usage": "yes"}}, {"type": ["image_url"]}]}
    request = parse(messages=[message])
    assert request.prompt_estimate > 0  # type: ignore[attr-defined]
