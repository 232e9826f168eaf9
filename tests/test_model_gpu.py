"""The patched model on a GPU (marker `gpu`): the same EdgeModel, the same
masks and the same seed on the CPU (torch backend, float64) and on the device
with each GPU backend give the same logits, mask sums and log_alpha
gradients, in training (sampled masks: the Philox noise is the same on every
backend) and in evaluation. fp32 on the device; tf32 is off so the model's own
matmuls stay fp32."""
import copy

import pytest
import torch

import fastedge
from tiny_models import ARCHITECTURES, WIDE, tiny_model, token_batch

pytestmark = pytest.mark.gpu


def _run(em, ids, corrupted, attention_mask, seed, w):
    em.zero_grad(set_to_none=True)
    out = em(ids, corrupted, attention_mask=attention_mask, seed=seed)
    loss = (out.logits.double() * w).sum() + out.edge_mask_sum.double() * 0.37
    loss.backward()
    grads = [p.grad.detach().double().cpu() for p in em.edge_log_alpha]
    node = em.node_log_alpha.grad.detach().double().cpu()
    return out.logits.detach().double().cpu(), out.edge_mask_sum.detach().double().cpu(), grads, node


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", ARCHITECTURES + [WIDE])  # WIDE: the kernels' dot path
def test_edge_model_on_gpu_matches_cpu_float64(arch, training, backend, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model(arch)
    ids, corrupted = token_batch(batch=3, seq=9, seed=2)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 9, model.config.vocab_size, generator=g, dtype=torch.float64)
    w *= attention_mask[..., None]

    ref_model = copy.deepcopy(model).double()
    ref = fastedge.patch(ref_model, seed=11)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2)
    ref.train(training)
    want = _run(ref, ids, corrupted, attention_mask, 5, w)

    monkeypatch.setenv("FASTEDGE_BACKEND", backend)
    em = fastedge.patch(model.cuda(), seed=11)
    with torch.no_grad():
        for p, q in zip(em.parameters(), ref.parameters()):
            p.copy_(q.float())
    em.train(training)
    got = _run(em, ids.cuda(), corrupted.cuda(), attention_mask.cuda(), 5, w.cuda())

    keep = attention_mask.bool()
    # fp32 against float64: relative errors of whole tensors, a few fp32 roundings deep
    assert _rel(got[0][keep], want[0][keep]) < 1e-5
    assert _rel(got[1], want[1]) < 1e-6
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        assert _rel(a, b) < 1e-4, f"reader group {i}"
    assert _rel(got[3], want[3]) < 1e-4


def _rel(a, b) -> float:
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
