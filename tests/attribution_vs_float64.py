"""One check shared by the GPU attribution test and its interpreted twin:
scores of a model in fp32 (or bf16) on a backend and device against the same
model's scores in float64 on the CPU (torch backend)."""
import copy

import torch

import fastedge
from tiny_models import tiny_model, token_batch


def _metric(logits):
    return torch.log_softmax(logits[:, -1].float(), -1)[:, 3] + 0.3 * logits[:, 1:, 5].float().mean(1) ** 2


def check_attribution_against_float64(arch: str, method: str, backend: str, device: str, monkeypatch,
                                      dtype=torch.float32) -> float:
    model = tiny_model(arch)
    ids, corrupted = token_batch(batch=3, seq=7, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                      # left padding in one row
    ref = fastedge.attribute(copy.deepcopy(model).double(), ids, corrupted, attention_mask=mask,
                             metric=_metric, method=method, ig_steps=2).flat()
    monkeypatch.setenv("FASTEDGE_BACKEND", backend)
    got = fastedge.attribute(model.to(device=device, dtype=dtype), ids.to(device), corrupted.to(device),
                             attention_mask=mask.to(device), metric=_metric, method=method, ig_steps=2).flat()
    assert torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    # fp32: a few roundings deep (as the model's own gradients, model_vs_float64);
    # bf16: 8-bit activations, a few percent
    bound = 1e-4 if dtype == torch.float32 else 5e-2
    assert rel < bound, f"relative L2 error {rel:.3g} of {dtype} scores on {backend}/{device}"
    return rel
