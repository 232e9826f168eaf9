"""The run report (`fastedge.report`, `fastedge.plots`, ``fastedge report``).

A real run feeds most tests: a tiny GPT-2 (word-level tokenizer, saved to a
folder) pruned by ``fastedge prune`` on a JSONL task whose clean and
corrupted answers differ (so faithfulness is defined), then swept by
``fastedge eval --sweep mib --out sweep.json``. The page is checked as
text (it parses as HTML and as XML, holds the circuit's SVG and one SVG per
plot, refers to nothing outside itself), the plots against the log they
draw (one vertex per logged step, placed where the logged value puts it),
and in a real browser: headless Chromium renders it, and the screenshot's
pixels where the circuit and each plot lie must not be blank. That test
skips, saying so, where no Chromium is installed (`apt-get install
chromium`).
"""
import html
import html.parser
import json
import math
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest
import torch

from fastedge.cli import main
from fastedge.report import ReportError, build_report, inline_svg, load_log

WORDS = ["<pad>", "the", "cat", "dog", "sat", "on", "mat", "rug", "a"]
PAIRS = [("cat", "dog"), ("dog", "cat"), ("mat", "rug"), ("rug", "mat")]
STEPS = 30
PLOTS = ("loss", "kl", "sparsity", "multipliers")


# -- a real run -----------------------------------------------------------------------------------

def _tiny_gpt2(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=len(WORDS), n_positions=16,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, model folder, data file) of a finished prune with a sweep.json;
    the report that prune wrote (before the sweep) is kept as ../by-prune.html."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("report")
    model = _tiny_gpt2(root / "tiny-gpt2")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"clean": f"the {a} sat on the <predict>{a}</predict>",
                                        "corrupted": f"the {b} sat on the <predict>{b}</predict>",
                                        "split": "validation" if i % 4 == 0 else "train"}) + "\n"
                            for i, (a, b) in enumerate(PAIRS * 3)))
    out = root / "run"
    assert main(["prune", "--model", model, "--data", str(data), "--steps", str(STEPS), "--batch-size", "4",
                 "--target-sparsity", "0.6", "--no-progress", "--out", str(out)]) == 0
    (root / "by-prune.html").write_text((out / "report.html").read_text())
    assert main(["eval", "--model", model, "--data", str(data), "--masks", str(out / "masks.pt"),
                 "--sweep", "mib", "--out", str(out / "sweep.json")]) == 0
    assert main(["report", str(out)]) == 0      # now with the sweep.json beside the masks
    return out, model, data


# -- reading the page -----------------------------------------------------------------------------

class _Tree(html.parser.HTMLParser):
    """Elements as (tag, attrs, path of enclosing data-figure names); checks nesting."""
    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.elements, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        figure = attrs.get("data-figure") or next((a.get("data-figure") for t, a in reversed(self.stack)
                                                   if a.get("data-figure")), None)
        self.elements.append((tag, attrs, figure))
        if tag not in self.VOID:
            self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        attrs = dict(attrs)
        figure = next((a.get("data-figure") for t, a in reversed(self.stack) if a.get("data-figure")), None)
        self.elements.append((tag, attrs, figure))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1][0] if self.stack else None}>")
        else:
            self.stack.pop()


def parse(page: str) -> _Tree:
    tree = _Tree()
    tree.feed(page)
    tree.close()
    assert not tree.errors, tree.errors[:3]
    assert not tree.stack, f"unclosed: {[t for t, _ in tree.stack]}"
    return tree


def external_references(page: str) -> list:
    """Everything in `page` that a browser would fetch from elsewhere."""
    found = re.findall(r"(?i)(?:https?|file|ftp)://[^\s\"'<>)]*", page)
    found += re.findall(r"(?i)<(?:script|link|img|iframe|object|embed|image|use|audio|video)\b[^>]*\b(?:src|href)"
                        r"\s*=\s*[\"'](?!#)[^\"']*", page)
    found += re.findall(r"(?i)\bsrc\s*=\s*[\"'][^\"']*", page)
    found += re.findall(r"(?i)\bhref\s*=\s*[\"'](?!#)[^\"']*", page)
    found += re.findall(r"(?i)url\(\s*[\"']?(?!#)[^)]*\)", page)
    found += re.findall(r"(?i)@import[^;]*", page)
    return found


def figure_svgs(page: str) -> dict:
    """{data-figure name: [its <svg> elements' text]}."""
    out = {}
    for m in re.finditer(r'<figure class="[^"]*" data-figure="([^"]+)">(.*?)</figure>', page, re.S):
        out[m.group(1)] = re.findall(r"<svg\b.*?</svg>", m.group(2), re.S)
    return out


def series_path(svg: str, name: str) -> list:
    """The vertices (x, y) of the line whose group id ends in series-<name>."""
    m = re.search(r'<g id="[^"]*series-' + re.escape(name) + r'">\s*<path d="([^"]+)"', svg)
    assert m, f"no series {name}"
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", m.group(1))]
    assert len(re.findall(r"[ML]", m.group(1))) * 2 == len(numbers)
    return list(zip(numbers[0::2], numbers[1::2]))


def _affine_residual(values, coords) -> tuple:
    """(max residual / range, slope) of the least-squares fit coords = a + b * values."""
    v = torch.tensor(values, dtype=torch.float64)
    c = torch.tensor(coords, dtype=torch.float64)
    A = torch.stack([torch.ones_like(v), v], 1)
    sol = torch.linalg.lstsq(A, c[:, None]).solution[:, 0]
    resid = (A @ sol - c).abs().max().item()
    return resid / max(c.max().item() - c.min().item(), 1e-12), sol[1].item()


# -- the page as text -----------------------------------------------------------------------------

def test_prune_writes_a_report(run):
    out, _, _ = run
    page = (out.parent / "by-prune.html").read_text()
    assert set(figure_svgs(page)) == {"circuit", *PLOTS}
    assert "wrote" not in page and f"fastedge report {out}" in page


def test_the_report_is_self_contained(run):
    out, _, _ = run
    page = (out / "report.html").read_text()
    tree = parse(page)
    ET.fromstring(page.split("\n", 1)[1])          # well-formed XML too (after <!DOCTYPE html>)
    svgs = figure_svgs(page)
    assert set(svgs) == {"circuit", *PLOTS, "sweep"}
    for name in svgs:                               # one drawing per figure
        assert len(svgs[name]) == 1, name
    tags = {t for t, _, _ in tree.elements}
    assert not tags & {"script", "img", "link", "iframe", "object", "embed"}
    assert external_references(page) == []
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "ids repeat across drawings"
    for ref in re.findall(r'(?:url\(#|href="#)([^)"]+)', page):
        assert ref in ids, f"reference to a missing id #{ref}"


def test_the_reference_check_finds_what_a_browser_would_fetch():
    for bad in ('<img src="a.png"/>', '<script src="x.js"></script>', '<link rel="stylesheet" href="s.css"/>',
                '<svg><image href="pic.png"/></svg>', '<p style="background:url(a.png)">x</p>',
                '<style>@import "x.css";</style>', '<a href="https://example.org">x</a>'):
        assert external_references(f"<html><body>{bad}</body></html>"), bad
    assert external_references('<svg><use href="#glyph"/><path clip-path="url(#c1)"/></svg>') == []


def test_the_circuit_drawing_is_the_circuits(run):
    out, _, _ = run
    page = (out / "report.html").read_text()
    circuit = json.loads((out / "circuit.json").read_text())
    (svg,) = figure_svgs(page)["circuit"]
    writers = {w for w, _ in circuit["edges"]}
    assert writers, "the run kept no edges"
    from fastedge.circuit import Circuit
    from fastedge.draw import circuit_to_svg
    assert svg == inline_svg(circuit_to_svg(Circuit.load(out / "circuit.json")), "circuit").strip()
    shown = [w for w in writers if re.search(r">\s*" + re.escape(w) + r"\s*<", svg)]
    assert shown, f"none of the circuit's writers {sorted(writers)} is named in its drawing"


def test_plots_follow_the_log(run):
    out, _, _ = run
    records = load_log(out / "log.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all("node_sparsity" in r for r in records)      # node masks are on by default
    svgs = {k: v[0] for k, v in figure_svgs((out / "report.html").read_text()).items()}
    for plot, series in (("loss", ["loss"]), ("kl", ["kl"]),
                         ("sparsity", ["edge_sparsity", "target", "node_sparsity"]),
                         ("multipliers", ["lambda1", "lambda2"])):
        for name in series:
            points = series_path(svgs[plot], name)
            assert len(points) == len(records), (plot, name)
            xs, ys = zip(*points)
            residual, slope = _affine_residual([r["step"] for r in records], xs)
            assert residual < 1e-3 and slope > 0, (plot, name)
            if plot == "kl":      # possibly a log axis
                continue
            values = [r[name] for r in records]
            if max(values) - min(values) < 1e-9:
                continue
            residual, slope = _affine_residual(values, ys)   # SVG y grows downwards
            assert residual < 1e-3 and slope < 0, (plot, name, residual)


def test_metrics_table_lists_known_metrics_first_beside_the_full_model(run):
    out, _, _ = run
    metrics = json.loads((out / "metrics.json").read_text())
    page = (out / "report.html").read_text()
    rows = re.findall(r'<tr data-metric="([^"]+)">(.*?)</tr>', page, re.S)
    keys = [k for k, _ in rows]
    assert keys[:4] == ["kl", "logit_diff", "accuracy", "faithfulness"]
    cells = {k: [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", body)] for k, body in rows}
    assert cells["logit_diff"][0] == f"{metrics['logit_diff']:.4g}"
    assert cells["logit_diff"][1] == f"{metrics['full_logit_diff']:.4g}"
    assert cells["logit_diff"][2] == f"{metrics['empty_logit_diff']:.4g}"
    assert cells["accuracy"][1] == f"{metrics['full_accuracy']:.4g}"
    assert cells["faithfulness"][0] == f"{metrics['faithfulness']:.4g}"
    assert cells["kl"][2] == f"{metrics['empty_kl']:.4g}"
    shown = set(keys) | {"full_logit_diff", "empty_logit_diff", "full_accuracy", "empty_kl", "model", "task"}
    assert set(metrics) <= shown | {k for k in metrics if k.endswith("_note")}


def test_a_tracr_style_run_shows_its_objective(tmp_path):
    """Numerical Tracr programs are scored on MSE; the table and the plot say so."""
    metrics = {"mse": 0.01, "empty_mse": 2.5, "accuracy": 0.9, "empty_accuracy": 0.1, "full_accuracy": 1.0,
               "faithfulness": 0.996, "edge_sparsity": 0.8, "n_edges": 12, "steps": 3, "custom_thing": 7}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    _write_log(tmp_path / "log.jsonl", 3)
    page = build_report(tmp_path).read_text()
    keys = re.findall(r'<tr data-metric="([^"]+)">', page)
    assert keys[:3] == ["mse", "accuracy", "faithfulness"] and keys[-1] == "custom_thing"
    assert "MSE (training batch)" in page
    assert "no circuit.json" in page and 'data-figure="circuit"' not in page


def _write_log(path, n, node=False):
    g = torch.Generator().manual_seed(n)
    lines = []
    for i in range(n):
        r = {"step": i + 1, "loss": torch.rand((), generator=g).item() - 0.3, "kl": torch.rand((), generator=g).item(),
             "edge_sparsity": (i + 1) / n, "target": 0.9 * (i + 1) / n, "lambda1": -0.01 * i, "lambda2": 0.02 * i,
             "lr": 0.1}
        if node:
            r.update(node_sparsity=0.5 * (i + 1) / n, node_target=0.4 * (i + 1) / n, node_lambda1=0.1,
                     node_lambda2=0.2)
        lines.append(json.dumps(r))
    path.write_text("\n".join(lines) + "\n")


def test_non_finite_log_values_leave_a_gap(tmp_path):
    """log.jsonl writes a non-finite value as null (with a note): the line breaks there."""
    _write_log(tmp_path / "log.jsonl", 6)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    record.update(loss=None, loss_note="not a finite number (nan)")
    lines[3] = json.dumps(record)
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    svg = figure_svgs(build_report(tmp_path).read_text())["loss"][0]
    d = re.search(r'<g id="[^"]*series-loss">\s*<path d="([^"]+)"', svg).group(1)
    assert len(re.findall("M", d)) == 2 and len(re.findall("[ML]", d)) == 5


def test_inline_svg_scopes_ids_and_their_references():
    doc = ('<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg xmlns="http://www.w3.org/2000/svg" '
           'xmlns:xlink="http://www.w3.org/1999/xlink"><defs><clipPath id="c"><rect/></clipPath>'
           '<path id="g"/></defs><use xlink:href="#g"/><path clip-path="url(#c)" data-id="keep"/>'
           '<a href="#elsewhere"/></svg>')
    out = inline_svg(doc, "p")
    assert out == ('<svg><defs><clipPath id="p-c"><rect/></clipPath><path id="p-g"/></defs><use href="#p-g"/>'
                   '<path clip-path="url(#p-c)" data-id="keep"/><a href="#elsewhere"/></svg>')


def test_long_logs_are_thinned_and_the_caption_says_so(tmp_path):
    from fastedge.plots import MAX_POINTS
    n = 2 * MAX_POINTS + 7
    _write_log(tmp_path / "log.jsonl", n, node=True)
    page = build_report(tmp_path).read_text()
    svgs = {k: v[0] for k, v in figure_svgs(page).items()}
    points = series_path(svgs["loss"], "loss")
    assert MAX_POINTS // 2 < len(points) <= MAX_POINTS
    assert f"of {n} steps is drawn (and the last)" in page
    for name in ("node_sparsity", "node_target"):
        assert len(series_path(svgs["sparsity"], name)) == len(points)
    for name in ("node_lambda1", "node_lambda2"):
        assert len(series_path(svgs["multipliers"], name)) == len(points)


# -- the sweep ------------------------------------------------------------------------------------

def test_the_sweep_adds_the_curve_with_both_areas(run, tmp_path):
    out, _, _ = run
    sweep = json.loads((out / "sweep.json").read_text())
    page = (out / "report.html").read_text()
    (svg,) = figure_svgs(page)["sweep"]
    finite = [p for p in sweep["points"] if p["faithfulness"] is not None]
    assert len(finite) == len(sweep["points"])         # faithfulness is defined on this task
    # one faithfulness curve per axis (linear and log), a vertex per point
    curves = re.findall(r'<g id="[^"]*series-faithfulness(?:-log)?">\s*<path d="([^"]+)"', svg)
    assert len(curves) == 2 and all(len(re.findall(r"[ML]", d)) == len(finite) for d in curves)
    for area in ("cpr", "cmd"):
        assert len(re.findall(r'id="[^"]*area-' + area + r'(?:-log)?"', svg)) == 2
    assert f"CPR = {sweep['cpr']:.4g}" in svg and f"CMD = {sweep['cmd']:.4g}" in svg


def test_prune_report_picks_up_sweep_json_only_when_current(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert "sweep" in figure_svgs(build_report(copy).read_text())
    old = (copy / "masks.pt").stat().st_mtime
    os.utime(copy / "sweep.json", (old - 60, old - 60))     # written before these masks: another run's
    page = build_report(copy).read_text()
    assert "sweep" not in figure_svgs(page) and "sweep.json is older than masks.pt" in page
    page = build_report(copy, sweep=copy / "sweep.json").read_text()   # given explicitly: shown
    assert "sweep" in figure_svgs(page)


def test_sweep_areas_are_shaded_over_mibs_range(tmp_path):
    """A synthetic curve: the shaded CPR polygon spans x from 0.001 to 1."""
    from fastedge.evaluate import MIB_EDGE_FRACTIONS, faithfulness_areas
    from fastedge.plots import sweep_plot
    fs = [0.0005, *MIB_EDGE_FRACTIONS]
    ys = [min(1.0, 0.2 + 0.4 * math.log10(f / 0.0005)) for f in fs]
    sweep = {"points": [{"edge_fraction": f, "faithfulness": y} for f, y in zip(fs, ys)],
             **faithfulness_areas(fs, ys)}
    plot = sweep_plot(sweep)
    assert f"CPR = {sweep['cpr']:.4g}" in plot.svg
    assert len(series_path(inline_svg(plot.svg, "s"), "faithfulness")) == len(fs)


# -- the command line -----------------------------------------------------------------------------

def test_fastedge_report_rebuilds_it(run, tmp_path, capsys):
    out, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    (copy / "sweep.json").rename(copy / "elsewhere.json")
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {copy / 'report.html'}"
    assert "sweep" not in figure_svgs((copy / "report.html").read_text())
    assert main(["report", str(copy), "--sweep", str(copy / "elsewhere.json")]) == 0
    assert "sweep" in figure_svgs((copy / "report.html").read_text())


def test_report_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "--sweep" in text and "offline" in text


def _refused(capsys, status):
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastedge: "), err
    return err[0]


def test_fastedge_report_errors_are_one_line(run, tmp_path, capsys):
    out, _, _ = run
    line = _refused(capsys, main(["report", str(tmp_path / "nowhere")]))
    assert "nowhere: no such folder" in line
    (tmp_path / "empty").mkdir()
    line = _refused(capsys, main(["report", str(tmp_path / "empty")]))
    assert "none of circuit.json, metrics.json, log.jsonl" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": \n')
    line = _refused(capsys, main(["report", str(broken)]))
    assert "log.jsonl, line 2: not valid JSON" in line
    (broken / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (tmp_path / "notsweep.json").write_text('{"kl": 0.1}')
    line = _refused(capsys, main(["report", str(broken), "--sweep", str(tmp_path / "notsweep.json")]))
    assert "notsweep.json: not a sweep result" in line and "fastedge eval --sweep" in line
    line = _refused(capsys, main(["report", str(broken), "--sweep", str(tmp_path / "missing.json")]))
    assert "missing.json: no such sweep file" in line
    with pytest.raises(ReportError, match="point 0 has no faithfulness"):
        build_report(broken, sweep={"points": [{"kl": 0.1}]})


def test_a_report_failure_does_not_fail_the_run(run, tmp_path, capsys, monkeypatch):
    from fastedge import report
    _, model, data = run

    def broken(*a, **k):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(report, "build_report", broken)
    out = tmp_path / "r"
    assert main(["prune", "--model", model, "--data", str(data), "--steps", "2", "--batch-size", "2",
                 "--no-progress", "--target-sparsity", "0.5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"could not write {out / 'report.html'} (RuntimeError: plotting broke)" in err
    assert f"fastedge report {out}" in err and (out / "circuit.json").exists()


# -- the log records ------------------------------------------------------------------------------

def test_log_records_carry_node_sparsity_and_node_multipliers(run):
    """New fields only: the old ones keep their names and meaning."""
    from fastedge import patch, prune
    from fastedge.shipped import load_shipped_model
    from fastedge.shipped.defaults import induction_task
    task = induction_task(n_examples=16, seed=0)
    base = ["step", "loss", "kl", "edge_sparsity", "target", "lambda1", "lambda2", "lr"]
    kw = dict(steps=3, batch_size=4, progress=False, sparsity_warmup_steps=2)
    with_target = prune(load_shipped_model(), task, node_target_sparsity=0.5, **kw).history
    assert list(with_target[0]) == [*base[:4], "node_sparsity", *base[4:], "node_target", "node_lambda1",
                                    "node_lambda2"]
    assert [r["node_target"] for r in with_target] == [0.25, 0.5, 0.5]
    assert all(0.0 <= r["node_sparsity"] <= 1.0 for r in with_target)
    plain = prune(load_shipped_model(), task, **kw).history
    assert list(plain[0]) == [*base[:4], "node_sparsity", *base[4:]]
    edges_only = prune(patch(load_shipped_model(), node_masks=False), task, **kw).history
    assert list(edges_only[0]) == base


# -- in a real browser ----------------------------------------------------------------------------

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


_PROBE = """<script>
(function () {
  var out = {bottom: Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY), figures: {},
             broken: [], images: document.images.length};
  document.querySelectorAll("[data-figure]").forEach(function (f) {
    var svg = f.querySelector("svg"), r = (svg || f).getBoundingClientRect();
    out.figures[f.getAttribute("data-figure")] = [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];
  });
  Array.prototype.forEach.call(document.images, function (img) {
    if (!img.complete || img.naturalWidth === 0) out.broken.push(img.src);
  });
  document.body.setAttribute("data-probe", JSON.stringify(out));
})();
</script>"""
WIDTH = 1280


def _run_chromium(binary, args, tmp_path):
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render(page_path, tmp_path, binary):
    """(the probe's result: figure boxes in CSS pixels and images; the screenshot as an [H, W, 3] array)."""
    import numpy as np
    from PIL import Image
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text().replace("</body>", _PROBE + "\n</body>"))
    dom = _run_chromium(binary, [f"--window-size={WIDTH},10000", "--dump-dom", probe.as_uri()], tmp_path)
    m = re.search(r'data-probe="([^"]+)"', dom)
    assert m, "the probe script did not run"
    result = json.loads(html.unescape(m.group(1)))
    shot = tmp_path / "report.png"
    height = result["bottom"] + 20
    _run_chromium(binary, [f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page_path.as_uri()],
                  tmp_path)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (height, WIDTH), image.shape
    return result, image


def drawn(image, box) -> tuple:
    """(fraction of non-white pixels, distinct colours among them, fraction of
    coloured (not grey) pixels) in `box`."""
    x, y, w, h = (int(round(v)) for v in box)
    region = image[y:y + h, x:x + w].reshape(-1, 3).astype(int)
    ink = region[(region < 235).any(axis=1)]
    colours = {tuple(c) for c in (ink // 32).tolist()}
    coloured = ((region.max(axis=1) - region.min(axis=1)) > 80).sum()
    n = max(len(region), 1)
    return len(ink) / n, len(colours), coloured / n


def test_the_report_renders_in_a_real_browser(run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome): the browser check "
                    "needs one; apt-get install chromium")
    out, _, _ = run
    started = time.time()
    result, image = render(out / "report.html", tmp_path, binary)
    assert result["images"] == 0 and result["broken"] == []
    assert set(result["figures"]) == {"circuit", *PLOTS, "sweep"}
    for name, box in result["figures"].items():
        x, y, w, h = box
        assert w >= 200 and h >= 100, (name, box)        # laid out at a readable size
        assert x + w <= WIDTH + 1 and y + h <= image.shape[0], (name, box)
        ink, colours, coloured = drawn(image, box)
        # a plot: axes, ticks, labels and coloured lines; the circuit: boxes and q/k/v-coloured edges.
        # (Axes without their lines pass the first two; the coloured pixels are the lines themselves.)
        assert ink >= 0.02, f"{name}: only {ink:.1%} of its pixels are drawn"
        assert colours >= 4, f"{name}: {colours} colours"
        assert coloured >= 0.001, f"{name}: only {coloured:.2%} of its pixels are coloured (lines or edges)"
    # and the page around them is mostly white: the check can tell drawn from blank
    ink, _, _ = drawn(image, (0, image.shape[0] - 15, WIDTH, 15))
    assert ink < 0.01
    print(f"chromium rendered {len(result['figures'])} figures in {time.time() - started:.1f} s")
