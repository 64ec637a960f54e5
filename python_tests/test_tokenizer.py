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
