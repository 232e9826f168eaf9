"""Circuit discovery methods side by side on models whose circuits are known
(issue 13, "Comparison on known circuits").

    python bench/methods.py [--quick] [--models induction tracr:reverse ...] [--jobs 2]

Models: the shipped induction model (`fastedge/shipped`, its task and its
`fastedge prune` defaults) and Tracr programs (`fastedge.tracr`: by default
the paper's two, reverse and xproportion, and two more that the defaults
recover, length and pair_balance; any of `fastedge.tracr.programs.SUPPORTED`
with ``--models tracr:NAME``; their `PRUNE_DEFAULTS` and ground truth).

Methods, on each model:

* ``edge-pruning``: `fastedge.prune` with the model's default settings;
* ``eap``, ``eap-ig-inputs``, ``eap-ig-activations`` (5 steps):
  `fastedge.attribute` on the training split; circuits by
  `Circuit.from_scores` (top ``|score|``, dead edges pruned, exact counts);
* ``warm (eap-ig-inputs)``: the same pruning, log_alphas initialised from the
  EAP-IG-inputs scores (`prune(init_from=...)`, MIB's best pruning entry);
* ``preselect (eap, 30%)``: the same pruning warm-started from the EAP
  scores with only their top 30% of edges trainable (`prune(preselect=0.3)`,
  HAP: attribution first, then pruning of the survivors).

Attribution metric: the task's log-probability of the clean answer on the
induction task (its clean and corrupted answers are the same tokens, so the
logit difference is 0 everywhere); on Tracr programs, the projection of the
circuit's output onto the full model's (`tracr_metric`: the mean-centred
logits' dot product for categorical programs, the output value times the
full model's value for numerical ones), whose gradient at the full model is
not 0 (that of KL or MSE is).

Equal edge counts. A pruning run's masks rank every edge (their
log_alphas); its circuit of ``k`` edges is `extract_circuit` at sparsity
``1 - k / n`` (as `fastedge.evaluate.sweep` does), an attribution method's is
`Circuit.from_scores(n_edges=k)`. The columns at ``k`` use the size of the
plain Edge Pruning run's own circuit (its default extraction). Per method:

* faithfulness, divergence and accuracy at ``k`` on the evaluation data (the
  induction task's validation split; a Tracr program's whole input space),
  from `fastedge.evaluate.evaluate`. Faithfulness is ``1 - D(circuit) /
  D(empty circuit)`` with ``D`` the pruning objective (KL to the full model;
  the squared error for numerical Tracr programs), as `evaluate` defines it
  for objective-scored tasks; on the induction task the logit-difference
  faithfulness is undefined (the same answers), so its KL form is used there
  too. Accuracy: the top token equals the clean answer (induction), the
  circuit's output equals the full model's (Tracr);
* CPR and CMD (`fastedge.evaluate.faithfulness_areas`) of that faithfulness
  over MIB's edge fractions (0.1% ... 100%; a preselected run's masks hold
  every edge outside its 30% at 0, so its circuits at 50% and 100% are
  those 30%);
* Tracr only, at ``k`` and at the ground truth's size (``|N|``, its
  necessary edges): recall of the necessary edges, precision (the share of
  the circuit's edges inside the weight-composition circuit; at ``|N|``)
  and `GroundTruth.judge`'s verdict (``recovered``: every necessary edge,
  nothing outside the weight-composition circuit, every output reproduced);
* for the pruning runs: the circuit they return themselves (size and
  faithfulness), and the training steps and seconds until the circuit at a
  fixed size (``k_trace``: the shipped model's default circuit size, 10% of
  the edges; a Tracr program's ground-truth size) first reaches
  faithfulness ``TRACE_FAITHFULNESS``, checked every ``trace_every`` steps
  (the checks' own time excluded); warm-started runs add their attribution
  pass;
* wall time: the attribution pass, the pruning run, or both.

Each model runs in its own process with one torch thread, ``--jobs`` at a
time: about 11 minutes on this project's 2-core CPU shared with other work
(load 4 to 10). Results: bench/results/methods-<machine>-<UTC time>.md and rows
appended to bench/results/methods.csv, with the date, the device, the
revision (`bench/revision.py`: commit first, so that it names a clean
commit) and the command. ``--quick``: a tenth of the pruning steps and a
smaller induction task, for a look (not a result to quote).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DEFAULT_MODELS = ("induction", "tracr:reverse", "tracr:xproportion", "tracr:length", "tracr:pair_balance")
ATTRIBUTION = ("eap", "eap-ig-inputs", "eap-ig-activations")
IG_STEPS = 5
WARM_FROM = "eap-ig-inputs"      # the scores a warm start begins from (MIB's best pruning entry)
PRESELECT_FROM = "eap"           # HAP: EAP, then pruning of the survivors
PRESELECT = 0.3
TRACE_FAITHFULNESS = 0.99
ATTRIBUTION_BATCH = 64
PRUNING = ("edge-pruning", f"warm ({WARM_FROM})", f"preselect ({PRESELECT_FROM}, {PRESELECT:.0%})")
COLUMNS = ["date", "revision", "device", "command", "model", "method", "kind", "n_graph_edges", "time_s",
           "attribution_s", "prune_s", "k", "n_edges", "faithfulness", "divergence", "divergence_name",
           "accuracy", "cpr", "cmd", "recall_at_k", "precision_at_k", "recovered_at_k", "k_truth", "n_edges_truth",
           "recall", "precision", "recovered",
           "own_n_edges", "own_faithfulness", "k_trace", "trace_threshold", "steps_to_threshold",
           "seconds_to_threshold", "steps", "load_average"]


# -- models -----------------------------------------------------------------------------------------

class Setup:
    """One model, its task, how to attribute and prune on it, and its ground truth."""

    def __init__(self, name: str, quick: bool = False, device: str = "cpu", steps=None):
        import torch
        self.name = name
        if name == "induction":
            from fastedge import shipped
            from fastedge.shipped.defaults import PRUNE_DEFAULTS, induction_task
            self.model = shipped.load_shipped_model()
            self.task = induction_task(n_examples=160 if quick else 400)
            self.eval_data = self.task.split("validation")
            self.metric = "logprob"
            self.prune_options = dict(PRUNE_DEFAULTS)
            self.ablation = "interchange"
            self.truth = None
            self.trace_every = 50
            # the default circuit's size: circuit_sparsity 0.9
            self.k_trace_fraction = 1.0 - PRUNE_DEFAULTS["circuit_sparsity"]
        elif name.startswith("tracr:"):
            import fastedge.tracr
            from fastedge.tracr.tasks import PRUNE_DEFAULTS
            tm = fastedge.tracr.programs.load(name.split(":", 1)[1])
            self.model = tm.model
            self.task = fastedge.tracr.task(tm)
            self.eval_data = self.task
            self.metric = tracr_metric(tm)
            self.prune_options = dict(PRUNE_DEFAULTS)
            self.ablation = self.prune_options["ablation"]
            self.truth = fastedge.tracr.ground_truth(tm)
            self.trace_every = 25
            self.k_trace_fraction = None
        else:
            raise ValueError(f"unknown model {name!r}: 'induction' or 'tracr:<program>'")
        self.prune_options.update(progress=False, checkpoint_seconds=None)
        if quick:
            for key in ("steps", "sparsity_warmup_steps", "lr_warmup_steps"):
                if key in self.prune_options:
                    self.prune_options[key] = max(1, self.prune_options[key] // 10)
            self.trace_every = max(1, self.trace_every // 10)
        if steps is not None:   # a smoke run: the schedule scaled to `steps`
            scale = steps / self.prune_options["steps"]
            for key in ("sparsity_warmup_steps", "lr_warmup_steps"):
                if key in self.prune_options:
                    self.prune_options[key] = max(1, int(self.prune_options[key] * scale))
            self.prune_options["steps"] = steps
            self.trace_every = max(1, steps // 4)
        self.model.eval().requires_grad_(False).to(device)
        torch.manual_seed(0)

    @property
    def objective(self) -> bool:
        return self.eval_data.meta.get("faithfulness") == "objective"


def tracr_metric(tm):
    """Per example, the circuit's output projected onto the full model's,
    averaged over the target positions: for a categorical program the dot
    product of the mean-centred logits (a logit difference towards the full
    model's outputs), for a numerical one the output value times the full
    model's value. Its gradient at the full model is not 0 (KL's and the
    squared error's are)."""
    import torch
    full = copy.deepcopy(tm.model).eval().requires_grad_(False)
    categorical = tm.categorical

    def projection(logits, batch):
        if next(full.parameters()).device != logits.device:
            full.to(logits.device)
        with torch.no_grad():
            ref = full(batch.input_ids.to(logits.device),
                       attention_mask=batch.attention_mask.to(logits.device)).logits.float()
        cur = logits.float()
        if categorical:
            ref = ref - ref.mean(-1, keepdim=True)
            cur = cur - cur.mean(-1, keepdim=True)
        value = (cur * ref).sum(-1)
        mask = batch.target_mask.to(logits.device, value.dtype)
        return (value * mask).sum(1) / mask.sum(1).clamp(min=1)
    projection.__name__ = "projection"
    return projection


# -- evaluating circuits ------------------------------------------------------------------------------

def faithfulness_of(metrics: dict, objective: bool) -> tuple[float, float, str]:
    """(faithfulness, divergence, its name) from `evaluate`'s metrics: ``1 -
    D(circuit) / D(empty)`` (module docstring)."""
    if objective:
        name = "mse" if "mse" in metrics else "kl"
        return metrics["faithfulness"], metrics[name], name
    empty = metrics["empty_kl"]
    return (1.0 - metrics["kl"] / empty if empty > 0 else float("nan")), metrics["kl"], "kl"


class Evaluator:
    """Circuits of `setup`'s graph evaluated on its evaluation data, with one
    patched model (node masks off: circuits carry their own nodes)."""

    def __init__(self, setup: Setup):
        import fastedge
        self.setup = setup
        self.em = fastedge.patch(setup.model, ablation=setup.ablation, node_masks=False)
        self.graph = self.em.graph

    def __call__(self, circuit) -> dict:
        from fastedge.evaluate import evaluate
        m = evaluate(self.em, self.setup.eval_data, circuit, batch_size=128)
        f, d, name = faithfulness_of(m, self.setup.objective)
        return {"faithfulness": f, "divergence": d, "divergence_name": name, "accuracy": m["accuracy"],
                "n_edges": circuit.n_edges}

    def close(self):
        self.em.unpatch()


class Ranking:
    """How a method's circuit of any size is made: from attribution scores, or
    from a pruning run's masks (module docstring, "Equal edge counts")."""

    def __init__(self, graph, ablation, scores=None, masks=None):
        self.graph, self.ablation, self.scores, self.masks = graph, ablation, scores, masks

    def circuit(self, n_edges: int):
        from fastedge.circuit import Circuit, extract_circuit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a count pruning cannot hit exactly: the achieved one is recorded
            if self.scores is not None:
                return Circuit.from_scores(self.scores, n_edges=n_edges)
            sparsity = 1.0 - n_edges / self.graph.n_edges
            return extract_circuit(self.masks, sparsity, graph=self.graph, ablation=self.ablation)


def areas(ranking: Ranking, evaluator: Evaluator) -> dict:
    """CPR and CMD over MIB's edge fractions."""
    from fastedge.evaluate import MIB_EDGE_FRACTIONS, faithfulness_areas
    n = ranking.graph.n_edges
    faith = [evaluator(ranking.circuit(int(round(f * n))))["faithfulness"] for f in MIB_EDGE_FRACTIONS]
    try:
        return faithfulness_areas(MIB_EDGE_FRACTIONS, faith)
    except ValueError:
        return {"cpr": None, "cmd": None}


def truth_columns(truth, circuit, suffix: str = "") -> dict:
    """Recall of the necessary edges, precision against the weight-composition
    circuit, and `GroundTruth.judge`'s verdict, keys ending in `suffix`."""
    edges = set(circuit.edges)
    verdict = truth.judge(circuit)
    return {"n_edges_truth" + suffix: circuit.n_edges,
            "recall" + suffix: len(edges & truth.necessary) / max(1, len(truth.necessary)),
            "precision" + suffix: len(edges & truth.edges) / max(1, len(edges)),
            "recovered" + suffix: bool(verdict["recovered"])}


# -- pruning with a trace -----------------------------------------------------------------------------

class Trace:
    """Wraps `fastedge.prune._train_step` for one run: times the steps, and
    every `every` steps evaluates the run's circuit of `k` edges (the check's
    time is not counted)."""

    def __init__(self, every: int, k: int, evaluate_masks):
        self.every, self.k, self.evaluate_masks = every, k, evaluate_masks
        self.train_s = 0.0
        self.points = []        # (step, training seconds so far, faithfulness)

    def __enter__(self):
        import importlib
        self.module = importlib.import_module("fastedge.prune")
        self.original = self.module._train_step

        def step(t, index, indices):
            if index == 0:      # the starting masks (a warm start's attribution alone)
                self.points.append((0, 0.0, self.evaluate_masks(t.em, self.k)))
            t0 = time.perf_counter()
            record = self.original(t, index, indices)
            self.train_s += time.perf_counter() - t0
            done = index + 1
            if done % self.every == 0 or done == t.cfg.steps:
                self.points.append((done, self.train_s, self.evaluate_masks(t.em, self.k)))
            return record
        self.module._train_step = step
        return self

    def __exit__(self, *exc):
        self.module._train_step = self.original
        return False

    def first(self, threshold: float):
        """(steps, training seconds) at the first check at or above `threshold`, else (None, None)."""
        for step, seconds, f in self.points:
            if f >= threshold:
                return step, seconds
        return None, None


def masks_of(em):
    return ([p.detach().clone() for p in em.edge_log_alpha],
            None if em.node_log_alpha is None else em.node_log_alpha.detach().clone())


def trace_size(setup: Setup, n_graph: int) -> int:
    """k_trace: the circuit size whose faithfulness the pruning runs are traced at."""
    if setup.truth is not None:
        return len(setup.truth.necessary)
    return int(round(setup.k_trace_fraction * n_graph))


def prune_variants(setup: Setup, scores: dict, k_trace: int) -> dict:
    """The three pruning runs (plain, warm-started, preselected) on `setup`,
    each traced at `k_trace` edges: label -> masks, own circuit, trace,
    training seconds, wall seconds, the scores it started from, steps."""
    import fastedge
    from fastedge.circuit import extract_circuit
    from fastedge.evaluate import evaluate

    def trace_faithfulness(em, k):
        circuit = extract_circuit(em, 1.0 - k / em.graph.n_edges)
        return faithfulness_of(evaluate(em, setup.eval_data, circuit, batch_size=128), setup.objective)[0]

    runs = {}
    variants = [("edge-pruning", None, {}),
                (PRUNING[1], WARM_FROM, {}),
                (PRUNING[2], PRESELECT_FROM, {"preselect": PRESELECT})]
    for label, init, extra in variants:
        options = dict(setup.prune_options, **extra)
        with Trace(setup.trace_every, k_trace, trace_faithfulness) as trace:
            t0 = time.perf_counter()
            result = fastedge.prune(setup.model, setup.task, init_from=scores[init] if init else None,
                                    **options)
            wall = time.perf_counter() - t0
        em = result.edge_model
        runs[label] = {"masks": masks_of(em), "own": result.circuit, "trace": trace,
                       "prune_s": trace.train_s, "wall_s": wall, "init": init, "steps": options["steps"]}
        em.unpatch()
    return runs


def attribute_all(setup: Setup, methods) -> tuple:
    """(graph, method -> EdgeScores, method -> seconds) for `methods` and the
    scores the warm and preselected runs start from."""
    import fastedge
    evaluator = Evaluator(setup)
    graph = evaluator.graph
    scores, timing = {}, {}
    for method in dict.fromkeys([*methods, WARM_FROM, PRESELECT_FROM]):
        t0 = time.perf_counter()
        scores[method] = fastedge.attribute(evaluator.em, setup.task, method=method, ig_steps=IG_STEPS,
                                            metric=setup.metric, batch_size=ATTRIBUTION_BATCH)
        _sync(evaluator.em)
        timing[method] = time.perf_counter() - t0
    evaluator.close()   # released before pruning patches the model again
    return graph, scores, timing


def _sync(em) -> None:
    import torch
    device = em.edge_log_alpha[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one model ------------------------------------------------------------------------------------------

def run_model(name: str, quick: bool = False, methods=ATTRIBUTION, steps=None) -> dict:
    """Every method on one model, in this process; returns its rows."""
    import torch
    torch.set_num_threads(1)
    setup = Setup(name, quick, steps=steps)
    rows = []
    graph, scores, timing = attribute_all(setup, methods)
    n_graph = graph.n_edges
    k_trace = trace_size(setup, n_graph)
    runs = prune_variants(setup, scores, k_trace)

    evaluator = Evaluator(setup)
    k = runs["edge-pruning"]["own"].n_edges
    k_truth = None if setup.truth is None else len(setup.truth.necessary)
    common = {"model": name, "n_graph_edges": n_graph, "k": k, "k_truth": k_truth,
              "k_trace": k_trace, "trace_threshold": TRACE_FAITHFULNESS, "load_average": os.getloadavg()[0]}

    def add_row(method, kind, ranking, **extra):
        row = dict(common, method=method, kind=kind, **extra)
        at_k = ranking.circuit(k)
        row.update(evaluator(at_k))
        row.update(areas(ranking, evaluator))
        if setup.truth is not None:
            row.update(truth_columns(setup.truth, ranking.circuit(k_truth)))
            row.update({key: value for key, value in truth_columns(setup.truth, at_k, "_at_k").items()
                        if key != "n_edges_truth_at_k"})
        rows.append(row)

    for method in methods:
        add_row(method, "attribution", Ranking(graph, setup.ablation, scores=scores[method]),
                time_s=timing[method], attribution_s=timing[method])
    for label, run in runs.items():
        attribution_s = timing[run["init"]] if run["init"] else None
        steps_to, seconds_to = run["trace"].first(TRACE_FAITHFULNESS)
        if seconds_to is not None and attribution_s is not None:
            seconds_to += attribution_s
        own = evaluator(run["own"])
        add_row(label, "pruning", Ranking(graph, setup.ablation, masks=run["masks"]),
                time_s=run["prune_s"] + (attribution_s or 0.0), attribution_s=attribution_s,
                prune_s=run["prune_s"], own_n_edges=run["own"].n_edges, own_faithfulness=own["faithfulness"],
                steps_to_threshold=steps_to, seconds_to_threshold=seconds_to, steps=run["steps"])
    evaluator.close()
    return {"model": name, "rows": rows,
            "truth": None if setup.truth is None else {"necessary": len(setup.truth.necessary),
                                                        "weight_composition": len(setup.truth.edges)}}


# -- the report ---------------------------------------------------------------------------------------------

def _f(value, fmt=".3f", none="–"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, fmt)


def markdown(results: list, revision: str, device: str, date: str, command: str) -> str:
    from fastedge.evaluate import MIB_EDGE_FRACTIONS
    lines = ["# Circuit discovery methods on known circuits (issue 13)", "",
             f"`{command}` on {device}, {date}, revision `{revision}`. One process per model, one torch "
             f"thread each. Attribution: {IG_STEPS} IG steps, on the training split. Pruning: the model's "
             f"default settings; warm start from the {WARM_FROM} scores; preselection keeps the top "
             f"{PRESELECT:.0%} of the edges by the {PRESELECT_FROM} scores trainable (warm-started from them) and "
             "fixes the rest at 0.", "",
             f"Columns at **k** (the plain Edge Pruning run's own circuit size): edges achieved, faithfulness "
             "(1 - D(circuit) / D(empty); D = KL to the full model, squared error for numerical Tracr "
             "programs), D, accuracy. CPR / CMD: MIB's areas over the edge fractions "
             f"{', '.join(f'{f:g}' for f in MIB_EDGE_FRACTIONS)}. Tracr, at the ground truth's size "
             "|N| (its necessary edges): recall of N, precision (share inside the weight-composition "
             "circuit), recovered (`GroundTruth.judge`: every necessary edge, nothing outside, every output "
             "reproduced); recall and recovered also at k. Pruning runs: their own circuit (edges, faithfulness), and the steps / seconds "
             f"until the circuit of k_trace edges first reached faithfulness {TRACE_FAITHFULNESS} (checked "
             "periodically; seconds of training, plus the attribution pass for warm starts). Time: "
             "attribution pass, pruning (training steps), or both.", ""]
    for res in results:
        rows = res["rows"]
        r0 = rows[0]
        truth = res.get("truth")
        head = (f"## {res['model']}: {r0['n_graph_edges']} edges, k = {r0['k']}, k_trace = {r0['k_trace']}"
                + (f", ground truth: {truth['necessary']} necessary of {truth['weight_composition']} "
                   f"weight-composition edges" if truth else ""))
        lines += [head, ""]
        cols = ["method", "time (s)", "edges", "faithfulness", r0["divergence_name"].upper(), "accuracy", "CPR",
                "CMD"]
        if truth:
            cols += ["recall N @k", "recovered @k", "recall N @|N|", "precision @|N|", "recovered @|N|"]
        cols += ["own circuit: edges / faithfulness", "steps / s to faithfulness"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["--:"] * (len(cols) - 1)) + "|"]
        for r in rows:
            cells = [r["method"], _f(r.get("time_s"), ".1f"), str(r["n_edges"]), _f(r["faithfulness"]),
                     _f(r["divergence"], ".3g"), _f(r["accuracy"]), _f(r.get("cpr")), _f(r.get("cmd"))]
            if truth:
                yes = {True: "yes", False: "no"}
                cells += [_f(r.get("recall_at_k"), ".2f"), yes.get(r.get("recovered_at_k"), "–"),
                          _f(r.get("recall"), ".2f"), _f(r.get("precision"), ".2f"),
                          yes.get(r.get("recovered"), "–")]
            if r["kind"] == "pruning":
                cells += [f"{r['own_n_edges']} / {_f(r['own_faithfulness'])}",
                          (f"{r['steps_to_threshold']} / {_f(r['seconds_to_threshold'], '.1f')}"
                           if r.get("steps_to_threshold") is not None else f"not in {r['steps']} steps")]
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- driver -------------------------------------------------------------------------------------------------

def _child_command(name: str, args) -> list:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--methods", *args.methods]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    return cmd + (["--quick"] if args.quick else [])


def _run_child(name: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(_child_command(name, args), capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help="'induction' and/or 'tracr:<program>' (default: %(default)s)")
    ap.add_argument("--methods", nargs="+", default=list(ATTRIBUTION), choices=ATTRIBUTION,
                    help="attribution methods in the table (pruning runs always)")
    ap.add_argument("--quick", action="store_true", help="a tenth of the pruning steps, a smaller task")
    ap.add_argument("--jobs", type=int, default=2, help="models run at once, one process each")
    ap.add_argument("--steps", type=int, default=None,
                    help="pruning steps instead of the models' defaults (the schedule scaled): smoke runs")
    ap.add_argument("--no-save", action="store_true", help="print the table, write nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_model(args.child, args.quick, tuple(args.methods), args.steps)))
        return 0
    import torch
    from results_csv import append_csv, cpu_slug, device_name, git_revision, significant
    revision = git_revision()
    torch.set_num_threads(1)
    device = device_name(torch.device("cpu"))
    command = "python bench/methods.py" + (" " + " ".join(argv) if argv else "")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda m: _run_child(m, args), args.models))
    now = datetime.now(timezone.utc)
    date = now.strftime("%Y-%m-%dT%H:%MZ")
    text = markdown(results, revision, device, date, command)
    print(text)
    if not args.no_save:
        results_dir = HERE / "results"
        machine = cpu_slug(device)
        (results_dir / f"methods-{machine}-{now.strftime('%Y%m%dT%H%M%SZ')}.md").write_text(text)
        append_csv(results_dir / "methods.csv",
                   [dict(r, date=date, revision=revision, device=device, command=command)
                    for res in results for r in res["rows"]], COLUMNS, significant(4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
