"""The byte-level tokenizer of the bundled models: ids 0-255 are bytes, then BOS, EOS, PAD."""
from __future__ import annotations

from planc.models.registry import BOS_ID


def encode(text: str, bos: bool = True) -> list[int]:
    return ([BOS_ID] if bos else []) + list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Bytes to text; special ids are dropped, broken UTF-8 shows as U+FFFD."""
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

