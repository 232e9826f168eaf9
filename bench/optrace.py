"""Every op of a pruning step, traced on fake tensors: phase, launches, host
ops, bytes and FLOPs (bench/roofline.py models their time).

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
they take the phase of their autograd node, which `NodeTagger` (a
TorchFunctionMode around the step) tags with the phase of the forward call
that created it (`Node.metadata`, read back through
`torch._C._current_autograd_node()`). Python backward formulas (fastedge's
ops, `_StackWrite`, `_RowChunked`) and the checkpoint's recomputation do
have their frames on the stack. A masked-sum op is "forward", "recompute"
(inside a checkpoint recomputation) or "backward" (any other op run by the
engine). fastedge's fused op is split: its sampling launches count under
"node and edge sampling", its forward launch under the masked sum. What no
rule claims is "other"; the test checks that "other" stays small.
"""
from __future__ import annotations

import linecache
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
from fastedge.kernels import costs  # noqa: E402

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
    if q in ("Rotary.__call__", "Rotary.prepare"):
        return "attention"
    if q == "attention_heads":
        if "_project(" in line:
            return "q/k/v projections"
        if "_per_head_matmul(attn" in line or "o_b" in line:
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
            if name in ("norm", "norm_backward"):
                self.records.append(OpRecord(name, "reader norms", True, launches))
            elif name in ("sample_masks", "sample_masks_backward", "hard_concrete", "hard_concrete_backward"):
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
               arch: int, overrides: Optional[dict] = None) -> Trace:
    """One micro-batch of a `kind` step ("fastedge" or "floor") and, for
    fastedge, the optimizer update, recorded op by op on fake tensors.
    `overrides`: the cost contracts' knobs (`kernels.costs.custom_op_costs`)."""
    if batch % micro_batch:
        raise SystemExit(f"batch {batch} is not a multiple of the micro-batch {micro_batch}")
    t0 = time.perf_counter()
    vocab = bench.config.vocab_size
    rec = OpRecorder(arch=arch, overrides=overrides)
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
