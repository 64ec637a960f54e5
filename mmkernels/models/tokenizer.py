"""Tokenizers with one small interface: encode, decode, bos_id / eos_id / pad_id, stream_decoder().

`ByteTokenizer` needs no files (ids 0..255 are bytes; 256 bos, 257 eos, 258 pad) and serves the built-in
tiny model. `load_tokenizer(dir)` wraps the HF tokenizer saved with a checkpoint.
"""

from __future__ import annotations

import codecs
import os
from typing import List, Optional

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class _ByteStreamDecoder:
    """Emits text as soon as the bytes received so far form complete UTF-8 characters."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _ByteStreamDecoder:
        return _ByteStreamDecoder()


class _HFStreamDecoder:
    """Decodes the growing sequence and emits the new suffix, holding back an incomplete character."""

    def __init__(self, tok) -> None:
        self._tok, self._ids, self._emitted = tok, [], 0

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        new, self._emitted = text[self._emitted:], len(text)
        return new


class HFTokenizer:
    """A HF tokenizer behind the ByteTokenizer interface. pad falls back to eos when none is defined."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.bos_id: Optional[int] = tok.bos_token_id
        self.eos_id: Optional[int] = tok.eos_token_id
        self.pad_id: int = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self) -> _HFStreamDecoder:
        return _HFStreamDecoder(self._tok)


def load_tokenizer(path: str) -> HFTokenizer:
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"path: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {path}")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
