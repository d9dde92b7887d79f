"""Usage buckets per dialect, the weighted charge, the hold — and each billing mistake the
gateways in our field have shipped, shown to change the charge (so a regression fails)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quota_proxy.usage import (
    DEFAULT_WEIGHTS,
    AnthropicStreamUsage,
    Buckets,
    BucketWeights,
    affordable_output,
    charge,
    from_anthropic,
    from_chat,
    from_responses,
    worst_case_hold,
)

ONE = Fraction(1)
# A cache-heavy turn of a coding agent: most of the prompt is read from the cache.
CHAT = {
    "prompt_tokens": 12_000,
    "completion_tokens": 500,
    "total_tokens": 12_500,
    "prompt_tokens_details": {"cached_tokens": 10_000},
    "completion_tokens_details": {"reasoning_tokens": 300},
}
RESPONSES = {
    "input_tokens": 12_000,
    "input_tokens_details": {"cached_tokens": 10_000},
    "output_tokens": 500,
    "output_tokens_details": {"reasoning_tokens": 300},
    "total_tokens": 12_500,
}
ANTHROPIC = {
    "input_tokens": 1_500,
    "cache_read_input_tokens": 10_000,
    "cache_creation_input_tokens": 500,
    "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 100},
    "output_tokens": 500,
}
CACHE_PRICED = BucketWeights(
    cache_read=Fraction(1, 10), cache_write_5m=Fraction(5, 4), cache_write_1h=Fraction(2)
)


def test_chat_buckets() -> None:
    assert from_chat(CHAT) == Buckets(input=2_000, cache_read=10_000, output=500, reasoning=300)


def test_responses_buckets() -> None:
    assert from_responses(RESPONSES) == Buckets(input=2_000, cache_read=10_000, output=500, reasoning=300)


def test_responses_cache_writes_by_ttl() -> None:
    usage = {
        "input_tokens": 1000,
        "input_tokens_details": {
            "cached_tokens": 100,
            "cache_write_tokens": 300,
            "cache_write_tokens_details": {"ttl_30m_tokens": 200, "ttl_12h_tokens": 100},
        },
        "output_tokens": 7,
    }
    assert from_responses(usage) == Buckets(600, 100, 200, 100, 7)


def test_anthropic_buckets() -> None:
    assert from_anthropic(ANTHROPIC) == Buckets(1_500, 10_000, 400, 100, 500)


def test_anthropic_cache_creation_without_breakdown_is_5m() -> None:
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 70, "output_tokens": 3}
    assert from_anthropic(usage) == Buckets(10, 0, 70, 0, 3)


def test_every_dialect_agrees_on_one_conversation() -> None:
    chat, responses, claude = from_chat(CHAT), from_responses(RESPONSES), from_anthropic(ANTHROPIC)
    assert chat is not None and responses is not None and claude is not None
    assert chat.total == responses.total == 12_500
    assert claude.total == 12_500


@pytest.mark.parametrize(
    "raw",
    [None, "x", [], {}, {"prompt_tokens": -1}, {"prompt_tokens": True}, {"prompt_tokens": "5"}],
)
def test_unusable_chat_usage_is_none(raw: Any) -> None:
    assert from_chat(raw) is None


def test_garbage_details_are_clamped_not_trusted() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 99}}
    assert from_chat(usage) == Buckets(0, 10, 0, 0, 2)
    assert from_chat({"prompt_tokens": 10, "total_tokens": 15}) == Buckets(10, 0, 0, 0, 5)
    assert from_chat({"prompt_tokens": 10, "prompt_tokens_details": "x"}) == Buckets(10, 0, 0, 0, 0)
    assert from_responses({"output_tokens": 5}) is None
    assert from_anthropic({"cache_read_input_tokens": 5}) is None
    assert from_anthropic({"input_tokens": 3, "output_tokens": None, "cache_creation": []}) == Buckets(3)


def test_default_weights_keep_the_seed_formula() -> None:
    b = Buckets(2_000, 10_000, 400, 100, 500)
    assert charge(b, Fraction(3)) == 3 * 13_000
    assert charge(Buckets(input=1, output=2), Fraction(1, 2)) == 2  # ceil(1.5)
    assert BucketWeights().is_default and not CACHE_PRICED.is_default


def test_weighted_charge_is_exact() -> None:
    b = Buckets(input=1_500, cache_read=10_000, cache_write_5m=400, cache_write_1h=100, output=500)
    # 1500 + 1000 + 500 + 200 + 500 = 3700, × 1.1 = 4070 exactly (no float drift)
    assert charge(b, Fraction(11, 10), CACHE_PRICED) == 4070
    assert charge(Buckets(cache_read=1), ONE, CACHE_PRICED) == 1  # ceil(0.1)


def test_hold_covers_any_split_of_the_prompt() -> None:
    hold = worst_case_hold(1_000, 100, Fraction(2), CACHE_PRICED)
    assert hold == 2 * (2 * 1_000 + 100)
    for split in (Buckets(input=1_000, output=100), Buckets(cache_write_1h=1_000, output=100)):
        assert charge(split, Fraction(2), CACHE_PRICED) <= hold
    assert worst_case_hold(10, 5, Fraction(3)) == 45


def test_affordable_output_is_the_largest_cap_that_fits() -> None:
    cap = affordable_output(1_000, 100, Fraction(3, 2), CACHE_PRICED)
    assert worst_case_hold(100, cap, Fraction(3, 2), CACHE_PRICED) <= 1_000
    assert worst_case_hold(100, cap + 1, Fraction(3, 2), CACHE_PRICED) > 1_000
    assert affordable_output(0, 1, ONE) == 0
    assert affordable_output(50, 100, ONE) == 0


def test_anthropic_stream_takes_the_last_cumulative_usage() -> None:
    acc = AnthropicStreamUsage()
    acc.feed({"type": "message_start", "message": {"usage": {**ANTHROPIC, "output_tokens": 1}}})
    acc.feed({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}})
    acc.feed({"type": "message_delta", "usage": {"output_tokens": 200}})
    acc.feed({"type": "message_delta", "usage": {"output_tokens": 500, "input_tokens": 1_500}})
    assert acc.buckets() == Buckets(1_500, 10_000, 400, 100, 500)
    assert AnthropicStreamUsage().buckets() is None


# ---- the mistakes, each shown to change the charge ------------------------------------------


def test_mistake_cache_read_billed_at_full_price() -> None:
    right = charge(from_chat(CHAT) or Buckets(), ONE, CACHE_PRICED)
    wrong = charge(Buckets(input=12_000, output=500), ONE, CACHE_PRICED)
    assert right == 2_000 + 1_000 + 500
    assert wrong != right


def test_mistake_cache_writes_missed() -> None:
    right = charge(from_anthropic(ANTHROPIC) or Buckets(), ONE, CACHE_PRICED)
    missed = dict(ANTHROPIC)
    del missed["cache_creation_input_tokens"], missed["cache_creation"]
    wrong = charge(from_anthropic(missed) or Buckets(), ONE, CACHE_PRICED)
    assert right == 1_500 + 1_000 + 500 + 200 + 500
    assert wrong != right
    # Writes priced as the wrong kind (all 5m) change it too.
    as_5m = charge(Buckets(1_500, 10_000, 500, 0, 500), ONE, CACHE_PRICED)
    assert as_5m != right


def test_mistake_openai_input_copied_into_anthropic_input() -> None:
    """Responses' input_tokens includes the cached ones; written as Anthropic's input_tokens
    next to cache_read_input_tokens, the cached tokens would be billed twice."""
    b = from_responses(RESPONSES)
    assert b is not None
    copied = {
        "input_tokens": RESPONSES["input_tokens"],
        "cache_read_input_tokens": 10_000,
        "output_tokens": 500,
    }
    assert charge(from_anthropic(copied) or Buckets(), ONE) == 22_500
    assert charge(b, ONE) == 12_500


def test_mistake_usage_read_from_the_top_level_of_a_responses_event() -> None:
    event = {"type": "response.completed", "sequence_number": 9, "response": {"usage": RESPONSES}}
    assert from_responses(event) is None  # the top level has no usage: unbilled if trusted
    assert charge(from_responses(event["response"]["usage"]) or Buckets(), ONE) == 12_500


def test_mistake_reasoning_added_on_top_of_output() -> None:
    b = from_chat(CHAT)
    assert b is not None and b.reasoning == 300
    right = charge(b, ONE)
    wrong = charge(Buckets(b.input, b.cache_read, output=b.output + b.reasoning), ONE)
    assert right == 12_500 and wrong == 12_800


def test_mistake_cumulative_message_delta_summed() -> None:
    deltas = [{"type": "message_delta", "usage": {"output_tokens": n}} for n in (100, 300, 500)]
    acc = AnthropicStreamUsage()
    acc.feed({"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}})
    for d in deltas:
        acc.feed(d)
    right = charge(acc.buckets() or Buckets(), ONE)
    summed = charge(Buckets(input=10, output=1 + 100 + 300 + 500), ONE)
    assert right == 510 and summed != right


@given(
    st.tuples(*[st.integers(min_value=0, max_value=10**9)] * 5),
    st.fractions(min_value=Fraction(1, 1000), max_value=1000),
    st.integers(min_value=0, max_value=10**9),
)
def test_the_integer_fast_path_charges_what_the_fraction_path_does(
    counts: tuple[int, int, int, int, int], multiplier: Fraction, cap: int
) -> None:
    """Unweighted routes skip Fraction arithmetic; an equal but distinct weights object
    takes the exact Fraction path, and both must agree to the token."""
    b = Buckets(*counts)
    slow = BucketWeights()
    assert slow is not DEFAULT_WEIGHTS
    assert charge(b, multiplier, DEFAULT_WEIGHTS) == charge(b, multiplier, slow)
    assert worst_case_hold(counts[0], cap, multiplier, DEFAULT_WEIGHTS) == worst_case_hold(
        counts[0], cap, multiplier, slow
    )
