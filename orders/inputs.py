"""What every service accepts as text from its callers: the limits and the character rule, once."""

from __future__ import annotations

import re

MAX_ID_LENGTH = 128  # request ids, customer ids
MAX_SKU_LENGTH = 64
MAX_NAME_LENGTH = 200  # product names (and a name prefix searched for)
MAX_REASON_LENGTH = 500
SKU_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_SKU_LENGTH - 1}}}")


def text_problem(value: str, max_length: int, *, required: bool = False) -> str | None:
    """Why a text input cannot be used (None when it can): missing (when required), too long, or
    holding control characters (PostgreSQL cannot even store a NUL)."""
    if required and not value.strip():
        return "is required"
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "must not contain control characters"
    return None
