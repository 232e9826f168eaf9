"""Evaluation of a circuit (or the full model) on a task.

Metrics, averaged over the target positions of every example:

* ``kl``: KL(p_full || p_circuit) over the vocabulary (docs/CONCEPTS.md sections 3 and 4);
* ``logit_diff``: logit of the clean answer minus logit of the corrupted answer;
* ``accuracy``: how often the top token is the clean answer;
* ``faithfulness``: the circuit's logit difference normalised between the
  empty circuit (0) and the full model (1).

Tasks whose answers are the model's own outputs (``meta["faithfulness"] ==
"objective"``: Tracr programs, `fastedge.tracr.tasks`) are scored on their
objective instead (`fastedge.objectives`: ``kl``, or ``mse`` for numerical
outputs): ``kl`` or ``mse`` against the full model; ``accuracy``: how often
the circuit's output equals the full model's (the argmax, or the value to
``meta["output_tolerance"]``); ``faithfulness``: 1 - D(circuit) / D(empty),
1 when the circuit reproduces the full model, 0 when it is no better than
the empty circuit.

A sweep over sparsities gives the faithfulness curve and the MIB benchmark's
areas under it (`faithfulness_areas`): CPR (the area under the curve, higher
is better) and CMD (the area between the curve and 1, lower is better), both
over the fraction of edges kept, from MIB's smallest circuit (0.1% of the
edges) to the whole model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastedge.model import EdgeModel


@dataclass
class TargetScores:
    """Per-target-position values gathered from one run over a task."""
    log_probs: torch.Tensor    # [T, V] float32
    clean_logit: torch.Tensor  # [T]
    corrupted_logit: torch.Tensor  # [T]
    correct: torch.Tensor      # [T] bool: top token == clean answer
    outputs: torch.Tensor      # [T, V] float32: the logits themselves


def _gather(logits: torch.Tensor, batch) -> TargetScores:
    mask = batch.target_mask.to(logits.device)
    picked = logits[mask].float()                       # [T, V]
    clean = batch.clean_answer.to(logits.device)[mask]
    corrupted = batch.corrupted_answer.to(logits.device)[mask]
    return TargetScores(
        log_probs=F.log_softmax(picked, dim=-1),
        clean_logit=picked.gather(1, clean[:, None])[:, 0],
        corrupted_logit=picked.gather(1, corrupted[:, None])[:, 0],
        correct=picked.argmax(-1) == clean,
        outputs=picked)


def _cat(scores: list[TargetScores]) -> TargetScores:
    return TargetScores(*(torch.cat([getattr(s, f) for s in scores])
                          for f in ("log_probs", "clean_logit", "corrupted_logit", "correct", "outputs")))


@torch.no_grad()
def run_scores(em: EdgeModel, data, *, batch_size: int = 32, full_model: bool = False) -> TargetScores:
    """Target-position scores of the edge model as it stands (its fixed circuit
    or its deterministic masks), or of the unpatched model (`full_model`)."""
    was_training = em.training
    em.eval()
    device = em.edge_log_alpha[0].device
    out = []
    try:
        for batch in data.batches(batch_size):
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            if full_model:
                logits = full_logits(em, ids, mask)
            else:
                logits = em(ids, batch.corrupted_input_ids.to(device), attention_mask=mask).logits
            out.append(_gather(logits, batch))
    finally:
        em.train(was_training)
    return _cat(out)


def full_logits(em: EdgeModel, input_ids, attention_mask):
    """The unpatched model's logits with positions that skip padding."""
    from fastedge.model import position_ids_from_attention_mask
    return em.model(input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_attention_mask(attention_mask)).logits


def kl_divergence(full: TargetScores, circuit: TargetScores) -> float:
    """Mean over target positions of KL(p_full || p_circuit)."""
    kl = (full.log_probs.exp() * (full.log_probs - circuit.log_probs)).sum(-1)
    return kl.mean().item()


def summarize(scores: TargetScores, full: TargetScores) -> dict:
    return {"kl": kl_divergence(full, scores),
            "logit_diff": (scores.clean_logit - scores.corrupted_logit).mean().item(),
            "accuracy": scores.correct.float().mean().item()}


def _objective_metrics(scores: TargetScores, full: TargetScores, empty: TargetScores, data) -> dict:
    """Metrics of a task scored on its objective (module docstring)."""
    from fastedge import objectives
    objective = objectives.objective_of(data)
    ref = objective.reference(full.outputs)

    def div(s: TargetScores) -> float:
        return objective.divergence(ref, s.outputs).item()

    def agree(s: TargetScores) -> float:
        if objective.name == "mse":
            tol = float(data.meta.get("output_tolerance", 0.0))
            same = ((s.outputs - full.outputs).abs() <= tol).all(-1)
        else:
            same = s.outputs.argmax(-1) == full.outputs.argmax(-1)
        return same.float().mean().item()

    ours, none = div(scores), div(empty)
    return {objective.name: ours, f"empty_{objective.name}": none, "accuracy": agree(scores),
            "empty_accuracy": agree(empty), "full_accuracy": 1.0,
            "faithfulness": 1.0 - ours / none if none > 0 else float("nan")}


def evaluate(em: EdgeModel, data, circuit=None, *, batch_size: int = 32) -> dict:
    """Metrics of `circuit` (a `fastedge.circuit.Circuit`; None: the edge
    model's current masks) against the full model and the empty circuit."""
    saved = em._fixed_masks
    try:
        full = run_scores(em, data, batch_size=batch_size, full_model=True)
        em.set_circuit([])
        empty = run_scores(em, data, batch_size=batch_size)
        if circuit is not None:
            em.set_circuit(circuit.edges, circuit.nodes)
        else:
            em._fixed_masks = saved
        ours = run_scores(em, data, batch_size=batch_size)
    finally:
        em._fixed_masks = saved
    if data.meta.get("faithfulness") == "objective":
        metrics = _objective_metrics(ours, full, empty, data)
        if circuit is not None:
            metrics["edge_sparsity"] = circuit.edge_sparsity
            metrics["n_edges"] = circuit.n_edges
        return metrics
    metrics = summarize(ours, full)
    full_m = summarize(full, full)
    empty_m = summarize(empty, full)
    metrics["full_logit_diff"] = full_m["logit_diff"]
    metrics["full_accuracy"] = full_m["accuracy"]
    metrics["empty_logit_diff"] = empty_m["logit_diff"]
    metrics["empty_kl"] = empty_m["kl"]
    metrics["faithfulness"] = normalized_faithfulness(metrics["logit_diff"], full_m["logit_diff"],
                                                      empty_m["logit_diff"])
    if not math.isfinite(metrics["faithfulness"]):   # the reason, for files (written as null + this note)
        diffs = (metrics["logit_diff"], full_m["logit_diff"], empty_m["logit_diff"])
        if all(math.isfinite(d) for d in diffs):
            metrics["faithfulness_note"] = (
                f"undefined: the full model and the empty circuit have the same logit difference "
                f"({diffs[1]:.6g} and {diffs[2]:.6g}) on this task, so there is nothing to normalise by")
        else:
            metrics["faithfulness_note"] = (
                f"not a number: the logit differences of the circuit, the full model and the empty "
                f"circuit are {diffs[0]}, {diffs[1]} and {diffs[2]}")
    if circuit is not None:
        metrics["edge_sparsity"] = circuit.edge_sparsity
        metrics["n_edges"] = circuit.n_edges
    return metrics


def normalized_faithfulness(value: float, full: float, empty: float) -> float:
    """(m(circuit) - m(empty)) / (m(full) - m(empty)); NaN when the full model
    and the empty circuit agree (the task does not separate them)."""
    denom = full - empty
    if abs(denom) < 1e-12:
        return float("nan")
    return (value - empty) / denom


# MIB's circuit sizes: fractions of the edges kept (MIB circuit track, evaluate_area_under_curve)
MIB_EDGE_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MIB_RANGE = (MIB_EDGE_FRACTIONS[0], MIB_EDGE_FRACTIONS[-1])


def faithfulness_areas(kept_fractions: Sequence[float], faithfulness: Sequence[float]) -> dict:
    """MIB's CPR and CMD of a faithfulness curve.

    As the MIB circuit track defines them: with ``x`` the fraction of the
    graph's edges a circuit keeps (the size requested of it) and ``f(x)``
    its normalised faithfulness (`normalized_faithfulness`), the curve is
    piecewise linear between the points and

    * CPR = integral of ``f(x)`` dx (higher is better),
    * CMD = integral of ``|1 - f(x)|`` dx (lower is better; 0 only for a
      curve at 1 everywhere),

    by the trapezoid rule over ``x`` from 0.001 to 1 on a linear scale
    (MIB evaluates circuits of 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%
    and 100% of the edges: `MIB_EDGE_FRACTIONS`, the default of `sweep`).
    Other points are allowed but must span that range (a point at or below
    0.001 and one at 1): where the lowest lies below 0.001 the curve is cut
    at 0.001 by linear interpolation. A ValueError refuses points that
    cannot define the areas: fewer than two, fractions outside [0, 1] or
    repeated, a range that stops short of [0.001, 1], or a faithfulness
    that is not a finite number (a task on which the full model and the
    empty circuit agree).
    """
    xs = [float(x) for x in kept_fractions]
    ys = [float(y) for y in faithfulness]
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} edge fractions but {len(ys)} faithfulness values")
    _check_fractions(xs)
    bad = [(x, y) for x, y in zip(xs, ys) if not math.isfinite(y)]
    if bad:
        raise ValueError(f"CPR and CMD need a finite faithfulness at every point; at edge fraction "
                         f"{bad[0][0]:g} it is {bad[0][1]} (the full model and the empty circuit agree on "
                         f"this task, so faithfulness is undefined)")
    points = sorted(zip(xs, ys))
    lo = MIB_RANGE[0]
    # cut the curve at MIB's smallest circuit
    while len(points) > 1 and points[1][0] <= lo:
        points.pop(0)
    (x0, y0), (x1, y1) = points[0], points[1]
    if x0 < lo:
        points[0] = (lo, y0 + (y1 - y0) * (lo - x0) / (x1 - x0))
    cpr = cmd = 0.0
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        cpr += (xb - xa) * (ya + yb) / 2
        cmd += (xb - xa) * (abs(1 - ya) + abs(1 - yb)) / 2
    return {"cpr": cpr, "cmd": cmd}


def _check_fractions(xs: Sequence[float]) -> None:
    if len(xs) < 2:
        raise ValueError(f"CPR and CMD are areas under a curve over the fraction of edges kept, from "
                         f"{MIB_RANGE[0]} to {MIB_RANGE[1]} (MIB); {len(xs)} point(s) cannot define them: "
                         f"sweep 'mib' (MIB's fractions), or sparsities from 0 to at least 0.999")
    for x in xs:
        if not (math.isfinite(x) and 0.0 <= x <= 1.0):
            raise ValueError(f"edge fractions lie in [0, 1], got {x!r}")
    if len(set(xs)) != len(xs):
        dup = next(x for x in xs if xs.count(x) > 1)
        raise ValueError(f"edge fraction {dup:g} appears more than once")
    # (a fraction "at or below 0.001" up to rounding: 1 - 0.999 is 0.0010000000000000009)
    if min(xs) > MIB_RANGE[0] + 1e-12 or max(xs) < MIB_RANGE[1]:
        raise ValueError(f"CPR and CMD are areas over the fraction of edges kept from {MIB_RANGE[0]} to "
                         f"{MIB_RANGE[1]} (MIB); these points cover only {min(xs):g} to {max(xs):g}: "
                         f"include sparsity 0 (the whole graph) and at least 0.999, or sweep 'mib'")


def check_sweep(sparsities: Optional[Sequence[float]]) -> list:
    """The edge sparsities of a sweep, checked before anything runs: None
    gives MIB's (``1 - MIB_EDGE_FRACTIONS``); given ones must be numbers in
    [0, 1] whose kept fractions span MIB's range (`faithfulness_areas`)."""
    if sparsities is None:
        return [1.0 - f for f in MIB_EDGE_FRACTIONS]
    out = []
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= 1:
            raise ValueError(f"sweep sparsities are numbers in [0, 1], got {s!r}")
        out.append(float(s))
    _check_fractions([1.0 - s for s in out])
    return out


def sweep(em: EdgeModel, data, sparsities: Optional[Sequence[float]] = None, *, batch_size: int = 32) -> dict:
    """Extract a circuit at each edge sparsity from the edge model's masks,
    evaluate it, and return the curve with MIB's CPR and CMD
    (`faithfulness_areas`, over the requested fractions kept ``1 - s``, as
    MIB uses the requested sizes). ``sparsities`` defaults to MIB's circuit
    sizes; given ones must span MIB's range, checked before any evaluation
    (`check_sweep`). When faithfulness is undefined (the full model and the
    empty circuit agree on the task) ``cpr`` and ``cmd`` are None and
    ``areas_note`` says why."""
    from fastedge.circuit import extract_circuit
    return _sweep(em, data, check_sweep(sparsities), lambda s: extract_circuit(em, s), batch_size)


def sweep_scores(em: EdgeModel, data, scores, sparsities: Optional[Sequence[float]] = None, *,
                 batch_size: int = 32, absolute: bool = True) -> dict:
    """`sweep` for attribution scores: at each edge sparsity the circuit of
    the top-scoring edges (`fastedge.Circuit.from_scores` at that sparsity,
    ranked by ``|score|``, or signed with ``absolute=False``, with the dead-edge
    pruning of the edge model's ablation), evaluated like `sweep`'s, with
    MIB's CPR and CMD. `scores`: `fastedge.EdgeScores` of the edge model's
    graph. A point whose circuit could not hit its count exactly carries the
    reason in ``count_note``."""
    from fastedge.attribution import EdgeScores
    from fastedge.circuit import Circuit
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be fastedge.EdgeScores, got {type(scores).__name__}")
    if scores.graph != em.graph:
        raise ValueError(f"the scores are of another graph ({scores.graph.n_edges} edges) than the edge "
                         f"model's ({em.graph.n_edges} edges)")
    sparsities = check_sweep(sparsities)

    def circuit_at(s):
        import warnings
        with warnings.catch_warnings():   # a missed count is reported per point (count_note)
            warnings.simplefilter("ignore")
            return Circuit.from_scores(scores, sparsity=s, absolute=absolute, ablation=em.ablation)

    result = _sweep(em, data, sparsities, circuit_at, batch_size)
    result.update(scores_method=scores.method, absolute=bool(absolute))
    return result


def _sweep(em: EdgeModel, data, sparsities: list, circuit_at, batch_size: int) -> dict:
    """Evaluate ``circuit_at(s)`` at each sparsity; the curve and MIB's areas."""
    rows = []
    for s in sparsities:
        circuit = circuit_at(s)
        m = evaluate(em, data, circuit, batch_size=batch_size)
        # (rounded: 1 - 0.999 is 0.0010000000000000009, MIB's 0.001 is meant)
        rows.append({"target_sparsity": s, "edge_fraction": round(1.0 - s, 12),
                     "edge_sparsity": circuit.edge_sparsity,
                     "n_edges": circuit.n_edges, "faithfulness": m["faithfulness"], "kl": m["kl"],
                     "accuracy": m["accuracy"]})
        if "count_note" in circuit.info:
            rows[-1]["count_note"] = circuit.info["count_note"]
    result = {"points": rows, "definition": "MIB: trapezoids of faithfulness over the fraction of edges "
                                            "kept, from 0.001 to 1"}
    try:
        result.update(faithfulness_areas([r["edge_fraction"] for r in rows], [r["faithfulness"] for r in rows]))
    except ValueError as exc:
        result.update(cpr=None, cmd=None, areas_note=str(exc))
    return result
