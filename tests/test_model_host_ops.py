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


@pytest.mark.parametrize("rot, head_dim", [(8, 8), (4, 10), (2, 6), (6, 6)], ids=lambda v: str(v))
def test_prepared_rotary_matches_hugging_face(rot, head_dim):
    """`Rotary` (prepared once per forward, three ops per head tensor) against
    Hugging Face's partial-rotary form, in float64; the dims that do not
    rotate pass through exactly."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
    from fastedge.model import Rotary
    g = torch.Generator().manual_seed(rot * 31 + head_dim)
    B, H, S = 2, 3, 5
    q = torch.randn(B, H, S, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, head_dim, generator=g, dtype=torch.float64)
    angle = torch.rand(B, S, rot // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    rotary = Rotary.prepare(cos, sin, head_dim)
    for got, want, t in ((rotary(q), want_q, q), (rotary(k), want_k, k)):
        assert torch.allclose(got, want, rtol=1e-14, atol=1e-14)
        assert torch.equal(got[..., rot:], t[..., rot:])


def test_rotary_refuses_an_odd_or_too_wide_rotation():
    from fastedge.model import Rotary
    cos = torch.ones(1, 2, 3)
    with pytest.raises(ValueError, match="even"):
        Rotary.prepare(cos, cos, 8)
    with pytest.raises(ValueError, match="at most the head width"):
        Rotary.prepare(torch.ones(1, 2, 10), torch.ones(1, 2, 10), 8)
