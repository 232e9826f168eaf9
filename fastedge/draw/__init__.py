"""Draw a circuit: fastedge's own SVG, or graphviz (SVG, PNG, PDF), or DOT text.

`circuit_to_svg(circuit)` gives a self-contained SVG drawn by fastedge itself
(`fastedge.draw.svg`; no system package needed). `circuit_to_dot(circuit)`
gives graphviz DOT text (`fastedge.draw.dot`). `draw_circuit(circuit, path)`
writes a file, the format taken from the suffix:

* ``.svg``: the built-in renderer, or graphviz with ``engine="graphviz"``;
* ``.png``, ``.pdf``: graphviz's ``dot`` (`GraphvizNotFoundError`, with how to
  install it, when it is missing);
* ``.dot``: the DOT text (graphviz not needed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from fastedge.draw.components import KIND_LABELS, READER_COLORS
from fastedge.draw.dot import GRAPHVIZ_FORMATS, GraphvizNotFoundError, circuit_to_dot, render_dot
from fastedge.draw.svg import circuit_to_svg

__all__ = ["GraphvizNotFoundError", "circuit_to_dot", "circuit_to_svg", "draw_circuit", "READER_COLORS",
           "KIND_LABELS", "FORMATS", "ENGINES"]

FORMATS = ("svg", "png", "pdf", "dot")
ENGINES = ("builtin", "graphviz")


def draw_circuit(circuit, path, *, format: Optional[str] = None, engine: Optional[str] = None,
                 title: Optional[str] = None, timeout: float = 600.0) -> Path:
    """Draw `circuit` to `path` and return the path.

    ``format`` (default: the suffix) is svg, png, pdf or dot. ``engine`` is
    ``"builtin"`` (fastedge's own SVG, `circuit_to_svg`) or ``"graphviz"``
    (the ``dot`` program, `circuit_to_dot`); by default svg uses the built-in
    renderer and png/pdf use graphviz. ``.dot`` writes the DOT text whatever
    the engine. Raises `GraphvizNotFoundError` when graphviz is needed and
    ``dot`` is not installed; `timeout` (seconds) bounds graphviz's run.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"cannot draw to {os.fspath(path)!r}: format {fmt or '(none)'!r} is not one of "
                         f"{', '.join(FORMATS)} (pass format= or use a .svg/.png/.pdf/.dot suffix)")
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"drawing engine {engine!r} is not one of {', '.join(ENGINES)}")
    if fmt == "dot":
        path.write_text(circuit_to_dot(circuit, title=title))
        return path
    if engine is None:
        engine = "builtin" if fmt == "svg" else "graphviz"
    if engine == "builtin":
        if fmt != "svg":
            raise ValueError(f"the built-in engine draws SVG only; {fmt.upper()} needs graphviz "
                             f"(engine='graphviz', --engine graphviz on the command line, or no engine)")
        path.write_text(circuit_to_svg(circuit, title=title), encoding="utf-8")
        return path
    assert fmt in GRAPHVIZ_FORMATS
    return render_dot(circuit_to_dot(circuit, title=title), path, fmt, timeout=timeout)
