"""Circuits as graphviz DOT text, and rendering with graphviz's ``dot``.

`circuit_to_dot(circuit)` writes the DOT text; `render_dot(text, path, fmt)`
runs graphviz's ``dot`` program (as a subprocess; the Python ``graphviz``
package is not needed).

Layout: the components of `fastedge.draw.components`: the embedding writers
at the bottom (``rank=min``), then per layer its heads on one rank and its MLP
(on the next rank for sequential blocks, beside the heads for parallel ones),
and ``resid_post`` at the top. Edges are coloured by the reader's kind (see
the legend). Only components that have a kept edge are drawn
(``resid_post`` always). A circuit's ``node_labels`` are written under each
writer's name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from fastedge.draw.components import KIND_LABELS, READER_COLORS, default_title, drawn_edges

__all__ = ["GraphvizNotFoundError", "circuit_to_dot", "render_dot", "GRAPHVIZ_FORMATS"]

GRAPHVIZ_FORMATS = ("svg", "png", "pdf")
_NODE_STYLE = {
    "embedding": 'shape=box, style="filled,rounded", fillcolor="#e0e0e0"',
    "head": 'shape=ellipse, style=filled, fillcolor="#cfe2f3"',
    "mlp": 'shape=box, style=filled, fillcolor="#fce5cd"',
    "resid_post": 'shape=box, style="filled,bold", fillcolor="#d9ead3"',
}


class GraphvizNotFoundError(RuntimeError):
    """graphviz's ``dot`` program is not on PATH."""


_INSTALL_HINT = ("graphviz's `dot` program was not found on PATH; drawing a circuit as PNG or PDF (or with "
                 "the graphviz engine) needs it. Install graphviz: `apt-get install graphviz` (Debian/Ubuntu), "
                 "`conda install graphviz` (conda), or `brew install graphviz` (macOS). Without it, draw to "
                 ".svg (fastedge's own renderer) or .dot (the graph as DOT text).")


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def circuit_to_dot(circuit, *, title: Optional[str] = None) -> str:
    """The circuit as a graphviz DOT digraph (see the module docstring)."""
    g = circuit.graph
    edges, used = drawn_edges(circuit)
    if title is None:
        title = default_title(circuit)
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
    for w, t, kind, _ in edges:
        lines.append(f"  {_q(w)} -> {_q(t)} [color={_q(READER_COLORS[kind])}];")
    rows = '<TR><TD COLSPAN="2"><B>reader</B></TD></TR>' + "".join(f'<TR><TD BGCOLOR="{READER_COLORS[k]}" WIDTH="24" HEIGHT="8"></TD>'
                   f'<TD ALIGN="LEFT">{KIND_LABELS[k]}</TD></TR>' for k in READER_COLORS)
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


def render_dot(text: str, path, fmt: str, *, timeout: float = 600.0) -> Path:
    """Render DOT `text` to `path` in format `fmt` (svg, png, pdf) with
    graphviz's ``dot``. Raises `GraphvizNotFoundError` when ``dot`` is not
    installed. Returns the path written."""
    path = Path(path)
    exe = _find_dot()
    try:
        proc = subprocess.run([exe, f"-T{fmt}", "-o", os.fspath(path)], input=text.encode(),
                              capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise GraphvizNotFoundError(_INSTALL_HINT) from None
    if proc.returncode != 0:
        raise RuntimeError(f"graphviz dot failed (exit {proc.returncode}) drawing {os.fspath(path)}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return path
