"""Pruning at 1K, 10K and 100K examples: peak memory and step time stay flat
(issue 12, "Data at scale").

    python bench/data_scale.py [--sizes 1000 10000 100000] [--steps 200] [--no-save]

Each size runs in a fresh subprocess (so that its peak RSS is its own): a
tiny GPT-2 (2 layers, width 64, 2 heads) with GPT-2's vocabulary of 50,257
tokens, the induction task over that vocabulary (24 tokens, 11 targets an
example) with ``n`` examples, of which 200 are validation (the same at every
size, so that the final evaluation costs the same), and `fastedge.prune`
for 200 steps at batch 32 on the CPU with one torch thread. It reports the
peak RSS of the process (``ru_maxrss``: building the task, pruning, the
final evaluation), the bytes of the task's example store, the time to build
the task, and the median and mean time of a pruning step (the wall time of
`fastedge.prune._train_step`, the whole step: collating, the full model's
reference forward, the masked forward and backward, AdamW), with the share
of the reference forward. The sizes must agree within 10% on peak RSS and
median step time; the exit status is 1 when they do not.

Run time on a 2-core AMD EPYC shared with other work: about 4 minutes in all
(about 70 s of pruning per size, plus 1 s to build 1K examples and 50 s
to build 100K: the distinct-token draw sorts 50,257 random numbers per
example).

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
TOLERANCE = 0.10
COLUMNS = ["date", "revision", "device", "n_examples", "steps", "batch_size", "peak_rss_mb",
           "store_mb", "build_s", "step_median_ms", "step_mean_ms", "reference_median_ms"]


def child(n: int, steps: int, batch_size: int) -> dict:
    """One size, in this process: build the task, prune, measure."""
    import torch
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    import fastedge.prune as prune_mod
    from fastedge.tasks import induction_task

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=64))
    t0 = time.perf_counter()
    task = induction_task(None, n_examples=n, seed=0, validation_fraction=VALIDATION / n, vocab_size=VOCAB)
    build_s = time.perf_counter() - t0
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    step_times, reference_times = [], []
    train_step, reference_get = prune_mod._train_step, prune_mod._FullModelReference.get

    def timed_step(*a, **kw):
        t = time.perf_counter()
        out = train_step(*a, **kw)
        step_times.append(time.perf_counter() - t)
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
    return {"n_examples": n, "steps": steps, "batch_size": batch_size,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_build_mb": rss_after_build, "store_mb": task.examples.nbytes() / 2 ** 20,
            "build_s": build_s, "step_median_ms": statistics.median(timed) * 1e3,
            "step_mean_ms": statistics.fmean(timed) * 1e3,
            "reference_median_ms": statistics.median(reference_times[5:] or reference_times) * 1e3}


def run_size(n: int, steps: int, batch_size: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
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


def markdown(rows: list[dict], revision: str, device: str, date: str) -> str:
    lines = [
        "# Pruning at 1K, 10K and 100K examples (issue 12, data at scale)", "",
        f"`python bench/data_scale.py` on {device}, {date}, revision `{revision}`. Tiny GPT-2 (2 layers, "
        f"width 64) with GPT-2's vocabulary ({VOCAB:,}), the induction task over it (24 tokens, 11 targets "
        f"an example; {VALIDATION} validation examples at every size), batch {rows[0]['batch_size']}, "
        f"{rows[0]['steps']} pruning steps, one torch thread, each size in a fresh process. Peak RSS: the "
        "process's maximum resident set (task, pruning, final evaluation). Step: the wall time of one "
        "pruning step, median and mean over the steps after the first 5; reference: the full model's "
        "no-grad forward inside it (`_FullModelReference`).", "",
        "| examples | peak RSS (MB) | example store (MB) | build task (s) | step median (ms) | step mean (ms) "
        "| reference forward (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n_examples']:,} | {r['peak_rss_mb']:.0f} | {r['store_mb']:.1f} | {r['build_s']:.1f} "
                     f"| {r['step_median_ms']:.1f} | {r['step_mean_ms']:.1f} | {r['reference_median_ms']:.1f} |")
    rss, step = spread(rows, "peak_rss_mb"), spread(rows, "step_median_ms")
    lines += ["", f"Spread from the smallest to the largest size: peak RSS {rss:.1%}, median step time "
                  f"{step:.1%} (limit {TOLERANCE:.0%}): {'flat' if max(rss, step) <= TOLERANCE else 'NOT flat'}.",
              "", "Before (the per-example cache of full-vocabulary log-probabilities, on the model's device): "
                  f"{11 * VOCAB * 4 / 1e6:.1f} MB per example here, so about 1.8 GB at 1K (800 training examples), "
                  "19.5 GB at 10K and 195 GB at 100K, reached as the steps sample new examples.", ""]
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
    from results_csv import append_csv, device_name, git_revision, significant
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
        machine = "cpu-" + "-".join(device.split()[:2]).lower().replace("(", "").replace(")", "")
        (results / f"data-scale-{machine}-{now.strftime('%Y%m%dT%H%M%SZ')}.md").write_text(text)
        append_csv(results / "data_scale.csv", [dict(r, date=date, revision=revision, device=device) for r in rows],
                   COLUMNS, significant(4))
    return 0 if max(spread(rows, "peak_rss_mb"), spread(rows, "step_median_ms")) <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
