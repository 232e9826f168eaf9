"""RASP programs by name, with the settings they are compiled with.

The paper's two programs, as in the ACDC paper's Tracr experiments that the
Edge Pruning paper follows (BOS token "BOS", inputs of 1 to 5 tokens):

* ``reverse``: `lib.make_reverse(tokens)` over the vocabulary {1, 2, 3};
  categorical output (the token at the mirrored position).
* ``xproportion``: `lib.make_frac_prevs(tokens == "x")` over {"w", "x", "y", "z"};
  numerical output (the fraction of tokens so far that are "x").

The other programs of `tracr.compiler.lib`, with the arguments their
docstrings use (`SUPPORTED` lists them all; `fastedge prune --model
tracr:<name>` takes any of them). Programs of the library that need
arguments without a natural default (`make_nary_sequencemap`, a function
and operands) are not listed.

Every listed program compiles with these settings (Tracr takes 3 to 5 s of
CPU each, most of it XLA compiling Haiku's set-up; 0.1 s for `hist`, `count`
and `shift_by` once another program has run) and its converted model agrees
with Tracr on every input (tests/test_tracr_convert.py). Three programs leave
their output empty on part of the input space, where Tracr writes ~0 to every
output class and its argmax picks among rounding noise (which differs even
between Tracr's own batched and single-input runs): ``sort_unique`` on
inputs with a repeated token, ``shift_by`` at the first token and
``detect_pattern`` at the first two. Compare or train on those positions
through the logits, not the decoded classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastedge.tracr.convert import TracrModel, compile_program, require_tracr


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    build: Callable[[], object]   # () -> RASP SOp (imports tracr when called)
    vocab: frozenset
    max_seq_len: int
    about: str


def _lib():
    require_tracr("fastedge.tracr.programs")
    from tracr.compiler import lib
    from tracr.rasp import rasp
    return lib, rasp


def _reverse():
    lib, rasp = _lib()
    return lib.make_reverse(rasp.tokens)


def _xproportion():
    lib, rasp = _lib()
    return lib.make_frac_prevs(rasp.tokens == "x")


def _length():
    lib, _ = _lib()
    return lib.make_length()


def _hist():
    lib, _ = _lib()
    return lib.make_hist()


def _sort_unique():
    lib, rasp = _lib()
    return lib.make_sort_unique(rasp.tokens, rasp.tokens)


def _sort():
    lib, rasp = _lib()
    return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1)


def _sort_freq():
    lib, _ = _lib()
    return lib.make_sort_freq(max_seq_len=5)


def _pair_balance():
    lib, rasp = _lib()
    return lib.make_pair_balance(rasp.tokens, "(", ")")


def _shuffle_dyck():
    lib, _ = _lib()
    return lib.make_shuffle_dyck(pairs=["()"])


def _shuffle_dyck2():
    lib, _ = _lib()
    return lib.make_shuffle_dyck2()


def _count_less_freq():
    lib, _ = _lib()
    return lib.make_count_less_freq(2)


def _count():
    lib, rasp = _lib()
    return lib.make_count(rasp.tokens, "a")


def _shift_by():
    lib, rasp = _lib()
    return lib.shift_by(1, rasp.tokens)


def _detect_pattern():
    lib, rasp = _lib()
    return lib.detect_pattern(rasp.tokens, "abc")


_ABC = frozenset("abc")
SUPPORTED: dict[str, ProgramSpec] = {s.name: s for s in (
    ProgramSpec("reverse", _reverse, frozenset({1, 2, 3}), 5, "reverse the input (the paper's)"),
    ProgramSpec("xproportion", _xproportion, frozenset("wxyz"), 5,
                "fraction of the tokens so far equal to 'x' (the paper's; numerical)"),
    ProgramSpec("length", _length, _ABC, 5, "the input's length at every position"),
    ProgramSpec("hist", _hist, _ABC, 5, "how often each token occurs in the input"),
    ProgramSpec("sort_unique", _sort_unique, frozenset({1, 2, 3}), 5,
                "sort the tokens (defined for inputs without repeats)"),
    ProgramSpec("sort", _sort, frozenset({1, 2, 3}), 5, "sort the tokens (repeats allowed)"),
    ProgramSpec("sort_freq", _sort_freq, _ABC, 5, "the tokens sorted by descending frequency"),
    ProgramSpec("pair_balance", _pair_balance, frozenset("()"), 5,
                "fraction of '(' minus fraction of ')' so far (numerical)"),
    ProgramSpec("shuffle_dyck", _shuffle_dyck, frozenset("()"), 5, "1 where '()' is balanced, else 0"),
    ProgramSpec("shuffle_dyck2", _shuffle_dyck2, frozenset("(){}"), 4,
                "1 where '()' and '{}' are both balanced, else 0"),
    ProgramSpec("count_less_freq", _count_less_freq, _ABC, 5, "how many tokens occur at most twice"),
    ProgramSpec("count", _count, _ABC, 5, "how many tokens are 'a'"),
    ProgramSpec("shift_by", _shift_by, _ABC, 5, "the input shifted right by one"),
    ProgramSpec("detect_pattern", _detect_pattern, _ABC, 5, "1 where 'abc' ends, else 0"),
)}

PAPER_PROGRAMS = ("reverse", "xproportion")


def spec(name: str) -> ProgramSpec:
    if name not in SUPPORTED:
        raise ValueError(f"unknown Tracr program {name!r}; supported: {', '.join(SUPPORTED)}")
    return SUPPORTED[name]


def load(name: str) -> TracrModel:
    """Compile the named program with its settings (needs the ``tracr`` extra)."""
    s = spec(name)
    return compile_program(s.build(), s.vocab, s.max_seq_len, name=name)


def reverse() -> TracrModel:
    return load("reverse")


def xproportion() -> TracrModel:
    return load("xproportion")
