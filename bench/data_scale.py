"""Pruning at 1K, 10K and 100K examples: peak memory and step time stay flat
(issue 12, "Data at scale").

    python bench/data_scale.py [--sizes 1000 10000 100000] [--steps 200] [--no-save]

Each size runs in a fresh subprocess (so that its peak RSS is its own): a
tiny GPT-2 (2 layers, width 64, 2 heads) with GPT-2's vocabulary of 50,257
tokens, the induction task over that vocabulary (8 tokens, 3 targets an
example; ``distinct=False``: the distinct-token draw sorts 50,257 random
numbers per example, 40 ms each here) with ``n`` examples, of which 200 are
validation (the same at every size, so that the final evaluation costs the
same), and `fastedge.prune` for 200 steps at batch 32 on the CPU with one
torch thread. It reports the peak RSS of the process (``ru_maxrss``:
building the task, pruning, the final evaluation), the bytes of the task's
example store, the time to build the task, and the time of a pruning step
(`fastedge.prune._train_step`, the whole step: collating, the full model's
reference forward, the masked forward and backward, AdamW): the median of
the process's CPU time per step, the measure of the work done on a machine
shared with other work, and the median and mean wall time, with the
reference forward's median wall time. Peak RSS and the median CPU time per
step must agree within 10% over the sizes; the exit status is 1 when they do
not.

Run time: about 7 minutes in all on a 2-core AMD EPYC shared with other
work (load average 5): 2 to 2.5 minutes a size (0.42 s of CPU and 0.63 s of
wall time a step, 2 s to build 100K examples, model loading and the final
evaluation). Under heavier load the wall time per step grew to 1.3 s.

Results go to bench/results/data-scale-<machine>-<UTC time>.md and
bench/results/data_scale.csv, with the revision (`bench/revision.py`: commit
first, so that it names a clean commit).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

VOCAB = 50_257
VALIDATION = 200
HALF = 4          # induction sequences of 8 tokens, 3 targets
TOLERANCE = 0.10
COLUMNS = ["date", "revision", "device", "n_examples", "steps", "batch_size", "peak_rss_mb",
           "store_mb", "build_s", "step_cpu_median_ms", "step_median_ms", "step_mean_ms", "reference_median_ms",
           "load_average"]


def child(n: int, steps: int, batch_size: int) -> dict:
    """One size, in this process: build the task, prune, measure."""
    import torch
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    import importlib
    prune_mod = importlib.import_module("fastedge.prune")  # the module (fastedge.prune is also the function)
    from fastedge.tasks import induction_task

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=64))
    t0 = time.perf_counter()
    task = induction_task(None, n_examples=n, seed=0, validation_fraction=VALIDATION / n, vocab_size=VOCAB,
                          half_length=HALF, distinct=False)
    build_s = time.perf_counter() - t0
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    step_times, cpu_times, reference_times = [], [], []
    train_step, reference_get = prune_mod._train_step, prune_mod._FullModelReference.get

    def timed_step(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        out = train_step(*a, **kw)
        step_times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        return out

    def timed_reference(self, batch):
        t = time.perf_counter()
        out = reference_get(self, batch)
        reference_times.append(time.perf_counter() - t)
        return out

    prune_mod._train_step = timed_step
    prune_mod._FullModelReference.get = timed_reference
    try:
        prune_mod.prune(model, task, target_sparsity=0.5, steps=steps, batch_size=batch_size, progress=False,
                        lr=0.1, lambda_lr=0.1, init_log_alpha=3.0, sparsity_estimate="expected")
    finally:
        prune_mod._train_step, prune_mod._FullModelReference.get = train_step, reference_get
    timed = step_times[5:] or step_times    # the first steps warm the allocator up
    return {"load_average": os.getloadavg()[0], "n_examples": n, "steps": steps, "batch_size": batch_size,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_build_mb": rss_after_build, "store_mb": task.examples.nbytes() / 2 ** 20,
            "build_s": build_s, "step_median_ms": statistics.median(timed) * 1e3,
            "step_mean_ms": statistics.fmean(timed) * 1e3,
            "step_cpu_median_ms": statistics.median(cpu_times[5:] or cpu_times) * 1e3,
            "reference_median_ms": statistics.median(reference_times[5:] or reference_times) * 1e3}


def run_size(n: int, steps: int, batch_size: int) -> dict:
    # a fixed mmap threshold: glibc otherwise raises it as large blocks are freed, so that the peak RSS
    # would depend on the order of past allocations rather than on what is live
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(steps),
                          "--batch-size", str(batch_size)], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"data_scale: the run with {n} examples failed (status {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(rows: list[dict], key: str) -> float:
    """(largest - smallest) / smallest over the sizes."""
    values = [r[key] for r in rows]
    return (max(values) - min(values)) / min(values)


def before(rows: list[dict]) -> str:
    """What the per-example cache of full-vocabulary log-probabilities (the
    code before issue 12) would have held after these runs: the expected
    number of distinct training examples among steps x batch uniform draws."""
    per_example = (HALF - 1) * VOCAB * 4
    parts = []
    for r in rows:
        train = r["n_examples"] - VALIDATION
        draws = r["steps"] * r["batch_size"]
        distinct = train * (1 - (1 - 1 / train) ** draws)
        parts.append(f"{distinct * per_example / 1e9:.1f} GB at {r['n_examples']:,}")
    return (f"Before, the per-example cache of full-vocabulary log-probabilities on the model's device held "
            f"{per_example / 1e6:.1f} MB per training example sampled ({HALF - 1} targets x {VOCAB:,} floats): "
            f"after these runs, expected {', '.join(parts)} examples; after the default 3,000 steps, "
            f"{(100_000 - VALIDATION) * (1 - (1 - 1 / (100_000 - VALIDATION)) ** (3000 * 32)) * per_example / 1e9:.0f} "
            f"GB at 100K.")


def markdown(rows: list[dict], revision: str, device: str, date: str) -> str:
    lines = [
        "# Pruning at 1K, 10K and 100K examples (issue 12, data at scale)", "",
        f"`python bench/data_scale.py` on {device}, {date}, revision `{revision}`. Tiny GPT-2 (2 layers, "
        f"width 64) with GPT-2's vocabulary ({VOCAB:,}), the induction task over it ({2 * HALF} tokens, "
        f"{HALF - 1} targets an example, distinct=False; {VALIDATION} validation examples at every size), "
        f"batch {rows[0]['batch_size']}, {rows[0]['steps']} pruning steps, one torch thread, each size in a "
        "fresh process (glibc's mmap threshold fixed at 128 KiB). Peak RSS: the process's maximum resident "
        "set (task, pruning, final evaluation). Step: one pruning step (`_train_step`), the process's CPU "
        "time (median) and the wall time (median, mean), over the steps after the first 5; reference: the "
        "full model's no-grad forward inside it (`_FullModelReference`), wall time.", "",
        "| examples | peak RSS (MB) | example store (MB) | build task (s) | step CPU median (ms) "
        "| step wall median (ms) | step wall mean (ms) | reference forward, wall (ms) | load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n_examples']:,} | {r['peak_rss_mb']:.0f} | {r['store_mb']:.1f} | {r['build_s']:.1f} "
                     f"| {r['step_cpu_median_ms']:.1f} | {r['step_median_ms']:.1f} | {r['step_mean_ms']:.1f} "
                     f"| {r['reference_median_ms']:.1f} | {r['load_average']:.1f} |")
    rss, step, wall = (spread(rows, k) for k in ("peak_rss_mb", "step_cpu_median_ms", "step_median_ms"))
    lines += ["", f"Spread (largest - smallest) / smallest over the sizes: peak RSS {rss:.1%}, median CPU time "
                  f"per step {step:.1%} (limit {TOLERANCE:.0%}: {'flat' if max(rss, step) <= TOLERANCE else 'NOT flat'}); "
                  f"median wall time per step {wall:.1%} (load average: the machine's, 1 minute, at the end of "
                  "the size's run; the wall time follows the other work on the machine).",
              "", before(rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-save", action="store_true", help="print the table, write nothing")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.batch_size)))
        return 0
    import torch
    from results_csv import append_csv, cpu_slug, device_name, git_revision, significant
    revision = git_revision()
    torch.set_num_threads(1)
    device = device_name(torch.device("cpu"))
    rows = []
    for n in args.sizes:
        rows.append(run_size(n, args.steps, args.batch_size))
        print(json.dumps(rows[-1]), flush=True)
    now = datetime.now(timezone.utc)
    date = now.strftime("%Y-%m-%dT%H:%MZ")
    text = markdown(rows, revision, device, date)
    print(text)
    if not args.no_save:
        results = HERE / "results"
        machine = cpu_slug(device)
        (results / f"data-scale-{machine}-{now.strftime('%Y%m%dT%H%M%SZ')}.md").write_text(text)
        append_csv(results / "data_scale.csv", [dict(r, date=date, revision=revision, device=device) for r in rows],
                   COLUMNS, significant(4))
    return 0 if max(spread(rows, "peak_rss_mb"), spread(rows, "step_cpu_median_ms")) <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
