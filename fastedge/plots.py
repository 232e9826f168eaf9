"""The run report's plots: matplotlib figures rendered to SVG text.

Figures are built with `matplotlib.figure.Figure` directly, never through
`pyplot`, so no display backend is ever selected or needed: saving as SVG
goes through matplotlib's own SVG writer (the Agg backend is what the rest of
matplotlib would use without a display). Text stays text
(``svg.fonttype: none``): the browser draws it with its own sans-serif font,
and the SVG carries no embedded glyphs.

Each plotted series is a line whose SVG group id is ``series-<name>``
(``series-loss``, ``series-edge_sparsity``, ...), one vertex per plotted
step, so a reader (or a test) can find it. Paths are not simplified: every
step of the log is a vertex, up to `MAX_POINTS` per series; longer logs are
thinned to every k-th step (and the last), which the caption says.

`history_plots(records, ...)` gives the training plots of a ``log.jsonl``
(loss, objective, sparsity against its target, multipliers);
`sweep_plot(sweep)` the faithfulness curve of ``fastedge eval --sweep`` with
the CPR and CMD areas shaded.
"""
from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

MAX_POINTS = 5000          # vertices per series; longer logs are thinned
_SIZE = (6.4, 3.6)         # inches; 100 dpi in the SVG: 640 x 360 px
_RC = {"svg.fonttype": "none", "svg.hashsalt": "fastedge", "path.simplify": False,
       "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
COLORS = {"loss": "#1f77b4", "kl": "#d62728", "edge": "#1f77b4", "node": "#ff7f0e", "target": "#333333",
          "lambda1": "#2ca02c", "lambda2": "#9467bd", "cpr": "#2ca02c", "cmd": "#d62728", "curve": "#1f77b4"}


@dataclass
class Plot:
    name: str          # a short id: "loss", "kl", "sparsity", "multipliers", "sweep"
    title: str
    svg: str           # an <svg> element (no XML prolog)
    caption: str = ""


def _with_rc(fn):
    """Run `fn` under the report's matplotlib settings (`_RC`), whatever the
    user's own are: they are read when axes, ticks and lines are made and
    when the figure is saved."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import matplotlib
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapped


def figure_svg(fig) -> str:
    """`fig` as one <svg> element: no XML declaration, DOCTYPE or metadata
    (the report embeds it inline)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def _new_figure(ncols: int = 1, width: Optional[float] = None):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width or _SIZE[0], _SIZE[1]), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _value(record: dict, key: str) -> float:
    v = record.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")     # missing, or null (a non-finite value in the log)
    return float(v)


def thin(n: int, max_points: int = MAX_POINTS) -> list[int]:
    """Indices of the records to plot: all of them up to `max_points`, else
    every k-th and the last."""
    if n <= max_points:
        return list(range(n))
    k = math.ceil(n / (max_points - 1))
    keep = list(range(0, n, k))
    if keep[-1] != n - 1:
        keep.append(n - 1)
    return keep


def _series(records: Sequence[dict], keep: list[int], key: str) -> list[float]:
    return [_value(records[i], key) for i in keep]


def _has(records: Sequence[dict], key: str) -> bool:
    return any(key in r for r in records)


def _divergence_scale(ax, values: Sequence[float]) -> None:
    """A log axis for a divergence that spans decades; symlog where some
    values are 0 or rounding-error negative (a log axis would drop those
    points), linear where the values stay within three decades."""
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if not positive or max(positive) <= 1e3 * min(positive):
        return
    if len(positive) == len(finite):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=max(min(positive), max(positive) * 1e-6))


def _line(ax, xs, ys, *, name: str, **kw) -> None:
    (line,) = ax.plot(xs, ys, **kw)
    line.set_gid(f"series-{name}")


@_with_rc
def history_plots(records: Sequence[dict], *, objective: str = "kl",
                  circuit_edge_sparsity: Optional[float] = None) -> list[Plot]:
    """The training plots of a run's log records (`fastedge.prune` writes one
    per step: step, loss, kl, edge_sparsity, target, lambda1, lambda2, lr;
    node_sparsity, and node_target with node_lambda1/2, where the run had
    them). `objective` names what the "kl" field holds ("kl", or "mse" for
    numerical Tracr programs). `circuit_edge_sparsity`: the extracted
    circuit's, drawn as a reference line on the sparsity plot."""
    if not records:
        return []
    keep = thin(len(records))
    steps = [_value(records[i], "step") for i in keep]
    note = ("" if len(keep) == len(records) else
            f" Every {keep[1] - keep[0]}th of {len(records)} steps is drawn (and the last).")
    plots = []

    fig, (ax,) = _new_figure()
    _line(ax, steps, _series(records, keep, "loss"), name="loss", color=COLORS["loss"], lw=1)
    _label_axes(ax, "loss", legend=False)
    plots.append(Plot("loss", "Loss", figure_svg(fig),
                      "The training objective of each step: the divergence plus the Lagrangian sparsity "
                      "terms." + note))

    label = "MSE" if objective == "mse" else "KL"
    fig, (ax,) = _new_figure()
    values = _series(records, keep, "kl")
    _line(ax, steps, values, name="kl", color=COLORS["kl"], lw=1)
    _divergence_scale(ax, values)
    _label_axes(ax, f"{label} (training batch)", legend=False)
    plots.append(Plot("kl", label, figure_svg(fig),
                      f"{label} to the full model with sampled masks, on each step's training batch; the "
                      f"extracted circuit's {label} on the validation split is in the table." + note))

    fig, (ax,) = _new_figure()
    _line(ax, steps, _series(records, keep, "edge_sparsity"), name="edge_sparsity", color=COLORS["edge"],
          lw=1, label="edge sparsity", zorder=3)   # above the node line where they coincide
    _line(ax, steps, _series(records, keep, "target"), name="target", color=COLORS["target"], lw=1.2,
          ls="--", label="edge target")
    if _has(records, "node_sparsity"):
        _line(ax, steps, _series(records, keep, "node_sparsity"), name="node_sparsity", color=COLORS["node"],
              lw=1, label="node sparsity")
    if _has(records, "node_target"):
        _line(ax, steps, _series(records, keep, "node_target"), name="node_target", color=COLORS["node"],
              lw=1.2, ls="--", label="node target")
    if circuit_edge_sparsity is not None and math.isfinite(circuit_edge_sparsity):
        ax.axhline(circuit_edge_sparsity, color=COLORS["edge"], lw=0.8, ls=":",
                   label=f"extracted circuit ({circuit_edge_sparsity:.4f})")
    _label_axes(ax, "sparsity")
    plots.append(Plot("sparsity", "Sparsity against the target", figure_svg(fig),
                      "Sparsity of the sampled masks (1 - kept / all) and the target, raised linearly over "
                      "the warm-up." + note))

    fig, (ax,) = _new_figure()
    for key, color, ls in (("lambda1", COLORS["lambda1"], "-"), ("lambda2", COLORS["lambda2"], "-"),
                           ("node_lambda1", COLORS["lambda1"], "--"), ("node_lambda2", COLORS["lambda2"], "--")):
        if _has(records, key):
            _line(ax, steps, _series(records, keep, key), name=key, color=color, lw=1, ls=ls,
                  label=key.replace("node_lambda", "node lambda").replace("lambda", "λ"))
    _label_axes(ax, "multiplier")
    plots.append(Plot("multipliers", "Lagrange multipliers", figure_svg(fig),
                      "λ1 and λ2 of the sparsity penalty λ1 (s - t) + λ2 (s - t)², trained by gradient "
                      "ascent." + note))
    return plots


def _label_axes(ax, ylabel: str, *, legend: bool = True) -> None:
    """A history plot's axes: steps along x, `ylabel` up, the legend (if
    any) where it fits."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(loc="best", fontsize=8)


def _curve(points: Sequence[dict]) -> list[tuple[float, float]]:
    """(fraction of edges kept, faithfulness) of a sweep's points, sorted;
    points without a finite faithfulness are left out."""
    out = []
    for p in points:
        x = p.get("edge_fraction")
        if x is None and p.get("target_sparsity") is not None:
            x = 1.0 - p["target_sparsity"]
        y = p.get("faithfulness")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            out.append((float(x), float(y)))
    return sorted(out)


def _clip(curve: list[tuple[float, float]], lo: float) -> list[tuple[float, float]]:
    """The curve from `lo` on, cut there by linear interpolation."""
    pts = [p for p in curve if p[0] >= lo]
    below = [p for p in curve if p[0] < lo]
    if below and pts and pts[0][0] > lo:
        (xa, ya), (xb, yb) = below[-1], pts[0]
        pts.insert(0, (lo, ya + (yb - ya) * (lo - xa) / (xb - xa)))
    return pts


@_with_rc
def sweep_plot(sweep: dict, *, lo: float = 0.001) -> Optional[Plot]:
    """The faithfulness of the swept circuits against the fraction of edges
    kept, with CPR (the area under the curve) and CMD (the area between it and
    1) shaded from `lo` (MIB's smallest circuit) to 1. The numbers in the
    legend are the sweep's own ``cpr`` and ``cmd``. Left: linear axis (the
    scale the areas are taken on); right: the same on a log axis. None when
    no point has a finite faithfulness."""
    curve = _curve(sweep.get("points") or [])
    if not curve:
        return None
    cpr, cmd = sweep.get("cpr"), sweep.get("cmd")
    shaded = _clip(curve, lo)
    fig, axes = _new_figure(ncols=2, width=9.6)
    xs, ys = [x for x, _ in curve], [y for _, y in curve]
    for ax, scale in zip(axes, ("linear", "log")):
        suffix = "" if scale == "linear" else "-log"   # ids stay unique on the page
        if len(shaded) >= 2:
            sx, sy = [x for x, _ in shaded], [y for _, y in shaded]
            area = ax.fill_between(sx, 0, sy, color=COLORS["cpr"], alpha=0.25, lw=0,
                                   label="CPR" + (f" = {cpr:.4g}" if isinstance(cpr, (int, float)) else ""))
            area.set_gid("area-cpr" + suffix)
            area = ax.fill_between(sx, sy, 1, facecolor="none", edgecolor=COLORS["cmd"], hatch="///",
                                   lw=0, alpha=0.6,
                                   label="CMD" + (f" = {cmd:.4g}" if isinstance(cmd, (int, float)) else ""))
            area.set_gid("area-cmd" + suffix)
        _line(ax, xs, ys, name="faithfulness" + suffix, color=COLORS["curve"], marker="o", ms=3, lw=1.2,
              label="faithfulness")
        ax.axhline(1.0, color="#333333", lw=0.8, ls="--")
        ax.set_xscale(scale)
        ax.set_xlabel("fraction of edges kept" + (" (log scale)" if scale == "log" else ""))
        ax.set_ylabel("faithfulness")
    axes[0].legend(loc="lower right", fontsize=8)
    note = sweep.get("areas_note") or ""
    caption = (f"Normalised faithfulness of the circuits extracted at each size; CPR and CMD shaded from "
               f"{lo:g} to 1. {sweep.get('definition', '')}".strip())
    if note:
        caption += f" {note}"
    return Plot("sweep", "Faithfulness against edges kept", figure_svg(fig), caption)
