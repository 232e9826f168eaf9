"""Attribution passes against a pruning step, side by side (issue 13, "Speed").

    python bench/attribution_speed.py                          # GPT-2 small shape, CPU or GPU
    python bench/attribution_speed.py --device cuda --to-faithfulness
    python bench/attribution_speed.py --quick --no-save        # a 2-layer smoke run

What is measured, on one device in one run: a random-weight model of GPT-2
small's shape (`bench/pruning_step.py`: 12 layers, 12 heads, 768 wide;
nothing downloaded), and

* ``eap``: one `fastedge.attribute(method="eap")` pass over ``--examples``
  (100) random sequences of ``--seq`` (32) tokens with random corrupted
  sequences, in batches of ``--attr-batch`` (25): one forward and one
  backward per batch;
* ``eap-ig-inputs``: the same with ``method="eap-ig-inputs"``, 5 steps (a
  clean run for the writer deltas, then 5 interpolated forwards and
  backwards per batch);
* ``pruning-step``: one step of `bench/pruning_step.py` (corrupted pass,
  masked forward, KL + Lagrangian loss, backward into the masks, AdamW) at
  ``--prune-batch`` (32, `fastedge.prune`'s default batch) and the same
  sequence length, readers not recomputed (`fastedge.prune`'s default).

The metric of the attribution passes is the log-probability of each
sequence's last token at the position before it. The three kinds are
timed in turn, ``--repeats`` times (after one untimed warm-up of each), and
the medians are reported with each pass's time as a multiple of one
pruning step. On a GPU every timing is synchronised.

``--to-faithfulness`` adds the time to a circuit at a given faithfulness
for plain, warm-started (EAP-IG-inputs scores) and preselected (top 30% by
EAP) pruning: `bench/methods.py`'s pruning runs and trace on the shipped
induction model (``--faithfulness-models``; Tracr programs need the
``tracr`` extra), on this device: the training seconds until the circuit of
``k_trace`` edges first reaches faithfulness 0.99, plus the attribution pass
for the warm-started runs. `bench/methods.py` measures the same on the CPU.

Output: rows appended to ``<out>/attribution_speed.csv`` and a markdown
table in ``<out>/attribution-speed-<device>-<date>.md``; ``<out>`` is
``--out``, else ``$OUT``, else bench/results. Each row records the device,
the revision (`bench/revision.py`) and the command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

KINDS = ("eap", "eap-ig-inputs", "pruning-step")
IG_STEPS = 5
COLUMNS = ["date", "revision", "device", "command", "torch", "model", "layers", "seq", "examples",
           "attr_batch", "prune_batch", "kind", "repeats", "median_s", "min_s", "max_s", "per_example_ms",
           "x_pruning_step", "faithfulness_model", "threshold", "k_trace", "steps_to_threshold",
           "seconds_to_threshold", "attribution_s", "steps_per_s", "load_average"]


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_token_logprob(logits, batch):
    """Per sequence: log-probability of its last token at the position before it."""
    import torch.nn.functional as F
    target = batch.input_ids[:, -1].to(logits.device)
    log_p = F.log_softmax(logits[:, -2].float(), dim=-1)
    return log_p.gather(-1, target[:, None])[:, 0]


def build(args, device):
    import torch
    import pruning_step as ps
    from transformers import AutoModelForCausalLM
    cfg = ps.CONFIGS["gpt2-small"]()
    if args.layers:
        cfg.n_layer = args.layers
    if args.tiny:   # a smoke run's model: GPT-2's layout at toy sizes
        cfg.n_embd, cfg.n_head, cfg.vocab_size = 64, 4, 512
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    ids, corrupted = ps.random_batch(cfg.vocab_size, args.examples, args.seq, "cpu", seed=0)
    return model, cfg, ids, corrupted


def timers(args, model, ids, corrupted, device):
    """(kind -> a function running one pass or step, the patched model)."""
    import fastedge
    import pruning_step as ps

    pb = min(args.prune_batch, ids.shape[0])
    p_ids, p_corrupted = ids[:pb].to(device), corrupted[:pb].to(device)
    full = ps.full_log_probs(model, p_ids)
    step, em = ps.step_fn("fastedge", model, p_ids, p_corrupted, full, None, recompute_readers=False)

    def one_step():
        step().item()   # reading the loss synchronises

    def attribution(method):
        def once():     # on the same EdgeModel: `attribute` fixes its masks at 1 and restores them
            fastedge.attribute(em, ids.to(device), corrupted.to(device), method=method, ig_steps=IG_STEPS,
                               metric=last_token_logprob, batch_size=args.attr_batch)
            _sync(device)
        return once
    return {"eap": attribution("eap"), "eap-ig-inputs": attribution("eap-ig-inputs"),
            "pruning-step": one_step}, em


def measure(args, device) -> list[dict]:
    model, cfg, ids, corrupted = build(args, device)
    fns, em = timers(args, model, ids, corrupted, device)
    samples = {k: [] for k in KINDS}
    for kind in KINDS:                         # one untimed warm-up each
        fns[kind]()
    for _ in range(args.repeats):              # side by side: the kinds in turn, every repeat
        for kind in KINDS:
            t0 = time.perf_counter()
            fns[kind]()
            samples[kind].append(time.perf_counter() - t0)
    em.unpatch()
    step_s = statistics.median(samples["pruning-step"])
    rows = []
    for kind in KINDS:
        med = statistics.median(samples[kind])
        n = args.prune_batch if kind == "pruning-step" else args.examples
        rows.append({"model": "tiny gpt2" if args.tiny else "gpt2-small",
                     "layers": cfg.num_hidden_layers, "seq": args.seq, "examples": args.examples,
                     "attr_batch": args.attr_batch, "prune_batch": args.prune_batch, "kind": kind,
                     "repeats": args.repeats, "median_s": med, "min_s": min(samples[kind]),
                     "max_s": max(samples[kind]), "per_example_ms": med / n * 1e3,
                     "x_pruning_step": med / step_s})
    return rows


def to_faithfulness(models, device, quick: bool) -> list[dict]:
    """`bench/methods.py`'s three pruning runs and their traces, on `device`."""
    import methods
    rows = []
    for name in models:
        setup = methods.Setup(name, quick=quick, device=str(device))
        graph, scores, timing = methods.attribute_all(setup, ())
        k_trace = methods.trace_size(setup, graph.n_edges)
        runs = methods.prune_variants(setup, scores, k_trace)
        for label, run in runs.items():
            steps_to, seconds_to = run["trace"].first(methods.TRACE_FAITHFULNESS)
            attribution_s = timing[run["init"]] if run["init"] else None
            if seconds_to is not None and attribution_s is not None:
                seconds_to += attribution_s
            rows.append({"kind": f"to-faithfulness: {label}", "faithfulness_model": name,
                         "threshold": methods.TRACE_FAITHFULNESS, "k_trace": k_trace,
                         "steps_to_threshold": steps_to, "seconds_to_threshold": seconds_to,
                         "attribution_s": attribution_s, "steps_per_s": run["steps"] / run["prune_s"]})
    return rows


def markdown(rows, revision, device, date, command) -> str:
    speed = [r for r in rows if r["kind"] in KINDS]
    lines = ["# Attribution passes against a pruning step (issue 13, speed)", "",
             f"`{command}` on {device}, {date}, revision `{revision}`."]
    if speed:
        r0 = speed[0]
        shape = "4 heads, 64 wide, 512 tokens" if r0["model"].startswith("tiny") else "12 heads, 768 wide"
        lines += [f"Random-weight {r0['model']} ({r0['layers']} layers, {shape}), fp32, seq "
                  f"{r0['seq']}. Attribution over {r0['examples']} examples in batches of {r0['attr_batch']} "
                  f"(EAP-IG: {IG_STEPS} steps); one pruning step at batch {r0['prune_batch']}. Medians of "
                  f"{r0['repeats']} runs, the kinds timed in turn.", "",
                  "| kind | median (s) | min-max (s) | per example (ms) | x one pruning step |",
                  "|---|--:|--:|--:|--:|"]
        for r in speed:
            lines.append(f"| {r['kind']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                         f"{r['per_example_ms']:.2f} | {r['x_pruning_step']:.2f} |")
    faith = [r for r in rows if r["kind"] not in KINDS]
    if faith:
        lines += ["", "Time to a circuit of k_trace edges at faithfulness >= "
                  f"{faith[0]['threshold']} (training seconds, checked periodically, plus the attribution pass "
                  "for warm starts):", "",
                  "| model | run | k_trace | steps | seconds | attribution (s) | steps/s |",
                  "|---|---|--:|--:|--:|--:|--:|"]
        for r in faith:
            reached = r["steps_to_threshold"] is not None
            cells = [r["faithfulness_model"], r["kind"].split(": ", 1)[1], str(r["k_trace"]),
                     str(r["steps_to_threshold"]) if reached else "not reached",
                     f"{r['seconds_to_threshold']:.1f}" if reached else "–",
                     f"{r['attribution_s']:.2f}" if r["attribution_s"] is not None else "–",
                     f"{r['steps_per_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--attr-batch", type=int, default=25)
    ap.add_argument("--prune-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than GPT-2 small's 12")
    ap.add_argument("--quick", action="store_true",
                    help="a 2-layer, 64-wide GPT-2, 8 examples of 8 tokens, 1 repeat (a smoke run, not a result)")
    ap.add_argument("--to-faithfulness", action="store_true",
                    help="also the time to a circuit at a given faithfulness (plain, warm, preselected pruning)")
    ap.add_argument("--faithfulness-models", nargs="+", default=["induction"])
    ap.add_argument("--skip-speed", action="store_true", help="only --to-faithfulness")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-save", action="store_true", help="print the table, write nothing")
    args = ap.parse_args(argv)
    args.tiny = args.quick
    if args.quick:
        args.layers, args.examples, args.seq, args.attr_batch, args.prune_batch, args.repeats = 2, 8, 8, 4, 4, 1
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch
    from results_csv import append_csv, device_name, git_revision, significant
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    revision = git_revision()
    name = device_name(device)
    command = "python bench/attribution_speed.py" + (" " + " ".join(argv) if argv else "")
    rows = [] if args.skip_speed else measure(args, device)
    if args.to_faithfulness:
        rows += to_faithfulness(args.faithfulness_models, device, args.quick)
    now = datetime.now(timezone.utc)
    date = now.strftime("%Y-%m-%dT%H:%MZ")
    text = markdown(rows, revision, name, date, command)
    print(text)
    if not args.no_save:
        out = Path(args.out or os.environ.get("OUT") or HERE / "results")
        out.mkdir(parents=True, exist_ok=True)
        slug = "".join(ch if ch.isalnum() else "-" for ch in name.split(" (")[0].lower()).strip("-")
        (out / f"attribution-speed-{slug}-{now.strftime('%Y%m%dT%H%M%SZ')}.md").write_text(text)
        common = {"date": date, "revision": revision, "device": name, "command": command,
                  "torch": torch.__version__, "load_average": os.getloadavg()[0]}
        append_csv(out / "attribution_speed.csv", [dict(common, **r) for r in rows], COLUMNS, significant(4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
