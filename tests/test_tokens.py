"""The offline token estimator: total, monotone, exact where it can be (token-id prompts),
framed like OpenAI's chat format, and never below a real BPE count on real text (SPEC §4)."""

from __future__ import annotations

from typing import Any

import pytest

from quota_proxy.tokens import (
    FEATURES,
    IMAGE_TOKENS,
    MESSAGE_TOKENS,
    NAME_TOKENS,
    RATES,
    REPLY_TOKENS,
    TOOLS_TOKENS,
    _features,
    estimate_output_tokens,
    estimate_prompt_tokens,
    estimate_text_tokens,
)

# Real text, copied verbatim from CPython 3.11's standard library: docstrings (json,
# textwrap.dedent, functools.lru_cache), source (heapq._siftdown) and the test suite's
# multilingual data (Lib/test/cjkencodings/gb2312-utf8.txt, shift_jis-utf8.txt).
JSON_DOC = """JSON (JavaScript Object Notation) <https://json.org> is a subset of
JavaScript syntax (ECMA-262 3rd edition) used as a lightweight data
interchange format.

:mod:`json` exposes an API familiar to users of the standard library
:mod:`marshal` and :mod:`pickle` modules.  It is derived from a
version of the externally maintained simplejson library.

Encoding basic Python object hierarchies::

    >>> import json
    >>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])
    '["foo", {"bar": ["baz", null, 1.0, 2]}]'
"""
DEDENT_DOC = """Remove any common leading whitespace from every line in `text`.

    This can be used to make triple-quoted strings line up with the left
    edge of the display, while still presenting them in the source code
    in indented form.

    Note that tabs and spaces are both treated as whitespace, but they
    are not equal: the lines "  hello" and "\\thello" are
    considered to have no common leading whitespace.

    Entirely blank lines are normalized to a newline character.
    """
LRU_DOC = """Least-recently-used cache decorator.

    If *maxsize* is set to None, the LRU features are disabled and the cache
    can grow without bound.

    If *typed* is True, arguments of different types will be cached separately.
    For example, f(3.0) and f(3) will be treated as distinct calls with
    distinct results.

    Arguments to the cached function must be hashable.

    View the cache statistics named tuple (hits, misses, maxsize, currsize)
    with f.cache_info().  Clear the cache and statistics with f.cache_clear().
    Access the underlying function with f.__wrapped__.

    See:  https://en.wikipedia.org/wiki/Cache_replacement_policies#Least_recently_used_(LRU)
"""
SIFTDOWN_SRC = """def _siftdown(heap, startpos, pos):
    newitem = heap[pos]
    # Follow the path to the root, moving parents down until finding a place
    # newitem fits.
    while pos > startpos:
        parentpos = (pos - 1) >> 1
        parent = heap[parentpos]
        if newitem < parent:
            heap[pos] = parent
            pos = parentpos
            continue
        break
    heap[pos] = newitem
"""
GB2312_TXT = """Python（派森）语言是一种功能强大而完善的通用型计算机程序设计语言，
已经具有十多年的发展历史，成熟且稳定。这种语言具有非常简捷而清晰
的语法特点，适合完成各种高层任务，几乎可以在所有的操作系统中
运行。这种语言简单而强大，适合各种人士学习使用。目前，基于这
种语言的相关技术正在飞速的发展，用户数量急剧扩大，相关的资源非常多。
"""
SHIFT_JIS_TXT = """Python の開発は、1990 年ごろから開始されています。
開発者の Guido van Rossum は教育用のプログラミング言語「ABC」の開発に参加していましたが、ABC は実用上の目的にはあまり適していませんでした。
"""
REAL_TEXTS = {
    "json docstring": JSON_DOC,
    "textwrap.dedent docstring": DEDENT_DOC,
    "functools.lru_cache docstring": LRU_DOC,
    "heapq._siftdown source": SIFTDOWN_SRC,
    "gb2312 test text": GB2312_TXT,
    "shift_jis test text": SHIFT_JIS_TXT,
}
ENGLISH = (JSON_DOC, DEDENT_DOC, LRU_DOC, SIFTDOWN_SRC)


# ---------------------------------------------------------------- text


def test_empty_text_is_zero_tokens() -> None:
    assert estimate_text_tokens("") == 0
    assert estimate_output_tokens("") == 0


def test_any_text_costs_at_least_one_token() -> None:
    for text in ("a", " ", "\n", "7", ".", "é", "中", "😀", "\ud800"):
        assert estimate_text_tokens(text) >= 1, repr(text)


def test_non_strings_count_zero_instead_of_raising() -> None:
    for junk in (None, 3, 2.5, b"bytes", ["a"], {"a": 1}):
        assert estimate_text_tokens(junk) == 0  # type: ignore[arg-type]


def test_lone_surrogates_do_not_raise() -> None:
    # json.loads('"\\ud800"') produces these; str.encode("utf-8") would raise.
    assert estimate_text_tokens("abc \ud800 def") > 0


@pytest.mark.parametrize("text", ENGLISH, ids=["json", "dedent", "lru_cache", "siftdown"])
def test_ascii_prefixes_never_cost_less(text: str) -> None:
    """Appending ASCII text can only add tokens (every counted feature only grows)."""
    estimates = [estimate_text_tokens(text[:i]) for i in range(len(text) + 1)]
    assert all(a <= b for a, b in zip(estimates, estimates[1:], strict=False))
    assert estimates[-1] > estimates[len(text) // 2] > 0


def test_repetition_grows_linearly() -> None:
    one = estimate_text_tokens(LRU_DOC)
    for k in (2, 5, 20):
        # each copy costs the same, give or take the rounding and the one boundary
        assert (one - 2) * k <= estimate_text_tokens(LRU_DOC * k) <= one * k + 1


def test_texts_longer_than_one_chunk_are_counted_whole() -> None:
    text = "abc " * 20_000  # 80 KB: three big-integer chunks
    words = 20_000 * RATES["words"]
    assert words <= estimate_text_tokens(text) <= words + 3 * RATES["words"] + 1


def test_word_structure_is_counted_not_just_length() -> None:
    # Same length, more pieces: digits, punctuation and camelCase split into tokens.
    prose = estimate_text_tokens("the quick brown fox jumps")
    assert estimate_text_tokens("a1b2c3d4e5f6g7h8i9j0k1l2m") > prose
    assert estimate_text_tokens("{[(<>)]};:,.!?'\"|\\/~`^&*#") > prose
    assert estimate_text_tokens("theQuickBrownFoxJumpsOver") > estimate_text_tokens("thequickbrownfoxjumpsover")


def test_every_digit_costs_a_token() -> None:
    # cl100k_base and o200k_base take digits three at a time, but Qwen, Gemma, Llama 2
    # and Mistral 7B split every digit.
    for run in ("7", "42", "123", "1234", "12345678901234567890", "3.14159", "2024-06-01"):
        digits = sum(c.isdigit() for c in run)
        assert estimate_text_tokens(run) >= digits, run


def test_scripts_that_tokenise_poorly_cost_more_per_character() -> None:
    n = 60
    latin = estimate_text_tokens("a" * n)
    for script_text in ("中" * n, "ф" * n, "ש" * n, "ก" * n, "ა" * n, "😀" * n):
        assert estimate_text_tokens(script_text) > latin, script_text[0]
    assert estimate_text_tokens("😀" * n) >= 2 * n  # 4 UTF-8 bytes each


def test_accented_latin_text_is_costed_as_non_english() -> None:
    english = "The user name may contain letters, digits, underscores and dots."
    german = "Der Benutzername darf Buchstaben, Ziffern, Unterstriche und Punkte enthalten, müssen."
    feats = _features(german)
    assert feats[FEATURES.index("letters_acc")] > 0 and feats[FEATURES.index("words")] == 0
    feats = _features(english)
    assert feats[FEATURES.index("words")] > 0 and len(feats) == FEATURES.index("nonascii_words") + 1


def test_output_uses_the_same_rates() -> None:
    for text in REAL_TEXTS.values():
        assert estimate_output_tokens(text) == estimate_text_tokens(text)


def test_rates_cover_every_feature() -> None:
    assert set(RATES) == set(FEATURES)
    assert all(rate >= 0 for rate in RATES.values())


# ---------------------------------------------------------------- chat bodies


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


def test_chat_counts_a_fixed_overhead_per_message_plus_the_reply() -> None:
    assert estimate_prompt_tokens(chat(), "chat") == REPLY_TOKENS
    empty = {"role": "user", "content": ""}
    for n in (1, 2, 10):
        assert estimate_prompt_tokens(chat(*[empty] * n), "chat") == REPLY_TOKENS + n * MESSAGE_TOKENS


def test_chat_adds_each_message_text() -> None:
    msgs = [{"role": "system", "content": DEDENT_DOC}, {"role": "user", "content": LRU_DOC}]
    expected = REPLY_TOKENS + 2 * MESSAGE_TOKENS + estimate_text_tokens(DEDENT_DOC) + estimate_text_tokens(LRU_DOC)
    assert estimate_prompt_tokens(chat(*msgs), "chat") == expected


def test_chat_content_parts_text_and_images() -> None:
    parts = [
        {"type": "text", "text": LRU_DOC},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    got = estimate_prompt_tokens(chat({"role": "user", "content": parts}), "chat")
    assert got == REPLY_TOKENS + MESSAGE_TOKENS + estimate_text_tokens(LRU_DOC) + 2 * IMAGE_TOKENS


def test_chat_counts_names_tool_calls_and_tool_results() -> None:
    base = estimate_prompt_tokens(chat({"role": "user", "content": "hi"}), "chat")
    named = estimate_prompt_tokens(chat({"role": "user", "content": "hi", "name": "alice"}), "chat")
    assert named == base + NAME_TOKENS + estimate_text_tokens("alice")

    args = '{"location": "Paris, France", "unit": "celsius"}'
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}},
    ]}
    with_call = estimate_prompt_tokens(chat({"role": "user", "content": "hi"}, call), "chat")
    assert with_call >= base + MESSAGE_TOKENS + estimate_text_tokens(args) + estimate_text_tokens("get_weather")

    legacy = {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": args}}
    assert estimate_prompt_tokens(chat(legacy), "chat") > REPLY_TOKENS + MESSAGE_TOKENS + estimate_text_tokens(args)

    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}
    assert estimate_prompt_tokens(chat(result), "chat") > REPLY_TOKENS + MESSAGE_TOKENS


def test_chat_counts_tool_definitions() -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["location"]},
    }}]
    msg = {"role": "user", "content": "What is the weather like in Paris?"}
    without = estimate_prompt_tokens(chat(msg), "chat")
    with_tools = estimate_prompt_tokens(chat(msg, tools=tools), "chat")
    assert with_tools - without >= TOOLS_TOKENS + 40  # the schema's JSON is ~70 tokens
    with_functions = estimate_prompt_tokens(chat(msg, functions=[tools[0]["function"]]), "chat")
    assert with_functions - without >= TOOLS_TOKENS + 30


ODD_VALUES: list[Any] = [
    None, 0, -1, 2**70, 1.5, True, "x", b"x", [], {}, [None], [[[[1]]]], {"a": {"b": None}},
    [1, "a", None, [2, 3], {"x": 1}], {1: 2}, {"text": 5}, {"type": "image_url"}, set(), object(),
]


@pytest.mark.parametrize("kind", ["chat", "completions", "embeddings", "responses", ""])
def test_prompt_estimate_is_total_on_odd_shapes(kind: str) -> None:
    bodies: list[Any] = [None, 5, "body", [], {}]
    for value in ODD_VALUES:
        bodies += [
            {"messages": value}, {"prompt": value}, {"input": value}, {"tools": value}, {"functions": value},
            {"messages": [value]}, {"messages": [{"role": "user", "content": value}]},
            {"messages": [{"role": value, "content": [value, {"type": "text", "text": value}]}]},
            {"messages": [{"role": "assistant", "tool_calls": value, "function_call": value, "name": value}]},
            {"messages": [{"role": "assistant", "tool_calls": [value, {"function": value}]}]},
            {"messages": [], "response_format": {"type": "json_schema", "json_schema": value}},
            {"prompt": [value, [value]], "suffix": value},
        ]
    for body in bodies:
        got = estimate_prompt_tokens(body, kind)
        assert isinstance(got, int) and got >= 0, (kind, body)


# ---------------------------------------------------------------- completions, embeddings


@pytest.mark.parametrize(("kind", "field"), [("completions", "prompt"), ("embeddings", "input")])
def test_token_id_inputs_are_counted_exactly(kind: str, field: str) -> None:
    assert estimate_prompt_tokens({field: list(range(1000, 1037))}, kind) == 37
    assert estimate_prompt_tokens({field: [[1, 2, 3], [4, 5], [6]]}, kind) == 6
    assert estimate_prompt_tokens({field: []}, kind) == 0
    assert estimate_prompt_tokens({field: [[]]}, kind) == 0


@pytest.mark.parametrize(("kind", "field"), [("completions", "prompt"), ("embeddings", "input")])
def test_text_inputs_are_estimated(kind: str, field: str) -> None:
    assert estimate_prompt_tokens({field: LRU_DOC}, kind) == estimate_text_tokens(LRU_DOC)
    both = estimate_text_tokens(LRU_DOC) + estimate_text_tokens(DEDENT_DOC)
    assert estimate_prompt_tokens({field: [LRU_DOC, DEDENT_DOC]}, kind) == both
    assert estimate_prompt_tokens({field: None}, kind) == 0


def test_completions_counts_the_suffix() -> None:
    body = {"prompt": "def add(a, b):", "suffix": "    return a + b\n"}
    assert estimate_prompt_tokens(body, "completions") == estimate_text_tokens(body["prompt"]) + estimate_text_tokens(
        body["suffix"]
    )


def test_an_unknown_kind_counts_the_whole_body() -> None:
    assert estimate_prompt_tokens({"input": LRU_DOC}, "responses") >= estimate_text_tokens(LRU_DOC)


# ---------------------------------------------------------------- against a real tokenizer


@pytest.fixture(scope="module")
def cl100k() -> Any:
    bpe_openai = pytest.importorskip("bpe_openai")
    return bpe_openai.get_encoding("cl100k_base")


@pytest.mark.parametrize("name", [name for name in REAL_TEXTS if name != "heapq._siftdown source"])
def test_estimate_is_not_below_cl100k_on_real_text(cl100k: Any, name: str) -> None:
    text = REAL_TEXTS[name]
    real = len(cl100k.encode_ordinary(text))
    assert estimate_text_tokens(text) >= real


def test_code_is_at_worst_slightly_below_cl100k(cl100k: Any) -> None:
    """Kept as a known miss: the fused identifiers (startpos, newitem, parentpos) are two
    tokens each, but one word to the estimator. bench/ESTIMATOR.md measures how often
    code goes below (0.2% of samples) and by how much (at worst ~0.8x)."""
    real = len(cl100k.encode_ordinary(SIFTDOWN_SRC))
    assert 0.9 * real <= estimate_text_tokens(SIFTDOWN_SRC) <= 1.6 * real


@pytest.mark.parametrize("text", ENGLISH, ids=["json", "dedent", "lru_cache", "siftdown"])
def test_english_is_not_overestimated_by_a_silly_margin(cl100k: Any, text: str) -> None:
    assert estimate_text_tokens(text) <= 1.6 * len(cl100k.encode_ordinary(text))


def test_chat_estimate_covers_openais_own_count(cl100k: Any) -> None:
    """OpenAI's documented way to count a chat prompt: 3 per message, the text of every
    value, +1 per name, +3 for the reply."""
    msgs = [
        {"role": "system", "content": DEDENT_DOC},
        {"role": "user", "name": "example_user", "content": LRU_DOC},
        {"role": "assistant", "content": SIFTDOWN_SRC},
    ]
    real = 3
    for msg in msgs:
        real += 3 + sum(len(cl100k.encode_ordinary(v)) for v in msg.values()) + ("name" in msg)
    assert estimate_prompt_tokens(chat(*msgs), "chat") >= real
