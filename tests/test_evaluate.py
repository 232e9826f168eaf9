"""Evaluation metrics: full and empty circuits, faithfulness areas, sweeps."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastedge
from fastedge.circuit import extract_circuit
from fastedge.evaluate import evaluate, faithfulness_areas, normalized_faithfulness, sweep
from fastedge.tasks import get_task
from fastedge.tasks.tokenizers import WordTokenizer


@pytest.fixture(scope="module")
def setup():
    tok = WordTokenizer()
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=tok.vocab_size, n_positions=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    task = get_task("ioi", tok, n_examples=12, seed=0)
    return fastedge.patch(model), task


def test_full_and_empty_circuits(setup):
    em, task = setup
    g = em.graph
    full = fastedge.circuit.Circuit(edges=list(g.edges()), nodes=list(g.writers), graph=g)
    m = evaluate(em, task, full, batch_size=5)
    assert m["kl"] == pytest.approx(0, abs=1e-6)
    assert m["faithfulness"] == pytest.approx(1, abs=1e-4)
    assert m["accuracy"] == pytest.approx(m["full_accuracy"])
    empty = fastedge.circuit.Circuit(edges=[], nodes=[], graph=g)
    m = evaluate(em, task, empty, batch_size=5)
    assert m["faithfulness"] == pytest.approx(0, abs=1e-4)
    assert m["kl"] == pytest.approx(m["empty_kl"])
    assert m["kl"] > 0
    assert not em.circuit_fixed, "evaluation leaves the model's masks as they were"


def test_faithfulness_formulas():
    assert normalized_faithfulness(2.0, 3.0, 1.0) == 0.5
    assert math.isnan(normalized_faithfulness(1.0, 1.0, 1.0))
    # MIB integrates over the fraction of edges kept from 0.001 to 1: f(x) = x gives
    # CPR = (1 - 0.001^2) / 2 and CMD = (1 - 0.001)^2 / 2 (the curve is cut at 0.001)
    areas = faithfulness_areas([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    assert areas["cpr"] == pytest.approx((1 - 0.001 ** 2) / 2, rel=1e-12)
    assert areas["cmd"] == pytest.approx((1 - 0.001) ** 2 / 2, rel=1e-12)
    areas = faithfulness_areas([1.0, 0.0], [1.0, 1.0])
    assert areas["cpr"] == pytest.approx(0.999, rel=1e-12) and areas["cmd"] == 0.0


def test_sweep(setup):
    em, task = setup
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in em.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3)
    # a sweep must span MIB's range of edge fractions (0.001 to 1): sparsity 0 and 0.999 included
    result = sweep(em, task, [0.0, 0.5, 0.8, 0.95, 0.999], batch_size=6)
    assert [p["target_sparsity"] for p in result["points"]] == [0.0, 0.5, 0.8, 0.95, 0.999]
    assert all(0 <= p["edge_sparsity"] <= 1 for p in result["points"])
    assert math.isfinite(result["cpr"]) and math.isfinite(result["cmd"])
    assert result["cpr"] == pytest.approx(faithfulness_areas(
        [p["edge_fraction"] for p in result["points"]], [p["faithfulness"] for p in result["points"]])["cpr"])
    c = extract_circuit(em, 0.8)
    assert abs(c.edge_sparsity - 0.8) < 0.1
