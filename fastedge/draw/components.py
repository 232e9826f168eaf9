"""What a drawing shows, whatever renders it: components, folded edges, colours.

A drawing has one box per *component*: the embedding writers, each head
``a{l}.h{i}``, each MLP ``m{l}`` and ``resid_post``. Readers are folded into
the component that reads through them: an edge ``w -> r`` becomes
``w -> component(r)``, tagged with the reader's kind (q, k, v, mlp, output).
With grouped-query attention a k/v reader serves every query head of its
group, so its edge goes to each of those heads that is in the circuit (to
all of them when none is).
"""
from __future__ import annotations

from typing import NamedTuple

READER_COLORS = {
    "q": "#d62728",       # red
    "k": "#2ca02c",       # green
    "v": "#1f77b4",       # blue
    "mlp": "#ff7f0e",     # orange
    "output": "#7f7f7f",  # grey: into resid_post
}
KIND_LABELS = {"q": "query", "k": "key", "v": "value", "mlp": "MLP input", "output": "output (resid_post)"}


class DrawnEdge(NamedTuple):
    writer: str      # a writer name
    target: str      # the component that reads: a head, an MLP or resid_post
    kind: str        # a key of READER_COLORS
    reader: str      # the circuit's reader name (a0.h1.k, m3, resid_post)


def reader_targets(reader: str, graph) -> tuple[str, list[str]]:
    """(kind, components) that reader `reader` feeds."""
    if reader == "resid_post":
        return "output", ["resid_post"]
    if reader.startswith("m"):
        return "mlp", [reader]
    head, letter = reader.rsplit(".", 1)          # a{l}.h{i}, q/k/v
    if letter == "q":
        return "q", [head]
    layer, h = head.split(".")
    j = int(h[1:])
    per_group = graph.n_heads // graph.n_kv_heads
    return letter, [f"{layer}.h{i}" for i in range(j * per_group, (j + 1) * per_group)]


def drawn_edges(circuit) -> tuple[list[DrawnEdge], set]:
    """The circuit's edges folded into components (in the circuit's edge
    order), and the set of components they touch (``resid_post`` always)."""
    nodes = set(circuit.nodes)
    out, used = [], {"resid_post"}
    for w, r in circuit.edges:
        kind, targets = reader_targets(r, circuit.graph)
        if kind in ("k", "v"):   # only the heads of the group that are in the circuit, if any
            targets = [t for t in targets if t in nodes] or targets
        for t in targets:
            out.append(DrawnEdge(w, t, kind, r))
            used.add(w)
            used.add(t)
    return out, used


def default_title(circuit) -> str:
    """Model / task / how many edges the circuit keeps."""
    parts = list(dict.fromkeys(p for p in (circuit.model_name, circuit.task) if p))
    return " / ".join(parts + [f"{circuit.n_edges} of {circuit.graph.n_edges} edges "
                               f"(sparsity {circuit.edge_sparsity:.4f})"])
