"""A full pruning step: fastedge against the authors' design and against the floor.

What is measured
----------------
One pruning step (`bench/pruning_step.py`: corrupted pass, masked forward,
KL + Lagrangian loss, backward into the masks, AdamW update) of one model,
side by side in one run:

* ``fastedge``: `fastedge.patch(model)` (edge masks, interchange ablation),
  reader inputs recomputed in the backward (``recompute_readers=True``, the
  memory-lean setting) unless ``--recompute off``; ``fastedge-norecompute``
  when ``--recompute both``;
* ``naive``: `bench/naive_model.py`, the authors' design (a full writer
  tensor per layer written one-hot, a separate corrupted writer tensor, one
  einsum per kind of reader over all writers), starting from the same masks;
* ``floor``: the unpatched model's corrupted forward plus its clean forward
  and backward (to the input embeddings): what no pruning step can beat
  (docs/CONCEPTS.md section 5).

Same random-weight model (nothing downloaded), same batch, same masks.
Reported per kind: p20 / p50 / p80 step time, tokens per second, and peak
memory of the step: on a GPU ``torch.cuda.max_memory_allocated`` over one
step (total, and above what was allocated before it: weights, inputs and the
trained masks are the "before"); on the CPU the peak of live tensor bytes
counted by `bench/memtrack.py` over one extra, untimed step. Ratios:
``naive / fastedge`` for time and for the step's peak memory above the
weights, and fastedge's time as a multiple of the floor.

Output: one CSV row per kind appended to ``<out>/step.csv`` (device,
versions, the revision of `bench/revision.py`: a commit, with the hash of
any local changes), a markdown table printed and written to
``<out>/step-<device>-<date>.md``; ``<out>`` is ``--out``, else ``$OUT``,
else ``bench/results``. A recorded p50 takes at least ``MIN_TIMED_STEPS``
(5) timed steps: fewer are refused unless ``--no-record`` (print only).

    python bench/step.py                               # GPT-2 small; GPU: batch 32, CPU: batch 4
    python bench/step.py --model codellama-13b --batch 32 --micro-batch 8 --seq 72 --kinds fastedge,floor
    python bench/step.py --quick                        # a 2-layer GPT-2-shaped smoke run
    python bench/step.py --steps 2 --no-record          # a quick look: printed, not recorded
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import pruning_step as ps  # noqa: E402
import results_csv  # noqa: E402

import fastedge  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("floor", "fastedge", "fastedge-norecompute", "naive")
MIN_TIMED_STEPS = 5  # the fewest timed steps a recorded p20 / p50 / p80 is taken over


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Milliseconds per step; each step synchronised (its loss is read)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def peak_of_one_step(fn, device: torch.device, *external) -> tuple[int, int]:
    """(peak bytes during one step, bytes allocated before it). On the CPU,
    `external` (the model, the masked model) counts from the start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), before
    from memtrack import LiveTensorTracker
    with LiveTensorTracker(*external) as tracker:
        fn()
    return tracker.peak_total_bytes, tracker.baseline_bytes


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


device_name = results_csv.device_name
git_revision = results_csv.git_revision


def fastedge_backend(device: torch.device, dtype: torch.dtype) -> str:
    from fastedge.backends import select
    from fastedge.backends.base import Call
    call = Call(op="masked_sum", device=device, dtype=dtype, n_readers=37, n_writers=158,
                n_elements=1 << 20, grad_dtype=dtype)
    try:
        return select(call, None).name
    except Exception as exc:  # noqa: BLE001  (reported, not fatal)
        return f"? ({type(exc).__name__})"


def run(args) -> list[dict]:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if args.model == "codellama-13b" else "float32")]
    batch = args.batch or (32 if device.type == "cuda" else 4)
    seq = args.seq or (72 if args.model == "codellama-13b" else 64)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k!r}: choose from {', '.join(KINDS)}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    cfg = ps.CONFIGS[args.model]()
    if args.layers:
        cfg.num_hidden_layers = args.layers
    from transformers import AutoModelForCausalLM
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids, corrupted = ps.random_batch(cfg.vocab_size, batch, seq, device, args.seed)
    full = ps.full_log_probs(model, ids)
    log(f"{args.model}: {cfg.num_hidden_layers} layers, {weights_bytes / 2 ** 30:.2f} GiB of {args.dtype or dtype} "
        f"weights on {device_name(device)}; batch {batch} x seq {seq}, micro-batch "
        f"{args.micro_batch or batch}; built in {time.perf_counter() - t0:.1f} s")

    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(device), "torch": torch.__version__,
           "triton": _version("triton"), "transformers": _version("transformers"),
           "fastedge": fastedge.__version__, "git_rev": git_revision()}
    rows = []
    for kind in kinds:
        recompute = kind == "fastedge" and args.recompute != "off"
        base_kind = "fastedge" if kind.startswith("fastedge") else kind
        row = dict(env, model=args.model, layers=cfg.num_hidden_layers, dtype=str(dtype).replace("torch.", ""),
                   batch=batch, seq=seq, micro_batch=args.micro_batch or batch, kind=kind,
                   backend=(fastedge_backend(device, dtype) if base_kind == "fastedge" else "torch"),
                   recompute_readers=recompute if base_kind == "fastedge" else "",
                   weights_mb=round(weights_bytes / 2 ** 20, 1))
        try:
            fn, masked = ps.step_fn(base_kind, model, ids, corrupted, full, args.micro_batch, recompute)
            t1 = time.perf_counter()
            samples = time_steps(fn, device, args.warmup, args.steps)
            peak, before = peak_of_one_step(fn, device, *[m for m in (model, masked) if m is not None])
            row.update(status="ok", steps=len(samples), p20_ms=quantile(samples, 0.2),
                       p50_ms=quantile(samples, 0.5), p80_ms=quantile(samples, 0.8),
                       tokens_per_s=batch * seq / (quantile(samples, 0.5) / 1e3),
                       peak_mb=round(peak / 2 ** 20, 1), peak_above_weights_mb=round((peak - weights_bytes) / 2 ** 20, 1),
                       mem_method=("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                   else "bench/memtrack.py live tensors"))
            log(f"  {kind:>21}: p50 {row['p50_ms']:9.1f} ms  ({len(samples)} steps, "
                f"{time.perf_counter() - t1:.0f} s)  peak {row['peak_mb']:9.1f} MB")
        except torch.cuda.OutOfMemoryError as exc:
            row.update(status="oom", note=str(exc).splitlines()[0][:200])
            log(f"  {kind:>21}: out of memory")
        finally:
            fn = masked = None
            if base_kind == "fastedge" or base_kind == "naive":
                model.requires_grad_(False)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    ok = {r["kind"]: r for r in rows if r.get("status") == "ok"}
    naive, floor = ok.get("naive"), ok.get("floor")
    for r in rows:
        if r.get("status") != "ok":
            continue
        if naive is not None:
            r["naive_time_ratio"] = naive["p50_ms"] / r["p50_ms"]
            r["naive_mem_ratio"] = naive["peak_above_weights_mb"] / max(r["peak_above_weights_mb"], 1e-9)
        if floor is not None:
            r["x_floor"] = r["p50_ms"] / floor["p50_ms"]


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "absent"


COLUMNS = ["date", "device", "torch", "triton", "transformers", "fastedge", "git_rev", "model", "layers",
           "dtype", "batch", "seq", "micro_batch", "kind", "backend", "recompute_readers", "status", "steps",
           "p20_ms", "p50_ms", "p80_ms", "tokens_per_s", "x_floor", "naive_time_ratio", "weights_mb",
           "peak_mb", "peak_above_weights_mb", "naive_mem_ratio", "mem_method", "note"]


def append_csv(path: Path, rows: list[dict]) -> None:
    results_csv.append_csv(path, rows, COLUMNS, results_csv.significant(4))


def markdown(rows: list[dict], args) -> str:
    r0 = rows[0]
    lines = [
        "# fastedge: one pruning step against the authors' design and the floor", "",
        f"- date {r0['date']}; device {r0['device']}; torch {r0['torch']}; triton {r0['triton']}; "
        f"transformers {r0['transformers']}; fastedge {r0['fastedge']} @ {r0['git_rev']}",
        f"- model {r0['model']} shape ({r0['layers']} layers, random weights, {r0['dtype']}), batch "
        f"{r0['batch']} x seq {r0['seq']}, micro-batch {r0['micro_batch']}; {args.warmup} warm-up steps, "
        f"then {args.steps} timed",
        "- step: corrupted pass, masked forward, KL + Lagrangian loss, backward into the masks, AdamW "
        "update (bench/pruning_step.py); floor: corrupted forward + clean forward and backward of the "
        "unpatched model; naive: bench/naive_model.py from the same masks",
        "- memory: peak over one step (" + r0.get("mem_method", "") + "); MB = 2^20 bytes; 'above "
        "weights' subtracts the model's weights; ratios are naive / fastedge",
        "",
        "| kind | backend | p20 ms | p50 ms | p80 ms | tokens/s | x floor | naive time / this | peak MB "
        "| peak above weights MB | naive mem / this |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['kind']} | {r['backend']} | {r.get('status')} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['kind']} | {r['backend']} | {r['p20_ms']:.1f} | {r['p50_ms']:.1f} | {r['p80_ms']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {_x(r.get('x_floor'))} | {_x(r.get('naive_time_ratio'))} "
            f"| {r['peak_mb']:.0f} | {r['peak_above_weights_mb']:.0f} | {_x(r.get('naive_mem_ratio'))} |")
    return "\n".join(lines) + "\n"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(ps.CONFIGS), default="gpt2-small")
    ap.add_argument("--layers", type=int, help="override the number of layers (smaller runs)")
    ap.add_argument("--batch", type=int, help="sequences per step (default: 32 on a GPU, 4 on the CPU)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default 64; 72 for CodeLlama)")
    ap.add_argument("--micro-batch", type=int, help="micro-batch size (gradient accumulation)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weights (default fp32; bf16 for CodeLlama)")
    ap.add_argument("--kinds", default="floor,fastedge,naive", help=f"comma list of {', '.join(KINDS)}")
    ap.add_argument("--recompute", choices=["on", "off"], default="on",
                    help="fastedge's recompute_readers for kind 'fastedge' (fastedge-norecompute is always off)")
    ap.add_argument("--steps", type=int,
                    help=f"timed steps (default {MIN_TIMED_STEPS}, the fewest a recorded run takes)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 2 on a GPU, 1 on the CPU)")
    ap.add_argument("--no-record", action="store_true",
                    help="print the table, write nothing (allows fewer timed steps)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", help="results folder (default: $OUT if set, else bench/results)")
    ap.add_argument("--quick", action="store_true",
                    help=f"2 layers, batch 2, seq 16, {MIN_TIMED_STEPS} timed steps, no warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.quick:
        args.layers = args.layers or 2
        args.batch = args.batch or 2
        args.seq = args.seq or 16
        args.warmup = args.warmup if args.warmup is not None else 0
    args.steps = MIN_TIMED_STEPS if args.steps is None else args.steps
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: at least one timed step")
    if args.warmup < 0:
        raise SystemExit(f"--warmup {args.warmup}: cannot be negative")
    if args.steps < MIN_TIMED_STEPS and not args.no_record:
        raise SystemExit(f"--steps {args.steps}: a recorded p50 takes at least {MIN_TIMED_STEPS} timed "
                         "steps; pass more, or --no-record to print without recording")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise SystemExit("--micro-batch must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    text = markdown(rows, args)
    if args.no_record:
        print(text)
        print("not recorded (--no-record)")
        return 0
    out = Path(args.out or os.environ.get("OUT") or BENCH_DIR / "results")
    append_csv(out / "step.csv", rows)
    slug = "".join(ch if ch.isalnum() else "-" for ch in rows[0]["device"].split(" (")[0].lower()).strip("-")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    md = out / f"step-{args.model}-{slug}-{stamp}.md"
    md.write_text(text)
    print(text)
    print(f"wrote {out / 'step.csv'} ({len(rows)} rows) and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
