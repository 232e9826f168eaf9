"""EAP against activation patching on the shipped induction model (issue 13,
"EAP against activation patching").

    python bench/eap_patching.py [--n-examples 400] [--no-save]

For every edge ``e`` of the shipped induction model (`fastedge/shipped`,
interchange ablation, node masks off), the true effect of patching it alone
is ``delta_e = m(every edge but e) - m(full model)``: the circuit of all
edges except ``e`` (`EdgeModel.set_circuit`), so that ``e``'s reader gets the
corrupted run's output of ``e``'s writer and everything else is clean. ``m``
is the attribution metric, the mean over examples of the log-probability of
the clean answer at the target positions (`fastedge.attribution.answer_logprob`;
the task's logit difference is 0 everywhere, its clean and corrupted answers
being the same tokens). The scores (``sign="gate"``) are the derivative of
``m`` in the edge's mask at 1, so the first-order estimate of removing the
edge is ``-score``. Reported per method (EAP, EAP-IG-inputs and
EAP-IG-activations, 5 steps), over all edges: the Pearson and Spearman
(average ranks for ties) correlations of ``delta`` with ``-score``, and how
many of the 10 edges with the largest ``|delta|`` are among the 10 with the
largest ``|score|``; and the 8 edges of largest ``|delta|`` with their
estimates. The same examples (the task's training split) are used
for the scores and for patching. Nothing is asserted: the figures are
measured and written down.

Results: bench/results/eap-patching-<machine>-<UTC time>.md and rows appended
to bench/results/eap_patching.csv, with the revision (`bench/revision.py`).
"""
from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")
IG_STEPS = 5
TOP = 10
SHOWN = 8      # edges listed with their effects and estimates
COLUMNS = ["date", "revision", "device", "command", "method", "ig_steps", "n_examples", "n_edges",
           "n_zero_effect", "pearson", "spearman", "top10_overlap", "max_abs_effect"]


def pearson(x: list, y: list) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def average_ranks(x: list) -> list:
    """Ranks 1..n of `x`, tied values sharing the mean of their ranks."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list, y: list) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def top_overlap(x: list, y: list, k: int = TOP) -> int:
    """How many of the `k` largest ``|x|`` are among the `k` largest ``|y|``."""
    def top(v):
        return set(sorted(range(len(v)), key=lambda i: -abs(v[i]))[:k])
    return len(top(x) & top(y))


def metric_under(em, data, edges, batch_size: int = 128) -> float:
    """Mean over examples of the clean answer's log-probability with the masks fixed to `edges`."""
    import torch
    from fastedge.attribution import answer_logprob
    em.set_circuit(edges)
    total, n = 0.0, 0
    device = em.edge_log_alpha[0].device
    with torch.no_grad():
        for batch in data.batches(batch_size):
            logits = em(batch.input_ids.to(device), batch.corrupted_input_ids.to(device),
                        attention_mask=batch.attention_mask.to(device)).logits
            total += float(answer_logprob(logits, batch).sum())
            n += batch.input_ids.shape[0]
    return total / n


def measure(n_examples: int = 400, methods=METHODS) -> tuple[list, dict]:
    """(one row per method, the per-edge effects and estimates)."""
    import torch
    torch.set_num_threads(1)
    import fastedge
    from fastedge import shipped
    from fastedge.shipped.defaults import induction_task

    model = shipped.load_shipped_model().eval().requires_grad_(False)
    task = induction_task(n_examples=n_examples)
    data = task.split("train")
    em = fastedge.patch(model, ablation="interchange", node_masks=False)
    em.eval()
    edges = list(em.graph.edges())
    full = metric_under(em, data, edges)
    effects = [metric_under(em, data, edges[:i] + edges[i + 1:]) - full for i in range(len(edges))]
    em._fixed_masks = None
    rows, detail = [], {"edges": [f"{w}->{r}" for w, r in edges], "effect": effects}
    for method in methods:
        scores = fastedge.attribute(em, task, method=method, ig_steps=IG_STEPS, metric="logprob",
                                    batch_size=128, sign="gate").flat().tolist()
        estimate = [-s for s in scores]
        detail[method] = estimate
        rows.append({"method": method, "ig_steps": None if method == "eap" else IG_STEPS,
                     "n_examples": len(data), "n_edges": len(edges),
                     "n_zero_effect": sum(1 for d, e in zip(effects, estimate) if d == 0 and e == 0),
                     "pearson": pearson(effects, estimate), "spearman": spearman(effects, estimate),
                     "top10_overlap": top_overlap(effects, estimate),
                     "max_abs_effect": max(abs(d) for d in effects)})
    em.unpatch()
    return rows, detail


def markdown(rows: list, revision: str, device: str, date: str, command: str, detail=None) -> str:
    r0 = rows[0]
    lines = ["# EAP against activation patching, shipped induction model (issue 13)", "",
             f"`{command}` on {device}, {date}, revision `{revision}`. {r0['n_edges']} edges, "
             f"{r0['n_examples']} examples (the task's training split), interchange ablation. True effect of "
             "an edge: the mean log-probability of the clean answer with every edge but that one, minus the "
             "full model's. Estimate: minus the edge's score (the derivative in its mask, `sign=\"gate\"`). "
             f"Largest |true effect|: {r0['max_abs_effect']:.3g} nats. Edges whose true effect and estimate "
             f"are both exactly 0 (the MLPs write 0): {r0['n_zero_effect']}.", "",
             f"| method | Pearson | Spearman | top-{TOP} overlap |", "|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pearson']:.3f} | {r['spearman']:.3f} | {r['top10_overlap']} / {TOP} |")
    if detail:
        methods = [r["method"] for r in rows]
        effects = detail["effect"]
        lines += ["", f"The {SHOWN} edges with the largest |true effect| (nats), and the estimates (-score):", "",
                  "| edge | true effect | " + " | ".join(methods) + " |", "|---|--:|" + "--:|" * len(methods)]
        for i in sorted(range(len(effects)), key=lambda i: -abs(effects[i]))[:SHOWN]:
            lines.append(f"| {detail['edges'][i]} | {effects[i]:.3g} | "
                         + " | ".join(f"{detail[m][i]:.3g}" for m in methods) + " |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-examples", type=int, default=400, help="examples of the task (80%% train)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-save", action="store_true", help="print the table, write nothing")
    args = ap.parse_args(argv)
    import torch
    from results_csv import append_csv, cpu_slug, device_name, git_revision, significant
    revision = git_revision()
    torch.set_num_threads(1)
    device = device_name(torch.device("cpu"))
    command = "python bench/eap_patching.py" + (" " + " ".join(argv) if argv else "")
    rows, detail = measure(args.n_examples, tuple(args.methods))
    now = datetime.now(timezone.utc)
    date = now.strftime("%Y-%m-%dT%H:%MZ")
    text = markdown(rows, revision, device, date, command, detail)
    print(text)
    if not args.no_save:
        results = HERE / "results"
        machine = cpu_slug(device)
        (results / f"eap-patching-{machine}-{now.strftime('%Y%m%dT%H%M%SZ')}.md").write_text(text)
        append_csv(results / "eap_patching.csv",
                   [dict(r, date=date, revision=revision, device=device, command=command) for r in rows],
                   COLUMNS, significant(4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
