"""bench/naive_model.py (the authors' design, the baseline of bench/step.py and
bench/memory.py) computes the same function as fastedge's EdgeModel: same
logits and same log_alpha gradients with the same deterministic masks, in
float64, on tiny GPT-2 and Llama models."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastedge
from hf_float64 import hf_in_float64
from tiny_models import VOCAB, tiny_model, token_batch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _naive_model_module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("naive_model")


def _llama_mha(seed=0):
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, hidden_size=24,
                      intermediate_size=29, vocab_size=VOCAB)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_naive_model_matches_edge_model(arch):
    nm = _naive_model_module()
    model = (tiny_model("gpt2") if arch == "gpt2" else _llama_mha()).double()
    em = fastedge.patch(model, node_masks=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # masks spread over (0, 1): random log_alphas around 0
        for p in em.edge_log_alpha:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2)
    naive_model = nm.NaiveEdgeModel(model).double()
    naive_model.copy_masks_from(em)
    em.eval()
    naive_model.eval()
    ids, corrupted = token_batch(batch=3, seq=6, seed=5)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0  # left padding on one row

    with hf_in_float64():
        out_e = em(ids, corrupted, attention_mask=attention_mask)
        out_n = naive_model(ids, corrupted, attention_mask=attention_mask)
    keep = attention_mask.bool()
    torch.testing.assert_close(out_n.logits[keep], out_e.logits[keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out_n.edge_mask_sum.double(), out_e.edge_mask_sum.double(), rtol=1e-9, atol=1e-9)
    assert out_n.n_edges == out_e.n_edges

    # gradients of the same loss w.r.t. the same masks
    w = torch.randn(out_e.logits.shape, generator=g, dtype=torch.float64) * keep[..., None]
    (out_e.logits * w).sum().backward()
    (out_n.logits * w).sum().backward()
    H = naive_model.adapter.n_heads
    for layer in range(len(naive_model.adapter.blocks)):
        ge = em.edge_log_alpha[2 * layer].grad
        wa = ge.shape[1]
        gn = torch.cat([p.grad[layer, :wa].t() for p in (naive_model.q_log_alpha, naive_model.k_log_alpha,
                                                        naive_model.v_log_alpha)])
        torch.testing.assert_close(gn, ge, rtol=1e-8, atol=1e-10)
        gm = em.edge_log_alpha[2 * layer + 1].grad
        torch.testing.assert_close(naive_model.mlp_log_alpha.grad[layer, :gm.shape[1]], gm[0],
                                   rtol=1e-8, atol=1e-10)
        # writers a layer may not read get no gradient in the naive design either
        assert naive_model.q_log_alpha.grad[layer, wa:].abs().max() == 0
    torch.testing.assert_close(naive_model.final_log_alpha.grad, em.edge_log_alpha[-1].grad[0],
                               rtol=1e-8, atol=1e-10)
    assert H == naive_model.q_log_alpha.shape[-1]


def test_naive_model_training_masks_are_sampled_and_hard():
    nm = _naive_model_module()
    model = tiny_model("gpt2")
    naive_model = nm.NaiveEdgeModel(model)
    with torch.no_grad():
        naive_model.q_log_alpha.zero_()
    naive_model.train()
    z1 = naive_model._sample(naive_model.q_log_alpha)
    z2 = naive_model._sample(naive_model.q_log_alpha)
    assert not torch.equal(z1, z2)                      # fresh noise per draw
    assert ((z1 == 0) | (z1 == 1)).any() and ((z1 > 0) & (z1 < 1)).any()
    assert z1.min() >= 0 and z1.max() <= 1


def test_naive_model_refuses_grouped_kv_heads():
    nm = _naive_model_module()
    with pytest.raises(ValueError, match="k/v heads"):
        nm.NaiveEdgeModel(tiny_model("llama-gqa"))
