"""Training data: formats, masking, errors with file:line, packing, batching, the resumable sharded loader,
image preprocessing (against transformers' CLIP image processor) and the tokenizer/model check."""

import json
import sys

import numpy as np
import pytest
import torch

from mmkernels.models.tokenizer import ByteTokenizer
from mmkernels.train.data import (
    IGNORE_INDEX, DataError, Loader, MultipleChoice, PackedRow, Sample, alpaca_prompt, chat_prompt,
    check_tokenizer, choice_predictions, choice_prompt, collate, instruction_samples, multimodal_samples,
    pack, scienceqa_choices, scienceqa_prompt, scienceqa_samples,
)
from mmkernels.train.images import CLIP_MEAN, CLIP_STD, load_image, preprocess, save_image_npy

TOK = ByteTokenizer()


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def normalised(hwc):
    x = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------- instruction


def test_instruction_masking_exact_with_and_without_input(tmp_path):
    recs = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "output": "Hello there"},
            {"instruction": "Greet.", "input": "", "output": "Hi"}]
    samples = instruction_samples(write_jsonl(tmp_path / "a.jsonl", recs), TOK, max_len=512)
    assert len(samples) == 3
    for s, r in zip(samples, recs):
        prompt = TOK.encode(alpaca_prompt(r["instruction"], r.get("input", "")), add_bos=True)
        target = TOK.encode(r["output"], add_bos=False) + [TOK.eos_id]
        assert s.input_ids == prompt + target
        assert s.labels == [IGNORE_INDEX] * len(prompt) + target
        assert s.image is None
    assert "### Input:\n2 and 3" in TOK.decode(samples[0].input_ids)
    assert "### Input" not in TOK.decode(samples[1].input_ids)
    assert samples[2].input_ids[:-3] == samples[1].input_ids[:-12]  # an empty input uses the no-input template
    assert samples[1].source.endswith("a.jsonl:2")


def test_instruction_truncates_output_side(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say", "output": "x" * 100}])
    prompt_len = len(TOK.encode(alpaca_prompt("Say"), add_bos=True))
    (s,) = instruction_samples(path, TOK, max_len=prompt_len + 7)
    assert len(s.input_ids) == prompt_len + 7
    assert s.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert s.labels[prompt_len:] == [ord("x")] * 7


def test_instruction_prompt_too_long_error_or_skip(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "ok"},
                                              {"instruction": "y" * 300, "output": "ok"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: the prompt"):
        instruction_samples(path, TOK, max_len=200)
    with pytest.warns(UserWarning, match=r"skipped 1 record"):
        samples = instruction_samples(path, TOK, max_len=200, too_long="skip")
    assert [s.source[-1] for s in samples] == ["1"]


def test_json_array_file_with_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "A", "output": "b"},\n\n  {"instruction": "C",\n   "output": "d"}\n]\n')
    samples = instruction_samples(str(path), TOK, max_len=512)
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["2", "4"]
    path.write_text('[\n  {"instruction": "A", "output": "b"},\n  {"instruction": "C"}\n]')
    with pytest.raises(DataError, match=r"a\.json:3: missing field 'output'"):
        instruction_samples(str(path), TOK, max_len=512)
    path.write_text('[\n  {"instruction": "A", "output": "b"},\n  {"instruction": "C",, }\n]')
    with pytest.raises(DataError, match=r"a\.json:3: malformed JSON"):
        instruction_samples(str(path), TOK, max_len=512)


# ---------------------------------------------------------------------------------------------- errors

GOOD = {"instruction": "A", "output": "b"}
ERROR_CASES = [
    ("instruction", [GOOD, '{"instruction": "A", "output": }'], 2, "malformed JSON"),
    ("instruction", [GOOD, GOOD, {"instruction": "A"}], 3, "missing field 'output'"),
    ("instruction", [{"instruction": 3, "output": "b"}], 1, "field 'instruction': expected a string, got int"),
    ("instruction", [GOOD, {"instruction": "A", "output": "  "}], 2, "field 'output' is empty"),
    ("instruction", [GOOD, "[1, 2]"], 2, "expected a JSON object"),
    ("instruction", [GOOD, {"instruction": "A", "input": ["x"], "output": "b"}], 2, "field 'input'"),
    ("multimodal", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                    {"image": "missing.npy", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                               {"from": "gpt", "value": "a"}]}],
     2, "image file not found: .*missing\\.npy"),
    ("multimodal", [{"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}],
     1, "marker but the record has no 'image'"),
    ("multimodal", [{"conversations": [{"from": "gpt", "value": "q"}, {"from": "human", "value": "a"}]}],
     1, r"conversations\[0\]: expected 'from' 'human'"),
    ("multimodal", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}],
     1, "is empty"),
    ("multimodal", [{"conversations": [{"from": "human", "value": "q"}]}], 1, "no 'gpt' turn"),
    ("multimodal", [{"conversations": "hi"}], 1, "field 'conversations': expected a list"),
    ("scienceqa", [{"question": "q", "choices": ["a", "b"], "answer": 0},
                   {"question": "q", "choices": ["a", "b"], "answer": 2}], 2, "index 2 out of range for 2 choices"),
    ("scienceqa", [{"question": "q", "choices": ["a", "b"], "answer": True}], 1, "field 'answer': expected an int"),
    ("scienceqa", [{"question": "q", "choices": ["a"], "answer": 0}], 1, "expected 2 to 26 options"),
    ("scienceqa", [{"question": "q", "choices": ["a", 5], "answer": 0}], 1, r"'choices'\[1\]"),
    ("scienceqa", [{"choices": ["a", "b"], "answer": 0}], 1, "missing field 'question'"),
    ("scienceqa", [{"question": "q", "choices": ["a", "b"], "answer": 0, "image": "nope.png"}], 1,
     "image file not found: .*nope\\.png"),
]


def _read(kind, path):
    if kind == "instruction":
        return instruction_samples(path, TOK, max_len=512)
    if kind == "multimodal":
        return multimodal_samples(path, TOK, max_len=512, image_size=8)
    return scienceqa_samples(path, TOK, max_len=512, image_size=8)


@pytest.mark.parametrize("kind,records,line,message", ERROR_CASES)
def test_errors_name_file_and_line(tmp_path, kind, records, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=rf"bad\.jsonl:{line}: .*{message}"):
        _read(kind, path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: no records"):
        instruction_samples(str(tmp_path / "empty.jsonl"), TOK, max_len=64)
    with pytest.raises(DataError, match=r"absent\.jsonl: file not found"):
        instruction_samples(str(tmp_path / "absent.jsonl"), TOK, max_len=64)
    (tmp_path / "latin.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"x": "\xff"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        instruction_samples(str(tmp_path / "latin.jsonl"), TOK, max_len=64)


def test_bad_image_content_names_file_line_and_image(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 4, 2), dtype=np.uint8))
    path = write_jsonl(tmp_path / "mm.jsonl", [{"image": "flat.npy", "conversations": [
        {"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}])
    with pytest.raises(DataError, match=r"mm\.jsonl:1: cannot load image .*flat\.npy.*\(H, W, 3\)"):
        multimodal_samples(path, TOK, max_len=64, image_size=4)


# ---------------------------------------------------------------------------------------------- multimodal


def test_multimodal_only_gpt_turns_trained_and_marker_removed(tmp_path):
    (tmp_path / "imgs").mkdir()
    img = rgb(6, 6, seed=1)
    save_image_npy(str(tmp_path / "imgs" / "cat.npy"), img)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]
    path = write_jsonl(tmp_path / "mm.jsonl", [{"image": "imgs/cat.npy", "conversations": turns},
                                               {"conversations": [{"from": "human", "value": "What is it?"},
                                                                  turns[1]]}])
    with_img, text_only = multimodal_samples(path, TOK, max_len=512, image_size=6)
    h1 = TOK.encode(chat_prompt("What is it?"), add_bos=False)
    g1 = TOK.encode("A cat.", add_bos=False) + [TOK.eos_id]
    h2 = TOK.encode(chat_prompt("Colour?"), add_bos=False)
    g2 = TOK.encode("Grey.", add_bos=False) + [TOK.eos_id]
    m = [IGNORE_INDEX]
    assert with_img.input_ids == [TOK.bos_id] + h1 + g1 + h2 + g2
    assert with_img.labels == m + m * len(h1) + g1 + m * len(h2) + g2
    assert "<image>" not in TOK.decode(with_img.input_ids)
    torch.testing.assert_close(with_img.image, normalised(img), rtol=0, atol=1e-6)
    assert text_only.image is None and text_only.input_ids == [TOK.bos_id] + h1 + g1
    # image_root overrides the directory of the data file
    path2 = write_jsonl(tmp_path / "mm2.jsonl", [{"image": "cat.npy", "conversations": turns[:2]}])
    (s,) = multimodal_samples(path2, TOK, max_len=512, image_size=4, image_root=str(tmp_path / "imgs"))
    assert s.image.shape == (3, 4, 4)


def test_multimodal_truncation_keeps_trained_tokens_only_in_range(tmp_path):
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a" * 50},
             {"from": "human", "value": "again"}, {"from": "gpt", "value": "b" * 50}]
    path = write_jsonl(tmp_path / "mm.jsonl", [{"conversations": turns}])
    (s,) = multimodal_samples(path, TOK, max_len=40, image_size=4)
    n_prompt = 1 + len(TOK.encode(chat_prompt("q"), add_bos=False))
    assert len(s.input_ids) == 40
    assert s.labels == [IGNORE_INDEX] * n_prompt + [ord("a")] * (40 - n_prompt)


# ---------------------------------------------------------------------------------------------- ScienceQA


def test_scienceqa_prompt_target_and_choice_scoring(tmp_path):
    save_image_npy(str(tmp_path / "p.npy"), rgb(5, 5))
    recs = [{"question": "Which is a fish?", "choices": ["cat", "trout", "owl"], "answer": 1,
             "hint": "Animals.", "image": "p.npy"},
            {"question": "2+2?", "choices": ["4", "5"], "answer": 0, "context": ""}]
    path = write_jsonl(tmp_path / "sqa.jsonl", recs)
    samples = scienceqa_samples(path, TOK, max_len=512, image_size=5)
    prompt = scienceqa_prompt("Which is a fish?", ["cat", "trout", "owl"], "Animals.")
    assert prompt == ("Context: Animals.\nQuestion: Which is a fish?\nOptions: (A) cat (B) trout (C) owl\n"
                      "Answer: The answer is (")
    p_ids = TOK.encode(prompt, add_bos=True)
    assert samples[0].input_ids == p_ids + [ord("B"), TOK.eos_id]
    assert samples[0].labels == [IGNORE_INDEX] * len(p_ids) + [ord("B"), TOK.eos_id]
    assert samples[0].image.shape == (3, 5, 5) and samples[1].image is None
    assert "Context" not in TOK.decode(samples[1].input_ids)

    ids, letters, answer = choice_prompt(recs[0], TOK)
    assert (ids, letters, answer) == (p_ids, [ord("A"), ord("B"), ord("C")], 1)
    items = scienceqa_choices(path, TOK, image_size=5)
    assert isinstance(items[0], MultipleChoice) and items[0].choice_ids == letters and items[1].answer == 0
    logits = torch.zeros(2, TOK.vocab_size)
    logits[0, ord("C")] = 3.0
    logits[0, ord("Z")] = 9.0  # not an option letter of item 0: must not win
    logits[1, ord("A")] = 1.0
    assert choice_predictions(logits, items).tolist() == [2, 0]
    with pytest.raises(DataError, match="record: field 'answer'"):
        choice_prompt({"question": "q", "choices": ["a", "b"], "answer": -1}, TOK)


def test_scienceqa_sample_of_exactly_max_len_is_kept(tmp_path):
    """A record whose prompt + answer letter + eos is exactly max_len tokens fits; one token less is an error
    (or skipped), never a truncated prompt."""
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "2+2?", "choices": ["4", "5"], "answer": 0}])
    n = len(TOK.encode(scienceqa_prompt("2+2?", ["4", "5"]), add_bos=True)) + 2
    (sample,) = scienceqa_samples(path, TOK, max_len=n, image_size=5)
    assert len(sample.input_ids) == n and sample.labels[-2:] == [ord("A"), TOK.eos_id]
    with pytest.raises(DataError, match=rf"s\.jsonl:1: the prompt \({n - 2} tokens\) leaves no room for 2 trained"):
        scienceqa_samples(path, TOK, max_len=n - 1, image_size=5)
    with pytest.warns(UserWarning, match="skipped 1 record"):
        assert scienceqa_samples(path, TOK, max_len=n - 1, image_size=5, too_long="skip") == []


# ---------------------------------------------------------------------------------------------- packing


def _sample(n, start=0, src="s"):
    ids = list(range(start, start + n))
    return Sample(ids, [IGNORE_INDEX] + ids[1:], None, src)


def _first_fit(lengths, cap):
    rows, room = [], []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(cap - n)
    return rows


def test_pack_first_fit_positions_segments_labels():
    samples = [_sample(n, 10 * k, f"s{k}") for k, n in enumerate([6, 5, 4, 3, 2])]
    samples[2].labels = list(samples[2].input_ids)  # a trained first token must still not cross samples
    rows = pack(samples, max_len=10)
    assert [r.sources for r in rows] == [["s0", "s2"], ["s1", "s3", "s4"]]
    r0 = rows[0]
    assert r0.input_ids == samples[0].input_ids + samples[2].input_ids
    assert r0.positions == list(range(6)) + list(range(4))
    assert r0.segment_ids == [0] * 6 + [1] * 4
    assert r0.labels == [IGNORE_INDEX] + list(range(1, 6)) + [IGNORE_INDEX] + list(range(21, 24))
    assert rows[1].segment_ids == [0] * 5 + [1] * 3 + [2] * 2

    lengths = torch.randint(1, 33, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = pack([_sample(n, src=str(i)) for i, n in enumerate(lengths)], max_len=40)
    assert [[int(s) for s in r.sources] for r in rows] == _first_fit(lengths, 40)
    assert all(len(r.input_ids) <= 40 for r in rows)


def test_pack_rejects_images_and_long_samples():
    img = Sample([1, 2], [IGNORE_INDEX, 2], torch.zeros(3, 2, 2), "f:3")
    with pytest.raises(ValueError, match="f:3: has an image"):
        pack([_sample(3), img], max_len=8)
    with pytest.raises(ValueError, match="f:9: length 9 exceeds max_len=8"):
        pack([_sample(9, src="f:9")], max_len=8)


def test_collate_plain_mixed_images_and_packed():
    a = Sample([1, 2, 3], [IGNORE_INDEX, 2, 3], torch.ones(3, 2, 2), "a")
    b = Sample([4, 5], [IGNORE_INDEX, 5], None, "b")
    batch = collate([a, b], pad_id=7)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 7]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[True] * 3, [True, True, False]]
    assert batch.has_image.tolist() == [True, False]
    assert torch.equal(batch.images[0], torch.ones(3, 2, 2)) and torch.equal(batch.images[1], torch.zeros(3, 2, 2))
    assert batch.positions is None and batch.segment_ids is None
    assert collate([b], pad_id=0).images is None

    rows = [PackedRow([1, 2, 3, 4], [IGNORE_INDEX, 2, IGNORE_INDEX, 4], [0, 1, 0, 1], [0, 0, 1, 1]),
            PackedRow([5, 6], [IGNORE_INDEX, 6], [0, 1], [0, 0])]
    pb = collate(rows, pad_id=0)
    assert pb.positions.tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert pb.segment_ids.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert pb.labels[1].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(TypeError, match="expected all Sample"):
        collate([a, rows[0]], pad_id=0)
    with pytest.raises(ValueError, match="must share a shape"):
        collate([a, Sample([1], [1], torch.ones(3, 4, 4))], pad_id=0)


# ---------------------------------------------------------------------------------------------- loader


def _samples(n):
    return [_sample(1 + (7 * i) % 9, 100 + i, str(i)) for i in range(n)]


def _ids(batch):
    return [tuple(row) for row in batch.input_ids.tolist()]


def _take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(_ids(batch))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_loader_deterministic_and_resumes_exactly(packed):
    data = _samples(23)
    kw = dict(pad_id=0, packed=packed, max_len=16 if packed else None)
    full = _take(Loader(data, 3, seed=5, **kw), 20)  # crosses epoch boundaries
    assert full == _take(Loader(data, 3, seed=5, **kw), 20)
    assert full != _take(Loader(data, 3, seed=6, **kw), 20)
    for k in (1, 4, len(Loader(data, 3, seed=5, **kw)), 11):
        first = Loader(data, 3, seed=5, **kw)
        got = _take(first, k)
        state = first.state_dict()
        assert set(state) == {"epoch", "position", "seed"}
        resumed = Loader(data, 3, seed=0, **kw)
        resumed.load_state_dict(state)
        assert got + _take(resumed, 20 - k) == full


def test_loader_epochs_differ_and_cover_all():
    data = _samples(10)
    loader = Loader(data, 4, seed=1, pad_id=0)
    epochs = [[row for b in loader for row in _ids(b)] for _ in range(2)]
    assert epochs[0] != epochs[1]
    for e in epochs:  # pad_id 0 never occurs in the data
        assert sorted(tuple(x for x in row if x) for row in e) == sorted(tuple(s.input_ids) for s in data)
    assert [len(b.input_ids) for b in Loader(data, 4, seed=1, pad_id=0)] == [4, 4, 2]
    assert [len(b.input_ids) for b in Loader(data, 4, seed=1, pad_id=0, drop_last=True)] == [4, 4]
    unshuffled = [row for b in Loader(data, 4, shuffle=False, pad_id=0) for row in _ids(b)]
    assert [tuple(x for x in r if x != 0) for r in unshuffled] == [tuple(s.input_ids) for s in data]


@pytest.mark.parametrize("n,drop_last", [(17, False), (17, True), (18, False), (5, False)])
def test_loader_sharding_disjoint_and_complete(n, drop_last):
    data = _samples(n)
    world, bs = 3, 2
    loaders = [Loader(data, bs, seed=3, drop_last=drop_last, pad_id=0, rank=r, world_size=world)
               for r in range(world)]
    for _ in range(2):  # two epochs
        seen = []
        per_rank = []
        for ld in loaders:
            batches = list(ld)
            per_rank.append(len(batches))
            for b in batches:
                assert len(b.input_ids) <= bs
                seen += [tuple(x for x in row if x != 0) for row in b.input_ids.tolist()]
        assert len(seen) == len(set(seen))
        expected = n - (n % (bs * world) if drop_last else 0)
        assert len(seen) == expected
        assert set(seen) <= {tuple(s.input_ids) for s in data}
        if drop_last:
            assert len(set(per_rank)) == 1
    # the global batch g is the concatenation of the ranks' batch g, in rank order
    single = [_ids(b) for b in Loader(data, bs * world, seed=3, drop_last=drop_last, pad_id=0)]
    ranks = [[_ids(b) for b in Loader(data, bs, seed=3, drop_last=drop_last, pad_id=0, rank=r, world_size=world)]
             for r in range(world)]
    for g in range(n // (bs * world)):
        assert [tuple(x for x in r if x) for r in single[g]] == \
            [tuple(x for x in r if x) for k in range(world) for r in ranks[k][g]]


def test_loader_argument_errors():
    data = _samples(4)
    with pytest.raises(ValueError, match="rank: expected an int in \\[0, 2\\)"):
        Loader(data, 2, pad_id=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="max_len: required"):
        Loader(data, 2, pad_id=0, packed=True)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(data, 0, pad_id=0)
    with pytest.raises(ValueError, match="has no batch"):
        list(Loader(data, 8, pad_id=0, drop_last=True))
    with pytest.raises(ValueError, match="state\\['position'\\]"):
        Loader(data, 2, pad_id=0).load_state_dict({"epoch": 0, "seed": 0})


# ---------------------------------------------------------------------------------------------- images


def test_image_npy_and_pt_formats(tmp_path):
    img = rgb(7, 7, seed=2)
    save_image_npy(str(tmp_path / "a.npy"), img)
    torch.save(torch.from_numpy(img), tmp_path / "b.pt")
    torch.save(torch.from_numpy(img).permute(2, 0, 1).double() / 255, tmp_path / "c.pt")
    np.save(tmp_path / "d.npy", img[:, :, 0])
    expected = normalised(img)
    for name in ("a.npy", "b.pt", "c.pt"):
        torch.testing.assert_close(load_image(str(tmp_path / name), 7), expected, rtol=0, atol=1e-6)
    gray = load_image(str(tmp_path / "d.npy"), 7)
    torch.testing.assert_close(gray, normalised(np.repeat(img[:, :, :1], 3, axis=2)), rtol=0, atol=1e-6)
    torch.save(torch.zeros(3, 4, 4) + 2.0, tmp_path / "e.pt")
    with pytest.raises(ValueError, match=r"e\.pt: a floating image must have finite values in \[0, 1\]"):
        load_image(str(tmp_path / "e.pt"), 4)
    with pytest.raises(ValueError, match=r"unsupported image extension '\.tiff'"):
        (tmp_path / "f.tiff").write_bytes(b"x")
        load_image(str(tmp_path / "f.tiff"), 4)
    with pytest.raises(ValueError, match="expected a uint8 array of shape"):
        save_image_npy(str(tmp_path / "g.npy"), img.astype(np.float32))


def test_resize_center_crop_geometry():
    # A tall image whose rows are constant: after a shortest-side resize and centre crop the middle rows
    # survive and every column of a row agrees.
    h, w = 30, 10
    x = torch.linspace(0, 1, h).view(1, h, 1).expand(3, h, w).contiguous()
    out = preprocess(x, 5, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (3, 5, 5)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))
    assert 0.3 < out[0, 0, 0] < out[0, -1, 0] < 0.7
    const = torch.full((3, 9, 13), 0.25)
    torch.testing.assert_close(preprocess(const, 4, mean=(0.25,) * 3, std=(0.5,) * 3), torch.zeros(3, 4, 4))


@pytest.mark.parametrize("hw,size", [((40, 56), 24), ((12, 9), 20), ((24, 24), 24)])
def test_preprocessing_matches_clip_image_processor(tmp_path, hw, size):
    pytest.importorskip("PIL")
    import transformers
    from PIL import Image

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # A smooth image: resampling filters agree closely on it; only 8-bit rounding differs.
    yy, xx = np.meshgrid(np.linspace(0, 1, hw[0]), np.linspace(0, 1, hw[1]), indexing="ij")
    img = (np.stack([yy, xx, (yy * xx) ** 0.5], -1) * 255).round().astype(np.uint8)
    ref = torch.as_tensor(np.asarray(proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]))
    save_image_npy(str(tmp_path / "x.npy"), img)
    ours = load_image(str(tmp_path / "x.npy"), size)
    assert ours.shape == ref.shape == (3, size, size)
    assert (ours - ref).abs().max() < 0.03  # about 2 grey levels (8-bit rounding of the resize)


def test_png_through_pillow(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    img = rgb(9, 6, seed=3)
    Image.fromarray(img).save(tmp_path / "x.png")
    save_image_npy(str(tmp_path / "x.npy"), img)
    torch.testing.assert_close(load_image(str(tmp_path / "x.png"), 6), load_image(str(tmp_path / "x.npy"), 6))


def test_png_without_pillow_says_how_to_fix(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"x\.png: .*pip install pillow"):
        load_image(str(tmp_path / "x.png"), 4)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_check_tokenizer_mismatch():
    check_tokenizer(TOK, 259)
    check_tokenizer(TOK, 320)  # a padded model vocabulary is fine
    with pytest.raises(ValueError, match="tokenizer has 259 ids but the model's vocab_size is 256"):
        check_tokenizer(TOK, 256)

    class Small:
        vocab_size, bos_id, eos_id, pad_id = 10, 1, 2, 12

    with pytest.raises(ValueError, match="pad_id=12 is outside the model's vocab_size 11"):
        check_tokenizer(Small(), 11)
