"""A step-time model that runs without a GPU: one pruning step traced on fake
tensors, every op costed, the time modeled on a card's spec sheet.

    python bench/roofline.py --model codellama-13b --batch 32 --micro-batch 8 --card h200
    python bench/roofline.py --model gpt2-small          # batch 32 x seq 64, fp32 (bench/step.py's default)
    python bench/roofline.py --model gpt2-small --card a100 --json out.json

What is traced
--------------
The model and the step are bench/memory.py's (`FakeBench`: the model built
under `FakeTensorMode`, nothing allocated; `_step_fn`: bench/pruning_step.py's
step with a fixed seed), and the floor is bench/pruning_step.py's
`floor_step` (the unpatched corrupted forward plus a clean forward and a
backward to the embeddings, bench/step.py's "floor" kind). CodeLlama-13B runs
with ``recompute_readers=True`` (the paper's setting), GPT-2 small with it too
(bench/step.py's "fastedge" kind); ``--no-recompute`` traces the other design.
One micro-batch is traced and its ops are counted ``batch / micro_batch``
times; the optimizer update, once (every micro-batch of a step runs the same
ops on the same shapes).

`OpRecorder` (a TorchDispatchMode inside the fake mode, as
bench/memtrack.py's tracker) sees every op the step dispatches: the top-level
aten ops (after autograd and the composite decompositions) and fastedge's
custom ops (``fastedge::*``) as units. Per op it records:

* host ops: 1 per op seen (views and allocations included);
* launches: 0 for views, allocations and host scalars, 1 for any other aten
  op, and for a fastedge op the launches of its contract
  (`fastedge.kernels.costs.custom_op_costs`: masked_sum forward, stack and
  mask backward, sample_masks, ...);
* DRAM bytes: aten ops read the distinct elements of their inputs (a
  broadcast input counts once; an embedding or index read counts the rows it
  gathers) and write their outputs; in-place ops read and write the mutated
  argument (copy_ and fills only write it); fastedge ops from the contract,
  which also gives L2 re-reads;
* FLOPs by kind: matrix products 2*M*N*K (``tc16`` for bf16/fp16,
  ``fp32`` SIMT for fp32: PyTorch's default matmul precision is "highest",
  no TF32), attention 4*B*H*Sq*Sk*d forward and 2.5x that backward; other
  ops one fp32 SIMT FLOP per element; fastedge ops from the contract
  (``tf32`` for the fp32 kernels' tf32x3 products).

Phases: the Python call stack inside the dispatch mode
--------------------------------------------------------
Each op's phase comes from the innermost frame of fastedge, bench/ or a
Hugging Face modeling file that the rules below recognise (qualified function
name plus, for a few frames, the text of the line being run), after three
context rules that look at the whole stack: the optimizer (torch/optim), the
corrupted run (`EdgeModel._run`'s corrupted lines, `floor_step`'s corrupted
forward) and the unembedding and loss (the final norm, lm_head, the loss).
Backward ops that autograd runs from C++ have no model frame on the stack:
they take the phase of their autograd node, which the recorder tags with the
phase of the forward op that created it (`Node.metadata`, read back through
`torch._C._current_autograd_node()`). Python backward formulas (fastedge's
ops, `_StackWrite`, `_RowChunked`) and the checkpoint's recomputation do
have their frames on the stack. A masked-sum op is "forward", "recompute"
(inside a checkpoint recomputation) or "backward" (any other op run by the
engine). fastedge's fused op is split: its sampling launches count under
"node and edge sampling", its forward launch under the masked sum. What no
rule claims is "other"; the test checks that "other" stays small.

The time model
--------------
Per launch, device time = max(DRAM bytes / (bw_eff x HBM bandwidth),
L2 re-read bytes / L2 rate, sum over kinds of FLOPs / (eff x peak)) plus a
per-launch gap. Per op, host time = a per-op cost (custom ops: their own,
larger one). The step is a stream: the host issues op i after op i-1 (host
time), the device runs it after both its issue and the previous op's end;
the step time is the last op's end (no host syncs in a step). "bound ms" is
the same device time at the spec-sheet numbers (efficiency 1, no gaps, no
host): what the card allows. The constants live in `CALIBRATION`, each with
where it came from; `calibration()` prints the model against every committed
H200 measurement.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import linecache
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import memory  # noqa: E402
import pruning_step as ps  # noqa: E402
import results_csv  # noqa: E402
from fastedge.kernels import costs  # noqa: E402

GB = 1e9

# -- the cards (spec sheets, dense peaks, no sparsity) --------------------------------

CARDS = {
    # HBM TB/s; dense peaks TFLOP/s (bf16/fp16 tensor core, tf32 tensor core, fp32 SIMT).
    # L2: not on the spec sheets; an assumed nominal read rate (microbenchmarks of
    # Hopper report roughly 2-3x HBM), used only through the fitted L2 efficiency.
    "h200": dict(name="NVIDIA H200 SXM", hbm_tb_s=4.8, tc16=989.0, tf32=494.0, fp32=67.0, l2_tb_s=12.0,
                 arch=90),
    "h100": dict(name="NVIDIA H100 SXM", hbm_tb_s=3.35, tc16=989.0, tf32=494.0, fp32=67.0, l2_tb_s=12.0,
                 arch=90),
    "a100": dict(name="NVIDIA A100 SXM 80GB", hbm_tb_s=2.0, tc16=312.0, tf32=156.0, fp32=19.5, l2_tb_s=5.0,
                 arch=80),
}

# -- the fitted constants (all of them) -----------------------------------------------

CALIBRATION = {
    # Achieved fraction of HBM bandwidth by memory-bound kernels. The H200 copy
    # measured 4.24-4.26 TB/s read+write (bench/results/tune-*.log,
    # gpu-run-*.log) against the 4.8 TB/s spec: 0.885.
    "bw_eff": 0.885,
    # Effective L2 re-read rate of fastedge's kernels as a fraction of the
    # nominal L2 rate (12 TB/s on Hopper): the 16-bit forward at
    # CodeLlama-13B layers 20 and 39 (tune-*.log) takes 7.9-21.5 ms for
    # 18.3-36.6 GB of mask reloads at 64-128 columns, about 1.7-2.3 TB/s.
    "l2_eff": 0.16,
    # Fraction of the bf16 tensor-core peak that cuBLAS reaches on the
    # floor's GEMMs (576-token micro-batches, K = 5,120): fitted on the
    # CodeLlama-13B floor, 443.8 ms (step-codellama-13b-nvidia-h200-*.md).
    "tc_eff_gemm": 0.60,
    # Fraction of the tensor-core peak fastedge's dots reach (K steps of
    # 16-32, the hi/lo split in the loop): the 256-column forward at
    # CodeLlama layer 39 runs 2.48 TFLOP in 6.2 ms (tune-*.log): 0.40.
    "tc_eff_fastedge": 0.40,
    # The same for the fp32 kernels' tf32x3 products (three TF32 MMAs on
    # split operands): the GPT-2 small forward at 64 columns runs 96 GFLOP
    # in 1.25 ms at layer 11 (tune-*.log), 16% of the TF32 peak.
    "tf32_eff_fastedge": 0.16,
    # Fraction of the fp32 SIMT peak reached by fp32 GEMMs without TF32:
    # fitted on the GPT-2 small floor, 43.8 ms (step-gpt2-small-nvidia-h200-*.md).
    "fp32_eff": 0.65,
    # Device gap per kernel launch (s): a few microseconds between kernels on
    # the stream; fitted jointly with the host costs on the GPT-2 steps.
    "launch_s": 3e-6,
    # Host time per aten op seen by the dispatcher (s), views included: the
    # eager PyTorch path of a small op.
    "host_aten_s": 8e-6,
    # Host time per fastedge custom-op call (s): the issue measured about 69 us
    # in the custom-op path for a small masked_writer_sum (dispatch, backend
    # choice, checks, Triton launch).
    "host_custom_s": 60e-6,
}

PHASES = ("corrupted run", "stack writes", "masked sum forward", "masked sum recompute",
          "masked sum backward", "node and edge sampling", "reader norms", "q/k/v projections",
          "attention", "output projections", "MLPs", "unembedding and loss", "optimizer", "other")
MS_FWD, MS_RECOMPUTE, MS_BWD, SAMPLING = PHASES[2], PHASES[3], PHASES[4], PHASES[5]
PHASE_KEY = "roofline_phase"

# -- ops and their costs -----------------------------------------------------------------


@dataclass
class Launch:
    dram: float = 0.0
    l2: float = 0.0
    flops: dict = field(default_factory=dict)
    fastedge: bool = False


@dataclass
class OpRecord:
    name: str
    phase: str
    custom: bool
    launches: list  # of Launch
    host_ops: int = 1
    shape: Optional[tuple] = None   # fastedge masked-sum ops: (R, W, N, dtype)

    @property
    def n_launches(self) -> int:
        return len(self.launches)

    @property
    def dram(self) -> float:
        return sum(x.dram for x in self.launches)

    @property
    def l2(self) -> float:
        return sum(x.l2 for x in self.launches)

    @property
    def flops(self) -> float:
        return sum(sum(x.flops.values()) for x in self.launches)


NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
             "detach", "alias", "lift_fresh", "_unsafe_view", "_reshape_alias", "set_", "resize_",
             "_has_compatible_shallow_copy_type"}
WRITE_ONLY = {"copy_", "fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
              "new_zeros", "new_ones", "new_full", "scalar_tensor", "arange", "randint", "eye", "tril_indices"}
GATHERS = {"embedding", "index_select", "gather", "index"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation"}


def _footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (broadcast dims once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _matmul_kind(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "tc16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _matmul_flops(name: str, args) -> float:
    if name in ("mm", "_addmm_activation", "addmm"):
        a, b = (args[1], args[2]) if name != "mm" else (args[0], args[1])
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm",):
        a, b = args[0], args[1]
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ("baddbmm", "addbmm"):
        a, b = args[1], args[2]
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0.0


def _attention_flops(name: str, args) -> float:
    """Scaled dot-product attention: QK^T and PV forward, 2.5x that backward."""
    q, k, v = args[:3] if "backward" not in name else args[1:4]
    B, H, Sq, d = q.shape
    Sk, dv = k.shape[-2], v.shape[-1]
    fwd = 2.0 * B * H * Sq * Sk * (d + dv)
    return 2.5 * fwd if "backward" in name else fwd


def aten_launch(func, args, kwargs, out) -> list:
    """The launches of one aten op (0 or 1) with its bytes and FLOPs."""
    name = func.__name__.split(".")[0]
    schema = func._schema
    if getattr(func, "is_view", False) or name in NO_LAUNCH:
        return []
    flat_args = tree_flatten((args, kwargs))[0]
    mutated = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            mutated += [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
    mutated_ids = {id(t) for t in mutated}
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    inputs = [t for t in flat_args if isinstance(t, torch.Tensor) and id(t) not in mutated_ids]
    write = sum(_footprint(t) for t in mutated) if mutated else sum(_footprint(t) for t in outs)
    read = 0
    if name not in WRITE_ONLY or name == "copy_":
        if name in GATHERS:
            read = sum(_footprint(t) for t in outs) + sum(_footprint(t) for t in inputs
                                                          if t.dtype in (torch.int32, torch.int64))
        else:
            read = sum(_footprint(t) for t in inputs)
            if name not in WRITE_ONLY:
                read += sum(_footprint(t) for t in mutated)
    flops: dict = {}
    if name in MATMULS:
        a = args[0] if name in ("mm", "bmm") else args[1]
        flops[_matmul_kind(a.dtype)] = _matmul_flops(name, args)
    elif "scaled_dot_product" in name:
        q = args[0] if "backward" not in name else args[1]
        flops[_matmul_kind(q.dtype)] = _attention_flops(name, args)
    else:
        n = max([t.numel() for t in outs + inputs + mutated] or [0])
        if n:
            flops["fp32"] = float(n)
    return [Launch(dram=float(read + write), flops=flops)]


def custom_launches(func, args, kwargs, arch: int, overrides: Optional[dict] = None) -> list:
    """A fastedge op's launches, from its contract (`fastedge.kernels.costs`)."""
    out = []
    for c in costs.custom_op_costs(func.__name__, args, kwargs, arch=arch, overrides=overrides):
        for _ in range(c.launches):
            out.append(Launch(dram=float(c.dram_bytes) / c.launches, l2=float(c.l2_read) / c.launches,
                              flops={k: v / c.launches for k, v in c.flops.items()}, fastedge=True))
        if c.launches == 0 and (c.dram_bytes or c.flops):
            raise AssertionError(f"{c.kernel}: work without a launch")
    return out


# -- phases from the call stack ---------------------------------------------------------

_CORRUPTED_RUN = re.compile(r"^\s*(corrupted = a\.embed|x_c = |heads_c = |y_mlp_c = |attn_c = |resid_c = |"
                            r"mlp_base = |x_c\.expand\()")
_STACK_LINES = re.compile(r"run\.(stack|grad_buffer|token) = |run\.write\(")
_HF_FINAL = re.compile(r"self\.(norm|ln_f|final_layer_norm)\(|self\.lm_head\(")
_HF_QKV = re.compile(r"q_proj|k_proj|v_proj|c_attn|query_key_value")
_HF_OUT = re.compile(r"o_proj|c_proj|self\.dense\(")
_HF_NORM = re.compile(r"layernorm|ln_1|ln_2|norm\(")


@dataclass
class Frame:
    qualname: str
    file: str
    line: str


def _project_frames(frame) -> list:
    """Frames of fastedge, bench/, Hugging Face modeling files, torch.optim and
    the checkpoint (innermost first)."""
    out = []
    while frame is not None:
        code = frame.f_code
        fn = code.co_filename
        if ("fastedge" in fn or "/bench/" in fn or "/transformers/models/" in fn or "/torch/optim/" in fn
                or fn.endswith("sdpa_attention.py") or fn.endswith("torch/utils/checkpoint.py")):
            if fn.endswith("roofline.py") or fn.endswith("memtrack.py"):
                frame = frame.f_back
                continue
            out.append(Frame(getattr(code, "co_qualname", code.co_name), fn,
                             linecache.getline(fn, frame.f_lineno)))
        frame = frame.f_back
    return out


def _context_phase(frames: list) -> Optional[str]:
    for f in frames:
        if "/torch/optim/" in f.file:
            return "optimizer"
    for f in frames:
        q = f.qualname
        if q == "EdgeModel._run" and _CORRUPTED_RUN.search(f.line):
            return "corrupted run"
        if q == "floor_step" and "corrupted" in f.line:
            return "corrupted run"
    for f in frames:
        q = f.qualname
        if q in ("EdgeModel._final_reader", "Adapter.unembed", "_loss"):
            return "unembedding and loss"
        if q == "pruning_step" and "_loss(" in f.line:
            return "unembedding and loss"
        if q == "floor_step" and re.search(r"log_softmax|kl = |\.float\(\)", f.line) \
                and "model(" not in f.line:
            return "unembedding and loss"
        if "/transformers/models/" in f.file and _HF_FINAL.search(f.line):
            return "unembedding and loss"
    return None


def _leaf_phase(f: Frame) -> Optional[str]:
    q, line = f.qualname, f.line
    if "fastedge" in f.file and "/ops/" in f.file:
        if q.split(".")[-1] in ("sample_masks", "hard_concrete", "node_noise", "edge_noise", "_sample_masks_backward",
                                "_check_node"):
            return SAMPLING
        return MS_FWD
    if q in ("_StackWrite.forward", "_StackWrite.backward", "_Run.write"):
        return "stack writes"
    if q in ("_RowChunked.forward", "_RowChunked.backward", "EdgeModel._reader_norm", "Adapter.attn_norm",
             "Adapter.mlp_norm"):
        return "reader norms"
    if q == "_full" or q == "EdgeModel._attn_readers":
        return MS_FWD
    if q == "_project":
        return "q/k/v projections"
    if q in ("_rotary", "_rotate_half"):
        return "attention"
    if q == "attention_heads":
        if "_project(" in line:
            return "q/k/v projections"
        if "einsum(" in line or "o_b" in line:
            return "output projections"
        return "attention"
    if q in ("Adapter.mlp", "EdgeModel._mlp_reader"):
        return "MLPs"
    if q.startswith("_Run."):
        return SAMPLING
    if q == "EdgeModel._run":
        if _STACK_LINES.search(line):
            return "stack writes"
        if "mlp_partial" in line:   # the MLP reader's base: its partial sum plus the corrupted attention
            return MS_FWD
        return "other"
    if "/transformers/models/" in f.file or f.file.endswith("sdpa_attention.py"):
        cls, _, meth = q.rpartition(".")
        if cls.endswith("Attention") and meth == "forward":
            if _HF_QKV.search(line):
                return "q/k/v projections"
            if _HF_OUT.search(line):
                return "output projections"
            return "attention"
        if q in ("apply_rotary_pos_emb", "rotate_half", "sdpa_attention_forward", "eager_attention_forward",
                 "repeat_kv", "use_gqa_in_sdpa"):
            return "attention"
        if cls.endswith("MLP"):
            return "MLPs"
        if cls.endswith("RMSNorm"):
            return "reader norms"
        if (cls.endswith("DecoderLayer") or cls.endswith("Block") or cls.endswith("Layer")) and meth == "forward":
            if _HF_NORM.search(line):
                return "reader norms"
            return "other"
        return None
    return None


def classify(frames: list) -> Optional[str]:
    phase = _context_phase(frames)
    if phase is not None:
        return phase
    for f in frames:
        phase = _leaf_phase(f)
        if phase is not None:
            return phase
    return None


def _masked_sum_shape(name: str, args) -> Optional[tuple]:
    """(R, W, N, dtype) of a masked-sum op call, for matching measured cells."""
    def wn(stack):
        return int(stack.shape[0]), int(stack.numel()) // max(int(stack.shape[0]), 1)
    if name in ("masked_writer_sum", "sampled_masked_writer_sum"):
        W, N = wn(args[0])
        return int(args[1].shape[0]), W, N, args[0].dtype
    if name == "masked_writer_sum_accumulate_grad_":
        R, W = int(args[1].shape[0]), int(args[1].shape[1])
        return R, W, int(args[2].numel()) // max(R, 1), args[2].dtype
    if name == "masked_writer_sum_backward_mask":
        W, N = wn(args[0])
        return int(args[1].shape[0]), W, N, args[0].dtype
    return None


class NodeTagger(TorchFunctionMode):
    """Tags the autograd nodes each torch function call creates with the
    phase of the call, for the backward (module docstring). The dispatch
    level cannot: its outputs are not the tensors autograd gives a grad_fn.
    A composite call (einsum, linear) creates several nodes; the walk from
    its outputs' grad_fn through untagged nodes reaches all of them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled() and torch._C._current_autograd_node() is None:
            nodes = [t.grad_fn for t in tree_flatten(out)[0]
                     if isinstance(t, torch.Tensor) and t.grad_fn is not None
                     and PHASE_KEY not in t.grad_fn.metadata]
            if nodes:
                phase = classify(_project_frames(sys._getframe(1))) or "other"
                while nodes:
                    n = nodes.pop()
                    if n is None or PHASE_KEY in n.metadata or "AccumulateGrad" in n.name():
                        continue
                    n.metadata[PHASE_KEY] = phase
                    nodes.extend(m for m, _ in n.next_functions)
        return out


class OpRecorder(TorchDispatchMode):
    """Records every op with its phase, launches, bytes and FLOPs (module docstring)."""

    def __init__(self, arch: int = 90, overrides: Optional[dict] = None):
        super().__init__()
        self.arch = arch
        self.overrides = overrides
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = func.namespace
        if ns in ("prim", "profiler"):
            return out
        node = torch._C._current_autograd_node()
        frames = _project_frames(sys._getframe(1))
        phase = classify(frames)
        in_bwd = node is not None
        recompute = in_bwd and any(f.file.endswith("torch/utils/checkpoint.py") for f in frames)
        if phase is None and in_bwd:
            phase = node.metadata.get(PHASE_KEY)
            if phase is None and "AccumulateGrad" in node.name():
                phase = "optimizer"
        phase = phase or "other"
        if ns == "fastedge":
            name = func.__name__.split(".")[0]
            launches = custom_launches(func, args, kwargs, self.arch, self.overrides)
            shape = _masked_sum_shape(name, args)
            ms = MS_RECOMPUTE if recompute else (MS_BWD if in_bwd else MS_FWD)
            if name in ("sample_masks", "sample_masks_backward", "hard_concrete", "hard_concrete_backward"):
                self.records.append(OpRecord(name, SAMPLING, True, launches))
            elif name == "sampled_masked_writer_sum":
                # the contract lists the sampling launches first, the forward last
                self.records.append(OpRecord(name, SAMPLING, True, launches[:-1]))
                self.records.append(OpRecord(name + "/forward", ms, False, launches[-1:], host_ops=0,
                                             shape=shape))
            else:
                self.records.append(OpRecord(name, ms, True, launches, shape=shape))
        else:
            if phase == MS_FWD:
                phase = MS_RECOMPUTE if recompute else (MS_BWD if in_bwd else MS_FWD)
            self.records.append(OpRecord(func.__name__, phase, False, aten_launch(func, args, kwargs, out)))
        return out


# -- tracing a step -------------------------------------------------------------------------

MODELS = {"codellama-13b": dict(dtype=torch.bfloat16, batch=32, micro_batch=8, seq=72, recompute=True),
          "gpt2-small": dict(dtype=torch.float32, batch=32, micro_batch=32, seq=64, recompute=True),
          "tiny-llama": dict(dtype=torch.bfloat16, batch=4, micro_batch=2, seq=16, recompute=True)}


@dataclass
class Trace:
    kind: str                 # "fastedge" or "floor"
    records: list             # one micro-batch (and the update, for fastedge)
    micro_repeats: int        # micro-batches per step
    seconds: float


def trace_step(bench: "memory.FakeBench", kind: str, micro_batch: int, seq: int, batch: int, recompute: bool,
               arch: int) -> Trace:
    """One micro-batch of a `kind` step ("fastedge" or "floor") and, for
    fastedge, the optimizer update, recorded op by op on fake tensors."""
    if batch % micro_batch:
        raise SystemExit(f"batch {batch} is not a multiple of the micro-batch {micro_batch}")
    t0 = time.perf_counter()
    vocab = bench.config.vocab_size
    rec = OpRecorder(arch=arch)
    with bench.mode:
        ids, corrupted = ps.random_batch(vocab, micro_batch, seq, "cpu")
        full = torch.zeros(micro_batch, vocab).log_softmax(-1)
        masked = None
        try:
            fn, masked = memory._step_fn(kind, bench.model, ids, corrupted, full, micro_batch, recompute,
                                         bench.patch_kwargs)
            with NodeTagger(), rec:
                fn()
        finally:
            if masked is not None and hasattr(masked, "unpatch"):
                masked.unpatch()
            bench.model.requires_grad_(False)
    return Trace(kind, rec.records, batch // micro_batch, time.perf_counter() - t0)


def step_records(tr: Trace) -> list:
    """(record, repeats) pairs of a whole step: micro-batch ops x micro_repeats, the update once."""
    return [(r, 1 if r.phase == "optimizer" else tr.micro_repeats) for r in tr.records]


# -- the time model -------------------------------------------------------------------------


def launch_time(x: Launch, card: dict, cal: Optional[dict]) -> float:
    """Device seconds of one launch; `cal` None: the bound (spec numbers, no gap)."""
    bw = card["hbm_tb_s"] * 1e12 * (cal["bw_eff"] if cal else 1.0)
    l2 = card["l2_tb_s"] * 1e12 * (cal["l2_eff"] if cal else 1.0)
    t_flop = 0.0
    for kind, n in x.flops.items():
        eff = 1.0
        if cal:
            if kind == "fp32":
                eff = cal["fp32_eff"]
            elif kind == "tf32" and x.fastedge:
                eff = cal["tf32_eff_fastedge"]
            else:
                eff = cal["tc_eff_fastedge"] if x.fastedge else cal["tc_eff_gemm"]
        t_flop += n / (card[kind] * 1e12 * eff)
    t = max(x.dram / bw, x.l2 / l2, t_flop)
    return t + (cal["launch_s"] if cal else 0.0)


@dataclass
class PhaseRow:
    phase: str
    launches: int = 0
    host_ops: int = 0
    dram_gb: float = 0.0
    l2_gb: float = 0.0
    gflop: float = 0.0
    bound_ms: float = 0.0
    modeled_ms: float = 0.0
    measured_ms: Optional[float] = None


def model_step(pairs: list, card: dict, cal: dict) -> tuple[float, dict]:
    """(step seconds, {phase: PhaseRow}) by the host/device stream model."""
    rows = {p: PhaseRow(p) for p in PHASES}
    host = dev = 0.0
    for rec, reps in pairs:
        row = rows[rec.phase]
        row.launches += rec.n_launches * reps
        row.host_ops += rec.host_ops * reps
        row.dram_gb += rec.dram * reps / GB
        row.l2_gb += rec.l2 * reps / GB
        row.gflop += rec.flops * reps / 1e9
        row.bound_ms += sum(launch_time(x, card, None) for x in rec.launches) * reps * 1e3
        t_dev = sum(launch_time(x, card, cal) for x in rec.launches)
        t_host = rec.host_ops * (cal["host_custom_s"] if rec.custom else cal["host_aten_s"])
        # the stream runs one micro-batch; each of its ops' share of the time
        # counts once per micro-batch (every micro-batch runs the same sequence)
        issue = host + t_host
        end = max(issue, dev) + t_dev
        row.modeled_ms += (end - dev) * reps * 1e3
        host, dev = issue, end
    total = sum(r.modeled_ms for r in rows.values()) / 1e3
    return total, rows


# -- the committed H200 measurements ---------------------------------------------------------

RESULTS = BENCH_DIR / "results"
# The tiles in force when bench/results/ops-nvidia-h200-*.md was measured
# (2026-11-25, before fc4fc3b; the '*' rows of tune-nvidia-h200-*.log): the
# ops cells are modeled with these, the steps (2026-11-26) with today's.
OPS_RUN_CONFIGS = {
    torch.bfloat16: {"masked_sum_forward": dict(config=dict(USE_DOT=True, BLOCK_R=128, BLOCK_W=32, BLOCK_N=128,
                                                            num_warps=8, num_stages=3)),
                     "masked_sum_backward_stack": dict(config=dict(USE_DOT=True, BLOCK_R=16, BLOCK_W=128,
                                                                   BLOCK_N=128, num_warps=8, num_stages=3))},
    torch.float32: {"masked_sum_forward": dict(config=dict(USE_DOT=True, BLOCK_R=64, BLOCK_W=16, BLOCK_N=128,
                                                           num_warps=4, num_stages=3)),
                    "masked_sum_backward_stack": dict(config=dict(USE_DOT=True, BLOCK_R=16, BLOCK_W=128,
                                                                  BLOCK_N=128, num_warps=8, num_stages=3))},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measured_steps(path: Path = RESULTS / "step.csv") -> dict:
    """{(model, kind, recompute): p50 ms} of the latest H200 step rows."""
    out = {}
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if "H200" not in row.get("device", "") or row.get("status") != "ok":
                continue
            kind = row["kind"]
            recompute = row.get("recompute_readers") == "True" if kind.startswith("fastedge") else None
            kind = "fastedge" if kind.startswith("fastedge") else kind
            key = (row["model"], kind, recompute, int(row["batch"]), int(row["micro_batch"]), int(row["seq"]))
            out[key] = float(row["p50_ms"])   # later rows win
    return out


def measured_op_cells(path: Path = RESULTS / "ops.csv") -> list:
    """The H200 Triton cells of the masked op: dicts with case, R, W, total W, T, dtype, mode, p50 ms."""
    cells = []
    if not path.exists():
        return cells
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if ("H200" not in row.get("device", "") or row.get("provider") != "triton" or row.get("status") != "ok"
                    or row.get("mode") not in ("fwd", "bwd") or row.get("op") not in ("", "masked")):
                continue
            m = re.match(r"R(\d+) W(\d+)/(\d+) T([\dx]+)", row["shape"])
            R, W, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
            T = tuple(int(x) for x in m.group(4).split("x"))
            cells.append(dict(case=row["case"], R=R, W=W, total=total, T=T, dtype=DTYPES[row["dtype"]],
                              mode=row["mode"], ms=float(row["p50_ms"])))
    return cells


_TUNE_LINE = re.compile(r"^(fwd|bwd)\s+(\S+)\s+\*?\s*(.*?):\s+([\d.]+) ms")


def measured_tune_rows(paths=None) -> list:
    """Rows of tune-nvidia-h200-*.log: (op, shape name, config, ms)."""
    import tune
    rows = []
    for p in paths or sorted(RESULTS.glob("tune-nvidia-h200-*.log")):
        for line in p.read_text().splitlines():
            m = _TUNE_LINE.match(line)
            if not m or m.group(2) not in tune.SHAPES:
                continue
            op, shape, knobs, ms = m.group(1), m.group(2), m.group(3), float(m.group(4))
            kv = dict(re.findall(r"(\w+)=(\d+)", knobs))
            R, W, N, dtype = tune.SHAPES[shape]
            if op == "fwd":
                cfg = dict(costs.kms.forward_config(R, W, N, dtype, arch=90))
                cfg.update(BLOCK_N=int(kv["BN"]), BLOCK_W=int(kv["BW"]), num_warps=int(kv["warps"]),
                           num_stages=int(kv["stages"]))
            else:
                cfg = dict(costs.kms.backward_stack_config(R, W, N, dtype, torch.float32))
                cfg.update(BLOCK_R=int(kv["BR"]), BLOCK_W=int(kv["BW"]), BLOCK_N=int(kv["BN"]),
                           num_warps=int(kv["warps"]), num_stages=int(kv["stages"]))
            rows.append(dict(op=op, shape=shape, R=R, W=W, N=N, dtype=dtype, config=cfg, knobs=knobs.strip(), ms=ms))
    return rows


def trace_op_cell(cell: dict, arch: int = 90) -> dict:
    """{"fwd": records, "bwd": records} of one ops.py cell (masked op, fp32
    gradient buffer, gradient to the mask), traced on fake tensors with the
    tiles of the ops run."""
    import fastedge
    from torch._subclasses.fake_tensor import FakeTensorMode
    dtype = cell["dtype"]
    G = 1 if "resid_post" in cell["case"] else 2
    rec = {}
    with FakeTensorMode():
        stack = torch.empty((cell["total"],) + cell["T"], dtype=dtype)
        mask = torch.empty(cell["R"], cell["W"]).requires_grad_(True)
        base = torch.empty(((G,) if G > 1 else ()) + cell["T"], dtype=dtype)
        index = torch.zeros(cell["R"], dtype=torch.int64) if G > 1 else None
        grad = torch.empty((cell["total"],) + cell["T"], dtype=torch.float32)
        ov = OPS_RUN_CONFIGS[dtype] if cell["R"] >= costs.kms.DOT_MIN_READERS else None
        r = OpRecorder(arch=arch, overrides=ov)
        with r:
            out = fastedge.masked_writer_sum(stack[:cell["W"]], mask, base, index, grad_stack=grad, backend="torch")
        rec["fwd"] = [x for x in r.records]
        dout = torch.empty_like(out)
        r = OpRecorder(arch=arch, overrides=ov)
        with r:
            torch.autograd.grad(out, [mask], [dout])
        rec["bwd"] = [x for x in r.records]
    return rec


def _interpolate(points: list, w: float) -> float:
    """Piecewise-linear in W through (W, ms) points, extended linearly past the ends."""
    points = sorted(points)
    if len(points) == 1:
        return points[0][1] * w / points[0][0]
    for (w0, t0), (w1, t1) in zip(points, points[1:]):
        if w <= w1 or (w1, t1) == points[-1]:
            return t0 + (t1 - t0) * (w - w0) / (w1 - w0)
    return points[-1][1]


def measured_phases(trace: Trace, cells: list) -> dict:
    """{phase: (ms, covered launches, all launches)} of the masked-sum phases
    from the H200 ops cells: each traced call whose readers, columns and dtype
    match a family of cells (a model's layers) takes the cells' p50
    interpolated in W; a forward cell covers a forward or recompute call, a
    backward cell the stack backward plus the mask backward of one call."""
    fams: dict = {}
    for c in cells:
        key = (c["R"], math.prod(c["T"]), c["dtype"], c["mode"])
        fams.setdefault(key, []).append((c["W"], c["ms"]))
    out = {}
    for phase in (MS_FWD, MS_RECOMPUTE, MS_BWD):
        ms, covered, total = 0.0, 0, 0
        for r in trace.records:
            if r.phase != phase or not r.launches or r.shape is None:
                continue
            total += 1
            R, W, N, dtype = r.shape
            mode = "bwd" if phase == MS_BWD else "fwd"
            pts = fams.get((R, N, dtype, mode))
            if not pts:
                continue
            covered += 1
            if r.name != "masked_writer_sum_backward_mask":   # its time is in the accumulate call's cell
                ms += _interpolate(pts, W)
        if covered:
            out[phase] = (ms * trace.micro_repeats, covered, total)
    return out


@dataclass
class CalPoint:
    what: str
    modeled_ms: float
    measured_ms: float

    @property
    def ratio(self) -> float:
        return self.modeled_ms / self.measured_ms


def calibration_points(cal: dict, step_points: Optional[list] = None) -> list:
    """The model against the committed H200 measurements: ops cells, tune rows
    and (given) whole steps."""
    card = CARDS["h200"]
    pts = list(step_points or [])
    for cell in measured_op_cells():
        recs = trace_op_cell(cell)[cell["mode"]]
        pts.append(CalPoint(f"op {cell['case']} {cell['mode']} (R{cell['R']} W{cell['W']})",
                            model_step([(r, 1) for r in recs], card, cal)[0] * 1e3, cell["ms"]))
    for row in measured_tune_rows():
        R, W, N, dtype = row["R"], row["W"], row["N"], row["dtype"]
        if row["op"] == "fwd":
            c = [costs.masked_sum_forward(R, W, N, dtype, 90, config=row["config"])]
        else:
            c = [costs.masked_sum_backward_stack(R, W, N, dtype, torch.float32, 90, config=row["config"])]
        launches = [Launch(dram=x.dram_bytes, l2=x.l2_read, flops=x.flops, fastedge=True) for x in c]
        ms = sum(launch_time(x, card, cal) for x in launches) * 1e3
        pts.append(CalPoint(f"tune {row['op']} {row['shape']} {row['knobs']}", ms, row["ms"]))
    return pts


# -- the report ----------------------------------------------------------------------------------


def run(args, log=print) -> dict:
    spec = MODELS[args.model]
    batch = args.batch or spec["batch"]
    micro = args.micro_batch or (spec["micro_batch"] if not args.batch else min(args.batch, spec["micro_batch"]))
    seq = args.seq or spec["seq"]
    recompute = spec["recompute"] and not args.no_recompute
    card = dict(CARDS[args.card])
    cal = dict(CALIBRATION)
    t0 = time.perf_counter()
    bench = memory.FakeBench(args.model, spec["dtype"], args.layers, {})
    log(f"fake {args.model} built in {time.perf_counter() - t0:.1f} s")
    traces = {}
    for kind in ("fastedge", "floor"):
        traces[kind] = trace_step(bench, kind, micro, seq, batch, recompute, card["arch"])
        log(f"  traced {kind}: {len(traces[kind].records)} ops per micro-batch in {traces[kind].seconds:.1f} s")
    modeled = {k: model_step(step_records(tr), card, cal) for k, tr in traces.items()}
    meas = measured_steps()
    key = (args.model, "fastedge", recompute, batch, micro, seq)
    floor_key = (args.model, "floor", None, batch, micro, seq)
    h200 = args.card == "h200" and args.layers is None
    measured = {"fastedge": meas.get(key) if h200 else None, "floor": meas.get(floor_key) if h200 else None}
    notes = []
    if h200:
        cells = measured_op_cells()
        for phase, (ms, covered, total) in measured_phases(traces["fastedge"], cells).items():
            modeled["fastedge"][1][phase].measured_ms = ms
            notes.append(f"{phase}: {covered} of {total} calls per micro-batch matched")
            log(f"  measured {phase}: {ms:.1f} ms from the ops cells ({covered} of {total} calls covered)")
    tables = {}
    for kind, (total, rows) in modeled.items():
        tables[kind] = [dict(phase=r.phase, launches=r.launches, host_ops=r.host_ops, gb=r.dram_gb,
                             l2_gb=r.l2_gb, gflop=r.gflop, bound_ms=r.bound_ms, modeled_ms=r.modeled_ms,
                             measured_ms=r.measured_ms) for r in rows.values()]
    floor_ms, fastedge_ms = modeled["floor"][0] * 1e3, modeled["fastedge"][0] * 1e3
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), torch=torch.__version__,
                git_rev=results_csv.git_revision(), model=args.model, layers=bench.config.num_hidden_layers,
                dtype=str(spec["dtype"]).replace("torch.", ""), card=args.card, card_name=card["name"],
                batch=batch, micro_batch=micro, seq=seq, recompute_readers=recompute)
    cal_points = []
    if args.calibration:
        steps = [CalPoint(f"step {args.model} {k}" + (" (recompute_readers)" if k == "fastedge" and recompute
                                                       else ""), modeled[k][0] * 1e3, measured[k])
                 for k in ("floor", "fastedge") if measured[k]]
        other = meas.get((args.model, "fastedge", not recompute, batch, micro, seq)) if h200 else None
        if other:   # the other design was measured too (GPT-2 small): one more point
            tr = trace_step(bench, "fastedge", micro, seq, batch, not recompute, card["arch"])
            steps.append(CalPoint(f"step {args.model} fastedge" + ("" if recompute else " (recompute_readers)")
                                  + (" without recompute_readers" if recompute else ""),
                                  model_step(step_records(tr), card, cal)[0] * 1e3, other))
        cal_points = calibration_points(cal, steps) if h200 else []
    result = dict(meta=meta, floor_ms=floor_ms, fastedge_ms=fastedge_ms, ratio=fastedge_ms / floor_ms,
                  measured_floor_ms=measured["floor"], measured_fastedge_ms=measured["fastedge"],
                  tables=tables, calibration=CALIBRATION, card_spec=card,
                  calibration_points=[dict(what=p.what, modeled_ms=p.modeled_ms, measured_ms=p.measured_ms,
                                           ratio=p.ratio) for p in cal_points],
                  trace_s={k: tr.seconds for k, tr in traces.items()}, measured_notes=notes)
    result["markdown"] = markdown(result)
    return result


def _f(x, fmt) -> str:
    return "" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    m = res["meta"]
    L = [f"# Roofline of one pruning step: {m['model']} on {m['card_name']} (modeled)", "",
         f"- {m['date']}; git {m['git_rev']}; torch {m['torch']}; {m['layers']} layers, {m['dtype']}; batch "
         f"{m['batch']} in micro-batches of {m['micro_batch']}, seq {m['seq']}; recompute_readers="
         f"{m['recompute_readers']}",
         "- traced on fake tensors (bench/roofline.py): one micro-batch, counted x micro-batches; the update once",
         "- launches: kernels; host ops: ops the host dispatches (views included); GB: DRAM bytes moved "
         "(10^9); L2 GB: fastedge's re-reads from L2; bound ms: max(bytes/HBM, L2/L2 rate, FLOPs/peak) at "
         "the spec sheet; modeled ms: calibrated efficiencies, launch gaps and host time in a host/device "
         "stream (phases sum to the step)",
         f"- **modeled step: floor {res['floor_ms']:.1f} ms, fastedge {res['fastedge_ms']:.1f} ms "
         f"({res['ratio']:.2f}x the floor)**"
         + (f"; measured (H200, bench/results/step.csv): floor {res['measured_floor_ms']:.1f} ms, fastedge "
            f"{res['measured_fastedge_ms']:.1f} ms" if res["measured_fastedge_ms"] else ""), ""]
    for kind in ("fastedge", "floor"):
        rows = res["tables"][kind]
        L += [f"## {kind}", "", "| phase | launches | host ops | GB | L2 GB | GFLOP | bound ms | modeled ms "
              "| measured ms |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            if not (r["launches"] or r["host_ops"]):
                continue
            L.append(f"| {r['phase']} | {r['launches']:,} | {r['host_ops']:,} | {r['gb']:.1f} | {r['l2_gb']:.1f} | "
                     f"{r['gflop']:,.0f} | {r['bound_ms']:.1f} | {r['modeled_ms']:.1f} | "
                     f"{_f(r['measured_ms'], '.1f')} |")
        tot = {k: sum(r[k] for r in rows) for k in ("launches", "host_ops", "gb", "l2_gb", "gflop", "bound_ms",
                                                    "modeled_ms")}
        meas = res["measured_fastedge_ms"] if kind == "fastedge" else res["measured_floor_ms"]
        L.append(f"| **step** | {tot['launches']:,} | {tot['host_ops']:,} | {tot['gb']:.1f} | {tot['l2_gb']:.1f} | "
                 f"{tot['gflop']:,.0f} | {tot['bound_ms']:.1f} | {tot['modeled_ms']:.1f} | {_f(meas, '.1f')} |")
        if kind == "fastedge" and res["measured_notes"]:
            L.append("")
            L.append("Measured masked-sum rows: the H200 ops cells (bench/results/ops.csv, 2026-11-25: masked op, "
                     "the tiles of that run, 128-column forward, fp32 gradient buffer) interpolated in W at each "
                     "traced call with the readers, columns and dtype of a family of cells, x micro-batches; "
                     "calls of other shapes are left out ("
                     + "; ".join(res["measured_notes"]) + ").")
        L.append("")
    pts = res["calibration_points"]
    if pts:
        L += ["## Calibration: the model against the committed H200 measurements", "",
              "Ops cells: bench/results/ops.csv (2026-11-25, the tiles of that run; masked op, fp32 "
              "gradient buffer; host and device); tune rows: tune-nvidia-h200-*.log (forward and stack "
              "backward launches alone, fp32 dx; device time); steps: step.csv (2026-11-26).", "",
              "| point | modeled ms | measured ms | modeled / measured |", "|---|--:|--:|--:|"]
        L += [f"| {p['what']} | {p['modeled_ms']:.3g} | {p['measured_ms']:.3g} | {p['ratio']:.2f} |" for p in pts]
        L += [""]
        for group in ("step", "op", "tune"):
            g = [p for p in pts if p["what"].startswith(group + " ")]
            if not g:
                continue
            logs = sorted(abs(math.log(p["ratio"])) for p in g)
            worst = max(g, key=lambda p: abs(math.log(p["ratio"])))
            L.append(f"- {group} points ({len(g)}): median error {_pct(logs[len(logs) // 2])}, worst "
                     f"{worst['what']} at {worst['ratio']:.2f}x")
        L.append("")
    L += ["Constants (bench/roofline.py CALIBRATION): " + ", ".join(f"{k} {v:g}" for k, v in res["calibration"].items()),
          ""]
    return "\n".join(L)


def _pct(log_err: float) -> str:
    return f"{(math.exp(log_err) - 1) * 100:.0f}%"


COLUMNS = ["date", "torch", "git_rev", "model", "layers", "dtype", "card", "batch", "micro_batch", "seq",
           "recompute_readers", "kind", "phase", "launches", "host_ops", "gb", "l2_gb", "gflop", "bound_ms",
           "modeled_ms", "measured_ms"]


def csv_rows(res: dict) -> list:
    rows = []
    for kind, table in res["tables"].items():
        for r in table:
            rows.append(dict(res["meta"], kind=kind, **{k: r[k] for k in r}))
        rows.append(dict(res["meta"], kind=kind, phase="step", modeled_ms=res[f"{kind}_ms"],
                         measured_ms=res[f"measured_{kind}_ms"],
                         launches=sum(r["launches"] for r in table), host_ops=sum(r["host_ops"] for r in table),
                         gb=sum(r["gb"] for r in table), l2_gb=sum(r["l2_gb"] for r in table),
                         gflop=sum(r["gflop"] for r in table), bound_ms=sum(r["bound_ms"] for r in table)))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="codellama-13b", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check; no measurements)")
    p.add_argument("--card", default="h200", choices=sorted(CARDS))
    p.add_argument("--no-recompute", action="store_true", help="trace fastedge without recompute_readers")
    p.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="skip the table of the model against the H200 measurements")
    p.add_argument("--json", default=None, help="write the tables, floor_ms and fastedge_ms here")
    p.add_argument("--out", default=None, help="results folder (default $OUT, else bench/results)")
    p.add_argument("--no-save", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    res = run(args)
    print(res["markdown"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=1,
                                              default=str))
    if not args.no_save:
        out = Path(args.out or os.environ.get("OUT") or RESULTS)
        out.mkdir(parents=True, exist_ok=True)
        results_csv.append_csv(out / "roofline.csv", csv_rows(res), COLUMNS, results_csv.significant(5))
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        md = out / f"roofline-{args.model}-{args.card}-{stamp}.md"
        md.write_text(res["markdown"])
        print(f"wrote {out / 'roofline.csv'} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
