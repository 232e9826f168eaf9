"""Task data: examples, batches, the JSONL format, and the machinery the
built-in tasks share.

An `Example` is a clean token sequence and a corrupted one of the same length
(docs/CONCEPTS.md section 2: the interchange ablation runs the model on the corrupted
input). Both are a prompt followed by an answer; the clean and the corrupted
prompts have the same number of tokens, and so do the two answers, so the
*target positions* are the same in both: the positions ``p`` whose logits
predict the answer token at ``p + 1``. Pruning minimises the KL divergence at
exactly those positions.

JSONL format, one example a line (blank lines are skipped)::

    {"clean": "When Mary and John went to the store, John gave a drink to<predict> Mary</predict>",
     "corrupted": "When Mary and John went to the store, Paul gave a drink to<predict> John</predict>",
     "split": "train"}

``split`` ("train" or "validation") is optional (default "train"); ``meta`` (an
object) is optional and kept in `Example.meta`; no other keys are allowed. The
text before ``<predict>`` is the prompt, the text inside the tags the answer
(one or more tokens), and nothing may follow ``</predict>``. The prompt and
``prompt + answer`` are tokenised separately (without special tokens); the
prompt's tokens must be a prefix of the full text's tokens, and the rest are
the answer's tokens. The README's form with a space before the tag, ``"...
to <predict>Mary</predict>"``, is accepted too: when its prompt's tokens are
not a prefix (a GPT-2-style tokenizer puts the space in the answer's token),
the trailing space moves into the answer (``" Mary"``;
`fastedge.tasks.files.space_into_answer`). Every problem is a
`TaskDataError` naming ``path:line``; no line is ever skipped silently. CSV,
parquet and ``datasets`` folders with the same columns:
`fastedge.tasks.files`.
"""
from __future__ import annotations

import inspect
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

SPLITS = ("train", "validation")
IGNORE_INDEX = -100
ENCODER_CACHE_SIZE = 10_000  # texts an Encoder remembers (about 1 KB each for an IOI prompt)
PREDICT_OPEN = "<predict>"
PREDICT_CLOSE = "</predict>"
JSONL_KEYS = ("clean", "corrupted", "split", "meta")   # the keys a JSONL line may have (by default)


class TaskDataError(ValueError):
    """Malformed task data: a bad JSONL line, an inconsistent example, or a
    task that could not generate enough examples with a tokenizer."""


# -- examples and batches ---------------------------------------------------------------

@dataclass
class Example:
    clean_ids: list[int]          # prompt tokens followed by the answer tokens
    corrupted_ids: list[int]      # same length as clean_ids
    target_positions: list[int]   # the logits at p predict the answer token at p + 1
    clean_answer: list[int]       # clean_ids[p + 1] for p in target_positions
    corrupted_answer: list[int]   # corrupted_ids[p + 1] for p in target_positions
    split: str = "train"          # "train" | "validation"
    source: str = ""              # e.g. "ioi:17" or "data.jsonl:12", for error messages
    meta: dict = field(default_factory=dict)  # optional task-specific data (texts, names, ...)
    # 1: the logits at p predict the next token (language tasks); 0: the logits
    # at p are scored as they are, against the answers given (a Tracr program's
    # output at p: `fastedge.tracr.tasks`), and any position may be a target
    answer_offset: int = 1

    def __post_init__(self):
        where = self.source or "example"
        try:
            self.clean_ids = [int(t) for t in self.clean_ids]
            self.corrupted_ids = [int(t) for t in self.corrupted_ids]
            self.target_positions = [int(p) for p in self.target_positions]
            self.clean_answer = [int(t) for t in self.clean_answer]
            self.corrupted_answer = [int(t) for t in self.corrupted_answer]
        except (TypeError, ValueError) as e:
            raise TaskDataError(f"{where}: token ids and positions must be integers ({e})") from None
        n = len(self.clean_ids)
        if len(self.corrupted_ids) != n:
            raise TaskDataError(f"{where}: clean and corrupted sequences differ in length "
                                f"({n} vs {len(self.corrupted_ids)} tokens)")
        if not self.target_positions:
            raise TaskDataError(f"{where}: no target positions")
        if any(b <= a for a, b in zip(self.target_positions, self.target_positions[1:])):
            raise TaskDataError(f"{where}: target positions must be strictly increasing, got {self.target_positions}")
        if self.answer_offset not in (0, 1):
            raise TaskDataError(f"{where}: answer_offset must be 0 or 1, got {self.answer_offset!r}")
        last = n - self.answer_offset
        if self.target_positions[0] < 0 or self.target_positions[-1] >= last:
            raise TaskDataError(f"{where}: target positions {self.target_positions} out of range for a sequence "
                                f"of {n} tokens (each p must satisfy 0 <= p < {last})")
        if self.answer_offset == 0:
            for which in ("clean_answer", "corrupted_answer"):
                if len(getattr(self, which)) != len(self.target_positions):
                    raise TaskDataError(f"{where}: {which} has {len(getattr(self, which))} entries for "
                                        f"{len(self.target_positions)} target positions")
        elif self.clean_answer != [self.clean_ids[p + 1] for p in self.target_positions]:
            raise TaskDataError(f"{where}: clean_answer is not clean_ids[p + 1] at the target positions")
        elif self.corrupted_answer != [self.corrupted_ids[p + 1] for p in self.target_positions]:
            raise TaskDataError(f"{where}: corrupted_answer is not corrupted_ids[p + 1] at the target positions")
        if self.split not in SPLITS:
            raise TaskDataError(f"{where}: split must be one of {SPLITS}, got {self.split!r}")
        if self.meta is None:
            self.meta = {}

    def __len__(self) -> int:
        return len(self.clean_ids)


@dataclass
class Batch:
    input_ids: Tensor             # [B, S] long, right-padded
    corrupted_input_ids: Tensor   # [B, S]
    attention_mask: Tensor        # [B, S] 1 = token
    target_mask: Tensor           # [B, S] bool, True at target positions
    clean_answer: Tensor          # [B, S] long, answer token at target positions, else -100
    corrupted_answer: Tensor      # [B, S] long, likewise
    examples: tuple = field(default=(), repr=False)  # the Examples, in row order

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.input_ids, self.corrupted_input_ids, self.attention_mask, self.target_mask,
                        self.clean_answer, self.corrupted_answer)), examples=self.examples)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad ``examples`` (with ``pad_id``) into one `Batch`."""
    examples = list(examples)
    if not examples:
        raise ValueError("collate: no examples")
    B = len(examples)
    S = max(len(e.clean_ids) for e in examples)
    input_ids = torch.full((B, S), int(pad_id), dtype=torch.long)
    corrupted = torch.full((B, S), int(pad_id), dtype=torch.long)
    attention = torch.zeros((B, S), dtype=torch.long)
    target = torch.zeros((B, S), dtype=torch.bool)
    clean_ans = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    corr_ans = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.clean_ids)
        input_ids[i, :n] = torch.tensor(e.clean_ids, dtype=torch.long)
        corrupted[i, :n] = torch.tensor(e.corrupted_ids, dtype=torch.long)
        attention[i, :n] = 1
        pos = torch.tensor(e.target_positions, dtype=torch.long)
        target[i, pos] = True
        clean_ans[i, pos] = torch.tensor(e.clean_answer, dtype=torch.long)
        corr_ans[i, pos] = torch.tensor(e.corrupted_answer, dtype=torch.long)
    return Batch(input_ids, corrupted, attention, target, clean_ans, corr_ans, examples=tuple(examples))


class TaskData:
    """What every task returns: a name and its `Example`s: a list, or an
    `fastedge.tasks.store.ExampleStore` (the built-in tasks and the file
    loaders build one: compact arrays, examples built on access), kept as
    given."""

    def __init__(self, name: str, examples: Sequence[Example], meta: Optional[dict] = None):
        from fastedge.tasks.store import ExampleStore
        self.name = name
        self.examples = examples if isinstance(examples, ExampleStore) else list(examples)
        self.meta = dict(meta or {})

    def _store(self):
        from fastedge.tasks.store import ExampleStore
        return self.examples if isinstance(self.examples, ExampleStore) else None

    def split(self, name: str) -> "TaskData":
        """Only the examples of split ``name`` ("train" or "validation")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; the splits are {SPLITS}")
        store = self._store()
        if store is not None:
            return TaskData(self.name, store.split(name), self.meta)
        return TaskData(self.name, [e for e in self.examples if e.split == name], self.meta)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, pad_id: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        """Batches of ``batch_size`` examples in order (or shuffled with
        ``random.Random(seed)``); the last one smaller unless ``drop_last``."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batch_size = int(batch_size)
        order = list(range(len(self.examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield collate([self.examples[i] for i in idx], pad_id=pad_id)

    @property
    def max_length(self) -> int:
        store = self._store()
        return max(store.lengths() if store is not None else (len(e.clean_ids) for e in self.examples),
                   default=0)

    def check_fits(self, *, vocab_size: int, max_positions: Optional[int] = None,
                   model_name: str = "the model") -> None:
        """Refuse, naming the first offending example, a task with a token id
        outside [0, vocab_size) or a sequence longer than `max_positions`
        (a learned position embedding's size; None: no limit). The model
        would otherwise fail inside its embedding with an IndexError."""
        store = self._store()
        if store is not None and len(store):  # fast path: the arrays' extremes, then find the culprit
            lo, hi = store.token_range()
            if lo >= 0 and hi < vocab_size and (max_positions is None or self.max_length <= max_positions):
                return
        for e in self.examples:
            where = e.source or f"an example of {self.name}"
            if max_positions is not None and len(e.clean_ids) > max_positions:
                raise TaskDataError(
                    f"{where}: {len(e.clean_ids)} tokens, but {model_name} has {max_positions} positions; "
                    f"shorten the example or use a model with longer positions")
            for which, ids in (("clean", e.clean_ids), ("corrupted", e.corrupted_ids)):
                if min(ids) >= 0 and max(ids) < vocab_size:  # C loops: the usual case stays cheap
                    continue
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise TaskDataError(
                        f"{where}: {which} token id {bad[0]} lies outside the vocabulary of {model_name} "
                        f"(ids 0 to {vocab_size - 1}); the task was tokenised for another model")

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TaskData(self.name, self.examples[i], self.meta)
        return self.examples[i]

    def __repr__(self) -> str:
        store = self._store()
        counts = store.split_counts() if store is not None else Counter(e.split for e in self.examples)
        return (f"TaskData({self.name!r}, {len(self)} examples: {counts.get('train', 0)} train, "
                f"{counts.get('validation', 0)} validation)")


# -- tokenizing ---------------------------------------------------------------------------

def _accepts_add_special_tokens(fn) -> Optional[bool]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "add_special_tokens" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def _ids(out) -> list[int]:
    if hasattr(out, "ids"):
        out = out.ids
    if isinstance(out, Tensor):
        out = out.flatten().tolist()
    return [int(t) for t in out]


def _plain_encode_fn(tokenizer) -> Callable[[str], list[int]]:
    """``text -> ids`` without special tokens, deciding once whether the
    tokenizer's ``encode`` takes ``add_special_tokens``."""
    fn = tokenizer.encode
    accepts = _accepts_add_special_tokens(fn)
    if accepts:
        return lambda text: _ids(fn(text, add_special_tokens=False))
    if accepts is False:
        return lambda text: _ids(fn(text))
    state = {}

    def probe(text):
        if "kw" not in state:
            try:
                out = fn(text, add_special_tokens=False)
                state["kw"] = True
                return _ids(out)
            except TypeError:
                state["kw"] = False
        return _ids(fn(text, add_special_tokens=False) if state["kw"] else fn(text))
    return probe


def encode(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)`` without special tokens (passing
    ``add_special_tokens=False`` when the tokenizer accepts it), as a list of
    ints. A ``tokenizers.Encoding`` result (``.ids``) is accepted too."""
    return _plain_encode_fn(tokenizer)(text)


class Encoder:
    """A caching view of a tokenizer: ``enc(text)`` is `encode` as a tuple.
    ``prepend_bos`` makes `bos` the tokenizer's BOS id (error if it has none)."""

    def __init__(self, tokenizer, prepend_bos: bool = False):
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise TypeError("a tokenizer must have an encode(text) -> list[int] method")
        self.tokenizer = tokenizer
        self._encode = _plain_encode_fn(tokenizer)
        self._cache: dict[str, tuple[int, ...]] = {}
        self.bos: tuple[int, ...] = ()
        if prepend_bos:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id")
            self.bos = (int(bos),)

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self._encode(text))
            if len(self._cache) >= ENCODER_CACHE_SIZE:  # bounded: a 100K-example task must not grow it
                self._cache.clear()
            self._cache[text] = ids
        return ids

    def length(self, text: str) -> int:
        return len(self(text))


class Rejected(Exception):
    """An example that does not fit a tokenizer; ``reason`` is a short key
    (for counting), ``detail`` the full explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _split_answer(enc: Encoder, prompt: str, answer: str, which: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    p = enc(prompt)
    full = enc(prompt + answer)
    if full[:len(p)] != p:
        raise Rejected("prompt_not_prefix",
                       f"the {which} prompt's tokens are not a prefix of the tokens of prompt + answer "
                       f"(the answer {answer!r} merges with the end of the prompt)")
    if len(full) == len(p):
        raise Rejected("empty_answer", f"the {which} answer {answer!r} adds no token to the prompt")
    return full, full[len(p):]


def build_example(enc: Encoder, clean_prompt: str, clean_answer: str, corrupted_prompt: str,
                  corrupted_answer: str, *, single_token_answers: bool = False, split: str = "train",
                  source: str = "", meta: Optional[dict] = None) -> Example:
    """Tokenise a clean and a corrupted (prompt, answer) pair into an `Example`;
    raises `Rejected` when they do not fit the tokenizer."""
    if not clean_prompt or not corrupted_prompt:
        raise Rejected("empty_prompt", "empty prompt")
    c_full, c_ans = _split_answer(enc, clean_prompt, clean_answer, "clean")
    x_full, x_ans = _split_answer(enc, corrupted_prompt, corrupted_answer, "corrupted")
    if len(c_full) != len(x_full):
        raise Rejected("length", f"clean and corrupted texts tokenise to different lengths "
                                 f"({len(c_full)} vs {len(x_full)} tokens)")
    if len(c_ans) != len(x_ans):
        raise Rejected("answer_length",
                       f"clean and corrupted prompts tokenise to different lengths ({len(c_full) - len(c_ans)} vs "
                       f"{len(x_full) - len(x_ans)} tokens), so the answers would sit at different positions")
    if single_token_answers and len(c_ans) != 1:
        raise Rejected("multi_token_answer",
                       f"the answers {clean_answer!r} / {corrupted_answer!r} are {len(c_ans)} tokens, not one")
    bos = enc.bos
    start = len(bos) + len(c_full) - len(c_ans) - 1
    positions = list(range(start, start + len(c_ans)))
    return Example(clean_ids=list(bos + c_full), corrupted_ids=list(bos + x_full), target_positions=positions,
                   clean_answer=list(c_ans), corrupted_answer=list(x_ans), split=split, source=source,
                   meta=dict(meta or {}))


# -- splits ------------------------------------------------------------------------------

def validation_flags(n: int, validation_fraction: float) -> list[bool]:
    """Which of ``n`` examples are validation: example ``i`` is when
    ``floor((i + 1) f) > floor(i f)`` (exact rational arithmetic), so the
    validation examples are spread evenly, any prefix of ``m`` examples holds
    ``floor(m f)`` of them, and the assignment of an example never depends on
    ``n``. With ``f = 0.2`` that is every fifth example (indices 4, 9, ...)."""
    f = Fraction(validation_fraction).limit_denominator(1_000_000)
    if not 0 <= f <= 1:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    return [((i + 1) * f).__floor__() > (i * f).__floor__() for i in range(n)]


# -- generating a built-in task --------------------------------------------------------------

def _text_key(clean: str, corrupted: str) -> bytes:
    """8 bytes that stand for a (clean, corrupted) pair in the duplicate
    check (a collision among 100,000 pairs has probability about 3e-10)."""
    import hashlib
    return hashlib.blake2b(f"{len(clean)}:{clean}{corrupted}".encode("utf-8", "surrogatepass"),
                           digest_size=8).digest()


@dataclass
class Candidate:
    """Texts of one generated example, before tokenising."""
    clean_prompt: str
    clean_answer: str
    corrupted_prompt: str
    corrupted_answer: str
    meta: dict = field(default_factory=dict)


def generate_task(name: str, tokenizer, *, n_examples: int, seed: int, validation_fraction: float,
                  make_sampler: Callable[[Encoder], Callable[[random.Random], Candidate]],
                  single_token_answers: bool, prepend_bos: bool = False,
                  max_attempts: Optional[int] = None, meta: Optional[dict] = None,
                  finish: Optional[Callable[[Example, Candidate, Encoder], None]] = None) -> TaskData:
    """Draw candidates from ``make_sampler(encoder)(rng)`` (``rng =
    random.Random(seed)``), keep those that fit the tokenizer (equal lengths,
    answers after a prefix-consistent prompt, single tokens if required; no
    repeated (clean, corrupted) pair) until ``n_examples`` are kept, in order.
    Fails with the rejection counts when too few survive ``max_attempts``
    (default ``20 n + 2000``), or none survives the first 2000 attempts."""
    n_examples = int(n_examples)
    if n_examples < 1:
        raise ValueError(f"{name}: n_examples must be at least 1, got {n_examples}")
    flags = validation_flags(n_examples, validation_fraction)
    enc = Encoder(tokenizer, prepend_bos=prepend_bos)
    sample = make_sampler(enc)
    rng = random.Random(seed)
    limit = 20 * n_examples + 2000 if max_attempts is None else int(max_attempts)
    from fastedge.tasks.store import ExampleStore
    examples = ExampleStore()  # compact: no list of 100K Example objects
    seen: set[bytes] = set()   # 8-byte digests of the texts drawn, not the texts
    rejected: Counter = Counter()
    details: dict[str, str] = {}
    attempts = 0
    while len(examples) < n_examples:
        if attempts >= limit or (attempts >= 2000 and not examples):
            why = "; ".join(f"{k} x{v}: {details[k]}" for k, v in rejected.most_common())
            raise TaskDataError(
                f"{name}: only {len(examples)} of the {n_examples} requested examples fit this tokenizer "
                f"after {attempts} attempts (seed {seed}). Rejected: {why or 'none'}")
        attempts += 1
        try:
            cand = sample(rng)
        except Rejected as r:
            rejected[r.reason] += 1
            details.setdefault(r.reason, r.detail)
            continue
        key = _text_key(cand.clean_prompt + cand.clean_answer, cand.corrupted_prompt + cand.corrupted_answer)
        if key in seen:
            rejected["duplicate"] += 1
            details.setdefault("duplicate", "the same clean and corrupted texts were drawn before")
            continue
        i = len(examples)
        m = dict(cand.meta)
        m.update(clean_prompt=cand.clean_prompt, clean_answer_text=cand.clean_answer,
                 corrupted_prompt=cand.corrupted_prompt, corrupted_answer_text=cand.corrupted_answer)
        try:
            ex = build_example(enc, cand.clean_prompt, cand.clean_answer, cand.corrupted_prompt,
                               cand.corrupted_answer, single_token_answers=single_token_answers,
                               split="validation" if flags[i] else "train", source=f"{name}:{i}", meta=m)
            if finish is not None:
                finish(ex, cand, enc)
        except Rejected as r:
            rejected[r.reason] += 1
            details.setdefault(r.reason, r.detail)
            continue
        seen.add(key)
        examples.append(ex)
    info = {"seed": seed, "attempts": attempts, "rejected": dict(rejected),
            "single_token_answers": single_token_answers, "prepend_bos": prepend_bos}
    info.update(meta or {})
    return TaskData(name, examples, info)


# -- JSONL -------------------------------------------------------------------------------

def load_jsonl(path, tokenizer, *, name: Optional[str] = None, prepend_bos: bool = False,
               validation_fraction: Optional[float] = None, columns=None) -> TaskData:
    """Read a task from a JSONL file (format in the module docstring), one
    line at a time into an `fastedge.tasks.store.ExampleStore`.

    Lines without ``split`` are "train", or, with ``validation_fraction``,
    assigned as `validation_flags` does by their index among such lines.
    ``prepend_bos`` puts the tokenizer's BOS token before every sequence.
    ``columns`` (`fastedge.tasks.files.Columns`) renames the keys. CSV,
    parquet and ``datasets`` folders: `fastedge.tasks.files.load_data`.
    """
    from fastedge.tasks.files import Columns, load_data
    return load_data(path, tokenizer, columns=columns or Columns(), name=name, prepend_bos=prepend_bos,
                     validation_fraction=validation_fraction, format="jsonl")


def example_to_jsonl(example: Example) -> str:
    """One JSONL line for an example that keeps its texts in ``meta`` (the
    built-in text tasks do)."""
    m = example.meta
    try:
        texts = (m["clean_prompt"], m["clean_answer_text"], m["corrupted_prompt"], m["corrupted_answer_text"])
    except KeyError:
        raise ValueError(f"{example.source or 'example'}: no texts in meta (a token-level task?)") from None
    extra = {k: v for k, v in m.items() if k not in ("clean_prompt", "clean_answer_text", "corrupted_prompt",
                                                      "corrupted_answer_text")}
    obj: dict[str, Any] = {
        "clean": f"{texts[0]}{PREDICT_OPEN}{texts[1]}{PREDICT_CLOSE}",
        "corrupted": f"{texts[2]}{PREDICT_OPEN}{texts[3]}{PREDICT_CLOSE}",
        "split": example.split,
    }
    try:
        json.dumps(extra)
        if extra:
            obj["meta"] = extra
    except TypeError:
        pass
    return json.dumps(obj, ensure_ascii=False)


def save_jsonl(data: TaskData, path) -> None:
    """Write a text task in the JSONL format (`load_jsonl` reads it back)."""
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        for e in data.examples:
            f.write(example_to_jsonl(e) + "\n")


__all__ = ["Example", "Batch", "TaskData", "TaskDataError", "collate", "load_jsonl", "save_jsonl",
           "encode", "Encoder", "build_example", "validation_flags", "SPLITS", "IGNORE_INDEX"]
