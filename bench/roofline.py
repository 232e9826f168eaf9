"""A step-time model that runs without a GPU: one pruning step traced on fake
tensors, every op costed, the time modeled on a card's spec sheet.

    python bench/roofline.py --model codellama-13b --batch 32 --micro-batch 8 --card h200
    python bench/roofline.py --model gpt2-small          # batch 32 x seq 64, fp32 (bench/step.py's default)
    python bench/roofline.py --model gpt2-small --card a100 --json out.json

The trace (bench/optrace.py)
----------------------------
bench/optrace.py traces one micro-batch of the step (and the update) and
the floor on fake tensors and records, per op, its phase, host ops,
launches, DRAM and L2 bytes and FLOPs by kind (its docstring: what is
counted and how phases are found).

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
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import memory  # noqa: E402
import results_csv  # noqa: E402
from fastedge.kernels import costs  # noqa: E402
from optrace import (MODELS, MS_BWD, MS_FWD, MS_RECOMPUTE, PHASES, SAMPLING, Launch, OpRecord,  # noqa: E402,F401
                     OpRecorder, Trace, step_records, trace_step)

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
    gflop_by_kind: dict = field(default_factory=dict)   # tc16 / tf32 / fp32
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
        for x in rec.launches:
            for kind, n in x.flops.items():
                row.gflop_by_kind[kind] = row.gflop_by_kind.get(kind, 0.0) + n * reps / 1e9
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
    torch.bfloat16: {"masked_sum_forward": dict(legacy=True, config=dict(USE_DOT=True, BLOCK_R=128, BLOCK_W=32,
                                                                         BLOCK_N=128, num_warps=8, num_stages=3)),
                     "masked_sum_backward_stack": dict(legacy=True, config=dict(
                         USE_DOT=True, BLOCK_R=16, BLOCK_W=128, BLOCK_N=128, num_warps=8, num_stages=3)),
                     "masked_sum_backward_mask": dict(legacy=True)},
    torch.float32: {"masked_sum_forward": dict(legacy=True, config=dict(USE_DOT=True, BLOCK_R=64, BLOCK_W=16,
                                                                        BLOCK_N=128, num_warps=4, num_stages=3)),
                    "masked_sum_backward_stack": dict(legacy=True, config=dict(
                        USE_DOT=True, BLOCK_R=16, BLOCK_W=128, BLOCK_N=128, num_warps=8, num_stages=3)),
                    "masked_sum_backward_mask": dict(legacy=True)},
}
# Every committed H200 measurement (ops cells, tune rows, steps) ran the
# kernels before the split mask and live columns (a4a47e4): the calibration
# models them with the contracts' `legacy` knob, whatever the scenario.
LEGACY_KERNELS = {k: dict(legacy=True) for k in ("masked_sum_forward", "masked_sum_backward_stack",
                                                 "masked_sum_backward_mask")}


def scenario_overrides(live_writers: float = 1.0, lo_tiles: float = 1.0) -> dict:
    """The contracts' knobs for a state of the masks that fake tensors cannot
    show: the fraction of each call's writers that are live (a nonzero mask
    for some reader; the rest are skipped), and the fraction of mask tiles
    with a lo half (a fractional mask; 0/1 tiles skip their lo product)."""
    live = dict(live_fraction=live_writers)
    return {"masked_sum_forward": dict(live, lo_fraction=lo_tiles),
            "masked_sum_backward_stack": dict(live, lo_fraction=lo_tiles),
            "masked_sum_backward_mask": dict(live)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The H200's device-to-device copy, read + write (tune-*.log, gpu-run-*.log: 4.24-4.26 TB/s)
H200_COPY_TB_S = 4.25


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
        # logs before 2026-11-30 timed the kernels before a4a47e4 (`legacy`)
        stamp = re.search(r"(\d{8})T", p.name)
        legacy = stamp is None or stamp.group(1) < "20261130"
        for line in p.read_text().splitlines():
            m = _TUNE_LINE.match(line)
            if not m or m.group(2) not in tune.SHAPES:
                continue
            op, shape, knobs, ms = m.group(1), m.group(2), m.group(3), float(m.group(4))
            kv = dict(re.findall(r"(\w+)=(\d+)", knobs))
            if "BN" not in kv:   # a --variants line (mask states, not tiles)
                continue
            R, W, N, dtype = tune.SHAPES[shape]
            if op == "fwd":
                cfg = dict(costs.kms.forward_config(R, W, N, dtype, arch=90))
                cfg.update(BLOCK_N=int(kv["BN"]), BLOCK_W=int(kv["BW"]), num_warps=int(kv["warps"]),
                           num_stages=int(kv["stages"]))
            else:
                cfg = dict(costs.kms.backward_stack_config(R, W, N, dtype, torch.float32))
                cfg.update(BLOCK_R=int(kv["BR"]), BLOCK_W=int(kv["BW"]), BLOCK_N=int(kv["BN"]),
                           num_warps=int(kv["warps"]), num_stages=int(kv["stages"]),
                           BY_COLUMNS=knobs.strip().endswith("cols"))
            rows.append(dict(op=op, shape=shape, R=R, W=W, N=N, dtype=dtype, config=cfg, knobs=knobs.strip(), ms=ms,
                             legacy=legacy))
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
            c = [costs.masked_sum_forward(R, W, N, dtype, 90, config=row["config"], legacy=row["legacy"])]
        else:
            c = [costs.masked_sum_backward_stack(R, W, N, dtype, torch.float32, 90, config=row["config"],
                                                 legacy=row["legacy"])]
        launches = [Launch(dram=x.dram_bytes, l2=x.l2_read, flops=x.flops, fastedge=True) for x in c]
        ms = sum(launch_time(x, card, cal) for x in launches) * 1e3
        pts.append(CalPoint(f"tune {row['op']} {row['shape']} {row['knobs']}", ms, row["ms"]))
    return pts


# -- the masked sum's kernels alone ------------------------------------------------------------------

# (name, readers, writers, columns, dtype): the layer calls of bench/tune.py
KERNEL_SHAPES = [("cl13b-b8-L39", 121, 1640, 8 * 72 * 5120, torch.bfloat16),
                 ("cl13b-b8-L20", 121, 861, 8 * 72 * 5120, torch.bfloat16),
                 ("gpt2-L11", 37, 157, 32 * 64 * 768, torch.float32)]
# (name, contract knobs, live share): the kernels of the committed H200 runs,
# and today's under each state of the masks
KERNEL_STATES = [("before (legacy kernels)", dict(legacy=True), 1.0),
                 ("fractional masks", {}, 1.0),
                 ("0/1 masks", dict(lo_fraction=0.0), 1.0),
                 ("precision fast", dict(split=False), 1.0),
                 ("90% writers dead", dict(lo_fraction=0.0), 0.1),
                 ("99% writers dead", dict(lo_fraction=0.0), 0.01)]


def kernel_table(card: dict, cal: dict, copy_tb_s: float) -> list:
    """Modeled time of the masked sum's forward and backward (stack gradient
    into a buffer in the stack's dtype, plus the fused op's mask gradient) at
    real layer shapes, and the fraction of the card's copy bandwidth their
    necessary bytes (forward: the stack prefix and the outputs; backward:
    dout twice, the buffer read and written, the stack once; dead writers'
    rows not counted) reach: docs/CONCEPTS.md section 5's measure, modeled."""
    rows = []
    for shape, R, W, N, dtype in KERNEL_SHAPES:
        e = torch.empty((), dtype=dtype).element_size()
        for state, knobs, live in KERNEL_STATES:
            legacy = knobs.get("legacy", False)
            kw = dict(knobs) if legacy else dict(knobs, live_fraction=live)
            fwd = [costs.masked_sum_forward(R, W, N, dtype, card["arch"], **kw)]
            bwd = ([costs.masked_sum_backward_stack(R, W, N, dtype, dtype, card["arch"], **kw)]
                   + costs.masked_sum_backward_mask(R, W, N, dtype, card["arch"], legacy=legacy,
                                                    live_fraction=None if legacy else live,
                                                    split=knobs.get("split", True)))
            if not legacy:   # what each launch makes of the mask first
                fwd = costs.mask_prep(R, W, dtype, fwd[0].config, split=kw.get("split", True)) + fwd
                bwd = costs.mask_prep(R, W, dtype, bwd[0].config, split=kw.get("split", True)) + bwd
            Wl = W if legacy else max(1, math.ceil(W * live))
            need = {"fwd": Wl * N * e + R * N * e, "bwd": 2 * R * N * e + 3 * Wl * N * e}
            for mode, launches in (("fwd", fwd), ("bwd", bwd)):
                s = sum(launch_time(Launch(dram=c.dram_bytes, l2=c.l2_read, flops=c.flops, fastedge=True),
                                    card, cal) + cal["launch_s"] * c.launches for c in launches)
                rows.append(dict(shape=shape, state=state, mode=mode, ms=s * 1e3,
                                 copy_fraction=need[mode] / s / (copy_tb_s * 1e12)))
    return rows


def kernel_markdown(rows: list, card: dict, copy_tb_s: float, rev: str) -> str:
    states = [s for s, _, _ in KERNEL_STATES]
    L = [f"# The masked sum's kernels on {card['name']} (modeled)", "",
         f"- {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%MZ')}; git {rev}; `bench/roofline.py "
         f"--kernels`: each launch from kernels/costs.py at CALIBRATION's efficiencies, plus the launch gap",
         f"- % of copy: the bytes the op must move (forward: the live stack rows and the outputs; backward: "
         f"dout twice, the gradient buffer read and written and the stack, in the stack's dtype) over the "
         f"modeled time, against a {copy_tb_s:.2f} TB/s copy (measured on the H200, read + write)", "",
         "| shape | pass | " + " | ".join(states) + " |", "|---|---|" + "--:|" * len(states)]
    for shape, *_ in KERNEL_SHAPES:
        for mode in ("fwd", "bwd"):
            cells = []
            for st in states:
                r = next(x for x in rows if x["shape"] == shape and x["mode"] == mode and x["state"] == st)
                cells.append(f"{r['ms']:.2f} ms ({r['copy_fraction']:.0%})")
            L.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


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
    # as on a GPU: the readers' norms take the fused kernels (on fake CPU
    # tensors "auto" would pick the module)
    bench = memory.FakeBench(args.model, spec["dtype"], args.layers,
                             {"precision": args.precision, "fused_norm": args.fused_norm})
    log(f"fake {args.model} built in {time.perf_counter() - t0:.1f} s")
    scenario = scenario_overrides(args.live_writers, args.lo_tiles)
    traces = {}
    for kind in ("fastedge", "floor"):
        traces[kind] = trace_step(bench, kind, micro, seq, batch, recompute, card["arch"], scenario)
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
                             l2_gb=r.l2_gb, gflop=r.gflop,
                             **{f"gflop_{k}": r.gflop_by_kind.get(k, 0.0) for k in costs.KINDS},
                             bound_ms=r.bound_ms, modeled_ms=r.modeled_ms,
                             measured_ms=r.measured_ms) for r in rows.values()]
    floor_ms, fastedge_ms = modeled["floor"][0] * 1e3, modeled["fastedge"][0] * 1e3
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), torch=torch.__version__,
                git_rev=results_csv.git_revision(), model=args.model, layers=bench.config.num_hidden_layers,
                dtype=str(spec["dtype"]).replace("torch.", ""), card=args.card, card_name=card["name"],
                batch=batch, micro_batch=micro, seq=seq, recompute_readers=recompute, precision=args.precision,
                live_writers=args.live_writers, lo_tiles=args.lo_tiles, fused_norm=args.fused_norm)
    cal_points = []
    if args.calibration:
        # the measured steps ran the kernels of their day (LEGACY_KERNELS) and
        # full precision: model those, not the scenario of the table
        legacy = {"floor": modeled["floor"]}
        legacy_bench = memory.FakeBench(args.model, spec["dtype"], args.layers, {"fused_norm": "off"})
        if measured["fastedge"]:
            tr = trace_step(legacy_bench, "fastedge", micro, seq, batch, recompute, card["arch"], LEGACY_KERNELS)
            legacy["fastedge"] = model_step(step_records(tr), card, cal)
        steps = [CalPoint(f"step {args.model} {k}" + (" (recompute_readers)" if k == "fastedge" and recompute
                                                       else ""), legacy[k][0] * 1e3, measured[k])
                 for k in ("floor", "fastedge") if measured[k]]
        other = meas.get((args.model, "fastedge", not recompute, batch, micro, seq)) if h200 else None
        if other:   # the other design was measured too (GPT-2 small): one more point
            tr = trace_step(legacy_bench, "fastedge", micro, seq, batch, not recompute, card["arch"],
                            LEGACY_KERNELS)
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
         f"{m['recompute_readers']}; precision {m['precision']}; live writers per masked sum "
         f"{m['live_writers']:.0%}, mask tiles with a lo half {m['lo_tiles']:.0%}; reader norms "
         f"{'fused' if m['fused_norm'] == 'triton' else 'as modules'}",
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
                     "the kernels and tiles of that run, before the split mask, live columns and the stack "
                     "backward by columns (a4a47e4 and later), so for comparison only; 128-column forward, "
                     "fp32 gradient buffer) interpolated in W at each "
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
           "recompute_readers", "precision", "live_writers", "lo_tiles", "fused_norm", "kind", "phase", "launches", "host_ops", "gb", "l2_gb", "gflop", "gflop_tc16",
           "gflop_tf32", "gflop_fp32", "bound_ms",
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
    p.add_argument("--precision", default="full", choices=["full", "fast"],
                   help="fastedge.patch(precision=...): the masked sums' products (see fastedge.ops)")
    p.add_argument("--fused-norm", default="triton", choices=["triton", "off"],
                   help="fastedge.patch(fused_norm=...): the readers' norms as the fused kernels (the "
                        "default on a GPU) or as the model's modules")
    p.add_argument("--live-writers", type=float, default=1.0,
                   help="fraction of each masked sum's writers with a nonzero mask (the rest are skipped); "
                        "1 - this is the share of dead writers (node-pruned, or every edge at 0)")
    p.add_argument("--lo-tiles", type=float, default=1.0,
                   help="fraction of mask tiles with a lo half (fractional masks; 0/1 tiles skip it)")
    p.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="skip the table of the model against the H200 measurements")
    p.add_argument("--json", default=None, help="write the tables, floor_ms and fastedge_ms here")
    p.add_argument("--out", default=None, help="results folder (default $OUT, else bench/results)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--kernels", action="store_true",
                   help="instead of a step: the masked sum's kernels alone at layer shapes, per state of "
                        "the masks, with their fraction of the copy bandwidth")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.kernels:
        card = CARDS[args.card]
        copy = H200_COPY_TB_S if args.card == "h200" else card["hbm_tb_s"] * CALIBRATION["bw_eff"]
        md = kernel_markdown(kernel_table(card, CALIBRATION, copy), card, copy, results_csv.git_revision())
        print(md)
        if not args.no_save:
            out = Path(args.out or os.environ.get("OUT") or RESULTS)
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            (out / f"roofline-kernels-{args.card}-{stamp}.md").write_text(md)
        return 0
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
