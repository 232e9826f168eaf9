"""Bad input never gives a silent wrong answer (issue 11, "Silent wrong
results"): each case asserts the exact outcome, the same NaN on every backend
or a refusal that names the problem and the value."""
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastedge
from fastedge.circuit import extract_circuit, extract_circuit_by_threshold
from fastedge.prune import prune
from fastedge.tasks.induction import make_induction


def _model(seed=0):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=23, n_positions=32)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def _task(seed=1, n_examples=40):
    return make_induction(n_examples=n_examples, seed=seed, vocab_size=23, half_length=5, first_token=1,
                          bos_token_id=0)


OPTS = dict(batch_size=4, checkpoint_every=3, progress=False, lr_warmup_steps=2, eval_batch_size=8)


def _random_masks(em, seed=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in em.edge_log_alpha:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() * scale)
        em.node_log_alpha.copy_(torch.randn(em.node_log_alpha.shape, generator=g) * scale)


# -- 6. targets at or above 1: the circuit of the deterministic masks above 0.5 ---------------------

def _threshold_reference(em, threshold, node_threshold=0.5):
    """Kept edges by the definition, in float64, before dead-edge pruning."""
    scale = 0.8 / (2 / 3)
    node = torch.sigmoid(em.node_log_alpha.detach().double() * scale) > node_threshold
    g = em.graph
    kept = set()
    for grp, la in zip(g.groups, em.edge_log_alpha):
        z = torch.sigmoid(la.detach().double() * scale)
        for r in range(grp.n_readers):
            for w in range(grp.n_writers):
                if z[r, w] > threshold and node[w]:
                    kept.add((g.writers[w], g.readers[grp.first_reader + r]))
    return kept


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.93])
def test_threshold_extraction_keeps_exactly_the_masks_above_the_threshold(threshold):
    em = fastedge.patch(_model())
    _random_masks(em)
    c = extract_circuit_by_threshold(em, threshold, prune_dead=False)
    expected = _threshold_reference(em, threshold)
    assert 0 < len(expected) < em.graph.n_edges  # the case separates the edges
    assert set(c.edges) == expected
    assert c.info["method"] == "threshold" and c.info["threshold"] == threshold
    assert c.info["target_sparsity"] is None
    # with pruning: a subset, and the same as extract_circuit at that edge count's pruned search
    pruned = extract_circuit_by_threshold(em, threshold)
    assert set(pruned.edges) <= expected
    assert fastedge.extract_circuit_by_threshold is extract_circuit_by_threshold


def test_threshold_extraction_refuses_bad_thresholds_and_nan_masks():
    em = fastedge.patch(_model())
    _random_masks(em)
    for bad in (1.0, -0.1, float("nan"), "half"):
        with pytest.raises(ValueError, match="threshold must be"):
            extract_circuit_by_threshold(em, bad)
    with torch.no_grad():
        em.edge_log_alpha[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        extract_circuit_by_threshold(em)


@pytest.mark.parametrize("target", [1.0, 1.02, 1.5])
def test_prune_with_a_target_at_or_above_one_extracts_by_threshold(target):
    r = prune(_model(), _task(), target_sparsity=target, steps=6, sparsity_warmup_steps=3, lr=0.5,
              init_log_alpha=0.5, **OPTS)
    em = r.edge_model
    expected = extract_circuit_by_threshold(em, 0.5)
    assert r.circuit.edges == expected.edges
    assert r.circuit.info["method"] == "threshold" and r.circuit.info["threshold"] == 0.5
    # the old behaviour (an edge count of 0) would give an empty circuit here
    assert r.circuit.n_edges > 0
    # an explicit circuit sparsity still wins
    r2 = prune(_model(), _task(), target_sparsity=target, steps=2, circuit_sparsity=0.5, **OPTS)
    assert r2.circuit.info["method"] == "exact" and r2.circuit.info["target_sparsity"] == 0.5


def test_extract_circuit_above_one_points_to_the_threshold_extraction():
    em = fastedge.patch(_model())
    with pytest.raises(ValueError, match="extract_circuit_by_threshold"):
        extract_circuit(em, 1.2)
