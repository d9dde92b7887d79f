"""Offline token estimator (DRAFT: rates being fitted)."""

from __future__ import annotations

import math
import operator
from typing import Any

import orjson

# Byte classes of the UTF-8 text. ASCII bytes by kind; a non-ASCII character is counted
# once, by its lead byte, which names its Unicode block; continuation bytes are free.
_ASCII_LOWER, _ASCII_UPPER, _DIGIT, _PUNCT, _NEWLINE, _TAB, _SPACE, _CONT = b"aAdpnt c"

# (symbol, lead bytes, what lives there) — one rate each, in _RATES below.
_BLOCKS: tuple[tuple[bytes, range, str], ...] = (
    (b"1", range(0xC2, 0xC4), "Latin-1 supplement: accented Western letters, ©, «», nbsp"),
    (b"2", range(0xC4, 0xCB), "Latin extended A/B, IPA"),
    (b"3", range(0xCB, 0xCE), "spacing modifiers, combining diacritics"),
    (b"4", range(0xCE, 0xD0), "Greek, Coptic"),
    (b"5", range(0xD0, 0xD5), "Cyrillic"),
    (b"6", range(0xD5, 0xD8), "Armenian, Hebrew"),
    (b"7", range(0xD8, 0xDC), "Arabic"),
    (b"8", range(0xDC, 0xE0), "Syriac, Thaana, N'Ko, other 2-byte scripts"),
    (b"E", range(0xE0, 0xE1), "Indic scripts, Thai, Lao, Tibetan"),
    (b"F", range(0xE1, 0xE2), "Georgian, Ethiopic, Khmer, Myanmar, ... (Vietnamese counted apart)"),
    (b"G", range(0xE2, 0xE3), "general punctuation, symbols, arrows, box drawing"),
    (b"H", range(0xE3, 0xE4), "CJK punctuation, kana"),
    (b"I", range(0xE4, 0xEA), "CJK ideographs"),
    (b"J", range(0xEA, 0xEE), "Hangul syllables, Yi (and lone surrogates)"),
    (b"K", range(0xEE, 0xF0), "private use, compatibility and full-width forms"),
    (b"L", range(0xF0, 0xF5), "4-byte: emoji, rare CJK, historic scripts"),
)
# U+1E00–U+1EFF (Latin extended additional: Vietnamese) share lead byte E1 with scripts
# that BPE vocabularies barely cover, so they are counted apart by their first two bytes.
_VIETNAMESE = (b"\xe1\xb8", b"\xe1\xb9", b"\xe1\xba", b"\xe1\xbb")


def _tables() -> tuple[bytes, bytes, bytes]:
    cls = bytearray(_PUNCT.to_bytes(1, "big") * 256)
    shape = bytearray(b" " * 256)  # letters 'a', everything else ' '
    for b in range(128):
        c = chr(b)
        if "a" <= c <= "z":
            cls[b] = _ASCII_LOWER
        elif "A" <= c <= "Z":
            cls[b] = _ASCII_UPPER
        elif c.isdigit():
            cls[b] = _DIGIT
        elif c == "\n":
            cls[b] = _NEWLINE
        elif c == "\t":
            cls[b] = _TAB
        elif c in " \r\f\v":
            cls[b] = _SPACE
        if c.isalpha():
            shape[b] = ord("a")
    for b in range(0x80, 0xC0):
        cls[b] = _CONT
    for sym, leads, _ in _BLOCKS:
        for b in leads:
            cls[b] = sym[0]
    symbols = b"".join(sym for sym, _, _ in _BLOCKS)
    return bytes(cls), bytes(shape), symbols


_CLASS, _SHAPE, _BLOCK_SYMBOLS = _tables()

FEATURES = (
    "letters", "upper", "words",            # ASCII letters in mostly-English text
    "letters_acc", "upper_acc", "words_acc",  # ... in accented-Latin text
    "digit_groups", "punct", "newlines", "tabs", "space_pairs", "humps",
    *(f"block_{s.decode()}" for s, _, _ in _BLOCKS), "vietnamese",
)


def _features(text: str) -> tuple[int, ...]:
    raw = text.encode("utf-8", "surrogatepass")
    cls = raw.translate(_CLASS)
    shape = raw.translate(_SHAPE)
    lower = cls.count(b"a")
    upper = cls.count(b"A")
    words = shape.count(b" a") + (shape[:1] == b"a")
    digits = cls.count(b"d")
    # A run of k digits is ceil(k/3) tokens; k - 2*floor(k/3) bounds that from above.
    digit_groups = digits - 2 * cls.count(b"ddd")
    tail = (
        digit_groups,
        cls.count(b"p"),
        cls.count(b"n"),
        cls.count(b"t"),
        cls.count(b"  "),
        cls.count(b"aA"),
    )
    if text.isascii():
        return (lower + upper, upper, words, 0, 0, 0, *tail)
    blocks = [cls.count(s) for s in (_BLOCK_SYMBOLS[i : i + 1] for i in range(len(_BLOCK_SYMBOLS)))]
    viet = 0
    if blocks[9]:
        viet = sum(raw.count(v) for v in _VIETNAMESE)
        blocks[9] -= viet
    accented = blocks[0] + blocks[1] + viet
    letters = lower + upper
    if accented * 200 > letters:
        head: tuple[int, ...] = (0, 0, 0, letters, upper, words)
    else:
        head = (letters, upper, words, 0, 0, 0)
    return (*head, *tail, *blocks, viet)


_RATES: tuple[float, ...] = tuple(1.0 for _ in FEATURES)


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens of one text; 0 for ""."""
    if not text or not isinstance(text, str):
        return 0
    return math.ceil(sum(map(operator.mul, _RATES, _features(text))))


def estimate_output_tokens(text: str) -> int:
    return estimate_text_tokens(text)


def estimate_prompt_tokens(body: dict[str, Any], kind: str) -> int:
    return 0
