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
    """Emits the text added by each token, decoding only a short window of recent ids.

    Text is the decode of ids[prefix:] minus the decode of ids[prefix:read]: decoding the previous token
    together with the new ones keeps word-boundary spaces right (SentencePiece, byte-level BPE), and a
    decode that ends in U+FFFD is an incomplete UTF-8 character, held back until its last byte arrives.
    """

    def __init__(self, tok) -> None:
        self._tok, self._ids = tok, []
        self._prefix = self._read = 0

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]


class HFTokenizer:
    """A HF tokenizer behind the ByteTokenizer interface.

    pad_id falls back to eos_id (then 0) when the tokenizer defines no pad token, as LLaMA tokenizers do:
    generation masks the pads out of attention, so any valid id serves as filler.
    """

    def __init__(self, tok) -> None:
        self._tok = tok
        self.bos_id: Optional[int] = tok.bos_token_id
        self.eos_id: Optional[int] = tok.eos_token_id
        if tok.pad_token_id is not None:
            self.pad_id: int = tok.pad_token_id
        else:
            self.pad_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.vocab_size: int = len(tok)

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self) -> _HFStreamDecoder:
        return _HFStreamDecoder(self._tok)


def load_tokenizer(path: str) -> HFTokenizer:
    """The HF tokenizer saved in checkpoint directory `path` (local files only, nothing downloaded)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"path: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {path}")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
