"""EAP-IG's graph JSON for scores and circuits (fastedge.eap_graph) and MIB
submissions (fastedge.mib): names and counts against EAP-IG's graph as its
code defines it, every edge's score against the mapping written out by hand,
round trips on every architecture, and the binary circuits' limits counted
in MIB's graph."""
import json
import re

import pytest
import torch

from fastedge.attribution import EdgeScores
from fastedge.circuit import Circuit
from fastedge.eap_graph import (circuit_from_eap_graph_json, circuit_to_eap_graph_json, eap_edge_count,
                                eap_edge_count_of, read_eap_graph_json, scores_from_eap_graph_json)
from fastedge.graph import EdgeGraph
from fastedge.mib import MIB_CIRCUIT_FRACTIONS, circuit_file_name, export_submission

from tiny_models import ARCHITECTURES, tiny_model


def _random_scores(graph, seed, d_model=16, **meta):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(grp.n_readers, grp.n_writers, generator=g, dtype=torch.float64) for grp in graph.groups]
    meta.setdefault("method", "eap")
    return EdgeScores(graph=graph, scores=tensors, d_model=d_model, **meta)


def _eap_ig_names(n_layers, n_heads, parallel):
    """EAP-IG's edge names of a model, from its definition: nodes upstream of
    a layer are input, then each earlier layer's heads and MLP; every one of
    them feeds each head's q, k and v input; the MLP reads them, plus its own
    layer's heads unless the block is parallel; logits read everything."""
    names, upstream = [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{i}" for i in range(n_heads)]
        names += [f"{p}->{h}<{x}>" for p in upstream for h in heads for x in "qkv"]
        names += [f"{p}->m{layer}" for p in (upstream if parallel else upstream + heads)]
        upstream = upstream + heads + [f"m{layer}"]
    return names + [f"{p}->logits" for p in upstream]


def _graphs():
    out = {}
    for arch in ARCHITECTURES:
        config = tiny_model(arch).config
        d_model = getattr(config, "hidden_size", None) or config.n_embd
        out[arch] = (EdgeGraph.from_config(config), int(d_model))
    return out


GRAPHS = _graphs()


def test_gpt2_small_has_mibs_edge_count():
    from transformers import GPT2Config
    graph = EdgeGraph.from_config(GPT2Config())
    # MIB's own GPT-2 circuit file (circuits/ioi-eap-ig.json) lists 32,491 edges; fastedge's graph has 32,936
    assert eap_edge_count(graph) == 32491 and graph.n_edges == 32936


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_edge_names_are_eap_igs(arch, tmp_path):
    graph, d_model = GRAPHS[arch]
    d = _random_scores(graph, 0, d_model).to_eap_graph_json()
    expected = _eap_ig_names(graph.n_layers, graph.n_heads, graph.parallel_blocks)
    assert sorted(d["edges"]) == sorted(expected) and len(d["edges"]) == len(expected)   # order is cosmetic
    heads = [f"a{l}.h{i}" for l in range(graph.n_layers) for i in range(graph.n_heads)]
    assert set(d["nodes"]) == {"input", "logits", *heads, *(f"m{l}" for l in range(graph.n_layers))}
    assert d["cfg"]["n_layers"] == graph.n_layers and d["cfg"]["n_heads"] == graph.n_heads
    assert d["cfg"]["parallel_attn_mlp"] is graph.parallel_blocks and d["cfg"]["d_model"] == d_model
    assert d["cfg"].get("n_key_value_heads", graph.n_heads) == graph.n_kv_heads


def _expected_eap_score(name, by_name, graph):
    """The mapping, written out edge by edge from the names."""
    parent, child = name.split("->")
    writers = list(graph.embeddings) if parent == "input" else [parent]
    divide = 1
    if child == "logits":
        reader = "resid_post"
    elif "<" in child:
        head, letter = child[:-1].split("<")
        layer, i = head.split(".h")
        if letter == "q":
            reader = f"{head}.q"
        else:
            group = graph.n_heads // graph.n_kv_heads
            reader, divide = f"{layer}.h{int(i) // group}.{letter}", group
    else:
        reader = child
    return sum(by_name[(w, reader)] for w in writers) / divide


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_round_trip_on_every_architecture(arch, tmp_path):
    graph, d_model = GRAPHS[arch]
    scores = _random_scores(graph, 1, d_model)
    path = tmp_path / "scores.json"
    first = scores.to_eap_graph_json(path)
    by_name = scores.by_name()
    for name, edge in first["edges"].items():
        assert edge["score"] == pytest.approx(_expected_eap_score(name, by_name, graph), rel=1e-12, abs=1e-15), name
        assert edge["in_graph"] is False
    assert {n: v["in_graph"] for n, v in first["nodes"].items() if v["in_graph"]} == {"logits": True}

    loaded = EdgeScores.from_eap_graph_json(path, graph)
    assert loaded.d_model == d_model
    again = loaded.to_eap_graph_json(tmp_path / "again.json")
    assert again == first
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()

    flat, back = scores.flat(), loaded.flat()
    if len(graph.embeddings) == 1 and graph.n_kv_heads == graph.n_heads:
        assert torch.equal(back, flat)
    else:
        # input's score went to the first embedding, the k/v copies summed back
        loaded_named = loaded.by_name()
        for (w, r), value in by_name.items():
            if w in graph.embeddings:
                total = sum(by_name[(e, r)] for e in graph.embeddings)
                expect = total if w == graph.embeddings[0] else 0.0
                assert loaded_named[(w, r)] == pytest.approx(expect, rel=1e-12, abs=1e-15)
            else:
                assert loaded_named[(w, r)] == pytest.approx(value, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("heads,kv_heads", [(7, 1), (12, 2), (10, 2)])
def test_large_kv_groups_read_back_to_the_same_floats(heads, kv_heads):
    """A k/v reader's score split over 5, 6 or 7 copies sums back to a float
    that splits into the same copies (the plain sum of the copies need not)."""
    graph = EdgeGraph(n_layers=2, n_heads=heads, n_kv_heads=kv_heads)
    first = _random_scores(graph, 11).to_eap_graph_json()
    assert EdgeScores.from_eap_graph_json(first, graph).to_eap_graph_json() == first


def test_scores_from_attribution_export(tmp_path):
    """A real attribution's scores carry the model's hidden size into cfg."""
    import fastedge
    model = tiny_model("llama-gqa").double()
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(0, 37, (2, 6), generator=g), torch.randint(0, 37, (2, 6), generator=g)
    scores = fastedge.attribute(model, clean, corrupted, metric=lambda logits: logits[:, -1, 0], method="eap")
    d = scores.to_eap_graph_json(tmp_path / "s.json")
    assert d["cfg"]["d_model"] == 24 and d["cfg"]["n_key_value_heads"] == 2
    back = EdgeScores.from_eap_graph_json(tmp_path / "s.json", scores.graph)
    assert back.to_eap_graph_json() == d


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_circuit_round_trip(arch, tmp_path):
    graph, d_model = GRAPHS[arch]
    scores = _random_scores(graph, 2, d_model)
    circuit = Circuit.from_scores(scores, n_edges=graph.n_edges // 7)
    d = circuit_to_eap_graph_json(circuit, tmp_path / "c.json", d_model=d_model)
    # kept EAP edges, written out from the names: any kept embedding edge keeps input's; a k/v edge's
    # copies into the query heads the circuit keeps (a copy into a head with no out-edge cannot matter)
    kept, nodes = circuit.edge_set(), set(circuit.nodes)
    for name, edge in d["edges"].items():
        parent, child = name.split("->")
        writers = list(graph.embeddings) if parent == "input" else [parent]
        head_kept = True
        if child == "logits":
            reader = "resid_post"
        elif "<" in child:
            head, letter = child[:-1].split("<")
            layer, i = head.split(".h")
            group = graph.n_heads // graph.n_kv_heads
            reader = f"{head}.q" if letter == "q" else f"{layer}.h{int(i) // group}.{letter}"
            head_kept = letter == "q" or head in nodes
        else:
            reader = child
        assert edge["in_graph"] == (any((w, reader) in kept for w in writers) and head_kept), name
        assert edge["score"] == (1.0 if edge["in_graph"] else 0.0)
    assert sum(e["in_graph"] for e in d["edges"].values()) == eap_edge_count_of(circuit)
    loaded = circuit_from_eap_graph_json(tmp_path / "c.json", graph)
    assert circuit_to_eap_graph_json(loaded, d_model=d_model) == d
    if len(graph.embeddings) == 1:
        assert loaded.edges == circuit.edges and loaded.nodes == circuit.nodes
    else:   # an input edge brings back every embedding's edge into that reader
        assert circuit.edge_set() <= loaded.edge_set()
    # the same marks from the scores' export with in_graph=circuit
    marked = scores.to_eap_graph_json(in_graph=circuit)
    assert {n: e["in_graph"] for n, e in marked["edges"].items()} == \
           {n: e["in_graph"] for n, e in d["edges"].items()}
    assert marked["nodes"] == d["nodes"]


def test_reading_refuses_what_does_not_fit(tmp_path):
    graph, d_model = GRAPHS["llama-gqa"]
    d = _random_scores(graph, 4, d_model).to_eap_graph_json()
    other, _ = GRAPHS["qwen2"]
    with pytest.raises(ValueError, match="another model"):
        read_eap_graph_json(d, other)
    wrong_kv = json.loads(json.dumps(d))
    wrong_kv["cfg"]["n_key_value_heads"] = 4
    with pytest.raises(ValueError, match="n_key_value_heads"):
        read_eap_graph_json(wrong_kv, graph)
    missing = json.loads(json.dumps(d))
    del missing["edges"]["a0.h1->m1"]
    with pytest.raises(ValueError, match=r"'a0.h1->m1' is missing"):
        read_eap_graph_json(missing, graph)
    unknown = json.loads(json.dumps(d))
    unknown["edges"]["m2->a0.h0<q>"] = {"score": 1.0, "in_graph": False}
    with pytest.raises(ValueError, match=r"'m2->a0.h0<q>' is not in EAP-IG's graph"):
        read_eap_graph_json(unknown, graph)
    bad = json.loads(json.dumps(d))
    bad["edges"]["input->m0"]["score"] = "high"
    with pytest.raises(ValueError, match="input->m0"):
        read_eap_graph_json(bad, graph)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        scores_from_eap_graph_json(tmp_path / "x.json", graph)
    with pytest.raises(ValueError, match="cfg, nodes and edges"):
        read_eap_graph_json({"edges": {}}, graph)


def test_non_finite_scores_are_refused():
    graph, d_model = GRAPHS["gpt2"]
    scores = _random_scores(graph, 5, d_model)
    scores.scores[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        scores.to_eap_graph_json()


# -- submissions ------------------------------------------------------------------------------------

# big enough that 0.1% of its EAP-IG edges is at least one edge; grouped k/v heads and two embeddings,
# so that fastedge's count and MIB's differ both ways
MEDIUM = EdgeGraph(n_layers=4, n_heads=6, n_kv_heads=2, embeddings=("tok_embeds", "pos_embeds"))


def test_binary_circuits_respect_mibs_limits(tmp_path):
    scores = _random_scores(MEDIUM, 6, d_model=48)
    result = export_submission(scores, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="eap",
                               form="circuits")
    folder = tmp_path / "eap" / "ioi_gpt2"
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(circuit_file_name(f) for f in MIB_CIRCUIT_FRACTIONS)
    assert "circuit_0.1pct.json" in files and "circuit_50pct.json" in files
    total = eap_edge_count(MEDIUM)
    previous = -1
    for fraction in MIB_CIRCUIT_FRACTIONS:
        d = json.loads((folder / circuit_file_name(fraction)).read_text())
        assert len(d["edges"]) == total
        n = sum(e["in_graph"] for e in d["edges"].values())
        assert n <= fraction * total, fraction          # at most that fraction of MIB's edges
        assert n >= previous
        previous = n
        loaded = circuit_from_eap_graph_json(d, MEDIUM)
        assert circuit_to_eap_graph_json(loaded, d_model=48) == d
        # it is the top edges by |score| (after dead-edge pruning), as fastedge builds them
        row = next(r for r in result["circuits"] if r["fraction"] == fraction)
        assert row["n_edges_mib"] == n and row["limit"] == int(fraction * total)
        rebuilt = Circuit.from_scores(scores, n_edges=row["n_edges_requested"])
        assert circuit_to_eap_graph_json(rebuilt, d_model=48) == d
    # with these random scores the limits are met within a few edges (not a promise in general)
    assert previous >= int(0.5 * total) - 5


def test_importance_file_and_masks(tmp_path):
    scores = _random_scores(MEDIUM, 7, d_model=48, sign="eap-ig", metric="logit_diff")
    export_submission(scores, tmp_path, model_tag="gemma2", task_tag="arc_easy", method_tag="m",
                      form="scores")
    path = tmp_path / "m" / "arc-easy_gemma2" / "importances.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["importances.json"]
    d = json.loads(path.read_text())
    # written in the gate sign (higher: more important to the logit difference)
    assert d == scores.with_sign("gate").to_eap_graph_json()
    back = EdgeScores.from_eap_graph_json(path, MEDIUM)
    assert back.to_eap_graph_json() == d

    kl = _random_scores(MEDIUM, 8, d_model=48, metric="kl")
    export_submission(kl, tmp_path, model_tag="qwen2.5", task_tag="ioi", method_tag="m", form="scores")
    d = json.loads((tmp_path / "m" / "ioi_qwen2.5" / "importances.json").read_text())
    assert d == kl.with_sign("eap-ig").to_eap_graph_json()   # a divergence: lower is better

    g = torch.Generator().manual_seed(9)
    log_alphas = [torch.randn(grp.n_readers, grp.n_writers, generator=g) * 3 for grp in MEDIUM.groups]
    out = export_submission(log_alphas, tmp_path / "masks", graph=MEDIUM, d_model=48, model_tag="gpt2",
                            task_tag="ioi", method_tag="ep", form="both", fractions=(0.0, 0.01, 0.1))
    assert out["absolute"] is False
    d = json.loads((tmp_path / "masks" / "ep" / "importances" / "ioi_gpt2" / "importances.json").read_text())
    expected = EdgeScores(graph=MEDIUM, scores=log_alphas, d_model=48).to_eap_graph_json()
    assert d == expected
    circuits = tmp_path / "masks" / "ep" / "circuits" / "ioi_gpt2"
    assert sorted(p.name for p in circuits.iterdir()) == ["circuit_0pct.json", "circuit_10pct.json",
                                                          "circuit_1pct.json"]
    empty = json.loads((circuits / "circuit_0pct.json").read_text())
    assert not any(e["in_graph"] for e in empty["edges"].values())
    # ranked by the signed log_alpha: the circuit at 1% is the top edges by log_alpha, not by |log_alpha|
    written = json.loads((circuits / "circuit_1pct.json").read_text())
    k = next(r["n_edges"] for r in out["circuits"] if r["fraction"] == 0.01)
    signed = Circuit.from_scores(log_alphas, n_edges=k, graph=MEDIUM, absolute=False)
    by_size = Circuit.from_scores(log_alphas, n_edges=k, graph=MEDIUM, absolute=True)
    assert circuit_to_eap_graph_json(signed, d_model=48) == written
    assert circuit_to_eap_graph_json(by_size, d_model=48) != written


def test_submission_refusals(tmp_path):
    scores = _random_scores(MEDIUM, 10, d_model=48)
    with pytest.raises(ValueError, match="must not contain '_'"):
        export_submission(scores, tmp_path, model_tag="gpt_2", task_tag="ioi", method_tag="m")
    with pytest.raises(ValueError, match="form must be one of"):
        export_submission(scores, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="m", form="all")
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        export_submission(scores, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="m", form="circuits",
                          fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="not a path"):
        export_submission(scores, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="a/b")
    no_width = EdgeScores(graph=MEDIUM, scores=scores.scores)
    with pytest.raises(ValueError, match="d_model"):
        export_submission(no_width, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="m")
    export_submission(scores, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="m", form="scores")
    with pytest.raises(ValueError, match=re.escape("already holds importances.json")):
        export_submission(scores, tmp_path, model_tag="gpt2", task_tag="ioi", method_tag="m", form="circuits",
                          fractions=(0.1,))
    with pytest.warns(UserWarning, match="no ioi_tiny"):
        export_submission(scores, tmp_path, model_tag="tiny", task_tag="ioi", method_tag="m", form="scores")
