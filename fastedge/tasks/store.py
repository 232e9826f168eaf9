"""A compact, array-backed sequence of `Example`s, for tasks of 100,000
examples and more.

A list of `Example` objects costs what Python's objects cost: every token id
is an int object behind a pointer, every list and dict has its header.
Measured with tracemalloc (bytes an example, as `Example` objects / in a
store): induction over GPT-2's vocabulary, 24 tokens and 11 targets, 2,861 /
291 (286 MB / 29 MB for 100,000); 8 tokens and 3 targets, 1,299 / 124; IOI
with the word tokenizer, texts in ``meta``, 3,067 / 507. `ExampleStore`
keeps the examples in flat arrays (token ids as 32-bit integers, offsets,
one byte of flags; the answers of next-token tasks are not stored, they are
``ids[p + 1]``; the source and ``meta`` as UTF-8 / JSON bytes), built by
appending one example at a time, so no list of all the examples ever
exists.

Indexing builds the `Example` on access (``store[i]`` twice gives two equal
objects, not the same one; changing one changes nothing stored). Random
access is O(1), which is what pruning needs: it samples random indices every
step. `split` and slices return views that share the arrays.
"""
from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from typing import Iterable, Iterator, Optional

from fastedge.tasks.base import SPLITS, Example, TaskDataError

_VALIDATION = 1    # flag bits
_NEXT_TOKEN = 2    # answer_offset == 1: the answers are ids[p + 1] and are not stored
_INT32 = (-(1 << 31), (1 << 31) - 1)


class ExampleStore(Sequence):
    """Examples in flat arrays (module docstring). ``append`` adds one;
    indexing returns `Example`s. A view (`select`, `split`, a slice) is
    read-only."""

    def __init__(self, examples: Iterable[Example] = ()):
        self._tokens = array("i")        # per example: clean ids, then corrupted ids
        self._tok_start = array("q", [0])
        self._targets = array("i")       # per example: target positions [, clean answers, corrupted answers]
        self._tgt_start = array("q", [0])
        self._flags = bytearray()
        self._text = bytearray()         # per example: source (UTF-8), then meta (JSON, empty when {})
        self._text_start = array("q", [0])
        self._source_len = array("i")
        self._odd_meta: dict[int, dict] = {}   # meta that JSON does not give back equal
        self._index: Optional[array] = None    # a view: positions in the base arrays
        for e in examples:
            self.append(e)

    # -- building --------------------------------------------------------------------------

    def append(self, e: Example) -> None:
        if self._index is not None:
            raise TypeError("a view of an ExampleStore (a split or a slice) is read-only")
        if not isinstance(e, Example):
            raise TypeError(f"ExampleStore holds Examples, got {type(e).__name__}")
        parts = [e.target_positions] if e.answer_offset == 1 else [
            e.target_positions, e.clean_answer, e.corrupted_answer]
        try:
            tokens = array("i", e.clean_ids)
            tokens.extend(e.corrupted_ids)
            targets = array("i", [x for p in parts for x in p])
        except OverflowError:
            raise TaskDataError(f"{e.source or 'example'}: a token id or position does not fit in 32 bits "
                                f"(from {_INT32[0]} to {_INT32[1]})") from None
        source = e.source.encode("utf-8")
        meta = b""
        if e.meta:
            try:
                text = json.dumps(e.meta, ensure_ascii=False, separators=(",", ":"))
                meta = text.encode("utf-8") if json.loads(text) == e.meta else None
            except (TypeError, ValueError):
                meta = None
            if meta is None:  # tuples, non-string keys, objects: kept as they are
                self._odd_meta[len(self._flags)] = dict(e.meta)
                meta = b""
        self._tokens.extend(tokens)
        self._tok_start.append(len(self._tokens))
        self._targets.extend(targets)
        self._tgt_start.append(len(self._targets))
        self._flags.append((_VALIDATION if e.split == "validation" else 0)
                           | (_NEXT_TOKEN if e.answer_offset == 1 else 0))
        self._text += source
        self._text += meta
        self._text_start.append(len(self._text))
        self._source_len.append(len(source))

    def extend(self, examples: Iterable[Example]) -> None:
        for e in examples:
            self.append(e)

    def set_split(self, i: int, split: str) -> None:
        """Move example ``i`` (of this store, not a view) to ``split``."""
        if self._index is not None:
            raise TypeError("a view of an ExampleStore (a split or a slice) is read-only")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._flags[i] = (self._flags[i] & ~_VALIDATION) | (_VALIDATION if split == "validation" else 0)

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._flags) if self._index is None else len(self._index)

    def _base(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example index {i} out of range for {n} examples")
        i %= n
        return i if self._index is None else self._index[i]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return self._example(self._base(int(i)))

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self._example(i if self._index is None else self._index[i])

    def _example(self, b: int) -> Example:
        a, z = self._tok_start[b], self._tok_start[b + 1]
        half = a + (z - a) // 2
        clean, corrupted = self._tokens[a:half].tolist(), self._tokens[half:z].tolist()
        ta, tz = self._tgt_start[b], self._tgt_start[b + 1]
        flags = self._flags[b]
        if flags & _NEXT_TOKEN:
            positions = self._targets[ta:tz].tolist()
            clean_answer = [clean[p + 1] for p in positions]
            corrupted_answer = [corrupted[p + 1] for p in positions]
        else:
            t = (tz - ta) // 3
            positions = self._targets[ta:ta + t].tolist()
            clean_answer = self._targets[ta + t:ta + 2 * t].tolist()
            corrupted_answer = self._targets[ta + 2 * t:tz].tolist()
        xa, xz = self._text_start[b], self._text_start[b + 1]
        s = xa + self._source_len[b]
        source = self._text[xa:s].decode("utf-8")
        meta = dict(self._odd_meta[b]) if b in self._odd_meta else (
            json.loads(self._text[s:xz].decode("utf-8")) if xz > s else {})
        return Example(clean_ids=clean, corrupted_ids=corrupted, target_positions=positions,
                       clean_answer=clean_answer, corrupted_answer=corrupted_answer,
                       split="validation" if flags & _VALIDATION else "train", source=source, meta=meta,
                       answer_offset=1 if flags & _NEXT_TOKEN else 0)

    def _bases(self) -> Iterable[int]:
        return range(len(self._flags)) if self._index is None else self._index

    def select(self, positions: Iterable[int]) -> "ExampleStore":
        """A read-only view of the examples at ``positions`` (in that order)."""
        view = ExampleStore.__new__(ExampleStore)
        view.__dict__.update(self.__dict__)
        view._index = array("q", (self._base(int(p)) for p in positions))
        return view

    def split(self, name: str) -> "ExampleStore":
        """A view of the examples of split ``name``."""
        want = _VALIDATION if name == "validation" else 0
        return self.select(i for i, b in enumerate(self._bases()) if self._flags[b] & _VALIDATION == want)

    def split_counts(self) -> dict:
        validation = sum(1 for b in self._bases() if self._flags[b] & _VALIDATION)
        return {"train": len(self) - validation, "validation": validation}

    def lengths(self) -> Iterator[int]:
        """The token count of each example, in order."""
        for b in self._bases():
            yield (self._tok_start[b + 1] - self._tok_start[b]) // 2

    def token_range(self) -> Optional[tuple[int, int]]:
        """(smallest, largest) token id over all examples, or None when empty."""
        if not len(self):
            return None
        if self._index is None:
            return min(self._tokens), max(self._tokens)
        lo, hi = None, None
        for b in self._index:
            part = self._tokens[self._tok_start[b]:self._tok_start[b + 1]]
            lo = min(part) if lo is None else min(lo, min(part))
            hi = max(part) if hi is None else max(hi, max(part))
        return lo, hi

    def nbytes(self) -> int:
        """Bytes held by the arrays (without the few odd metas)."""
        parts = [self._tokens, self._tok_start, self._targets, self._tgt_start, self._text_start,
                 self._source_len]
        own = sum(len(a) * a.itemsize for a in parts) + len(self._flags) + len(self._text)
        return own + (0 if self._index is None else len(self._index) * self._index.itemsize)

    def __eq__(self, other) -> bool:
        if isinstance(other, (ExampleStore, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        counts = self.split_counts()
        return f"ExampleStore({len(self)} examples: {counts['train']} train, {counts['validation']} validation)"


__all__ = ["ExampleStore"]
