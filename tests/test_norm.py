"""The fused reader norm (`fastedge.ops.fused_norm`, `fastedge.kernels.norms`):
the Triton kernels under the interpreter against float64 and against Hugging
Face's own modules, the op's registration and errors, and the cost contract.
The patched model with the fused norm is in test_model_fused_norm.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from conftest import HAS_TRITON
from fastedge.ops.norm import fused_norm, norm_op, norm_reference, norm_reference_backward
from tolerances import assert_matches_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, D): awkward widths, rows not a multiple of the kernel's rows per program
# (norm_config: 64 rows of 40, 16 of 130, 4 of 768, 1 of 5120)
SHAPES = [(1, 40), (67, 40), (37, 130), (5, 768), (3, 5120)]
# mantissa bits of each dtype, for "one ulp"
MANTISSA = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return f"M{v[0]}-D{v[1]}"
    return str(v)


def _module(kind, D, dtype, seed, cls=None):
    """A Hugging Face norm module with random weights (and bias) in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    if kind == "rms":
        m = (cls or LlamaRMSNorm)(D, eps=1e-6)
    else:
        m = nn.LayerNorm(D, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(D, generator=g))
        if kind == "layer":
            m.bias.copy_(0.3 * torch.randn(D, generator=g))
    return m.to(dtype).requires_grad_(False)


def _params(m, kind):
    eps = m.variance_epsilon if kind == "rms" else m.eps
    return m.weight, (m.bias if kind == "layer" else None), eps


def _inputs(rows, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # rows of different scales and offsets, as residual streams have
    scale = torch.rand(rows, 1, generator=g) * 4 + 0.1
    x = torch.randn(rows, D, generator=g) * scale + torch.randn(rows, 1, generator=g)
    dy = torch.randn(rows, D, generator=g)
    return x.to(dtype), dy.to(dtype)


def _float64(x, w, b, eps, kind):
    """The norm in float64 (no roundings), differentiable in x."""
    x, w = x.double(), w.double()
    if kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, None if b is None else b.double(), eps)


def _value_and_grad(fn, x, dy):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    dx, = torch.autograd.grad(y, x, dy.to(y.dtype))
    return y.detach(), dx


def _within_one_ulp(got, want, dtype):
    """|got - want| within one ulp of `want` in `dtype` (at its exponent),
    plus a few fp32 ulps of the largest value: the fp32 statistics' own
    differences, which show unrounded where a bias cancels the value."""
    w = want.double()
    ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - (MANTISSA[dtype] - 1))
    return ((got.double() - w).abs() <= ulp + 2 ** -21 * w.abs().max()).all().item()


# -- the Triton kernels (interpreted on the CPU) against float64 and Hugging Face -----------


DEVICES = [pytest.param("cpu", id="interpreted"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_kernels_match_float64_and_hugging_face(kind, dtype, shape, device, poison_fresh_memory):
    rows, D = shape
    seed = 1000 * rows + D
    m = _module(kind, D, dtype, seed).to(device)
    w, b, eps = _params(m, kind)
    x, dy = (t.to(device) for t in _inputs(rows, D, dtype, seed + 1))
    got, dx = _value_and_grad(lambda t: fused_norm(t, w, b, eps=eps, kind=kind, backend="triton"),
                              x, dy)
    hf, dx_hf = _value_and_grad(m, x, dy)
    ref, dx_ref = _value_and_grad(lambda t: _float64(t, w, b, eps, kind), x, dy)
    assert got.dtype == dx.dtype == dtype
    assert_matches_reference(got, ref, hf, dtype, f"{kind} forward")
    assert_matches_reference(dx, dx_ref, dx_hf, dtype, f"{kind} dx")
    if dtype != torch.float32:
        # within one ulp of Hugging Face's own module everywhere
        assert _within_one_ulp(got, hf, dtype), f"{kind} forward: more than one ulp from the module"
        # the roundings in the same places as the module's: almost every
        # 16-bit output bit-identical (only the fp32 sums' order differs)
        same = (got == hf).double().mean().item()
        assert same >= 0.98, f"{kind} forward: only {same:.1%} bit-identical to the module"
        if kind == "rms":
            same = (dx == dx_hf).double().mean().item()
            assert same >= 0.98, f"rms dx: only {same:.1%} bit-identical to autograd through the module"


@needs_triton
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", [(1000, 40), (7, 5120)], ids=_id)
def test_programs_walk_several_row_blocks(shape, kind, monkeypatch, poison_fresh_memory):
    """Large calls give each program several blocks of rows (one weight
    load); with a smaller grid target, small calls do too, the last program
    running past the last row."""
    from fastedge.kernels import norms
    rows, D = shape
    monkeypatch.setattr(norms, "MIN_PROGRAMS", 3 if D == 40 else 2)
    cfg = norms.norm_config(D, rows)
    blocks = -(-rows // cfg["BLOCK_M"])
    assert cfg["ROW_BLOCKS"] > 1 and cfg["programs"] * cfg["ROW_BLOCKS"] > blocks
    dtype = torch.bfloat16
    m = _module(kind, D, dtype, rows)
    w, b, eps = _params(m, kind)
    x, dy = _inputs(rows, D, dtype, rows + 1)
    got, dx = _value_and_grad(lambda t: fused_norm(t, w, b, eps=eps, kind=kind, backend="triton"),
                              x, dy)
    ref, dx_ref = _value_and_grad(lambda t: _float64(t, w, b, eps, kind), x, dy)
    hf, dx_hf = _value_and_grad(m, x, dy)
    assert_matches_reference(got, ref, hf, dtype, "forward")
    assert_matches_reference(dx, dx_ref, dx_hf, dtype, "dx")
    assert (got == hf).double().mean().item() >= 0.98


@needs_triton
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_kernels_read_strided_rows_and_any_leading_shape(kind, poison_fresh_memory):
    D, dtype = 130, torch.bfloat16
    m = _module(kind, D, dtype, 5)
    w, b, eps = _params(m, kind)
    big, dy = _inputs(3 * 5 * 2, D + 7, dtype, 6)
    x = big.view(3, 5, 2, D + 7)[..., 3:3 + D]  # rows with stride D + 7
    dy = dy[:, :D].reshape(3, 5, 2, D).contiguous()
    got, dx = _value_and_grad(lambda t: fused_norm(t, w, b, eps=eps, kind=kind, backend="triton"),
                              x, dy)
    ref, dx_ref = _value_and_grad(lambda t: _float64(t, w, b, eps, kind), x, dy)
    hf, dx_hf = _value_and_grad(m, x, dy)
    assert got.shape == dx.shape == x.shape
    assert_matches_reference(got, ref, hf, dtype, "strided forward")
    assert_matches_reference(dx, dx_ref, dx_hf, dtype, "strided dx")


@needs_triton
def test_launchers_refuse_bad_arguments():
    from fastedge.kernels import norms
    x = torch.randn(4, 40)
    w = torch.ones(40)
    with pytest.raises(ValueError, match="at most 8192"):
        norms.norm_config(8193)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        norms.norm_fwd(x, w.double(), None, 1e-5, True)
    with pytest.raises(ValueError, match=r"weight must be a contiguous \[40\]"):
        norms.norm_fwd(x, torch.ones(41), None, 1e-5, True)
    with pytest.raises(ValueError, match="unit inner stride"):
        norms.norm_fwd(torch.randn(40, 4).t(), w, None, 1e-5, True)
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        norms.norm_fwd(x, w, w, 1e-5, True)
    with pytest.raises(ValueError, match="dy must be contiguous"):
        norms.norm_bwd(x, w, torch.randn(4, 41), 1e-5, True)


# -- the plain-PyTorch reference is Hugging Face's computation, bit for bit ------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_id)
@pytest.mark.parametrize("cls", [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, nn.LayerNorm],
                         ids=lambda c: c.__name__)
def test_reference_is_the_module(cls, dtype):
    kind = "layer" if cls is nn.LayerNorm else "rms"
    m = _module(kind, 130, dtype, 11, cls=None if kind == "layer" else cls)
    assert type(m) is cls
    w, b, eps = _params(m, kind)
    x, dy = _inputs(9, 130, dtype, 12)
    got, dx = _value_and_grad(lambda t: norm_reference(t, w, b, eps, kind == "rms"), x, dy)
    want, dx_want = _value_and_grad(m, x, dy)
    assert torch.equal(got, want) and torch.equal(dx, dx_want)
    assert torch.equal(norm_reference_backward(x, w, dy, eps, kind == "rms"), dx_want)
    # and the op's torch backend runs them, forward and backward
    got, dx = _value_and_grad(lambda t: fused_norm(t, w, b, eps=eps, kind=kind, backend="torch"),
                              x, dy)
    assert torch.equal(got, want) and torch.equal(dx, dx_want)


# -- registration ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_opcheck(kind, backend):
    m = _module(kind, 40, torch.float32, 21)
    w, b, eps = _params(m, kind)
    x = _inputs(6, 40, torch.float32, 22)[0].view(2, 3, 40).requires_grad_(True)
    torch.library.opcheck(norm_op, (x, w, b, eps, kind == "rms", backend))
    dy = torch.randn(2, 3, 40)
    torch.library.opcheck(torch.ops.fastedge.norm_backward.default,
                          (x.detach(), w, dy, eps, kind == "rms", backend))


def test_fake_tensors_and_compile():
    m = _module("rms", 40, torch.bfloat16, 31)
    w, _, eps = _params(m, "rms")

    def f(x):
        return fused_norm(x, w, eps=eps, kind="rms", backend="torch").float().sum()

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = fused_norm(torch.empty(7, 3, 40, dtype=torch.bfloat16), w, eps=eps, kind="rms",
                       backend="triton")
        assert y.shape == (7, 3, 40) and y.dtype == torch.bfloat16
    x = _inputs(5, 40, torch.bfloat16, 32)[0].requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    x2 = x.detach().requires_grad_(True)
    f(x2).backward()
    assert torch.equal(out, f(x2.detach())) and torch.equal(x.grad, x2.grad)


# -- errors -------------------------------------------------------------------------------------


def test_fused_norm_refuses_bad_arguments():
    x, w = torch.randn(3, 40), torch.ones(40)
    with pytest.raises(ValueError, match="kind must be one of rms, layer"):
        fused_norm(x, w, eps=1e-5, kind="group")
    with pytest.raises(ValueError, match="backend must be one of triton, torch"):
        fused_norm(x, w, eps=1e-5, kind="rms", backend="cuda")
    with pytest.raises(ValueError, match=r"weight must be a \[40\] tensor"):
        fused_norm(x, torch.ones(39), eps=1e-5, kind="rms")
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        fused_norm(x, w.bfloat16(), eps=1e-5, kind="rms")
    with pytest.raises(ValueError, match="an RMSNorm has no bias"):
        fused_norm(x, w, w, eps=1e-5, kind="rms")
    with pytest.raises(ValueError, match="weight requires grad"):
        fused_norm(x, w.clone().requires_grad_(True), eps=1e-5, kind="rms")
    with pytest.raises(TypeError, match="floating-point"):
        fused_norm(torch.ones(3, 40, dtype=torch.int64), w, eps=1e-5, kind="rms")


@needs_triton
def test_triton_backend_says_why_it_cannot_run():
    x = torch.randn(2, 8200)
    with pytest.raises(RuntimeError, match="at most 8192"):
        fused_norm(x, torch.ones(8200), eps=1e-5, kind="rms", backend="triton")
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not"):
        fused_norm(x[:, :40].double(), torch.ones(40, dtype=torch.float64), eps=1e-5, kind="rms",
                   backend="triton")


def test_automatic_backend(monkeypatch):
    from fastedge.ops import norm
    x, w = torch.randn(3, 40), torch.ones(40)
    monkeypatch.delenv("FASTEDGE_BACKEND", raising=False)
    assert norm.auto_backend(x, w) == "torch", "the CPU runs the plain-PyTorch norm by default"
    monkeypatch.setenv("FASTEDGE_BACKEND", "triton")
    assert norm.auto_backend(x, w) == "triton"
    monkeypatch.setenv("FASTEDGE_BACKEND", "cuda")  # no norm kernel: the automatic choice
    assert norm.auto_backend(x, w) == "torch"


# -- the cost contract --------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
def test_norm_cost(dtype):
    from fastedge.kernels.norms import norm_config, norm_cost
    rows, D = 120 * 8 * 72, 5120
    e = torch.empty((), dtype=dtype).element_size()
    n = rows * D
    fwd = norm_cost(rows, D, dtype, kind="rms")
    bwd = norm_cost(rows, D, dtype, kind="rms", backward=True)
    assert fwd["launches"] == bwd["launches"] == 1
    assert fwd["dram_write"] == n * e and bwd["dram_write"] == n * e
    assert fwd["dram_read"] == n * e + D * e and bwd["dram_read"] == 2 * n * e + D * e
    cfg = norm_config(D, rows)
    assert cfg["BLOCK_M"] == 1 and cfg["ROW_BLOCKS"] == 16 and cfg["programs"] == -(-rows // 16)
    assert fwd["l2_read"] == (cfg["programs"] - 1) * D * e
    assert fwd["flops"]["fp32"] > 0 and bwd["flops"]["fp32"] > fwd["flops"]["fp32"]
    ln = norm_cost(37 * 32 * 64, 768, dtype, kind="layer", has_bias=True)
    assert ln["dram_read"] == 37 * 32 * 64 * 768 * e + 2 * 768 * e
    assert norm_cost(0, D, dtype)["launches"] == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        norm_cost(rows, D, dtype, kind="group")
