"""What `fastedge prune` does with no model given: the shipped induction
model, its task, and pruning settings that finish on a CPU in about two minutes
(1,000 steps)."""
from __future__ import annotations

from fastedge.tasks.induction import make_induction

# Settings of `fastedge prune` for the shipped model (the command line's
# defaults for any other model are the paper's: 3,000 steps).
PRUNE_DEFAULTS = {
    "target_sparsity": 1.0,
    "circuit_sparsity": 0.9,
    "steps": 1000,
    "lr": 0.1,
    "lambda_lr": 0.8,
    "lr_warmup_steps": 20,
    "sparsity_warmup_steps": 700,
    # the sparsity term on expected masks: it has a gradient from the first
    # step, where sampled masks starting at 1 pass almost none (PruneConfig)
    "sparsity_estimate": "expected",
}


def induction_task(n_examples: int = 400, seed: int = 0, k: int = 12):
    """The shipped model's task: ``[BOS] t1..tk t1..tk`` with distinct tokens
    from 1..63 (BOS = 0); targets are the second copy's predictable tokens;
    the corrupted input replaces the first copy with other tokens."""
    from fastedge import shipped
    return make_induction(n_examples=n_examples, seed=seed, vocab_size=shipped.VOCAB_SIZE, half_length=k,
                          first_token=1, bos_token_id=shipped.BOS)
