from __future__ import annotations
from typing import Any
def estimate_text_tokens(text: str) -> int:
    return len(text) // 3
def estimate_prompt_tokens(body: dict[str, Any], kind: str) -> int:
    return 0
def estimate_output_tokens(text: str) -> int:
    return estimate_text_tokens(text)
