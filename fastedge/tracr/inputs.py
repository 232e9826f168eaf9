"""A Tracr program's input space: every sequence of its vocabulary from one
token up to its maximum length (or a seeded sample of them when there are
too many), and batches of them as the model takes them (BOS first, padded on
the right, padding hidden by the attention mask)."""
from __future__ import annotations

import itertools
import random
from typing import Optional, Sequence

import torch

from fastedge.tracr.convert import TracrModel


def input_space_size(tm: TracrModel) -> int:
    v = len(tm.input_vocab)
    return sum(v ** n for n in range(1, tm.max_seq_len + 1))


def input_space(tm: TracrModel, n_examples: Optional[int] = None, seed: int = 0) -> list[tuple]:
    """Inputs (BOS not included), shortest first. All of them when
    `n_examples` is None or at least the size of the space; otherwise
    `n_examples` distinct inputs drawn uniformly (seeded) from the space."""
    vocab, total = tm.input_vocab, input_space_size(tm)
    if n_examples is not None and n_examples <= 0:
        raise ValueError(f"n_examples must be positive, got {n_examples}")
    if n_examples is None or n_examples >= total:
        return [seq for n in range(1, tm.max_seq_len + 1) for seq in itertools.product(vocab, repeat=n)]
    picked = sorted(random.Random(seed).sample(range(total), n_examples))
    return [_nth_input(vocab, tm.max_seq_len, i) for i in picked]


def _nth_input(vocab: Sequence, max_len: int, index: int) -> tuple:
    """The `index`-th input in the order of `input_space` (without listing them)."""
    v = len(vocab)
    for n in range(1, max_len + 1):
        if index < v ** n:
            digits = []
            for _ in range(n):
                index, d = divmod(index, v)
                digits.append(vocab[d])
            return tuple(reversed(digits))
        index -= v ** n
    raise IndexError("input index out of range")


def batch_ids(tm: TracrModel, inputs: Sequence[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]) for `inputs`, BOS first,
    right-padded with the PAD token (or BOS where the model has none)."""
    encoded = [tm.encode(seq) for seq in inputs]
    S = max(len(e) for e in encoded)
    cfg = tm.config
    pad = cfg.input_vocab.index(cfg.tracr_pad_token) if cfg.tracr_pad_token in cfg.input_vocab else 0
    ids = torch.full((len(encoded), S), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), S), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask
