"""One check shared by the GPU model test and its interpreted twin: a patched
model in fp32 on a backend and device, against the same EdgeModel in float64
on the CPU (torch backend), with the same masks and seed: logits, mask sums
and every log_alpha gradient, in training (sampled masks: the Philox noise is
the same on every backend) or evaluation.

The log_alphas are spread (N(0, 2)): many sampled edge and node masks clamp
to exactly 0, so writers whose masks are all 0 for a call (node-pruned, most
often) are skipped by the kernels (`live_columns`) in every pass."""
import copy

import torch

import fastedge
from tiny_models import tiny_model, token_batch


def _run(em, ids, corrupted, attention_mask, seed, w):
    em.zero_grad(set_to_none=True)
    out = em(ids, corrupted, attention_mask=attention_mask, seed=seed)
    loss = (out.logits.double() * w).sum() + out.edge_mask_sum.double() * 0.37
    loss.backward()
    grads = [p.grad.detach().double().cpu() for p in em.edge_log_alpha]
    node = em.node_log_alpha.grad.detach().double().cpu()
    return out.logits.detach().double().cpu(), out.edge_mask_sum.detach().double().cpu(), grads, node


def check_against_float64(arch: str, training: bool, backend: str, device: str, monkeypatch) -> None:
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
    em = fastedge.patch(model.to(device), seed=11)
    with torch.no_grad():
        for p, q in zip(em.parameters(), ref.parameters()):
            p.copy_(q.float())
    em.train(training)
    got = _run(em, ids.to(device), corrupted.to(device), attention_mask.to(device), 5, w.to(device))

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
