"""From learned masks to a circuit, and circuits as files (docs/CONCEPTS.md section 4).

A `Circuit` is a set of kept edges ``(writer, reader)`` in the names of
docs/CONCEPTS.md section 1, the writers (nodes) it keeps, and the `EdgeGraph` they belong to.

`extract_circuit(em, target_sparsity)` turns an `EdgeModel`'s mask
``log_alpha``s (or plain tensors) into a circuit:

1. **Deterministic masks.** Edge ``(w, r)`` has the evaluation value
   ``z = sigmoid(0.8 * log_alpha / beta)``; writer ``w`` has
   ``s = sigmoid(0.8 * node_log_alpha / beta)`` (1 when the model has no node
   masks).
2. **Node removal.** A writer whose deterministic node mask is
   ``<= node_threshold`` (default 0.5, i.e. ``node_log_alpha <= 0``) is
   removed with all its out-edges. The soft value is never exactly 0, so
   the authors' "node mask 0" needs a threshold; 0.5 is the midpoint of the
   deterministic range and the value at which the node's hard-concrete
   sample is more likely on than off. Node masks are not part of the
   sparsity search: the edge threshold alone sets the edge count.
3. **Threshold search.** Kept edges are those with ``z > threshold``. The
   threshold is searched so that the circuit keeps
   ``round((1 - target_sparsity) * n_edges)`` edges. The default search
   (``method="exact"``) is a binary search over the *sorted* mask values
   (ordered by ``log_alpha``, so values that round to the same float still
   order correctly): it is the authors' bisection on [0, 1] carried to
   infinite resolution, and it hits the requested count exactly whenever
   the mask values are distinct. ``method="bisect"`` is the authors' plain
   bisection of the threshold in [0, 1], stopped when the bracket is
   narrower than ``tol`` (1e-5): it may miss the count by the number of
   values closer together than ``tol``. With ties (or too few candidate
   edges) the count closest to the request is taken (on equal distance, the
   sparser one) and the achieved sparsity is what `Circuit.edge_sparsity`
   reports.
4. **Dead-edge pruning** (``prune_dead=True``), repeated to a fixed point:

   * *backward* (always): an edge into a reader is dropped when the
     reader's component has no kept out-edge path to ``resid_post``. The
     component of ``a{l}.h{i}.q`` is head ``a{l}.h{i}``; of
     ``a{l}.h{j}.k``/``.v`` every query head of k/v group ``j``
     (``i // (H / H_kv) == j``); of ``m{l}`` the MLP ``m{l}``.
     Consequently a writer whose kept out-edges all go to such readers
     reaches no kept reader and loses them. This never changes the
     circuit's logits under any ablation.
   * *forward* (interchange ablation only): an edge out of a writer that is
     fed by no kept edge is dropped. Head ``a{l}.h{i}`` is fed by its
     readers ``a{l}.h{i}.q`` and the k/v readers of its group; ``m{l}`` by
     reader ``m{l}``; embeddings are always fed. Under interchange ablation
     a component whose readers all receive the corrupted residual outputs
     exactly its corrupted value, so its delta ``y - y~`` is 0 and its
     out-edges change nothing. Under zero or mean ablation the same
     component's output differs from its ablated value, so there this rule
     would change the circuit's function and is not applied.

   **Pruning and the target.** Pruning removes edges, so the search is on
   the *final* circuit: the size after pruning of the top-``k`` edges is
   non-decreasing in ``k`` (more edges only add paths), and the search
   picks the threshold whose pruned circuit is closest to the requested
   count. The final count can jump when one edge completes a path (then
   the request is not exactly achievable); `Circuit.edge_sparsity` is the
   achieved value and ``circuit.info`` records the threshold and how many
   edges pruning removed.

`extract_circuit_by_threshold(em_or_masks, threshold=0.5)` skips step 3:
it keeps the edges whose deterministic mask is ``> threshold`` (0.5 by
default: ``log_alpha > 0``), then applies steps 2 and 4. `fastedge.prune`
uses it for training targets at or above 1, where an edge count means
nothing (the authors push harder with targets of 1.02 and 1.2).

`Circuit.nodes` after extraction are the writers that pass the node
threshold *and* keep at least one out-edge (a writer without out-edges has
no effect on the circuit).

Files
-----
``circuit.save(path)`` writes ``{"format": "fastedge.Circuit/1", "model",
"config_hash", "graph", "task", "ablation", "edges": [[w, r], ...], "nodes",
"edge_sparsity", "node_sparsity", "n_edges", "metrics", "extraction"}``
(``"scores"``/``"node_scores"`` too with ``include_scores=True``).
`Circuit.from_edge_list` / `Circuit.to_edge_list` exchange the authors'
``edges.json`` (a JSON list of ``[writer, reader]`` pairs).
`Circuit.to_eap_graph_json` writes the graph format of EAP-IG and the MIB
benchmark (see its docstring for the name mapping).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from fastedge import constants
from fastedge.graph import EdgeGraph
from fastedge.graph import edge_indices as _edge_indices
from fastedge.graph import writer_indices as _writer_indices

__all__ = ["Circuit", "extract_circuit", "extract_circuit_by_threshold", "compare_circuits", "CIRCUIT_FORMAT",
           "prune_dead_edges", "deterministic_edge_masks", "circuit_from_scores", "joining_edges"]

CIRCUIT_FORMAT = "fastedge.Circuit/1"
ABLATIONS = ("interchange", "zero", "mean")
_SCALE = constants.DETERMINISTIC_SCALE / constants.BETA

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------
# Edge indexing helpers
# ---------------------------------------------------------------------------------------------

def _group_blocks(graph: EdgeGraph) -> list[tuple[int, int, int]]:
    """(first edge index, n_readers, n_writers) of each reader group's block of
    edges; a block is the group's [R, W] mask flattened row-major."""
    return [(graph.reader_edge_start[g.first_reader], g.n_readers, g.n_writers) for g in graph.groups]


def _edge_endpoints(graph: EdgeGraph) -> tuple[Tensor, Tensor]:
    """Writer and reader index of every edge, in graph edge order."""
    ws, rs = [], []
    for g in graph.groups:
        ws.append(torch.arange(g.n_writers).repeat(g.n_readers))
        rs.append(torch.arange(g.first_reader, g.first_reader + g.n_readers).repeat_interleave(g.n_writers))
    return torch.cat(ws), torch.cat(rs)


def _heads_per_kv(graph: EdgeGraph) -> int:
    return graph.n_heads // graph.n_kv_heads


# ---------------------------------------------------------------------------------------------
# The circuit
# ---------------------------------------------------------------------------------------------

@dataclass
class Circuit:
    """A circuit: kept ``(writer, reader)`` edges and kept writers of `graph`.

    Construction validates every name and edge, removes duplicates and sorts
    edges into graph edge order and nodes into writer order. Every edge's
    writer must be among the nodes.

    Optional extras: ``scores`` (``[graph.n_edges]`` deterministic edge mask
    values, graph edge order), ``node_scores`` (``[graph.n_writers]``), and
    ``info`` (how the circuit was extracted: threshold, target, ...), and
    ``node_labels`` (writer name -> short texts that drawings show beside
    it: for a Tracr model, the RASP operations the writer computes).
    """
    edges: list
    nodes: list
    graph: EdgeGraph
    model_name: str = ""
    task: str = ""
    ablation: str = "interchange"
    metrics: dict = field(default_factory=dict)
    scores: Optional[Tensor] = field(default=None, repr=False)
    node_scores: Optional[Tensor] = field(default=None, repr=False)
    info: dict = field(default_factory=dict)
    node_labels: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.graph, EdgeGraph):
            raise TypeError(f"graph must be an EdgeGraph, got {type(self.graph).__name__}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        g = self.graph
        idx = sorted(set(_edge_indices(self.edges, g)))
        self.edges = [g.edge(i) for i in idx]
        w_idx = sorted(set(_writer_indices(self.nodes, g)))
        self.nodes = [g.writers[i] for i in w_idx]
        node_set = set(self.nodes)
        for w, r in self.edges:
            if w not in node_set:
                raise ValueError(f"edge [{w!r}, {r!r}] leaves writer {w!r}, which is not among the "
                                 f"circuit's nodes (list it in nodes, or drop the edge)")
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
            if self.scores.shape != (g.n_edges,):
                raise ValueError(f"scores must have one value per graph edge ({g.n_edges}), "
                                 f"got shape {tuple(self.scores.shape)}")
        if self.node_scores is not None:
            self.node_scores = torch.as_tensor(self.node_scores, dtype=torch.float32).detach().cpu()
            if self.node_scores.shape != (g.n_writers,):
                raise ValueError(f"node_scores must have one value per writer ({g.n_writers}), "
                                 f"got shape {tuple(self.node_scores.shape)}")
        self.metrics = dict(self.metrics or {})
        self.info = dict(self.info or {})
        self.node_labels = dict(self.node_labels or {})
        for name, labels in self.node_labels.items():
            if name not in g.writer_index:
                raise ValueError(f"node_labels names {name!r}, which is not a writer of the graph")
            if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"node_labels[{name!r}] must be a list of strings, got {labels!r}")
            self.node_labels[name] = list(labels)

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def edge_sparsity(self) -> float:
        """``1 - kept edges / graph edges``."""
        return 1.0 - len(self.edges) / self.graph.n_edges

    @property
    def node_sparsity(self) -> float:
        """``1 - kept writers / graph writers``."""
        return 1.0 - len(self.nodes) / self.graph.n_writers

    def edge_set(self) -> set:
        return set(self.edges)

    def node_set(self) -> set:
        return set(self.nodes)

    def edge_indices(self) -> list[int]:
        """Graph edge indices of the kept edges (ascending)."""
        g = self.graph
        return [g.reader_edge_start[g.reader_index[r]] + g.writer_index[w] for w, r in self.edges]

    def edge_mask(self) -> Tensor:
        """``[graph.n_edges]`` bool: which graph edges are kept."""
        m = torch.zeros(self.graph.n_edges, dtype=torch.bool)
        if self.edges:
            m[torch.tensor(self.edge_indices())] = True
        return m

    def apply_to(self, em) -> None:
        """Fix an `EdgeModel`'s masks to this circuit (`EdgeModel.set_circuit`)."""
        if em.graph != self.graph:
            raise ValueError(f"the circuit's graph ({self.graph.n_writers} writers, {self.graph.n_edges} "
                             f"edges) is not the edge model's ({em.graph.n_writers} writers, "
                             f"{em.graph.n_edges} edges)")
        em.set_circuit(self.edges, self.nodes)

    def __repr__(self) -> str:
        return (f"Circuit({self.n_edges}/{self.graph.n_edges} edges, sparsity {self.edge_sparsity:.4f}; "
                f"{self.n_nodes}/{self.graph.n_writers} nodes; model={self.model_name!r}, "
                f"task={self.task!r}, ablation={self.ablation!r})")

    # -- JSON -------------------------------------------------------------------------------------

    def to_dict(self, *, include_scores: bool = False) -> dict:
        d = {"format": CIRCUIT_FORMAT, "model": self.model_name, "config_hash": self.graph.fingerprint(),
             "graph": self.graph.to_dict(), "task": self.task, "ablation": self.ablation,
             "edges": [[w, r] for w, r in self.edges], "nodes": list(self.nodes),
             "edge_sparsity": self.edge_sparsity, "node_sparsity": self.node_sparsity,
             "n_edges": self.n_edges, "metrics": _jsonable(self.metrics),
             "extraction": _jsonable(self.info)}
        if self.node_labels:
            d["node_labels"] = {k: list(v) for k, v in self.node_labels.items()}
        if include_scores:
            if self.scores is not None:
                d["scores"] = self.scores.tolist()
            if self.node_scores is not None:
                d["node_scores"] = self.node_scores.tolist()
        return d

    def to_json(self, *, indent: Optional[int] = None, include_scores: bool = False) -> str:
        """Strict JSON: no NaN or Infinity (null, with a ``<key>_note``, instead)."""
        from fastedge.jsonsafe import dumps
        return dumps(self.to_dict(include_scores=include_scores), indent=indent)

    def save(self, path: PathLike, *, include_scores: bool = False, indent: Optional[int] = 1) -> None:
        with open(path, "w") as f:
            f.write(self.to_json(indent=indent, include_scores=include_scores))
            f.write("\n")

    @classmethod
    def from_dict(cls, d: dict) -> "Circuit":
        """A circuit from `to_dict`'s output; ValueError on anything malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"a circuit file holds a JSON object, got {type(d).__name__}")
        if d.get("format") != CIRCUIT_FORMAT:
            raise ValueError(f"not a fastedge circuit: format is {d.get('format')!r}, expected "
                             f"{CIRCUIT_FORMAT!r} (for the authors' edges.json, a plain list of "
                             f"[writer, reader] pairs, use Circuit.from_edge_list)")
        missing = [k for k in ("graph", "edges", "nodes") if k not in d]
        if missing:
            raise ValueError(f"circuit is missing {', '.join(missing)}")
        try:
            graph = EdgeGraph.from_dict(d["graph"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"circuit has a malformed graph: {exc}") from None
        if "config_hash" in d and d["config_hash"] != graph.fingerprint():
            raise ValueError(f"circuit's config_hash {d['config_hash']!r} does not match its graph "
                             f"(fingerprint {graph.fingerprint()!r}): the file was edited or is corrupt")
        for key in ("edges", "nodes"):
            if not isinstance(d[key], list):
                raise ValueError(f"circuit's {key} must be a list, got {type(d[key]).__name__}")
        for key in ("model", "task", "ablation"):
            if key in d and not isinstance(d[key], str):
                raise ValueError(f"circuit's {key} must be a string, got {d[key]!r}")
        for key in ("metrics", "extraction"):
            if key in d and not isinstance(d[key], dict):
                raise ValueError(f"circuit's {key} must be an object, got {type(d[key]).__name__}")
        idx = _edge_indices(d["edges"], graph)
        if len(set(idx)) != len(idx):
            raise ValueError("circuit lists an edge more than once")
        if "n_edges" in d and d["n_edges"] != len(idx):
            raise ValueError(f"circuit says n_edges={d['n_edges']} but lists {len(idx)} edges")
        for key in ("scores", "node_scores"):
            v = d.get(key)
            if v is not None and (not isinstance(v, list) or
                                  not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise ValueError(f"circuit's {key} must be a list of numbers")
        try:
            return cls(edges=[tuple(e) for e in d["edges"]], nodes=list(d["nodes"]), graph=graph,
                       model_name=d.get("model", ""), task=d.get("task", ""),
                       ablation=d.get("ablation", "interchange"), metrics=d.get("metrics", {}),
                       scores=d.get("scores"), node_scores=d.get("node_scores"),
                       info=d.get("extraction", {}), node_labels=d.get("node_labels", {}))
        except (TypeError, RuntimeError, AttributeError) as exc:   # e.g. scores that are not numbers
            raise ValueError(f"malformed circuit: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Circuit":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"circuit is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: PathLike) -> "Circuit":
        with open(path) as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None

    # -- the authors' edges.json -------------------------------------------------------------------

    @classmethod
    def from_edge_list(cls, path_or_list, graph: EdgeGraph, nodes: Optional[Iterable[str]] = None,
                       **meta) -> "Circuit":
        """A circuit from the authors' ``edges.json``: a JSON list of
        ``[writer, reader]`` pairs (a path, or the list itself). ``nodes``
        defaults to the writers with at least one kept out-edge; given
        explicitly, it must contain every edge's writer. ``meta``: other
        `Circuit` fields (``model_name``, ``task``, ``ablation``, ...)."""
        if isinstance(path_or_list, (str, os.PathLike)):
            with open(path_or_list) as f:
                try:
                    pairs = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{os.fspath(path_or_list)}: not valid JSON: {exc}") from None
            where = f"{os.fspath(path_or_list)}: "
        else:
            pairs, where = path_or_list, ""
        if not isinstance(pairs, (list, tuple)):
            raise ValueError(f"{where}an edge list is a JSON list of [writer, reader] pairs, "
                             f"got {type(pairs).__name__}")
        try:
            idx = _edge_indices(pairs, graph)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        edges = [graph.edge(i) for i in idx]
        if nodes is None:
            nodes = sorted({w for w, _ in edges}, key=graph.writer_index.__getitem__)
        return cls(edges=edges, nodes=list(nodes), graph=graph, **meta)

    def to_edge_list(self) -> list[list[str]]:
        """``[[writer, reader], ...]`` (the authors' edges.json content)."""
        return [[w, r] for w, r in self.edges]

    def save_edge_list(self, path: PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_edge_list(), f)

    # -- from attribution scores -------------------------------------------------------------------

    @classmethod
    def from_scores(cls, scores, n_edges: Optional[int] = None, sparsity: Optional[float] = None, *,
                    absolute: bool = True, prune_dead: bool = True, graph: Optional[EdgeGraph] = None,
                    ablation: Optional[str] = None, model_name: Optional[str] = None,
                    task: Optional[str] = None) -> "Circuit":
        """The circuit of the top-scoring edges, with exactly `n_edges` edges
        (or ``round((1 - sparsity) * graph edges)``) after dead-edge pruning.

        `scores`: `fastedge.attribution.EdgeScores`, or per-group ``[R_g,
        W_g]`` tensors / one ``[n_edges]`` tensor in graph edge order with
        `graph`. Edges rank by ``|score|`` (``absolute=False``: by the signed
        score), ties in graph edge order. Then (`circuit_from_scores`):

        1. the longest prefix of the ranking whose pruned circuit (the same
           dead-edge pruning as extraction from masks, `prune_dead_edges`,
           forward rule under interchange ablation only) has at most the
           requested count: pruning can only add edges back as the prefix
           grows, so a binary search finds it;
        2. when pruning left it short (the next edge would complete a path
           and bring several edges at once), the best-ranked edges that join
           two live components (each adds exactly itself: `joining_edges`),
           then the following edges in rank order one at a time wherever
           the pruned circuit grows
           and stays within the count, until it is reached (an edge that
           pruning would remove on its own is skipped);
        3. failing that, from the next prefix (which overshoots), its edges
           are dropped worst-ranked first wherever the pruned circuit
           shrinks and stays at or above the count.

        The count is then exact whenever some order of additions reaches it;
        otherwise (tried: `FILL_ATTEMPTS` edges) the circuit has the closest
        count below, a `UserWarning` says why, and ``info["count_note"]``
        records it. ``info`` also records the prefix length and how many
        edges the fill added. Nodes are the writers with a kept out-edge."""
        from fastedge.attribution import EdgeScores
        if isinstance(scores, EdgeScores):
            if graph is not None and graph != scores.graph:
                raise ValueError("graph= differs from the scores' graph")
            graph = scores.graph
            flat = scores.flat()
            ablation = scores.ablation if ablation is None else ablation
            model_name = scores.model_name if model_name is None else model_name
            task = scores.task if task is None else task
            meta = {"d_model": scores.d_model} if scores.d_model else {}
            method = scores.method
        else:
            if graph is None:
                raise ValueError("scores given as tensors need graph= (the EdgeGraph they belong to)")
            if isinstance(scores, (list, tuple)):
                _check_masks(list(scores), None, graph)
                flat = torch.cat([torch.as_tensor(t).detach().double().cpu().flatten() for t in scores])
            else:
                flat = torch.as_tensor(scores).detach().double().cpu()
                if flat.shape != (graph.n_edges,):
                    raise ValueError(f"scores must be [{graph.n_edges}] (graph edge order) or one tensor "
                                     f"per reader group, got {list(flat.shape)}")
            meta, method = {}, ""
        ablation = ablation or "interchange"
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
        if (n_edges is None) == (sparsity is None):
            raise ValueError("give exactly one of n_edges= and sparsity=")
        if sparsity is not None:
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
                raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
            n_edges = int(round((1.0 - float(sparsity)) * graph.n_edges))
        elif isinstance(n_edges, bool) or not isinstance(n_edges, int) or not 0 <= n_edges <= graph.n_edges:
            raise ValueError(f"n_edges must be an integer in [0, {graph.n_edges}], got {n_edges!r}")
        if torch.isnan(flat).any():
            raise ValueError(f"scores contain NaN ({int(torch.isnan(flat).sum())} edges)")
        kept, info = circuit_from_scores(flat.abs() if absolute else flat, graph, n_edges,
                                         forward=prune_dead and ablation == "interchange", prune_dead=prune_dead)
        info.update(meta, method="scores", scores_method=method, absolute=bool(absolute),
                    prune_dead=bool(prune_dead))
        edge_w, _ = _edge_endpoints(graph)
        writers = sorted(set(edge_w[kept].tolist()))
        return cls(edges=[graph.edge(i) for i in torch.nonzero(kept).flatten().tolist()],
                   nodes=[graph.writers[i] for i in writers], graph=graph, model_name=model_name or "",
                   task=task or "", ablation=ablation, scores=flat.float(), info=info)

    # -- EAP-IG / MIB -------------------------------------------------------------------------------

    def to_eap_graph_json(self, path: Optional[PathLike] = None, *, d_model: Optional[int] = None,
                          legacy_nodes: bool = False) -> dict:
        """The circuit in the graph JSON of EAP-IG (``Graph.to_json`` /
        ``Graph.from_json``), which the MIB benchmark's circuit track reads:
        `fastedge.eap_graph.circuit_to_eap_graph_json` (the mapping of the
        two graphs is in that module's docstring: one ``input`` for the
        embedding writers, ungrouped k/v copies into the query heads the
        circuit keeps, ``resid_post`` as ``logits``). Where the circuit has
        ``scores`` (the deterministic mask values of an extracted circuit, or
        the attribution scores of `Circuit.from_scores`) they are the edges'
        scores, mapped as attribution scores are (summed over embeddings,
        split over k/v copies); else 1.0 for kept and 0.0 for other edges.

        ``d_model`` (the model's hidden size, which EAP-IG's loader needs)
        defaults to the one recorded at extraction. ``legacy_nodes=True``
        writes the older ``{name: bool}`` nodes. Writes ``path`` when given."""
        from fastedge import eap_graph
        if d_model is None:
            d_model = self.info.get("d_model")
        if d_model is None:
            raise ValueError("EAP-IG's graph config needs the model's hidden size: pass d_model= "
                             "(it is recorded automatically when the circuit is extracted from an EdgeModel)")
        if self.scores is None:
            out = eap_graph.circuit_to_eap_graph_json(self, d_model=d_model)
        else:
            from fastedge.attribution import EdgeScores
            scores = EdgeScores(graph=self.graph, scores=self.graph.split_by_group(self.scores),
                                d_model=int(d_model), ablation=self.ablation)
            out = eap_graph.scores_to_eap_graph_json(scores, in_graph=self)
        if legacy_nodes:
            out["nodes"] = {name: v["in_graph"] for name, v in out["nodes"].items()}
        if path is not None:
            with open(path, "w") as f:
                json.dump(out, f)
        return out

    # -- set operations -------------------------------------------------------------------------------

    def _combine(self, other: "Circuit", edges, nodes) -> "Circuit":
        _check_same_graph(self, other)
        same = lambda a, b: a if a == b else ""  # noqa: E731
        return Circuit(edges=edges, nodes=nodes, graph=self.graph,
                       model_name=same(self.model_name, other.model_name),
                       task=same(self.task, other.task), ablation=self.ablation)

    def intersection(self, other: "Circuit") -> "Circuit":
        """Edges and nodes in both circuits (same graph required). The result
        keeps model name and task where both agree, this circuit's ablation,
        no metrics and no scores."""
        _check_same_graph(self, other)
        return self._combine(other, self.edge_set() & other.edge_set(), self.node_set() & other.node_set())

    def union(self, other: "Circuit") -> "Circuit":
        """Edges and nodes in either circuit (same graph required)."""
        _check_same_graph(self, other)
        return self._combine(other, self.edge_set() | other.edge_set(), self.node_set() | other.node_set())


def _check_same_graph(a: Circuit, b: Circuit) -> None:
    if not isinstance(a, Circuit) or not isinstance(b, Circuit):
        raise TypeError("expected two Circuits")
    if a.graph != b.graph:
        raise ValueError(f"the circuits belong to different graphs ({a.graph.n_layers} layers x "
                         f"{a.graph.n_heads} heads, {a.graph.n_edges} edges vs {b.graph.n_layers} x "
                         f"{b.graph.n_heads}, {b.graph.n_edges} edges): they cannot be compared or combined")


def _iou(a: set, b: set) -> float:
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def compare_circuits(a: Circuit, b: Circuit) -> dict:
    """Shared and unique edges and nodes of two circuits of the same graph, and
    their intersection over union (1.0 when both are empty). Lists are in
    graph order; edges as ``[writer, reader]``."""
    _check_same_graph(a, b)
    g = a.graph
    ea, eb = a.edge_set(), b.edge_set()
    na, nb = a.node_set(), b.node_set()
    edge_key = lambda e: (g.reader_index[e[1]], g.writer_index[e[0]])  # noqa: E731
    node_key = g.writer_index.__getitem__
    elist = lambda s: [list(e) for e in sorted(s, key=edge_key)]  # noqa: E731
    nlist = lambda s: sorted(s, key=node_key)  # noqa: E731
    return {
        "n_edges_a": len(ea), "n_edges_b": len(eb),
        "n_shared_edges": len(ea & eb), "n_only_a_edges": len(ea - eb), "n_only_b_edges": len(eb - ea),
        "edge_iou": _iou(ea, eb),
        "n_nodes_a": len(na), "n_nodes_b": len(nb),
        "n_shared_nodes": len(na & nb), "n_only_a_nodes": len(na - nb), "n_only_b_nodes": len(nb - na),
        "node_iou": _iou(na, nb),
        "shared_edges": elist(ea & eb), "only_a_edges": elist(ea - eb), "only_b_edges": elist(eb - ea),
        "shared_nodes": nlist(na & nb), "only_a_nodes": nlist(na - nb), "only_b_nodes": nlist(nb - na),
    }


def _jsonable(obj):
    """Metrics and info as strict JSON values: tensors and numpy scalars to
    numbers, NaN and Infinity to null with a ``<key>_note`` (`fastedge.jsonsafe`)."""
    from fastedge.jsonsafe import json_safe
    return json_safe(obj)


# ---------------------------------------------------------------------------------------------
# Dead-edge pruning
# ---------------------------------------------------------------------------------------------

def prune_dead_edges(kept: Tensor, graph: EdgeGraph, *, forward: bool = True) -> Tensor:
    """Drop edges that cannot matter (module docstring, step 4), to a fixed point.

    ``kept``: ``[graph.n_edges]`` bool in graph edge order. Returns a new
    tensor. ``forward=False`` applies only the backward rule (valid under
    every ablation); ``forward=True`` also the forward rule (interchange).
    """
    if kept.shape != (graph.n_edges,) or kept.dtype != torch.bool:
        raise ValueError(f"kept must be a [{graph.n_edges}] bool tensor, got {tuple(kept.shape)} {kept.dtype}")
    kept = kept.detach().cpu().clone()
    blocks = _group_blocks(graph)
    H, Hkv, gs = graph.n_heads, graph.n_kv_heads, _heads_per_kv(graph)
    n_emb = len(graph.embeddings)
    head0 = [graph.writer_index[f"a{l}.h0"] for l in range(graph.n_layers)]
    mlp = [graph.writer_index[f"m{l}"] for l in range(graph.n_layers)]

    def view(gi):
        start, R, W = blocks[gi]
        return kept[start:start + R * W].view(R, W)

    before = -1
    while True:
        count = int(kept.sum())
        if count == before:
            return kept
        before = count
        if forward:
            live = torch.zeros(graph.n_writers, dtype=torch.bool)
            live[:n_emb] = True
            for gi, grp in enumerate(graph.groups):
                m = view(gi)
                m &= live[: grp.n_writers].unsqueeze(0)
                fed = m.any(1)
                if grp.kind == "attn":
                    q, k, v = fed[:H], fed[H:H + Hkv], fed[H + Hkv:]
                    live[head0[grp.layer]:head0[grp.layer] + H] = q | (k | v).repeat_interleave(gs)
                elif grp.kind == "mlp":
                    live[mlp[grp.layer]] = fed[0]
        reaches = torch.zeros(graph.n_writers, dtype=torch.bool)  # has a kept edge to a live reader
        for gi in reversed(range(len(graph.groups))):
            grp = graph.groups[gi]
            m = view(gi)
            if grp.kind == "resid_post":
                alive = torch.ones(1, dtype=torch.bool)
            elif grp.kind == "attn":
                heads = reaches[head0[grp.layer]:head0[grp.layer] + H]
                kv = heads.view(Hkv, gs).any(1)
                alive = torch.cat([heads, kv, kv])
            else:
                alive = reaches[mlp[grp.layer]].view(1)
            m &= alive.unsqueeze(1)
            reaches[: grp.n_writers] |= m.any(0)


FILL_ATTEMPTS = 4096  # edges `circuit_from_scores` tries one at a time after the prefix


def joining_edges(kept: Tensor, graph: EdgeGraph, *, forward: bool = True) -> Tensor:
    """[n_edges] bool: the edges outside `kept` (a circuit that dead-edge
    pruning leaves as it is) that join two live components, so that adding
    any of them adds exactly that edge: the writer is fed (an embedding, or a
    head or MLP with a kept edge into one of its readers; every writer when
    the forward rule is off) and the reader's component reaches the output
    (``resid_post``, or a head or MLP with a kept out-edge: in a pruned
    circuit that edge is itself live). `prune_dead_edges` keeps such an edge
    and nothing else changes: its writer was already fed, and its reader's
    component already fed and reaching."""
    H, Hkv, gs = graph.n_heads, graph.n_kv_heads, _heads_per_kv(graph)
    edge_w, edge_r = _edge_endpoints(graph)
    has_out = torch.zeros(graph.n_writers, dtype=torch.bool)
    has_out[edge_w[kept]] = True
    has_in = torch.zeros(graph.n_readers, dtype=torch.bool)
    has_in[edge_r[kept]] = True
    reaches = torch.zeros(graph.n_readers, dtype=torch.bool)
    fed = torch.zeros(graph.n_writers, dtype=torch.bool)
    fed[:len(graph.embeddings)] = True
    for grp in graph.groups:
        r0 = grp.first_reader
        if grp.kind == "resid_post":
            reaches[r0] = True
        elif grp.kind == "mlp":
            w = graph.writer_index[f"m{grp.layer}"]
            reaches[r0] = has_out[w]
            fed[w] = has_in[r0]
        else:
            h0 = graph.writer_index[f"a{grp.layer}.h0"]
            heads = has_out[h0:h0 + H]
            kv = heads.view(Hkv, gs).any(1)
            reaches[r0:r0 + H + 2 * Hkv] = torch.cat([heads, kv, kv])
            q, k, v = has_in[r0:r0 + H], has_in[r0 + H:r0 + H + Hkv], has_in[r0 + H + Hkv:r0 + H + 2 * Hkv]
            fed[h0:h0 + H] = q | (k | v).repeat_interleave(gs)
    if not forward:
        fed[:] = True
    return ~kept & fed[edge_w] & reaches[edge_r]


def circuit_from_scores(values: Tensor, graph: EdgeGraph, n_target: int, *, forward: bool,
                        prune_dead: bool = True) -> tuple[Tensor, dict]:
    """(kept [n_edges] bool, info) of `Circuit.from_scores`: the edges rank by
    `values` (descending; ties in graph edge order); the longest prefix
    whose pruned size is at most `n_target`, then single edges in rank order
    that keep it within the count, until the count is reached."""
    order = torch.argsort(values, descending=True, stable=True)

    def finish(raw):
        return prune_dead_edges(raw, graph, forward=forward) if prune_dead else raw

    def top(k):
        raw = torch.zeros(graph.n_edges, dtype=torch.bool)
        raw[order[:k]] = True
        return raw

    lo, hi = 0, graph.n_edges          # largest k with |finish(top(k))| <= n_target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(finish(top(mid)).sum()) <= n_target:
            lo = mid
        else:
            hi = mid - 1
    raw = top(lo)
    kept = finish(raw)
    count, filled, tried = int(kept.sum()), 0, 0
    if prune_dead and count < n_target:
        # first the best-ranked edges that join two live components: each adds
        # exactly itself (no pass of the pruning needed), whatever the graph's size
        safe = joining_edges(kept, graph, forward=forward)
        take = order[safe[order]][:n_target - count]
        raw[take] = True
        kept = kept.clone()
        kept[take] = True
        count, filled = count + len(take), len(take)
    for i in order[lo:].tolist():
        if count == n_target or tried >= FILL_ATTEMPTS:
            break
        tried += 1
        raw[i] = True
        trial = finish(raw)
        n = int(trial.sum())
        if count < n <= n_target:
            kept, count, filled = trial, n, filled + 1
        else:   # too many at once, or pruned away alone (kept out: it could bring a path later)
            raw[i] = False
    trimmed = 0
    if count != n_target and lo < graph.n_edges:
        # from above: the next prefix overshoots; drop its edges worst-ranked first
        # wherever the pruned circuit shrinks and stays at or above the count
        raw_hi = top(lo + 1)
        kept_hi = finish(raw_hi)
        count_hi, tried = int(kept_hi.sum()), 0
        for i in reversed(order[:lo + 1].tolist()):
            if count_hi == n_target or tried >= FILL_ATTEMPTS:
                break
            if not kept_hi[i]:
                continue
            tried += 1
            raw_hi[i] = False
            trial = finish(raw_hi)
            n = int(trial.sum())
            if n_target <= n < count_hi:
                kept_hi, count_hi, trimmed = trial, n, trimmed + 1
            else:
                raw_hi[i] = True
        if count_hi == n_target:
            kept, count, filled = kept_hi, count_hi, 0
        else:
            trimmed = 0
    info = {"target_n_edges": int(n_target), "n_edges_prefix": int(lo), "n_edges_filled": filled,
            "n_edges_trimmed": trimmed}
    if count != n_target:
        note = (f"{count} edges instead of the {n_target} requested: no edge added after the longest "
                f"prefix within the count, nor dropped from the next one, changes the pruned circuit by "
                f"few enough edges (an edge into a head or MLP with no path to the output, or out of one "
                f"that nothing feeds, is pruned until its path completes, and then the path comes whole)")
        info["count_note"] = note
        import warnings
        warnings.warn(note, stacklevel=3)
    return kept, info


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def deterministic_edge_masks(edge_log_alpha: Sequence[Tensor]) -> Tensor:
    """``sigmoid(0.8 * log_alpha / beta)`` of every edge, graph edge order, float64."""
    return torch.sigmoid(torch.cat([la.detach().double().cpu().flatten() for la in edge_log_alpha]) * _SCALE)


def _unpack_masks(em_or_masks, graph, node_log_alpha):
    """(edge log_alphas per group, node log_alpha or None, graph, extra info) from
    an EdgeModel, a state dict, or plain tensors."""
    meta = {}
    if hasattr(em_or_masks, "edge_log_alpha") and hasattr(em_or_masks, "graph"):
        em = em_or_masks
        if graph is not None and graph != em.graph:
            raise ValueError("graph= differs from the edge model's graph")
        graph = em.graph
        edges = list(em.edge_log_alpha)
        node = em.node_log_alpha if node_log_alpha is None else node_log_alpha
        meta["ablation"] = getattr(em, "ablation", "interchange")
        config = getattr(getattr(em, "model", None), "config", None)
        if config is not None:
            d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
            if d_model is not None:
                meta["d_model"] = int(d_model)
            meta["model_name"] = getattr(config, "_name_or_path", "") or ""
        return edges, node, graph, meta
    obj = em_or_masks
    if isinstance(obj, dict) and "edge_model" in obj and "graph" in obj:
        # a loaded masks.pt (or checkpoint): {"format", "graph", "edge_model", ...}
        saved = EdgeGraph.from_dict(obj["graph"])
        if graph is not None and graph != saved:
            raise ValueError("graph= differs from the masks file's graph")
        graph, obj = saved, obj["edge_model"]
    if graph is None:
        raise ValueError("extracting from plain tensors needs graph= (the EdgeGraph they belong to)")
    if isinstance(obj, dict):  # {"edge_log_alpha": [...], "node_log_alpha": t} or an EdgeModel state dict
        if "edge_log_alpha" in obj:
            edges = list(obj["edge_log_alpha"])
        else:
            keys = sorted((k for k in obj if k.startswith("edge_log_alpha.")), key=lambda k: int(k.rsplit(".", 1)[1]))
            if not keys:
                raise ValueError("a mask dict needs 'edge_log_alpha' (a list of tensors) or "
                                 "'edge_log_alpha.<g>' entries (an EdgeModel state dict)")
            edges = [obj[k] for k in keys]
        node = obj.get("node_log_alpha") if node_log_alpha is None else node_log_alpha
        return edges, node, graph, meta
    if (isinstance(obj, (list, tuple)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
            and (obj[1] is None or isinstance(obj[1], Tensor))):
        edges, node = list(obj[0]), obj[1] if node_log_alpha is None else node_log_alpha
        return edges, node, graph, meta
    if isinstance(obj, (list, tuple)) and all(isinstance(t, Tensor) for t in obj):
        return list(obj), node_log_alpha, graph, meta
    raise TypeError(f"extract_circuit takes an EdgeModel, a list of per-group edge log_alpha tensors "
                    f"(optionally as (edges, node_log_alpha)), a dict of them, or a loaded masks.pt; "
                    f"got {type(obj).__name__}")


def _check_masks(edges, node, graph):
    if len(edges) != len(graph.groups):
        raise ValueError(f"expected {len(graph.groups)} edge log_alpha tensors (one per reader group), "
                         f"got {len(edges)}")
    for gi, (la, grp) in enumerate(zip(edges, graph.groups)):
        if not isinstance(la, Tensor) or tuple(la.shape) != (grp.n_readers, grp.n_writers):
            shape = tuple(la.shape) if isinstance(la, Tensor) else type(la).__name__
            raise ValueError(f"edge log_alpha {gi} ({grp.kind} readers"
                             f"{'' if grp.layer is None else f' of layer {grp.layer}'}) must be "
                             f"[{grp.n_readers}, {grp.n_writers}], got {shape}")
        if torch.isnan(la.detach()).any():
            raise ValueError(f"edge log_alpha {gi} contains NaN")
    if node is not None:
        if not isinstance(node, Tensor) or tuple(node.shape) != (graph.n_writers,):
            shape = tuple(node.shape) if isinstance(node, Tensor) else type(node).__name__
            raise ValueError(f"node log_alpha must be [{graph.n_writers}] (one per writer), got {shape}")
        if torch.isnan(node.detach()).any():
            raise ValueError("node log_alpha contains NaN")


def extract_circuit(em_or_masks, target_sparsity: float, *, graph: Optional[EdgeGraph] = None,
                    node_log_alpha: Optional[Tensor] = None, node_threshold: float = 0.5,
                    prune_dead: bool = True, tol: float = 1e-5, method: str = "exact",
                    ablation: Optional[str] = None, model_name: Optional[str] = None,
                    task: str = "") -> Circuit:
    """The circuit at ``target_sparsity`` (in [0, 1]) from deterministic masks.

    Args:
        em_or_masks: an `EdgeModel`; or a list of per-group ``[R_g, W_g]``
            edge ``log_alpha`` tensors (``graph.groups`` order), optionally as
            ``(edge_list, node_log_alpha)``; or a dict with
            ``"edge_log_alpha"``/``"node_log_alpha"`` (an EdgeModel state dict
            works too); or a loaded ``masks.pt``, which carries its graph.
            Plain tensors need ``graph``.
        target_sparsity: requested ``1 - kept edges / graph edges``.
        node_log_alpha: ``[n_writers]`` node log_alphas for plain tensors
            (overrides the model's).
        node_threshold: writers with deterministic node mask ``<=`` this are
            removed with their out-edges.
        prune_dead: drop edges that cannot affect the logits (module
            docstring, step 4); the search targets the pruned circuit.
        tol: bracket width at which ``method="bisect"`` stops.
        method: ``"exact"`` (binary search over the sorted mask values) or
            ``"bisect"`` (the authors' bisection of the threshold in [0, 1]).
        ablation: decides whether the forward pruning rule applies
            (interchange only); default: the edge model's, else interchange.

    Returns:
        a `Circuit` with ``scores``/``node_scores`` (the deterministic mask
        values) and ``info`` (target, threshold, counts before pruning, ...).
        Its ``edge_sparsity`` is the achieved sparsity.
    """
    try:
        target_sparsity = float(target_sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"target_sparsity must be a number in [0, 1], got {target_sparsity!r}") from None
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1], got {target_sparsity!r} (training targets "
                         f"above 1 push harder, but a circuit cannot keep fewer than 0 edges; extract such a run's "
                         f"circuit with extract_circuit_by_threshold)")
    if method not in ("exact", "bisect"):
        raise ValueError(f"method must be 'exact' or 'bisect', got {method!r}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    prep = _prepare(em_or_masks, graph, node_log_alpha, node_threshold, ablation)
    n_target = int(round((1.0 - float(target_sparsity)) * prep.graph.n_edges))

    def finish(kept):
        return prune_dead_edges(kept, prep.graph, forward=prep.forward) if prune_dead else kept

    if method == "exact":
        kept, raw, threshold = _search_exact(prep.logits, prep.candidate, n_target, finish)
    else:
        kept, raw, threshold = _search_bisect(prep.scores, prep.candidate, n_target, finish, tol)
    info = {"method": method, "target_sparsity": float(target_sparsity), "target_n_edges": n_target,
            "threshold": threshold}
    return _build_circuit(prep, kept, raw, info, prune_dead=prune_dead, model_name=model_name, task=task)


def extract_circuit_by_threshold(em_or_masks, threshold: float = 0.5, *, graph: Optional[EdgeGraph] = None,
                                 node_log_alpha: Optional[Tensor] = None, node_threshold: float = 0.5,
                                 prune_dead: bool = True, ablation: Optional[str] = None,
                                 model_name: Optional[str] = None, task: str = "") -> Circuit:
    """The circuit of the edges whose deterministic mask passes ``threshold``.

    No sparsity search: edge ``(w, r)`` is kept when
    ``sigmoid(0.8 * log_alpha / beta) > threshold`` (docs/CONCEPTS.md section 3), after
    node removal (writers with deterministic node mask ``<= node_threshold``
    lose their out-edges) and, with ``prune_dead``, dead-edge pruning (module
    docstring, steps 2 and 4). The default 0.5 (``log_alpha > 0``) is the
    midpoint of the deterministic range, the value at which a mask's
    hard-concrete sample is more likely on than off, and the node threshold's
    default too.

    This is how `fastedge.prune` extracts the circuit of a run whose training
    target is at or above 1 (the authors' 1.02 and 1.2 "push harder"
    targets): an edge count for such a target would be 0 or negative, so the
    masks themselves say which edges survived. It is also the extraction for
    masks with a meaning of their own (hand-set or compiled models, whose
    masks are near 0 or 1).

    Args: as `extract_circuit` (less the search's ``target_sparsity``,
    ``method`` and ``tol``); ``threshold`` in [0, 1).

    Returns:
        a `Circuit` with ``scores``/``node_scores`` and ``info``
        (``method="threshold"``, ``threshold``, ``target_sparsity=None``,
        counts before and after pruning). Its ``edge_sparsity`` is whatever
        the masks give.
    """
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}") from None
    if not 0.0 <= threshold < 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in [0, 1) (a mask value; 1 would keep nothing), got {threshold!r}")
    prep = _prepare(em_or_masks, graph, node_log_alpha, node_threshold, ablation)
    raw_kept = prep.candidate & (prep.scores > threshold)
    kept = prune_dead_edges(raw_kept, prep.graph, forward=prep.forward) if prune_dead else raw_kept
    info = {"method": "threshold", "target_sparsity": None, "target_n_edges": None, "threshold": threshold}
    return _build_circuit(prep, kept, int(raw_kept.sum()), info, prune_dead=prune_dead,
                          model_name=model_name, task=task)


@dataclass
class _Prepared:
    """Deterministic masks of every edge and writer, and which edges may be kept."""
    graph: EdgeGraph
    meta: dict
    ablation: str
    forward: bool               # the forward pruning rule applies (interchange)
    logits: Tensor              # [n_edges] float64: 0.8 * log_alpha / beta
    scores: Tensor              # [n_edges] float64: sigmoid(logits)
    node_scores: Optional[Tensor]
    node_keep: Tensor           # [n_writers] bool
    node_threshold: float
    edge_w: Tensor              # writer index of every edge
    candidate: Tensor           # [n_edges] bool: writer kept and mask not -inf


def _prepare(em_or_masks, graph, node_log_alpha, node_threshold, ablation) -> _Prepared:
    if not 0.0 <= node_threshold <= 1.0:
        raise ValueError(f"node_threshold must be in [0, 1], got {node_threshold!r}")
    edges_la, node_la, graph, meta = _unpack_masks(em_or_masks, graph, node_log_alpha)
    _check_masks(edges_la, node_la, graph)
    ablation = meta.get("ablation", "interchange") if ablation is None else ablation
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    logits = torch.cat([la.detach().double().cpu().flatten() for la in edges_la]) * _SCALE
    edge_w, _ = _edge_endpoints(graph)
    if node_la is not None:
        node_scores = torch.sigmoid(node_la.detach().double().cpu() * _SCALE)
        node_keep = node_scores > node_threshold
    else:
        node_scores = None
        node_keep = torch.ones(graph.n_writers, dtype=torch.bool)
    candidate = node_keep[edge_w] & (logits > float("-inf"))
    return _Prepared(graph=graph, meta=meta, ablation=ablation, forward=ablation == "interchange",
                     logits=logits, scores=torch.sigmoid(logits), node_scores=node_scores,
                     node_keep=node_keep, node_threshold=float(node_threshold), edge_w=edge_w,
                     candidate=candidate)


def _build_circuit(prep: _Prepared, kept: Tensor, raw: int, info: dict, *, prune_dead: bool,
                   model_name: Optional[str], task: str) -> Circuit:
    """The `Circuit` of the kept edges (after pruning); `raw`: the count before pruning."""
    graph, edge_w = prep.graph, prep.edge_w
    has_out = torch.zeros(graph.n_writers, dtype=torch.bool)
    if kept.any():
        has_out[edge_w[kept].unique()] = True
    nodes = [graph.writers[i] for i in torch.nonzero(has_out & prep.node_keep).flatten().tolist()]
    edges = [graph.edge(i) for i in torch.nonzero(kept).flatten().tolist()]
    info = dict(info, node_threshold=prep.node_threshold, n_nodes_above_threshold=int(prep.node_keep.sum()),
                prune_dead=bool(prune_dead), forward_pruning=bool(prune_dead and prep.forward),
                n_edges_thresholded=raw, n_edges_pruned=raw - int(kept.sum()))
    if "d_model" in prep.meta:
        info["d_model"] = prep.meta["d_model"]
    return Circuit(edges=edges, nodes=nodes, graph=graph,
                   model_name=model_name if model_name is not None else prep.meta.get("model_name", ""),
                   task=task, ablation=prep.ablation, scores=prep.scores.float(),
                   node_scores=None if prep.node_scores is None else prep.node_scores.float(), info=info)


def _closest(pairs, n_target):
    """Of (count, payload) pairs, the one whose count is closest to n_target
    (ties: the smaller count, i.e. the sparser circuit)."""
    return min(pairs, key=lambda p: (abs(p[0] - n_target), p[0]))


def _search_exact(logits, candidate, n_target, finish):
    """Binary search over the cut points of the sorted candidate values.

    Keeping the top ``k`` candidates is realisable by a threshold only where
    the k-th and (k+1)-th values differ; the final (pruned) size is
    non-decreasing in ``k``, so a binary search finds the cut whose final
    size is closest to ``n_target``."""
    vals = torch.where(candidate, logits, torch.full_like(logits, float("-inf")))
    order = torch.argsort(vals, descending=True, stable=True)
    sorted_vals = vals[order]
    n_cand = int(candidate.sum())
    if n_cand:
        change = torch.nonzero(sorted_vals[:n_cand - 1] > sorted_vals[1:n_cand]).flatten() + 1
        cuts = [0] + change.tolist() + [n_cand]
    else:
        cuts = [0]
    cache = {}

    def final(i):
        if i not in cache:
            k = cuts[i]
            kept = torch.zeros_like(candidate)
            kept[order[:k]] = True
            kept = finish(kept)
            cache[i] = (int(kept.sum()), kept)
        return cache[i]

    lo, hi = 0, len(cuts) - 1   # smallest i with final(i) >= n_target, or hi if none
    if final(hi)[0] < n_target:
        best = hi
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if final(mid)[0] >= n_target:
                hi = mid
            else:
                lo = mid + 1
        options = [(final(lo)[0], lo)] + ([(final(lo - 1)[0], lo - 1)] if lo > 0 else [])
        best = _closest(options, n_target)[1]
    k = cuts[best]
    # the reported threshold: midway (in log_alpha) between the last kept and first dropped value
    if k == 0:
        threshold = 1.0
    elif k >= len(sorted_vals) or sorted_vals[k].item() == float("-inf"):
        threshold = 0.0
    else:
        threshold = _sigmoid((sorted_vals[k - 1].item() + sorted_vals[k].item()) / 2)
    return final(best)[1], k, threshold


def _search_bisect(scores, candidate, n_target, finish, tol):
    """The authors' search: bisect the threshold t in [0, 1] (keep mask > t)
    until the bracket is narrower than tol; return the closest count seen."""
    vals = torch.where(candidate, scores, torch.full_like(scores, -1.0))
    lo, hi = 0.0, 1.0
    seen = []
    while True:
        t = (lo + hi) / 2
        raw = vals > t
        kept = finish(raw)
        n = int(kept.sum())
        seen.append((n, (kept, int(raw.sum()), t)))
        if n == n_target or hi - lo < tol:
            break
        if n > n_target:
            lo = t
        else:
            hi = t
    return _closest(seen, n_target)[1]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
