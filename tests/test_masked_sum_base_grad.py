"""The base's gradient of the masked sum (`_base_grad`): the sum of dout over
each base row's readers, accumulated in fp32 and rounded once, without an
fp32 copy of the whole output gradient."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastedge import ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23,
       torch.float64: 2.0 ** -52}


def _case(dtype, indexed, seed):
    g = torch.Generator().manual_seed(seed)
    W, R, T = 5, 13, (3, 7)   # 13 readers, odd trailing shape
    stack = torch.randn((W,) + T, generator=g).to(dtype)
    mask = torch.rand(R, W, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if indexed:
        G = 4
        base = torch.randn((G,) + T, generator=g).to(dtype)
        index = torch.randint(0, G, (R,), generator=g)
        index[:G] = torch.arange(G)  # every base row read
    else:
        base, index = torch.randn(T, generator=g).to(dtype), None
    dout = (torch.randn((R,) + T, generator=g) * 3).to(dtype)
    return stack, mask, base.requires_grad_(True), index, dout


def _bound(dout, index, n_rows, dtype):
    """Elementwise bound: one rounding to `dtype` of the exact sum, plus fp32
    accumulation over the readers (relative to the sum of |terms|)."""
    d = dout.double().reshape(dout.shape[0], -1)
    one_hot = (torch.ones(1, d.shape[0], dtype=torch.float64) if index is None else
               torch.nn.functional.one_hot(index, n_rows).t().double())
    exact, abs_sum = one_hot @ d, one_hot @ d.abs()
    acc = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -24
    return exact, ULP[dtype] / 2 * exact.abs() + d.shape[0] * acc * abs_sum


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("indexed", [False, True], ids=["shared-base", "indexed-base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_base_gradient_is_the_fp32_sum_over_its_readers_rounded_once(dtype, indexed, backend):
    for seed in range(3):
        stack, mask, base, index, dout = _case(dtype, indexed, seed)
        out = ops.masked_writer_sum(stack, mask, base, index, backend=backend)
        dbase, = torch.autograd.grad(out, base, dout)
        assert dbase.dtype == dtype and dbase.shape == base.shape
        n_rows = base.shape[0] if indexed else 1
        exact, bound = _bound(dout, index, n_rows, dtype)
        err = (dbase.double().reshape(n_rows, -1) - exact).abs()
        assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound[err == err.max()].min():.3g}"


class _Outputs(TorchDispatchMode):
    """(op, dtype, numel) of every op output."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.seen.append((func.name(), t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("fused", [False, True], ids=["masked", "sampled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_base_gradient_makes_no_fp32_copy_of_the_output_gradient(dtype, fused):
    stack, mask, base, _, dout = _case(dtype, False, seed=7)
    if fused:
        out, _ = ops.sampled_masked_writer_sum(stack, mask.log(), None, base, seed=3, backend="torch")
    else:
        out = ops.masked_writer_sum(stack, mask, base, backend="torch")
    with _Outputs() as outputs:
        dbase, = torch.autograd.grad(out, base, dout)
    full_fp32 = [s for s in outputs.seen if s[1] == torch.float32 and s[2] >= dout.numel()]
    assert not full_fp32, f"an fp32 tensor of the output gradient's size was made: {full_fp32}"
    assert torch.isfinite(dbase).all()
