"""Submissions to the MIB circuit-localisation leaderboard.

MIB's README ("Submitting to the MIB Leaderboard", hannamw/MIB-circuit-track)
asks for one folder per task and model, named ``{task}_{model}`` with the
task's words joined by ``-`` (``ioi_gpt2``, ``arc-easy_llama3``), holding
*either*

1. one file of floating-point importance scores for every edge, or
2. binary circuits, one with at most each of 0.1%, 0.2%, 0.5%, 1%, 2%, 5%,
   10%, 20% and 50% of the edges of the model,

in EAP-IG's graph format (`fastedge.eap_graph`; ``.json`` or ``.pt``; fastedge
writes ``.json``). `export_submission` writes either form, or both.

Decisions, and what was not checked:

* **File names.** The importance file is ``importances.json``, the name
  MIB's own scripts write and read. MIB does not name the binary circuits;
  fastedge writes ``circuit_0.1pct.json``, ``circuit_0.2pct.json``, ...,
  ``circuit_50pct.json``. These names and the rest of the layout were not
  checked against the leaderboard's submission checker (it is not public).
* **Which sizes.** The README's list of sizes reads {0, 0.1, 0.2, 0.5, 1, 2,
  5, 10, 20, 50} percent, ten values, while the same paragraph asks for 9
  files, the issue lists the nine non-zero ones, and MIB's evaluation
  (``evaluate_area_under_curve``) builds its curve at 0.1% ... 100% without
  a 0% point (the empty circuit is its normalisation, not a point). The
  default is therefore the nine non-zero fractions (`MIB_CIRCUIT_FRACTIONS`);
  ``fractions=`` adds 0 (an empty circuit, ``circuit_0pct.json``) or others.
* **Counting in MIB's graph.** A fraction is of the edges of EAP-IG's graph
  of the model (k/v inputs ungrouped, one ``input`` node:
  `fastedge.eap_graph.eap_edge_count`), and a circuit's size is its count
  there (`fastedge.eap_graph.eap_edge_count_of`). The limit is
  ``int(fraction * edges)``, as MIB's evaluation computes its top-n sizes.
  Each circuit comes from `fastedge.Circuit.from_scores` (the top edges,
  then dead-edge pruning) at the largest fastedge edge count whose circuit
  stays within the limit in MIB's count, found by binary search.
* **Layout.** ``out_dir/{method}/{task}_{model}/`` for one form (upload the
  ``{method}`` folder, as MIB's scripts lay out theirs); with
  ``form="both"``, since one folder holds one form,
  ``out_dir/{method}/importances/{task}_{model}/importances.json`` and
  ``out_dir/{method}/circuits/{task}_{model}/circuit_*.json``.
* **Scores.** Attribution scores are written oriented so that higher means
  more important to the metric: fastedge's gate sign (``d metric / d
  mask``) for the logit difference, which is the sign of MIB's own
  importance files (EAP-IG's (corrupted - clean) convention applied to the
  *negated* logit difference that MIB attributes), likewise for
  ``"logprob"``, and the opposite sign for ``"kl"`` (a divergence, lower
  is better). MIB's evaluation ranks
  signed scores unless run with ``--absolute``. A pruning run's masks
  become scores by their ``log_alpha`` (`fastedge.EdgeScores.from_masks`):
  higher is kept more surely, to be ranked signed (``absolute=False``).
* **Binary circuits' scores.** EAP-IG's loader needs a score for every
  edge; a binary circuit's file has 1.0 for its edges and 0.0 for the others.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastedge.eap_graph import (circuit_to_eap_graph_json, eap_edge_count, eap_edge_count_of, eap_edge_count_of_kept,
                                scores_to_eap_graph_json)

__all__ = ["MIB_CIRCUIT_FRACTIONS", "FORMS", "IMPORTANCES_FILE", "export_submission", "folder_name",
           "circuit_file_name", "edge_limit", "submission_scores", "circuit_within"]

MIB_CIRCUIT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
FORMS = ("scores", "circuits", "both")
IMPORTANCES_FILE = "importances.json"
# the task/model folders MIB's leaderboard has columns for (MIB's print_results.py)
MIB_FOLDERS = frozenset({"ioi_gpt2", "ioi_qwen2.5", "ioi_gemma2", "ioi_llama3", "mcqa_qwen2.5", "mcqa_gemma2",
                         "mcqa_llama3", "arithmetic-addition_llama3", "arithmetic-subtraction_llama3",
                         "arc-easy_gemma2", "arc-easy_llama3", "arc-challenge_llama3", "ioi_interpbench"})
_CIRCUIT_FILE = re.compile(r"^circuit_[0-9.]+pct\.json$")


def _tag(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty name, got {value!r}")
    if "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{what} {value!r} must be a plain name, not a path")
    return value.strip()


def folder_name(task_tag: str, model_tag: str) -> str:
    """MIB's ``{task}_{model}`` folder name (the task's ``_`` become ``-``)."""
    task = _tag(task_tag, "the task tag").replace("_", "-")
    model = _tag(model_tag, "the model tag")
    if "_" in model:
        raise ValueError(f"the model tag {model!r} must not contain '_': MIB's folder name "
                         f"{task}_{model} separates the task from the model by the first '_'")
    return f"{task}_{model}"


def circuit_file_name(fraction: float) -> str:
    """``circuit_{percent}pct.json`` (``circuit_0.1pct.json``, ``circuit_50pct.json``)."""
    return f"circuit_{round(fraction * 100, 9):g}pct.json"


def edge_limit(graph, fraction: float) -> int:
    """The most edges of EAP-IG's graph a circuit at `fraction` may keep:
    ``int(fraction * edges)``, as MIB's evaluation sizes its top-n circuits."""
    return int(fraction * eap_edge_count(graph))


def _check_fractions(fractions: Sequence[float]) -> list:
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 <= f < 1:
            raise ValueError(f"circuit fractions are numbers in [0, 1) (the whole graph is MIB's own "
                             f"100% point), got {f!r}")
        out.append(float(f))
    if not out:
        raise ValueError("give at least one circuit fraction")
    if len(set(out)) != len(out):
        raise ValueError(f"a circuit fraction appears twice in {list(fractions)}")
    return sorted(out)


def submission_scores(scores_or_masks, *, graph=None):
    """(`EdgeScores` oriented for MIB, whether to rank by absolute value):
    attribution scores in the sign where higher means more important (gate
    sign; the opposite for "kl"), ranked by absolute value like
    `fastedge.Circuit.from_scores` and EAP-IG's ``apply_topn`` by default;
    masks (an `EdgeModel`, its state dict, per-group log_alphas with
    `graph`) as their log_alphas, ranked signed."""
    from fastedge.attribution import EdgeScores
    if isinstance(scores_or_masks, EdgeScores):
        s = scores_or_masks
        if s.method == "edge-pruning":
            return s, False
        return s.with_sign("eap-ig" if s.metric == "kl" else "gate"), True
    return EdgeScores.from_masks(scores_or_masks, graph=graph), False


def circuit_within(scores, limit: int, *, absolute: bool = True):
    """The circuit of `Circuit.from_scores` at the largest fastedge edge
    count whose size in EAP-IG's graph is at most `limit`; the result always
    respects the limit.

    The search over the count starts from a guess: the size of the longest
    ranked prefix whose pruned circuit fits (one dead-edge pruning per step
    of a binary search, far cheaper than a `from_scores` call); from there
    it steps up (or down) by 1, 2, 4, ... edges until the limit is crossed,
    then bisects. Sizes grow with the count, so this is the binary search
    over the count, begun close to its answer."""
    from fastedge.circuit import Circuit, prune_dead_edges
    graph = scores.graph
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")

    def build(k):
        with warnings.catch_warnings():   # from_scores warns when pruning misses k; any k within the limit does
            warnings.simplefilter("ignore")
            return Circuit.from_scores(scores, n_edges=k, absolute=absolute)

    def fits(c) -> bool:
        return eap_edge_count_of(c) <= limit

    good, good_c = 0, build(0)        # invariant: build(good) fits (build also checks the scores)
    # at most len(embeddings) fastedge edges (the embeddings' into one reader) share one EAP edge
    bad = min(graph.n_edges, limit * len(graph.embeddings)) + 1    # invariant: counts >= bad do not fit
    flat = scores.flat()
    order = torch.argsort(flat.abs() if absolute else flat, descending=True, stable=True)
    forward = scores.ablation == "interchange"

    def prefix(k):
        raw = torch.zeros(graph.n_edges, dtype=torch.bool)
        raw[order[:k]] = True
        return prune_dead_edges(raw, graph, forward=forward)

    lo, hi = 0, graph.n_edges
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if eap_edge_count_of_kept(prefix(mid), graph) <= limit:
            lo = mid
        else:
            hi = mid - 1
    guess = min(int(prefix(lo).sum()), bad - 1)
    if guess > good:
        c = build(guess)
        if fits(c):
            good, good_c, step = guess, c, 1
            while good + step < bad:
                c = build(good + step)
                if not fits(c):
                    bad = good + step
                    break
                good, good_c, step = good + step, c, step * 2
        else:
            bad, step = guess, 1
            while bad - step > good:
                c = build(bad - step)
                if fits(c):
                    good, good_c = bad - step, c
                    break
                bad, step = bad - step, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        c = build(mid)
        if fits(c):
            good, good_c = mid, c
        else:
            bad = mid
    return good_c


def _refuse_other_form(folder: Path, writing: str) -> None:
    if not folder.is_dir():
        return
    if writing == "circuits":
        other = [p.name for p in folder.iterdir() if p.name in (IMPORTANCES_FILE, "importances.pt")]
    else:
        other = [p.name for p in folder.iterdir() if _CIRCUIT_FILE.match(p.name)]
    if other:
        raise ValueError(f"{folder} already holds {', '.join(sorted(other))}: a MIB folder holds either one "
                         f"importance file or the binary circuits, not both; remove them or give another "
                         f"output folder")


def export_submission(scores_or_masks, out_dir, *, model_tag: str, task_tag: str, method_tag: str,
                      form: str = "scores", fractions: Sequence[float] = MIB_CIRCUIT_FRACTIONS,
                      absolute: Optional[bool] = None, d_model: Optional[int] = None, graph=None) -> dict:
    """Write a method's result in MIB's submission layout (module docstring).

    `scores_or_masks`: `fastedge.EdgeScores` (from `fastedge.attribute`, or
    a pruning run's via `EdgeScores.from_masks`), or masks (an `EdgeModel`,
    its state dict, or per-group log_alphas with `graph`). `form`: "scores"
    (``importances.json``), "circuits" (one binary circuit per fraction of
    `fractions`) or "both". `absolute`: rank the binary circuits' edges by
    absolute score (default: True for attribution scores, False for
    masks). `d_model`: the model's hidden size where the scores do not
    record it (masks do not).

    Returns ``{"importances": path or None, "circuits": [{"fraction",
    "path", "limit", "n_edges_mib", "n_edges", "n_edges_requested"}, ...],
    "folders": [...], "n_edges_mib": edges of EAP-IG's graph, "absolute",
    "sign"}`` (``n_edges_requested``: the `Circuit.from_scores` count the
    circuit was built at)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    folder = folder_name(task_tag, model_tag)
    method = _tag(method_tag, "the method tag")
    wanted = _check_fractions(fractions) if form != "scores" else []
    scores, signed_default = submission_scores(scores_or_masks, graph=graph)
    if d_model is not None:
        scores.d_model = int(d_model)
    if scores.d_model is None:
        raise ValueError("EAP-IG's graph config needs the model's hidden size, which these scores do not "
                         "record (masks never do): pass d_model=")
    absolute = signed_default if absolute is None else bool(absolute)
    if folder not in MIB_FOLDERS:
        warnings.warn(f"MIB's leaderboard has no {folder} (its folders: {', '.join(sorted(MIB_FOLDERS))}); "
                      f"writing it anyway", stacklevel=2)
    root = Path(out_dir) / method
    if form == "both":
        score_dir, circuit_dir = root / "importances" / folder, root / "circuits" / folder
    else:
        score_dir = circuit_dir = root / folder
    result = {"importances": None, "circuits": [], "folders": [], "n_edges_mib": eap_edge_count(scores.graph),
              "absolute": absolute, "sign": scores.sign}
    if form in ("scores", "both"):
        _refuse_other_form(score_dir, "scores")
        score_dir.mkdir(parents=True, exist_ok=True)
        path = score_dir / IMPORTANCES_FILE
        scores_to_eap_graph_json(scores, path)
        result["importances"] = str(path)
        result["folders"].append(str(score_dir))
    if form in ("circuits", "both"):
        _refuse_other_form(circuit_dir, "circuits")
        circuit_dir.mkdir(parents=True, exist_ok=True)
        for fraction in wanted:
            limit = edge_limit(scores.graph, fraction)
            circuit = circuit_within(scores, limit, absolute=absolute)
            path = circuit_dir / circuit_file_name(fraction)
            circuit_to_eap_graph_json(circuit, path, d_model=scores.d_model)
            result["circuits"].append({"fraction": fraction, "path": str(path), "limit": limit,
                                       "n_edges_mib": eap_edge_count_of(circuit), "n_edges": circuit.n_edges,
                                       "n_edges_requested": circuit.info["target_n_edges"]})
        result["folders"].append(str(circuit_dir))
    return result


def load_masks_as_scores(path, *, d_model: Optional[int] = None):
    """A pruning run's ``masks.pt`` (or checkpoint) as `EdgeScores` of its
    log_alphas. The hidden size, ablation, model and task come from the
    ``circuit.json`` beside it when that circuit is of the same graph
    (`d_model` overrides)."""
    import json
    from fastedge.attribution import EdgeScores
    from fastedge.graph import EdgeGraph
    from fastedge.prune import load_checkpoint_file
    state = load_checkpoint_file(path, "masks file")
    if state.get("format") == "fastedge.scores/1":
        raise ValueError(f"{os.fspath(path)} holds attribution scores (fastedge attribute), not a pruning run's "
                         f"masks: give it as scores (export-mib --scores)")
    if "graph" not in state or "edge_model" not in state:
        raise ValueError(f"{os.fspath(path)}: a masks file holds the graph and the edge model's masks; this "
                         f"one has {', '.join(sorted(state))}")
    graph = EdgeGraph.from_dict(state["graph"])
    meta = {}
    beside = Path(path).with_name("circuit.json")
    if beside.is_file():
        try:
            c = json.loads(beside.read_text())
            if c.get("graph") == graph.to_dict():
                extraction = c.get("extraction") or {}
                if isinstance(extraction.get("d_model"), int):
                    meta["d_model"] = extraction["d_model"]
                for key, field in (("ablation", "ablation"), ("model", "model_name"), ("task", "task")):
                    if isinstance(c.get(key), str) and c[key]:
                        meta[field] = c[key]
        except (OSError, ValueError, AttributeError):
            pass   # a damaged circuit.json only loses the extras
    if isinstance(state.get("config"), dict) and isinstance(state["config"].get("ablation"), str):
        meta.setdefault("ablation", state["config"]["ablation"])
    if d_model is not None:
        meta["d_model"] = int(d_model)
    return EdgeScores.from_masks(state["edge_model"], graph=graph, **meta)
