"""The Triton masked sum reads only live writers, and its mask halves.

* Live-column skipping (`kernels/masked_sum.py`, `live_columns`): a writer
  whose mask is 0 for every reader of a call is not read by the forward and
  its gradient rows are not touched by the stack backward. The result equals
  the dense path up to fp32 accumulation order (the live products are grouped
  in other chunks), bit for bit when every writer is live, and a dead
  writer's rows are provably skipped: filled with NaN, they still give a
  finite, correct result.
* The split mask: a tile whose mask is exact in the product dtype (0s and 1s)
  has no lo half, and its flag is 0; any fractional entry sets it.
* ``precision="fast"``: one product, the mask rounded once to the product
  dtype; error within that claim, and above the full path's (so the option
  really changes the arithmetic).

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), or on a GPU.
"""
import pytest
import torch

pytest.importorskip("triton")

import fastedge  # noqa: E402
from fastedge.kernels import masked_sum as kms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (R, W, N): the dot path (R >= 16; the stack backward by writer tiles at 37
# readers, by columns at 16 and 25) and the vector path (R < 16)
SHAPES = [(37, 70, 300), (3, 45, 257), (16, 33, 130), (25, 50, 130)]


def _sparse_mask(R, W, g, dead_frac=0.6):
    m = torch.rand(R, W, generator=g)
    m[m < 0.3] = 0.0
    dead = torch.rand(W, generator=g) < dead_frac
    dead[0] = False  # at least one live writer
    m[:, dead] = 0.0
    return m, dead


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-W{}-N{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
def test_dead_writers_are_not_read(dtype, shape):
    R, W, N = shape
    g = torch.Generator().manual_seed(R * 1000 + W)
    m, dead = _sparse_mask(R, W, g)
    x = torch.randn(W, N, generator=g).to(dtype)
    dense = kms.masked_sum_fwd(x.to(DEVICE), m.to(DEVICE), skip_dead=False)
    poisoned = x.clone()
    poisoned[dead] = float("nan")  # read, these would make every output NaN
    out = torch.full((R, N), float("nan"), dtype=dtype, device=DEVICE)
    kms.masked_sum_fwd(poisoned.to(DEVICE), m.to(DEVICE), out=out)
    assert torch.isfinite(out).all()
    terms = m.double().abs() @ x.double().abs()
    _assert_regrouped(out, dense, terms, W)
    all_live = torch.rand(R, W, generator=g) + 0.1
    assert torch.equal(kms.masked_sum_fwd(x.to(DEVICE), all_live.to(DEVICE)),
                       kms.masked_sum_fwd(x.to(DEVICE), all_live.to(DEVICE), skip_dead=False))

    dout = torch.randn(R, N, generator=g).to(dtype).to(DEVICE)
    start = torch.randn(W, N, generator=g)
    dx_dense = start.clone().to(DEVICE)
    kms.masked_sum_bwd_stack(m.to(DEVICE), dout, dx_dense, skip_dead=False)
    dx = start.clone()
    dx[dead] = float("nan")  # rows of dead writers must be left as they are
    dx = dx.to(DEVICE)
    kms.masked_sum_bwd_stack(m.to(DEVICE), dout, dx)
    assert torch.isnan(dx[dead.to(DEVICE)]).all(), "a dead writer's gradient row was written"
    live = ~dead.to(DEVICE)
    terms = m.double().t().abs() @ dout.cpu().double().abs() + start.double().abs()
    _assert_regrouped(dx[live], dx_dense[live], terms[~dead], R)


def _assert_regrouped(got, dense, terms, k):
    """got and dense sum the same products in other groupings: they differ by
    at most fp32 accumulation error over k terms, plus one rounding of the
    result to its dtype (where the two roundings can fall apart by an ulp)."""
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
    diff = (got.cpu().double() - dense.cpu().double()).abs()
    bound = (2 * k * 2.0 ** -24) * terms + ulp[got.dtype] * dense.cpu().double().abs()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item():.3g}"


def test_live_columns_lists_live_writers_first_in_order():
    g = torch.Generator().manual_seed(4)
    m, dead = _sparse_mask(7, 50, g)
    cols, count = kms.live_columns(m)
    live = torch.nonzero(~dead).flatten()
    assert int(count) == live.numel()
    assert torch.equal(cols[: int(count)].long(), live)
    assert sorted(cols.tolist()) == list(range(50))
    all_dead = torch.zeros(3, 9)
    cols, count = kms.live_columns(all_dead)
    assert int(count) == 0
    out = kms.masked_sum_fwd(torch.randn(9, 40), all_dead, base=torch.ones(1, 40))
    assert torch.equal(out, torch.ones(3, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_ID.get)
def test_split_flags_mark_tiles_with_a_lo_half(dtype):
    R, W = 40, 100
    cfg = kms.forward_config(R, W, 64, dtype)
    binary = (torch.rand(R, W, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    _, _, flags = kms._split_mask(binary, dtype, cfg, True, None)
    assert not flags.any(), "a 0/1 mask has no lo half"
    frac = binary.clone()
    frac[5, 70] = 0.3  # not exact in any 16-bit dtype, nor in tf32
    hi, lo, flags = kms._split_mask(frac, dtype, cfg, True, None)
    n_w_tiles = -(-W // cfg["BLOCK_W"])
    hot = (5 // cfg["BLOCK_R"]) * n_w_tiles + 70 // cfg["BLOCK_W"]
    assert torch.nonzero(flags).flatten().tolist() == [hot]
    # hi + lo carries the mask to two roundings of the product dtype
    bits = {torch.float32: 11, torch.bfloat16: 8, torch.float16: 11}[dtype]
    err = (hi.double() + lo.double() - frac.double()).abs().max().item()
    assert err <= 2.0 ** (-2 * bits) * 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_fast_precision_rounds_the_mask_once(dtype):
    """Stack gradient into an fp32 buffer: no output rounding hides the
    mask's precision. Full carries ~2 roundings, fast one (and for fp32 the
    stack's tf32 rounding too)."""
    R, W, N = 37, 64, 200
    g = torch.Generator().manual_seed(8)
    m = torch.rand(R, W, generator=g)
    dout = torch.randn(R, N, generator=g).to(dtype)
    ref = m.double().t() @ dout.double()
    terms = m.double().t().abs() @ dout.double().abs()
    errs = {}
    for precision in ("full", "fast"):
        dx = torch.zeros(W, N, device=DEVICE)
        kms.masked_sum_bwd_stack(m.to(DEVICE), dout.to(DEVICE), dx, split=precision == "full")
        errs[precision] = ((dx.cpu().double() - ref).abs() / terms).max().item()
    fp32_acc = R * 2.0 ** -24
    # the mask's stated precision (fastedge.masked_writer_sum's docstring), relative per term
    fast_claim = {torch.float32: (1 + 2.0 ** -11) ** 2 - 1, torch.bfloat16: 2.0 ** -8}[dtype]
    full_claim = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -16}[dtype]
    assert errs["full"] <= full_claim + fp32_acc, errs
    assert errs["fast"] <= fast_claim + fp32_acc, errs
    assert errs["fast"] > 4 * errs["full"], errs


def test_precision_option_is_checked():
    with pytest.raises(ValueError, match="precision"):
        fastedge.masked_writer_sum(torch.randn(3, 4), torch.rand(2, 3), precision="half")


# log_alpha -200: the eval mask sigmoid(-240) is exactly 0 because exp overflows
# (numpy, in the interpreter, says so); that 0 is the point of the test
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampled_op_skips_pruned_writers_in_every_pass(backend, training):
    """The fused op with writers pruned (edge log_alphas very negative for
    every reader, or the node's): the forward, the stack gradient and the
    mask gradient skip them. Their stack rows poisoned with NaN, the outputs
    and every gradient are finite and match the reference backend on the
    clean stack, where those rows are read and multiplied by exact zeros."""
    g = torch.Generator().manual_seed(21)
    R, W, N = 18, 40, 96
    dtype = torch.float32
    edge = torch.randn(R, W, generator=g) * 2
    node = torch.randn(W, generator=g) * 2
    pruned_by_edges = torch.zeros(W, dtype=torch.bool)
    pruned_by_edges[[3, 7, 8, 30]] = True
    pruned_by_node = torch.zeros(W, dtype=torch.bool)
    pruned_by_node[[11, 12, 39]] = True
    edge[:, pruned_by_edges] = -200.0  # z = 0 for every reader, in training and eval
    node[pruned_by_node] = -200.0
    dead = pruned_by_edges | pruned_by_node
    stack = torch.randn(W, 3, N // 3, generator=g).to(dtype)
    dout = torch.randn(R, 3, N // 3, generator=g).to(dtype)

    def run(stack_rows, be):
        ela = edge.clone().requires_grad_(True)
        nla = node.clone().requires_grad_(True)
        buf = torch.zeros(W, 3, N // 3)
        out, _ = fastedge.sampled_masked_writer_sum(
            stack_rows.to(DEVICE), ela.to(DEVICE), nla.to(DEVICE), seed=5, training=training,
            grad_stack=buf.to(DEVICE), backend=be)
        d_edge, d_node = torch.autograd.grad(out, [ela, nla], dout.to(DEVICE))
        return out.cpu(), d_edge, d_node

    poisoned = stack.clone()
    poisoned[dead] = float("nan")
    got = run(poisoned, backend)
    want = run(stack, "reference" if DEVICE == "cpu" else backend)
    for name, a, b in zip(("out", "d_edge", "d_node"), got, want):
        assert torch.isfinite(a).all(), f"{name}: a pruned writer was read"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} differs")


def test_fast_mask_gradient_takes_one_tf32_product_in_fp32():
    """fp32 stacks: the mask gradient in precision "fast" is one tf32 product
    (both operands rounded to 11 bits), within that claim and visibly less
    precise than tf32x3; 16-bit stacks are exact products either way."""
    g = torch.Generator().manual_seed(12)
    R, W, N = 21, 40, 600
    x = torch.randn(W, N, generator=g)
    dout = torch.randn(R, N, generator=g)
    ref = dout.double() @ x.double().t()
    terms = dout.double().abs() @ x.double().abs().t()
    errs = {}
    for split in (True, False):
        dm = kms.masked_sum_bwd_mask(x.to(DEVICE), dout.to(DEVICE), split=split).cpu()
        errs[split] = ((dm.double() - ref).abs() / terms).max().item()
    fp32_acc = N * 2.0 ** -23
    assert errs[False] <= (1 + 2.0 ** -11) ** 2 - 1 + fp32_acc, errs
    assert errs[True] <= 2.0 ** -20 + fp32_acc, errs
    assert errs[False] > 4 * errs[True], errs
    x16, d16 = x.to(torch.bfloat16).to(DEVICE), dout.to(torch.bfloat16).to(DEVICE)
    assert torch.equal(kms.masked_sum_bwd_mask(x16, d16, split=False),
                       kms.masked_sum_bwd_mask(x16, d16, split=True))
