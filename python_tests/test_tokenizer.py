"""Tokenizers: the byte tokenizer, HF tokenizers from a directory, incremental UTF-8 streaming."""

import pytest

from mmkernels.models.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_round_trip_and_streaming():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    dec = tok.stream_decoder()
    pieces = [dec.step(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    # A multi-byte character appears only once all of its bytes have arrived.
    emoji = "🙂".encode()
    dec = tok.stream_decoder()
    assert [dec.step(b) for b in emoji] == ["", "", "", "🙂"]


def test_hf_tokenizer_from_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    ids = tok.encode("hello world again")
    assert ids == [1, 3, 4, 5]
    assert tok.eos_id == 2 and tok.pad_id == 2  # no pad token: falls back to eos
    assert tok.decode(ids).split() == ["hello", "world", "again"]
    dec = tok.stream_decoder()
    assert "".join(dec.step(i) for i in ids).split() == ["hello", "world", "again"]


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_hf_stream_decoder_holds_back_partial_utf8(tmp_path):
    """A byte-level BPE with no merges: every byte is a token, so characters span several tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    core = tokenizers.Tokenizer(models.BPE(vocab, []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    text = "héllo 日本 🙂!"
    ids = tok.encode(text)
    assert len(ids) == 1 + len(text.encode()) and tok.decode(ids) == text
    dec = tok.stream_decoder()
    pieces = [dec.step(i) for i in ids + [tok.eos_id]] + [dec.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    emoji_at = 1 + len("héllo 日本 ".encode())
    assert pieces[emoji_at:emoji_at + 4] == ["", "", "", "🙂"]


def test_byte_decoder_replaces_invalid_and_truncated_utf8():
    tok = ByteTokenizer()
    cut = list("日".encode())[:2]
    assert tok.decode([tok.bos_id, 0x61] + cut + [tok.eos_id]) == "a\ufffd"
    dec = tok.stream_decoder()
    assert [dec.step(i) for i in [0x61] + cut] == ["a", "", ""]
    assert dec.flush() == "\ufffd"  # the stream ended inside a character
    assert dec.step(tok.pad_id) == ""  # special ids carry no text
