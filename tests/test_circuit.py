"""Circuits: extraction from masks (docs/CONCEPTS.md section 4), files, EAP-IG/MIB export,
comparison and drawing."""
import functools
import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastedge
from fastedge.circuit import (CIRCUIT_FORMAT, Circuit, compare_circuits, extract_circuit,
                              prune_dead_edges)
from fastedge.draw import GraphvizNotFoundError, circuit_to_dot, draw_circuit

VOCAB = 29
MODELS = ["gpt2", "llama-gqa"]
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz `dot` not on PATH "
                                                    "(apt-get install graphviz)")


def _model(name):
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(n_layer=2, n_head=3, n_embd=12, vocab_size=VOCAB, n_positions=16,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             hidden_size=16, intermediate_size=20, vocab_size=VOCAB)
        model = LlamaForCausalLM(config)
    config._attn_implementation = "eager"
    with torch.no_grad():   # away from init: non-zero biases, non-unit norms
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _cached_model(name):
    return _model(name)


def _edge_model(name, *, seed=1, node_mean=6.0, ablation="interchange"):
    """An EdgeModel with random, distinct log_alphas; node masks all kept
    unless node_mean is low."""
    em = fastedge.patch(_cached_model(name), ablation=ablation)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in em.edge_log_alpha:
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
        em.node_log_alpha.copy_(node_mean + torch.randn(em.node_log_alpha.shape, generator=g))
    return em


def _masks(em):
    return [p.detach().clone() for p in em.edge_log_alpha], em.node_log_alpha.detach().clone()


def _batch(seed=3, batch=2, seq=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),
            torch.randint(0, VOCAB, (batch, seq), generator=g))


# -- an independent statement of what dead-edge pruning must keep --------------------------------

def _components(graph, reader):
    """Writers fed by a reader (None for resid_post)."""
    if reader == "resid_post":
        return None
    if reader.startswith("m"):
        return [reader]
    head, letter = reader.rsplit(".", 1)
    if letter == "q":
        return [head]
    layer, h = head.split(".")
    per = graph.n_heads // graph.n_kv_heads
    j = int(h[1:])
    return [f"{layer}.h{i}" for i in range(j * per, (j + 1) * per)]


def _feeding_readers(graph, writer):
    return [r for r in graph.readers if (_components(graph, r) or []).count(writer)]


def _live_sets(graph, edges):
    """(reaches: writer -> has a path to resid_post, fed: writer -> has a path
    from an embedding) over the edge set `edges`, by plain recursion."""
    out_edges, in_edges = {}, {}
    for w, r in edges:
        out_edges.setdefault(w, []).append(r)
        in_edges.setdefault(r, []).append(w)

    @functools.lru_cache(maxsize=None)
    def reaches(w):
        for r in out_edges.get(w, []):
            comps = _components(graph, r)
            if comps is None or any(reaches(c) for c in comps):
                return True
        return False

    @functools.lru_cache(maxsize=None)
    def fed(w):
        if w in graph.embeddings:
            return True
        return any(fed(x) for r in _feeding_readers(graph, w) for x in in_edges.get(r, []))

    return reaches, fed


def _reader_reaches(graph, reaches, r):
    comps = _components(graph, r)
    return comps is None or any(reaches(c) for c in comps)


def _expected_pruned(graph, edges, forward):
    reaches, fed = _live_sets(graph, edges)
    return {(w, r) for w, r in edges
            if _reader_reaches(graph, reaches, r) and (not forward or fed(w))}


# -- extraction ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97, 1.0])
def test_threshold_search_hits_requested_sparsity(name, sparsity):
    em = _edge_model(name)
    n = em.graph.n_edges
    c = extract_circuit(em, sparsity, prune_dead=False)
    assert c.n_edges == round((1 - sparsity) * n)
    assert c.edge_sparsity == pytest.approx(1 - c.n_edges / n)
    # the kept edges are exactly those above the reported threshold
    above = {em.graph.edge(i) for i in torch.nonzero(c.scores > c.info["threshold"]).flatten().tolist()}
    assert c.edge_set() == above
    # and they are the top-scoring edges
    kept = c.edge_mask()
    if 0 < c.n_edges < n:
        assert c.scores[kept].min() > c.scores[~kept].max()
    assert c.info["target_sparsity"] == sparsity and c.info["method"] == "exact"
    assert c.info["d_model"] == (12 if name == "gpt2" else 16)
    assert c.ablation == "interchange"


@pytest.mark.parametrize("name", MODELS)
def test_plain_tensors_give_the_same_circuit(name):
    em = _edge_model(name)
    edges, node = _masks(em)
    ref = extract_circuit(em, 0.8)
    for form in (dict(em_or_masks=(edges, node)), dict(em_or_masks=edges, node_log_alpha=node),
                 dict(em_or_masks={"edge_log_alpha": edges, "node_log_alpha": node}),
                 dict(em_or_masks=em.state_dict())):
        c = extract_circuit(target_sparsity=0.8, graph=em.graph, **form)
        assert c.edges == ref.edges and c.nodes == ref.nodes
    # no node masks at all: every writer passes
    c = extract_circuit(edges, 0.8, graph=em.graph)
    assert c.node_scores is None and c.info["n_nodes_above_threshold"] == em.graph.n_writers


def test_exact_search_separates_values_closer_than_tol():
    em = _edge_model("gpt2")
    n = em.graph.n_edges
    # all deterministic masks within ~1e-7 of each other, all distinct
    edges = []
    base = torch.arange(n, dtype=torch.float32).flip(0)
    start = 0
    for p in em.edge_log_alpha:
        k = p.numel()
        edges.append((1.0 + 1e-6 * base[start:start + k]).view(p.shape))
        start += k
    for sparsity in (0.3, 0.5, 0.9):
        c = extract_circuit(edges, sparsity, graph=em.graph, prune_dead=False)
        assert c.n_edges == round((1 - sparsity) * n)
        c_b = extract_circuit(edges, sparsity, graph=em.graph, prune_dead=False, method="bisect", tol=1e-5)
        # the authors' bisection cannot resolve these values: it reports what it achieved
        assert c_b.info["method"] == "bisect"
        assert c_b.edge_sparsity == pytest.approx(1 - c_b.n_edges / n)


def test_bisect_method_matches_threshold_semantics():
    em = _edge_model("gpt2")
    for sparsity in (0.5, 0.9):
        c = extract_circuit(em, sparsity, prune_dead=False, method="bisect")
        above = {em.graph.edge(i) for i in torch.nonzero(c.scores > c.info["threshold"]).flatten().tolist()}
        assert c.edge_set() == above
        assert abs(c.n_edges - round((1 - sparsity) * em.graph.n_edges)) <= 2


def test_ties_report_the_achieved_sparsity():
    em = _edge_model("gpt2")
    n = em.graph.n_edges
    equal = [torch.zeros_like(p) for p in em.edge_log_alpha]
    c = extract_circuit(equal, 0.5, graph=em.graph, prune_dead=False)
    assert c.n_edges in (0, n)          # a threshold cannot split a tie
    assert c.edge_sparsity == 1.0       # equal distance: the sparser side
    c = extract_circuit(equal, 0.3, graph=em.graph, prune_dead=False)
    assert c.n_edges == n               # closer to the request
    # pairs of equal values: odd counts are unreachable, the nearest even one is taken
    pairs = []
    start = 0
    for p in em.edge_log_alpha:
        k = p.numel()
        pairs.append((torch.arange(start, start + k) // 2).float().view(p.shape))
        start += k
    c = extract_circuit(pairs, 1 - 31 / n, graph=em.graph, prune_dead=False)
    assert c.n_edges in (30, 32)


@pytest.mark.parametrize("name", MODELS)
def test_node_removal(name):
    em = _edge_model(name)
    g = em.graph
    victim = "a0.h1"
    with torch.no_grad():
        em.node_log_alpha[g.writer_index[victim]] = -4.0
        em.node_log_alpha[g.writer_index["m0"]] = 0.0   # node mask exactly 0.5: <= threshold, removed
    c = extract_circuit(em, 0.3, prune_dead=False)
    assert victim not in c.nodes and "m0" not in c.nodes
    assert all(w not in (victim, "m0") for w, _ in c.edges)
    assert c.info["n_nodes_above_threshold"] == g.n_writers - 2
    assert c.node_sparsity == pytest.approx(1 - len(c.nodes) / g.n_writers)
    # every node keeps an out-edge, every edge's writer is a node
    assert {w for w, _ in c.edges} == set(c.nodes)
    c0 = extract_circuit(em, 0.3, prune_dead=False, node_threshold=0.0)
    assert "m0" in c0.nodes
    # the edge count is still hit when enough candidates remain
    assert c.n_edges == round(0.7 * g.n_edges)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ablation", ["interchange", "zero"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_dead_edge_pruning_invariants(name, ablation, sparsity):
    em = _edge_model(name, seed=7, node_mean=1.5, ablation=ablation)
    g = em.graph
    c = extract_circuit(em, sparsity)
    forward = ablation == "interchange"
    assert c.info["forward_pruning"] is forward
    reaches, fed = _live_sets(g, c.edges)
    for w, r in c.edges:
        assert reaches(w), f"{w} has no kept path to resid_post"
        assert _reader_reaches(g, reaches, r), f"{r}'s component has no kept path to resid_post"
        if forward:
            assert fed(w), f"{w} is fed by no kept edge"
    # pruning is exactly "keep the edges on a path" of the thresholded set, and idempotent
    raw = extract_circuit(em, sparsity, prune_dead=False)
    pruned = prune_dead_edges(raw.edge_mask(), g, forward=forward)
    expected = _expected_pruned(g, raw.edges, forward)
    assert {g.edge(i) for i in torch.nonzero(pruned).flatten().tolist()} == expected
    assert torch.equal(prune_dead_edges(pruned, g, forward=forward), pruned)


@pytest.mark.parametrize("name", MODELS)
def test_pruning_search_targets_the_final_circuit(name):
    em = _edge_model(name, seed=7, node_mean=1.5)
    g = em.graph
    for sparsity in (0.5, 0.8, 0.9, 0.97):
        target = round((1 - sparsity) * g.n_edges)
        c = extract_circuit(em, sparsity)
        assert c.info["n_edges_thresholded"] - c.info["n_edges_pruned"] == c.n_edges
        # no other threshold gives a pruned circuit closer to the target
        candidate = c.node_scores[_writer_of(g)] > 0.5
        order = torch.argsort(c.scores.double() * candidate, descending=True)
        best = min(abs(int(prune_dead_edges(_top(order, k, g.n_edges), g).sum()) - target)
                   for k in range(int(candidate.sum()) + 1))
        assert abs(c.n_edges - target) == best


def _writer_of(g):
    from fastedge.circuit import _edge_endpoints
    return _edge_endpoints(g)[0]


def _top(order, k, n):
    m = torch.zeros(n, dtype=torch.bool)
    m[order[:k]] = True
    return m


@pytest.mark.parametrize("name", MODELS)
def test_pruning_does_not_change_the_logits(name):
    ids, cids = _batch()
    for ablation in ("interchange", "zero", "mean"):
        em = _edge_model(name, seed=5, node_mean=6.0, ablation=ablation)
        if ablation == "mean":
            em.compute_mean_outputs(_batch(seed=9, batch=4)[0])
        raw = extract_circuit(em, 0.85, prune_dead=False)
        pruned = extract_circuit(em, 0.85, prune_dead=True)
        with torch.no_grad():
            em.set_circuit(raw.edges, raw.nodes)
            a = em(ids, cids).logits
            kept = prune_dead_edges(raw.edge_mask(), em.graph, forward=ablation == "interchange")
            assert 0 < kept.sum() < raw.n_edges   # pruning removed something
            em.set_circuit([em.graph.edge(i) for i in torch.nonzero(kept).flatten().tolist()])
            b = em(ids, cids).logits
            em.set_circuit(pruned.edges, pruned.nodes)       # an extracted circuit is accepted
            out = em(ids, cids)
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), ablation
        assert out.edge_mask_sum.item() == pruned.n_edges


def test_forward_pruning_is_only_exact_under_interchange():
    """A head fed by nothing: under interchange its delta is 0, under zero
    ablation it is not (so the forward rule is not applied there)."""
    ids, cids = _batch()
    only = [("a0.h0", "resid_post")]
    for ablation, same in (("interchange", True), ("zero", False)):
        em = fastedge.patch(_cached_model("gpt2"), ablation=ablation)
        c = Circuit.from_edge_list(only, em.graph, ablation=ablation)
        kept = prune_dead_edges(c.edge_mask(), em.graph, forward=True)
        assert not kept.any()
        with torch.no_grad():
            em.set_circuit(only)
            a = em(ids, cids).logits
            em.set_circuit([])
            b = em(ids, cids).logits
        assert torch.allclose(a, b, atol=2e-5) is same


def test_extract_errors():
    em = _edge_model("gpt2")
    edges, node = _masks(em)
    with pytest.raises(ValueError, match="target_sparsity"):
        extract_circuit(em, 1.2)
    with pytest.raises(ValueError, match="graph="):
        extract_circuit(edges, 0.5)
    with pytest.raises(ValueError, match="one per reader group"):
        extract_circuit(edges[:-1], 0.5, graph=em.graph)
    with pytest.raises(ValueError, match=r"must be \[9, 2\]"):
        extract_circuit([edges[0].T] + edges[1:], 0.5, graph=em.graph)
    bad = [e.clone() for e in edges]
    bad[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        extract_circuit(bad, 0.5, graph=em.graph)
    with pytest.raises(ValueError, match="node log_alpha"):
        extract_circuit(edges, 0.5, graph=em.graph, node_log_alpha=node[:-1])
    with pytest.raises(ValueError, match="method"):
        extract_circuit(em, 0.5, method="greedy")
    with pytest.raises(TypeError):
        extract_circuit("masks.pt", 0.5, graph=em.graph)


def test_extract_from_a_loaded_masks_file(tmp_path):
    """A run's masks.pt, loaded, carries its graph: the same circuit as from the edge model."""
    em = _edge_model("llama-gqa", node_mean=0.5)
    torch.save({"format": "fastedge.masks/1", "graph": em.graph.to_dict(), "edge_model": em.state_dict()},
               tmp_path / "masks.pt")
    state = torch.load(tmp_path / "masks.pt", weights_only=False)
    want = extract_circuit(em, 0.7)
    got = extract_circuit(state, 0.7)
    assert got.edges == want.edges and got.nodes == want.nodes and got.n_edges > 0
    other = _edge_model("gpt2").graph
    with pytest.raises(ValueError, match="differs from the masks file"):
        extract_circuit(state, 0.7, graph=other)


# -- files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_json_round_trip(name, tmp_path):
    em = _edge_model(name)
    c = extract_circuit(em, 0.9, model_name="tiny", task="ioi")
    c.metrics = {"kl": 0.25, "accuracy": torch.tensor(0.5)}
    path = tmp_path / "circuit.json"
    c.save(path)
    d = json.loads(path.read_text())
    assert set(d) >= {"format", "model", "config_hash", "graph", "task", "ablation", "edges", "nodes",
                      "edge_sparsity", "node_sparsity", "n_edges", "metrics"}
    assert d["format"] == CIRCUIT_FORMAT and d["config_hash"] == em.graph.fingerprint()
    assert d["n_edges"] == c.n_edges and d["edges"][0] == list(c.edges[0])
    assert "scores" not in d
    back = Circuit.load(path)
    assert back.edges == c.edges and back.nodes == c.nodes and back.graph == c.graph
    assert (back.model_name, back.task, back.ablation) == ("tiny", "ioi", "interchange")
    assert back.metrics == {"kl": 0.25, "accuracy": 0.5}
    assert back.info["threshold"] == c.info["threshold"] and back.info["d_model"] == c.info["d_model"]
    assert back.edge_sparsity == c.edge_sparsity and back.scores is None
    c.save(path, include_scores=True)
    back = Circuit.load(path)
    assert torch.equal(back.scores, c.scores) and torch.equal(back.node_scores, c.node_scores)


def test_loading_malformed_files(tmp_path):
    em = _edge_model("gpt2")
    good = extract_circuit(em, 0.9).to_dict()
    path = tmp_path / "c.json"

    def load(d):
        path.write_text(d if isinstance(d, str) else json.dumps(d))
        return Circuit.load(path)

    cases = [
        ("{not json", "not valid JSON"),
        ([["a0.h0", "resid_post"]], "JSON object"),
        (dict(good, format="other/1"), "from_edge_list"),
        ({k: v for k, v in good.items() if k != "edges"}, "missing edges"),
        (dict(good, config_hash="0" * 16), "config_hash"),
        (dict(good, graph=dict(good["graph"], n_edges=5)), "malformed graph"),
        (dict(good, edges=good["edges"] + [["a9.h0", "resid_post"]]), "unknown writer 'a9.h0'"),
        (dict(good, edges=good["edges"] + [["m1", "a0.h0.q"]]), "not upstream"),
        (dict(good, edges=good["edges"] + [good["edges"][0]]), "more than once"),
        (dict(good, n_edges=good["n_edges"] + 1), "n_edges"),
        (dict(good, nodes=good["nodes"] + ["x"]), "not a writer"),
        (dict(good, edges="a0.h0"), "must be a list"),
        (dict(good, edges=[["a0.h0"]]), "pair"),
        (dict(good, ablation="resample"), "ablation"),
        (dict(good, scores=["x"] * 96), "scores must be a list of numbers"),
        (dict(good, scores=[0.5] * 3), "one value per graph edge"),
        (dict(good, metrics=[1]), "metrics must be an object"),
    ]
    for d, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            load(d)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("name", MODELS)
def test_edge_list_round_trip(name, tmp_path):
    em = _edge_model(name)
    c = extract_circuit(em, 0.9)
    path = tmp_path / "edges.json"
    c.save_edge_list(path)
    assert json.loads(path.read_text()) == c.to_edge_list()
    back = Circuit.from_edge_list(path, em.graph)
    assert back.edges == c.edges
    assert back.nodes == sorted({w for w, _ in c.edges}, key=em.graph.writer_index.get)
    # from a list, in any order, with explicit nodes
    shuffled = list(reversed(c.to_edge_list()))
    back = Circuit.from_edge_list(shuffled, em.graph, nodes=em.graph.writers, task="t")
    assert back.edges == c.edges and back.nodes == em.graph.writers and back.task == "t"


def test_edge_list_errors(tmp_path):
    g = _edge_model("gpt2").graph
    ok = [["tok_embeds", "a0.h0.q"], ["a0.h0", "resid_post"]]
    for bad, message in [
        (ok + [["a0.h7", "m1"]], r"edge 2 \['a0.h7', 'm1'\]: unknown writer"),
        (ok + [["a0.h0", "a0.h0.z"]], r"edge 2 .*unknown reader 'a0.h0.z'"),
        ([["a1.h0", "a0.h2.k"]] + ok, r"edge 0 \['a1.h0', 'a0.h2.k'\]: not an edge.*not upstream"),
        ([["m1", "m1"]], "not upstream"),
        (ok + [["a0.h0"]], "edge 2 .*pair"),
        ({"edges": ok}, "JSON list"),
    ]:
        with pytest.raises(ValueError, match=message):
            Circuit.from_edge_list(bad, g)
    path = tmp_path / "edges.json"
    path.write_text(json.dumps(ok + [["pos_embeds", "resid_pre"]]))
    with pytest.raises(ValueError, match=r"edges.json: edge 2 .*unknown reader"):
        Circuit.from_edge_list(path, g)
    with pytest.raises(ValueError, match="not among the circuit's nodes"):
        Circuit.from_edge_list(ok, g, nodes=["tok_embeds"])
    with pytest.raises(ValueError, match="not a writer"):
        Circuit.from_edge_list(ok, g, nodes=["tok_embeds", "a0.h0", "a0.h0.q"])


# -- EAP-IG / MIB export ----------------------------------------------------------------------------

def _eap_name_pairs(c):
    """The (parent, child) EAP edge names our kept edges map to."""
    g = c.graph
    per = g.n_heads // g.n_kv_heads
    out = set()
    for w, r in c.edges:
        parent = "input" if w in g.embeddings else w
        if r == "resid_post":
            out.add(f"{parent}->logits")
        elif r.startswith("m"):
            out.add(f"{parent}->{r}")
        else:
            head, letter = r.rsplit(".", 1)
            layer, h = head.split(".")
            heads = [int(h[1:])] if letter == "q" else range(int(h[1:]) * per, (int(h[1:]) + 1) * per)
            for i in heads:
                out.add(f"{parent}->{layer}.h{i}<{letter}>")
    return out


@pytest.mark.parametrize("name", MODELS)
def test_eap_graph_json_export(name, tmp_path):
    """The graph JSON of an extracted circuit: EAP-IG's nodes and edges, the
    circuit's edges in the graph (k/v copies into its kept query heads), its
    mask values as scores (mapped as `fastedge.eap_graph` maps scores: the
    embeddings summed into input, a k/v reader's score split over its
    copies). The mapping itself is tested in tests/test_mib.py."""
    em = _edge_model(name)
    g = em.graph
    c = extract_circuit(em, 0.8)
    path = tmp_path / "graph.json"
    d = c.to_eap_graph_json(path)
    assert json.loads(path.read_text()) == d
    L, H = g.n_layers, g.n_heads
    assert d["cfg"]["n_layers"] == L and d["cfg"]["n_heads"] == H
    assert d["cfg"]["parallel_attn_mlp"] is False and d["cfg"]["d_model"] == c.info["d_model"]
    assert ("n_key_value_heads" in d["cfg"]) == (g.n_kv_heads != H)
    # every node and edge of EAP-IG's graph of this model
    assert list(d["nodes"]) == (["input"] + [n for l in range(L) for n in
                                             [f"a{l}.h{i}" for i in range(H)] + [f"m{l}"]] + ["logits"])
    n_forward = 1 + L * (H + 1)
    expected_edges = sum((1 + l * (H + 1)) * 3 * H + (1 + l * (H + 1) + H) for l in range(L)) + n_forward
    assert len(d["edges"]) == expected_edges
    assert all(set(v) == {"score", "in_graph"} for v in d["edges"].values())
    assert "input->a1.h2<k>" in d["edges"] and "a0.h0->m0" in d["edges"] and "m1->logits" in d["edges"]
    kept = {k for k, v in d["edges"].items() if v["in_graph"]}
    nodes = set(c.nodes)
    # the circuit's edges, k/v copies only into the query heads it keeps
    assert kept == {e for e in _eap_name_pairs(c)
                    if not (e[-3:] in ("<k>", "<v>") and e.split("->")[1][:-3] not in nodes)}
    assert d["nodes"]["logits"] == {"in_graph": True}
    for node, v in d["nodes"].items():
        if node not in ("input", "logits"):
            assert v["in_graph"] == (node in c.nodes)
    assert d["nodes"]["input"]["in_graph"] == any(e in c.nodes for e in g.embeddings)
    # the mask values as scores: a head's edge to the output as it is, input's the sum of the embeddings'
    e = g.edge_index("a0.h1", "resid_post")
    assert d["edges"]["a0.h1->logits"]["score"] == pytest.approx(c.scores[e].item())
    emb = [g.edge_index(x, "m1") for x in g.embeddings]
    assert d["edges"]["input->m1"]["score"] == pytest.approx(sum(c.scores[i].item() for i in emb))
    if g.n_kv_heads != H:   # a k/v reader's score split evenly over its group's copies
        gs = H // g.n_kv_heads
        assert d["edges"]["input->a0.h0<k>"]["score"] == pytest.approx(
            sum(c.scores[g.edge_index(x, "a0.h0.k")].item() for x in g.embeddings) / gs)
        assert d["edges"]["input->a0.h0<k>"]["score"] == d["edges"]["input->a0.h1<k>"]["score"]
    legacy = c.to_eap_graph_json(legacy_nodes=True)
    assert legacy["nodes"]["logits"] is True and legacy["edges"] == d["edges"]


def test_eap_export_without_scores_or_d_model():
    g = _edge_model("gpt2").graph
    c = Circuit.from_edge_list([["pos_embeds", "a1.h2.v"], ["a1.h2", "resid_post"]], g)
    with pytest.raises(ValueError, match="d_model"):
        c.to_eap_graph_json()
    d = c.to_eap_graph_json(d_model=12)
    assert d["edges"]["input->a1.h2<v>"] == {"score": 1.0, "in_graph": True}
    assert d["edges"]["input->a1.h2<q>"] == {"score": 0.0, "in_graph": False}
    assert sum(v["in_graph"] for v in d["edges"].values()) == 2
    assert d["nodes"]["input"]["in_graph"] and d["nodes"]["a1.h2"]["in_graph"]
    assert not d["nodes"]["a0.h0"]["in_graph"]


# -- comparison ------------------------------------------------------------------------------------

def test_compare_intersection_union():
    em = _edge_model("llama-gqa")
    big = extract_circuit(em, 0.5, prune_dead=False)
    small = extract_circuit(em, 0.9, prune_dead=False)
    assert small.edge_set() <= big.edge_set()
    r = compare_circuits(big, small)
    assert r["n_shared_edges"] == small.n_edges and r["n_only_b_edges"] == 0
    assert r["n_only_a_edges"] == big.n_edges - small.n_edges
    assert r["edge_iou"] == pytest.approx(small.n_edges / big.n_edges)
    assert r["node_iou"] == pytest.approx(len(small.nodes) / len(big.nodes))
    assert [tuple(e) for e in r["shared_edges"]] == small.edges
    assert big.intersection(small).edges == small.edges and big.union(small).edges == big.edges

    other = extract_circuit(_edge_model("llama-gqa", seed=11), 0.7)
    r = compare_circuits(big, other)
    inter, union = big.intersection(other), big.union(other)
    assert r["n_shared_edges"] == inter.n_edges
    assert r["n_shared_edges"] + r["n_only_a_edges"] == big.n_edges
    assert r["n_shared_edges"] + r["n_only_b_edges"] == other.n_edges
    assert union.n_edges == big.n_edges + other.n_edges - inter.n_edges
    assert r["edge_iou"] == pytest.approx(inter.n_edges / union.n_edges)
    assert set(inter.nodes) == set(big.nodes) & set(other.nodes)
    assert set(union.nodes) == set(big.nodes) | set(other.nodes)
    assert inter.graph == big.graph and inter.metrics == {}
    json.dumps(r)
    empty = Circuit([], [], big.graph)
    assert compare_circuits(empty, empty)["edge_iou"] == 1.0

    gpt = extract_circuit(_edge_model("gpt2"), 0.5)
    with pytest.raises(ValueError, match="different graphs"):
        compare_circuits(big, gpt)
    with pytest.raises(ValueError, match="different graphs"):
        big.union(gpt)
    with pytest.raises(ValueError, match="different graphs"):
        big.intersection(gpt)


def test_apply_to_edge_model():
    em = _edge_model("gpt2")
    c = extract_circuit(em, 0.9)
    c.apply_to(em)
    assert em.circuit_fixed
    with pytest.raises(ValueError, match="graph"):
        c.apply_to(_edge_model("llama-gqa"))


# -- drawing --------------------------------------------------------------------------------------

MAGIC = {"svg": b"<svg", "png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF"}


@needs_dot
@pytest.mark.parametrize("name", MODELS)
def test_draw_writes_svg_png_pdf(name, tmp_path):
    c = extract_circuit(_edge_model(name), 0.8, model_name="tiny")
    for fmt in ("svg", "png", "pdf"):
        path = draw_circuit(c, tmp_path / f"circuit.{fmt}")
        data = path.read_bytes()
        if fmt == "svg":
            assert MAGIC["svg"] in data[:400] and data.rstrip().endswith(b"</svg>")
        else:
            assert data.startswith(MAGIC[fmt])
    path = draw_circuit(c, tmp_path / "picture.out", format="png")
    assert path.read_bytes().startswith(MAGIC["png"])
    empty = Circuit([], [], c.graph)
    assert draw_circuit(empty, tmp_path / "empty.svg").read_bytes().rstrip().endswith(b"</svg>")


def test_dot_text_folds_readers_into_components():
    g = _edge_model("llama-gqa").graph
    c = Circuit.from_edge_list([["embeds", "a0.h1.k"], ["embeds", "a0.h2.q"], ["a0.h0", "m0"],
                                ["a0.h2", "resid_post"], ["a0.h0", "a1.h1.v"]], g)
    dot = circuit_to_dot(c)
    assert dot.startswith("digraph")
    # the k/v reader of group 1 serves query heads 2 and 3: drawn to those in the circuit
    assert '"embeds" -> "a0.h2" [color="#2ca02c"]' in dot
    assert '"embeds" -> "a0.h3"' not in dot and '"a0.h3"' not in dot
    assert '"embeds" -> "a0.h2" [color="#d62728"]' in dot
    assert '"a0.h0" -> "m0" [color="#ff7f0e"]' in dot
    assert '"a0.h2" -> "resid_post" [color="#7f7f7f"]' in dot
    # ... or to all of them when none is
    assert '"a0.h0" -> "a1.h2" [color="#1f77b4"]' in dot and '"a0.h0" -> "a1.h3"' in dot
    assert "rank=min" in dot and "rank=max" in dot and "legend" in dot
    assert '"a1.h0"' not in dot   # components without kept edges are not drawn


def test_draw_rejects_unknown_format(tmp_path):
    c = Circuit([], [], _edge_model("gpt2").graph)
    with pytest.raises(ValueError, match="svg, png, pdf"):
        draw_circuit(c, tmp_path / "circuit.jpg")


def test_missing_graphviz_error(tmp_path, monkeypatch):
    c = Circuit([], [], _edge_model("gpt2").graph)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for name, engine in (("circuit.pdf", None), ("circuit.png", None), ("circuit.svg", "graphviz")):
        with pytest.raises(GraphvizNotFoundError) as info:
            draw_circuit(c, tmp_path / name, engine=engine)
        assert isinstance(info.value, RuntimeError)
        message = str(info.value)
        for hint in ("apt-get install graphviz", "conda install graphviz", "brew install graphviz", ".svg", ".dot"):
            assert hint in message
        assert not (tmp_path / name).exists()
    # SVG (fastedge's own renderer) and DOT text need no graphviz
    assert draw_circuit(c, tmp_path / "circuit.svg").read_text().rstrip().endswith("</svg>")
    assert draw_circuit(c, tmp_path / "circuit.dot").read_text().startswith("digraph")
