"""Training data: instruction (Alpaca), multimodal (LLaVA-style) and ScienceQA-style files -> token samples,
batching with right padding or packing, and a resumable, shardable loader.

Labels follow the HF convention: `labels[i]` is `input_ids[i]` where the token is trained and -100 where
it is not (prompt tokens, padding); the loss shifts by one (logits at i predict labels[i + 1]).

Input files are JSON Lines (one object per line; blank lines skipped) or one JSON array of objects (as
alpaca_data.json and LLaVA's instruction files are). Every error about a file is a DataError naming the
file and the 1-based line where the offending record starts ("data.jsonl:7: missing field 'output'"), or,
for malformed JSON, the line of the syntax error.

Too long samples: the output side is truncated to max_len (prompt first, then as many target tokens as
fit). A sample whose prompt leaves no room for a single trained token is an error naming file:line by
default (`too_long="error"`); with `too_long="skip"` it is dropped and a warning reports how many were.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from mmkernels.train.images import CLIP_MEAN, CLIP_STD, load_image

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
CHAT_TURN = "USER: {text}\nASSISTANT: "
IMAGE_MARKER = "<image>"
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A bad training-data file; the message starts with "path:line:"."""


@dataclass
class Sample:
    """One training sequence.

    input_ids, labels: equal-length token lists; labels is -100 where the token is not trained.
    image: (3, H, W) float32 preprocessed pixels, or None for a text-only sample.
    source: "path:line" of the record it came from.
    """

    input_ids: List[int]
    labels: List[int]
    image: Optional[torch.Tensor] = None
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0 or len(self.input_ids) != len(self.labels):
            raise ValueError(f"{self.source or 'sample'}: input_ids and labels must be non-empty and of equal "
                             f"length, got {len(self.input_ids)} and {len(self.labels)}")
        if self.image is not None and (self.image.dim() != 3 or self.image.shape[0] != 3):
            raise ValueError(f"{self.source or 'sample'}: image: expected shape (3, H, W), "
                             f"got {tuple(self.image.shape)}")


@dataclass
class MultipleChoice:
    """A multiple-choice question for evaluation by option-letter logits.

    The prediction is argmax over c of logits[len(prompt_ids) - 1, choice_ids[c]] (the logits after the
    prompt); it is correct when it equals `answer`.
    """

    prompt_ids: List[int]
    choice_ids: List[int]
    answer: int
    image: Optional[torch.Tensor] = None
    source: str = ""


# ----------------------------------------------------------------------------------------------------------
# Reading records


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _records(path: str) -> Iterator[Tuple[int, dict]]:
    """(1-based line, object) for every record of a JSONL file or a JSON array file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_line_of(raw, e.start)}: not valid UTF-8 ({e.reason})") from None
    count = 0
    if text.lstrip().startswith("["):
        source = _array_records(path, text)
    else:
        source = _jsonl_records(path, text)
    for line, obj in source:
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        count += 1
        yield line, obj
    if count == 0:
        raise DataError(f"{path}:1: no records (empty file)")


def _jsonl_records(path: str, text: str) -> Iterator[Tuple[int, object]]:
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            yield line, json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: malformed JSON: {e.msg} (column {e.colno})") from None


def _array_records(path: str, text: str) -> Iterator[Tuple[int, object]]:
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, 0).end() + 1  # past "["
    line, counted = 1, 0
    first = True

    def where(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    while True:
        i = ws.match(text, i).end()
        if i >= len(text):
            raise DataError(f"{path}:{where(len(text))}: malformed JSON: unterminated array")
        if text[i] == "]":
            rest = ws.match(text, i + 1).end()
            if rest != len(text):
                raise DataError(f"{path}:{where(rest)}: malformed JSON: extra data after the array")
            return
        if not first:
            if text[i] != ",":
                raise DataError(f"{path}:{where(i)}: malformed JSON: expected ',' or ']' between records")
            i = ws.match(text, i + 1).end()
        first = False
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        yield where(i), obj
        i = end


_TYPE_NAMES = {str: "a string", int: "an int", list: "a list", dict: "an object"}


def _field(rec: dict, key: str, kind: type, where: str, required: bool = True):
    if rec.get(key) is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field {key!r}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


def _nonempty(text: str, key: str, where: str) -> str:
    if not text.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return text


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("tokenizer: has no eos_id; training targets end with the end-of-sequence token")
    return eos


def _check_too_long(too_long: str) -> None:
    if too_long not in ("error", "skip"):
        raise ValueError(f"too_long: expected 'error' or 'skip', got {too_long!r}")


def _check_max_len(max_len) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len: expected an int >= 2, got {max_len!r}")


class _Skipped:
    """Counts the too-long records dropped under too_long="skip" and reports them once."""

    def __init__(self, path: str, too_long: str) -> None:
        self.path, self.too_long, self.sources = path, too_long, []

    def __call__(self, where: str, length: int, max_len: int, room: int = 1) -> None:
        if self.too_long == "error":
            raise DataError(f"{where}: the prompt ({length} tokens) leaves no room for {room} trained token(s) "
                            f"within max_len={max_len}; raise max_len or pass too_long='skip'")
        self.sources.append(where)

    def report(self) -> None:
        if self.sources:
            shown = ", ".join(self.sources[:5]) + (" ..." if len(self.sources) > 5 else "")
            warnings.warn(f"{self.path}: skipped {len(self.sources)} record(s) whose prompt does not fit "
                          f"max_len: {shown}", stacklevel=3)


def _assemble(pieces: Sequence[Tuple[List[int], bool]], max_len: int) -> Tuple[List[int], List[int], int]:
    """Concatenate (ids, trained) pieces, truncated to max_len; trailing untrained tokens are dropped.

    Returns (input_ids, labels, length of the leading untrained prefix); labels has no trained token when
    the prompt does not fit.
    """
    ids: List[int] = []
    labels: List[int] = []
    for piece, trained in pieces:
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    prompt_len = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    ids, labels = ids[:max_len], labels[:max_len]
    while labels and labels[-1] == IGNORE_INDEX:
        labels.pop()
        ids.pop()
    return ids, labels, prompt_len


class _ImageCache:
    """Resolves and loads the images of one file; a path shared by several records is loaded once."""

    def __init__(self, path: str, image_root: Optional[str], image_size, mean, std) -> None:
        self.root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        self.image_size, self.mean, self.std = image_size, mean, std
        self.loaded: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str, where: str) -> torch.Tensor:
        full = name if os.path.isabs(name) else os.path.join(self.root, name)
        if full not in self.loaded:
            if not os.path.isfile(full):
                raise DataError(f"{where}: image file not found: {full}")
            try:
                self.loaded[full] = load_image(full, self.image_size, self.mean, self.std)
            except (OSError, ValueError, ImportError, RuntimeError) as e:
                raise DataError(f"{where}: cannot load image {full}: {e}") from e
        return self.loaded[full]


# ----------------------------------------------------------------------------------------------------------
# Formats


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt text for an instruction and optional input (the model's answer follows it)."""
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def instruction_samples(path: str, tokenizer, max_len: int, too_long: str = "error") -> List[Sample]:
    """Alpaca records {"instruction", "input" (optional, may be empty), "output"} -> Samples.

    input_ids = bos + tokens(alpaca_prompt(instruction, input)) + tokens(output) + eos; only output + eos are
    trained. Prompt and output are tokenized separately so the mask boundary is exact.
    """
    _check_max_len(max_len)
    _check_too_long(too_long)
    eos = _eos_id(tokenizer)
    skipped = _Skipped(path, too_long)
    samples = []
    for line, rec in _records(path):
        where = f"{path}:{line}"
        instruction = _nonempty(_field(rec, "instruction", str, where), "instruction", where)
        extra = _field(rec, "input", str, where, required=False) or ""
        output = _nonempty(_field(rec, "output", str, where), "output", where)
        prompt = tokenizer.encode(alpaca_prompt(instruction, extra), add_bos=True)
        target = tokenizer.encode(output, add_bos=False) + [eos]
        ids, labels, prompt_len = _assemble([(prompt, False), (target, True)], max_len)
        if len(ids) <= prompt_len:
            skipped(where, prompt_len, max_len)
            continue
        samples.append(Sample(ids, labels, None, where))
    skipped.report()
    return samples


def chat_prompt(text: str) -> str:
    """The prompt text of one human turn of the chat template (the assistant's answer follows it)."""
    return CHAT_TURN.format(text=text)


def _strip_image_marker(text: str) -> str:
    return re.sub(r"\s*" + re.escape(IMAGE_MARKER) + r"\s*", " ", text).strip()


def multimodal_samples(path: str, tokenizer, max_len: int, image_size: int, image_root: Optional[str] = None,
                       mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                       too_long: str = "error") -> List[Sample]:
    """LLaVA-style records {"image" (optional), "conversations": [{"from": "human"|"gpt", "value"}, ...]}.

    Turns alternate, starting with "human". input_ids = bos + for each exchange: tokens(chat_prompt(human))
    (not trained) + tokens(gpt) + eos (trained). The "<image>" marker is removed from the text: the image
    enters through the model's visual path. A relative "image" path is resolved against image_root
    (default: the directory of `path`); images are loaded and preprocessed here to (3, image_size, image_size).
    A record without "image" is a text-only sample (image None); one whose text has "<image>" but no
    "image" field is an error.
    """
    _check_max_len(max_len)
    _check_too_long(too_long)
    eos = _eos_id(tokenizer)
    images = _ImageCache(path, image_root, image_size, mean, std)
    skipped = _Skipped(path, too_long)
    samples = []
    for line, rec in _records(path):
        where = f"{path}:{line}"
        image_name = _field(rec, "image", str, where, required=False)
        turns = _field(rec, "conversations", list, where)
        if not turns:
            raise DataError(f"{where}: field 'conversations' is empty")
        pieces: List[Tuple[List[int], bool]] = [([tokenizer.bos_id] if tokenizer.bos_id is not None else [], False)]
        has_marker = False
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: conversations[{k}]: expected an object, got {type(turn).__name__}")
            role = _field(turn, "from", str, f"{where}: conversations[{k}]")
            value = _field(turn, "value", str, f"{where}: conversations[{k}]")
            expected = "human" if k % 2 == 0 else "gpt"
            if role != expected:
                raise DataError(f"{where}: conversations[{k}]: expected 'from' {expected!r} (turns alternate "
                                f"human, gpt, ...), got {role!r}")
            if role == "human":
                has_marker |= IMAGE_MARKER in value
                pieces.append((tokenizer.encode(chat_prompt(_strip_image_marker(value)), add_bos=False), False))
            else:
                if IMAGE_MARKER in value:
                    raise DataError(f"{where}: conversations[{k}]: the {IMAGE_MARKER!r} marker belongs in a "
                                    "human turn")
                _nonempty(value, f"conversations[{k}].value", where)
                pieces.append((tokenizer.encode(value, add_bos=False) + [eos], True))
        if len(turns) < 2:
            raise DataError(f"{where}: field 'conversations' has no 'gpt' turn (empty output)")
        if has_marker and image_name is None:
            raise DataError(f"{where}: the text has an {IMAGE_MARKER!r} marker but the record has no 'image' field")
        ids, labels, prompt_len = _assemble(pieces, max_len)
        if len(ids) <= prompt_len:
            skipped(where, prompt_len, max_len)
            continue
        image = images(image_name, where) if image_name is not None else None
        samples.append(Sample(ids, labels, image, where))
    skipped.report()
    return samples


def scienceqa_prompt(question: str, choices: Sequence[str], context: Optional[str] = None) -> str:
    """The ScienceQA prompt text; the answer letter follows it directly (then ")")."""
    lines = [f"Context: {context.strip()}"] if context and context.strip() else []
    lines.append(f"Question: {question}")
    lines.append("Options: " + " ".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices)))
    lines.append("Answer: The answer is (")
    return "\n".join(lines)


def _letter_ids(tokenizer, prompt: str, prompt_ids: List[int], count: int, where: str) -> List[int]:
    """The token id of each option letter as it follows the prompt.

    The letter's id is the one extra token of encode(prompt + letter); a tokenizer that merges the letter
    with the prompt's last characters falls back to the letter encoded alone, which must be one token.
    """
    out = []
    for letter in CHOICE_LETTERS[:count]:
        full = tokenizer.encode(prompt + letter, add_bos=True)
        if len(full) == len(prompt_ids) + 1 and full[:-1] == prompt_ids:
            out.append(full[-1])
            continue
        alone = tokenizer.encode(letter, add_bos=False)
        if len(alone) != 1:
            raise ValueError(f"{where}: the tokenizer does not encode the option letter {letter!r} as one token "
                             f"(got {alone}); letter logits cannot score the choices")
        out.append(alone[0])
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: the option letters share token ids {out}")
    return out


def _choice_record(rec: dict, tokenizer, where: str) -> Tuple[List[int], List[int], int]:
    question = _nonempty(_field(rec, "question", str, where), "question", where)
    choices = _field(rec, "choices", list, where)
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise DataError(f"{where}: field 'choices': expected 2 to {len(CHOICE_LETTERS)} options, got {len(choices)}")
    for k, c in enumerate(choices):
        if not isinstance(c, str):
            raise DataError(f"{where}: field 'choices'[{k}]: expected a string, got {type(c).__name__}")
    answer = _field(rec, "answer", int, where)
    if not 0 <= answer < len(choices):
        raise DataError(f"{where}: field 'answer': index {answer} out of range for {len(choices)} choices")
    context = _field(rec, "context", str, where, required=False)
    if context is None:
        context = _field(rec, "hint", str, where, required=False)
    prompt = scienceqa_prompt(question, choices, context)
    prompt_ids = tokenizer.encode(prompt, add_bos=True)
    return prompt_ids, _letter_ids(tokenizer, prompt, prompt_ids, len(choices), where), answer


def choice_prompt(record: dict, tokenizer) -> Tuple[List[int], List[int], int]:
    """A ScienceQA record -> (prompt_ids, option-letter token ids, answer index), as the evaluator scores it."""
    return _choice_record(record, tokenizer, "record")


def _scienceqa(path, tokenizer, image_size, image_root, mean, std):
    images = _ImageCache(path, image_root, image_size, mean, std)
    for line, rec in _records(path):
        where = f"{path}:{line}"
        prompt_ids, choice_ids, answer = _choice_record(rec, tokenizer, where)
        image_name = _field(rec, "image", str, where, required=False)
        image = images(image_name, where) if image_name is not None else None
        yield where, MultipleChoice(prompt_ids, choice_ids, answer, image, where)


def scienceqa_samples(path: str, tokenizer, max_len: int, image_size: int, image_root: Optional[str] = None,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                      too_long: str = "error") -> List[Sample]:
    """ScienceQA records {"question", "choices": [...], "answer": index, "context"/"hint", "image"} -> Samples.

    input_ids = bos + tokens(scienceqa_prompt(...)) + answer letter + eos; letter and eos are trained. The
    prompt is never truncated: a record longer than max_len follows `too_long`. Images as in
    multimodal_samples. scienceqa_choices reads the same file for evaluation.
    """
    _check_max_len(max_len)
    _check_too_long(too_long)
    eos = _eos_id(tokenizer)
    skipped = _Skipped(path, too_long)
    samples = []
    for where, mc in _scienceqa(path, tokenizer, image_size, image_root, mean, std):
        target = [mc.choice_ids[mc.answer], eos]
        if len(mc.prompt_ids) + len(target) > max_len:
            skipped(where, len(mc.prompt_ids), max_len, len(target))
            continue
        labels = [IGNORE_INDEX] * len(mc.prompt_ids) + target
        samples.append(Sample(mc.prompt_ids + target, labels, mc.image, where))
    skipped.report()
    return samples


def scienceqa_choices(path: str, tokenizer, image_size: int, image_root: Optional[str] = None,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> List[MultipleChoice]:
    """The records of a ScienceQA file as MultipleChoice items for letter-logit accuracy."""
    return [mc for _, mc in _scienceqa(path, tokenizer, image_size, image_root, mean, std)]


def choice_predictions(last_logits: torch.Tensor, items: Sequence[MultipleChoice]) -> torch.Tensor:
    """last_logits (B, vocab): the logits after each item's prompt -> (B,) long predicted option index."""
    if last_logits.dim() != 2 or last_logits.shape[0] != len(items):
        raise ValueError(f"last_logits: expected shape ({len(items)}, vocab), got {tuple(last_logits.shape)}")
    return torch.stack([last_logits[b, item.choice_ids].argmax() for b, item in enumerate(items)]).long()


# ----------------------------------------------------------------------------------------------------------
# Batching and packing


@dataclass
class PackedRow:
    """Several text samples in one row: positions restart at 0 and segment_ids count 0, 1, ... per sample."""

    input_ids: List[int]
    labels: List[int]
    positions: List[int]
    segment_ids: List[int]
    sources: List[str] = field(default_factory=list)


class Batch(NamedTuple):
    """A right-padded batch.

    input_ids (B, T) long (padding = pad_id); labels (B, T) long (-100 at padding and untrained tokens);
    attention_mask (B, T) bool, True at real tokens; images (B, 3, H, W) float32 or None when no sample has
    one (zeros for the text-only samples of a mixed batch); has_image (B,) bool.
    Packed rows also give positions (B, T) long and segment_ids (B, T) long (padding: positions 0, 1, ...
    and the row's next segment id, so attention within segments never leaves a query with no key);
    both are None for unpacked batches (positions 0..T-1 apply).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    images: Optional[torch.Tensor]
    has_image: torch.Tensor
    positions: Optional[torch.Tensor] = None
    segment_ids: Optional[torch.Tensor] = None


def collate(samples: Sequence, pad_id: int) -> Batch:
    """Samples (or PackedRows) -> a right-padded Batch."""
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got none")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id: expected a non-negative int, got {pad_id!r}")
    packed = isinstance(samples[0], PackedRow)
    kind = PackedRow if packed else Sample
    for s in samples:
        if not isinstance(s, kind):
            raise TypeError(f"samples: expected all {kind.__name__}, got a {type(s).__name__} among them")
    B, T = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    positions = segment_ids = None
    if packed:
        positions = torch.zeros(B, T, dtype=torch.long)
        segment_ids = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[b, :n] = True
        if packed:
            positions[b, :n] = torch.tensor(s.positions, dtype=torch.long)
            positions[b, n:] = torch.arange(T - n)
            segment_ids[b, :n] = torch.tensor(s.segment_ids, dtype=torch.long)
            segment_ids[b, n:] = (s.segment_ids[-1] + 1) if n else 0
    has_image = torch.tensor([not packed and s.image is not None for s in samples], dtype=torch.bool)
    images = None
    if has_image.any():
        shapes = {tuple(s.image.shape) for s in samples if s.image is not None}
        if len(shapes) != 1:
            raise ValueError(f"samples: images of one batch must share a shape, got {sorted(shapes)}")
        images = torch.zeros((B,) + shapes.pop(), dtype=torch.float32)
        for b, s in enumerate(samples):
            if s.image is not None:
                images[b] = s.image
    return Batch(input_ids, labels, mask, images, has_image, positions, segment_ids)


def _check_packable(samples: Sequence[Sample], max_len: int) -> None:
    for s in samples:
        if not isinstance(s, Sample):
            raise TypeError(f"samples: expected Sample, got {type(s).__name__}")
        if s.image is not None:
            raise ValueError(f"{s.source or 'sample'}: has an image; pack() takes text-only samples (batch "
                             "image samples unpacked)")
        if len(s.input_ids) > max_len:
            raise ValueError(f"{s.source or 'sample'}: length {len(s.input_ids)} exceeds max_len={max_len}; "
                             "build the samples with the same max_len so they are truncated")


def pack(samples: Sequence[Sample], max_len: int) -> List[PackedRow]:
    """Greedy first-fit packing in order: each sample goes to the first row with room for all of it.

    No sample is split; a sample longer than max_len is an error. Rows are not padded (collate pads).
    The first label of every sample is set to -100: under the shifted loss the last token of one sample
    would otherwise be trained to predict the first token of the next. (A sequence's first label is never
    a target of its own, so each sample trains exactly as it would alone.)
    """
    _check_max_len(max_len)
    _check_packable(samples, max_len)
    n = len(samples)
    if n == 0:
        return []
    # A max-tree over the free room of rows 0..n-1 (rows not yet opened have max_len) finds the first
    # row that fits in O(log n), instead of scanning every open row.
    size = 1
    while size < n:
        size *= 2
    tree = [0] * (2 * size)
    tree[size:size + n] = [max_len] * n
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    rows: List[PackedRow] = []
    for s in samples:
        length = len(s.input_ids)
        i = 1
        while i < size:
            i = 2 * i if tree[2 * i] >= length else 2 * i + 1
        r = i - size
        if r == len(rows):
            rows.append(PackedRow([], [], [], []))
        row = rows[r]
        seg = row.segment_ids[-1] + 1 if row.segment_ids else 0
        row.input_ids.extend(s.input_ids)
        row.labels.append(IGNORE_INDEX)
        row.labels.extend(s.labels[1:])
        row.positions.extend(range(length))
        row.segment_ids.extend([seg] * length)
        row.sources.append(s.source)
        tree[i] -= length
        i //= 2
        while i:
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
            i //= 2
    return rows


# ----------------------------------------------------------------------------------------------------------
# Loader


class Loader:
    """Deterministic, resumable, shardable batches.

    Epoch e visits the samples in the order randperm(N) seeded from (seed, e) (or in file order without
    shuffle); with packed=True the samples are packed in that order (pack(), max_len) and the rows are
    batched. Global batch g holds items [g * batch_size * world_size, (g + 1) * batch_size * world_size) of
    that order, and rank r gets its slice [r * batch_size, (r + 1) * batch_size): the ranks' batches are
    disjoint and together cover every item once per epoch. A last, partial global batch is dropped with
    drop_last; otherwise it is split into world_size contiguous parts whose sizes differ by at most one,
    and a rank whose part is empty has one batch fewer (use drop_last=True where every rank must step the
    same number of times).

    Iterating yields the rest of the current epoch and then moves to the next one. state_dict() is
    {"epoch", "position", "seed"}, position being the number of this epoch's batches already yielded;
    a Loader over the same samples and settings that loads it yields exactly the batches that would have
    come next.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, *, pad_id: int, packed: bool = False, max_len: Optional[int] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id: expected a non-negative int, got {pad_id!r}")
        if len(samples) == 0:
            raise ValueError("samples: expected at least one sample, got none")
        if packed:
            if max_len is None:
                raise ValueError("max_len: required with packed=True")
            _check_max_len(max_len)
            _check_packable(samples, max_len)
        self.samples = list(samples)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.pad_id, self.packed, self.max_len = pad_id, packed, max_len
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._cached: Optional[Tuple[int, int, List[List]]] = None

    def _order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.samples)))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        return torch.randperm(len(self.samples), generator=g).tolist()

    def _batches(self, epoch: int) -> List[List]:
        """This rank's batches of `epoch`, each a list of Samples or PackedRows."""
        if self._cached is not None and self._cached[:2] == (self.seed, epoch):
            return self._cached[2]
        items = [self.samples[i] for i in self._order(epoch)]
        if self.packed:
            items = pack(items, self.max_len)
        per_rank, world = self.batch_size, self.world_size
        total = per_rank * world
        full, rest = divmod(len(items), total)
        batches = [items[g * total + self.rank * per_rank: g * total + (self.rank + 1) * per_rank]
                   for g in range(full)]
        if rest and not self.drop_last:
            base, extra = divmod(rest, world)
            start = full * total + self.rank * base + min(self.rank, extra)
            part = items[start:start + base + (self.rank < extra)]
            if part:
                batches.append(part)
        self._cached = (self.seed, epoch, batches)
        return batches

    def __len__(self) -> int:
        """The number of batches this rank gets in the current epoch."""
        return len(self._batches(self.epoch))

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._batches(self.epoch)
        if not batches:
            raise ValueError(f"Loader: epoch {self.epoch} has no batch for rank {self.rank} (drop_last with "
                             f"fewer items than batch_size * world_size = {self.batch_size * self.world_size})")
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield collate(batch, self.pad_id)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue from `state` (the seed it holds replaces this loader's)."""
        for key in ("epoch", "position", "seed"):
            value = state.get(key) if isinstance(state, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{key!r}]: expected a non-negative int, got {value!r}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer / model agreement


def tokenizer_size(tokenizer) -> int:
    """The number of ids the tokenizer can produce (its ids are 0 .. size - 1)."""
    size = getattr(tokenizer, "vocab_size", None)
    if size is None:
        try:
            size = len(tokenizer)
        except TypeError:
            raise TypeError(f"tokenizer: {type(tokenizer).__name__} has neither vocab_size nor len()") from None
    return int(size)


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Raise ValueError when the tokenizer can produce an id >= the model's vocab_size (a mismatched pair)."""
    size = tokenizer_size(tokenizer)
    if size > vocab_size:
        raise ValueError(f"tokenizer/model mismatch: the tokenizer has {size} ids but the model's vocab_size is "
                         f"{vocab_size}; load the tokenizer saved with this model's checkpoint")
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"tokenizer/model mismatch: tokenizer.{name}={value} is outside the model's "
                             f"vocab_size {vocab_size}")
