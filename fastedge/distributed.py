"""Data-parallel pruning over `torch.distributed`, launched with `torchrun`.

    torchrun --nproc_per_node 8 -m fastedge.cli prune --model M --task T --batch-size 32 --out runs/x

`fastedge.prune` looks at the default process group: when it is initialised
with more than one rank (by `init_from_env`, which the command line calls,
or by your own `torch.distributed.init_process_group`), it prunes data
parallel. Every rank holds the whole frozen model, the EdgeModel's
`log_alpha`s, the Lagrange multipliers, the optimizer and scheduler states
and the data sampler, all equal on every rank. Each step every rank draws
the same global batch of `batch_size` examples (one process's draw from the
same seed), splits it into micro-batches of `micro_batch_size` examples
(default ``batch_size // world_size``), and runs a contiguous block of them:
rank r runs micro-batches ``[r * n / world, (r + 1) * n / world)``. Each
micro-batch's loss is already weighted by ``len(chunk) / batch_size``, so
gradients are summed over ranks (one all-reduce per dtype) before they are
checked and AdamW steps; the logged totals (loss, KL, sparsity) are summed
too. Only rank 0 writes the checkpoint, ``log.jsonl`` and ``masks.pt``;
on resume every rank loads the checkpoint.

Each micro-batch samples its hard-concrete masks with the seed one process
gives it (`fastedge.prune._noise_seed`: from the step and the micro-batch's
index in the global batch), so a run over N ranks computes the same
gradients as one process with the same `micro_batch_size`, up to the order
in which the micro-batch gradients are summed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel run (rank 0 of 1 when
    torch.distributed is not initialised)."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Group:
    """The default process group's rank and size, or rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Group(rank=dist.get_rank(), world_size=dist.get_world_size())
    return Group()


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (torchrun sets
    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: Optional[str] = None) -> bool:
    """Join the process group that torchrun describes in the environment:
    backend nccl when the run is on CUDA (`device` "cuda..." or, when None,
    whenever CUDA is available), with the current CUDA device set to
    LOCAL_RANK; gloo on the CPU. Returns True when this call initialised the
    group (the caller then owns it: `destroy()`), False when it was
    initialised already or the process was not launched by torchrun."""
    if not dist.is_available():
        if launched_by_torchrun():
            raise RuntimeError("torch.distributed is not available in this build of PyTorch")
        return False
    if dist.is_initialized() or not launched_by_torchrun():
        return False
    on_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if on_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend="gloo")
    return True


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group) -> None:
    if group.distributed:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], group: Group, device) -> list[float]:
    """Python numbers summed over ranks (in float64)."""
    if not group.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], group: Group) -> None:
    """Sum every parameter's `.grad` over ranks, in place: one all-reduce per
    (dtype, device). A parameter that has no gradient on any rank keeps None
    (as it would in one process); one that has a gradient on some rank gets
    the sum, with zeros for the ranks that had none."""
    if not group.distributed:
        return
    buckets: dict = {}
    for p in params:
        buckets.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), ps in buckets.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
                         + [torch.tensor([float(p.grad is not None) for p in ps], dtype=dtype, device=device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flags = flat[-len(ps):].tolist()
        offset = 0
        for p, has in zip(ps, flags):
            n = p.numel()
            if has:
                summed = flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
            offset += n
