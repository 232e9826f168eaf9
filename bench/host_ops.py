"""Host-side ops of a pruning step, per layer: what the CPU issues, counted.

What is counted
---------------
A GPU step of a small or medium model is bounded by the host when the host
issues more ops than the device can finish: every op the dispatcher reaches
costs host time (Python, dispatch, launch) whatever its size. This counts
them, so that a change to the host side can be judged without a GPU.

`OpCounter` is a `TorchDispatchMode`: it sees every op that reaches the
dispatcher's Python key, which is what a step launches or allocates through
(views and other metadata-only ops included: they cost host time too). It
counts ops as they arrive, without looking inside them:

* an aten op counts once; composite ops that PyTorch decomposes before the
  dispatcher's Python key (``einsum``, ``split``, ...) appear as the ops they
  decompose into, which is what runs;
* a fastedge custom op (``fastedge::*``) counts once, and the ops its
  implementation runs inside are not counted (a dispatch mode is switched off
  while its handler runs): on a GPU they are one kernel, or a few, behind one
  Python call;
* nothing else: queries such as ``prim::device``, which reach the mode only
  for tensor subclasses (fake tensors answer ``.device`` through it), are not
  ops a step issues and are left out, so real and fake tensors count alike.

One pruning step here is the masked model's forward (clean and corrupted
runs), the loss (KL at the last position plus the Lagrangian sparsity term,
as `bench/pruning_step.py`) and the backward into the masks; the optimizer's
update is left out (a fixed number of ops, whatever the depth). The model has
node masks (the `fastedge.patch` and `fastedge.prune` default) unless
``--no-node-masks``, and runs in training mode with a fixed seed.

Per layer: the step is counted at two depths L1 < L2 of the same model, and
ops per layer are ``(count(L2) - count(L1)) / (L2 - L1)``: what one more
layer adds, free of the fixed cost (embedding, unembedding, loss). The total
is the whole step at depth L2.

Host time per layer (``--time``, real tensors only): the same difference of
forward-plus-backward CPU times of the process (each depth's fastest of
``--repeats`` steps, the two depths alternating; CPU time, not wall time,
so that waiting for a core on a shared machine does not count), on shapes
so small that the arithmetic is negligible: what the host spends per layer. On the CPU this includes
what fastedge's ops run inside them (the ``torch`` backend draws the Philox
noise with some 270 PyTorch ops per call), which a GPU backend runs as one
kernel: the op counts are the better guide to a GPU's host cost, and the
time outside fastedge's ops (``host_ms_per_layer_outside_ops``: the time
inside them, measured in separate steps, subtracted) the closer one.
It is a CPU timing on whatever machine runs it (shared machines are still
noisy: caches and memory bandwidth are shared), with one torch thread unless
``--threads``.

Models: ``small-llama`` (a 4-layer Llama, hidden 128, grouped k/v heads, on
real CPU tensors) and ``gpt2-small`` (GPT-2 small's shape, 12 layers, on fake
tensors by default: nothing allocated). ``--tensors real`` runs GPT-2 small
on real tensors at the given (small) batch.

Output: one CSV row per (model, recompute_readers) appended to
``<out>/host_ops.csv`` with the git revision (`results_csv`); ``<out>`` is
``--out``, else ``$OUT``, else ``bench/results``.

    python bench/host_ops.py                         # both models, with and without recompute_readers
    python bench/host_ops.py --models small-llama --time --top 25
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import pruning_step as ps  # noqa: E402
import results_csv  # noqa: E402

__all__ = ["OpCounter", "StepOps", "count_step", "per_layer", "small_llama_config", "MODELS"]

CUSTOM_NAMESPACE = "fastedge"
COUNTED_NAMESPACES = ("aten", CUSTOM_NAMESPACE)


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, by name (``aten::add.Tensor``,
    ``fastedge::masked_writer_sum``); a custom op counts once, its insides
    not at all (module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COUNTED_NAMESPACES:
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def _namespace(op_name: str) -> str:
    return op_name.split("::", 1)[0]


@dataclass
class StepOps:
    """Ops of one step by phase; `aten` and `custom` count the two kinds."""
    forward: Counter = field(default_factory=Counter)
    backward: Counter = field(default_factory=Counter)

    def phase(self, name: str) -> Counter:
        return {"forward": self.forward, "backward": self.backward,
                "step": self.forward + self.backward}[name]

    def aten(self, phase: str = "step") -> int:
        return sum(n for op, n in self.phase(phase).items() if _namespace(op) != CUSTOM_NAMESPACE)

    def custom(self, phase: str = "step") -> int:
        return sum(n for op, n in self.phase(phase).items() if _namespace(op) == CUSTOM_NAMESPACE)


def count_step(model: torch.nn.Module, ids: torch.Tensor, corrupted: torch.Tensor, *,
               recompute_readers: bool, node_masks: bool = True, seed: int = 0) -> StepOps:
    """The ops of one pruning step's forward (with the loss) and backward on
    `model` (patched here, unpatched before returning)."""
    import fastedge
    em = fastedge.patch(model, node_masks=node_masks, recompute_readers=recompute_readers)
    try:
        em.train()
        full = torch.zeros(ids.shape[0], model.config.vocab_size, device=ids.device).log_softmax(-1)
        ops = StepOps()
        with OpCounter() as counter:
            loss = ps._loss(em(ids, corrupted, seed=seed), full)
        ops.forward = counter.counts
        with OpCounter() as counter:
            loss.backward()
        ops.backward = counter.counts
        return ops
    finally:
        em.unpatch()


def per_layer(shallow: Counter, deep: Counter, layers: int) -> dict[str, float]:
    """Ops per layer by name: ``(deep - shallow) / layers``, names with a nonzero difference."""
    names = set(shallow) | set(deep)
    out = {n: (deep.get(n, 0) - shallow.get(n, 0)) / layers for n in names}
    return {n: v for n, v in out.items() if v}


# -- models ----------------------------------------------------------------------------


def small_llama_config(n_layers: Optional[int] = None):
    """A small Llama (grouped k/v heads) whose arithmetic is negligible on a CPU:
    bench/memory.py's tiny Llama with 2 k/v heads, 4 layers by default."""
    import memory
    return memory.tiny_llama_config(n_layers or 4, n_kv_heads=2)


def _gpt2_small_config(n_layers: Optional[int] = None):
    cfg = ps.gpt2_small_config()
    if n_layers:
        cfg.n_layer = n_layers
    return cfg


# name: (config(n_layers), default depths (L1, L2), default tensors)
MODELS = {"small-llama": (small_llama_config, (2, 4), "real"),
          "gpt2-small": (_gpt2_small_config, (6, 12), "fake")}


def _build(name: str, n_layers: int, fake_mode):
    from transformers import AutoModelForCausalLM
    cfg = MODELS[name][0](n_layers)
    torch.manual_seed(0)
    with (fake_mode or nullcontext()), torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval().requires_grad_(False), cfg


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def measure(name: str, depths: tuple[int, int], tensors: str, batch: int, seq: int,
            recompute_readers: bool, node_masks: bool) -> tuple[StepOps, StepOps]:
    """The step's ops at the two depths."""
    out = []
    for n_layers in depths:
        fake = _fake_mode() if tensors == "fake" else None
        model, cfg = _build(name, n_layers, fake)
        with (fake or nullcontext()):
            ids, corrupted = ps.random_batch(cfg.vocab_size, batch, seq, "cpu")
            out.append(count_step(model, ids, corrupted, recompute_readers=recompute_readers,
                                  node_masks=node_masks))
    return out[0], out[1]


class _CustomOpTimer(TorchDispatchMode):
    """CPU time (ms) spent inside fastedge's ops; other ops run untimed."""

    def __init__(self):
        super().__init__()
        self.ms = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != CUSTOM_NAMESPACE:
            return func(*args, **(kwargs or {}))
        t0 = time.process_time()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.ms += (time.process_time() - t0) * 1e3


def host_ms_per_layer(name: str, depths: tuple[int, int], batch: int, seq: int, recompute_readers: bool,
                      node_masks: bool, repeats: int) -> tuple[float, float, list[float]]:
    """Forward + backward host time per layer (ms) from the two depths, the
    same without the time spent inside fastedge's ops, and the time of a step
    at each depth. Host time is the process's CPU time (not wall time: on a
    shared, busy CPU a step waits for a core, and the wait is not host work),
    each depth's fastest step, the two models' steps alternating. The time
    inside fastedge's ops is measured in separate steps under
    `_CustomOpTimer` (its own overhead falls on the other ops, outside what
    it measures) and subtracted."""
    import fastedge
    steps = []
    for n_layers in depths:
        model, cfg = _build(name, n_layers, None)
        ids, corrupted = ps.random_batch(cfg.vocab_size, batch, seq, "cpu")
        full = torch.zeros(batch, cfg.vocab_size).log_softmax(-1)
        em = fastedge.patch(model, node_masks=node_masks, recompute_readers=recompute_readers)
        em.train()
        steps.append((em, ids, corrupted, full))
    samples: list[list[float]] = [[] for _ in depths]
    inside: list[list[float]] = [[] for _ in depths]
    try:
        for i in range(repeats + 2):  # two warm-up rounds
            for j, (em, ids, corrupted, full) in enumerate(steps):
                t0 = time.process_time()
                ps._loss(em(ids, corrupted, seed=i), full).backward()
                dt = (time.process_time() - t0) * 1e3
                em.zero_grad(set_to_none=True)
                with _CustomOpTimer() as timer:
                    ps._loss(em(ids, corrupted, seed=i), full).backward()
                em.zero_grad(set_to_none=True)
                if i >= 2:
                    samples[j].append(dt)
                    inside[j].append(timer.ms)
    finally:
        for em, *_ in steps:
            em.unpatch()
    best = [min(s) for s in samples]
    outside = [b - min(t) for b, t in zip(best, inside)]
    dl = depths[1] - depths[0]
    return (best[1] - best[0]) / dl, (outside[1] - outside[0]) / dl, best


# -- output ----------------------------------------------------------------------------

COLUMNS = ["date", "torch", "git_rev", "model", "tensors", "batch", "seq", "node_masks",
           "recompute_readers", "depths", "aten_per_layer", "fwd_aten_per_layer", "bwd_aten_per_layer",
           "custom_per_layer", "aten_total", "custom_total", "host_ms_per_layer", "host_ms_per_layer_outside_ops",
           "host_ms_steps",
           "device"]


def _fmt(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.2f}"


def run(args) -> list[dict]:
    rows = []
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rev = results_csv.git_revision()
    for name in args.models:
        _, default_depths, default_tensors = MODELS[name]
        depths = tuple(args.depths) if args.depths else default_depths
        tensors = args.tensors or default_tensors
        for recompute in args.recompute:
            shallow, deep = measure(name, depths, tensors, args.batch, args.seq, recompute,
                                    not args.no_node_masks)
            dl = depths[1] - depths[0]
            by_phase = {ph: per_layer(shallow.phase(ph), deep.phase(ph), dl)
                        for ph in ("forward", "backward", "step")}

            def total(ph, custom):
                return sum(v for op, v in by_phase[ph].items()
                           if (_namespace(op) == CUSTOM_NAMESPACE) == custom)
            row = dict(date=date, torch=torch.__version__, git_rev=rev, model=name, tensors=tensors,
                       batch=args.batch, seq=args.seq, node_masks=not args.no_node_masks,
                       recompute_readers=recompute, depths=f"{depths[0]}/{depths[1]}",
                       aten_per_layer=total("step", False), fwd_aten_per_layer=total("forward", False),
                       bwd_aten_per_layer=total("backward", False), custom_per_layer=total("step", True),
                       aten_total=deep.aten(), custom_total=deep.custom(),
                       device=results_csv.device_name(torch.device("cpu")))
            if args.time and tensors == "real":
                ms, outside, best = host_ms_per_layer(name, depths, args.batch, args.seq, recompute,
                                                      not args.no_node_masks, args.repeats)
                row["host_ms_per_layer"] = round(ms, 3)
                row["host_ms_per_layer_outside_ops"] = round(outside, 3)
                row["host_ms_steps"] = "/".join(f"{m:.2f}" for m in best)
            rows.append(row)
            print(f"{name} ({tensors}, batch {args.batch} x {args.seq}, recompute_readers={recompute}, "
                  f"node masks {'on' if row['node_masks'] else 'off'}): per layer "
                  f"{_fmt(row['aten_per_layer'])} aten ops (forward {_fmt(row['fwd_aten_per_layer'])}, "
                  f"backward {_fmt(row['bwd_aten_per_layer'])}) + {_fmt(row['custom_per_layer'])} fastedge ops; "
                  f"step at {depths[1]} layers: {row['aten_total']} aten + {row['custom_total']} fastedge"
                  + (f"; host {row['host_ms_per_layer']:.2f} ms per layer, "
                     f"{row['host_ms_per_layer_outside_ops']:.2f} outside fastedge's ops "
                     f"(CPU; steps {row['host_ms_steps']} ms)"
                     if row.get("host_ms_per_layer") is not None else ""))
            if args.top:
                top = sorted(by_phase["step"].items(), key=lambda kv: -abs(kv[1]))[:args.top]
                for op, n in top:
                    print(f"    {_fmt(n):>8}  {op}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="the two depths L1,L2 (default per model)")
    p.add_argument("--tensors", choices=("real", "fake"), default=None, help="default per model")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--recompute", choices=("off", "on", "both"), default="both")
    p.add_argument("--no-node-masks", action="store_true")
    p.add_argument("--time", action="store_true", help="host ms per layer (real tensors only)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the shapes are tiny, and OpenMP spinning on a "
                        "shared CPU adds noise to the timing)")
    p.add_argument("--top", type=int, default=0, help="print the N most frequent ops per layer")
    p.add_argument("--out", default=None)
    p.add_argument("--no-record", action="store_true", help="print only; append nothing")
    args = p.parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.depths is not None and (len(args.depths) != 2 or not 0 < args.depths[0] < args.depths[1]):
        p.error("--depths takes two depths L1,L2 with 0 < L1 < L2")
    args.recompute = {"off": [False], "on": [True], "both": [False, True]}[args.recompute]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    if not args.no_record:
        out = Path(args.out or os.environ.get("OUT") or BENCH_DIR / "results")
        results_csv.append_csv(out / "host_ops.csv", rows, COLUMNS, results_csv.significant(6))
        print(f"appended {len(rows)} rows to {out / 'host_ops.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
