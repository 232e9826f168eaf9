"""The tiny model shipped inside fastedge, and the task it was trained on.

``induction-2l`` is a two-layer, four-head, attention-only Llama
(``LlamaForCausalLM``, d_model 64, rotary positions) trained on sequences of
random tokens that repeat once::

    [BOS] t1 t2 ... tk t1 t2 ... tk

The tokens ``t1..tk`` are distinct, drawn uniformly from ``1..VOCAB_SIZE-1``
(``BOS = 0``). After the first ``t1`` of the second half, every next token is
predictable by copying: at position ``i`` in the second half (token
``t_{i-k}``) the model predicts ``t_{i-k+1}``, the token that followed the
previous occurrence of the current token. It learned induction: a
previous-token head in layer 0 writes "my previous token" into each position,
and an induction head in layer 1 matches its query (the current token) against
those keys and copies the value (the token there) to the output. The heads are
named in ``IDENTIFIED_HEADS``; ``scripts/train_induction_model.py`` trained the
model, found them, and wrote ``induction-2l/README.md``.

The model is attention-only in effect: Llama blocks always have an MLP, so the
MLPs' output projections (``mlp.down_proj``, no bias) were set to zero and
frozen during training. The MLP writers ``m0`` and ``m1`` output exactly 0.
(Why not GPT-2: with learned absolute positions it learned positional tricks
instead of induction on these short sequences; see the training script.)

``induction_batch(n, seed)`` draws the task's data deterministically (same
arguments, same tensors, on any machine), with the interchange corruption used
for pruning: the same sequences with the first half replaced by other tokens
(disjoint from the clean ones), so the second half can no longer be predicted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

SHIPPED_MODEL_NAME = "induction-2l"
SHIPPED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIPPED_MODEL_NAME)

VOCAB_SIZE = 64
BOS = 0
DEFAULT_K = 12          # repeated-segment length of the task (sequences of 2k + 1 = 25 tokens)
TRAIN_K_RANGE = (8, 16) # segment lengths seen in training (one k per batch, inclusive)
MAX_K = TRAIN_K_RANGE[1]



def _identified_heads() -> dict:
    """The mechanism's heads as scripts/train_induction_model.py found them
    (with their attention scores) in induction-2l/heads.json; empty lists
    before the model is trained."""
    import json
    path = os.path.join(SHIPPED_MODEL_DIR, "heads.json")
    if not os.path.exists(path):
        return {"previous_token": [], "induction": []}
    with open(path) as f:
        found = json.load(f)
    return {"previous_token": list(found["previous_token"]), "induction": list(found["induction"])}


# e.g. {"previous_token": ["a0.h1"], "induction": ["a1.h2"]}
IDENTIFIED_HEADS = _identified_heads()


@dataclass
class InductionBatch:
    """One batch of the induction task.

    input_ids            [n, 2k+1] long: ``[BOS] t1..tk t1..tk``
    corrupted_input_ids  [n, 2k+1] long: ``[BOS] s1..sk t1..tk`` (``s`` disjoint from ``t``)
    target_mask          [n, 2k+1] bool: True at the positions whose *next* token is
                         predictable by copying (logit positions k+1 .. 2k-1)
    labels               [n, 2k+1] long: ``input_ids`` at the predictable tokens
                         (positions k+2 .. 2k), -100 elsewhere; Hugging Face style, so
                         ``model(input_ids, labels=labels).loss`` is the copying loss
    k                    the segment length
    """
    input_ids: torch.Tensor
    corrupted_input_ids: torch.Tensor
    target_mask: torch.Tensor
    labels: torch.Tensor
    k: int

    @property
    def targets(self) -> torch.Tensor:
        """The tokens to predict at the target positions, flattened ([n * (k-1)])."""
        return self.input_ids[:, 1:][self.target_mask[:, :-1]]


def induction_batch(n: int, seed: int = 0, k: int = DEFAULT_K, vocab_size: int = VOCAB_SIZE,
                    device: Optional[torch.device] = None) -> InductionBatch:
    """``n`` sequences ``[BOS] t1..tk t1..tk`` with distinct tokens ``t`` uniform
    from ``1..vocab_size-1``, drawn from ``torch.Generator().manual_seed(seed)``
    (deterministic), and their corruptions (see `InductionBatch`)."""
    if not 2 <= k or 2 * k > vocab_size - 1:
        raise ValueError(f"k must be in [2, {(vocab_size - 1) // 2}] for vocab_size {vocab_size}, got {k}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    # a random permutation of the non-BOS tokens per row: the first k are the
    # clean segment, the next k its corruption (so the two share no token)
    perm = torch.rand(n, vocab_size - 1, generator=gen).argsort(dim=1) + 1
    clean, other = perm[:, :k], perm[:, k:2 * k]
    bos = torch.full((n, 1), BOS, dtype=torch.long)
    input_ids = torch.cat([bos, clean, clean], dim=1)
    corrupted = torch.cat([bos, other, clean], dim=1)
    S = 2 * k + 1
    pos = torch.arange(S)
    target_mask = ((pos >= k + 1) & (pos <= 2 * k - 1)).expand(n, S).clone()
    labels = torch.where((pos >= k + 2).expand(n, S), input_ids, torch.full_like(input_ids, -100))
    out = InductionBatch(input_ids, corrupted, target_mask, labels, k)
    if device is not None:
        out = InductionBatch(*(t.to(device) for t in (input_ids, corrupted, target_mask, labels)), k)
    return out


def load_shipped_model(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
    """The shipped ``induction-2l`` model (a ``LlamaForCausalLM``), eager
    attention (so that ``output_attentions`` works), in eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL_DIR, attn_implementation="eager")
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


@torch.no_grad()
def copying_accuracy(model, batch: InductionBatch) -> float:
    """Fraction of the target positions where the argmax is the copied token."""
    logits = model(batch.input_ids).logits
    pred = logits[:, :-1].argmax(-1)
    mask = batch.target_mask[:, :-1]
    return (pred[mask] == batch.input_ids[:, 1:][mask]).float().mean().item()


@torch.no_grad()
def head_scores(model, batch: InductionBatch) -> dict:
    """Attention scores of every head, averaged over the batch and the second
    half's query positions ``i = k+1 .. 2k``:

    * ``previous_token[a{l}.h{i}]``: attention from ``i`` to ``i - 1``;
    * ``induction[a{l}.h{i}]``: attention from ``i`` to ``i - k + 1``, the token
      after the previous occurrence of the current token.
    """
    out = model(batch.input_ids, output_attentions=True)
    k = batch.k
    q = torch.arange(k + 1, 2 * k + 1)
    scores = {"previous_token": {}, "induction": {}}
    for layer, att in enumerate(out.attentions):  # [n, H, S, S]
        for h in range(att.shape[1]):
            name = f"a{layer}.h{h}"
            scores["previous_token"][name] = att[:, h, q, q - 1].mean().item()
            scores["induction"][name] = att[:, h, q, q - k + 1].mean().item()
    return scores


__all__ = ["SHIPPED_MODEL_NAME", "SHIPPED_MODEL_DIR", "VOCAB_SIZE", "BOS", "DEFAULT_K", "TRAIN_K_RANGE",
           "MAX_K", "IDENTIFIED_HEADS", "InductionBatch", "induction_batch", "load_shipped_model",
           "copying_accuracy", "head_scores"]
