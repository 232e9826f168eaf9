"""The patched model with the fused reader norm (`EdgeModel(fused_norm=...)`)
against the same model with Hugging Face's norm modules: same logits, same
mask gradients, with and without recompute_readers. The Triton kernels run
under the interpreter; the CPU default stays the module (the float64 oracle
tests see exactly what they saw before)."""
import pytest
import torch

import fastedge
from conftest import HAS_TRITON
from tiny_models import tiny_model, token_batch

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

# relative to the largest logit or gradient: 16 fp32 ulps; half a bf16 ulp.
# The norm differs from the module's by at most one ulp of its dtype in a
# few elements (tests/test_norm.py; measured here: at most 2e-7 in fp32, and
# 8e-6 in bf16, where the LayerNorm backward is more exact than the CPU's);
# a wrong norm (eps, bias, a missed rounding) moves them by far more.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2 ** -9}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the Triton launchers' calls, to see that the fused path ran."""
    from fastedge.kernels import norms
    calls = {"norm_fwd": 0, "norm_bwd": 0}
    for name in calls:
        real = getattr(norms, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(norms, name, counted)
    return calls


def _step(arch, dtype, recompute, **patch_kwargs):
    model = tiny_model(arch, dtype=dtype)
    ids, corrupted = token_batch(3, 9)
    em = fastedge.patch(model, recompute_readers=recompute, **patch_kwargs)
    em.reset_masks(generator=torch.Generator().manual_seed(0), mean=0.5)  # away from the clamp
    em.train()
    out = em(ids, corrupted, seed=3)
    (out.logits.float().pow(2).mean() + 1e-3 * (out.edge_mask_sum + out.node_mask_sum)).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in em.parameters()])
    return out.logits.detach(), grads, em


def _close(got, want, tol, what):
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert torch.isfinite(got).all(), what
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:g} x {scale:.3g}"


@needs_triton
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "qwen2", "neox-sequential"])
def test_fused_norm_gives_the_models_logits_and_gradients(arch, dtype, recompute, kernel_calls):
    logits, grads, _ = _step(arch, dtype, recompute, fused_norm="off")
    assert kernel_calls == {"norm_fwd": 0, "norm_bwd": 0}
    assert grads.abs().max() > 0
    f_logits, f_grads, em = _step(arch, dtype, recompute, fused_norm="triton")
    layers = len(em.adapter.blocks)
    # one forward per layer, one more per layer in the recompute; one backward per layer
    assert kernel_calls == {"norm_fwd": layers * (2 if recompute else 1), "norm_bwd": layers}
    assert f_logits.dtype == dtype
    _close(f_logits, logits, TOL[dtype], "logits")
    _close(f_grads, grads, TOL[dtype], "log_alpha gradients")


@needs_triton
def test_fused_norm_without_grad_and_from_the_environment(monkeypatch, kernel_calls):
    model = tiny_model("llama-gqa", dtype=torch.bfloat16)
    ids, corrupted = token_batch(2, 5)
    em = fastedge.patch(model)
    em.eval()
    with torch.no_grad():
        monkeypatch.delenv("FASTEDGE_FUSED_NORM", raising=False)
        plain = em(ids, corrupted).logits
        assert kernel_calls["norm_fwd"] == 0, "on the CPU the default is the module"
        monkeypatch.setenv("FASTEDGE_FUSED_NORM", "triton")
        fused = em(ids, corrupted).logits
        assert kernel_calls["norm_fwd"] == len(em.adapter.blocks)
    assert torch.equal(fused, plain)
    monkeypatch.setenv("FASTEDGE_FUSED_NORM", "sometimes")
    with pytest.raises(ValueError, match="FASTEDGE_FUSED_NORM must be one of auto, off, triton, torch"):
        with torch.no_grad():
            em(ids, corrupted)


@needs_triton
def test_auto_takes_the_kernels_only_where_they_run(monkeypatch, kernel_calls):
    """auto: the module on the CPU, the kernels where the Triton backend is
    forced (here, under the interpreter); float64 always the module."""
    ids, corrupted = token_batch(2, 5)
    for dtype, forced, expect in ((torch.float32, None, 0), (torch.float32, "triton", 3),
                                  (torch.float64, "triton", 0)):
        if forced:
            monkeypatch.setenv("FASTEDGE_BACKEND", forced)
        else:
            monkeypatch.delenv("FASTEDGE_BACKEND", raising=False)
        em = fastedge.patch(tiny_model("gpt2", dtype=dtype), fused_norm="auto")
        kernel_calls["norm_fwd"] = 0
        if dtype == torch.float64:  # the Triton masked sum takes no float64: norms alone
            monkeypatch.delenv("FASTEDGE_BACKEND")
            monkeypatch.setattr(fastedge.ops.norm, "auto_backend", lambda x, w: "triton")
        with torch.no_grad():
            em(ids, corrupted)
        assert kernel_calls["norm_fwd"] == expect, (dtype, forced)


def test_unrecognised_norms_run_as_modules():
    """A norm the adapter's NormSpec does not describe (another class) is run
    as the module, fused_norm or not."""
    model = tiny_model("llama-gqa")
    ids, corrupted = token_batch(2, 5)
    em = fastedge.patch(model, fused_norm="torch")
    assert em.adapter.attn_norm_params(0).kind == "rms"

    class ScaledRMSNorm(torch.nn.Module):  # not LlamaRMSNorm: different maths
        def __init__(self, inner):
            super().__init__()
            self.inner, self.weight, self.variance_epsilon = inner, inner.weight, inner.variance_epsilon

        def forward(self, x):
            return 2 * self.inner(x)
    with torch.no_grad():
        before = em(ids, corrupted).logits
        for block in model.model.layers:
            block.input_layernorm = ScaledRMSNorm(block.input_layernorm)
        assert em.adapter.attn_norm_params(0) is None
        after = em(ids, corrupted).logits
    assert not torch.allclose(before, after), "the replaced module ran"


def test_norm_params_come_from_the_modules():
    for arch, kind in (("llama-gqa", "rms"), ("mistral", "rms"), ("qwen2", "rms"),
                       ("gpt2", "layer"), ("neox-parallel", "layer")):
        em = fastedge.patch(tiny_model(arch))
        for layer in range(len(em.adapter.blocks)):
            module = em.adapter.attn_norm_module(layer)
            p = em.adapter.attn_norm_params(layer)
            assert p.kind == kind and p.weight is module.weight
            assert (p.bias is module.bias) if kind == "layer" else p.bias is None
            assert p.eps == (module.eps if kind == "layer" else module.variance_epsilon)


def test_fused_norm_option_is_checked():
    with pytest.raises(ValueError, match="fused_norm must be one of auto, off, triton, torch"):
        fastedge.patch(tiny_model("gpt2"), fused_norm="on")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_auto_runs_the_kernels_on_the_gpu(arch, kernel_calls):
    """On a CUDA device the default takes the fused norm, with the model's
    logits and gradients."""
    model = tiny_model(arch, dtype=torch.bfloat16).cuda()
    ids, corrupted = (t.cuda() for t in token_batch(3, 9))
    results = []
    for mode in ("off", None):
        em = fastedge.patch(model, recompute_readers=True, fused_norm=mode)
        torch.manual_seed(0)  # the same masks on the device for both
        em.reset_masks(mean=0.5)
        em.train()
        out = em(ids, corrupted, seed=3)
        out.logits.float().pow(2).mean().backward()
        results.append((out.logits.detach(), torch.cat([p.grad.reshape(-1) for p in em.parameters()])))
        em.unpatch()
    assert kernel_calls["norm_bwd"] == len(em.adapter.blocks)
    _close(results[1][0], results[0][0], TOL[torch.bfloat16], "logits")
    _close(results[1][1], results[0][1], TOL[torch.bfloat16], "log_alpha gradients")
