"""Smoke tests of the Triton kernels and launchers against `kernels.reference`.

Small shapes, so that the whole file runs in well under a minute under
TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU; on a GPU
machine the same tests run compiled kernels on the device). The broad
correctness suite is tests/test_ops*.py; this file checks the launchers
directly: awkward shapes, each base form, a stack prefix whose hidden rows
hold NaN, Philox noise bit for bit, determinism of the reductions.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastedge.backends.base import Call  # noqa: E402
from fastedge.kernels import hard_concrete as khc  # noqa: E402
from fastedge.kernels import masked_sum as kms  # noqa: E402
from fastedge.kernels import philox as kph  # noqa: E402
from fastedge.kernels import reference as ref  # noqa: E402
from fastedge.ops import philox as sph  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = kms._interpreted(kms._masked_sum_fwd_kernel)
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SEEDS = [0, 1, 12345, 2 ** 31 + 7, 2 ** 32 - 1, 2 ** 40 + 3, 2 ** 63 - 1]


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of |v| in `dtype` (float64 tensor)."""
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    tiny = {torch.float32: 2.0 ** -126, torch.bfloat16: 2.0 ** -126, torch.float16: 2.0 ** -14}[dtype]
    mag = v.abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - mant)


# Relative precision of an fp32 mask inside a dot on a storage-dtype stack:
# hi + lo parts in bf16 keep about 16 bits (14 when the interpreter truncates),
# in fp16 about 22; tf32x3 about 21.
MASK_EPS = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -14, torch.float16: 2.0 ** -19}


def assert_close_to_fp32_accumulation(got, ref64, magnitude, dtype, what):
    """got (storage dtype) must be the exact result rounded once to `dtype`
    (one ulp: the interpreter's bf16 stores truncate instead of rounding),
    up to the precision the mask keeps inside the dot, relative to
    `magnitude` = sum of |terms|, and fp32 accumulation."""
    got64 = got.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite output (unwritten element?)"
    bound = _ulp(ref64, dtype) + (MASK_EPS[dtype] + 2.0 ** -21) * magnitude + 1e-30
    err = (got64 - ref64).abs()
    bad = err > bound
    if bad.any():
        i = int((err / bound).argmax())
        r, c = divmod(i, err.shape[-1])
        raise AssertionError(f"{what}: {int(bad.sum())} elements off; worst at [{r}, {c}]: "
                             f"got {got64[r, c].item():.8g}, want {ref64[r, c].item():.8g}, "
                             f"bound {bound[r, c].item():.3g}")


def make_stack(W_total, W, N, dtype, gen):
    """A prefix view x[:W] of a [W_total, N] stack whose other rows are NaN
    (they must never be read), and with an odd row stride."""
    buf = torch.randn(W_total, N + 3, generator=gen).to(dtype)
    buf[W:] = float("nan")
    return buf.to(DEVICE)[:, :N][:W]


# -- Philox ---------------------------------------------------------------------------


def test_philox_words_bit_exact():
    g = torch.Generator().manual_seed(0)
    c0 = torch.randint(0, 2 ** 32, (512,), generator=g, dtype=torch.int64)
    c1 = torch.randint(0, 2 ** 32, (512,), generator=g, dtype=torch.int64)
    c0[:4] = torch.tensor([0, 2 ** 32 - 1, 1, 0])
    c1[:4] = torch.tensor([0, 2 ** 32 - 1, 0, 1])
    for seed in SEEDS:
        for c2, c3 in ((0, 0), (1, 0), (2 ** 32 - 1, 2 ** 31)):
            got = kph.philox_words(seed, c0.to(DEVICE), c1.to(DEVICE), c2, c3).cpu()
            want = sph.philox_uint32(seed, c0, c1, c2, c3)
            assert torch.equal(got, want), f"seed={seed} c2={c2} c3={c3}"


@triton.jit(do_not_specialize=["reader_offset", "k0", "k1"])
def _noise_kernel(edge_ptr, node_ptr, R, W, reader_offset, k0, k1, eps_low, eps_high,
                  BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    offs_w = tl.arange(0, BLOCK_W)
    e = kph.edge_noise(offs_r, offs_w, reader_offset, k0, k1, eps_low, eps_high)
    tl.store(edge_ptr + offs_r[:, None] * W + offs_w[None, :], e,
             mask=(offs_r[:, None] < R) & (offs_w[None, :] < W))
    n = kph.node_noise(offs_w, k0, k1, eps_low, eps_high)
    tl.store(node_ptr + offs_w, n, mask=offs_w < W)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reader_offset", [0, 5, 2 ** 32 - 3])
def test_philox_noise_bit_exact(seed, reader_offset):
    R, W = 5, 37
    edge = torch.empty(R, W, device=DEVICE)
    node = torch.empty(W, device=DEVICE)
    k0, k1 = kph.split_seed(seed)
    _noise_kernel[(1,)](edge, node, R, W, reader_offset, k0, k1, ref.EPS_LOW, ref.EPS_HIGH,
                        BLOCK_R=8, BLOCK_W=64)
    want_edge = ref.edge_noise(seed, R, W, reader_offset, "cpu")
    want_node = ref.node_noise(seed, W, "cpu")
    assert torch.equal(edge.cpu(), want_edge)
    assert torch.equal(node.cpu(), want_node)


def test_noise_clamp_is_bit_identical():
    # The clamp bounds must be the fp32 values of the reference.
    u = torch.tensor([0.0, 2.0 ** -24, 1e-6, 0.5, 1 - 2.0 ** -24], device=DEVICE)
    z = khc.hard_concrete_forward(torch.zeros_like(u), ref.clamp_noise(u), True)
    assert torch.isfinite(z).all()


# -- hard concrete ------------------------------------------------------------------------


def _log_alphas(n, gen):
    la = torch.randn(n, generator=gen) * 4.0
    special = torch.tensor([float("-inf"), float("inf"), -40.0, 40.0, 0.0, 10.0])
    k = min(n, special.numel())
    la[:k] = special[:k]
    return la


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hard_concrete_elementwise(training):
    g = torch.Generator().manual_seed(1)
    n = 3001
    la = _log_alphas(n, g)
    u = ref.clamp_noise(torch.rand(n, generator=g)) if training else None
    dz = torch.randn(n, generator=g)
    z = khc.hard_concrete_forward(la.to(DEVICE), None if u is None else u.to(DEVICE),
                                  training).cpu()
    d = khc.hard_concrete_backward(la.to(DEVICE), None if u is None else u.to(DEVICE),
                                   training, dz.to(DEVICE)).cpu()
    u64 = None if u is None else u.double()
    z64 = ref.hard_concrete_forward(la.double(), u64, training)
    d64 = ref.hard_concrete_backward(la.double(), u64, training, dz.double())
    assert torch.isfinite(z).all() and torch.isfinite(d).all()
    assert z[0] == 0 and d[0] == 0 and d[1] == 0
    assert (z.double() - z64).abs().max() < 2e-6
    assert (d.double() - d64).abs().max() < 2e-5 * max(1.0, d64.abs().max().item())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("node", [True, False], ids=["node", "nonode"])
@pytest.mark.parametrize("R,W", [(1, 1), (3, 7), (37, 100)])
def test_sample_masks(R, W, node, training):
    g = torch.Generator().manual_seed(R * 100 + W)
    seed, offset = 2 ** 33 + 17, 11
    ela = _log_alphas(R * W, g).reshape(R, W)
    nla = _log_alphas(W, g) if node else None
    dm = torch.randn(R, W, generator=g)
    dsum = torch.randn((), generator=g)

    def run():
        m, s = khc.sample_masks(ela.to(DEVICE), None if nla is None else nla.to(DEVICE),
                                seed, offset, training)
        de, dn = khc.sample_masks_backward(ela.to(DEVICE),
                                           None if nla is None else nla.to(DEVICE), seed,
                                           offset, training, dm.to(DEVICE), dsum.to(DEVICE))
        return m.cpu(), s.cpu(), de.cpu(), None if dn is None else dn.cpu()

    m, s, de, dn = run()
    m64, s64 = ref.sample_masks(ela.double(), None if nla is None else nla.double(), seed,
                                offset, training)
    de64, dn64 = ref.sample_masks_backward(ela.double(), None if nla is None else nla.double(),
                                           seed, offset, training, dm.double(), dsum.double())
    assert s.shape == () and m.shape == (R, W) and de.shape == (R, W)
    assert torch.isfinite(m).all() and torch.isfinite(de).all()
    assert (m.double() - m64).abs().max() < 2e-6
    assert abs(s.item() - s64.item()) < 1e-5 * max(1.0, abs(s64.item()))
    assert (de.double() - de64).abs().max() < 3e-5 * max(1.0, de64.abs().max().item())
    if node:
        assert dn.shape == (W,) and torch.isfinite(dn).all()
        assert (dn.double() - dn64).abs().max() < 3e-5 * max(1.0, dn64.abs().max().item())
    else:
        assert dn is None
    again = run()
    assert torch.equal(again[1], s) and torch.equal(again[2], de)
    if node:
        assert torch.equal(again[3], dn)


# -- masked writer sum ------------------------------------------------------------------

# (W_total, W, R, N, base form)
FWD_CASES = [
    (1, 1, 1, 1000, "none"),
    (9, 7, 1, 77, "shared"),
    (170, 158, 1, 77, "indexed"),
    (1, 1, 3, 77, "indexed"),
    (9, 7, 3, 1000, "shared"),
    (170, 158, 3, 77, "none"),
    (1, 1, 16, 77, "shared"),
    (9, 7, 16, 77, "indexed"),
    (170, 158, 16, 1000, "none"),
    (1, 1, 37, 77, "none"),
    (9, 7, 37, 1000, "indexed"),
    (170, 158, 37, 77, "shared"),
    (40, 33, 150, 77, "indexed"),  # more readers than one program holds
]


def case_id(c):
    W_total, W, R, N, base = c
    return f"W{W}of{W_total}-R{R}-N{N}-{base}"


def _fwd_inputs(case, dtype, seed):
    W_total, W, R, N, base_form = case
    g = torch.Generator().manual_seed(seed)
    x = make_stack(W_total, W, N, dtype, g)
    m = torch.rand(R, W, generator=g)
    m[m < 0.2] = 0.0
    base = index = None
    if base_form == "shared":
        base = torch.randn(1, N, generator=g).to(dtype).to(DEVICE)
    elif base_form == "indexed":
        base = torch.randn(3, N, generator=g).to(dtype).to(DEVICE)
        index = torch.randint(0, 3, (R,), generator=g).to(DEVICE)
    return x, m.to(DEVICE), base, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("case", FWD_CASES, ids=case_id)
def test_masked_sum_forward(case, dtype):
    x, m, base, index = _fwd_inputs(case, dtype, seed=len(case_id(case)))
    R, N = m.shape[0], x.shape[1]
    out = torch.full((R, N), float("nan"), dtype=dtype, device=DEVICE)
    kms.masked_sum_fwd(x, m, base, index, out)
    want = torch.empty(R, N, dtype=torch.float64)
    ref.masked_sum_forward(x.double().cpu(), m.double().cpu(),
                           None if base is None else base.double().cpu(),
                           None if index is None else index.cpu(), want)
    magnitude = m.double().cpu() @ x.double().cpu().abs()
    if base is not None:
        b = base.double().cpu().abs()
        magnitude += b[0] if index is None else b[index.cpu()]
    assert_close_to_fp32_accumulation(out, want, magnitude, dtype, case_id(case))


BWD_CASES = [(9, 7, 1, 77), (170, 158, 3, 400), (9, 7, 16, 1000), (170, 158, 37, 77),
             (40, 33, 150, 77)]


def bwd_id(c):
    return f"W{c[1]}of{c[0]}-R{c[2]}-N{c[3]}"


@pytest.mark.parametrize("grad", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("case", BWD_CASES, ids=bwd_id)
def test_masked_sum_backward_stack(case, dtype, grad):
    W_total, W, R, N = case
    gdtype = torch.float32 if grad == "fp32" else dtype
    g = torch.Generator().manual_seed(W * R + N)
    m = torch.rand(R, W, generator=g)
    dout = torch.randn(R, N, generator=g).to(dtype)
    # The gradient buffer: a prefix of a bigger stack gradient, odd row stride;
    # rows past W must stay untouched.
    buf = torch.randn(W_total, N + 5, generator=g).to(gdtype)
    before = buf.clone()
    buf_dev = buf.to(DEVICE)
    dx = buf_dev[:W, :N]
    kms.masked_sum_bwd_stack(m.to(DEVICE), dout.to(DEVICE), dx)
    got = buf_dev.cpu()
    want = before[:W, :N].double() + m.double().t() @ dout.double()
    magnitude = before[:W, :N].double().abs() + m.double().t() @ dout.double().abs()
    assert_close_to_fp32_accumulation(got[:W, :N], want, magnitude, dtype, bwd_id(case))
    assert torch.equal(got[W:], before[W:]) and torch.equal(got[:, N:], before[:, N:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("case", BWD_CASES + [(1, 1, 1, 2000)], ids=bwd_id)
def test_masked_sum_backward_mask(case, dtype):
    W_total, W, R, N = case
    g = torch.Generator().manual_seed(W + R * N)
    x = make_stack(W_total, W, N, dtype, g)
    dout = torch.randn(R, N, generator=g).to(dtype).to(DEVICE)
    dm = kms.masked_sum_bwd_mask(x, dout)
    want = dout.double().cpu() @ x.double().cpu().t()
    assert dm.dtype == torch.float32 and dm.shape == (R, W)
    # fp32 reduction over N terms: relative to the sum of |terms|.
    mag = dout.double().abs().cpu() @ x.double().abs().cpu().t()
    assert ((dm.double().cpu() - want).abs() <= 1e-5 * mag + 1e-6).all()
    assert torch.equal(kms.masked_sum_bwd_mask(x, dout), dm), "not bit-identical run to run"


def test_backward_mask_uses_slices():
    # A long N is cut into several slices (the deterministic two-pass path).
    cfg = kms.backward_mask_config(37, 158, 32 * 64 * 768, torch.float32)
    assert cfg["SLICES"] > 1
    assert cfg["SLICES"] * 37 * 158 <= kms.MAX_SCRATCH
    assert (cfg["SLICES"] - 1) * cfg["SLICE_LEN"] < 32 * 64 * 768


def test_empty_shapes():
    x = torch.randn(0, 10, device=DEVICE)
    m = torch.zeros(2, 0, device=DEVICE)
    base = torch.randn(1, 10, device=DEVICE)
    out = torch.full((2, 10), float("nan"), device=DEVICE)
    kms.masked_sum_fwd(x, m, base, None, out)
    assert torch.equal(out.cpu(), base.cpu().expand(2, 10))
    assert kms.masked_sum_bwd_mask(x, torch.randn(2, 10, device=DEVICE)).shape == (2, 0)


# -- the backend ---------------------------------------------------------------------------


def test_backend_reasons():
    from fastedge.backends.triton_backend import TritonBackend
    b = TritonBackend()
    dev = torch.device(DEVICE)
    ok = Call(op="masked_sum", device=dev, dtype=torch.bfloat16, n_readers=37, n_writers=158,
              n_elements=1000, grad_dtype=torch.float32)
    assert b.reasons(ok) == []
    assert b.reasons(Call(op="masked_sum", device=dev, dtype=torch.float64))
    assert b.reasons(Call(op="masked_sum", device=dev, dtype=torch.bfloat16,
                          grad_dtype=torch.float16))
    assert b.reasons(Call(op="hard_concrete", device=dev, dtype=torch.bfloat16))
    assert b.reasons(Call(op="sample_masks", device=dev, dtype=torch.float32)) == []
    assert b.reasons(Call(op="masked_sum", device=torch.device("meta"), dtype=torch.float32))


def test_backend_runs_a_call():
    from fastedge.backends.triton_backend import TritonBackend
    b = TritonBackend()
    x, m, base, index = _fwd_inputs((9, 7, 5, 33, "indexed"), torch.float32, seed=3)
    out = torch.full((5, 33), float("nan"), device=DEVICE)
    b.masked_sum_forward(x, m, base, index, out)
    want = torch.empty(5, 33, dtype=torch.float64)
    ref.masked_sum_forward(x.double().cpu(), m.double().cpu(), base.double().cpu(), index.cpu(),
                           want)
    assert (out.double().cpu() - want).abs().max() < 1e-5


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the tests above run this path already")
@pytest.mark.parametrize("case", [(170, 158, 37, 77), (40, 33, 150, 77)], ids=bwd_id)
def test_tensor_core_path_fp16_interpreted(case, monkeypatch):
    """The dot code the GPU runs (hi/lo mask split in the storage dtype, dots
    of storage-dtype tiles) is the interpreter's DOT_IN_FP32 branch only for
    bf16, whose interpreted dots are wrong; fp16 dots are right in the
    interpreter, so run the GPU branch there."""
    monkeypatch.setattr(kms, "_interpreted", lambda kernel: False)
    W_total, W, R, N = case
    test_masked_sum_forward((W_total, W, R, N, "indexed"), torch.float16)
    test_masked_sum_backward_stack(case, torch.float16, "fp32")
    test_masked_sum_backward_stack(case, torch.float16, "same")
    test_masked_sum_backward_mask(case, torch.float16)
