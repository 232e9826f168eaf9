"""fastedge's own circuit drawing: a self-contained SVG, no graphviz needed.

`circuit_to_svg(circuit, title=None)` returns the SVG text. It needs nothing
outside the file: no fonts (a generic sans-serif family), images or scripts.

Layout (bottom to top):

* the embeddings (``tok_embeds``/``pos_embeds``, or ``embeds``);
* one row per layer: its heads ``a{l}.h{i}`` in order, then its MLP ``m{l}``.
  Heads of the same index line up in columns across layers. A sequential
  block's MLP reads its own layer's heads, so it sits on a tier above them
  and head-to-MLP edges climb into it; a parallel block's MLP sits level
  beside its heads;
* ``resid_post`` on top, a wide box.

Components come from `fastedge.draw.components`: readers are folded into the
component that reads through them, and an edge is coloured by the reader's
kind (`READER_COLORS`: q, k, v, MLP, output), explained in the legend. An
edge leaves the top of its writer and enters the bottom of its reader: into
a head's left third for q, the middle third for k and the right third for
v. Edges into one port range are spread in the order of their writers'
positions, and edges out of one writer in the order of their readers'.

Edge routes: an edge between neighbouring rows of boxes is one S-curve
through the gap between them. An edge that passes a row of boxes (between
distant layers) is routed: it curves from its writer into the channel
between two columns beside its reader, runs straight up the channel, and
curves out into its reader, so no edge crosses a box and long edges read as
vertical runs, apart from the short curves between neighbouring layers.
Edges sharing a channel take lanes 3 px apart (closer when many). Every
edge and box carries a ``<title>`` (a tooltip in browsers:
``a0.h3 → a2.h1.k``), and an edge under the pointer is drawn bold. A
circuit's ``node_labels`` are written under the writer's name, one line each
(cut at 40 characters, the full text in the tooltip). Class names start
with ``fe-`` (``fe-node`` per drawn box, ``fe-edges`` holding one ``path``
per drawn edge, ``fe-ctx`` the faint boxes), so the SVG can be inlined in an
HTML page beside other SVGs without style clashes.

Unused heads and MLPs (no drawn edge) depend on the graph's size:

* up to 400 heads (`CONTEXT_MAX_HEADS`; GPT-2 small and medium) every
  component is drawn, the unused ones as faint outlined boxes (greyed
  context);
* above that (a 7B or 13B model) unused components are left out: a layer's
  row shows its used components only, its columns are the head indices used
  in some layer, its label says how many heads it shows
  ("L17 · 9/40 heads"), and a run of layers with none is collapsed into one
  thin band ("L5–L9: none in the circuit").

The embeddings and ``resid_post`` are always drawn. Output is deterministic
(same circuit, same bytes). Its size grows with the circuit, not the model:
about 170 bytes per drawn edge, 190 per box and 150 per faint box; a
CodeLlama-13B-size graph (40 layers of 40 heads) with 1,500 random edges
gives 0.52 MB and about 2,900 x 3,100 px (measured).
"""
from __future__ import annotations

from typing import Optional
from xml.sax.saxutils import escape

from fastedge.draw.components import KIND_LABELS, READER_COLORS, default_title, drawn_edges

__all__ = ["circuit_to_svg", "CONTEXT_MAX_HEADS"]

CONTEXT_MAX_HEADS = 400      # larger graphs leave unused components out instead of greying them

_FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
_NAME_SIZE = 11              # px
_LABEL_SIZE = 9
_CHAR_W = 0.62               # average glyph width / font size (a safe overestimate for sans-serif)
_LABEL_MAX_CHARS = 40
_BOX_PAD_X = 6
_BOX_H = 20                  # a box with its name only
_LABEL_LINE = 11             # each node_label line adds this much
_HEAD_GAP = 12               # between boxes in a row: a channel for edges that pass rows
_MLP_GAP = 14                # extra gap before a layer's MLP
_TIER_GAP = 10               # a sequential block's MLP sits this much above its heads
_LANE = 3                    # px between edges side by side in a channel
_ROW_GAP = 44                # vertical room for edges between rows
_BAND_H = 14                 # a collapsed run of empty layers
_LEFT = 96                   # room for the row labels
_MARGIN = 24

_FILL = {"embedding": "#e0e0e0", "head": "#cfe2f3", "mlp": "#fce5cd", "resid_post": "#d9ead3"}
_STROKE = {"embedding": "#888888", "head": "#6f8fb0", "mlp": "#c0955a", "resid_post": "#5f8f55"}
_NOTE = {True: "edges run up from writer to reader, into a head's left third (q), middle (k) or right (v); "
                 "faint boxes are not in the circuit",
         False: "edges run up from writer to reader, into a head's left third (q), middle (k) or right (v); "
                "heads not in the circuit are left out"}
_KIND_ORDER = {k: i for i, k in enumerate(READER_COLORS)}
# where along a box's bottom edge each reader kind enters (fractions of the width)
_PORTS = {"q": (0.04, 0.32), "k": (0.36, 0.64), "v": (0.68, 0.96), "mlp": (0.08, 0.92),
          "output": (0.03, 0.97)}


def _n(v: float) -> str:
    """A coordinate with one decimal, no trailing zeros (stable text)."""
    s = f"{v:.1f}"
    if s.endswith(".0"):
        s = s[:-2]
    return "0" if s == "-0" else s


def _text_w(text: str, size: float) -> float:
    return len(text) * size * _CHAR_W


def _cut(text: str) -> str:
    return text if len(text) <= _LABEL_MAX_CHARS else text[:_LABEL_MAX_CHARS - 1] + "\u2026"


class _Box:
    __slots__ = ("name", "kind", "used", "labels", "col", "w", "h", "x", "y", "row", "row_top", "row_bottom",
                 "raised")

    def __init__(self, name: str, kind: str, used: bool, labels: list, col=None):
        self.name, self.kind, self.used, self.labels, self.col = name, kind, used, labels, col
        width = max([_text_w(name, _NAME_SIZE)] + [_text_w(_cut(t), _LABEL_SIZE) for t in labels])
        self.w = width + 2 * _BOX_PAD_X
        self.h = _BOX_H + _LABEL_LINE * len(labels)
        self.x = self.y = 0.0     # top-left corner
        self.row = 0              # index among the rows with boxes, counted from the bottom
        self.row_top = self.row_bottom = 0.0
        self.raised = False       # a sequential block's MLP, above its heads

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


class _Row:
    """One row of boxes. Layer rows place their boxes in the shared columns
    (head index, then the MLP); the embeddings and resid_post rows are
    centred."""

    def __init__(self, label: str, boxes: list, *, band: bool = False, raised_mlp: bool = False):
        self.label, self.boxes, self.band, self.raised_mlp = label, boxes, band, raised_mlp
        self.y = 0.0
        self.head_h = max([b.h for b in boxes if b.kind != "mlp"], default=0.0)
        for b in boxes:    # a row of the MLP alone keeps it low
            b.raised = raised_mlp and b.kind == "mlp" and self.head_h > 0
        if band:
            self.h = _BAND_H
        else:
            self.h = max([b.h + (self.head_h + _TIER_GAP if b.raised else 0) for b in boxes] + [_BOX_H])

    def packed_width(self) -> float:
        return sum(b.w for b in self.boxes) + _HEAD_GAP * max(0, len(self.boxes) - 1)


def _rows(circuit, used: set, context: bool) -> list:
    """The drawing's rows, bottom to top."""
    g, labels = circuit.graph, circuit.node_labels

    def box(name, kind, col=None):
        return _Box(name, kind, name in used, labels.get(name, []), col)

    rows = [_Row("embeds", [box(e, "embedding") for e in g.embeddings])]
    empty_run: list = []

    def flush():
        if empty_run:
            a, b = empty_run[0], empty_run[-1]
            text = f"L{a}: none in the circuit" if a == b else f"L{a}\u2013L{b}: none in the circuit"
            rows.append(_Row(text, [], band=True))
            empty_run.clear()

    for l in range(g.n_layers):
        boxes = [box(f"a{l}.h{i}", "head", i) for i in range(g.n_heads)] + [box(f"m{l}", "mlp", g.n_heads)]
        if not context:
            boxes = [b for b in boxes if b.used]
        if not boxes:
            empty_run.append(l)
            continue
        flush()
        n_heads = sum(1 for b in boxes if b.kind == "head")
        label = f"L{l}" if context else f"L{l} \u00b7 {n_heads}/{g.n_heads} heads"
        rows.append(_Row(label, boxes, raised_mlp=not g.parallel_blocks))
    flush()
    rows.append(_Row("", [box("resid_post", "resid_post")]))
    return rows


def _columns(rows: list, mlp_col: int) -> dict:
    """Column -> (left x relative to the grid, width), for the layer rows'
    columns: every head index shown in some layer, then the MLPs (column
    `mlp_col`). Boxes take their column's width."""
    widths: dict = {}
    for r in rows:
        for b in r.boxes:
            if b.col is not None:
                widths[b.col] = max(widths.get(b.col, 0.0), b.w)
    cols, x = {}, 0.0
    for c in sorted(widths):
        if cols and c == mlp_col:
            x += _MLP_GAP
        cols[c] = (x, widths[c])
        x += widths[c] + _HEAD_GAP
    for r in rows:
        for b in r.boxes:
            if b.col is not None:
                b.w = cols[b.col][1]
    return cols


def _place(rows: list, cols: dict, top: float, content_w: float) -> tuple[float, dict]:
    """Set every box's position. Returns the y of the lowest row's bottom,
    and the channels beside each column: column -> ((x, half width) of the
    channel on its left, and of the one on its right)."""
    grid_w = max((x + w for x, w in cols.values()), default=0.0)
    grid_left = _LEFT + (content_w - grid_w) / 2
    # a box's row counts the rows with boxes below it: bands hold no boxes for edges to route around
    ranks = [sum(1 for r in rows[:i] if not r.band) for i in range(len(rows))]
    y, above = top, None
    for i, row in enumerate(reversed(rows)):       # top row first
        if above is not None:
            y += _ROW_GAP / 2 if (row.band or above.band) else _ROW_GAP
        row.y = y
        x = _LEFT + (content_w - row.packed_width()) / 2
        for b in row.boxes:
            b.row = ranks[len(rows) - 1 - i]
            b.row_top, b.row_bottom = y, y + row.h
            if b.col is not None:
                b.x = grid_left + cols[b.col][0]
            else:
                b.x = x
                x += b.w + _HEAD_GAP
            b.y = y + row.h - b.h - (row.head_h + _TIER_GAP if b.raised else 0)   # bottom-aligned
        y += row.h
        above = row
    channels, order = {}, sorted(cols, key=lambda c: cols[c][0])
    for k, c in enumerate(order):
        x0, w = cols[c]
        left_gap = x0 - (cols[order[k - 1]][0] + cols[order[k - 1]][1]) if k else _HEAD_GAP
        right_gap = (cols[order[k + 1]][0] - x0 - w) if k + 1 < len(order) else _HEAD_GAP
        channels[c] = ((grid_left + x0 - left_gap / 2, left_gap / 2),
                       (grid_left + x0 + w + right_gap / 2, right_gap / 2))
    return y, channels


def _spread(lo: float, hi: float, i: int, n: int) -> float:
    return lo + (hi - lo) * (i + 0.5) / n


def _routed(e, boxes: dict) -> bool:
    """Whether edge `e` passes a row of boxes (and so runs up a channel):
    it skips a row, or climbs into a raised MLP from the row below."""
    w, t = boxes[e.writer], boxes[e.target]
    return t.row - w.row >= 2 or (t.row - w.row == 1 and t.raised)


def _channel(sx: float, tx: float, w, t, channels: dict) -> tuple[float, float]:
    """The channel (x, half width) a routed edge climbs: beside its reader's
    column on the writer's side, else beside its writer's column on the
    reader's side, else the one nearest the middle."""
    if t.col is not None:
        left, right = channels[t.col]
        return left if abs(sx - left[0]) <= abs(sx - right[0]) else right
    if w.col is not None:
        left, right = channels[w.col]
        return left if abs(tx - left[0]) <= abs(tx - right[0]) else right
    mid = (sx + tx) / 2
    every = sorted({ch for pair in channels.values() for ch in pair})
    return min(every, key=lambda ch: (abs(ch[0] - mid), ch)) if every else (mid, _HEAD_GAP / 2)


def _edge_paths(edges: list, boxes: dict, channels: dict) -> list:
    """(path data, colour, tooltip) per drawn edge, in the edges' order.

    Ports: edges out of one writer are spread along its top in the order of
    their readers' positions; edges into one port range (a head's q, k or v
    third, an MLP's or resid_post's bottom) in the order of their writers'.
    Between neighbouring rows an edge is one S-curve through the gap. A
    routed edge (`_routed`) curves from its writer into a channel between
    columns, runs straight up it, and curves out into its reader: it never
    crosses a box. Edges sharing a channel take lanes side by side, and
    turn at heights spread over the gap."""
    outs: dict = {}
    ins: dict = {}
    for i, e in enumerate(edges):
        outs.setdefault(e.writer, []).append(i)
        ins.setdefault((e.target, e.kind), []).append(i)
    start, end = [None] * len(edges), [None] * len(edges)
    for w, idx in outs.items():
        b = boxes[w]
        idx.sort(key=lambda i: (boxes[edges[i].target].cx, -boxes[edges[i].target].y,
                                _KIND_ORDER[edges[i].kind], edges[i].target))
        for j, i in enumerate(idx):
            start[i] = (b.x + b.w * _spread(0.1, 0.9, j, len(idx)), b.y)
    for (t, kind), idx in ins.items():
        b = boxes[t]
        lo, hi = _PORTS[kind]
        idx.sort(key=lambda i: (boxes[edges[i].writer].cx, boxes[edges[i].writer].y, edges[i].writer))
        for j, i in enumerate(idx):
            end[i] = (b.x + b.w * _spread(lo, hi, j, len(idx)), b.y + b.h)
    lanes: dict = {}
    for i, e in enumerate(edges):
        if _routed(e, boxes):
            ch = _channel(start[i][0], end[i][0], boxes[e.writer], boxes[e.target], channels)
            lanes.setdefault(ch, []).append(i)
    lane_of = {}
    for (cx, half), idx in lanes.items():
        idx.sort(key=lambda i: (boxes[edges[i].target].row, start[i][0] < cx, start[i][0], end[i][0], i))
        step = min(_LANE, 2 * max(half - 1.5, 0.0) / len(idx))   # side by side, squeezed when many
        for j, i in enumerate(idx):
            lane_of[i] = (cx + (j - (len(idx) - 1) / 2) * step, _spread(0.0, 1.0, j, len(idx)))
    out = []
    for i, e in enumerate(edges):
        (sx, sy), (tx, ty) = start[i], end[i]
        if i not in lane_of:
            dy = sy - ty
            d = (f"M{_n(sx)} {_n(sy)}C{_n(sx)} {_n(sy - dy / 2)} {_n(tx)} {_n(ty + dy / 2)} "
                 f"{_n(tx)} {_n(ty)}")
        else:
            lx, f = lane_of[i]
            w, t = boxes[e.writer], boxes[e.target]
            ya = w.row_top - 6 - 12 * f              # turn into the channel in the gap above the writer's row
            yb = t.row_bottom + 6 + 12 * (1 - f)     # and out of it in the gap below the reader's row
            y1, y2 = ya - 6, yb + 6
            if y2 > y1:
                y1 = y2 = (y1 + y2) / 2
            d = (f"M{_n(sx)} {_n(sy)}C{_n(sx)} {_n(ya)} {_n(lx)} {_n(ya)} {_n(lx)} {_n(y1)}"
                 f"L{_n(lx)} {_n(y2)}C{_n(lx)} {_n(yb)} {_n(tx)} {_n(yb)} {_n(tx)} {_n(ty)}")
        out.append((d, READER_COLORS[e.kind], f"{e.writer} \u2192 {e.reader}"))
    return out


def _edge_style(n: int) -> tuple[float, float]:
    """(stroke width, opacity): thinner and lighter as edges multiply."""
    if n <= 60:
        return 1.6, 0.9
    if n <= 300:
        return 1.2, 0.65
    if n <= 1000:
        return 1.0, 0.5
    return 0.8, 0.4


def circuit_to_svg(circuit, *, title: Optional[str] = None) -> str:
    """The circuit as a self-contained SVG document (UTF-8 text).

    Layered: embeddings at the bottom, a row per layer, ``resid_post`` on
    top; edges coloured by reader kind, with a legend; ``node_labels`` under
    the names. Unused heads: greyed (faint boxes) for graphs of at most
    `CONTEXT_MAX_HEADS` heads, left out above that, with runs of empty
    layers collapsed into one band. `title` defaults to model / task / edge
    count. Deterministic. See the module docstring for the details."""
    g = circuit.graph
    edges, used = drawn_edges(circuit)
    context = g.n_layers * g.n_heads <= CONTEXT_MAX_HEADS
    if title is None:
        title = default_title(circuit)
    rows = _rows(circuit, used, context)
    cols = _columns(rows, g.n_heads)
    content_w = max([x + w for x, w in cols.values()] + [r.packed_width() for r in rows if not r.band])
    top_row = rows[-1].boxes[0]                     # resid_post: as wide as a third of the drawing
    top_row.w = max(top_row.w, 140.0, content_w / 3)
    content_w = max(content_w, top_row.w)

    legend = [(READER_COLORS[k], KIND_LABELS[k]) for k in READER_COLORS]
    legend_w = max(sum(34 + _text_w(t, 10) + 14 for _, t in legend), _text_w(_NOTE[context], 10))
    side = _HEAD_GAP                                  # the channel right of the last column
    width = max(_LEFT + content_w + side + _MARGIN, _MARGIN * 2 + _text_w(title, 14), _MARGIN * 2 + legend_w)
    if _LEFT + content_w + side + _MARGIN < width:          # centre the rows in a wider drawing
        content_w = width - _LEFT - side - _MARGIN
    top = 76.0
    bottom, channels = _place(rows, cols, top, content_w)
    height = bottom + _MARGIN
    boxes = {b.name: b for r in rows for b in r.boxes}
    paths = _edge_paths(edges, boxes, channels)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
           f'viewBox="0 0 {_n(width)} {_n(height)}" font-family="{_FONT}">',
           "<style>.fe-edges path:hover{stroke-width:3;stroke-opacity:1}</style>",
           f'<rect width="100%" height="100%" fill="#ffffff"/>',
           f'<text x="{_MARGIN}" y="24" font-size="14" font-weight="bold">{escape(title)}</text>']
    # legend: reader kinds, then what the boxes mean
    x = float(_MARGIN)
    out.append('<g class="fe-legend" font-size="10">')
    for colour, text in legend:
        out.append(f'<line x1="{_n(x)}" y1="42" x2="{_n(x + 26)}" y2="42" stroke="{colour}" stroke-width="3"/>'
                   f'<text x="{_n(x + 32)}" y="45.5">{escape(text)}</text>')
        x += 34 + _text_w(text, 10) + 14
    out.append(f'<text x="{_MARGIN}" y="60" fill="#555555">{escape(_NOTE[context])}</text></g>')
    # row labels and collapsed bands
    out.append('<g class="fe-rows" font-size="10" fill="#666666">')
    for r in rows:
        if r.band:
            y = r.y + r.h / 2
            out.append(f'<line x1="{_LEFT}" y1="{_n(y)}" x2="{_n(width - _MARGIN)}" y2="{_n(y)}" '
                       f'stroke="#dddddd" stroke-dasharray="4 3"/>'
                       f'<text x="{_n(_LEFT + 4)}" y="{_n(y - 3)}" font-style="italic">{escape(r.label)}</text>')
        elif r.label:
            out.append(f'<text x="8" y="{_n(r.y + r.h - 6)}">{escape(r.label)}</text>')
    out.append("</g>")
    # unused components (greyed context) under the edges, used ones above them
    out.append(f'<g class="fe-ctx" fill="#ffffff" stroke="#e2e2e2" font-size="{_NAME_SIZE}">')
    for b in boxes.values():
        if not b.used:
            out.append(f'<g><rect x="{_n(b.x)}" y="{_n(b.y)}" width="{_n(b.w)}" height="{_n(b.h)}" rx="4"/>'
                       f'<text x="{_n(b.cx)}" y="{_n(b.y + 14)}" text-anchor="middle" fill="#bbbbbb" '
                       f'stroke="none">{escape(b.name)}</text></g>')
    out.append("</g>")
    stroke_w, opacity = _edge_style(len(edges))
    out.append(f'<g class="fe-edges" fill="none" stroke-width="{stroke_w}" stroke-opacity="{opacity}">')
    for d, colour, tip in paths:
        out.append(f'<path d="{d}" stroke="{colour}"><title>{escape(tip)}</title></path>')
    out.append("</g>")
    out.append(f'<g class="fe-nodes" font-size="{_NAME_SIZE}">')
    for b in boxes.values():
        if b.used:
            out.append(_node(b))
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _node(b: _Box) -> str:
    tip = "\n".join([b.name] + b.labels)
    parts = [f'<g class="fe-node"><title>{escape(tip)}</title>'
             f'<rect x="{_n(b.x)}" y="{_n(b.y)}" width="{_n(b.w)}" height="{_n(b.h)}" rx="4" '
             f'fill="{_FILL[b.kind]}" stroke="{_STROKE[b.kind]}"/>',
             f'<text x="{_n(b.cx)}" y="{_n(b.y + 14)}" text-anchor="middle">{escape(b.name)}</text>']
    for i, t in enumerate(b.labels):
        parts.append(f'<text x="{_n(b.cx)}" y="{_n(b.y + 14 + _LABEL_LINE * (i + 1))}" text-anchor="middle" '
                     f'font-size="{_LABEL_SIZE}" fill="#444444">{escape(_cut(t))}</text>')
    parts.append("</g>")
    return "".join(parts)
