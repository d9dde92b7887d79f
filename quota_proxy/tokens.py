"""Offline token estimator: a conservative count without loading a tokenizer.

Why: the gateway holds a request's worst-case cost before forwarding it (prompt estimate
+ output cap) and, when an upstream reports no usage, charges an estimate of the prompt
and of the delivered text (SPEC §4). That runs on every request, so it must cost
microseconds; the upstreams are llama, qwen, mistral and OpenAI models, so no one
tokenizer is right. Instead: a documented estimate, deliberately on the high side, and
measured against cl100k_base and o200k_base (bench/estimator.py, bench/ESTIMATOR.md).

Method. The text's UTF-8 bytes are classified with one ``bytes.translate``; the classes
become one big integer, a byte per byte, so each count below is an AND and a popcount,
and "a run starts here" is one shift more (n & ~(n << 8)) — no Python loop over
characters. The estimate is the sum of rate x count, rounded up, at least 1.

    ASCII, English-like text and code              tokens
      a run of letters (a word)                    1.2
      a capital letter                             0.35
      a lower-to-upper change (camelCase)          1.4
      a digit / a run of digits                    1.0 / 0.4
      a punctuation character                      0.45
      a newline / a run of 2+ whitespace           1.35 / 0.95
    accented-Latin text (1+ Latin-1/extended/Vietnamese letter per 200 ASCII letters:
    French, German, Turkish...), whose words cost more: per ASCII letter 0.3, capital
    0.25, word 0.5 instead
    a non-ASCII character, by Unicode block (its lead byte)
      Cyrillic 0.65; Latin-1 supplement 0.9; combining marks, kana, full-width and
      compatibility forms, Vietnamese 1.0; Greek, Arabic 1.1; Hangul 1.25; Latin
      extended 1.35; punctuation and symbols (’ “ — … →) 1.4; CJK ideographs 1.55;
      Indic, Thai 1.9; Armenian, Hebrew, Syriac... 2.0; Georgian, Ethiopic, Khmer,
      Myanmar 2.8; emoji and other 4-byte characters 3.8
      plus 0.75 per word of another script (a space, then a non-ASCII character)

Request bodies add OpenAI's chat framing: 3 for the reply, 4 per message (3 + the role),
1 more per name; an image, audio or file part counts a flat IMAGE_TOKENS (768, about
OpenAI's 765 for a 1024x1024 high-detail image); tool calls count their name and
arguments + 4; tools/functions count their JSON text + 12, a json_schema
response_format its JSON text. Token-id prompts and inputs count exactly one per id.

A digit costs a whole token because Qwen, Gemma, Llama 2 and Mistral 7B split every
digit (cl100k and o200k take three at a time). The other rates were fitted by linear
programming (``python bench/estimator.py --fit``): the smallest mean ratio estimate/real
such that at most 4% of any category's samples fall below the larger of the two real
counts, then rounded up to 0.05.

Measured error, out of sample (bench/ESTIMATOR.md: 8,042 real samples of 200-4000
characters from files on the build machine; ratio = estimate / real; under = share of
samples where the estimate is below the real count):

    category             cl100k  median  p95   under    o200k  median  under
    English prose                1.21    1.57  0.8%            1.21    0.8%
    docs (README, NEWS)          1.22    1.59  0.8%            1.21    1.3%
    Python / C source            1.23 / 1.34   0.2/0.0%        1.22 / 1.31  0.2/0.5%
    JSON (as found / compact)    1.20 / 1.30   1.2/1.3%        1.21 / 1.26  1.2/1.7%
    numbers, data tables         1.45    2.00  2.2%            1.42    2.3%
    accented Latin languages     1.23    1.56  4.3%            1.38    2.3%
    Cyrillic                     1.25    1.67  2.5%            1.76    0.3%
    Chinese, Japanese, Korean    1.22    1.67  1.7%            1.56    0.3%
    Arabic, Hebrew, Persian      1.46    1.81  1.4%            2.63    0%
    Indic, Thai                  1.35    1.88  1.2%            3.56    0%
    Greek, Georgian, Armenian    1.21    1.41  2.0%            2.88    0%
    emoji                        1.10    1.23  2.2%            1.22    0%
    all 8,042 samples            1.25    1.70  1.5%            1.35    1.0%

The worst samples, 0.68-0.75, are German without an accented letter (lists of language
names; man pages that write ü as a groff escape), which reads as English, and 0.69 for
a CPython test file of deliberately rare Hangul syllables.
o200k tokenizes non-Latin scripts far better than cl100k, so there it is over-estimated
2-4x: the price of covering cl100k. A caller who writes text to defeat the estimate
(long random identifiers, rare words) can get below it; the gateway's balance can then
go negative by that difference, which is what SPEC §4 allows and documents.

Speed (best runs on a shared 2-CPU build machine): 2 KB of ASCII English in ~12 us,
~16 us with a few curly quotes; 7-9 us per KB of ASCII text, 9-12 us per KB of other
scripts. The cost is a handful of passes in C, so it is linear in the text's length.
"""

from __future__ import annotations

import json
import math
import operator
from typing import Any

import orjson

__all__ = [
    "FEATURES",
    "IMAGE_TOKENS",
    "MESSAGE_TOKENS",
    "NAME_TOKENS",
    "RATES",
    "REPLY_TOKENS",
    "TOOLS_TOKENS",
    "TOOL_CALL_TOKENS",
    "estimate_output_tokens",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
]

# ---------------------------------------------------------------- the text estimator

# Per-byte bit flags. The flagged text becomes one big integer (a byte per text byte), so
# counting a class is one AND and one popcount, and "class X right after class Y" (word
# starts, digit runs, whitespace runs, camelCase humps) one shift more — all in C.
_LETTER, _UPPER, _LOWER, _DIGIT, _PUNCT, _NEWLINE, _SPACE, _NONASCII = (1 << k for k in range(8))
_CHUNK = 1 << 15  # bytes per big integer; the masks below are this long

# A non-ASCII character is counted once, by its lead byte, which names its Unicode block.
_BLOCKS: tuple[tuple[str, range, str], ...] = (
    ("latin1", range(0xC2, 0xC4), "Latin-1 supplement: accented Western letters, ©, «», nbsp"),
    ("latin_ext", range(0xC4, 0xCB), "Latin extended A/B, IPA"),
    ("combining", range(0xCB, 0xCE), "spacing modifiers, combining diacritics"),
    ("greek", range(0xCE, 0xD0), "Greek, Coptic"),
    ("cyrillic", range(0xD0, 0xD4), "Cyrillic"),
    ("armenian_hebrew", range(0xD4, 0xD8), "Armenian, Hebrew (and the rare Cyrillic supplement)"),
    ("arabic", range(0xD8, 0xDC), "Arabic"),
    ("other2", range(0xDC, 0xE0), "Syriac, Thaana, N'Ko and other 2-byte scripts"),
    ("indic", range(0xE0, 0xE1), "Indic scripts, Thai, Lao, Tibetan"),
    ("e1", range(0xE1, 0xE2), "Georgian, Ethiopic, Khmer, Myanmar, Hangul jamo, Greek extended"),
    ("symbols", range(0xE2, 0xE3), "general punctuation (’ “ — …), symbols, arrows, box drawing"),
    ("kana", range(0xE3, 0xE4), "CJK punctuation, kana"),
    ("cjk", range(0xE4, 0xEA), "CJK ideographs"),
    ("hangul", range(0xEA, 0xEE), "Hangul syllables, Yi (and lone surrogates)"),
    ("compat", range(0xEE, 0xF0), "private use, compatibility and full-width forms"),
    ("astral", range(0xF0, 0xF5), "4-byte: emoji, rare CJK, historic scripts"),
)
# U+1E00–U+1EFF (Latin extended additional: Vietnamese) shares lead byte E1 with scripts
# that BPE vocabularies barely cover, so it is counted apart, by its first two bytes.
_VIETNAMESE = (b"\xe1\xb8", b"\xe1\xb9", b"\xe1\xba", b"\xe1\xbb")
_E1 = 9  # index of "e1" in _BLOCKS


def _tables() -> tuple[bytes, bytes, bytes, tuple[bytes, ...]]:
    flags = bytearray([_NONASCII]) * 256
    for b in range(128):
        c = chr(b)
        if c.islower():
            flags[b] = _LETTER | _LOWER
        elif c.isupper():
            flags[b] = _LETTER | _UPPER
        elif c.isdigit():
            flags[b] = _DIGIT
        elif c == "\n":
            flags[b] = _NEWLINE | _SPACE
        elif c in " \t\r\f\v":
            flags[b] = _SPACE
        else:
            flags[b] = _PUNCT
    leads = bytearray(range(256))
    symbols = []
    for i, (_, lead_bytes, _) in enumerate(_BLOCKS):
        symbols.append(bytes([0x41 + i]))
        for b in lead_bytes:
            leads[b] = 0x41 + i
    not_leads = bytes(b for b in range(256) if not 0xC2 <= b <= 0xF4)
    return bytes(flags), bytes(leads), not_leads, tuple(symbols)


_FLAGS, _LEADS, _NOT_LEADS, _SYMBOLS = _tables()
_M_LETTER, _M_UPPER, _M_DIGIT, _M_PUNCT, _M_NEWLINE, _M_SPACE, _M_NONASCII = (
    int.from_bytes(bytes([bit]) * _CHUNK, "little")
    for bit in (_LETTER, _UPPER, _DIGIT, _PUNCT, _NEWLINE, _SPACE, _NONASCII)
)

# What _features counts, in order. "*_acc" are the same counts in accented-Latin text
# (French, German, Turkish, ...), whose words cost more tokens than English ones.
FEATURES: tuple[str, ...] = (
    "upper", "words", "humps", "letters_acc", "upper_acc", "words_acc",
    "digits", "digit_runs", "punct", "newlines", "space_runs", "nonascii_words",
    *(name for name, _, _ in _BLOCKS), "vietnamese",
)  # fmt: skip

# Tokens per counted thing: `python bench/estimator.py --fit` (see the module docstring).
RATES: dict[str, float] = {
    # ASCII in English-like text and code
    "upper": 0.35,  # per capital letter: ALL-CAPS words split into more tokens
    "words": 1.2,  # per run of letters
    "humps": 1.4,  # per lower-to-upper change: camelCase splits there
    # ASCII letters in accented-Latin text, whose words cost more: by length, not by word
    "letters_acc": 0.3,
    "upper_acc": 0.25,
    "words_acc": 0.5,
    # the rest of ASCII
    "digits": 1.0,  # Qwen, Gemma, Llama 2, Mistral 7B: a token per digit (cl100k: per 3)
    "digit_runs": 0.4,
    "punct": 0.45,
    "newlines": 1.35,
    "space_runs": 0.95,  # runs of 2+ whitespace characters: indentation, alignment
    "nonascii_words": 0.75,  # a space then a non-ASCII character: a word of another script
    # per non-ASCII character, by block (_BLOCKS); never more than its UTF-8 length, as
    # byte-level BPE never spends more than a token per byte
    "latin1": 0.9,
    "latin_ext": 1.35,
    "combining": 1.0,
    "greek": 1.1,
    "cyrillic": 0.65,
    "armenian_hebrew": 2.0,
    "arabic": 1.1,
    "other2": 2.0,
    "indic": 1.9,
    "e1": 2.8,
    "symbols": 1.4,
    "kana": 1.0,
    "cjk": 1.55,
    "hangul": 1.25,
    "compat": 1.0,
    "astral": 3.8,
    "vietnamese": 1.0,
}
_RATE_VECTOR = tuple(RATES[name] for name in FEATURES)


def _features(text: str) -> tuple[int, ...]:
    """The counts the estimate is a weighted sum of, in FEATURES order (for ASCII text
    only the first 12: the rest are zero)."""
    raw = text.encode("utf-8", "surrogatepass")
    ascii_only = text.isascii()
    accented = 0
    if not ascii_only:
        # one symbol per non-ASCII character; take out one block at a time (texts mix few)
        leads = raw.translate(_LEADS, _NOT_LEADS)
        blocks = [0] * len(_BLOCKS)
        while leads:
            sym = leads[0]
            rest = leads.translate(None, _SYMBOLS[sym - 0x41])
            blocks[sym - 0x41] = len(leads) - len(rest)
            leads = rest
        vietnamese = sum(raw.count(pair) for pair in _VIETNAMESE) if blocks[_E1] else 0
        blocks[_E1] -= vietnamese
        accented = blocks[0] + blocks[1] + vietnamese
    letters = upper = words = humps = digits = digit_runs = punct = newlines = 0
    space_runs = nonascii_words = 0
    for start in range(0, len(raw), _CHUNK):
        n = int.from_bytes(raw[start : start + _CHUNK].translate(_FLAGS), "little")
        prev = n << 8  # byte i-1 now sits over byte i
        first = n ^ (n & prev)  # flags byte i has and byte i-1 had not: a run starts
        upper += (n & _M_UPPER).bit_count()
        words += (first & _M_LETTER).bit_count()
        humps += (n & (n << 7) & _M_UPPER).bit_count()  # LOWER of byte i-1 lands on UPPER of i
        digits += (n & _M_DIGIT).bit_count()
        digit_runs += (first & _M_DIGIT).bit_count()
        punct += (n & _M_PUNCT).bit_count()
        newlines += (n & _M_NEWLINE).bit_count()
        space_runs += ((first & _M_SPACE) << 8 & n).bit_count()  # runs of 2+ whitespace
        if not ascii_only:
            # SPACE of byte i-1 lands on NONASCII of byte i: a word in another script
            nonascii_words += (n & (n << 9) & _M_NONASCII).bit_count()
            if accented:
                letters += (n & _M_LETTER).bit_count()
    counts = (digits, digit_runs, punct, newlines, space_runs, nonascii_words)
    if ascii_only:
        return (upper, words, humps, 0, 0, 0, *counts)
    # One accented letter per 200 ASCII letters is not English (nor code).
    if accented * 200 > letters:
        return (0, 0, 0, letters, upper, words, *counts, *blocks, vietnamese)
    return (upper, words, humps, 0, 0, 0, *counts, *blocks, vietnamese)


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens of one text; 0 for ""."""
    if not text or not isinstance(text, str):
        return 0
    # any non-empty text is at least one token (a lone space scores 0 otherwise)
    return max(1, math.ceil(sum(map(operator.mul, _RATE_VECTOR, _features(text)))))  # type: ignore[no-any-return]


def estimate_output_tokens(text: str) -> int:
    """Estimated tokens of delivered completion text (same rates as prompts)."""
    return estimate_text_tokens(text)


# ---------------------------------------------------------------- request bodies

MESSAGE_TOKENS = 4  # per chat message: OpenAI's 3 of framing + 1 for the role
NAME_TOKENS = 1  # a message's "name" costs one more than its text
REPLY_TOKENS = 3  # every chat reply is primed with <|start|>assistant<|message|>
# An image, audio or file part: OpenAI's 765 for a 1024² high-detail image. Larger images,
# long audio and PDFs cost more; the upstream's usage then settles the difference.
IMAGE_TOKENS = 768
TOOLS_TOKENS = 12  # framing around tool/function definitions
TOOL_CALL_TOKENS = 4  # framing around one tool call in an assistant message
_MEDIA_PARTS = frozenset({"image_url", "image", "input_image", "input_audio", "audio", "file", "input_file"})


def _json_tokens(value: Any) -> int:
    """Tokens of a value's JSON text (tool definitions, odd content parts)."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # ints beyond 64 bits, non-str keys: let the stdlib try
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            return 0
    return estimate_text_tokens(text)


def _str_tokens(value: Any) -> int:
    return estimate_text_tokens(value) if isinstance(value, str) else 0


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += estimate_text_tokens(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if isinstance(part.get("text"), str):
                total += estimate_text_tokens(part["text"])
            elif isinstance(part.get("refusal"), str):
                total += estimate_text_tokens(part["refusal"])
            elif isinstance(kind, str) and kind in _MEDIA_PARTS:  # a list or object "type" is unhashable
                total += IMAGE_TOKENS
            else:  # an unknown part still reaches the model somehow: count its JSON
                total += _json_tokens(part)
    return total


def _call_tokens(call: Any) -> int:
    """A tool call or legacy function_call: its name and argument text."""
    if not isinstance(call, dict):
        return 0
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        return TOOL_CALL_TOKENS
    return TOOL_CALL_TOKENS + _str_tokens(fn.get("name")) + _str_tokens(fn.get("arguments"))


def _chat_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    total = REPLY_TOKENS
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            total += MESSAGE_TOKENS + _content_tokens(msg.get("content"))
            if isinstance(msg.get("name"), str):
                total += NAME_TOKENS + estimate_text_tokens(msg["name"])
            calls = msg.get("tool_calls")
            if isinstance(calls, list):
                total += sum(_call_tokens(c) for c in calls)
            total += _call_tokens(msg.get("function_call"))
            total += _str_tokens(msg.get("tool_call_id"))
    for key in ("tools", "functions"):
        if body.get(key):
            total += TOOLS_TOKENS + _json_tokens(body[key])
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        total += _json_tokens(fmt["json_schema"])
    return total


def _input_tokens(value: Any, depth: int = 0) -> int:
    """A completions prompt or an embeddings input: a string, token ids, or a list of either."""
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        return 0
    if isinstance(value, int):
        return 1  # one token id
    if depth >= 2:
        return 0
    return sum(_input_tokens(item, depth + 1) for item in value)


def estimate_prompt_tokens(body: dict[str, Any], kind: str) -> int:
    """Estimated prompt tokens of a request body; kind is "chat", "completions" or
    "embeddings". Total: odd shapes count 0, never raise (validation happens elsewhere)."""
    if not isinstance(body, dict):
        return 0
    if kind == "chat":
        return _chat_tokens(body)
    if kind == "completions":
        return _input_tokens(body.get("prompt")) + _str_tokens(body.get("suffix"))
    if kind == "embeddings":
        return _input_tokens(body.get("input"))
    return _json_tokens(body)  # an unknown kind: the whole body, to stay on the safe side
