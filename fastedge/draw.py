"""Draw a circuit with graphviz (SVG, PNG or PDF).

`circuit_to_dot(circuit)` writes the DOT text; `draw_circuit(circuit, path)`
renders it with graphviz's ``dot`` program (run as a subprocess; the Python
``graphviz`` package is not needed).

Layout: one box per *component*: the embedding writers (``tok_embeds`` and
``pos_embeds``, or ``embeds``) at the bottom, then per layer its heads
``a{l}.h{i}`` on one rank and its MLP ``m{l}`` (on the next rank for
sequential blocks, beside the heads for parallel ones), and ``resid_post``
at the top. Readers are folded into their component: an edge ``w -> r`` is
drawn from writer ``w`` to the component that reads through ``r``, coloured
by the reader's kind (q, k, v, MLP, output; see the legend). With
grouped-query attention a k/v reader serves every query head of its group,
so its edges are drawn to each of those heads that is in the circuit (to
all of them when none is). Only components that have a kept edge are drawn
(``resid_post`` always). A circuit's ``node_labels`` (a Tracr model's RASP
operations) are written under each writer's name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

__all__ = ["GraphvizNotFoundError", "circuit_to_dot", "draw_circuit", "READER_COLORS", "FORMATS"]

FORMATS = ("svg", "png", "pdf")

READER_COLORS = {
    "q": "#d62728",       # red
    "k": "#2ca02c",       # green
    "v": "#1f77b4",       # blue
    "mlp": "#ff7f0e",     # orange
    "output": "#7f7f7f",  # grey: into resid_post
}
_KIND_LABELS = {"q": "query", "k": "key", "v": "value", "mlp": "MLP input", "output": "output (resid_post)"}
_NODE_STYLE = {
    "embedding": 'shape=box, style="filled,rounded", fillcolor="#e0e0e0"',
    "head": 'shape=ellipse, style=filled, fillcolor="#cfe2f3"',
    "mlp": 'shape=box, style=filled, fillcolor="#fce5cd"',
    "resid_post": 'shape=box, style="filled,bold", fillcolor="#d9ead3"',
}


class GraphvizNotFoundError(RuntimeError):
    """graphviz's ``dot`` program is not on PATH."""


_INSTALL_HINT = ("graphviz's `dot` program was not found on PATH; drawing a circuit needs it. Install "
                 "graphviz: `apt-get install graphviz` (Debian/Ubuntu), `conda install graphviz` "
                 "(conda), or `brew install graphviz` (macOS). `circuit_to_dot(circuit)` gives the DOT "
                 "text without it.")


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reader_targets(reader: str, graph) -> tuple[str, list[str]]:
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


def circuit_to_dot(circuit, *, title: Optional[str] = None) -> str:
    """The circuit as a graphviz DOT digraph (see the module docstring)."""
    g = circuit.graph
    drawn_edges = []
    used = {"resid_post"}
    nodes = set(circuit.nodes)
    for w, r in circuit.edges:
        kind, targets = _reader_targets(r, g)
        if kind in ("k", "v"):   # only the heads of the group that are in the circuit, if any
            targets = [t for t in targets if t in nodes] or targets
        for t in targets:
            drawn_edges.append((w, t, kind))
            used.add(w)
            used.add(t)
    if title is None:
        parts = list(dict.fromkeys(p for p in (circuit.model_name, circuit.task) if p))
        title = " / ".join(parts + [f"{circuit.n_edges} of {g.n_edges} edges "
                                    f"(sparsity {circuit.edge_sparsity:.4f})"])
    lines = ["digraph circuit {",
             "  rankdir=BT; newrank=true; nodesep=0.25; ranksep=0.6;",
             f"  label={_q(title)}; labelloc=t; fontname=Helvetica; fontsize=14;",
             "  node [fontname=Helvetica, fontsize=11];",
             "  edge [arrowsize=0.6, penwidth=1.2];"]

    def _label(name):
        # the writer's name, and below it what the circuit file says it computes
        texts = circuit.node_labels.get(name)
        if not texts:
            return ""
        lines_ = "\\n".join(_q(t)[1:-1] for t in [name, *texts])   # DOT's line break: \n
        return f', label="{lines_}"'


    def rank(names, style_key, how="same"):
        names = [n for n in names if n in used]
        if not names:
            return
        lines.append(f"  {{ rank={how};")
        for n in names:
            lines.append(f"    {_q(n)} [{_NODE_STYLE[style_key]}{_label(n)}];")
        lines.append("  }")

    rank(list(g.embeddings), "embedding", "min")
    for l in range(g.n_layers):
        heads = [f"a{l}.h{i}" for i in range(g.n_heads)]
        if g.parallel_blocks:
            names = [n for n in heads + [f"m{l}"] if n in used]
            if names:
                lines.append("  { rank=same;")
                for n in names:
                    lines.append(f"    {_q(n)} [{_NODE_STYLE['mlp' if n.startswith('m') else 'head']}{_label(n)}];")
                lines.append("  }")
        else:
            rank(heads, "head")
            rank([f"m{l}"], "mlp")
    rank(["resid_post"], "resid_post", "max")
    for w, t, kind in drawn_edges:
        lines.append(f"  {_q(w)} -> {_q(t)} [color={_q(READER_COLORS[kind])}];")
    rows = '<TR><TD COLSPAN="2"><B>reader</B></TD></TR>' + "".join(f'<TR><TD BGCOLOR="{READER_COLORS[k]}" WIDTH="24" HEIGHT="8"></TD>'
                   f'<TD ALIGN="LEFT">{_KIND_LABELS[k]}</TD></TR>' for k in READER_COLORS)
    lines.append("  subgraph cluster_legend { label=\"\"; color=\"#bbbbbb\";")
    lines.append(f'    legend [shape=plaintext, label=<<TABLE BORDER="0" CELLBORDER="0" '
                 f'CELLSPACING="3">{rows}</TABLE>>];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _find_dot() -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFoundError(_INSTALL_HINT)
    return exe


def draw_circuit(circuit, path, *, format: Optional[str] = None, title: Optional[str] = None,
                 timeout: float = 600.0) -> Path:
    """Render `circuit` to `path` as SVG, PNG or PDF (``format``, default from
    the suffix) with graphviz's ``dot``. Raises `GraphvizNotFoundError` when
    ``dot`` is not installed. Returns the path written."""
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"cannot draw to {os.fspath(path)!r}: format {fmt or '(none)'!r} is not one of "
                         f"{', '.join(FORMATS)} (pass format= or use a .svg/.png/.pdf suffix)")
    exe = _find_dot()
    text = circuit_to_dot(circuit, title=title)
    try:
        proc = subprocess.run([exe, f"-T{fmt}", "-o", os.fspath(path)], input=text.encode(),
                              capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise GraphvizNotFoundError(_INSTALL_HINT) from None
    if proc.returncode != 0:
        raise RuntimeError(f"graphviz dot failed (exit {proc.returncode}) drawing {os.fspath(path)}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return path
