"""A Tracr program's input space as a pruning task.

Every input of the program (`inputs.input_space`: all sequences of its
vocabulary up to its maximum length, or a seeded sample) is one example:
BOS, then the input. The targets are the model's own outputs at every
position but BOS (``Example.answer_offset = 0``: the logits at a position
are the output there, not a prediction of the next token).

The objective (`fastedge.objectives`):

* categorical programs (reverse, ...): KL(p_full || p_circuit) over the
  output vocabulary, the softmax of the output-space logits, at each
  position, as for language models;
* numerical programs (xproportion, ...): the squared error of the output
  value. It is 0 exactly when the circuit reproduces the program's values.

The authors' code (erazr_reverse.py / erazr_xproportion.py in their
repository) uses KL for both; for the numerical program it applies the
softmax across the positions of the one-value output, which compares the
values' shape along the sequence, not the values. The squared error here
compares the values themselves.

Corrupted inputs (used by interchange ablation; the paper's Tracr runs, and
`PRUNE_DEFAULTS`, use zero ablation, which ignores them): another input of
the same length, drawn with the task's seed.
"""
from __future__ import annotations

import random
from typing import Optional

import torch

from fastedge.tasks.base import Example, TaskData
from fastedge.tracr.convert import TracrModel
from fastedge.tracr.inputs import batch_ids, input_space

from fastedge.tracr.truth import NUMERICAL_TOLERANCE  # the same output, numerically

# Tracr's outputs are 0/1 scores (categorical) or values in a small range
# (numerical): divided by this before the softmax (KL) or the squared error,
# the full model's distribution is its output (`fastedge.objectives`) and a
# wrong value weighs as much as a wrong class
OUTPUT_TEMPERATURE = 0.1

# The defaults that recover the paper's two circuits (README, "Tracr"):
# `fastedge.prune(tm.model, task, **PRUNE_DEFAULTS)`.
PRUNE_DEFAULTS = dict(
    ablation="zero",          # as the paper does for Tracr models
    target_sparsity=1.05,     # above 1: push until only what the outputs need survives;
                              # the circuit is then read off by the mask threshold
    steps=300,
    batch_size=32,
    # slow multipliers: a target above 1 is never met, so they grow for the
    # whole run, and KL cannot outweigh them for long (the KL of a uniform
    # output is only log V). At lambda_lr 0.1 they overtook it within 300
    # steps and one seed in three lost reverse's length path; at 0.01 every
    # seed tried (0-3) recovered both paper programs
    lr=0.05,
    lambda_lr=0.01,
    lr_warmup_steps=20,
    sparsity_warmup_steps=150,
    init_log_alpha=3.0,
    sparsity_estimate="expected",
    node_masks=False,
    checkpoint_every=100,
)


@torch.no_grad()
def _outputs(tm: TracrModel, inputs: list) -> torch.Tensor:
    ids, mask = batch_ids(tm, inputs)
    return tm.model(ids.to(tm.model.device), attention_mask=mask.to(tm.model.device)).logits.cpu()


def task(tm: TracrModel, n_examples: Optional[int] = None, seed: int = 0) -> TaskData:
    """The program's input space (all of it, or `n_examples` inputs drawn
    with `seed`) as a `TaskData` (module docstring)."""
    inputs = input_space(tm, n_examples, seed)
    rng = random.Random(seed)
    by_length: dict[int, list] = {}
    for seq in inputs:
        by_length.setdefault(len(seq), []).append(seq)
    corrupted = [rng.choice(by_length[len(seq)]) for seq in inputs]
    clean_out = _outputs(tm, inputs)
    corrupted_out = _outputs(tm, corrupted)
    examples = []
    for i, (seq, other) in enumerate(zip(inputs, corrupted)):
        positions = list(range(1, len(seq) + 1))
        if tm.categorical:
            answer = clean_out[i, positions].argmax(-1).tolist()
            other_answer = corrupted_out[i, positions].argmax(-1).tolist()
        else:  # no classes: the value is the target (kept in the cache, not here)
            answer = other_answer = [0] * len(positions)
        examples.append(Example(clean_ids=tm.encode(seq), corrupted_ids=tm.encode(other),
                                target_positions=positions, clean_answer=answer,
                                corrupted_answer=other_answer, source=f"tracr:{tm.name}:{i}",
                                meta={"input": list(seq)}, answer_offset=0))
    meta = {"kind": "tracr", "program": tm.name, "objective": "kl" if tm.categorical else "mse",
            "temperature": OUTPUT_TEMPERATURE,
            "faithfulness": "objective", "output_tolerance": 0.0 if tm.categorical else NUMERICAL_TOLERANCE,
            "n_examples": n_examples, "seed": seed, "max_seq_len": tm.max_seq_len,
            "vocab": [str(v) for v in tm.input_vocab]}
    return TaskData(f"tracr:{tm.name}" if tm.name else "tracr", examples, meta)
