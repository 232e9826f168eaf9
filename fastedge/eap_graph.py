"""EAP-IG's graph JSON, the file format of the MIB circuit track, for scores and circuits.

The EAP-IG library (hannamw/EAP-IG, ``Graph.to_json`` / ``Graph.from_json``)
and the MIB benchmark's circuit track read and write one JSON object::

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": bool, "d_model": D},
     "nodes": {"input": {"in_graph": bool}, "a0.h0": {...}, ..., "m0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": float, "in_graph": bool}, ...}}

with every node and edge of EAP-IG's graph of the model, in EAP-IG's order
(per layer: every upstream node into every head's q, k and v input, then
into the MLP; finally into ``logits``). Its graph differs from fastedge's
(docs/CONCEPTS.md section 1) in two ways, and this module maps between them:

* **One input node.** fastedge's embedding writers (``tok_embeds`` and
  ``pos_embeds``, or ``embeds``) are EAP-IG's single ``input``. The score of
  ``input -> child`` is the *sum* of the embeddings' scores into that reader
  (the input node's output is the sum of theirs, so its gradient-times-delta
  is the sum of theirs); reading back, the whole score goes to the first
  embedding writer and the others get 0. An edge from ``input`` is in the
  graph when the edge from any embedding is; reading a circuit back, every
  embedding's edge into that reader is kept.
* **Ungrouped k/v inputs.** EAP-IG gives every *query* head its own k and v
  input (``a{l}.h{i}<k>``), where fastedge, like the model, has one k and
  one v reader per key/value head (``a{l}.h{j}.k``, shared by the query
  heads ``i`` with ``i // (H / H_kv) == j``). Each of the ``H / H_kv``
  copies gets the reader's score divided by the group size: the shared
  input's gradient is the sum of the copies' gradients, so the copies'
  scores sum to fastedge's. Reading back, the copies are summed (as
  ``H / H_kv`` times the copy when they are all equal, so that an exported
  file reads back to the same floats). In a circuit, a copy is in the graph
  when the reader's edge is *and* the circuit keeps its query head (the
  head is among its nodes): a copy into a head whose output goes nowhere
  cannot change the output, would count against MIB's size limits, and
  EAP-IG's own ``Graph.prune`` would remove it. Reading a circuit back, a
  reader's edge is kept when any copy is. With grouped heads ``cfg`` also carries
  ``n_key_value_heads`` (EAP-IG ignores keys it does not use).

``resid_post`` is ``logits``; heads ``a{l}.h{i}`` and MLPs ``m{l}`` keep
their names. Node ``logits`` is always in the graph (as in EAP-IG).

Counting: MIB's circuit sizes are fractions of the edges of *this* graph
(`eap_edge_count`; GPT-2 small: 32,491, where fastedge's graph has 32,936),
and a circuit's size is its count of EAP edges in the graph
(`eap_edge_count_of`), which differs from its fastedge count wherever k/v
heads are grouped or the model has two embedding writers.

The functions here are this project's own, written from the facts of the
format (the key names, the node and edge names, the edge order); nothing is
copied from EAP-IG or MIB.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from fastedge.graph import EdgeGraph

__all__ = ["EapLayout", "eap_layout", "eap_cfg", "eap_edge_count", "eap_edge_count_of", "scores_to_eap",
           "eap_to_scores", "kept_to_eap", "eap_to_kept", "eap_edge_count_of_kept", "scores_to_eap_graph_json",
           "scores_from_eap_graph_json", "circuit_to_eap_graph_json", "circuit_from_eap_graph_json",
           "read_eap_graph_json"]

PathLike = Union[str, "os.PathLike[str]"]


# -- the correspondence of the two graphs ----------------------------------------------------------

@dataclass(frozen=True)
class EapLayout:
    """EAP-IG's edges of a model, each tied to fastedge's graph.

    ``names[k]`` is EAP edge ``k`` (EAP-IG's order); ``reader[k]`` the
    fastedge reader its child reads through (a k/v copy: the shared k/v
    reader); ``writer[k]`` the fastedge writer of its parent, -1 for
    ``input`` (all embedding writers); ``kv_copy[k]`` whether the child is a
    k or v input (one of ``H / H_kv`` copies); ``head[k]`` the writer index
    of the child's query head (-1 for an MLP or ``logits`` child)."""
    graph: EdgeGraph
    names: tuple
    reader: Tensor
    writer: Tensor
    kv_copy: Tensor
    head: Tensor
    node_names: tuple
    edge_writer: Tensor             # [n_edges] writer index of each fastedge edge

    @property
    def n_edges(self) -> int:
        return len(self.names)

    @property
    def group_size(self) -> int:
        return self.graph.n_heads // self.graph.n_kv_heads

    def fastedge_edge(self) -> Tensor:
        """[K] fastedge edge index of each EAP edge's parent; for ``input``
        edges, that of the first embedding writer."""
        start = torch.tensor(self.graph.reader_edge_start, dtype=torch.long)[self.reader]
        return start + self.writer.clamp(min=0)


_LAYOUTS: dict = {}


def eap_layout(graph: EdgeGraph) -> EapLayout:
    """The `EapLayout` of `graph` (built once per graph structure)."""
    key = graph.fingerprint()
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _build_layout(graph)
    return _LAYOUTS[key]


def _build_layout(g: EdgeGraph) -> EapLayout:
    n_emb, H, gs = len(g.embeddings), g.n_heads, g.n_heads // g.n_kv_heads
    ri = g.reader_index
    names, readers, writers, kv, child_heads = [], [], [], [], []
    stream = [("input", -1)]            # EAP parents upstream so far: (name, fastedge writer or -1)

    def add(parent, child: str, reader: int, is_kv: bool, head: int = -1) -> None:
        names.append(f"{parent[0]}->{child}")
        readers.append(reader)
        writers.append(parent[1])
        kv.append(is_kv)
        child_heads.append(head)

    def into_heads(parent, layer: int) -> None:
        for i in range(H):
            head = g.writer_index[f"a{layer}.h{i}"]
            add(parent, f"a{layer}.h{i}<q>", ri[f"a{layer}.h{i}.q"], False, head)
            add(parent, f"a{layer}.h{i}<k>", ri[f"a{layer}.h{i // gs}.k"], True, head)
            add(parent, f"a{layer}.h{i}<v>", ri[f"a{layer}.h{i // gs}.v"], True, head)

    node_names = ["input"]
    for layer in range(g.n_layers):
        heads = [(f"a{layer}.h{i}", g.writer_index[f"a{layer}.h{i}"]) for i in range(H)]
        mlp = ri[f"m{layer}"]
        if g.parallel_blocks:           # EAP-IG's order: per parent, its head inputs then the MLP
            for parent in stream:
                into_heads(parent, layer)
                add(parent, f"m{layer}", mlp, False)
        else:
            for parent in stream:
                into_heads(parent, layer)
            for parent in stream + heads:
                add(parent, f"m{layer}", mlp, False)
        stream = stream + heads + [(f"m{layer}", g.writer_index[f"m{layer}"])]
        node_names += [name for name, _ in heads] + [f"m{layer}"]
    for parent in stream:
        add(parent, "logits", ri["resid_post"], False)
    node_names.append("logits")
    assert n_emb >= 1
    return EapLayout(graph=g, names=tuple(names), reader=torch.tensor(readers, dtype=torch.long),
                     writer=torch.tensor(writers, dtype=torch.long), kv_copy=torch.tensor(kv, dtype=torch.bool),
                     head=torch.tensor(child_heads, dtype=torch.long), node_names=tuple(node_names),
                     edge_writer=torch.cat([torch.arange(grp.n_writers).repeat(grp.n_readers) for grp in g.groups]))


def eap_cfg(graph: EdgeGraph, d_model: int) -> dict:
    """The ``cfg`` of EAP-IG's graph JSON (``n_key_value_heads`` too with grouped heads)."""
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model (the model's hidden size, which EAP-IG's loader needs) must be a positive "
                         f"integer, got {d_model!r}")
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
           "parallel_attn_mlp": bool(graph.parallel_blocks), "d_model": int(d_model)}
    if graph.n_kv_heads != graph.n_heads:
        cfg["n_key_value_heads"] = graph.n_kv_heads
    return cfg


def eap_edge_count(graph: EdgeGraph) -> int:
    """How many edges EAP-IG's graph of the model has (MIB's edge fractions are of this number)."""
    return eap_layout(graph).n_edges


# -- values across the two graphs ------------------------------------------------------------------

def _flat(values: Tensor, graph: EdgeGraph, what: str) -> Tensor:
    values = torch.as_tensor(values).detach().cpu()
    if values.shape != (graph.n_edges,):
        raise ValueError(f"{what} must be [{graph.n_edges}] (one per fastedge edge, graph edge order), "
                         f"got {list(values.shape)}")
    return values


def _per_embedding(values: Tensor, layout: EapLayout) -> list:
    """For each embedding writer e: its value on each EAP edge's reader ([K] each)."""
    start = torch.tensor(layout.graph.reader_edge_start, dtype=torch.long)[layout.reader]
    return [values[start + e] for e in range(len(layout.graph.embeddings))]


def scores_to_eap(flat: Tensor, graph: EdgeGraph) -> Tensor:
    """fastedge scores ([n_edges], graph edge order) as EAP-IG edge scores
    ([K], float64): ``input`` edges the sum over the embeddings, k/v copies
    the reader's score over the group size (module docstring)."""
    lay = eap_layout(graph)
    flat = _flat(flat, graph, "scores").double()
    out = flat[lay.fastedge_edge()]
    from_input = lay.writer < 0
    if from_input.any():
        per = _per_embedding(flat, lay)
        total = per[0]
        for more in per[1:]:
            total = total + more
        out = torch.where(from_input, total, out)
    if lay.group_size > 1:
        out = torch.where(lay.kv_copy, out / lay.group_size, out)
    return out


def eap_to_scores(eap: Tensor, graph: EdgeGraph) -> Tensor:
    """EAP-IG edge scores ([K]) as fastedge scores ([n_edges], float64): the
    ``input`` edge's score to the first embedding writer (0 to the others),
    the k/v copies summed (module docstring)."""
    lay = eap_layout(graph)
    eap = torch.as_tensor(eap).detach().cpu().double()
    if eap.shape != (lay.n_edges,):
        raise ValueError(f"EAP scores must be [{lay.n_edges}] (EAP-IG's edges of this model), got {list(eap.shape)}")
    target = lay.fastedge_edge()
    out = torch.zeros(graph.n_edges, dtype=torch.float64)
    plain = ~lay.kv_copy
    out[target[plain]] = eap[plain]
    if lay.kv_copy.any():
        gs = lay.group_size
        kv_idx = torch.nonzero(lay.kv_copy).flatten()
        # EAP-IG's order puts head i's k and v copies 3 edges apart and head i+1's 3 further on: group
        # the copies of each (parent, k/v reader) by their fastedge edge
        order = torch.argsort(target[kv_idx], stable=True)
        copies = eap[kv_idx[order]].view(-1, gs)
        edges = target[kv_idx[order]].view(-1, gs)[:, 0]
        same = (copies == copies[:, :1]).all(1)
        # equal copies (every file fastedge writes): gs x copy, the correctly rounded sum, so that
        # an exported score reads back to the same float; otherwise their plain sum
        out[edges] = torch.where(same, copies[:, 0] * gs, copies.sum(1))
    return out


def kept_to_eap(kept: Tensor, graph: EdgeGraph, nodes: Optional[Tensor] = None) -> Tensor:
    """Which EAP-IG edges ([K] bool) a set of kept fastedge edges ([n_edges]
    bool) keeps: ``input -> child`` when any embedding's edge is kept, the
    k/v copies of a kept k/v edge; with `nodes` (``[n_writers]`` bool, the
    circuit's writers) only the copies into query heads among them."""
    lay = eap_layout(graph)
    kept = _flat(kept, graph, "kept").bool()
    out = kept[lay.fastedge_edge()]
    from_input = lay.writer < 0
    if from_input.any():
        anyone = torch.zeros_like(out)
        for per in _per_embedding(kept, lay):
            anyone |= per
        out = torch.where(from_input, anyone, out)
    if nodes is not None and lay.kv_copy.any():
        nodes = torch.as_tensor(nodes).bool().cpu()
        if nodes.shape != (graph.n_writers,):
            raise ValueError(f"nodes must be [{graph.n_writers}] bool (one per writer), got {list(nodes.shape)}")
        out &= ~lay.kv_copy | nodes[lay.head.clamp(min=0)]
    return out


def _circuit_kept(circuit) -> Tensor:
    """A circuit's EAP-IG edges: k/v copies only into the query heads it keeps."""
    g = circuit.graph
    nodes = torch.zeros(g.n_writers, dtype=torch.bool)
    nodes[[g.writer_index[w] for w in circuit.nodes]] = True
    return kept_to_eap(circuit.edge_mask(), g, nodes)


def eap_to_kept(eap_kept: Tensor, graph: EdgeGraph) -> Tensor:
    """The fastedge edges ([n_edges] bool) of kept EAP-IG edges ([K] bool):
    every embedding's edge where ``input``'s is kept, a k/v edge where any
    copy is kept."""
    lay = eap_layout(graph)
    eap_kept = torch.as_tensor(eap_kept).bool().cpu()
    if eap_kept.shape != (lay.n_edges,):
        raise ValueError(f"kept EAP edges must be [{lay.n_edges}], got {list(eap_kept.shape)}")
    out = torch.zeros(graph.n_edges, dtype=torch.bool)
    start = torch.tensor(graph.reader_edge_start, dtype=torch.long)[lay.reader]
    from_input = lay.writer < 0
    for e in range(len(graph.embeddings)):
        hit = from_input & eap_kept
        out[start[hit] + e] = True
    other = ~from_input & eap_kept
    out[start[other] + lay.writer[other]] = True   # k/v: any copy (a repeated index sets True)
    return out


def eap_edge_count_of(circuit) -> int:
    """A `fastedge.Circuit`'s size in EAP-IG's graph (MIB's count)."""
    return int(_circuit_kept(circuit).sum())


def eap_edge_count_of_kept(kept: Tensor, graph: EdgeGraph) -> int:
    """`eap_edge_count_of` the circuit of kept fastedge edges ([n_edges]
    bool) whose nodes are the writers with a kept out-edge."""
    kept = _flat(kept, graph, "kept").bool()
    nodes = torch.zeros(graph.n_writers, dtype=torch.bool)
    nodes[eap_layout(graph).edge_writer[kept]] = True
    return int(kept_to_eap(kept, graph, nodes).sum())


# -- the JSON ----------------------------------------------------------------------------------------

def _node_flags(layout: EapLayout, kept_writers: Optional[set], everything: bool) -> dict:
    g = layout.graph
    nodes = {}
    for name in layout.node_names:
        if name == "logits":
            nodes[name] = {"in_graph": True}          # always in the graph, as in EAP-IG
        elif everything:
            nodes[name] = {"in_graph": True}
        elif kept_writers is None:
            nodes[name] = {"in_graph": False}
        elif name == "input":
            nodes[name] = {"in_graph": any(e in kept_writers for e in g.embeddings)}
        else:
            nodes[name] = {"in_graph": name in kept_writers}
    return nodes


def _write(d: dict, path: Optional[PathLike]) -> dict:
    if path is not None:
        with open(path, "w") as f:
            json.dump(d, f)
    return d


def _assemble(layout: EapLayout, cfg: dict, scores: Tensor, in_graph: Tensor, nodes: dict) -> dict:
    bad = ~torch.isfinite(scores)
    if bad.any():
        first = layout.names[int(torch.nonzero(bad)[0])]
        raise ValueError(f"{int(bad.sum())} edge scores are not finite numbers (the first: {first}); "
                         f"EAP-IG's JSON needs a number for every edge")
    edges = {name: {"score": s, "in_graph": k}
             for name, s, k in zip(layout.names, scores.tolist(), in_graph.tolist())}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def scores_to_eap_graph_json(scores, path: Optional[PathLike] = None, *, in_graph=None,
                             d_model: Optional[int] = None) -> dict:
    """`fastedge.EdgeScores` as EAP-IG's graph JSON with scores (module
    docstring for the mapping); writes `path` when given, returns the dict.

    The scores are written in the `EdgeScores`' own sign convention (its
    ``sign``). `in_graph` marks edges and nodes: None (default) marks none,
    as EAP-IG's attribution leaves a graph (only ``logits``); True marks
    every edge and node; a `fastedge.Circuit` of the same graph marks its
    edges and nodes. `d_model` defaults to the scores' ``d_model``."""
    from fastedge.circuit import Circuit
    graph = scores.graph
    d_model = scores.d_model if d_model is None else d_model
    if d_model is None:
        raise ValueError("EAP-IG's graph config needs the model's hidden size: pass d_model= "
                         "(fastedge.attribute records it in the scores)")
    lay = eap_layout(graph)
    if in_graph is None or in_graph is False:
        kept, nodes = torch.zeros(lay.n_edges, dtype=torch.bool), _node_flags(lay, None, False)
    elif in_graph is True:
        kept, nodes = torch.ones(lay.n_edges, dtype=torch.bool), _node_flags(lay, None, True)
    elif isinstance(in_graph, Circuit):
        if in_graph.graph != graph:
            raise ValueError("in_graph is a circuit of another graph than the scores'")
        kept, nodes = _circuit_kept(in_graph), _node_flags(lay, set(in_graph.nodes), False)
    else:
        raise TypeError(f"in_graph must be None, True or a Circuit, got {type(in_graph).__name__}")
    d = _assemble(lay, eap_cfg(graph, int(d_model)), scores_to_eap(scores.flat(), graph), kept, nodes)
    return _write(d, path)


def circuit_to_eap_graph_json(circuit, path: Optional[PathLike] = None, *, d_model: Optional[int] = None) -> dict:
    """A binary circuit as EAP-IG's graph JSON: ``in_graph`` marks its edges
    and nodes (mapped as in the module docstring), and every edge's
    ``score`` is 1.0 when it is in the graph and 0.0 otherwise (EAP-IG's
    loader needs a score for every edge; these carry no ranking). `d_model`
    defaults to the one the circuit recorded (``info["d_model"]``)."""
    d_model = circuit.info.get("d_model") if d_model is None else d_model
    if d_model is None:
        raise ValueError("EAP-IG's graph config needs the model's hidden size: pass d_model=")
    lay = eap_layout(circuit.graph)
    kept = _circuit_kept(circuit)
    d = _assemble(lay, eap_cfg(circuit.graph, int(d_model)), kept.double(), kept,
                  _node_flags(lay, set(circuit.nodes), False))
    return _write(d, path)


def read_eap_graph_json(path_or_dict, graph: EdgeGraph) -> tuple:
    """(EAP scores [K] float64, EAP in_graph [K] bool, cfg) of an EAP-IG
    graph JSON (a path or the loaded dict) for `graph`; a ValueError names
    what does not fit (another model's cfg, a missing or unknown edge, a
    value that is not a number)."""
    where = ""
    if isinstance(path_or_dict, (str, os.PathLike)):
        where = f"{os.fspath(path_or_dict)}: "
        try:
            with open(path_or_dict) as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}not valid JSON: {exc}") from None
    else:
        d = path_or_dict
    if not isinstance(d, dict) or not all(k in d for k in ("cfg", "nodes", "edges")):
        raise ValueError(f"{where}not an EAP-IG graph JSON: expected an object with cfg, nodes and edges")
    cfg, edges = d["cfg"], d["edges"]
    if not isinstance(cfg, dict) or not isinstance(edges, dict):
        raise ValueError(f"{where}cfg and edges must be JSON objects")
    want = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": bool(graph.parallel_blocks)}
    for key, value in want.items():
        if cfg.get(key) != value:
            raise ValueError(f"{where}the graph is of another model: cfg {key}={cfg.get(key)!r}, this model's "
                             f"is {value!r} ({graph.n_layers} layers, {graph.n_heads} heads)")
    if "n_key_value_heads" in cfg and cfg["n_key_value_heads"] != graph.n_kv_heads:
        raise ValueError(f"{where}the graph is of another model: cfg n_key_value_heads="
                         f"{cfg['n_key_value_heads']!r}, this model has {graph.n_kv_heads}")
    lay = eap_layout(graph)
    if len(edges) != lay.n_edges or any(name not in edges for name in lay.names):
        known = set(lay.names)
        unknown = [n for n in edges if n not in known]
        missing = [n for n in lay.names if n not in edges]
        what = (f"edge {unknown[0]!r} is not in EAP-IG's graph of this model" if unknown
                else f"edge {missing[0]!r} is missing ({len(missing)} of {lay.n_edges} edges missing)")
        raise ValueError(f"{where}{what}")
    scores, kept = [], []
    for name in lay.names:
        e = edges[name]
        s = e.get("score") if isinstance(e, dict) else None
        k = e.get("in_graph") if isinstance(e, dict) else None
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not isinstance(k, bool):
            raise ValueError(f"{where}edge {name!r} must be {{\"score\": number, \"in_graph\": true|false}}, "
                             f"got {e!r}")
        scores.append(float(s))
        kept.append(k)
    s = torch.tensor(scores, dtype=torch.float64)
    if not torch.isfinite(s).all():
        first = lay.names[int(torch.nonzero(~torch.isfinite(s))[0])]
        raise ValueError(f"{where}edge {first!r} has a score that is not a finite number")
    return s, torch.tensor(kept, dtype=torch.bool), dict(cfg)


def scores_from_eap_graph_json(path_or_dict, graph: EdgeGraph, *, sign: str = "gate", **meta):
    """`fastedge.EdgeScores` of `graph` from an EAP-IG graph JSON's edge
    scores (module docstring for the mapping). The file does not say its
    sign convention: `sign` names it ("gate", the default, is what fastedge
    writes by default and what MIB's own attribution files hold: EAP-IG's
    (corrupted - clean) convention applied to the negated logit difference
    it attributes). `meta`: other `EdgeScores` fields (method, metric, ...)."""
    from fastedge.attribution import EdgeScores
    eap, _, cfg = read_eap_graph_json(path_or_dict, graph)
    tensors = graph.split_by_group(eap_to_scores(eap, graph))
    meta.setdefault("d_model", cfg.get("d_model") if isinstance(cfg.get("d_model"), int) else None)
    meta.setdefault("method", "eap-graph-json")
    return EdgeScores(graph=graph, scores=tensors, sign=sign, **meta)


def circuit_from_eap_graph_json(path_or_dict, graph: EdgeGraph, **meta):
    """The `fastedge.Circuit` of an EAP-IG graph JSON's ``in_graph`` edges
    (module docstring for the mapping): nodes are the writers with a kept
    out-edge. `meta`: other `Circuit` fields (model_name, task, ablation)."""
    from fastedge.circuit import Circuit
    _, eap_kept, cfg = read_eap_graph_json(path_or_dict, graph)
    kept = eap_to_kept(eap_kept, graph)
    edges = [graph.edge(i) for i in torch.nonzero(kept).flatten().tolist()]
    nodes = sorted({w for w, _ in edges}, key=graph.writer_index.__getitem__)
    info = dict(meta.pop("info", {}))
    if isinstance(cfg.get("d_model"), int):
        info.setdefault("d_model", cfg["d_model"])
    return Circuit(edges=edges, nodes=nodes, graph=graph, info=info, **meta)
