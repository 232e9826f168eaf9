"""Induction: copy a repeated random sequence (token level, no tokenizer).

Clean (``o = 1`` with a BOS token at position 0, else ``o = 0``)::

    [BOS] t1 t2 ... tk t1 t2 ... tk        (length o + 2k)

Targets: the positions in the second half whose next token is a repeat that
copying can predict. The second half starts at ``o + k``; the logits at
position ``o + k + j - 1`` (the second-half ``t_j``) predict ``t_{j+1}``, for
``j = 1 .. k-1``. So the target positions are ``o + k .. o + 2k - 2`` and the
clean answers ``t2 .. tk``. The first token of the second half (``t1`` at
``o + k``) is *not* a target: nothing before it says the sequence is about to
repeat, so it is not predictable (the logits at ``o + k - 1`` are excluded).

Corrupted: the same length, the first half replaced by a different random
sequence ``s1..sk`` and the second half kept (``[BOS] s1..sk t1..tk``), so
the second half has nothing to copy from; ``corrupted_answer`` is therefore
``t2..tk`` too.

Generator (kept stable: the shipped induction model is trained on this
distribution). With ``g = torch.Generator().manual_seed(seed)`` and
``R = vocab_size - first_token`` tokens in the range ``[first_token,
vocab_size)``:

* ``distinct=True`` (default): ``perm = torch.rand(n, R, generator=g)
  .argsort(dim=1) + first_token``; ``t = perm[:, :k]``, ``s = perm[:, k:2k]``:
  the tokens of a half are distinct and the corrupted half shares no token
  with the clean one (needs ``R >= 2k``). With ``first_token=1``,
  ``bos_token_id=0`` this is exactly ``fastedge.shipped.induction_batch``'s
  draw.
* ``distinct=False``: ``t = torch.randint(first_token, vocab_size, (n, k),
  generator=g)``, then ``s`` likewise (independent of ``t``).

The validation split is every fifth example for the default fraction 0.2 (see
`fastedge.tasks.base.validation_flags`).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastedge.tasks.base import Example, TaskData, validation_flags
from fastedge.tasks.store import ExampleStore


def _vocab_size_of(tokenizer) -> Optional[int]:
    if tokenizer is None:
        return None
    try:
        return len(tokenizer)
    except TypeError:
        v = getattr(tokenizer, "vocab_size", None)
        return int(v) if v is not None else None


def make_induction(n_examples: int = 1000, seed: int = 0, vocab_size: Optional[int] = None,
                   half_length: int = 12, *, first_token: int = 0, bos_token_id: Optional[int] = None,
                   distinct: bool = True, validation_fraction: float = 0.2, tokenizer=None) -> TaskData:
    """The induction task (see the module docstring). ``vocab_size`` defaults
    to the tokenizer's (``len(tokenizer)``) when one is given."""
    if vocab_size is None:
        vocab_size = _vocab_size_of(tokenizer)
        if vocab_size is None:
            raise ValueError("induction: give vocab_size (or a tokenizer to take it from)")
    n, k, V, first = int(n_examples), int(half_length), int(vocab_size), int(first_token)
    if n < 1:
        raise ValueError(f"induction: n_examples must be at least 1, got {n}")
    if k < 2:
        raise ValueError(f"induction: half_length must be at least 2 (one target needs two tokens), got {k}")
    if not 0 <= first < V:
        raise ValueError(f"induction: need 0 <= first_token < vocab_size, got {first} and {V}")
    R = V - first
    if distinct and R < 2 * k:
        raise ValueError(f"induction: distinct=True needs at least 2 * half_length = {2 * k} tokens in "
                         f"[first_token, vocab_size) = [{first}, {V}), there are {R}")
    if bos_token_id is not None and not 0 <= bos_token_id < V:
        raise ValueError(f"induction: bos_token_id {bos_token_id} outside the vocabulary of size {V}")
    if bos_token_id is not None and first <= bos_token_id < V:
        raise ValueError(f"induction: bos_token_id {bos_token_id} lies in the token range [{first}, {V}); "
                         f"raise first_token above it")
    g = torch.Generator().manual_seed(int(seed))
    bos = [] if bos_token_id is None else [int(bos_token_id)]
    o = len(bos)
    positions = list(range(o + k, o + 2 * k - 1))
    flags = validation_flags(n, validation_fraction)
    examples = ExampleStore()
    for i, (t, s) in enumerate(_draws(g, n, k, V, first, distinct)):
        examples.append(Example(clean_ids=bos + t + t, corrupted_ids=bos + s + t, target_positions=positions,
                                clean_answer=t[1:], corrupted_answer=t[1:],
                                split="validation" if flags[i] else "train", source=f"induction:{i}"))
    return TaskData("induction", examples, {"seed": seed, "vocab_size": V, "half_length": k,
                                            "first_token": first, "bos_token_id": bos_token_id,
                                            "distinct": distinct})


def _draws(g: torch.Generator, n: int, k: int, V: int, first: int, distinct: bool):
    """The (clean half, corrupted half) of each example, as lists, drawn in
    blocks of rows: ``torch.rand`` fills a tensor in order on the CPU, so
    drawing row blocks one after the other gives the rows of one
    ``torch.rand(n, R)`` (a test checks it) without holding n x R floats at
    once (20 GB for 100,000 examples over GPT-2's vocabulary)."""
    R = V - first
    if not distinct:
        clean = torch.randint(first, V, (n, k), generator=g)    # 8 bytes a token: 19 MB for 100K x 2 x 12
        other = torch.randint(first, V, (n, k), generator=g)
        for start in range(0, n, 4096):                       # Python ints only for a block at a time
            yield from zip(clean[start:start + 4096].tolist(), other[start:start + 4096].tolist())
        return
    rows = max(1, min(n, (1 << 22) // R))   # a block of at most 16 MB of floats
    for start in range(0, n, rows):
        perm = torch.rand(min(rows, n - start), R, generator=g).argsort(dim=1)[:, :2 * k] + first
        for row in perm.tolist():
            yield row[:k], row[k:]


def induction_task(tokenizer=None, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2,
                   **options) -> TaskData:
    """`make_induction` with the registry's calling convention
    ``(tokenizer, n_examples, seed, validation_fraction, **options)``."""
    return make_induction(n_examples, seed, validation_fraction=validation_fraction, tokenizer=tokenizer, **options)


__all__ = ["make_induction", "induction_task"]
