"""Kernel microbenchmark: fastedge's masked writer sum (given masks, and sampled
from log_alpha) against the authors' formulation.

What is measured
----------------
One layer's worth of reader inputs (README: "The operations"; docs/CONCEPTS.md section 5) at the shapes of a
real pruning run:

* GPT-2 small (158 writers, trailing shape ``T = (batch, seq, hidden) =
  (32, 64, 768)``, float32): ``gpt2-L{l}`` is layer ``l``'s 37 readers (12 q,
  12 k, 12 v heads and the MLP), which fastedge computes in **one call** over
  the MLP's prefix of ``W = 14 + 13 l`` writers: the q/k/v rows carry
  structural zeros on the layer's own heads, and ``base`` has two rows (the
  corrupted residual before the layer for q/k/v, between attention and MLP
  for the MLP). ``gpt2-resid_post`` is the final read, 1 reader over all 158
  writers, one shared base row.
* CodeLlama-13B (1641 writers, ``T = (batch, 72, 5120)``, bfloat16, batch 1
  and 8): ``cl13b-b{1,8}-L{0,20,39}``, the first, middle and last layer's 121
  readers. The default on a GPU is every case; on the CPU the GPT-2 ones.

Ops (``OPS``; ``--ops``, column ``op``):

* ``masked``: ``fastedge.masked_writer_sum`` with given masks ``[R, W]``.
* ``sampled``: the fused form ``fastedge.sampled_masked_writer_sum``: the
  hard-concrete masks are sampled inside the op from ``log_alpha [R, W]``
  (``U(-3, 3)``, ``-inf`` at structural zeros, no node masks) and a Philox
  seed, it returns ``(out, edge_sum)``, and its backward gives ``d log_alpha``
  (``d edge_sum = 1``, as a sparsity term that adds the sum would).

Providers, side by side in one run (``PROVIDERS`` for masked,
``SAMPLED_PROVIDERS`` for sampled):

* ``naive``: the authors' formulation (`bench/naive.py`): two full
  ``[158, *T]`` writer tensors (clean and corrupted) and, per kind of reader,
  one einsum over each of them, always over all writers. For ``sampled`` the
  masks are sampled first in plain PyTorch (``naive_hard_concrete``: the
  docs/CONCEPTS.md section 1 formula on ``torch.rand`` noise, autograd for the backward)
  from per-kind log_alphas in the authors' layout, with the sum of the edge
  masks; the backward reaches the log_alphas and the clean writer tensor.
* ``torch``, ``triton``, ``cuda`` (and, on request, ``reference``): the
  fastedge op with ``backend=name`` on fastedge's inputs: one stack of deltas
  ``y - y~`` plus ``base``; the stack gradient accumulates in a caller-owned
  fp32 buffer (``grad_stack``), as in a pruning step.

Modes (``MODES``): ``fwd`` (a training forward: autograd records, inputs
require grad), ``bwd`` (the backward of a recorded forward: writer-stack and
mask or log_alpha gradients), ``fwd+bwd``.

A cell whose timing raises (out of memory, a backward that cannot repeat) is
reported as ``error`` with the exception, and the run goes on; the exit
status is 1 when any cell is ``wrong`` or ``error``.

Checks before timing (``Op.expected``): a provider whose results disagree is
reported as ``wrong`` and not timed; one that cannot run here (``triton`` on
a CPU, a backend that is not built) is ``skipped`` with its reasons.

* ``masked``: every fastedge provider's forward is compared with the naive
  output at the timed shape, and its stack and mask gradients at a batch-1
  slice of the case (``CHECK_BATCH``).
* ``sampled``: naive and fastedge draw different random numbers, so each is
  compared with fastedge's own reference path for the same seed: the forward
  at the timed shape with the masks and edge sum of
  ``fastedge.ops.sample_masks(..., backend="reference")`` summed by
  ``masked_writer_sum(..., backend="torch")``; the stack and log_alpha
  gradients on the batch-1 slice with the whole fused op on the ``reference``
  backend (d log_alpha is not compared where the reference's stretched sample
  is within ``CLAMP_EDGE`` of the clamp, where it jumps). The naive sampled
  provider is checked too, fed fastedge's noise ``fastedge.ops.edge_noise``
  for that seed instead of ``torch.rand``.

Timing (``measure``): on a GPU, ``triton.testing.do_bench`` (CUDA events,
warm-up, L2 flushed between calls; it repeats for ``--rep-ms``, so a call
slower than a fifth of that is topped up with timed calls of the same kind to
``MIN_GPU_SAMPLES``, 5, for a p50 of its own); on the CPU, ``torch.utils.benchmark.Timer``
(its first call is the warm-up; blocks until ``--reps`` samples and
``--min-time`` seconds, or until ``--max-time`` would be exceeded). p20, p50
and p80 per (case, op, mode, provider), and the speed-up ``naive p50 /
provider p50`` of the same op from the same run. Memory: ``state_mb`` is the
bytes of the tensors a provider keeps (inputs; fastedge's gradient buffer in
backward modes); ``peak_extra_mb`` is the measured peak above what was
allocated before a call (``torch.cuda.max_memory_allocated`` on a GPU; on the
CPU the growth of the process's peak resident set, VmHWM, over the cell, or
``n/a``).

Bytes moved and bandwidth (``bytes_moved``, columns ``bytes_moved``,
``bw_gb_s``, ``frac_copy_bw``): the fewest bytes one call must move through
memory (docs/CONCEPTS.md section 5), with ``R`` readers, ``W`` writers read, ``N =
batch * seq * hidden``, ``G`` base rows (2 for a layer, 1 for resid_post),
``e`` the element size of the case's dtype (stack, base, out and dout; 4 for
float32, 2 for bfloat16) and 4 bytes for the fp32 mask, log_alpha, their
gradients and the stack-gradient buffer::

    fwd     = W*N*e (read the stack prefix once) + G*N*e (base) + R*W*4 (mask, or log_alpha)
              + R*N*e (write out)                      [+ 4: edge_sum, sampled]
    bwd     = R*N*e (read dout) + W*N*e (read the stack) + 2*W*N*4 (read and write the fp32
              stack-gradient buffer) + 2*R*W*4 (read the mask or log_alpha, write its
              gradient)                                [+ 4: d edge_sum, sampled]
    fwd+bwd = fwd + bwd

The same count is used for every provider of a (case, op, mode), naive
included (whatever it actually moves: two full writer tensors, a fresh
gradient tensor), so ``bw_gb_s = bytes_moved / p50`` (10^9 bytes per second)
is an *effective* bandwidth, comparable across providers: the ratio of two
providers' bandwidths is their speed-up. ``frac_copy_bw`` is ``bw_gb_s``
divided by ``copy_bw_gb_s``, the device's copy bandwidth measured once at the
start of the same run (``measure_copy_bandwidth``): on a GPU a 2 GiB
device-to-device ``copy_`` timed like a cell, on the CPU a 256 MiB memcpy
(``Tensor.copy_`` on the torch threads, labelled in ``copy_bw_method``),
counting the bytes read plus the bytes written; its buffers are freed before
the cases run (``--copy-mib`` sets the size, 0 skips it and leaves the
fraction empty).

Output: one CSV row per (case, op, mode, provider) appended to
``<out>/ops.csv`` (a file with an older header is rewritten with the union of
the columns, old rows kept and their new cells empty) and a markdown table
printed and written to ``<out>/ops-<device>-<date>.md``; ``<out>`` is
``--out``, else ``$OUT``, else ``bench/results``.

Extending it: a model is a `Model` in ``MODELS``, a case a `Case` in ``CASES``,
an op an `Op` in ``OPS`` (its providers and its reference results), a
provider a `Provider` in its op's table, a mode an entry of ``MODES``, a
column a function in ``METRICS`` (it receives the row's `Cell`).

    python bench/ops.py                      # the default run (GPU if present, else CPU)
    python bench/ops.py --quick --out /tmp/b  # tiny shapes, seconds
    python bench/ops.py --cases gpt2-L11 --ops sampled --modes fwd --providers naive,torch
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import naive  # noqa: E402  (bench/naive.py)
import results_csv  # noqa: E402  (bench/results_csv.py)

import fastedge  # noqa: E402
import fastedge.ops  # noqa: E402
from fastedge import constants as C  # noqa: E402
from fastedge.backends import Call, explain  # noqa: E402
from fastedge.kernels import reference as kref  # noqa: E402
from fastedge.graph import EdgeGraph  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Forward agreement with the naive output: max |a - b| <= TOL * max(1, max |naive|).
# Gradients (long reductions) get GRAD_TOL_FACTOR times more.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
GRAD_TOL_FACTOR = 10.0
CHECK_BATCH = 1  # gradients are checked on this many sequences of the case (cheap)
LOG_ALPHA_RANGE = 3.0  # the sampled op's log_alpha ~ U(-3, 3): masks at 0, at 1 and in between
# The hard-concrete gradient jumps where the stretched sample crosses 0 or 1; d log_alpha
# is not compared for edges whose reference stretched sample lies this close to either.
CLAMP_EDGE = 1e-4
MIN_GPU_SAMPLES = 5  # the fewest samples per GPU cell (do_bench gives one for a call slower than --rep-ms)


# =============================================================================
# Models and cases
# =============================================================================


@dataclass(frozen=True)
class Model:
    """Shapes of one model as the benchmark needs them (no weights)."""
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    embeddings: tuple
    hidden: int
    batch: int   # the paper's pruning batch
    seq: int     # and sequence length
    dtype: str = "float32"

    def graph(self) -> EdgeGraph:
        return EdgeGraph(n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         embeddings=self.embeddings)


MODELS = {
    "gpt2-small": Model("gpt2-small", n_layers=12, n_heads=12, n_kv_heads=12,
                        embeddings=("tok_embeds", "pos_embeds"), hidden=768, batch=32, seq=64),
    # The paper's CodeLlama-13B runs: sequences of 64 to 72 tokens, bf16, micro-batches.
    "codellama-13b-b1": Model("codellama-13b-b1", n_layers=40, n_heads=40, n_kv_heads=40,
                              embeddings=("embeds",), hidden=5120, batch=1, seq=72, dtype="bfloat16"),
    "codellama-13b-b8": Model("codellama-13b-b8", n_layers=40, n_heads=40, n_kv_heads=40,
                              embeddings=("embeds",), hidden=5120, batch=8, seq=72, dtype="bfloat16"),
}


@dataclass(frozen=True)
class Case:
    """One fastedge call: a layer's readers (q/k/v heads and MLP), or resid_post.
    `sparsity`: "" (every mask drawn), "edgesP" (P% of the edges at 0, at
    random) or "nodesP" (P% of the writers pruned: every mask of theirs at 0,
    as a node mask at 0 makes them; the kernels skip such writers)."""
    name: str
    model: str
    layer: Optional[int]  # None: resid_post
    sparsity: str = ""

    @property
    def zero_fraction(self) -> tuple[str, float]:
        """("", 0), ("edges", P / 100) or ("nodes", P / 100)."""
        if not self.sparsity:
            return "", 0.0
        kind = self.sparsity.rstrip("0123456789")
        return kind, int(self.sparsity[len(kind):]) / 100

    @property
    def kind(self) -> str:
        return "resid_post" if self.layer is None else "layer"


CASES = [
    Case("gpt2-L0", "gpt2-small", 0),
    Case("gpt2-L5", "gpt2-small", 5),
    Case("gpt2-L11", "gpt2-small", 11),
    Case("gpt2-resid_post", "gpt2-small", None),
    # CodeLlama-13B: the read prefix at the first, middle and last layer.
    *[Case(f"cl13b-b{b}-L{layer}", f"codellama-13b-b{b}", layer)
      for b in (1, 8) for layer in (0, 20, 39)],
]
# Sparse masks (issue 9): 50%, 90% and 99% of the edges at 0 at random, or of
# the writers pruned, at GPT-2's last layer and CodeLlama-13B's (batch 1 by
# default: the naive provider is as slow as dense there).
SPARSITIES = [f"{kind}{p}" for kind in ("edges", "nodes") for p in (50, 90, 99)]
SPARSE_CASES = [Case(f"{base.name}-{sp}", base.model, base.layer, sp)
                for base in CASES if base.name in ("gpt2-L11", "cl13b-b1-L39", "cl13b-b8-L39")
                for sp in SPARSITIES]
# The CPU default leaves CodeLlama out (tens of GB of writer tensors, minutes per cell).
CPU_DEFAULT_CASES = [c.name for c in CASES if c.model == "gpt2-small"]
GPU_DEFAULT_CASES = [c.name for c in CASES + SPARSE_CASES if "cl13b-b8" not in c.name or not c.sparsity]
CASE_BY_NAME = {c.name: c for c in CASES + SPARSE_CASES}


@dataclass(frozen=True)
class Layout:
    """Who reads what in one case, from fastedge's own EdgeGraph."""
    n_readers: int         # R of the fastedge call
    n_writers: int         # W: the prefix read
    total_writers: int     # writers of the model (the naive tensors' first dimension)
    n_heads: int           # q heads = k/v readers per kind (no grouped-query models yet)
    attn_writers: int      # prefix of the q/k/v readers (layer cases)

    @classmethod
    def of(cls, case: Case, model: Model) -> "Layout":
        g = model.graph()
        if model.n_kv_heads != model.n_heads:
            raise NotImplementedError("the naive provider has no grouped-query attention yet")
        if case.layer is None:
            (group,) = [x for x in g.groups if x.kind == "resid_post"]
            return cls(1, group.n_writers, g.n_writers, model.n_heads, group.n_writers)
        attn, mlp = [x for x in g.groups if x.layer == case.layer]
        assert attn.kind == "attn" and mlp.kind == "mlp"
        return cls(attn.n_readers + mlp.n_readers, mlp.n_writers, g.n_writers, model.n_heads,
                   attn.n_writers)


# =============================================================================
# Problem data
# =============================================================================


@dataclass
class WriterData:
    """Writer outputs shared by every case of one model: ``[total_writers, *T]``."""
    clean: torch.Tensor      # y_w (the naive provider's x)
    corrupted: torch.Tensor  # y~_w (the naive provider's corr_x)
    delta: torch.Tensor      # y_w - y~_w: fastedge's stack (node masks 1)

    @classmethod
    def random(cls, total_writers: int, trailing: tuple, dtype, device, seed: int) -> "WriterData":
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (total_writers,) + tuple(trailing)
        clean = torch.randn(shape, generator=gen, dtype=dtype, device=device)
        corrupted = torch.randn(shape, generator=gen, dtype=dtype, device=device)
        return cls(clean, corrupted, clean - corrupted)

    def sliced(self, batch: int) -> "WriterData":
        """The first `batch` sequences, as contiguous copies (for the gradient check)."""
        c, k = self.clean[:, :batch].contiguous(), self.corrupted[:, :batch].contiguous()
        return WriterData(c, k, c - k)


@dataclass
class Problem:
    """Everything one case needs, in both formulations."""
    case: Case
    layout: Layout
    data: WriterData
    naive_masks: dict        # authors' layout: q/k/v [W_total, H], mlp [W_total] (or final [W_total])
    mask: torch.Tensor       # fastedge's [R, W] float32, structural zeros included
    valid: torch.Tensor      # [R, W] bool: False at structural zeros
    base: torch.Tensor       # [G, *T] (layers) or [*T] (resid_post)
    base_index: Optional[torch.Tensor]
    dout: torch.Tensor       # [R, *T] upstream gradient
    # The sampled op (masks drawn from log_alpha inside the call):
    naive_log_alpha: dict = dataclasses.field(default_factory=dict)  # authors' layout, like naive_masks
    log_alpha: Optional[torch.Tensor] = None  # fastedge's [R, W] float32, -inf at structural zeros
    sample_seed: int = 0     # fastedge's Philox seed (reader_offset 0)

    @property
    def trailing(self) -> tuple:
        return tuple(self.data.clean.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.clean.dtype

    @property
    def device(self) -> torch.device:
        return self.data.clean.device

    def sliced(self, batch: int) -> "Problem":
        """The same case on the first `batch` sequences (same masks)."""
        base = self.base[:, :batch] if self.base_index is not None else self.base[:batch]
        return dataclasses.replace(self, data=self.data.sliced(batch), base=base.contiguous(),
                                   dout=self.dout[:, :batch].contiguous())


def build_problem(case: Case, model: Model, data: WriterData, seed: int) -> Problem:
    """Random masks in [0, 1] in the authors' layout, and the equivalent fastedge call."""
    lay = Layout.of(case, model)
    dev, dtype = data.clean.device, data.clean.dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    W, Wt, H = lay.n_writers, lay.total_writers, lay.n_heads

    def rand(*shape):
        return torch.rand(shape, generator=gen, dtype=torch.float32)

    def log_alpha(*shape):  # a mix of masks at 0, at 1 and in between
        return rand(*shape) * (2 * LOG_ALPHA_RANGE) - LOG_ALPHA_RANGE

    with torch.no_grad():
        if case.layer is None:
            z = rand(Wt)
            naive_masks = {"z": z}
            mask = z[None, :W].clone()
            valid = torch.ones(1, W, dtype=torch.bool)
            base = data.corrupted.sum(0)
            base_index = None
            naive_la = {"z": log_alpha(Wt)}
            la = naive_la["z"][None, :W].clone()
        else:
            qkv = [rand(Wt, H) for _ in range(3)]
            mlp = rand(Wt)
            naive_masks = {"q": qkv[0], "k": qkv[1], "v": qkv[2], "mlp": mlp}
            valid = torch.ones(lay.n_readers, W, dtype=torch.bool)
            valid[: 3 * H, lay.attn_writers:] = False  # q/k/v may not read their own layer
            mask = torch.cat([m[:W].t() for m in qkv] + [mlp[None, :W]]).contiguous()
            mask = mask * valid
            base = torch.stack([data.corrupted[: lay.attn_writers].sum(0),
                                data.corrupted[:W].sum(0)])
            base_index = torch.tensor([0] * (3 * H) + [1], dtype=torch.int64)
            naive_la = {k: log_alpha(Wt, H) for k in ("q", "k", "v")}
            naive_la["mlp"] = log_alpha(Wt)
            la = to_rows(naive_la, W)
        kind, frac = case.zero_fraction
        if kind:
            # edges: each mask at 0 with probability frac; nodes: each writer's
            # every mask (writer 0 stays, so something is read). log_alpha -30
            # samples z = 0 (s < 1e-10 even at the noise clamp).
            if kind == "edges":
                zero = {k: rand(*v.shape) < frac for k, v in naive_masks.items()}
            else:
                pruned = rand(Wt) < frac
                pruned[0] = False
                zero = {k: pruned.reshape((Wt,) + (1,) * (v.dim() - 1)).expand(v.shape)
                        for k, v in naive_masks.items()}
            naive_masks = {k: v.masked_fill(zero[k], 0.0) for k, v in naive_masks.items()}
            naive_la = {k: v.masked_fill(zero[k], -30.0) for k, v in naive_la.items()}
            if case.layer is None:
                mask = naive_masks["z"][None, :W].clone()
                la = naive_la["z"][None, :W].clone()
            else:
                mask = torch.cat([naive_masks[k][:W].t() for k in ("q", "k", "v")]
                                 + [naive_masks["mlp"][None, :W]]).contiguous() * valid
                la = to_rows(naive_la, W)
        # fastedge marks a structural zero with log_alpha = -inf (mask exactly 0, gradient 0);
        # the authors' layout keeps finite values there and zeroes them with the common masks.
        la = la.masked_fill(~valid, float("-inf")).contiguous()
        dout = torch.randn((lay.n_readers,) + tuple(data.clean.shape[1:]), dtype=dtype, device=dev,
                           generator=torch.Generator(device=dev).manual_seed(seed + 1))
    to = dict(device=dev)
    return Problem(case, lay, data,
                   {k: v.to(dtype=dtype, **to) for k, v in naive_masks.items()},
                   mask.to(**to), valid.to(**to), base.to(dtype=dtype, **to),
                   None if base_index is None else base_index.to(**to), dout,
                   naive_log_alpha={k: v.to(**to) for k, v in naive_la.items()},
                   log_alpha=la.to(**to), sample_seed=seed)


def to_rows(per_kind: dict, n_writers: int) -> torch.Tensor:
    """Authors' layout (q/k/v ``[W_total, H]``, mlp ``[W_total]``; or final ``z``)
    to fastedge's ``[R, W]`` rows (q heads, k heads, v heads, MLP)."""
    W = n_writers
    if "z" in per_kind:
        return per_kind["z"][None, :W]
    return torch.cat([per_kind[k][:W].t() for k in ("q", "k", "v")]
                     + [per_kind["mlp"][None, :W]])


def from_rows(rows: torch.Tensor, problem: Problem, fill: float) -> dict:
    """fastedge's ``[R, W]`` rows back to the authors' layout (writers past the
    read prefix set to `fill`): the inverse of `to_rows`."""
    lay, W = problem.layout, problem.layout.n_writers
    if problem.case.layer is None:
        z = rows.new_full((lay.total_writers,), fill)
        z[:W] = rows[0]
        return {"z": z}
    H = lay.n_heads
    out = {}
    for i, k in enumerate(("q", "k", "v")):
        t = rows.new_full((lay.total_writers, H), fill)
        t[:W] = rows[i * H:(i + 1) * H].t()
        out[k] = t
    mlp = rows.new_full((lay.total_writers,), fill)
    mlp[:W] = rows[3 * H]
    out["mlp"] = mlp
    return out


# =============================================================================
# Providers
# =============================================================================


class Provider:
    """One implementation of one op (``op``). `setup` builds its inputs
    (requiring grad), `forward` returns its outputs as a tuple; the rest
    converts results to fastedge's layout for the checks."""
    name = "?"
    op = "masked"
    is_baseline = False  # the provider speed-ups are relative to (naive)
    checked = True       # compared with the op's reference before timing

    def check_state(self, state: dict, problem: Problem) -> dict:
        """The state to run the correctness checks with (default: `state`)."""
        return state

    def edge_sum(self, outputs: tuple) -> Optional[torch.Tensor]:
        """The sampled op's sum of edge masks; None for the masked op."""
        return None

    def skip_reasons(self, problem: Problem) -> list[str]:
        return []

    def setup(self, problem: Problem) -> dict:
        raise NotImplementedError

    def forward(self, state: dict) -> tuple:
        raise NotImplementedError

    def grad_inputs(self, state: dict) -> list:
        """Tensors whose gradients the backward computes (what autograd.grad asks for)."""
        raise NotImplementedError

    def grad_outputs(self, state: dict, problem: Problem) -> list:
        raise NotImplementedError

    def rows(self, problem: Problem, outputs: tuple) -> torch.Tensor:
        """The outputs as fastedge's [R, *T]."""
        raise NotImplementedError

    def gradients(self, problem: Problem, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One backward from scratch: (d stack [W, *T] in float32, d mask [R, W]
        (d log_alpha for the sampled op) with structural zeros set to 0)."""
        raise NotImplementedError

    def state_bytes(self, state: dict, mode: str) -> int:
        raise NotImplementedError


def _nbytes(*tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class NaiveProvider(Provider):
    """The authors' formulation (bench/naive.py) with given masks; the
    masked op's reference (not checked: it is what the others are checked against)."""
    name = "naive"
    is_baseline = True
    checked = False

    def setup(self, problem):
        lay = problem.layout
        x = problem.data.clean.detach().requires_grad_(True)
        corr_x = problem.data.corrupted
        masks = {k: v.detach().clone().requires_grad_(True) for k, v in self.params(problem).items()}
        state = {"x": x, "corr_x": corr_x, "masks": masks}
        if problem.case.layer is not None:
            first_head = lay.attn_writers  # the layer's first head is the first writer q/k/v may not read
            state["attn_common"] = naive.attn_common_mask(lay.total_writers, first_head,
                                                          problem.dtype, problem.device)
            state["mlp_common"] = naive.mlp_common_mask(lay.total_writers, lay.n_writers,
                                                        problem.dtype, problem.device)
        return state

    def params(self, problem: Problem) -> dict:
        """The per-kind tensors that require grad (authors' layout)."""
        return problem.naive_masks

    def forward(self, s):
        return self._reads(s, s["masks"])

    @staticmethod
    def _reads(s, m):
        if "z" in m:
            return (naive.final_read(s["x"], s["corr_x"], m["z"]),)
        return naive.layer_reads(s["x"], s["corr_x"], m["q"], m["k"], m["v"], m["mlp"],
                                 s["attn_common"], s["mlp_common"])

    def grad_inputs(self, s):
        m = s["masks"]
        return [s["x"]] + ([m["z"]] if "z" in m else [m["q"], m["k"], m["v"], m["mlp"]])

    def grad_outputs(self, s, problem):
        d, H = problem.dout, problem.layout.n_heads
        if problem.case.layer is None:
            return [d[0]]
        return [d[:H], d[H:2 * H], d[2 * H:3 * H], d[3 * H]]

    def rows(self, problem, outputs):
        if problem.case.layer is None:
            return outputs[0][None]
        x_q, x_k, x_v, x_mlp = outputs
        return torch.cat([x_q, x_k, x_v, x_mlp[None]])

    def gradients(self, problem, state):
        outs = self.forward(state)
        grads = torch.autograd.grad(outs, self.grad_inputs(state), self.grad_outputs(state, problem))
        W = problem.layout.n_writers
        dx = grads[0][:W].float()
        if problem.case.layer is None:
            dmask = to_rows({"z": grads[1]}, W)
        else:
            dmask = to_rows(dict(zip(("q", "k", "v", "mlp"), grads[1:])), W)
        return dx, dmask.float() * problem.valid

    def state_bytes(self, s, mode):
        return _nbytes(s["x"], s["corr_x"], *s["masks"].values(), s.get("attn_common"),
                       s.get("mlp_common"))


def naive_hard_concrete(log_alpha: torch.Tensor, u: Optional[torch.Tensor]) -> torch.Tensor:
    """The authors' training-time mask, in plain PyTorch (autograd gives its
    backward): ``u ~ U(eps, 1 - eps)`` from torch's generator unless given,
    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    ``z = clamp(s (r - l) + l, 0, 1)`` (docs/CONCEPTS.md section 1)."""
    if u is None:
        u = torch.rand(log_alpha.shape, dtype=log_alpha.dtype, device=log_alpha.device)
        u = u * (1 - 2 * C.EPS) + C.EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / C.BETA)
    return (s * (C.LIMIT_RIGHT - C.LIMIT_LEFT) + C.LIMIT_LEFT).clamp(0.0, 1.0)


class NaiveSampledProvider(NaiveProvider):
    """The authors' formulation of the sampled op: hard-concrete masks sampled
    in plain PyTorch from per-kind log_alphas (authors' layout) with
    ``torch.rand`` noise, the sum of the edge masks the reads use (what the
    sparsity term needs), then the same einsums as `NaiveProvider`; the
    backward reaches log_alpha and the clean writer tensor.

    It draws other random numbers than fastedge's Philox sampler, so for the
    checks (`check_state`) it is fed fastedge's own noise for the same seed
    (`fastedge.ops.edge_noise`) and compared with the reference."""
    op = "sampled"
    checked = True

    def params(self, problem):
        return problem.naive_log_alpha

    def check_state(self, state, problem):
        R, W = problem.layout.n_readers, problem.layout.n_writers
        u = fastedge.ops.edge_noise(problem.sample_seed, R, W, 0, problem.device)
        return dict(state, u=from_rows(u, problem, 0.5))

    def forward(self, s):
        noise = s.get("u") or {}
        z = {k: naive_hard_concrete(la, noise.get(k)) for k, la in s["masks"].items()}  # float32
        if "z" in z:
            edge_sum = z["z"].sum()
        else:
            edge_sum = (sum((z[k] * s["attn_common"].float()).sum() for k in ("q", "k", "v"))
                        + (z["mlp"] * s["mlp_common"].float()).sum())
        # the reads in the storage dtype, as the masked naive provider's given masks
        reads = self._reads(s, {k: v.to(s["x"].dtype) for k, v in z.items()})
        return (*reads, edge_sum)

    def grad_outputs(self, s, problem):
        return super().grad_outputs(s, problem) + [_unit(problem)]

    def rows(self, problem, outputs):
        return super().rows(problem, outputs[:-1])

    def edge_sum(self, outputs):
        return outputs[-1]


def _unit(problem: Problem) -> torch.Tensor:
    """d loss / d edge_sum: 1, as for a sparsity term that adds the edge sum."""
    return torch.ones((), dtype=torch.float32, device=problem.device)


class FastedgeProvider(Provider):
    """fastedge.masked_writer_sum on one backend, stack gradient into a caller-owned buffer."""

    def __init__(self, backend: str):
        self.name = backend
        self.backend = backend

    def skip_reasons(self, problem):
        if self.backend == "triton" and problem.device.type == "cpu":
            return ["triton is timed on a GPU only: on the CPU it would run under the Triton "
                    "interpreter, far too slow at these shapes"]
        lay = problem.layout
        call = Call(op="masked_sum", device=problem.device, dtype=problem.dtype,
                    n_readers=lay.n_readers, n_writers=lay.n_writers,
                    n_elements=problem.data.clean[0].numel(), grad_dtype=torch.float32)
        return explain(call)[self.backend]

    def setup(self, problem):
        stack = problem.data.delta.detach().requires_grad_(True)
        return {"stack": stack, "mask": problem.mask.detach().clone().requires_grad_(True),
                "base": problem.base, "base_index": problem.base_index,
                "grad_stack": torch.zeros(stack.shape, dtype=torch.float32, device=stack.device)}

    def forward(self, s):
        return (fastedge.masked_writer_sum(s["stack"], s["mask"], s["base"], s["base_index"],
                                           grad_stack=s["grad_stack"], backend=self.backend),)

    def grad_inputs(self, s):
        # The stack's gradient goes into s["grad_stack"]; autograd returns only d mask.
        return [s["mask"]]

    def grad_outputs(self, s, problem):
        return [problem.dout]

    def rows(self, problem, outputs):
        return outputs[0]

    def gradients(self, problem, state):
        state["grad_stack"].zero_()
        (dmask,) = torch.autograd.grad(self.forward(state), self.grad_inputs(state),
                                       self.grad_outputs(state, problem))
        W = problem.layout.n_writers
        dstack = state["grad_stack"][:W].clone()
        if not state["stack"].requires_grad or dstack.abs().max() == 0:
            raise AssertionError("the backward left grad_stack untouched")
        return dstack, dmask.float() * problem.valid

    def state_bytes(self, s, mode):
        grad = s["grad_stack"] if "bwd" in mode else None
        return _nbytes(s["stack"], s["mask"], s["base"], s["base_index"], grad)


class FastedgeSampledProvider(FastedgeProvider):
    """fastedge.sampled_masked_writer_sum on one backend: the masks sampled
    from log_alpha and the seed inside the op (no node masks), ``(out,
    edge_sum)`` returned; d log_alpha from autograd, the stack gradient into
    the caller-owned buffer."""
    op = "sampled"

    def skip_reasons(self, problem):
        reasons = super().skip_reasons(problem)
        if reasons:
            return reasons
        lay = problem.layout
        call = Call(op="sample_masks", device=problem.device, dtype=torch.float32,
                    n_readers=lay.n_readers, n_writers=lay.n_writers)
        return explain(call)[self.backend]

    def setup(self, problem):
        stack = problem.data.delta.detach().requires_grad_(True)
        return {"stack": stack,
                "log_alpha": problem.log_alpha.detach().clone().requires_grad_(True),
                "base": problem.base, "base_index": problem.base_index, "seed": problem.sample_seed,
                "grad_stack": torch.zeros(stack.shape, dtype=torch.float32, device=stack.device)}

    def forward(self, s):
        return fastedge.sampled_masked_writer_sum(
            s["stack"], s["log_alpha"], None, s["base"], s["base_index"], seed=s["seed"],
            grad_stack=s["grad_stack"], backend=self.backend)

    def grad_inputs(self, s):
        return [s["log_alpha"]]

    def grad_outputs(self, s, problem):
        return [problem.dout, _unit(problem)]

    def edge_sum(self, outputs):
        return outputs[1]

    def state_bytes(self, s, mode):
        grad = s["grad_stack"] if "bwd" in mode else None
        return _nbytes(s["stack"], s["log_alpha"], s["base"], s["base_index"], grad)


PROVIDERS: dict[str, Provider] = {  # the masked op
    "naive": NaiveProvider(),
    "torch": FastedgeProvider("torch"),
    "triton": FastedgeProvider("triton"),
    "cuda": FastedgeProvider("cuda"),
    "reference": FastedgeProvider("reference"),  # per-reader einsums: slow, not in the default run
}
SAMPLED_PROVIDERS: dict[str, Provider] = {
    "naive": NaiveSampledProvider(),
    **{name: FastedgeSampledProvider(name) for name in ("torch", "triton", "cuda", "reference")},
}
DEFAULT_PROVIDERS = ["naive", "torch", "triton", "cuda"]


# =============================================================================
# Ops: what each is checked against
# =============================================================================


@dataclass
class Expected:
    """An op's reference results for one case."""
    rows: torch.Tensor                  # [R, *T] at the timed shape
    edge_sum: Optional[torch.Tensor]    # the sampled op's edge sum
    grads: Optional[tuple]              # (d stack [W, *T] fp32, d mask or d log_alpha [R, W]) on `small`
    small: Optional[Problem]            # the CHECK_BATCH slice the gradients are checked on
    grad_skip: Optional[torch.Tensor]   # [R, W] bool: d mask entries not compared (clamp edges)


def _expected_masked(problem: Problem, need_grads: bool) -> Expected:
    """The naive provider's outputs (full shape) and gradients (slice)."""
    p = PROVIDERS["naive"]
    with torch.no_grad():
        rows = p.rows(problem, p.forward(p.setup(problem)))
    small = grads = None
    if need_grads:
        small = problem.sliced(CHECK_BATCH)
        grads = p.gradients(small, p.setup(small))
    return Expected(rows, None, grads, small, None)


def _expected_sampled(problem: Problem, need_grads: bool) -> Expected:
    """fastedge's own reference path for the same seed: the masks from
    `fastedge.sample_masks(..., backend="reference")` summed at the timed shape
    with `masked_writer_sum(..., backend="torch")` (one matrix product; the
    per-reader reference einsums would widen the whole stack to fp32), and the
    whole fused op on the reference backend for the gradients (slice)."""
    la = problem.log_alpha
    with torch.no_grad():
        mask, edge_sum = fastedge.ops.sample_masks(la, seed=problem.sample_seed, backend="reference")
        rows = fastedge.masked_writer_sum(problem.data.delta, mask, problem.base,
                                          problem.base_index, backend="torch")
        R, W = la.shape
        u = fastedge.ops.edge_noise(problem.sample_seed, R, W, 0, problem.device)
        _, stretched = kref.hard_concrete_stretched(la, u)
        skip = (stretched.abs() < CLAMP_EDGE) | ((stretched - 1).abs() < CLAMP_EDGE)
    small = grads = None
    if need_grads:
        small = problem.sliced(CHECK_BATCH)
        ref = SAMPLED_PROVIDERS["reference"]
        grads = ref.gradients(small, ref.setup(small))
    return Expected(rows, edge_sum, grads, small, skip)


@dataclass(frozen=True)
class Op:
    """One operation: its providers and how its reference results are made."""
    name: str
    providers: dict
    expected: Callable[[Problem, bool], Expected]
    reference: str   # what the checks compare with, in words


OPS = {
    "masked": Op("masked", PROVIDERS, _expected_masked, "naive"),
    "sampled": Op("sampled", SAMPLED_PROVIDERS, _expected_sampled,
                  "fastedge reference (same seed)"),
}


# =============================================================================
# Modes: each turns (provider, state, problem) into the callable that is timed
# =============================================================================


def _mode_fwd(p: Provider, s: dict, problem: Problem) -> Callable[[], object]:
    return lambda: p.forward(s)


def _mode_bwd(p: Provider, s: dict, problem: Problem) -> Callable[[], object]:
    outputs = p.forward(s)  # recorded once, outside the timed region
    inputs, grads = p.grad_inputs(s), p.grad_outputs(s, problem)
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def _mode_fwd_bwd(p: Provider, s: dict, problem: Problem) -> Callable[[], object]:
    inputs, grads = p.grad_inputs(s), p.grad_outputs(s, problem)
    return lambda: torch.autograd.grad(p.forward(s), inputs, grads)


MODES = {"fwd": _mode_fwd, "bwd": _mode_bwd, "fwd+bwd": _mode_fwd_bwd}


# =============================================================================
# Timing: one function, two devices
# =============================================================================


@dataclass
class Settings:
    reps: int          # CPU: samples wanted per cell
    min_time: float    # CPU: seconds of samples at least (when more samples are cheap)
    max_time: float    # CPU: stop before the samples would take longer than this
    warmup_ms: int     # GPU: do_bench warm-up
    rep_ms: int        # GPU: do_bench repetition time
    min_samples: int = MIN_GPU_SAMPLES  # GPU: samples per cell at least (`_cuda_samples`)


@dataclass
class Timing:
    samples_ms: list
    method: str
    peak_extra_bytes: Optional[int]
    mem_method: str

    def quantile(self, q: float) -> float:
        return torch.quantile(torch.tensor(self.samples_ms, dtype=torch.float64), q).item()


class _EnoughSamples(Exception):
    pass


class _RssPeak:
    """Peak resident-set growth of this process (Linux: VmHWM, reset through
    /proc/self/clear_refs). `extra()` is None where that is not possible."""

    def __init__(self):
        self.ok = self._reset()
        self.before = self._status("VmRSS") if self.ok else None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def extra(self) -> Optional[int]:
        return max(0, self._status("VmHWM") - self.before) if self.ok else None


def measure(fn: Callable[[], object], device: torch.device, st: Settings, label: str) -> Timing:
    """Time `fn` (samples in ms) and its peak memory above what was allocated before."""
    if device.type == "cuda":
        return _measure_cuda(fn, st)
    return _measure_cpu(fn, st, label)


def _measure_cpu(fn, st: Settings, label: str) -> Timing:
    from torch.utils import benchmark
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label,
                            num_threads=torch.get_num_threads())
    samples, spent = [], [0.0]

    def after_block(number: int, seconds: float):
        samples.append(seconds / number * 1e3)
        spent[0] += seconds
        enough = len(samples) >= st.reps and spent[0] >= st.min_time
        if enough or spent[0] + seconds > st.max_time:
            raise _EnoughSamples  # stops blocked_autorange; the samples are kept here

    rss = _RssPeak()
    try:
        # The block-size estimate is blocked_autorange's warm-up (one call for slow ops).
        timer.blocked_autorange(callback=after_block, min_run_time=st.max_time)
    except _EnoughSamples:
        pass
    extra = rss.extra()
    return Timing(samples, "cpu torch.utils.benchmark", extra,
                  "rss-hwm" if extra is not None else "n/a")


def _cuda_samples(fn, st: Settings) -> tuple[list, str]:
    """Per-call times in ms of `fn` on the GPU, and how they were taken: at
    least `st.min_samples` of them. do_bench repeats a call for `rep_ms` after
    estimating it, so it returns a single sample for a call slower than
    `rep_ms`; such a cell gets the missing samples from timed calls of the
    same kind right after (`_timed_calls`: CUDA events, L2 flushed), the call
    being warm by then."""
    try:
        from triton.testing import do_bench
        samples = list(do_bench(fn, warmup=st.warmup_ms, rep=st.rep_ms, return_mode="all"))
        method = "cuda triton.testing.do_bench"
    except (ImportError, AssertionError, TypeError):  # no Triton, or one without return_mode="all"
        return _cuda_events(fn, st), "cuda events"
    missing = st.min_samples - len(samples)
    if missing > 0:
        samples += _timed_calls(fn, missing)
        method += f" + cuda events (to {st.min_samples} samples)"
    return samples, method


def _measure_cuda(fn, st: Settings) -> Timing:
    samples, method = _cuda_samples(fn, st)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    return Timing(samples, method, extra, "cuda.max_memory_allocated")


def _cuda_events(fn, st: Settings) -> list:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(st.warmup_ms / est_ms))):
        fn()
    return _timed_calls(fn, max(st.reps, st.min_samples, int(st.rep_ms / est_ms)))


def _timed_calls(fn, n: int) -> list:
    """`n` calls of a warm `fn`, each timed with CUDA events after flushing L2."""
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    events = []
    for _ in range(n):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


@dataclass
class CopyBandwidth:
    """The device's copy bandwidth, measured once per run."""
    gb_s: Optional[float]   # (bytes read + bytes written) / median time, 10^9 bytes per second
    method: str             # how, or why it was not measured


def measure_copy_bandwidth(device: torch.device, mib: int, st: Settings) -> CopyBandwidth:
    """Time ``dst.copy_(src)`` of two `mib` MiB uint8 buffers and count 2 x `mib`
    MiB per copy (read plus written), like docs/CONCEPTS.md section 5's copy figure. GPU:
    device-to-device, timed like a cell (`_cuda_samples`; one copy is far
    larger than L2). CPU: a memcpy through ``Tensor.copy_`` on the torch
    threads, timed with torch.utils.benchmark. The buffers are freed (and the
    CUDA cache emptied) before returning, so the cases start from nothing."""
    if mib <= 0:
        return CopyBandwidth(None, "not measured (--copy-mib 0)")
    nbytes = mib * 2 ** 20
    note = ""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fit = (free // 3) // 2 ** 20 * 2 ** 20  # two buffers and do_bench's L2 flush, with room
        if fit < nbytes:
            nbytes, note = fit, f" (shrunk from {mib} MiB to fit free memory)"
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)]
    bufs.append(torch.empty_like(bufs[0]))

    def fn():
        bufs[1].copy_(bufs[0])

    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            samples, how = _cuda_samples(fn, st)
            torch.cuda.synchronize(device)
        else:
            copy_st = dataclasses.replace(st, reps=max(st.reps, 5), min_time=min(st.min_time, 0.5),
                                          max_time=min(st.max_time, 3.0))
            samples = _measure_cpu(fn, copy_st, "copy").samples_ms
            how = f"torch.utils.benchmark, {torch.get_num_threads()} threads"
    finally:
        bufs.clear()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    ms = torch.quantile(torch.tensor(samples, dtype=torch.float64), 0.5).item()
    where = "cuda device-to-device copy_" if device.type == "cuda" else "CPU memcpy (Tensor.copy_)"
    method = (f"{where} of {nbytes / 2 ** 20:.0f} MiB{note}, read+written "
              f"counted, median of {len(samples)} ({how})")
    return CopyBandwidth(2 * nbytes / (ms * 1e-3) / 1e9, method)


# =============================================================================
# Checks
# =============================================================================


def _max_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    err = (got.float() - want.float()).abs().max().item()
    scale = max(1.0, want.float().abs().max().item())
    return err, scale


def check_forward(p: Provider, state: dict, problem: Problem, want: Expected,
                  ref: str = "naive") -> tuple[Optional[str], Optional[float]]:
    """(None, max |err|) when `p`'s forward agrees with the reference output
    (and edge sum), else (why not, err)."""
    with torch.no_grad():
        outputs = p.forward(p.check_state(state, problem))
        got = p.rows(problem, outputs)
    if got.shape != want.rows.shape:
        return f"forward shape {tuple(got.shape)} != {ref} {tuple(want.rows.shape)}", None
    if not torch.isfinite(got).all():
        return "forward has non-finite values", None
    err, scale = _max_err(got, want.rows)
    if not err <= TOL[problem.dtype] * scale:
        return f"forward differs from {ref}: max |err| {err:.3g} (scale {scale:.3g})", err
    if want.edge_sum is not None:
        got_sum = p.edge_sum(outputs)
        sum_err, sum_scale = _max_err(got_sum, want.edge_sum)
        if not sum_err <= TOL[torch.float32] * sum_scale:
            return (f"edge_sum differs from {ref}: {got_sum.item():.6g} vs "
                    f"{want.edge_sum.item():.6g}"), err
    return None, err


def check_gradients(p: Provider, want: Expected, ref: str = "naive") -> Optional[str]:
    """None when `p`'s stack and mask (or log_alpha) gradients agree with the
    reference ones on the slice `want.small`."""
    small = want.small
    got = p.gradients(small, p.check_state(p.setup(small), small))
    names = ("stack", "mask" if want.edge_sum is None else "log_alpha")
    for i, (what, g, w) in enumerate(zip(names, got, want.grads)):
        if g.shape != w.shape:
            return f"d{what} shape {tuple(g.shape)} != {ref} {tuple(w.shape)}"
        if i == 1 and want.grad_skip is not None:
            g, w = g.masked_fill(want.grad_skip, 0), w.masked_fill(want.grad_skip, 0)
        if not torch.isfinite(g).all():
            return f"d{what} has non-finite values"
        err, scale = _max_err(g, w)
        if not err <= TOL[small.dtype] * GRAD_TOL_FACTOR * scale:
            return (f"d{what} differs from {ref} (batch {CHECK_BATCH}): max |err| {err:.3g} "
                    f"(scale {scale:.3g})")
    return None


# =============================================================================
# One run
# =============================================================================


@dataclass
class Cell:
    """One (case, mode, provider) result."""
    case: Case
    layout: Layout
    mode: str
    provider: str
    status: str                   # ok | skipped | wrong | error (timing raised)
    timing: Optional[Timing] = None
    state_bytes: Optional[int] = None
    note: str = ""
    max_err: Optional[float] = None
    load1: float = 0.0
    speedup: Optional[float] = None
    op: str = "masked"
    bytes_moved: Optional[int] = None   # `bytes_moved(op, mode, problem)`
    copy_gb_s: Optional[float] = None   # the run's copy bandwidth (`measure_copy_bandwidth`)

    @property
    def gb_s(self) -> Optional[float]:
        """Effective bandwidth: bytes_moved / p50, in GB/s (10^9 bytes per second)."""
        if self.timing is None or not self.bytes_moved:
            return None
        return self.bytes_moved / (self.timing.quantile(0.5) * 1e-3) / 1e9

    @property
    def frac_copy_bw(self) -> Optional[float]:
        gb_s = self.gb_s
        return None if gb_s is None or not self.copy_gb_s else gb_s / self.copy_gb_s


def bytes_moved(op: str, mode: str, problem: Problem) -> int:
    """The fewest bytes one call must move through memory (docs/CONCEPTS.md section 5);
    the formula is in the module docstring ("Bytes moved")."""
    lay = problem.layout
    R, W = lay.n_readers, lay.n_writers
    N = math.prod(problem.trailing)
    e = problem.data.delta.element_size()     # storage dtype: stack, base, out, dout
    G = 0 if problem.base is None else (1 if problem.base_index is None else problem.base.shape[0])
    f32 = 4                                    # mask / log_alpha, their gradients, the grad buffer
    sampled = op == "sampled"
    fwd = W * N * e + G * N * e + R * W * f32 + R * N * e + (f32 if sampled else 0)
    bwd = R * N * e + W * N * e + 2 * W * N * f32 + 2 * R * W * f32 + (f32 if sampled else 0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run_case(case: Case, model: Model, data: WriterData, providers: list, modes: list,
             st: Settings, seed: int, log: Callable[[str], None], op: str = "masked",
             problem: Optional[Problem] = None) -> list:
    """Check, then time, every provider of `op` on one case; one `Cell` per
    (mode, provider). `problem` (from `build_problem`) may be shared between ops."""
    the_op = OPS[op]
    if problem is None:
        problem = build_problem(case, model, data, seed)
    lay = problem.layout
    log(f"[{case.name} {op}] R={lay.n_readers} W={lay.n_writers}/{lay.total_writers} "
        f"T={'x'.join(map(str, problem.trailing))} {str(problem.dtype).replace('torch.', '')}")
    need_grads = any("bwd" in m for m in modes)
    t0 = time.perf_counter()
    want = the_op.expected(problem, need_grads)
    log(f"  reference results ({the_op.reference}): {time.perf_counter() - t0:.2f} s")

    cells = []
    for name in providers:
        p = the_op.providers[name]
        reasons = p.skip_reasons(problem)
        if reasons:
            note = "; ".join(reasons)
            log(f"  {name}: skipped ({note})")
            cells += [Cell(case, lay, m, name, "skipped", note=note, op=op) for m in modes]
            continue
        state = p.setup(problem)
        fwd_wrong, err, grad_wrong = None, None, None
        if p.checked:
            try:
                fwd_wrong, err = check_forward(p, state, problem, want, the_op.reference)
            except Exception as exc:  # a provider that fails is reported, not fatal
                fwd_wrong = f"forward raised {type(exc).__name__}: {exc}"
            if need_grads and fwd_wrong is None:
                try:
                    grad_wrong = check_gradients(p, want, the_op.reference)
                except Exception as exc:
                    grad_wrong = f"backward raised {type(exc).__name__}: {exc}"
            if fwd_wrong is None:
                log(f"  {name}: forward agrees with {the_op.reference} (max |err| {err:.3g})"
                    + ("" if not need_grads else
                       "; gradients agree" if grad_wrong is None else "; gradients DO NOT agree"))
        for mode in modes:
            wrong = fwd_wrong or (grad_wrong if "bwd" in mode else None)
            if wrong:
                log(f"  {name} {mode}: WRONG, not timed: {wrong}")
                cells.append(Cell(case, lay, mode, name, "wrong", note=wrong, max_err=err, op=op))
                continue
            try:
                fn = MODES[mode](p, state, problem)
                timing = measure(fn, problem.device, st, f"{case.name} {op} {mode} {name}")
            except Exception as exc:  # noqa: BLE001  one cell that fails must not lose the table
                note = f"timing raised {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log(f"  {name} {mode}: ERROR, {note}")
                cells.append(Cell(case, lay, mode, name, "error", note=note, max_err=err, op=op))
                fn = None
                if problem.device.type == "cuda":
                    torch.cuda.synchronize(problem.device)
                    torch.cuda.empty_cache()
                continue
            del fn
            cell = Cell(case, lay, mode, name, "ok", timing, p.state_bytes(state, mode),
                        max_err=err, load1=os.getloadavg()[0], op=op,
                        bytes_moved=bytes_moved(op, mode, problem))
            log(f"  {name:>9} {mode:<7} p50 {timing.quantile(0.5):10.2f} ms  "
                f"{_sig(cell.gb_s):>8} GB/s  ({len(timing.samples_ms)} samples)")
            cells.append(cell)
        del state
    naive_p50 = {c.mode: c.timing.quantile(0.5) for c in cells
                 if c.provider == "naive" and c.status == "ok"}
    for cell in cells:
        if cell.status == "ok" and cell.mode in naive_p50:
            cell.speedup = naive_p50[cell.mode] / cell.timing.quantile(0.5)
    return cells


# =============================================================================
# Environment, rows, output
# =============================================================================


device_name = results_csv.device_name


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = device_name(device).split(" (")[0] + f" {os.cpu_count()}c"
        text = "cpu " + text
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


git_revision = results_csv.git_revision


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:
        return "n/a"


def _mb(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 2 ** 20:.1f}"


def _ms(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.6g}"


def _ms_short(text: str) -> str:
    """A CSV time, rounded for people: 3 significant digits, no exponent."""
    if not text:
        return ""
    x = float(text)
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _sig(x: Optional[float], digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


# Extra columns: name -> function(cell) -> value.
METRICS: dict[str, Callable[[Cell], object]] = {
    "state_mb": lambda c: _mb(c.state_bytes) if c.timing else "",
    "peak_extra_mb": lambda c: (_mb(c.timing.peak_extra_bytes) or "n/a") if c.timing else "",
    "mem_method": lambda c: c.timing.mem_method if c.timing else "",
    # vs naive for the masked op; vs fastedge's reference path for the sampled op
    "max_abs_err_vs_naive": lambda c: "" if c.max_err is None else f"{c.max_err:.3g}",
    "bytes_moved": lambda c: c.bytes_moved if c.timing and c.bytes_moved else "",
    "bw_gb_s": lambda c: _sig(c.gb_s),
    "frac_copy_bw": lambda c: _sig(c.frac_copy_bw, 3),
}

# Columns of ops.csv. The run's copy bandwidth (copy_bw_gb_s, copy_bw_method)
# is the same on every row of a run, like the device and versions.
COLUMNS = ["date", "device", "timing", "torch", "triton", "fastedge", "git_rev", "threads",
           "load1", "case", "op", "model", "readers", "writers", "total_writers", "shape", "dtype",
           "mode", "provider", "status", "samples", "p20_ms", "p50_ms", "p80_ms",
           "speedup_vs_naive", *METRICS, "copy_bw_gb_s", "copy_bw_method", "note"]


def make_row(cell: Cell, env: dict, model: Model, trailing: tuple, dtype: str) -> dict:
    t = cell.timing
    lay = cell.layout
    row = dict(env)
    row.update({
        "load1": f"{cell.load1:.2f}" if t else "",
        "case": cell.case.name, "op": cell.op, "model": model.name, "readers": lay.n_readers,
        "writers": lay.n_writers, "total_writers": lay.total_writers,
        "shape": f"R{lay.n_readers} W{lay.n_writers}/{lay.total_writers} T{'x'.join(map(str, trailing))}",
        "dtype": dtype, "mode": cell.mode, "provider": cell.provider, "status": cell.status,
        "samples": len(t.samples_ms) if t else "",
        "p20_ms": _ms(t.quantile(0.2)) if t else "", "p50_ms": _ms(t.quantile(0.5)) if t else "",
        "p80_ms": _ms(t.quantile(0.8)) if t else "",
        "speedup_vs_naive": "" if cell.speedup is None else f"{cell.speedup:.3g}",
        "note": cell.note,
    })
    row["timing"] = t.method if t else env["timing"]
    for name, fn in METRICS.items():
        row[name] = fn(cell)
    return row


def append_csv(path: Path, rows: list) -> None:
    """Append rows (`bench/results_csv.py`: a file from before columns were
    added, e.g. ``op``, ``bytes_moved``, ``bw_gb_s``, is rewritten with the
    union of both headers; an empty ``op`` is a row from before the sampled
    op, i.e. the masked op)."""
    results_csv.append_csv(path, rows, COLUMNS)


def _gb_s_short(text: str) -> str:
    if not text:
        return ""
    x = float(text)
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _pct(text: str) -> str:
    if not text:
        return ""
    x = 100 * float(text)
    return f"{x:.0f}%" if x >= 10 else f"{x:.2g}%"


def markdown(rows: list, header_lines: list) -> str:
    out = list(header_lines) + [""]
    out.append("| case | op | shape | mode | provider | p20 ms | p50 ms | p80 ms | n "
               "| speed-up vs naive | GB/s | % of copy bw | state MB | peak extra MB |")
    out.append("|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["op"], r["provider"]), r["note"])
            continue
        if r["status"] in ("wrong", "error"):
            out.append(f"| {r['case']} | {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | "
                       f"{r['status'].upper()}: {r['note']} | | | | | | | | |")
            continue
        speed = f"{float(r['speedup_vs_naive']):.2f}x" if r["speedup_vs_naive"] else ""
        p20, p50, p80 = (_ms_short(r[k]) for k in ("p20_ms", "p50_ms", "p80_ms"))
        out.append(f"| {r['case']} | {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | "
                   f"{p20} | {p50} | {p80} | {r['samples']} | {speed} | "
                   f"{_gb_s_short(r['bw_gb_s'])} | {_pct(r['frac_copy_bw'])} | {r['state_mb']} | "
                   f"{r['peak_extra_mb']} |")
    if skipped:
        out.append("")
        out.append("Skipped providers:")
        notes = {}
        for (op, name), note in skipped.items():
            notes.setdefault((name, note), []).append(op)
        for (name, note), op_list in notes.items():
            out.append(f"- `{name}` ({', '.join(op_list)}): {note}")
    return "\n".join(out) + "\n"


# =============================================================================
# Command line
# =============================================================================


def _csv_list(text: str, known, what: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, help="sequences per batch (default: the model's, 32 for GPT-2)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default: the model's, 64)")
    ap.add_argument("--hidden", type=int, help="hidden size (default: the model's, 768)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="storage dtype (default: the model's)")
    ap.add_argument("--cases", default="default",
                    help=f"comma list of {', '.join(CASE_BY_NAME)}, or all, or default "
                         "(all on a GPU, the GPT-2 cases on the CPU)")
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                    help=f"comma list of {', '.join(PROVIDERS)} (naive always runs: it is the baseline)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--ops", default=",".join(OPS),
                    help=f"comma list of {', '.join(OPS)}: the masked writer sum with given masks, "
                         "and its fused form that samples the masks from log_alpha")
    ap.add_argument("--copy-mib", type=int,
                    help="size of each buffer of the copy-bandwidth measurement (default 2048 on "
                         "a GPU, 256 on the CPU, 64 with --quick on the CPU; 0: do not measure)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few samples: a smoke test")
    ap.add_argument("--out", help="results folder (default: $OUT if set, else bench/results)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--reps", type=int, help="CPU: samples per cell (default 3)")
    ap.add_argument("--min-time", type=float, help="CPU: seconds of samples at least per cell (default 1)")
    ap.add_argument("--max-time", type=float,
                    help="CPU: stop sampling a cell before it exceeds this many seconds (default 20)")
    ap.add_argument("--rep-ms", type=int,
                    help="GPU: milliseconds of repeats per cell for do_bench (default 200; 20 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.cases == "default":
        cases = GPU_DEFAULT_CASES if device.type == "cuda" else CPU_DEFAULT_CASES
    elif args.cases == "all":
        cases = list(CASE_BY_NAME)
    else:
        cases = _csv_list(args.cases, CASE_BY_NAME, "case")
    providers = _csv_list(args.providers, PROVIDERS, "provider")
    providers = ["naive"] + [p for p in providers if p != "naive"]
    modes = _csv_list(args.modes, MODES, "mode")
    ops = _csv_list(args.ops, OPS, "op")

    quick = args.quick
    st = Settings(reps=args.reps or (5 if quick else 3),
                  min_time=args.min_time if args.min_time is not None else (0.02 if quick else 1.0),
                  max_time=args.max_time if args.max_time is not None else (0.2 if quick else 20.0),
                  warmup_ms=5 if quick else 25,
                  rep_ms=args.rep_ms or (20 if quick else 200))
    out_dir = Path(args.out or os.environ.get("OUT") or BENCH_DIR / "results")

    def log(msg):
        print(msg, flush=True)

    # Before any case allocates: the copy buffers are gone when the cases run.
    copy_mib = args.copy_mib if args.copy_mib is not None else (
        2048 if device.type == "cuda" else 64 if quick else 256)
    copy_bw = measure_copy_bandwidth(device, copy_mib, st)
    log(f"copy bandwidth: {_sig(copy_bw.gb_s)} GB/s ({copy_bw.method})")

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "timing": "cuda triton.testing.do_bench" if device.type == "cuda" else "cpu torch.utils.benchmark",
        "torch": torch.__version__, "triton": triton_version(), "fastedge": fastedge.__version__,
        "git_rev": git_revision(), "threads": torch.get_num_threads(),
        "copy_bw_gb_s": _sig(copy_bw.gb_s), "copy_bw_method": copy_bw.method,
    }

    by_model: dict = {}
    for name in cases:
        by_model.setdefault(CASE_BY_NAME[name].model, []).append(CASE_BY_NAME[name])
    rows, shapes = [], []
    for model_name, model_cases in by_model.items():
        model = MODELS[model_name]
        model = dataclasses.replace(
            model,
            batch=args.batch or (2 if quick else model.batch),
            seq=args.seq or (8 if quick else model.seq),
            hidden=args.hidden or (64 if quick else model.hidden),
            dtype=args.dtype or model.dtype)
        trailing = (model.batch, model.seq, model.hidden)
        dtype = DTYPES[model.dtype]
        n_total = model.graph().n_writers
        t0 = time.perf_counter()
        data = WriterData.random(n_total, trailing, dtype, device, args.seed)
        log(f"{model.name}: writers {n_total} x T={'x'.join(map(str, trailing))} {model.dtype} "
            f"({2 * data.clean.nbytes / 2 ** 30:.2f} GiB clean+corrupted, "
            f"{data.delta.nbytes / 2 ** 30:.2f} GiB stack) in {time.perf_counter() - t0:.1f} s")
        shapes.append(f"{model.name}: T = {trailing}, {model.dtype}")
        for i, case in enumerate(model_cases):
            problem = build_problem(case, model, data, args.seed + 1 + i)
            for op in ops:
                cells = run_case(case, model, data, providers, modes, st, args.seed + 1 + i, log,
                                 op=op, problem=problem)
                for c in cells:
                    c.copy_gb_s = copy_bw.gb_s
                rows += [make_row(c, env, model, trailing, model.dtype) for c in cells]
            del problem
        del data

    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    append_csv(out_dir / "ops.csv", rows)
    kind = "GPU" if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        timing_note = (f"GPU timings: triton.testing.do_bench (warm-up {st.warmup_ms} ms, "
                       f"repeat {st.rep_ms} ms, L2 flushed between calls; a cell with fewer than "
                       f"{st.min_samples} samples is topped up with CUDA-event timed calls to {st.min_samples})")
    else:
        timing_note = (f"CPU timings: torch.utils.benchmark.Timer, {torch.get_num_threads()} threads; "
                       f"after one warm-up call, up to {st.reps} samples per cell, at least "
                       f"{st.min_time:g} s of samples when cheap, no sample started past "
                       f"{st.max_time:g} s (so the slowest cells have fewer samples: column n)")
    header = [
        f"# fastedge masked writer sum ({', '.join(ops)}): {kind} microbenchmark",
        "",
        f"- date {env['date']}; device {env['device']}; torch {env['torch']}; triton {env['triton']}; "
        f"fastedge {env['fastedge']} @ {env['git_rev']}",
        f"- shapes: {'; '.join(shapes)}{' (--quick)' if quick else ''}",
        f"- {timing_note}",
        f"- load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
        f"total run time {elapsed:.0f} s",
        "- naive: the authors' formulation (bench/naive.py): clean and corrupted [writers, *T] "
        "tensors, one einsum over each per kind of reader, over all writers; fastedge: one "
        "masked_writer_sum per case over the read prefix, stack gradient accumulated into a "
        "caller-owned fp32 buffer",
        "- op masked: masks given; op sampled: hard-concrete masks sampled from log_alpha "
        "[R, W] on every call (naive: torch.rand noise and the formula in plain PyTorch, then the "
        "same einsums, plus the sum of the edge masks; fastedge: sampled_masked_writer_sum, "
        "Philox noise from a seed inside the op, no node masks), backward into log_alpha",
        "- fwd is a training forward (autograd recording); bwd is the backward of one recorded "
        "forward (stack and mask or log_alpha gradients); speed-up = naive p50 / provider p50 "
        "of the same op from this run",
        "- GB/s: effective bandwidth, the fewest bytes the op must move (the same count for "
        "every provider; fwd: read W*N stack + G*N base + the [R, W] fp32 mask, write R*N out; "
        "bwd: read R*N dout + W*N stack, read and write the W*N fp32 gradient buffer, read the "
        "mask and write its gradient; N = batch*seq*hidden, stack/base/out/dout in the case's "
        "dtype) / p50, in 10^9 bytes/s",
        "- sparse cases (name -edgesP: P% of the edges at 0 at random; -nodesP: P% of the writers "
        "pruned, every mask of theirs at 0): the same byte count as dense, so where a provider "
        "skips the pruned writers its GB/s can exceed the copy bandwidth; compare times",
        f"- copy bandwidth of this device, measured at the start of this run: "
        f"{_sig(copy_bw.gb_s)} GB/s ({copy_bw.method}); % of copy bw = GB/s / that"
        + ("" if copy_bw.gb_s else " (empty: not measured)"),
        "- state MB: tensors the provider keeps (inputs; fastedge's gradient buffer in backward "
        "modes); peak extra MB: measured peak above what was allocated before a call "
        "(GPU: torch.cuda.max_memory_allocated; CPU: growth of peak RSS, VmHWM, over the cell)",
        f"- before timing, every provider's forward matched the op's reference at the timed shape "
        f"(fp32 tolerance {TOL[torch.float32]:g} x scale) and its gradients at batch {CHECK_BATCH}, "
        "unless marked WRONG; masked: the naive output; sampled: fastedge's reference path for the "
        "same seed (reference-backend masks and edge sum, the fused op on the reference backend "
        "for the gradients); naive sampled is checked too, fed fastedge's noise for that seed",
    ]
    loads = [float(r["load1"]) for r in rows if r["load1"]] + [load_start[0], load_end[0]]
    if device.type == "cpu" and max(loads) > (os.cpu_count() or 1) + 0.5:
        header.append(f"- WARNING: the host was shared: 1-min load average up to {max(loads):.1f} on "
                      f"{os.cpu_count()} CPUs during the run (column load1 of ops.csv per row); "
                      "timings taken under load are slower and noisier than the hardware allows")
    text = markdown(rows, header)
    print()
    print(text)
    stamp = env["date"].replace("-", "").replace(":", "").replace("+0000", "Z")
    md_path = out_dir / f"ops-{device_slug(device)}-{stamp}.md"
    md_path.write_text(text)
    print(f"wrote {out_dir / 'ops.csv'} ({len(rows)} rows) and {md_path}")
    return 1 if any(r["status"] in ("wrong", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
