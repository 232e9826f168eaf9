"""Kernel microbenchmark: fastedge's masked writer sum against the authors' formulation.

What is measured
----------------
One layer's worth of reader inputs (SPEC sections 2 and 5) at the shapes of a
real pruning run, GPT-2 small by default (158 writers, trailing shape
``T = (batch, seq, hidden) = (32, 64, 768)``, float32):

* ``gpt2-L{l}``: layer ``l``'s 37 readers (12 q, 12 k, 12 v heads and the MLP),
  which fastedge computes in **one call** over the MLP's prefix of
  ``W = 14 + 13 l`` writers: the q/k/v rows carry structural zeros on the
  layer's own heads, and ``base`` has two rows (the corrupted residual before
  the layer for q/k/v, between attention and MLP for the MLP).
* ``gpt2-resid_post``: the final read, 1 reader over all 158 writers, one
  shared base row.

Providers, side by side in one run (``PROVIDERS``):

* ``naive``: the authors' formulation (`bench/naive.py`): two full
  ``[158, *T]`` writer tensors (clean and corrupted) and, per kind of reader,
  one einsum over each of them, always over all 158 writers.
* ``torch``, ``triton``, ``cuda`` (and, on request, ``reference``):
  ``fastedge.masked_writer_sum(..., backend=name)`` on fastedge's inputs: one
  stack of deltas ``y - y~`` plus ``base``; the stack gradient accumulates in a
  caller-owned fp32 buffer (``grad_stack``), as in a pruning step.

Modes (``MODES``): ``fwd`` (a training forward: autograd records, inputs
require grad), ``bwd`` (the backward of a recorded forward: writer-stack and
mask gradients), ``fwd+bwd``.

Before timing, every provider's forward output is compared with the naive
one at the timed shape, and its gradients at a batch-1 slice of the same
case (``CHECK_BATCH``); a provider that disagrees is reported as ``wrong``
and not timed. A provider that cannot run here (``triton`` on a CPU, a
backend that is not built) is reported as ``skipped`` with its reasons.

Timing (``measure``): on a GPU, ``triton.testing.do_bench`` (CUDA events,
warm-up, L2 flushed between calls); on the CPU, ``torch.utils.benchmark.Timer``
(its first call is the warm-up; blocks until ``--reps`` samples and
``--min-time`` seconds, or until ``--max-time`` would be exceeded). p20, p50
and p80 per (case, mode, provider), and the speed-up ``naive p50 / provider p50``
from the same run. Memory: ``state_mb`` is the bytes of the tensors a provider
keeps (inputs; fastedge's gradient buffer in backward modes); ``peak_extra_mb``
is the measured peak above what was allocated before a call
(``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the growth of the
process's peak resident set, VmHWM, over the cell, or ``n/a``).

Output: one CSV row per (case, mode, provider) appended to
``<out>/ops.csv`` and a markdown table printed and written to
``<out>/ops-<device>-<date>.md``; ``<out>`` is ``--out``, else ``$OUT``, else
``bench/results``.

Extending it: a model is a `Model` in ``MODELS``, a case a `Case` in ``CASES``,
a provider a `Provider` in ``PROVIDERS``, a mode an entry of ``MODES``, a
column a function in ``METRICS`` (it receives the row and its `Cell`).

    python bench/ops.py                      # the default run (GPU if present, else CPU)
    python bench/ops.py --quick --out /tmp/b  # tiny shapes, seconds
    python bench/ops.py --cases gpt2-L11 --modes fwd --providers naive,torch
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import os
import platform
import re
import subprocess
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

import fastedge  # noqa: E402
from fastedge.backends import Call, explain  # noqa: E402
from fastedge.graph import EdgeGraph  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Forward agreement with the naive output: max |a - b| <= TOL * max(1, max |naive|).
# Gradients (long reductions) get GRAD_TOL_FACTOR times more.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
GRAD_TOL_FACTOR = 10.0
CHECK_BATCH = 1  # gradients are checked on this many sequences of the case (cheap)


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
    """One fastedge call: a layer's readers (q/k/v heads and MLP), or resid_post."""
    name: str
    model: str
    layer: Optional[int]  # None: resid_post

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
# The CPU default leaves CodeLlama out (tens of GB of writer tensors, minutes per cell).
CPU_DEFAULT_CASES = [c.name for c in CASES if c.model == "gpt2-small"]
CASE_BY_NAME = {c.name: c for c in CASES}


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

    with torch.no_grad():
        if case.layer is None:
            z = rand(Wt)
            naive_masks = {"z": z}
            mask = z[None, :W].clone()
            valid = torch.ones(1, W, dtype=torch.bool)
            base = data.corrupted.sum(0)
            base_index = None
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
        dout = torch.randn((lay.n_readers,) + tuple(data.clean.shape[1:]), dtype=dtype, device=dev,
                           generator=torch.Generator(device=dev).manual_seed(seed + 1))
    to = dict(device=dev)
    return Problem(case, lay, data,
                   {k: v.to(dtype=dtype, **to) for k, v in naive_masks.items()},
                   mask.to(**to), valid.to(**to), base.to(dtype=dtype, **to),
                   None if base_index is None else base_index.to(**to), dout)


# =============================================================================
# Providers
# =============================================================================


class Provider:
    """One implementation. `setup` builds its inputs (requiring grad), `forward`
    returns its outputs as a tuple; the rest converts results to fastedge's
    layout for the checks."""
    name = "?"
    is_baseline = False

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
        with structural zeros set to 0)."""
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
    """The authors' formulation (bench/naive.py)."""
    name = "naive"
    is_baseline = True

    def setup(self, problem):
        lay = problem.layout
        x = problem.data.clean.detach().requires_grad_(True)
        corr_x = problem.data.corrupted
        masks = {k: v.detach().clone().requires_grad_(True) for k, v in problem.naive_masks.items()}
        state = {"x": x, "corr_x": corr_x, "masks": masks}
        if problem.case.layer is not None:
            first_head = lay.attn_writers  # the layer's first head is the first writer q/k/v may not read
            state["attn_common"] = naive.attn_common_mask(lay.total_writers, first_head,
                                                          problem.dtype, problem.device)
            state["mlp_common"] = naive.mlp_common_mask(lay.total_writers, lay.n_writers,
                                                        problem.dtype, problem.device)
        return state

    def forward(self, s):
        m = s["masks"]
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
            dmask = grads[1][None, :W]
        else:
            dq, dk, dv, dmlp = grads[1:]
            dmask = torch.cat([dq[:W].t(), dk[:W].t(), dv[:W].t(), dmlp[None, :W]])
        return dx, dmask.float() * problem.valid

    def state_bytes(self, s, mode):
        return _nbytes(s["x"], s["corr_x"], *s["masks"].values(), s.get("attn_common"),
                       s.get("mlp_common"))


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


PROVIDERS: dict[str, Provider] = {
    "naive": NaiveProvider(),
    "torch": FastedgeProvider("torch"),
    "triton": FastedgeProvider("triton"),
    "cuda": FastedgeProvider("cuda"),
    "reference": FastedgeProvider("reference"),  # per-reader einsums: slow, not in the default run
}
DEFAULT_PROVIDERS = ["naive", "torch", "triton", "cuda"]


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


def _measure_cuda(fn, st: Settings) -> Timing:
    try:
        from triton.testing import do_bench
        samples = do_bench(fn, warmup=st.warmup_ms, rep=st.rep_ms, return_mode="all")
        method = "cuda triton.testing.do_bench"
    except (ImportError, AssertionError, TypeError):  # no Triton, or one without return_mode="all"
        samples, method = _cuda_events(fn, st), "cuda events"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    return Timing(list(samples), method, extra, "cuda.max_memory_allocated")


def _cuda_events(fn, st: Settings) -> list:
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(st.warmup_ms / est_ms))):
        fn()
    events = []
    for _ in range(max(st.reps, int(st.rep_ms / est_ms))):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


# =============================================================================
# Checks
# =============================================================================


def _max_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    err = (got.float() - want.float()).abs().max().item()
    scale = max(1.0, want.float().abs().max().item())
    return err, scale


def check_forward(p: Provider, state: dict, problem: Problem,
                  want: torch.Tensor) -> tuple[Optional[str], Optional[float]]:
    """(None, max |err|) when `p`'s forward agrees with the naive output, else (why not, err)."""
    with torch.no_grad():
        got = p.rows(problem, p.forward(state))
    if got.shape != want.shape:
        return f"forward shape {tuple(got.shape)} != naive {tuple(want.shape)}", None
    if not torch.isfinite(got).all():
        return "forward has non-finite values", None
    err, scale = _max_err(got, want)
    if not err <= TOL[problem.dtype] * scale:
        return f"forward differs from naive: max |err| {err:.3g} (scale {scale:.3g})", err
    return None, err


def check_gradients(p: Provider, small: Problem, want: tuple) -> Optional[str]:
    """None when `p`'s stack and mask gradients agree with the naive ones on `small`."""
    got = p.gradients(small, p.setup(small))
    for what, g, w in zip(("stack", "mask"), got, want):
        if g.shape != w.shape:
            return f"d{what} shape {tuple(g.shape)} != naive {tuple(w.shape)}"
        err, scale = _max_err(g, w)
        if not err <= TOL[small.dtype] * GRAD_TOL_FACTOR * scale:
            return f"d{what} differs from naive (batch {CHECK_BATCH}): max |err| {err:.3g} (scale {scale:.3g})"
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
    status: str                   # ok | skipped | wrong
    timing: Optional[Timing] = None
    state_bytes: Optional[int] = None
    note: str = ""
    max_err: Optional[float] = None
    load1: float = 0.0
    speedup: Optional[float] = None


def run_case(case: Case, model: Model, data: WriterData, providers: list, modes: list,
             st: Settings, seed: int, log: Callable[[str], None]) -> list:
    problem = build_problem(case, model, data, seed)
    lay = problem.layout
    log(f"[{case.name}] R={lay.n_readers} W={lay.n_writers}/{lay.total_writers} "
        f"T={'x'.join(map(str, problem.trailing))} {str(problem.dtype).replace('torch.', '')}")
    base_p = PROVIDERS["naive"]
    base_state = base_p.setup(problem)
    t0 = time.perf_counter()
    with torch.no_grad():
        want = base_p.rows(problem, base_p.forward(base_state))
    log(f"  naive reference forward: {time.perf_counter() - t0:.2f} s")
    need_grads = any("bwd" in m for m in modes)
    if need_grads:
        small = problem.sliced(CHECK_BATCH)
        want_grads = base_p.gradients(small, base_p.setup(small))
    del base_state

    cells = []
    for name in providers:
        p = PROVIDERS[name]
        reasons = p.skip_reasons(problem)
        if reasons:
            note = "; ".join(reasons)
            log(f"  {name}: skipped ({note})")
            cells += [Cell(case, lay, m, name, "skipped", note=note) for m in modes]
            continue
        state = p.setup(problem)
        fwd_wrong, err, grad_wrong = None, None, None
        if not p.is_baseline:
            try:
                fwd_wrong, err = check_forward(p, state, problem, want)
            except Exception as exc:  # a provider that fails is reported, not fatal
                fwd_wrong = f"forward raised {type(exc).__name__}: {exc}"
            if need_grads and fwd_wrong is None:
                try:
                    grad_wrong = check_gradients(p, small, want_grads)
                except Exception as exc:
                    grad_wrong = f"backward raised {type(exc).__name__}: {exc}"
            if fwd_wrong is None:
                log(f"  {name}: forward agrees with naive (max |err| {err:.3g})"
                    + ("" if not need_grads else
                       "; gradients agree" if grad_wrong is None else "; gradients DO NOT agree"))
        for mode in modes:
            wrong = fwd_wrong or (grad_wrong if "bwd" in mode else None)
            if wrong:
                log(f"  {name} {mode}: WRONG, not timed: {wrong}")
                cells.append(Cell(case, lay, mode, name, "wrong", note=wrong, max_err=err))
                continue
            fn = MODES[mode](p, state, problem)
            timing = measure(fn, problem.device, st, f"{case.name} {mode} {name}")
            del fn
            cell = Cell(case, lay, mode, name, "ok", timing, p.state_bytes(state, mode),
                        max_err=err, load1=os.getloadavg()[0])
            log(f"  {name:>9} {mode:<7} p50 {timing.quantile(0.5):10.2f} ms  "
                f"({len(timing.samples_ms)} samples)")
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if found:
            model = found.group(1).strip()
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = device_name(device).split(" (")[0] + f" {os.cpu_count()}c"
        text = "cpu " + text
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_revision() -> str:
    if os.environ.get("FASTEDGE_GIT_REV"):
        return os.environ["FASTEDGE_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, text=True,
                             capture_output=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".",
                                 ":(exclude)bench/results"], cwd=REPO_DIR, text=True,
                                capture_output=True, check=True).stdout.strip()
        return rev + ("-dirty" if status else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


# Extra columns: name -> function(cell) -> value. Later: bytes moved, bandwidth, ...
METRICS: dict[str, Callable[[Cell], object]] = {
    "state_mb": lambda c: _mb(c.state_bytes) if c.timing else "",
    "peak_extra_mb": lambda c: (_mb(c.timing.peak_extra_bytes) or "n/a") if c.timing else "",
    "mem_method": lambda c: c.timing.mem_method if c.timing else "",
    "max_abs_err_vs_naive": lambda c: "" if c.max_err is None else f"{c.max_err:.3g}",
}

COLUMNS = ["date", "device", "timing", "torch", "triton", "fastedge", "git_rev", "threads",
           "load1", "case", "model", "readers", "writers", "total_writers", "shape", "dtype",
           "mode", "provider", "status", "samples", "p20_ms", "p50_ms", "p80_ms",
           "speedup_vs_naive", *METRICS, "note"]


def make_row(cell: Cell, env: dict, model: Model, trailing: tuple, dtype: str) -> dict:
    t = cell.timing
    lay = cell.layout
    row = dict(env)
    row.update({
        "load1": f"{cell.load1:.2f}" if t else "",
        "case": cell.case.name, "model": model.name, "readers": lay.n_readers,
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
    """Append rows; if the file's header differs (columns added later), rewrite it
    with the union of both headers so that old rows keep their values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header == COLUMNS:
                old = None
            else:
                old = list(reader)
        if old is None:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, COLUMNS).writerows(rows)
            return
        columns = header + [c for c in COLUMNS if c not in header]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(old)
            w.writerows(rows)
        tmp.replace(path)
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def markdown(rows: list, header_lines: list) -> str:
    out = list(header_lines) + [""]
    out.append("| case | shape | mode | provider | p20 ms | p50 ms | p80 ms | n | speed-up vs naive "
               "| state MB | peak extra MB |")
    out.append("|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|")
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault(r["provider"], r["note"])
            continue
        if r["status"] == "wrong":
            out.append(f"| {r['case']} | {r['shape']} | {r['mode']} | {r['provider']} | "
                       f"WRONG: {r['note']} | | | | | | |")
            continue
        speed = f"{float(r['speedup_vs_naive']):.2f}x" if r["speedup_vs_naive"] else ""
        p20, p50, p80 = (_ms_short(r[k]) for k in ("p20_ms", "p50_ms", "p80_ms"))
        out.append(f"| {r['case']} | {r['shape']} | {r['mode']} | {r['provider']} | {p20} | "
                   f"{p50} | {p80} | {r['samples']} | {speed} | {r['state_mb']} | "
                   f"{r['peak_extra_mb']} |")
    if skipped:
        out.append("")
        out.append("Skipped providers:")
        for name, note in skipped.items():
            out.append(f"- `{name}`: {note}")
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
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few samples: a smoke test")
    ap.add_argument("--out", help="results folder (default: $OUT if set, else bench/results)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--reps", type=int, help="CPU: samples per cell (default 3)")
    ap.add_argument("--min-time", type=float, help="CPU: seconds of samples at least per cell (default 1)")
    ap.add_argument("--max-time", type=float,
                    help="CPU: stop sampling a cell before it exceeds this many seconds (default 20)")
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
        cases = list(CASE_BY_NAME) if device.type == "cuda" else CPU_DEFAULT_CASES
    elif args.cases == "all":
        cases = list(CASE_BY_NAME)
    else:
        cases = _csv_list(args.cases, CASE_BY_NAME, "case")
    providers = _csv_list(args.providers, PROVIDERS, "provider")
    providers = ["naive"] + [p for p in providers if p != "naive"]
    modes = _csv_list(args.modes, MODES, "mode")

    quick = args.quick
    st = Settings(reps=args.reps or (5 if quick else 3),
                  min_time=args.min_time if args.min_time is not None else (0.02 if quick else 1.0),
                  max_time=args.max_time if args.max_time is not None else (0.2 if quick else 20.0),
                  warmup_ms=5 if quick else 25, rep_ms=20 if quick else 200)
    out_dir = Path(args.out or os.environ.get("OUT") or BENCH_DIR / "results")

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "timing": "cuda triton.testing.do_bench" if device.type == "cuda" else "cpu torch.utils.benchmark",
        "torch": torch.__version__, "triton": triton_version(), "fastedge": fastedge.__version__,
        "git_rev": git_revision(), "threads": torch.get_num_threads(),
    }

    def log(msg):
        print(msg, flush=True)

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
            cells = run_case(case, model, data, providers, modes, st, args.seed + 1 + i, log)
            rows += [make_row(c, env, model, trailing, model.dtype) for c in cells]
        del data

    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    append_csv(out_dir / "ops.csv", rows)
    kind = "GPU" if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        timing_note = (f"GPU timings: triton.testing.do_bench (warm-up {st.warmup_ms} ms, "
                       f"repeat {st.rep_ms} ms, L2 flushed between calls)")
    else:
        timing_note = (f"CPU timings: torch.utils.benchmark.Timer, {torch.get_num_threads()} threads; "
                       f"after one warm-up call, up to {st.reps} samples per cell, at least "
                       f"{st.min_time:g} s of samples when cheap, no sample started past "
                       f"{st.max_time:g} s (so the slowest cells have fewer samples: column n)")
    header = [
        f"# fastedge masked writer sum: {kind} microbenchmark",
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
        "- fwd is a training forward (autograd recording); bwd is the backward of one recorded "
        "forward (stack and mask gradients); speed-up = naive p50 / provider p50 from this run",
        "- state MB: tensors the provider keeps (inputs; fastedge's gradient buffer in backward "
        "modes); peak extra MB: measured peak above what was allocated before a call "
        "(GPU: torch.cuda.max_memory_allocated; CPU: growth of peak RSS, VmHWM, over the cell)",
        f"- every provider's forward matched naive at the timed shape (fp32 tolerance "
        f"{TOL[torch.float32]:g} x scale) and its gradients at batch {CHECK_BATCH} before timing, "
        "unless marked WRONG",
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
    return 1 if any(r["status"] == "wrong" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
