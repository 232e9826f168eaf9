"""fastedge's own SVG drawing (`fastedge.draw.circuit_to_svg`), drawing
without graphviz, and the command line's pictures.

The drawing is checked against the circuit: every component an edge touches
is one box, every folded edge is one path of its reader kind's colour that
starts on its writer's top side and ends on its reader component's bottom
side. Expected edges are folded here from the circuit's (writer, reader)
pairs, independently of `fastedge.draw.components`.
"""
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
import torch

from fastedge.circuit import Circuit
from fastedge.cli import main
from fastedge.draw import GraphvizNotFoundError, READER_COLORS, circuit_to_svg, draw_circuit
from fastedge.graph import EdgeGraph

NS = "{http://www.w3.org/2000/svg}"

GRAPHS = {   # id -> EdgeGraph arguments
    "gpt2-3L": dict(n_layers=3, n_heads=4, n_kv_heads=4, embeddings=("tok_embeds", "pos_embeds")),
    "llama-gqa": dict(n_layers=3, n_heads=6, n_kv_heads=2),
    "neox-parallel": dict(n_layers=4, n_heads=5, n_kv_heads=5, parallel_blocks=True),
    "gpt2-small": dict(n_layers=12, n_heads=12, n_kv_heads=12, embeddings=("tok_embeds", "pos_embeds")),
    "13b-collapsed": dict(n_layers=40, n_heads=40, n_kv_heads=40),
}


def random_circuit(graph, n_edges, seed, *, labels=None):
    """`n_edges` distinct edges drawn uniformly from the graph (some writers
    of k/v groups left out, so both GQA folding rules are exercised)."""
    rng = random.Random(seed)
    idx = rng.sample(range(graph.n_edges), min(n_edges, graph.n_edges))
    edges = [graph.edge(i) for i in idx]
    return Circuit(edges, sorted({w for w, _ in edges}), graph, model_name="test", task="random",
                   node_labels=labels or {})


def expected_edges(circuit):
    """Counter of (writer, reader, component, colour) the drawing must show."""
    g, nodes = circuit.graph, set(circuit.nodes)
    out = Counter()
    for w, r in circuit.edges:
        if r == "resid_post":
            kind, comps = "output", ["resid_post"]
        elif r.startswith("m"):
            kind, comps = "mlp", [r]
        else:
            layer, head, kind = r.split(".")
            if kind == "q":
                comps = [f"{layer}.{head}"]
            else:
                per = g.n_heads // g.n_kv_heads
                j = int(head[1:])
                group = [f"{layer}.h{i}" for i in range(j * per, (j + 1) * per)]
                comps = [c for c in group if c in nodes] or group
        for c in comps:
            out[(w, r, c, READER_COLORS[kind])] += 1
    return out


def parse(svg):
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg"
    boxes = {}
    for g in root.iter(NS + "g"):
        if g.get("class") == "fe-node":
            rect = g.find(NS + "rect")
            texts = [t.text for t in g.findall(NS + "text")]
            name = texts[0]
            assert name not in boxes, f"{name} drawn twice"
            boxes[name] = dict(x=float(rect.get("x")), y=float(rect.get("y")), w=float(rect.get("width")),
                               h=float(rect.get("height")), texts=texts, title=g.find(NS + "title").text)
    (edges_group,) = [g for g in root.iter(NS + "g") if g.get("class") == "fe-edges"]
    paths = []
    for p in edges_group.iter(NS + "path"):
        nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", p.get("d"))]
        assert len(nums) in (8, 16) and p.get("d").startswith("M")
        paths.append(dict(start=nums[:2], end=nums[-2:], stroke=p.get("stroke"), title=p.find(NS + "title").text))
    return root, boxes, paths


def _on_side(point, box, side):
    x, y = point
    edge_y = box["y"] if side == "top" else box["y"] + box["h"]
    return abs(y - edge_y) <= 0.06 and box["x"] - 0.06 <= x <= box["x"] + box["w"] + 0.06


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_component_and_edge_is_drawn_once_in_its_colour(name, seed):
    g = EdgeGraph(**GRAPHS[name])
    n = {"gpt2-small": 300, "13b-collapsed": 400}.get(name, max(5, g.n_edges // 25))
    c = random_circuit(g, n, seed)
    svg = circuit_to_svg(c)
    _, boxes, paths = parse(svg)
    want = expected_edges(c)
    components = {w for w, _, _, _ in want} | {comp for _, _, comp, _ in want} | {"resid_post"}
    assert set(boxes) == components                      # one box per drawn component, no more
    assert len(paths) == sum(want.values())
    got = Counter()
    for p in paths:
        w, r = p["title"].split(" \u2192 ")
        assert _on_side(p["start"], boxes[w], "top"), (p, boxes[w])
        ends = [comp for comp, b in boxes.items() if _on_side(p["end"], b, "bottom")]
        assert len(ends) == 1, (p, ends)
        got[(w, r, ends[0], p["stroke"])] += 1
    assert got == want
    # a head's q, k and v edges enter its left, middle and right thirds
    for p in paths:
        kind = [k for k, v in READER_COLORS.items() if v == p["stroke"]][0]
        if kind in ("q", "k", "v"):
            b = [b for b in boxes.values() if _on_side(p["end"], b, "bottom")][0]
            third = min(2, int(3 * (p["end"][0] - b["x"]) / b["w"]))
            assert third == "qkv".index(kind), (p, b)


def test_empty_circuit_draws_resid_post_only():
    g = EdgeGraph(**GRAPHS["gpt2-3L"])
    root, boxes, paths = parse(circuit_to_svg(Circuit([], [], g)))
    assert set(boxes) == {"resid_post"} and paths == []


def test_layers_bottom_to_top_and_parallel_mlp_beside_heads():
    for name in ("gpt2-3L", "neox-parallel"):
        g = EdgeGraph(**GRAPHS[name])
        c = Circuit.from_edge_list([[w, "resid_post"] for w in g.writers], g)   # every component drawn
        _, boxes, _ = parse(circuit_to_svg(c))
        bottom = {n: b["y"] + b["h"] for n, b in boxes.items()}
        for e in g.embeddings:
            assert bottom[e] > max(bottom[f"a0.h{i}"] for i in range(g.n_heads))
        for l in range(g.n_layers):
            heads = [f"a{l}.h{i}" for i in range(g.n_heads)]
            assert len({bottom[h] for h in heads}) == 1                     # one row per layer
            xs = [boxes[h]["x"] for h in heads]
            assert xs == sorted(xs) and boxes[f"m{l}"]["x"] > xs[-1]       # heads in order, then the MLP
            if g.parallel_blocks:
                assert bottom[f"m{l}"] == bottom[heads[0]]
            else:
                assert bottom[f"m{l}"] < bottom[heads[0]]                   # raised: it reads its heads
            if l:
                assert bottom[heads[0]] < bottom[f"a{l - 1}.h0"]
        assert boxes["resid_post"]["y"] + boxes["resid_post"]["h"] < min(b["y"] for n, b in boxes.items()
                                                                         if n != "resid_post")


def test_node_labels_are_written_under_the_name():
    g = EdgeGraph(**GRAPHS["llama-gqa"])
    c = Circuit.from_edge_list([["embeds", "a0.h1.q"], ["a0.h1", "m1"], ["m1", "resid_post"]], g)
    long = "aggregate_" + "x" * 60 + " (Aggregate)"
    c.node_labels = {"a0.h1": ["frac_prevs (Aggregate)", "tokens"], "m1": [long]}
    _, boxes, _ = parse(circuit_to_svg(c))
    assert boxes["a0.h1"]["texts"] == ["a0.h1", "frac_prevs (Aggregate)", "tokens"]
    shown = boxes["m1"]["texts"][1]
    assert shown.endswith("\u2026") and len(shown) <= 40 and long.startswith(shown[:-1])
    assert long in boxes["m1"]["title"]                                   # the full text as a tooltip
    assert boxes["a0.h1"]["h"] > boxes["embeds"]["h"]                     # the box grows to hold them


def test_13b_size_circuit_stays_bounded():
    g = EdgeGraph(**GRAPHS["13b-collapsed"])
    c = random_circuit(g, 1500, 3)
    svg = circuit_to_svg(c)
    root, boxes, paths = parse(svg)
    assert len(paths) == sum(expected_edges(c).values())
    assert len(svg.encode()) < 800_000                                    # measured: 0.52 MB
    # at most one column per head and one row (two tiers: heads, MLP) per layer, each a fixed size
    assert float(root.get("width")) < 80 * (g.n_heads + 1) + 400
    assert float(root.get("height")) < 100 * (g.n_layers + 2) + 100
    # unused heads are left out, not greyed: no faint boxes but the unused embeddings
    (ctx,) = [e for e in root.iter(NS + "g") if e.get("class") == "fe-ctx"]
    assert len(ctx.findall(NS + "g")) <= len(g.embeddings)


def test_empty_layers_collapse_into_one_band():
    g = EdgeGraph(**GRAPHS["13b-collapsed"])
    c = Circuit.from_edge_list([["embeds", "a3.h7.q"], ["a3.h7", "a30.h2.v"], ["embeds", "a30.h2.k"],
                                ["a30.h2", "resid_post"]], g)
    svg = circuit_to_svg(c)
    root, boxes, paths = parse(svg)
    assert set(boxes) == {"embeds", "a3.h7", "a30.h2", "resid_post"} and len(paths) == 4
    bands = [t.text for t in root.iter(NS + "text") if t.text and "none in the circuit" in t.text]
    assert bands == ["L0\u2013L2: none in the circuit", "L4\u2013L29: none in the circuit",
                     "L31\u2013L39: none in the circuit"]
    assert float(root.get("height")) < 600
    # edges between neighbouring rows of boxes (bands between or not) are one curve; the edge
    # that passes the a3 row climbs a channel
    kinds = {p.find(NS + "title").text: re.sub(r"[^MCL]", "", p.get("d")) for p in root.iter(NS + "path")}
    assert kinds.pop("embeds \u2192 a30.h2.k") == "MCLC"
    assert set(kinds.values()) == {"MC"}


def _points(d, n=24):
    """Points along an SVG path of M, C and L commands."""
    tokens = re.findall(r"[MCL]|-?\d+(?:\.\d+)?", d)
    pts, i, cur = [], 0, None
    while i < len(tokens):
        op = tokens[i]
        nums = []
        i += 1
        while i < len(tokens) and tokens[i] not in "MCL":
            nums.append(float(tokens[i]))
            i += 1
        if op == "M":
            cur = tuple(nums)
        elif op == "L":
            end = tuple(nums)
            pts += [(cur[0] + (end[0] - cur[0]) * k / n, cur[1] + (end[1] - cur[1]) * k / n) for k in range(n + 1)]
            cur = end
        else:
            p1, p2, p3 = nums[0:2], nums[2:4], nums[4:6]
            for k in range(n + 1):
                t = k / n
                a, b, c, e = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
                pts.append((a * cur[0] + b * p1[0] + c * p2[0] + e * p3[0],
                            a * cur[1] + b * p1[1] + c * p2[1] + e * p3[1]))
            cur = tuple(p3)
    return pts


@pytest.mark.parametrize("name", list(GRAPHS))
def test_no_edge_crosses_a_box(name):
    """Edges run through the gaps between rows and the channels between
    columns: no point of any edge lies inside a box, drawn or faint."""
    g = EdgeGraph(**GRAPHS[name])
    c = random_circuit(g, {"gpt2-small": 300, "13b-collapsed": 400}.get(name, max(5, g.n_edges // 25)), 7)
    root = ET.fromstring(circuit_to_svg(c))
    rects = [(float(r.get("x")), float(r.get("y")), float(r.get("width")), float(r.get("height")))
             for grp in root.iter(NS + "g") if grp.get("class") in ("fe-node", "fe-ctx") for r in grp.iter(NS + "rect")]
    assert len(rects) >= len(c.nodes)
    r = torch.tensor(rects, dtype=torch.float64)
    lo, hi = r[:, :2] + 1, r[:, :2] + r[:, 2:] - 1            # each box shrunk by 1 px
    pts, owner = [], []
    for p in root.iter(NS + "path"):
        more = _points(p.get("d"))
        pts += more
        owner += [p.find(NS + "title").text] * len(more)
    pts = torch.tensor(pts, dtype=torch.float64)
    for i in range(0, len(pts), 4096):
        chunk = pts[i:i + 4096, None, :]
        inside = ((chunk > lo) & (chunk < hi)).all(-1)          # [points, boxes]
        if inside.any():
            k, b = inside.nonzero()[0].tolist()
            raise AssertionError(f"edge {owner[i + k]} crosses the box at {rects[b]}")


def test_gpt2_small_greys_unused_heads():
    g = EdgeGraph(**GRAPHS["gpt2-small"])
    c = random_circuit(g, 300, 0)
    root, boxes, _ = parse(circuit_to_svg(c))
    (ctx,) = [e for e in root.iter(NS + "g") if e.get("class") == "fe-ctx"]
    faint = {e.find(NS + "text").text for e in ctx.findall(NS + "g")}
    assert faint == set(g.writers) - set(boxes)


def test_self_contained_and_deterministic():
    g = EdgeGraph(**GRAPHS["gpt2-small"])
    c = random_circuit(g, 300, 5, labels={"a0.h1": ["a <label> & \"quotes\""]})
    svg = circuit_to_svg(c)
    for banned in ("href", "url(", "@import", "<image", "<script", "@font-face"):
        assert banned not in svg
    shuffled = list(c.edges)
    random.Random(1).shuffle(shuffled)
    again = Circuit(shuffled, list(reversed(c.nodes)), g, model_name="test", task="random",
                    node_labels={"a0.h1": ["a <label> & \"quotes\""]})
    assert circuit_to_svg(again) == svg
    assert circuit_to_svg(c, title="my <title>") != svg and "my &lt;title&gt;" in circuit_to_svg(c, title="my <title>")


# -- drawing without graphviz ---------------------------------------------------------------------

@pytest.fixture
def no_graphviz(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_svg_and_dot_need_no_graphviz(tmp_path, no_graphviz):
    c = random_circuit(EdgeGraph(**GRAPHS["llama-gqa"]), 40, 0)
    svg = draw_circuit(c, tmp_path / "c.svg")
    assert svg.read_text() == circuit_to_svg(c)
    dot = draw_circuit(c, tmp_path / "c.dot")
    assert dot.read_text().startswith("digraph") and '"embeds"' in dot.read_text()
    assert draw_circuit(c, tmp_path / "c.graph", format="dot").read_text() == dot.read_text()


@pytest.mark.parametrize("name,engine", [("c.pdf", None), ("c.png", None), ("c.svg", "graphviz")])
def test_graphviz_formats_say_how_to_install_it(tmp_path, no_graphviz, name, engine):
    c = random_circuit(EdgeGraph(**GRAPHS["llama-gqa"]), 40, 0)
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        draw_circuit(c, tmp_path / name, engine=engine)
    assert not (tmp_path / name).exists()


def test_engine_errors(tmp_path):
    c = random_circuit(EdgeGraph(**GRAPHS["llama-gqa"]), 40, 0)
    with pytest.raises(ValueError, match="SVG only"):
        draw_circuit(c, tmp_path / "c.pdf", engine="builtin")
    with pytest.raises(ValueError, match="builtin, graphviz"):
        draw_circuit(c, tmp_path / "c.svg", engine="cairo")


def test_cli_prune_and_draw_without_graphviz(tmp_path, no_graphviz, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--steps", "3", "--batch-size", "4", "--out", str(out), "--no-progress",
                 "--n-examples", "16"]) == 0
    circuit = Circuit.load(out / "circuit.json")
    picture = (out / "circuit.svg").read_text()
    assert picture == circuit_to_svg(circuit) and not (out / "circuit.dot").exists()
    _, boxes, paths = parse(picture)
    assert len(paths) == sum(expected_edges(circuit).values())

    (out / "circuit.svg").unlink()
    assert main(["draw", str(out / "circuit.json")]) == 0
    assert (out / "circuit.svg").read_text() == picture
    assert main(["draw", str(out / "circuit.json"), "--out", str(tmp_path / "x.dot")]) == 0
    assert (tmp_path / "x.dot").read_text().startswith("digraph")
    capsys.readouterr()
    assert main(["draw", str(out / "circuit.json"), "--out", str(tmp_path / "x.pdf")]) != 0
    assert main(["draw", str(out / "circuit.json"), "--engine", "graphviz"]) != 0
    err = capsys.readouterr().err
    assert err.count("apt-get install graphviz") == 2


def test_same_bytes_whatever_the_hash_seed():
    """No set or hash order leaks into the drawing: another interpreter with
    another PYTHONHASHSEED draws the same bytes."""
    import hashlib
    import os
    import subprocess
    import sys
    code = ("import hashlib, sys; sys.path.insert(0, 'tests'); from test_draw_svg import *; "
            "c = random_circuit(EdgeGraph(**GRAPHS['llama-gqa']), 60, 4); "
            "print(hashlib.sha256(circuit_to_svg(c).encode()).hexdigest())")
    here = hashlib.sha256(circuit_to_svg(random_circuit(EdgeGraph(**GRAPHS["llama-gqa"]), 60, 4)).encode()).hexdigest()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"   # not this interpreter's
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
    assert out.stdout.split()[-1] == here
