"""Element offsets past 2**31 in the Triton kernels (run under the interpreter).

* The masked sum on a stack whose rows lie 2**30 or 2**31 elements apart (a
  view over a sparse memory-mapped file, tests/huge_stride.py): forward,
  backward into the stack and into the mask, against float64 within the
  bounds of tests/tolerances.py. tests/test_cuda_compile.py runs the same
  views through the CUDA kernels under CPU emulation.
* The mask backward's slice bounds (`start`, `end`) are 64-bit: a slice that
  begins past 2**31 is empty, not wrapped to a negative column.
* The elementwise hard-concrete kernels index past 2**31 elements.
* The fused sampler refuses 2**31 masks or more with a clear error (its
  Philox counters and mask indices are 32-bit by design).

The interpreter runs every program of a grid, one after another, so the
cases that need a program id past 2**21 launch two programs and shift their
ids (`program_ids_from`); the kernels cannot tell the difference.
"""
from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, HAS_TRITON
from fastedge.backends import get_backend
from huge_stride import last_offset, sparse_tensor, strided_rows
from tolerances import assert_within, claim, sum_bound

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable"),
              pytest.mark.skipif(HAS_CUDA, reason="interpreter-only: the CPU tensors are sparse files")]

DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
W, N = 3, 300
STRIDES = [2 ** 30 + 5, 2 ** 31 + 64]  # a misaligned stride that fits int32, and one that does not


@pytest.fixture
def sparse_dir(tmp_path):
    """A folder for sparse files, emptied after the test (pytest keeps old tmp folders)."""
    yield tmp_path
    for f in tmp_path.iterdir():
        f.unlink()


@pytest.mark.parametrize("row_stride", STRIDES, ids=lambda s: f"stride{s}")
@pytest.mark.parametrize("R", [3, 17], ids=lambda r: f"R{r}")  # vector path, tl.dot path
@pytest.mark.parametrize("dtype", list(DT_ID), ids=lambda d: DT_ID[d])
def test_masked_sum_past_2_31_elements(dtype, R, row_stride, sparse_dir):
    g = torch.Generator().manual_seed(R + row_stride % 97)
    x = strided_rows(sparse_dir / "stack", W, N, row_stride, dtype, torch.randn(W, N, generator=g))
    assert last_offset(x) > 2 ** 31
    m = torch.rand(R, W, generator=g)
    dout = torch.randn(R, N, generator=g).to(dtype)
    impl = get_backend("triton")
    x64, m64, d64 = x.double(), m.double(), dout.double()

    out = torch.full((R, N), float("nan"), dtype=dtype)
    impl.masked_sum_forward(x, m, None, None, out)
    ref = m64 @ x64
    assert_within(out, ref, sum_bound(m64, x64, None, claim("triton", "cpu", dtype, "forward"), ref),
                  f"forward {DT_ID[dtype]}, rows {row_stride} apart")

    dx0 = torch.randn(W, N, generator=g)
    dx = strided_rows(sparse_dir / "grad", W, N, row_stride, dtype, dx0)
    dx0_64 = dx.double()
    impl.masked_sum_backward_stack(m, dout, dx)
    ref = dx0_64 + m64.t() @ d64
    assert_within(dx, ref, sum_bound(m64.t(), d64, dx0_64, claim("triton", "cpu", dtype, "d_stack"), ref),
                  f"d stack {DT_ID[dtype]}, rows {row_stride} apart")

    dm = impl.masked_sum_backward_mask(x, dout)
    ref = d64 @ x64.t()
    assert_within(dm, ref, sum_bound(d64, x64.t(), None, claim("triton", "cpu", dtype, "d_mask"), ref),
                  f"d mask {DT_ID[dtype]}, rows {row_stride} apart")


def test_mask_backward_slice_past_2_31_is_empty():
    """Slices of 2**31 - BLOCK_K columns: the third starts at 2**32 - 2 BLOCK_K,
    past N, and must add nothing. In 32 bits its start wrapped to -2 BLOCK_K
    and it summed the whole row again, from before its start (here: a padding
    of random values, so the error shows)."""
    ms = importlib.import_module("fastedge.kernels.masked_sum")
    R, Wm, Nm, pad = 2, 3, 200, 256
    cfg = ms.backward_mask_config(R, Wm, Nm, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(pad + Wm * Nm, generator=g)[pad:].view(Wm, Nm)
    dout = torch.randn(pad + R * Nm, generator=g)[pad:].view(R, Nm)
    slices, slice_len = 3, 2 ** 31 - cfg["BLOCK_K"]
    part = torch.full((slices, R, Wm), float("nan"))
    assert R <= cfg["BLOCK_R"] and Wm <= cfg["BLOCK_W"]  # one tile: one program per slice
    ms._masked_sum_bwd_mask_kernel[(slices,)](
        x, dout, part, part, part, R, Wm, Nm, Nm, slice_len, HAS_COLS=False, FAST=False, DOT_IN_FP32=True,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], BLOCK_K=cfg["BLOCK_K"])
    want = dout.double() @ x.double().t()
    assert torch.allclose(part[0].double(), want, rtol=1e-5, atol=1e-5), "the first slice holds every column"
    assert (part[1:] == 0).all(), f"slices starting past N added {part[1:].tolist()}"


@contextlib.contextmanager
def program_ids_from(first: int):
    """Under the interpreter, program ids along axis 0 start at `first` instead
    of 0 (still int32, as on a GPU): a grid of 2 runs programs first, first + 1."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_get_program_id

    def shifted(axis):
        if axis != 0:
            return original(axis)
        return interpreter.TensorHandle(np.array([builder.grid_idx[0] + first], dtype=np.int32),
                                        interpreter.tl.int32)

    builder.create_get_program_id = shifted
    try:
        yield
    finally:
        del builder.create_get_program_id  # back to the class's method


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hard_concrete_past_2_31_elements(training, sparse_dir):
    """The last programs of a 2**32 + 1500-element call: their offsets start at
    2**32, which a 32-bit `program_id * BLOCK` wraps to 0."""
    hc = importlib.import_module("fastedge.kernels.hard_concrete")
    from fastedge.kernels import reference as ref

    block = hc.elementwise_config(0)["BLOCK"]
    n = 2 ** 32 + 1500
    first = 2 ** 32 // block
    tail = slice(first * block, n)
    g = torch.Generator().manual_seed(1)
    files = {}
    for name in ("la", "u", "dz", "z", "dla"):
        files[name] = sparse_tensor(sparse_dir / name, n, torch.float32)
    k = n - first * block
    files["la"][tail] = torch.randn(k, generator=g) * 3
    files["u"][tail] = ref.clamp_noise(torch.rand(k, generator=g))
    files["dz"][tail] = torch.randn(k, generator=g)
    files["z"][tail] = float("nan")
    files["dla"][tail] = float("nan")
    la, u, dz, z, dla = (files[k_] for k_ in ("la", "u", "dz", "z", "dla"))
    with program_ids_from(first):
        hc._hard_concrete_fwd_kernel[(2,)](la, u, z, n, TRAINING=training, BLOCK=block)
        hc._hard_concrete_bwd_kernel[(2,)](la, u, dz, dla, n, TRAINING=training, BLOCK=block)
    noise = u[tail] if training else None
    want_z = ref.hard_concrete_forward(la[tail], noise, training)
    want_dla = ref.hard_concrete_backward(la[tail], noise, training, dz[tail])
    assert torch.allclose(z[tail], want_z, atol=2e-6, rtol=0), "z past 2**32"
    assert torch.allclose(dla[tail], want_dla, atol=2e-6, rtol=2e-5), "d log_alpha past 2**32"
    assert (z[:2 * block] == 0).all() and (dla[:2 * block] == 0).all(), "wrote at wrapped offsets"


def test_sampler_refuses_2_31_masks(sparse_dir):
    hc = importlib.import_module("fastedge.kernels.hard_concrete")
    R, Wn = 2 ** 16, 2 ** 15
    edge = sparse_tensor(sparse_dir / "edge", R * Wn, torch.float32).view(R, Wn)
    with pytest.raises(ValueError, match=r"more than 2\*\*31"):
        hc.sample_masks(edge, None, 0, 0, True)
    with pytest.raises(ValueError, match=r"more than 2\*\*31"):
        hc.sample_masks_backward(edge, None, 0, 0, True, edge, torch.zeros(()))
