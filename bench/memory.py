"""Peak memory of one pruning step, sized on fake tensors (nothing allocated).

What is measured
----------------
The model (CodeLlama-13B shape by default: 40 layers, 40 heads, hidden
5,120, bf16 weights, random; nothing downloaded) is built under PyTorch's
`FakeTensorMode`, so its 26 GB of weights exist as metadata only. One
pruning step (bench/pruning_step.py: corrupted pass, masked forward, KL +
Lagrangian loss, backward into the masks, AdamW update, with its optimizer
state) runs on fake tensors under `bench/memtrack.py`'s `LiveTensorTracker`,
which counts every live tensor storage by its size, op by op. Reported per
(design, micro-batch, seq): the weights and what else existed before the step
(inputs, masks, the KL targets: "before"), the peak above that ("step") and
the peak of everything live ("peak total"). Designs:

* ``fastedge``: `fastedge.patch` with ``recompute_readers=True`` (reader
  inputs recomputed in the backward);
* ``fastedge-norecompute``: the same with ``recompute_readers=False``;
* ``naive``: the authors' design (bench/naive_model.py).

The fake tensors are CPU tensors: this PyTorch build cannot fake CUDA
tensors (indexing and autograd need the CUDA runtime), so SDPA takes its CPU
kernel's memory (output and logsumexp, like CUDA's flash / memory-efficient
kernels). Not seen: what a kernel or a custom op allocates inside itself
(cuBLAS and SDPA workspaces, fastedge's kernels' scratch), the CUDA context,
allocator rounding beyond 512-byte blocks and fragmentation. A budget
therefore keeps headroom: a card of C GB is taken to offer
``C - headroom_gib GiB - headroom_frac * C`` (default 1.5 GiB + 5%), with C
the nominal 80 GB and 141 GB as decimal gigabytes (10^9 bytes; the cards
expose a little more).

The search
----------
A 40-layer step takes tens of seconds to trace on a CPU, so the limits come
from a fit: for a fixed model the step's memory is affine in the token count
``batch * seq`` (every activation is per token; the attention scores of
the fused SDPA kernel are never stored). `fit` traces a few points with
different batch and seq, fits ``peak_total = a + b * tokens`` and reports the
largest relative residual. The largest micro-batch at a seq and the largest
batch for each seq of a grid follow; each predicted limit at seq 72 is then
traced (it must fit, and one more must not), and so is the grid's limit at
the longest seq that fits. The paper's setting (effective batch 32 in
micro-batches, seq 72) is traced as a whole step.

Run time: the default run (CodeLlama-13B, three designs, the search and
its verification) traces dozens of 40-layer steps and takes over 15 minutes
on this project's CPU machine (2 cores shared with other jobs; issue 12).
``--no-search --no-verify`` traces only the ``--micro-batch`` points (a
few minutes), ``--designs fastedge`` one design, ``--quick`` a tiny Llama
(seconds).

Output: rows appended to ``<out>/memory.csv`` (date, torch version, git
revision) and a markdown report ``<out>/memory-<model>-<date>.md``; ``<out>``
is ``--out``, else ``$OUT``, else ``bench/results``.

    python bench/memory.py                                  # CodeLlama-13B, all designs, limits (15+ minutes)
    python bench/memory.py --designs fastedge --micro-batch 1,8,32 --no-search
    python bench/memory.py --model gpt2-small --seq 64
    python bench/memory.py --quick                          # a tiny Llama, small budgets (seconds)
    python bench/memory.py --model llama-3-70b --ranks 8 --card h100-80gb   # one rank of sharded pruning

``--ranks N`` traces one rank of N of sharded pruning (`fastedge.sharding`,
FSDP2) instead: bench/memory_sharded.py says how; ``--model`` may then be a
comma list (llama-3-70b, codellama-34b, qwen2-72b, or the shapes above) and
``--card`` names the cards (h100-80gb, h200-141gb) or gives GB.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import pruning_step as ps  # noqa: E402
import results_csv  # noqa: E402
from memtrack import LiveTensorTracker  # noqa: E402
from memory_sharded import CARDS, LARGE_CONFIGS  # noqa: E402

GB = 1e9
GIB = 2 ** 30
DESIGNS = {"fastedge": ("fastedge", True), "fastedge-norecompute": ("fastedge", False),
           "naive": ("naive", True)}
DEFAULT_GRID = (64, 72, 128, 256, 512, 1024, 2048)


def tiny_llama_config(n_layers: Optional[int] = None, n_kv_heads: int = 4):
    """--quick: a 2-layer Llama small enough to trace in a second (hidden 128,
    4 heads; `n_kv_heads` < 4 for grouped k/v heads)."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=503, hidden_size=128, intermediate_size=344,
                      num_hidden_layers=n_layers or 2, num_attention_heads=4, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


CONFIGS = {"codellama-13b": ps.codellama_13b_config, "gpt2-small": ps.gpt2_small_config,
           "tiny-llama": tiny_llama_config, **LARGE_CONFIGS}


@dataclass
class Point:
    design: str
    batch: int
    micro_batch: int
    seq: int
    before: int            # bytes live before the step: weights, masks, inputs, KL targets
    weights: int           # the frozen model's parameters
    step: int              # peak above `before`
    total: int             # peak of everything live
    seconds: float
    breakdown: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq


class FakeBench:
    """One fake model; traces steps of any design on it."""

    def __init__(self, model_name: str, dtype: torch.dtype, n_layers: Optional[int] = None,
                 patch_kwargs: Optional[dict] = None):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers import AutoModelForCausalLM
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.patch_kwargs = dict(patch_kwargs or {})
        cfg = CONFIGS[model_name](n_layers) if n_layers else CONFIGS[model_name]()
        self.config = cfg
        with self.mode, torch.device("cpu"):
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
        self.weights = sum(p.untyped_storage().nbytes() for p in
                           {p.untyped_storage()._cdata: p for p in self.model.parameters()}.values())

    def trace(self, design: str, micro_batch: int, seq: int, batch: Optional[int] = None,
              breakdown: bool = False) -> Point:
        kind, recompute = DESIGNS[design]
        batch = batch or micro_batch
        vocab = self.config.vocab_size
        t0 = time.perf_counter()
        with self.mode:
            ids, corrupted = ps.random_batch(vocab, batch, seq, "cpu")
            full = torch.zeros(batch, vocab).log_softmax(-1)
            masked = None
            try:
                fn, masked = _step_fn(kind, self.model, ids, corrupted, full, micro_batch, recompute,
                                      self.patch_kwargs)
                with LiveTensorTracker(self.model, masked, ids, corrupted, full, round_to=512,
                                       record_peak=breakdown) as t:
                    fn()
            finally:
                if masked is not None and hasattr(masked, "unpatch"):
                    masked.unpatch()
                self.model.requires_grad_(False)
                fn = masked = None
        return Point(design, batch, micro_batch, seq, t.baseline_bytes, self.weights, t.peak_bytes,
                     t.peak_total_bytes, time.perf_counter() - t0,
                     t.peak_breakdown(12) if breakdown else [])


def _step_fn(kind, model, ids, corrupted, full, micro_batch, recompute, patch_kwargs):
    """bench/pruning_step.step_fn, with two changes for fake tensors: fastedge
    runs with a fixed seed (its step counter cannot be read from a fake
    tensor), and extra `fastedge.patch` options (patch_kwargs) are passed."""
    if kind == "fastedge" and patch_kwargs:
        import fastedge
        em = fastedge.patch(model, node_masks=False, recompute_readers=recompute, **patch_kwargs)
        em.train()
        opt = ps.make_optimizer(em)
        fn = (lambda: ps.pruning_step(em, opt, ids, corrupted, full, micro_batch))
        masked = em
    else:
        fn, masked = ps.step_fn(kind, model, ids, corrupted, full, micro_batch, recompute)
    if kind == "fastedge":
        masked.forward = functools.partial(masked.forward, seed=0)
    return fn, masked


# -- the fit and the limits --------------------------------------------------------------


@dataclass
class Fit:
    a: float        # bytes at zero tokens (weights, masks, optimizer state, ...)
    b: float        # bytes per token
    max_rel_residual: float
    points: list

    def predict(self, tokens: int) -> float:
        return self.a + self.b * tokens

    def max_tokens(self, usable: float) -> int:
        return max(0, math.floor((usable - self.a) / self.b))


def fit_affine(points: list[Point]) -> Fit:
    xs = [float(p.tokens) for p in points]
    ys = [float(p.total) for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    res = max(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    return Fit(a, b, res, list(points))


def usable_bytes(card_gb: float, headroom_gib: float, headroom_frac: float) -> float:
    return card_gb * GB - headroom_gib * GIB - headroom_frac * card_gb * GB


@dataclass
class Limit:
    design: str
    card_gb: float
    usable: float
    seq: int
    max_batch: int          # largest (micro-)batch at seq predicted by the fit (0: none fits)
    predicted_total: float  # at max_batch (or at batch 1 when none fits)
    traced: Optional[Point] = None        # max_batch traced
    traced_next: Optional[Point] = None   # max_batch + 1 traced
    kind: str = "micro"     # "micro": largest micro-batch at the paper's seq; "grid": batch x seq


def search_micro(bench: FakeBench, fit: Fit, design: str, card_gb: float, usable: float, seq: int,
                 verify: bool, log) -> Limit:
    """Largest micro-batch at `seq` from the fit, then traced: it must fit and
    one more must not; if a trace disagrees with the fit, step until both hold."""
    m = fit.max_tokens(usable) // seq
    lim = Limit(design, card_gb, usable, seq, m, fit.predict(max(m, 1) * seq))
    if not verify:
        return lim
    for _ in range(8):
        below = bench.trace(design, m, seq) if m >= 1 else None
        above = bench.trace(design, m + 1, seq)
        log(f"    verify {design} @ {card_gb:g} GB: micro {m}: "
            f"{'-' if below is None else f'{below.total / GB:.2f} GB'}, micro {m + 1}: {above.total / GB:.2f} GB "
            f"(usable {usable / GB:.2f} GB)")
        if below is not None and below.total > usable:
            m -= 1
            continue
        if above.total <= usable:
            m += 1
            continue
        lim.max_batch, lim.traced, lim.traced_next = m, below, above
        lim.predicted_total = fit.predict(max(m, 1) * seq)
        return lim
    raise RuntimeError("the micro-batch search did not settle; the fit is far off")


def grid_limits(fit: Fit, design: str, card_gb: float, usable: float, seqs) -> list[Limit]:
    out = []
    for s in seqs:
        b = fit.max_tokens(usable) // s
        out.append(Limit(design, card_gb, usable, s, b, fit.predict(max(b, 1) * s), kind="grid"))
    return out


# -- output ------------------------------------------------------------------------------------


COLUMNS = ["date", "torch", "transformers", "git_rev", "model", "layers", "dtype", "what", "design",
           "batch", "micro_batch", "seq", "tokens", "weights_gb", "before_gb", "step_gb", "peak_total_gb",
           "fit_gb", "card_gb", "usable_gb", "max_batch", "fits", "trace_s", "options", "device",
           "device_step_gb", "device_peak_total_gb", "device_reserved_gb", "note"]


def point_row(p: Point, meta: dict, fit: Optional[Fit], usable: dict, what: str = "point") -> dict:
    row = dict(meta, what=what, design=p.design, batch=p.batch, micro_batch=p.micro_batch, seq=p.seq,
               tokens=p.tokens, weights_gb=p.weights / GB, before_gb=p.before / GB, step_gb=p.step / GB,
               peak_total_gb=p.total / GB, trace_s=p.seconds)
    if fit is not None:
        row["fit_gb"] = fit.predict(p.tokens) / GB
    row["fits"] = " ".join(f"{c:g}:{'yes' if p.total <= u else 'no'}" for c, u in usable.items())
    return row


def limit_row(lim: Limit, meta: dict) -> dict:
    row = dict(meta, what=f"limit-{lim.kind}", design=lim.design, seq=lim.seq, card_gb=lim.card_gb,
               usable_gb=lim.usable / GB, max_batch=lim.max_batch, micro_batch=lim.max_batch,
               batch=lim.max_batch, tokens=lim.max_batch * lim.seq, fit_gb=lim.predicted_total / GB)
    if lim.traced is not None:
        row["peak_total_gb"] = lim.traced.total / GB
        row["note"] = (f"traced: {lim.max_batch} -> {lim.traced.total / GB:.2f} GB, "
                       f"{lim.max_batch + 1} -> {lim.traced_next.total / GB:.2f} GB")
    elif lim.traced_next is not None:
        row["note"] = f"traced: 1 -> {lim.traced_next.total / GB:.2f} GB (nothing fits)"
    return row


def append_csv(path: Path, rows: list[dict]) -> None:
    results_csv.append_csv(path, rows, COLUMNS, results_csv.significant(5))


UNIT = [GB, "GB"]   # the markdown's unit: MB for --quick


def _card(card_gb: float) -> str:
    return f"{card_gb * GB / UNIT[0]:g}"


def _gb(x) -> str:
    return "" if x is None else f"{x / UNIT[0]:.2f}"


def markdown(meta: dict, args, points: list[Point], fits: dict, limits: list[Limit],
             setting: list[Point], usable: dict) -> str:
    U, unit = UNIT[1], UNIT[0]
    cards = list(usable)
    fits_hdr = " | ".join(f"fits {_card(c)} {U}" for c in cards)
    L = [f"# Peak memory of one pruning step: {meta['model']} ({meta['layers']} layers, {meta['dtype']})", "",
         f"- date {meta['date']}; torch {meta['torch']}; transformers {meta['transformers']}; "
         f"git {meta['git_rev']}; options {meta['options'] or 'defaults'}",
         "- traced on fake tensors (FakeTensorMode, CPU fake device) with bench/memtrack.py: every live "
         "tensor storage, 512-byte rounded; kernels' internal scratch, the CUDA context and fragmentation "
         "are not counted",
         "- step: bench/pruning_step.py (corrupted pass, masked forward, KL + Lagrangian, backward, AdamW "
         "with its state); 'before': weights, masks, inputs and KL targets; 'step': the peak above that",
         "- budgets: " + ", ".join(f"{_card(c)} {U} card -> {u / unit:.2f} {U} usable" for c, u in usable.items())
         + f" (headroom {args.headroom_gib:g} GiB + {args.headroom_frac:.0%} of the card; "
         f"{U} = {unit:.0e} bytes)",
         "", "## Peak per design (traced)", "",
         f"| design | batch | micro-batch | seq | weights {U} | before {U} | step {U} | peak total {U} "
         f"| fit {U} | {fits_hdr} | trace s |",
         "|---|--:|--:|--:|--:|--:|--:|--:|--:|" + "--|" * len(cards) + "--:|"]
    for p in points:
        f = fits.get(p.design)
        L.append(f"| {p.design} | {p.batch} | {p.micro_batch} | {p.seq} | {_gb(p.weights)} | {_gb(p.before)} "
                 f"| {_gb(p.step)} | {_gb(p.total)} | {_gb(f.predict(p.tokens)) if f else ''} | "
                 + " | ".join("yes" if p.total <= u else "no" for u in usable.values())
                 + f" | {p.seconds:.0f} |")
    if fits:
        L += ["", "## Fit: peak total = a + b * (micro-batch x seq)", "",
              f"| design | a {U} | b MB per token | points (micro-batch x seq) | largest relative residual |",
              "|---|--:|--:|--|--:|"]
        for d, f in fits.items():
            pts = ", ".join(f"{p.micro_batch}x{p.seq}" for p in f.points)
            L.append(f"| {d} | {f.a / unit:.3f} | {f.b / 1e6:.4f} | {pts} | {f.max_rel_residual:.1e} |")
    micro = [x for x in limits if x.kind == "micro"]
    if micro:
        L += ["", f"## Largest micro-batch at seq {args.seq}", "",
              f"| design | card {U} | usable {U} | largest micro-batch | fit {U} at it | traced {U} at it "
              f"| traced {U} at one more |", "|---|--:|--:|--:|--:|--:|--:|"]
        for x in micro:
            L.append(f"| {x.design} | {_card(x.card_gb)} | {x.usable / unit:.2f} | {x.max_batch} "
                     f"| {x.predicted_total / unit:.2f} | {_gb(x.traced.total) if x.traced else ''} "
                     f"| {_gb(x.traced_next.total) if x.traced_next else ''} |")
    grid = [x for x in limits if x.kind == "grid"]
    if grid:
        seqs = sorted({x.seq for x in grid})
        L += ["", "## Largest batch per seq (from the fit; micro-batch = batch)", "",
              f"| design | card {U} | " + " | ".join(f"seq {s}" for s in seqs) + " | most tokens |",
              "|---|--:|" + "--:|" * len(seqs) + "--:|"]
        for d in dict.fromkeys(x.design for x in grid):
            for c in cards:
                row = {x.seq: x for x in grid if x.design == d and x.card_gb == c}
                best = max(row.values(), key=lambda x: (x.max_batch * x.seq, x.seq))
                L.append(f"| {d} | {_card(c)} | " + " | ".join(
                    f"{row[s].max_batch}" + (" (traced)" if row[s].traced else "") for s in seqs)
                    + (f" | {best.max_batch} x {best.seq} = {best.max_batch * best.seq} |" if best.max_batch
                       else " | none |"))
        for x in grid:
            if x.traced is not None:
                L.append(f"\nTraced: {x.design}, {_card(x.card_gb)} {U} card, seq {x.seq}: batch {x.max_batch} "
                         f"-> {_gb(x.traced.total)} {U} (fit {_gb(x.predicted_total)}), batch "
                         f"{x.max_batch + 1} -> {_gb(x.traced_next.total)} {U}.")
    if setting:
        L += ["", "## The paper's setting, traced as a whole step", "",
              f"| design | batch | micro-batch | seq | peak total {U} | {fits_hdr} |",
              "|---|--:|--:|--:|--:|" + "--|" * len(cards)]
        for p in setting:
            L.append(f"| {p.design} | {p.batch} | {p.micro_batch} | {p.seq} | {_gb(p.total)} | "
                     + " | ".join("yes" if p.total <= u else "no" for u in usable.values()) + " |")
    bd = [p for p in points if p.breakdown]
    if bd:
        L += ["", "## What is live at the peak", ""]
        for p in bd:
            L += [f"{p.design}, micro-batch {p.micro_batch}, seq {p.seq} (peak total {_gb(p.total)} {U}):", "",
                  f"| made by (op), shape, dtype | count | {U} |", "|---|--:|--:|"]
            for what, count, nbytes in p.breakdown:
                L.append(f"| {what} | {count} | {nbytes / unit:.3f} |")
            L.append("")
    return "\n".join(L) + "\n"


# -- main ---------------------------------------------------------------------------------------


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="codellama-13b",
                    help=f"one of {', '.join(sorted(CONFIGS))} (with --ranks: a comma list)")
    ap.add_argument("--ranks", type=int, default=None,
                    help="trace one rank of this many of sharded pruning (FSDP2; bench/memory_sharded.py)")
    ap.add_argument("--card", default="h100-80gb,h200-141gb",
                    help=f"with --ranks: cards, by name ({', '.join(CARDS)}) or GB, comma list")
    ap.add_argument("--seqs", default="72,1024", help="with --ranks: sequence lengths of the limits")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--designs", default="fastedge,fastedge-norecompute,naive",
                    help=f"comma list of {', '.join(DESIGNS)}")
    ap.add_argument("--seq", type=int, default=72, help="the paper's sequence length (default 72)")
    ap.add_argument("--micro-batch", default="1,8,32", help="comma list: micro-batches traced at --seq")
    ap.add_argument("--batch", type=int, default=32, help="effective batch of the paper's setting (32)")
    ap.add_argument("--setting-micro", type=int, default=8,
                    help="micro-batch of the whole-step trace of the paper's setting (0: skip)")
    ap.add_argument("--grid", default=",".join(map(str, DEFAULT_GRID)), help="seqs of the batch x seq search")
    ap.add_argument("--cards", default="80,141", help="card sizes in GB (10^9 bytes)")
    ap.add_argument("--headroom-gib", type=float, default=1.5, help="CUDA context, workspaces (GiB)")
    ap.add_argument("--headroom-frac", type=float, default=0.05, help="fragmentation, as a fraction of the card")
    ap.add_argument("--no-search", action="store_true", help="only trace the --micro-batch points")
    ap.add_argument("--no-verify", action="store_true", help="do not trace the predicted limits")
    ap.add_argument("--breakdown", action="store_true", default=True,
                    help="record what is live at the peak for the largest --micro-batch point")
    ap.add_argument("--grad-buffer-dtype", choices=["auto", "float32"], default=None,
                    help="fastedge.patch(grad_buffer_dtype=...) for the fastedge designs")
    ap.add_argument("--lean-norm", choices=["on", "off"], default=None,
                    help="fastedge.patch(lean_norm=...) for the fastedge designs")
    ap.add_argument("--out", help="results folder (default: $OUT if set, else bench/results)")
    ap.add_argument("--grad-precision", action="store_true",
                    help="mask-gradient error of a bf16 vs a float32 gradient buffer against float64 "
                         "(a 40-layer small Llama on the CPU; --layers to change)")
    ap.add_argument("--triton-precision", action="store_true",
                    help="with --grad-precision: also the Triton kernels (interpreted on a CPU) in "
                         "precision full and fast")
    ap.add_argument("--check-device", action="store_true",
                    help="run each traced step for real on --device and compare the peaks")
    ap.add_argument("--device", default="cuda", help="for --check-device (cpu: a dry run, memtrack counts)")
    ap.add_argument("--quick", action="store_true",
                    help="a 2-layer tiny Llama, budgets of a few MB, seq grid 8..64: runs in seconds")
    args = ap.parse_args(argv)
    args.command_line = " ".join(["python bench/memory.py", *(sys.argv[1:] if argv is None else argv)])
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in models if m not in CONFIGS]
    if bad or not models or (len(models) > 1 and not args.ranks):
        ap.error(f"--model: {', '.join(bad) or args.model!r} is not one of {', '.join(sorted(CONFIGS))}"
                 if bad or not models else "--model takes one model (a comma list only with --ranks)")
    if args.ranks is not None and args.ranks < 1:
        ap.error(f"--ranks must be at least 1, got {args.ranks}")
    if args.quick:
        args.model = "tiny-llama" if args.model == "codellama-13b" else args.model
        args.cards = "0.015,0.03" if args.cards == "80,141" else args.cards
        args.headroom_gib, args.headroom_frac = 0.0, 0.05
        args.grid = "8,16,32,64" if args.grid == ",".join(map(str, DEFAULT_GRID)) else args.grid
        args.seq = 16 if args.seq == 72 else args.seq
        args.batch = 8 if args.batch == 32 else args.batch
        args.setting_micro = 2 if args.setting_micro == 8 else args.setting_micro
        args.micro_batch = "1,2,8" if args.micro_batch == "1,8,32" else args.micro_batch
    return args


def run(args, log=print):
    UNIT[:] = [1e6, "MB"] if args.quick else [GB, "GB"]
    if not args.quick and not args.no_search:
        log("bench/memory.py: the search traces dozens of steps: over 15 minutes on a small shared CPU "
            "(--no-search --no-verify: only the --micro-batch points; --quick: seconds)")
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    for d in designs:
        if d not in DESIGNS:
            raise SystemExit(f"unknown design {d!r}: use {', '.join(DESIGNS)}")
    micros = [int(x) for x in args.micro_batch.split(",") if x.strip()]
    seqs = [int(x) for x in args.grid.split(",") if x.strip()]
    cards = [float(x) for x in args.cards.split(",") if x.strip()]
    usable = {c: usable_bytes(c, args.headroom_gib, args.headroom_frac) for c in cards}
    patch_kwargs = _patch_kwargs(args)
    t0 = time.perf_counter()
    bench = FakeBench(args.model, DTYPES[args.dtype], args.layers, patch_kwargs)
    log(f"fake {args.model} built in {time.perf_counter() - t0:.1f} s: weights {bench.weights / GB:.2f} GB")
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), torch=torch.__version__,
                transformers=_version("transformers"), git_rev=results_csv.git_revision(), model=args.model,
                layers=bench.config.num_hidden_layers, dtype=args.dtype,
                options=" ".join(f"{k}={v}" for k, v in patch_kwargs.items()))
    points, fits, limits, setting = [], {}, [], []
    for design in designs:
        traced = {}

        def trace(m, s, breakdown=False, design=design, traced=traced):
            if (m, s) not in traced or (breakdown and not traced[(m, s)].breakdown):
                p = bench.trace(design, m, s, breakdown=breakdown)
                log(f"  {design:>21} micro {m:>3} x seq {s:>5}: before {p.before / GB:8.3f} GB, step "
                    f"{p.step / GB:9.3f} GB, total {p.total / GB:9.3f} GB  ({p.seconds:.0f} s)")
                traced[(m, s)] = p
            return traced[(m, s)]

        for m in micros:
            points.append(trace(m, args.seq, breakdown=args.breakdown and m == max(micros)))
        if args.no_search:
            continue
        # the fit: 1, 2 and 4 sequences, and 4x the tokens as one sequence
        fit_pts = [trace(1, args.seq), trace(2, args.seq), trace(4, args.seq), trace(1, 4 * args.seq)]
        fit = fit_affine(fit_pts)
        fits[design] = fit
        log(f"  {design}: fit a = {fit.a / GB:.3f} GB, b = {fit.b / 1e6:.3f} MB/token, largest residual "
            f"{fit.max_rel_residual:.1e}")
        for p in fit_pts:
            if not any(p is q for q in points):
                points.append(p)
        for c, u in usable.items():
            lim = search_micro(bench, fit, design, c, u, args.seq, not args.no_verify, log)
            limits.append(lim)
            grid = grid_limits(fit, design, c, u, seqs)
            fitting = [g for g in grid if g.max_batch >= 1]
            if fitting and not args.no_verify:
                g = max(fitting, key=lambda g: g.seq)   # the longest seq that fits: farthest from the fit points
                if g.seq != args.seq:
                    g.traced = bench.trace(design, g.max_batch, g.seq)
                    g.traced_next = bench.trace(design, g.max_batch + 1, g.seq)
                    log(f"    verify grid {design} @ {c:g} GB seq {g.seq}: batch {g.max_batch} -> "
                        f"{g.traced.total / GB:.2f} GB, {g.max_batch + 1} -> {g.traced_next.total / GB:.2f} GB")
            limits.extend(grid)
        if args.setting_micro and args.batch:
            p = bench.trace(design, args.setting_micro, args.seq, batch=args.batch)
            log(f"  {design:>21} batch {args.batch} in micro-batches of {args.setting_micro}: "
                f"total {p.total / GB:.3f} GB ({p.seconds:.0f} s)")
            setting.append(p)
    rows = [point_row(p, meta, fits.get(p.design), usable) for p in points]
    rows += [point_row(p, meta, fits.get(p.design), usable, what="setting") for p in setting]
    rows += [limit_row(x, meta) for x in limits]
    return dict(meta=meta, points=points, fits=fits, limits=limits, setting=setting, usable=usable,
                rows=rows, markdown=markdown(meta, args, points, fits, limits, setting, usable))


# -- the same steps for real on a GPU ----------------------------------------------------------


def check_device(args, log=print) -> dict:
    """Each (design, micro-batch) step traced on fake tensors and run for real
    on the GPU (random weights built there): the fake "step" figure against
    ``torch.cuda.max_memory_allocated`` minus what was allocated before the
    step (the second step: Triton kernels compiled, AdamW state present)."""
    import gc

    from transformers import AutoModelForCausalLM
    UNIT[:] = [1e6, "MB"] if args.quick else [GB, "GB"]
    U = UNIT[1]
    dev = torch.device(args.device)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    micros = [int(x) for x in args.micro_batch.split(",") if x.strip()]
    patch_kwargs = _patch_kwargs(args)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        name = torch.cuda.get_device_name(dev)
    else:  # a dry run of the code path: real CPU tensors counted by bench/memtrack.py
        free = total = 0
        name = "cpu (live tensors)"
    log(f"{name}: {total / GB:.2f} GB ({total / GIB:.2f} GiB), {free / GB:.2f} GB free")
    fake = FakeBench(args.model, DTYPES[args.dtype], args.layers, patch_kwargs)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(fake.config, dtype=DTYPES[args.dtype]).eval().requires_grad_(False)
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), torch=torch.__version__,
                transformers=_version("transformers"), git_rev=results_csv.git_revision(), model=args.model,
                layers=fake.config.num_hidden_layers, dtype=args.dtype, device=name,
                options=" ".join(f"{k}={v}" for k, v in patch_kwargs.items()))
    vocab = fake.config.vocab_size
    cases = [(d, m, m) for d in designs for m in micros]
    if args.setting_micro and args.batch:
        cases += [(d, args.setting_micro, args.batch) for d in designs]
    rows, lines = [], []
    for design, m, batch in cases:
        p = fake.trace(design, m, args.seq, batch=batch)
        kind, recompute = DESIGNS[design]
        ids, corrupted = ps.random_batch(vocab, batch, args.seq, dev)
        full = torch.zeros(batch, vocab, device=dev).log_softmax(-1)
        fn = masked = None
        try:
            fn, masked = _step_fn(kind, model, ids, corrupted, full, m, recompute, patch_kwargs)
            fn()
            before, peak, reserved, secs = _measure(fn, dev, (model, masked, ids, corrupted, full))
            status = ""
        except torch.cuda.OutOfMemoryError as exc:
            before = peak = reserved = 0
            secs, status = 0.0, "out of memory: " + str(exc).splitlines()[0][:120]
        finally:
            if masked is not None and hasattr(masked, "unpatch"):
                masked.unpatch()
            model.requires_grad_(False)
            fn = masked = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        row = point_row(p, meta, None, {}, what="device-check")
        row.update(device_step_gb=(peak - before) / GB, device_peak_total_gb=peak / GB,
                   device_reserved_gb=reserved / GB, note=status or f"device step {secs:.2f} s")
        rows.append(row)
        ratio = (peak - before) / p.step if p.step and peak else float("nan")
        lines.append(f"| {design} | {batch} | {m} | {args.seq} | {_gb(p.step)} | {_gb(peak - before) if peak else status} "
                     f"| {ratio:.3f} | {_gb(p.total)} | {_gb(peak) if peak else ''} | {_gb(reserved) if peak else ''} |")
        log(lines[-1])
    md = "\n".join([
        f"# Fake-tensor memory against the device: {args.model} ({meta['layers']} layers, {args.dtype})", "",
        f"- {meta['date']}; {name}, {total / GB:.2f} GB ({total / GIB:.2f} GiB) as CUDA reports it; torch "
        f"{meta['torch']}; git {meta['git_rev']}; options {meta['options'] or 'defaults'}",
        "- fake: bench/memtrack.py on fake (CPU) tensors; device: torch.cuda.max_memory_allocated over the "
        "second step minus memory_allocated before it; 'total' includes the weights; reserved: the caching "
        "allocator's peak reservation", "",
        f"| design | batch | micro-batch | seq | fake step {U} | device step {U} | device / fake "
        f"| fake total {U} | device total {U} | device reserved {U} |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|", *lines]) + "\n"
    return dict(meta=meta, rows=rows, markdown=md)


def _measure(fn, dev: torch.device, held) -> tuple[int, int, int, float]:
    """(bytes allocated before, peak bytes, peak reserved, seconds) of one step."""
    import gc
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        return (before, torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev),
                time.perf_counter() - t0)
    t0 = time.perf_counter()
    with LiveTensorTracker(*held, round_to=512) as t:
        fn()
    return t.baseline_bytes, t.peak_total_bytes, 0, time.perf_counter() - t0


# -- what a bf16 gradient buffer costs in precision ------------------------------------------------


def grad_precision(args, log=print) -> dict:
    """Mask gradients of a bf16 Llama (``--layers``, default 40; hidden 128,
    8 heads: small enough for a CPU) with a bf16 and a float32 gradient
    buffer, and of the authors' design in bf16, each against the same model
    in float64 (relative L2 error of the edge log_alpha gradients; masks
    deterministic, spread over (0, 1), the same in every run)."""
    import fastedge
    from naive_model import NaiveEdgeModel
    from transformers import LlamaConfig, LlamaForCausalLM
    L = args.layers or 40
    cfg = LlamaConfig(num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=8, hidden_size=128,
                      intermediate_size=344, vocab_size=211, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms away from 1
    weights = {k: v.to(torch.bfloat16).double() for k, v in base.state_dict().items()}  # bf16 values
    g = torch.Generator().manual_seed(1)
    ids, corrupted = torch.randint(0, 211, (4, 24), generator=g), torch.randint(0, 211, (4, 24), generator=g)

    def grads(dtype, buffer=None, naive=False, precision="full"):
        model = LlamaForCausalLM(cfg).eval()
        model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
        model = model.to(dtype).requires_grad_(False)
        em = fastedge.patch(model, node_masks=False, grad_buffer_dtype=buffer, precision=precision)
        gm = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for q in em.parameters():
                q.copy_((torch.randn(q.shape, generator=gm) + 1.0).to(q.dtype))
        em.eval()
        masked = em
        if naive:
            masked = NaiveEdgeModel(model)
            masked.copy_masks_from(em)
            em.unpatch()
            masked.eval()
        out = masked(ids, corrupted)
        out.logits.float().log_softmax(-1)[:, -1].sum().backward()
        return torch.cat([q.grad.double().flatten() for q in masked.parameters()])

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()
    ref, ref_naive = grads(torch.float64), grads(torch.float64, naive=True)
    res = {"fastedge, bf16 buffer": rel(grads(torch.bfloat16), ref),
           "fastedge, float32 buffer": rel(grads(torch.bfloat16, torch.float32), ref),
           "naive (authors' design), bf16": rel(grads(torch.bfloat16, naive=True), ref_naive),
           "fastedge, float32 model (the reference's own rounding)": rel(grads(torch.float32), ref)}
    if args.triton_precision:
        # the Triton kernels' own arithmetic (the torch backend above has no
        # one-product path): interpreted on the CPU, the same products as on a GPU
        old = os.environ.get("FASTEDGE_BACKEND")
        os.environ["FASTEDGE_BACKEND"] = "triton"
        try:
            for precision in ("full", "fast"):
                res[f"fastedge, bf16 buffer, triton kernels, precision {precision}"] = rel(
                    grads(torch.bfloat16, precision=precision), ref)
        finally:
            if old is None:
                os.environ.pop("FASTEDGE_BACKEND")
            else:
                os.environ["FASTEDGE_BACKEND"] = old
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), torch=torch.__version__,
                transformers=_version("transformers"), git_rev=results_csv.git_revision(), model="llama-h128", layers=L,
                dtype="bfloat16")
    rows = [dict(meta, what="grad-precision", design=k, note=f"relative L2 error {v:.4g}") for k, v in res.items()]
    md = "\n".join([f"# Mask-gradient error against float64: bf16 Llama, {L} layers, hidden 128, 8 heads", "",
                     f"- {meta['date']}; torch {meta['torch']}; git {meta['git_rev']}; batch 4 x seq 24, "
                     "deterministic masks log_alpha ~ N(1, 1), loss: last-position log-probabilities", "",
                     "| run | relative L2 error of d log_alpha |", "|---|--:|",
                     *[f"| {k} | {v:.3g} |" for k, v in res.items()]]) + "\n"
    for line in md.splitlines():
        log(line)
    return dict(meta=meta, rows=rows, markdown=md)


def sharded(args, log=print) -> dict:
    """--ranks: the per-rank plan of each --model (bench/memory_sharded.py)."""
    import memory_sharded
    cards = {}
    for c in (x.strip() for x in args.card.split(",") if x.strip()):
        try:
            cards[c] = CARDS[c] if c in CARDS else float(c)
        except ValueError:
            raise SystemExit(f"--card {c!r}: a card name ({', '.join(CARDS)}) or a size in GB") from None
    seqs = tuple(int(x) for x in args.seqs.split(",") if x.strip())
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    for m in models:
        if m not in LARGE_CONFIGS:
            raise SystemExit(f"--ranks traces {', '.join(LARGE_CONFIGS)}; got {m!r}")
    plans = [memory_sharded.plan(m, args.ranks, cards, seqs, args.headroom_gib, args.headroom_frac,
                                 n_layers=args.layers, verify=not args.no_verify, log=log) for m in models]
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), torch=torch.__version__,
                transformers=_version("transformers"), git_rev=results_csv.git_revision(),
                model="-".join(models) + f"-{args.ranks}ranks")
    command = getattr(args, "command_line", "python bench/memory.py")
    meta_csv = {k: v for k, v in meta.items() if k != "model"}
    return dict(meta=meta, plans=plans, rows=memory_sharded.rows(plans, meta_csv),
                markdown=memory_sharded.markdown(plans, meta, command))


def _patch_kwargs(args) -> dict:
    patch_kwargs = {}
    if args.grad_buffer_dtype:
        patch_kwargs["grad_buffer_dtype"] = None if args.grad_buffer_dtype == "auto" else torch.float32
    if args.lean_norm:
        patch_kwargs["lean_norm"] = args.lean_norm == "on"
    return patch_kwargs


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "absent"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)   # nothing is computed on fake tensors
    if args.triton_precision and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel is defined
    if args.ranks:
        result, prefix = sharded(args), "memory-sharded"
    elif args.grad_precision:
        result, prefix = grad_precision(args), "memory-grad-precision"
    elif args.check_device:
        result, prefix = check_device(args), "memory-check"
    else:
        result, prefix = run(args), "memory"
    csv_path, md = write_outputs(result, args, prefix)
    print(result["markdown"])
    print(f"wrote {csv_path} ({len(result['rows'])} rows) and {md}")
    return 0


def write_outputs(result: dict, args, prefix: str = "memory") -> tuple[Path, Path]:
    """Append the rows to <out>/memory.csv, write <out>/<prefix>-<model>-<date>.md."""
    out = Path(args.out or os.environ.get("OUT") or BENCH_DIR / "results")
    out.mkdir(parents=True, exist_ok=True)
    append_csv(out / "memory.csv", result["rows"])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    md = out / f"{prefix}-{result['meta']['model']}-{stamp}.md"
    md.write_text(result["markdown"])
    return out / "memory.csv", md


if __name__ == "__main__":
    raise SystemExit(main())
