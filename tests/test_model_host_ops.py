"""The host ops a patched model issues: what must run once per forward, not once per layer."""
import sys
from pathlib import Path

import pytest
import torch

import fastedge
from fastedge import ops
from tiny_models import tiny_model, token_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from host_ops import OpCounter  # noqa: E402


def _random_log_alphas(em, seed=3):
    """Masks away from saturation, so that node log_alphas get gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in em.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2 + 0.5)


def _count_node_noise(monkeypatch):
    calls = []
    draw = ops.node_noise

    def counted(*args, **kwargs):
        calls.append(args)
        return draw(*args, **kwargs)
    monkeypatch.setattr(ops, "node_noise", counted)
    return calls


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "neox-sequential", "neox-parallel"])
def test_node_masks_are_made_once_per_forward_and_backward(arch, training, recompute, monkeypatch):
    model = tiny_model(arch)
    assert model.config.num_hidden_layers >= 2
    ids, cids = token_batch()
    em = fastedge.patch(model, recompute_readers=recompute)
    _random_log_alphas(em)
    em.train(training)
    calls = _count_node_noise(monkeypatch)
    with OpCounter() as counter:
        out = em(ids, cids, seed=11)
        (out.logits.pow(2).sum() + out.edge_mask_sum + out.node_mask_sum).backward()
    # one draw of the node noise (none in eval), one hard-concrete call for
    # every writer's node mask and one backward of it, whatever the depth and
    # with the readers recomputed in the backward
    assert len(calls) == (1 if training else 0)
    assert counter.counts["fastedge::hard_concrete"] == 1
    assert counter.counts["fastedge::hard_concrete_backward"] == 1
    assert em.node_log_alpha.grad is not None and em.node_log_alpha.grad.abs().sum() > 0


def test_no_node_masks_are_made_for_a_fixed_circuit_or_without_node_masks(monkeypatch):
    model = tiny_model("gpt2")
    ids, cids = token_batch()
    for em in (fastedge.patch(model, node_masks=False), fastedge.patch(model)):
        if em.node_log_alpha is not None:
            g = em.graph
            em.set_circuit([(g.writers[0], g.readers[-1])])
        em.train()
        calls = _count_node_noise(monkeypatch)
        with OpCounter() as counter:
            out = em(ids, cids, seed=2)
        assert out.node_mask_sum is None
        assert not calls and counter.counts["fastedge::hard_concrete"] == 0
        em.unpatch()


def test_mean_ablation_makes_node_masks_once_and_none_for_the_means(monkeypatch):
    model = tiny_model("llama-gqa")
    ids, cids = token_batch()
    em = fastedge.patch(model, ablation="mean")
    _random_log_alphas(em)
    em.train()
    calls = _count_node_noise(monkeypatch)
    em.compute_mean_outputs(cids)  # the plain run: every mask 1
    assert not calls
    out = em(ids, seed=5)
    out.logits.sum().backward()
    assert len(calls) == 1
    assert em.node_log_alpha.grad.abs().sum() > 0
