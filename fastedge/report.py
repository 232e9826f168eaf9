"""The run report: one self-contained HTML page per pruning run.

    build_report("fastedge-out")                      # writes fastedge-out/report.html
    build_report("fastedge-out", sweep="sweep.json")  # with the faithfulness curve

`build_report(run_dir)` reads what ``fastedge prune`` writes to its output
folder (``circuit.json``, ``metrics.json``, ``log.jsonl``) and writes
``run_dir/report.html``. The page holds the circuit drawing
(`fastedge.draw.circuit_to_svg`), the metrics table with the full model's
and the empty circuit's values beside the circuit's, and the training
history as plots (`fastedge.plots`): loss, the objective (KL, or MSE),
edge (and node) sparsity against the target, and the Lagrange multipliers.
With a sweep (the JSON of ``fastedge eval --sweep ... --out FILE``, given
as `sweep`, or a ``sweep.json`` in the run folder no older than its
``masks.pt``) it adds the faithfulness curve with CPR and CMD shaded.

Everything is inline: SVG drawings and plots, one <style> element, no
scripts, fonts, images or links to other files, so the page opens offline
and can be mailed or archived as one file. It is also well-formed XML.

A folder from an interrupted run (a log but no circuit yet) gives a report
of what is there, saying what is missing. A `ReportError` (a ValueError)
names the file when nothing can be reported or a file is malformed.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

from fastedge import plots

__all__ = ["build_report", "ReportError", "load_log", "load_sweep", "REPORT_NAME"]

REPORT_NAME = "report.html"
_RUN_FILES = ("circuit.json", "metrics.json", "log.jsonl")


class ReportError(ValueError):
    """A run folder or sweep file that cannot be reported; the message names it."""


# -- reading a run -----------------------------------------------------------------------------

def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {what}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file; {what}") from None


def load_log(path: Union[str, os.PathLike]) -> list[dict]:
    """The records of a ``log.jsonl``, one per line (blank lines skipped). A
    line that is not a JSON object with a numeric "step" is refused with its
    line number."""
    path = Path(path)
    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file (a training log holds one JSON object a line)") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}, line {number}: not valid JSON ({exc.msg}); a training log holds one "
                              f"JSON object a line, as fastedge prune writes it") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise ReportError(f"{path}, line {number}: a log record is a JSON object with a numeric "
                              f"\"step\", got {line[:80]!r}")
        records.append(record)
    return records


def load_sweep(source) -> dict:
    """A sweep result: a dict as `fastedge.evaluate.sweep` returns it, or the
    path of the JSON that ``fastedge eval --sweep ... --out FILE`` wrote."""
    if isinstance(source, dict):
        data, where = source, "the sweep"
    else:
        path = Path(source)
        if not path.is_file():
            raise ReportError(f"{path}: no such sweep file (write one with fastedge eval --masks masks.pt "
                              f"--sweep mib --out {path.name})")
        data, where = _read_json(path, "expected the output of fastedge eval --sweep"), str(path)
    hint = "expected the result of fastedge eval --sweep ... --out FILE (an object with a list of points)"
    if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not data["points"]:
        raise ReportError(f"{where}: not a sweep result; {hint}")
    for i, p in enumerate(data["points"]):
        if not isinstance(p, dict) or "faithfulness" not in p or not (
                "edge_fraction" in p or "target_sparsity" in p):
            raise ReportError(f"{where}: point {i} has no faithfulness and edge fraction; {hint}")
    return data


# -- SVG inside HTML -----------------------------------------------------------------------------

_ID = re.compile(r'(?<![\w:-])id="([^"]+)"')   # the id attribute itself, not data-id or xml:id


def inline_svg(text: str, prefix: str) -> str:
    """An SVG document as an element to place inside HTML: the XML prolog,
    DOCTYPE and comments before it dropped, namespace declarations dropped
    (HTML puts <svg> in the SVG namespace itself), ``xlink:href`` written as
    SVG 2's ``href``, and every id prefixed with `prefix` (with the
    ``url(#...)`` and ``href="#..."`` references to it), so that several
    drawings on one page cannot take each other's clip paths or markers."""
    start = text.find("<svg")
    if start < 0:
        raise ValueError("not an SVG document (no <svg> element)")
    text = text[start:]
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = text.replace("xlink:href=", "href=")
    ids = set(_ID.findall(text))
    if ids:
        def ref(m: re.Match) -> str:
            name = m.group(2)
            return f"{m.group(1)}{prefix}-{name}{m.group(3)}" if name in ids else m.group(0)
        text = _ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', text)
        text = re.sub(r'(url\(#)([^)]+)(\))', ref, text)
        text = re.sub(r'(href="#)([^"]+)(")', ref, text)
    return text


def _circuit_svg(circuit) -> str:
    from fastedge.draw import circuit_to_svg
    return circuit_to_svg(circuit)


# -- the page ------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return "0" if v == 0 else f"{v:.4g}"
    return str(v)


# (metric, label, full model's value: a key of metrics.json or a fixed value, empty circuit's)
_KNOWN = (
    ("kl", "KL divergence to the full model", 0.0, "empty_kl"),
    ("mse", "MSE to the full model", 0.0, "empty_mse"),
    ("logit_diff", "Logit difference (clean − corrupted answer)", "full_logit_diff", "empty_logit_diff"),
    ("accuracy", "Accuracy", "full_accuracy", "empty_accuracy"),
    ("faithfulness", "Faithfulness (normalised: empty 0, full 1)", 1.0, 0.0),
)
_SIZE_KEYS = ("edge_sparsity", "n_edges", "target_sparsity", "steps", "wall_seconds")
_LABELS = {"edge_sparsity": "Edge sparsity of the circuit", "n_edges": "Edges kept",
           "target_sparsity": "Target sparsity (training)", "steps": "Steps", "wall_seconds": "Wall time (s)"}
_NOT_ROWS = {"model", "task"}


def _metrics_table(metrics: dict) -> str:
    used = set(_NOT_ROWS)
    rows = []
    for key, label, full, empty in _KNOWN:
        if key not in metrics:
            continue
        cells = [metrics[key]]
        for ref in (full, empty):
            if isinstance(ref, str):
                cells.append(metrics[ref] if ref in metrics else "\u2014")   # a dash: not computed
                used.add(ref)
            else:
                cells.append(f"{_fmt(ref)} (by definition)")
        used.add(key)
        rows.append((label, key, cells))
    for key in _SIZE_KEYS:
        if key in metrics:
            rows.append((_LABELS[key], key, [metrics[key], "", ""]))
            used.add(key)
    notes = {k: v for k, v in metrics.items() if k.endswith("_note")}
    used |= set(notes)
    for key in sorted(k for k in metrics if k not in used):
        rows.append((key.replace("_", " "), key, [metrics[key], "", ""]))
    body = "".join(
        f'<tr data-metric="{html.escape(key)}"><th scope="row">{html.escape(label)}</th>'
        + "".join(f"<td>{html.escape(c if isinstance(c, str) else _fmt(c))}</td>" for c in cells) + "</tr>\n"
        for label, key, cells in rows)
    table = ('<table class="metrics">\n<thead><tr><th>metric</th><th>circuit</th><th>full model</th>'
             '<th>empty circuit</th></tr></thead>\n<tbody>\n' + body + "</tbody>\n</table>\n")
    if notes:
        table += "".join(f'<p class="note">{html.escape(k[:-5])}: {html.escape(str(v))}</p>\n'
                         for k, v in notes.items())
    return table


def _figure(name: str, title: str, svg: str, caption: str = "") -> str:
    return (f'<figure class="plot" data-figure="{html.escape(name)}">\n<figcaption><b>{html.escape(title)}</b>'
            + (f" {html.escape(caption)}" if caption else "") + "</figcaption>\n"
            f"{inline_svg(svg, 'fig-' + name)}\n</figure>\n")


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 1.5em auto; max-width: 1400px; padding: 0 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.summary { color: #444; margin-top: 0; }
.note { color: #8a5a00; font-size: 0.9em; }
figure { margin: 0.6em 0; }
figcaption { font-size: 0.85em; color: #444; margin-bottom: 0.3em; }
figure svg { max-width: 100%; height: auto; display: block; }
.circuit { overflow: auto; border: 1px solid #eee; padding: 0.5em; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1em; }
table.metrics { border-collapse: collapse; font-size: 0.95em; }
table.metrics th, table.metrics td { border-bottom: 1px solid #e4e4e4; padding: 0.25em 0.9em; text-align: right; }
table.metrics th[scope=row] { text-align: left; font-weight: normal; }
table.metrics thead th { border-bottom: 2px solid #999; }
footer { margin-top: 2em; font-size: 0.8em; color: #777; }
"""


def _sweep_from_folder(run: Path, notes: list) -> Optional[dict]:
    """``run/sweep.json`` when it is at least as new as ``run/masks.pt`` (an
    older one was computed from another run's masks)."""
    path, masks = run / "sweep.json", run / "masks.pt"
    if not path.is_file():
        return None
    if masks.is_file() and path.stat().st_mtime < masks.stat().st_mtime:
        notes.append(f"{path.name} is older than {masks.name} (it belongs to an earlier run in this folder) "
                     f"and is not shown; pass a current one with fastedge report --sweep FILE")
        return None
    return load_sweep(path)


def build_report(run_dir: Union[str, os.PathLike], *, sweep=None,
                 out: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Write the report of the run in `run_dir` (module docstring) to
    `out` (default ``run_dir/report.html``) and return its path. `sweep`: a
    sweep result (a dict from `fastedge.evaluate.sweep`, or the path of its
    JSON); None looks for ``run_dir/sweep.json``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such folder (give the --out folder of a fastedge prune run)")
    present = [name for name in _RUN_FILES if (run / name).is_file()]
    if not present:
        raise ReportError(f"{run}: holds none of {', '.join(_RUN_FILES)}: not the output folder of a "
                          f"fastedge prune run")
    notes = [f"no {name} in this folder" + (" (the run has not finished, or was interrupted)"
                                             if name != "log.jsonl" else "")
             for name in _RUN_FILES if name not in present]

    circuit = None
    if (run / "circuit.json").is_file():
        from fastedge.circuit import Circuit
        try:
            circuit = Circuit.load(run / "circuit.json")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReportError(str(exc) if str(run) in str(exc) else f"{run / 'circuit.json'}: {exc}") from None
    metrics = {}
    if (run / "metrics.json").is_file():
        metrics = _read_json(run / "metrics.json", "expected the metrics.json that fastedge prune writes")
        if not isinstance(metrics, dict):
            raise ReportError(f"{run / 'metrics.json'}: expected a JSON object of metrics, "
                              f"got {type(metrics).__name__}")
    records = load_log(run / "log.jsonl") if (run / "log.jsonl").is_file() else []
    sweep_data = load_sweep(sweep) if sweep is not None else _sweep_from_folder(run, notes)
    if sweep_data is not None and circuit is not None:
        biggest = max((p.get("n_edges") or 0) for p in sweep_data["points"])
        if isinstance(biggest, (int, float)) and biggest > circuit.graph.n_edges:
            raise ReportError(f"the sweep has a circuit of {biggest} edges, but this run's model has "
                              f"{circuit.graph.n_edges}: it was computed on another model")

    model = metrics.get("model") or (circuit.model_name if circuit else "") or "?"
    task = metrics.get("task") or (circuit.task if circuit else "") or "?"
    title = f"fastedge run: {model} on {task}"
    parts = [f"<h1>{html.escape(title)}</h1>\n"]
    summary = []
    if circuit is not None:
        g = circuit.graph
        summary.append(f"{circuit.n_edges:,} of {g.n_edges:,} edges kept (edge sparsity "
                       f"{circuit.edge_sparsity:.4f}); {circuit.n_nodes} of {g.n_writers} writers; "
                       f"{g.n_layers} layers × {g.n_heads} heads; ablation {circuit.ablation}")
    if records:
        last = records[-1]
        summary.append(f"{len(records):,} training steps logged (last: step {_fmt(last.get('step'))})")
    parts.append(f'<p class="summary">{html.escape(". ".join(summary))}.</p>\n' if summary else "")
    parts += [f'<p class="note">{html.escape(n)}.</p>\n' for n in notes]

    if circuit is not None:
        parts.append('<section id="circuit">\n<h2>Circuit</h2>\n'
                     '<figure class="circuit" data-figure="circuit">\n'
                     f"{inline_svg(_circuit_svg(circuit), 'circuit')}\n</figure>\n</section>\n")
    if metrics:
        parts.append('<section id="metrics">\n<h2>Metrics</h2>\n<p class="summary">The extracted circuit on '
                     'the validation split, beside the full model and the empty circuit.</p>\n'
                     + _metrics_table(metrics) + "</section>\n")
    if records:
        objective = "mse" if "mse" in metrics and "kl" not in metrics else "kl"
        circuit_sparsity = metrics.get("edge_sparsity")
        figures = plots.history_plots(records, objective=objective,
                                      circuit_edge_sparsity=circuit_sparsity
                                      if isinstance(circuit_sparsity, (int, float)) else None)
        parts.append('<section id="training">\n<h2>Training</h2>\n<div class="plots">\n'
                     + "".join(_figure(p.name, p.title, p.svg, p.caption) for p in figures)
                     + "</div>\n</section>\n")
    if sweep_data is not None:
        parts.append('<section id="sweep">\n<h2>Faithfulness sweep</h2>\n')
        plot = plots.sweep_plot(sweep_data)
        if plot is None:
            parts.append(f'<p class="note">No point of the sweep has a finite faithfulness'
                         f'{": " + html.escape(str(sweep_data["areas_note"])) if sweep_data.get("areas_note") else ""}'
                         f".</p>\n")
        else:
            parts.append(_figure(plot.name, plot.title, plot.svg, plot.caption))
        parts.append(_sweep_table(sweep_data) + "</section>\n")

    import fastedge
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<footer>Written by fastedge {html.escape(fastedge.__version__)} on {stamp} from "
                 f"{html.escape(', '.join(present))} in {html.escape(str(run))}; rebuild with "
                 f"<code>fastedge report {html.escape(str(run))}</code>.</footer>\n")
    page = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "".join(parts) + "</body>\n</html>\n")
    path = Path(out) if out is not None else run / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)   # a reader never sees half a page
    return path


def _sweep_table(sweep: dict) -> str:
    cols = [("edge_fraction", "edges kept (fraction)"), ("n_edges", "edges"), ("faithfulness", "faithfulness"),
            ("kl", "KL"), ("accuracy", "accuracy")]
    points = sweep["points"]
    cols = [(k, label) for k, label in cols if any(k in p for p in points)]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(p.get(k)))}</td>" for k, _ in cols) + "</tr>\n"
                   for p in points)
    areas = " ".join(f"{name.upper()} {_fmt(sweep[name])}." for name in ("cpr", "cmd") if name in sweep)
    return (f'<p class="summary">{html.escape(areas)}</p>\n' if areas else "") + (
        f'<table class="metrics sweep">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n')
