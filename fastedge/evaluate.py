"""Evaluation of a circuit (or the full model) on a task.

Metrics, averaged over the target positions of every example:

* ``kl``: KL(p_full || p_circuit) over the vocabulary (SPEC section 1);
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
areas under it: CPR (the area under the curve, higher is better) and CMD (the
area between the curve and 1, lower is better), both over the fraction of
edges kept, in [0, 1].
"""
from __future__ import annotations

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


def faithfulness_areas(kept_fractions: Sequence[float], faithfulness: Sequence[float]) -> dict:
    """MIB's areas over the fraction of edges kept: CPR = area under the
    faithfulness curve, CMD = area under |1 - faithfulness| (trapezoids over
    the points given, sorted by fraction kept)."""
    points = sorted(zip(kept_fractions, faithfulness))
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    cpr = cmd = 0.0
    for i in range(1, len(xs)):
        dx = xs[i] - xs[i - 1]
        cpr += dx * (ys[i] + ys[i - 1]) / 2
        cmd += dx * (abs(1 - ys[i]) + abs(1 - ys[i - 1])) / 2
    return {"cpr": cpr, "cmd": cmd}


def sweep(em: EdgeModel, data, sparsities: Sequence[float], *, batch_size: int = 32) -> dict:
    """Extract a circuit at each sparsity from the edge model's masks,
    evaluate it, and return the curve with its CPR and CMD."""
    from fastedge.circuit import extract_circuit
    rows = []
    for s in sparsities:
        circuit = extract_circuit(em, s)
        m = evaluate(em, data, circuit, batch_size=batch_size)
        rows.append({"target_sparsity": s, "edge_sparsity": circuit.edge_sparsity,
                     "faithfulness": m["faithfulness"], "kl": m["kl"], "accuracy": m["accuracy"]})
    areas = faithfulness_areas([1 - r["edge_sparsity"] for r in rows], [r["faithfulness"] for r in rows])
    return {"points": rows, **areas}
