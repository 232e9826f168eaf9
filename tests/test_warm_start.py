"""Circuits from attribution scores (`Circuit.from_scores`), warm-started
pruning (`prune(init_from=...)`) and preselection (`preselect=`, HAP), from
the Python API and the command line."""
import math
import warnings

import pytest
import torch

import fastedge
from fastedge.attribution import EdgeScores
from fastedge.circuit import Circuit, prune_dead_edges
from fastedge.prune import CheckpointError, warm_start_log_alphas
from fastedge.tasks.induction import make_induction
from tiny_models import VOCAB, tiny_model


def _random_scores(arch="llama-gqa", seed=0, ablation="interchange", ties=False):
    model = tiny_model(arch)
    graph = fastedge.EdgeGraph.from_config(model.config)
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randn(gr.n_readers, gr.n_writers, generator=g, dtype=torch.float64) for gr in graph.groups]
    if ties:
        groups = [t.round() for t in groups]
    return EdgeScores(graph=graph, scores=groups, method="eap", ablation=ablation)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "neox-parallel"])
@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_from_scores_hits_the_count_and_keeps_a_pruned_circuit(arch, ablation):
    scores = _random_scores(arch, seed=1, ablation=ablation)
    g = scores.graph
    ranked = torch.argsort(scores.flat().abs(), descending=True, stable=True)
    missed = []
    for n in range(0, g.n_edges + 1, max(1, g.n_edges // 40)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = Circuit.from_scores(scores, n_edges=n)
        kept = c.edge_mask()
        # a circuit that pruning leaves as it is
        assert torch.equal(prune_dead_edges(kept, g, forward=ablation == "interchange"), kept)
        if c.n_edges != n:
            assert c.n_edges < n and "count_note" in c.info and caught, (n, c.n_edges)
            missed.append(n)
        else:
            assert "count_note" not in c.info
        # built around the top of the ranking: it contains the pruned top-k prefix
        # (filled from below) or lies within the next prefix (trimmed from above)
        k = c.info["n_edges_prefix"]
        top = torch.zeros(g.n_edges, dtype=torch.bool)
        if c.info["n_edges_trimmed"]:
            top[ranked[:k + 1]] = True
            assert not (kept & ~prune_dead_edges(top, g, forward=ablation == "interchange")).any()
        else:
            top[ranked[:k]] = True
            assert not (prune_dead_edges(top, g, forward=ablation == "interchange") & ~kept).any()
    print("counts missed:", missed)
    assert len(missed) <= 2, f"counts missed: {missed}"  # only the tiniest circuits may be unreachable


def test_from_scores_prefers_high_scores_and_sign_option():
    scores = _random_scores("gpt2", seed=2, ablation="zero")
    g = scores.graph
    big = Circuit.from_scores(scores, n_edges=g.n_edges // 2)
    flat = scores.flat()
    kept = big.edge_mask()
    # kept edges score higher on average than dropped ones
    assert flat[kept].abs().mean() > flat[~kept].abs().mean()
    signed = Circuit.from_scores(scores, n_edges=g.n_edges // 2, absolute=False)
    assert flat[signed.edge_mask()].mean() > flat[~signed.edge_mask()].mean()
    assert signed.edge_set() != big.edge_set()
    by_sparsity = Circuit.from_scores(scores, sparsity=0.5)
    assert by_sparsity.n_edges == round(0.5 * g.n_edges)


def test_from_scores_with_ties_is_deterministic():
    scores = _random_scores("qwen2", seed=3, ties=True)
    a = Circuit.from_scores(scores, n_edges=40)
    b = Circuit.from_scores(scores, n_edges=40)
    assert a.edges == b.edges and a.n_edges == 40


def test_from_scores_bad_input():
    scores = _random_scores("gpt2")
    with pytest.raises(ValueError, match="exactly one"):
        Circuit.from_scores(scores)
    with pytest.raises(ValueError, match="exactly one"):
        Circuit.from_scores(scores, n_edges=3, sparsity=0.5)
    with pytest.raises(ValueError, match="n_edges"):
        Circuit.from_scores(scores, n_edges=scores.graph.n_edges + 1)
    with pytest.raises(ValueError, match="sparsity"):
        Circuit.from_scores(scores, sparsity=1.5)
    bad = EdgeScores(graph=scores.graph, scores=[t.clone() for t in scores.scores])
    bad.scores[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Circuit.from_scores(bad, n_edges=3)
    with pytest.raises(ValueError, match="graph="):
        Circuit.from_scores(scores.flat(), n_edges=3)
    with pytest.raises(ValueError, match="one per reader group"):
        Circuit.from_scores([torch.zeros(2, 2)], n_edges=3, graph=scores.graph)


# -- warm start --------------------------------------------------------------------------------------

def test_warm_start_maps_rank_linearly_from_top_to_floor():
    scores = _random_scores("llama-gqa", seed=4)
    start, off = warm_start_log_alphas(scores, top=3.0, floor=-1.0)
    assert off is None
    flat = torch.cat([t.flatten() for t in start])
    order = torch.argsort(scores.flat().abs(), descending=True, stable=True)
    n = flat.numel()
    expected = 3.0 - 4.0 * torch.arange(n, dtype=torch.float64) / (n - 1)
    assert torch.allclose(flat[order], expected, rtol=0, atol=1e-12)
    # preselect: the top ceil(f n) rank over the same range, the rest at -inf
    start, off = warm_start_log_alphas(scores, top=3.0, floor=0.0, preselect=0.25)
    flat = torch.cat([t.flatten() for t in start])
    k = math.ceil(0.25 * n)
    assert torch.isneginf(flat[order[k:]]).all() and torch.isfinite(flat[order[:k]]).all()
    assert flat[order[0]] == 3.0 and flat[order[k - 1]] == 0.0
    assert torch.equal(torch.cat([o.flatten() for o in off]), torch.isneginf(flat))
    # a pruning run's masks rank by the signed log_alpha
    masks = EdgeScores(graph=scores.graph, scores=scores.scores, method="edge-pruning")
    start, _ = warm_start_log_alphas(masks, top=1.0)
    flat = torch.cat([t.flatten() for t in start])
    assert flat[torch.argmax(scores.flat())] == 1.0


def _task():
    return make_induction(n_examples=40, seed=1, vocab_size=VOCAB, half_length=4, first_token=1, bos_token_id=0)


OPTS = dict(target_sparsity=0.8, steps=4, batch_size=8, progress=False, init_log_alpha=3.0,
            checkpoint_every=2, lr_warmup_steps=1)


def test_prune_from_scores_starts_at_the_mapped_masks_and_preselection_holds():
    task = _task()
    model = tiny_model("gpt2", seed=2)
    scores = fastedge.attribute(model, task, method="eap-ig-inputs", ig_steps=2)
    r0 = fastedge.prune(model, task, init_from=scores, **dict(OPTS, steps=1, lr=1e-12, lambda_lr=1e-12))
    start, _ = warm_start_log_alphas(scores, top=3.0)
    got = torch.cat([p.detach().flatten().double() for p in r0.edge_model.edge_log_alpha])
    want = torch.cat([t.flatten() for t in start])
    assert (got - want).abs().max() < 0.06   # the N(0, 0.01) init noise, nothing more
    r = fastedge.prune(model, task, init_from=scores, preselect=0.3, **OPTS)
    la = torch.cat([p.detach().flatten() for p in r.edge_model.edge_log_alpha])
    _, off = warm_start_log_alphas(scores, top=3.0, preselect=0.3)
    off = torch.cat([o.flatten() for o in off])
    assert torch.isneginf(la[off]).all() and torch.isfinite(la[~off]).all()
    # every sampled mask of a held edge is 0: the run's sparsity never drops below theirs
    assert min(h["edge_sparsity"] for h in r.history) >= off.float().mean().item() - 1e-6
    # the target ramps from 1 - preselect
    assert r.history[0]["target"] > 0.7 - 1e-9
    kept = r.circuit.edge_mask()
    assert not (kept & off).any()


def test_resume_checks_the_scores(tmp_path):
    task = _task()
    model = tiny_model("gpt2", seed=2)
    scores = fastedge.attribute(model, task, method="eap")
    fastedge.prune(model, task, init_from=scores, out_dir=str(tmp_path), **OPTS)
    other = EdgeScores(graph=scores.graph, scores=[t.flip(-1) for t in scores.scores], method="eap")
    with pytest.raises(CheckpointError, match="init_from"):
        fastedge.prune(model, task, init_from=other, out_dir=str(tmp_path), resume=True, **OPTS)
    again = fastedge.prune(model, task, init_from=scores, out_dir=str(tmp_path), resume=True, **OPTS)
    assert len(again.history) == OPTS["steps"]


def test_warm_start_bad_input(tmp_path):
    task = _task()
    model = tiny_model("gpt2", seed=2)
    with pytest.raises(ValueError, match="preselect needs init_from"):
        fastedge.prune(model, task, preselect=0.2, **OPTS)
    scores = fastedge.attribute(model, task, method="eap")
    with pytest.raises(ValueError, match="preselect"):
        fastedge.prune(model, task, init_from=scores, preselect=1.5, **OPTS)
    wrong = _random_scores("llama-gqa")
    with pytest.raises(ValueError, match="another graph"):
        fastedge.prune(model, task, init_from=wrong, **OPTS)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        fastedge.prune(model, task, init_from=str(tmp_path / "junk.pt"), **OPTS)


def test_cli_prune_from_scores_and_masks(tmp_path, capsys, monkeypatch):
    """fastedge prune --init-from SCORES --preselect F on the shipped model;
    a run's masks.pt works as scores too; errors are one line."""
    from fastedge import shipped
    from fastedge.cli import main
    from fastedge.shipped.defaults import induction_task
    from test_cli_errors import _refused
    monkeypatch.chdir(tmp_path)
    scores = fastedge.attribute(shipped.load_shipped_model(), induction_task(n_examples=40), method="eap")
    scores.save(tmp_path / "scores.pt")
    fast = ["prune", "--steps", "3", "--no-progress"]
    assert main([*fast, "--init-from", "scores.pt", "--preselect", "0.3", "--out", "a"]) == 0
    assert (tmp_path / "a" / "circuit.json").exists()
    assert main([*fast, "--init-from", "a/masks.pt", "--out", "b"]) == 0
    line = _refused(capsys, [*fast, "--preselect", "0.3", "--out", "c"])
    assert "--preselect needs --init-from" in line
    line = _refused(capsys, [*fast, "--init-from", "nothing.pt", "--out", "d"])
    assert "nothing.pt" in line
    line = _refused(capsys, [*fast, "--init-from", "a/circuit.json", "--out", "e"], status=2)
    assert "circuit.json" in line


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "neox-parallel"])
@pytest.mark.parametrize("forward", [True, False])
def test_joining_edges_are_exactly_the_single_additions_that_count(arch, forward):
    """Added alone to a pruned circuit, an edge adds exactly itself when
    `joining_edges` says it joins two live components, and nothing otherwise."""
    from fastedge.circuit import joining_edges
    scores = _random_scores(arch, seed=5, ablation="interchange" if forward else "zero")
    g = scores.graph
    for n in (3, g.n_edges // 5, g.n_edges // 2):
        kept = Circuit.from_scores(scores, n_edges=n).edge_mask()
        joining = joining_edges(kept, g, forward=forward)
        assert not (joining & kept).any()
        for i in torch.nonzero(~kept).flatten().tolist():
            trial = kept.clone()
            trial[i] = True
            added = int(prune_dead_edges(trial, g, forward=forward).sum()) - int(kept.sum())
            assert added == int(joining[i]), (n, g.edge(i), added)
