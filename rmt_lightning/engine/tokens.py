"""Raw bytes of single tokens, so rewards compare predictions with the exact corpus bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table: byte-level BPE writes each byte as one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_type(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type")


class TokenBytes:
    """Raw bytes of single tokens, so rewards compare predictions with the exact corpus bytes.

    Byte-level BPE tokens map back through the GPT-2 byte table; SentencePiece-style tokens through
    ``▁`` and ``<0xNN>``; anything else falls back to decoding the token alone.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = _decoder_type(tokenizer) == "ByteLevel"
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level:
            table = _byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        if "▁" in piece:
            return piece.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def many(self, token_ids: Sequence[int]) -> list[bytes]:
        """Bytes of each token in ``token_ids``."""
        return [self(int(token_id)) for token_id in token_ids]
