"""CPU threads for small models.

A model a few dozen or hundred units wide (the shipped induction model:
hidden 64; Tracr programs) runs each op in microseconds, so PyTorch's
intra-op threads only add synchronisation; on a CPU that other jobs share,
every parallel region also waits for the slowest, descheduled thread.
Measured on this project's CPU machine (2 cores shared with other jobs,
load about 5; `fastedge prune --steps 150` on the shipped model, two runs
each): 167 and 203 s with PyTorch's default of 2 threads, 32 s with one. So
for such models fastedge runs on one thread unless the user chose a count.
"""
from __future__ import annotations

import os
from typing import Optional

# widest model (embedding size) that gets one thread by default
SMALL_HIDDEN = 256


def pick_cpu_threads(model, device) -> Optional[int]:
    """Set PyTorch to one thread for a small model on the CPU; returns the
    count set, or None when it left the default (a GPU, a wider model, or
    OMP_NUM_THREADS / MKL_NUM_THREADS given by the user)."""
    import torch
    if not str(device).startswith("cpu"):
        return None
    if any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return None
    try:
        hidden = model.get_input_embeddings().embedding_dim
    except (AttributeError, NotImplementedError):
        return None
    if hidden > SMALL_HIDDEN:
        return None
    torch.set_num_threads(1)
    return 1
