"""OpenAI Responses <-> Chat Completions.

Translated: ``instructions``, ``input`` as a string or as items (messages with
``input_text``/``output_text``/``input_image`` parts, ``function_call`` and
``function_call_output`` items — the full-transcript style Codex sends with
``store: false``), function tools and ``tool_choice``, ``max_output_tokens``,
temperature/top_p, ``parallel_tool_calls``, ``user``, ``text.format`` (JSON schema / JSON
object), and the stream (``response.created`` … ``response.output_text.delta`` /
``response.function_call_arguments.delta`` … ``response.completed`` or
``response.incomplete``, with no ``[DONE]``).

Not translated, refused with a 400 naming it: ``previous_response_id``, ``conversation``
and ``item_reference`` items (they need state stored by a Responses server),
``background``, built-in and custom tools (any tool whose type is not ``function``),
``input_file`` parts and images given by ``file_id``, and tool-call items other than
``function_call`` (e.g. ``local_shell_call``, ``custom_tool_call``).
Dropped: ``reasoning`` input items and the ``reasoning`` option, ``store``, ``include``,
``metadata``, ``truncation``, ``prompt_cache_key``, ``service_tier`` — a Chat server has no
use for them and the reply is valid without them.
"""

from __future__ import annotations

from typing import Any

from quota_proxy.errors import BadRequest
from quota_proxy.protocols.chat import text_of
from quota_proxy.protocols.responses_reply import StreamTranslator, from_chat_response, usage_object

__all__ = ["StreamTranslator", "from_chat_response", "to_chat_request", "usage_object"]

_STATEFUL = ("previous_response_id", "conversation")


def _refuse(what: str) -> BadRequest:
    return BadRequest(
        f"{what} cannot be translated for this route's upstream, which speaks Chat Completions "
        "and stores no responses. Send the whole conversation in 'input', or use a route whose "
        "upstream speaks the Responses API.",
    )


def to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as a Chat Completions request."""
    for name in _STATEFUL:
        if body.get(name) is not None:
            raise _refuse(f"'{name}'")
    if body.get("background") is True:
        raise _refuse("'background': true")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        for item in raw:
            _item(item, messages)
    else:
        raise BadRequest("'input' must be a non-empty string or array of items.", param="input")
    if not messages:
        raise BadRequest("'input' holds nothing to send.", param="input")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [_tool(t) for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": str(choice.get("name"))}}
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _item(item: Any, messages: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise BadRequest("Each input item must be an object.", param="input")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(
                "An input message's role must be user, assistant, system or developer.", param="input"
            )
        content = _content(item.get("content"), role)
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    elif kind == "function_call":
        call = {
            "id": str(item.get("call_id")),
            "type": "function",
            "function": {"name": str(item.get("name")), "arguments": str(item.get("arguments") or "")},
        }
        last = messages[-1] if messages else None
        if (
            last is not None
            and last["role"] == "assistant"
            and isinstance(last.get("content"), (str, type(None)))
        ):
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {"role": "tool", "tool_call_id": str(item.get("call_id")), "content": text_of(output)}
        )
    elif kind == "reasoning":
        return
    else:
        raise _refuse(f"An input item of type {kind!r}")


def _content(content: Any, role: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("A message's content must be a string or an array of parts.", param="input")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _refuse(f"A {kind!r} content part")
    if role != "user" or all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts if p["type"] == "text")
    return parts


def _tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise BadRequest("Each tool must be an object.", param="tools")
    if tool.get("type") != "function":
        raise _refuse(f"The {tool.get('type')!r} tool")
    fn: dict[str, Any] = {
        "name": str(tool.get("name")),
        "parameters": tool.get("parameters") or {"type": "object"},
    }
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}
