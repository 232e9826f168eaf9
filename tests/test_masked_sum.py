"""Masked writer sum: every backend against a float64 reference written here.

Each backend runs on fresh random inputs with outputs poisoned by NaN, over
awkward shapes (W = 1, R = 1, R = 37, primes, trailing sizes that are no
multiple of any block, a prefix of a larger stack) and each form of base.
Every result is held, element by element, to the bound its backend claims
(tests/tolerances.py: fp32 accumulation plus the mask's stated precision).
"""
import zlib

import pytest
import torch

import fastedge
from fastedge import ops
from fastedge.backends import get_backend
from conftest import backend_targets
from tolerances import assert_within, claim, sum_bound

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# (W_total, W, R, T, base form)
CASES = [
    (1, 1, 1, (7,), "none"),
    (6, 1, 3, (5, 3), "shared"),
    (5, 3, 1, (1000,), "indexed"),
    (13, 13, 37, (97,), "indexed"),
    (41, 17, 16, (2, 3, 11), "shared"),
    (29, 23, 5, (1, 131), "none"),
    (40, 31, 17, (130,), "indexed"),
    (158, 158, 37, (2, 3), "shared"),
]


def case_id(case):
    W_total, W, R, T, base = case
    prefix = f"W{W}of{W_total}" if W != W_total else f"W{W}"
    return f"{prefix}-R{R}-T{'x'.join(map(str, T))}-{base}"


def make_inputs(case, dtype, device, seed, requires_grad=False):
    W_total, W, R, T, base_form = case
    g = torch.Generator().manual_seed(seed)
    stack = torch.randn((W_total,) + T, generator=g).to(dtype).to(device)
    mask = torch.rand((R, W), generator=g, dtype=torch.float64)
    mask[mask < 0.2] = 0.0  # structural zeros are allowed
    mask = mask.to(torch.float64 if dtype == torch.float64 else torch.float32).to(device)
    base = base_index = None
    if base_form == "shared":
        base = torch.randn(T, generator=g).to(dtype).to(device)
    elif base_form == "indexed":
        G = 3
        base = torch.randn((G,) + T, generator=g).to(dtype).to(device)
        base_index = torch.randint(0, G, (R,), generator=g).to(device)
    if requires_grad:
        stack.requires_grad_(True)
        mask.requires_grad_(True)
        if base is not None:
            base.requires_grad_(True)
    return stack, mask, base, base_index


def reference64(stack, mask, base, base_index):
    """float64 out[r] = base[g(r)] + sum_w mask[r, w] stack[w], one einsum per reader."""
    W = mask.shape[1]
    x = stack.detach()[:W].double().cpu()
    m = mask.detach().double().cpu()
    rows = []
    for r in range(m.shape[0]):
        acc = torch.einsum("w,w...->...", m[r], x)
        if base is not None:
            b = base.detach().double().cpu()
            acc = acc + (b if base_index is None else b[int(base_index[r])])
        rows.append(acc)
    return torch.stack(rows)


def base_rows64(base, base_index, R):
    """The base row of each reader, [R, N] float64 (None without base)."""
    if base is None:
        return None
    b = base.detach().double().cpu().reshape(base.shape[0] if base_index is not None else 1, -1)
    return b[base_index.cpu()] if base_index is not None else b.expand(R, -1)


def forward_bound(backend, device, dtype, stack, mask, base, base_index, ref, precision="full"):
    """The claimed bound of the forward, per element of ref [R, N]."""
    W, R = mask.shape[1], mask.shape[0]
    x = stack.detach()[:W].reshape(W, -1)
    return sum_bound(mask.detach(), x, base_rows64(base, base_index, R),
                     claim(backend, device, dtype, "forward", precision=precision), ref)


def _skip_unsupported(backend, dtype):
    if dtype == torch.float64 and backend not in ("reference", "torch"):
        pytest.skip(f"{backend} does not take float64")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("target", backend_targets())
def test_forward_backend(target, dtype, case, poison_fresh_memory):
    backend, device = target
    _skip_unsupported(backend, dtype)
    stack, mask, base, base_index = make_inputs(case, dtype, device, seed=zlib.crc32(case_id(case).encode()))
    W, R = mask.shape[1], mask.shape[0]
    x = stack[:W].reshape(W, -1)  # a prefix view with the larger stack's row stride
    out = torch.full((R, x.shape[1]), float("nan"), dtype=dtype, device=device)
    base2d = None if base is None else base.reshape(-1, x.shape[1])
    get_backend(backend).masked_sum_forward(x, mask, base2d, base_index, out)
    ref = reference64(stack, mask, base, base_index).reshape(R, -1)
    assert_within(out, ref, forward_bound(backend, device, dtype, stack, mask, base, base_index, ref),
                  f"{backend} forward {DT_ID[dtype]}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("target", backend_targets())
def test_gradients_through_op(target, dtype, case, poison_fresh_memory):
    """Forward and every gradient through the registered op and autograd."""
    backend, device = target
    _skip_unsupported(backend, dtype)
    stack, mask, base, base_index = make_inputs(case, dtype, device, seed=7 + zlib.crc32(case_id(case).encode()),
                                                requires_grad=True)
    out = fastedge.masked_writer_sum(stack, mask, base, base_index, backend=backend)
    W, R = mask.shape[1], mask.shape[0]
    ref = reference64(stack, mask, base, base_index).reshape(R, -1)
    assert_within(out.reshape(R, -1), ref,
                  forward_bound(backend, device, dtype, stack, mask, base, base_index, ref),
                  f"{backend} op forward {DT_ID[dtype]}")

    g = torch.Generator().manual_seed(11)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(dout.to(device))
    d64 = dout.double()
    x64 = stack.detach()[:W].double().cpu().reshape(W, -1)
    m64 = mask.detach().double().cpu()
    d2 = d64.reshape(R, -1)

    # stack: mask^T dout on the prefix (one rounding to the stack dtype), exactly zero beyond it
    W_total = stack.shape[0]
    dstack_ref = torch.zeros(W_total, d2.shape[1], dtype=torch.float64)
    dstack_ref[:W] = m64.t() @ d2
    dstack_bound = torch.zeros_like(dstack_ref)
    dstack_bound[:W] = sum_bound(m64.t(), d2, None, claim(backend, device, dtype, "d_stack"),
                                 dstack_ref[:W])
    assert_within(stack.grad.reshape(W_total, -1), dstack_ref, dstack_bound,
                  f"{backend} d stack {DT_ID[dtype]}")

    # mask: dout x^T of storage-dtype values, reduced in fp32
    dmask_ref = d2 @ x64.t()
    assert mask.grad.dtype == mask.dtype
    assert_within(mask.grad, dmask_ref,
                  sum_bound(d2, x64.t(), None, claim(backend, device, dtype, "d_mask"), dmask_ref),
                  f"{backend} d mask {DT_ID[dtype]}")

    if base is not None:
        # plain PyTorch on every backend (fastedge.ops.masked_sum._base_grad): a sum
        # over each base row's readers in fp32, rounded once to the base dtype
        G = 1 if base_index is None else base.shape[0]
        gi = torch.zeros(R, dtype=torch.int64) if base_index is None else base_index.cpu()
        readers_of = torch.nn.functional.one_hot(gi, G).t().double()  # [G, R], exact
        dbase_ref = readers_of @ d2
        dbase_bound = sum_bound(readers_of, d2, None, claim("torch", device, dtype, "forward"),
                                dbase_ref)
        assert_within(base.grad.reshape(G, -1), dbase_ref, dbase_bound,
                      f"{backend} d base {DT_ID[dtype]}")


@pytest.mark.parametrize("stack_in_autograd", [True, False], ids=["stack-requires-grad", "plain-stack"])
@pytest.mark.parametrize("grad_dtype", ["fp32", "storage"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("target", backend_targets())
def test_gradient_accumulates_into_caller_buffer(target, dtype, grad_dtype, stack_in_autograd):
    """Two calls (two 'layers') reading different prefixes accumulate their
    stack gradients into one caller-owned buffer; the stack gets none. The
    buffer fills even when the stack itself is outside autograd (a model's
    preallocated stack)."""
    backend, device = target
    g = torch.Generator().manual_seed(3)
    W_total, T = 23, (3, 37)
    stack = torch.randn((W_total,) + T, generator=g).to(dtype).to(device).requires_grad_(stack_in_autograd)
    buf_dtype = torch.float32 if grad_dtype == "fp32" else dtype
    initial = torch.randn((W_total + 2,) + T, generator=g).to(buf_dtype)
    buf = initial.clone().to(device)
    m1 = torch.rand(19, 9, generator=g).to(device).requires_grad_(True)
    m2 = torch.rand(1, 21, generator=g).to(device).requires_grad_(True)
    out1 = fastedge.masked_writer_sum(stack, m1, grad_stack=buf, backend=backend)
    out2 = fastedge.masked_writer_sum(stack, m2, grad_stack=buf, backend=backend)
    d1 = torch.randn(out1.shape, generator=g).to(dtype)
    d2 = torch.randn(out2.shape, generator=g).to(dtype)
    torch.autograd.backward([out1, out2], [d1.to(device), d2.to(device)])
    assert stack.grad is None
    assert m1.grad is not None and m2.grad is not None
    # Two read-modify-writes, each rounded once to the buffer's dtype; the
    # second call's addend is the first call's result, error included.
    # Autograd picks the order of the two calls, so both orders are bounded.
    c = claim(backend, device, dtype, "d_stack", result_dtype=buf_dtype)
    calls = [(9, m1.detach().double().cpu().t(), d1.double().reshape(19, -1)),
             (21, m2.detach().double().cpu().t(), d2.double().reshape(1, -1))]
    start = initial.double().reshape(W_total + 2, -1)

    def bound_in_order(order):
        value, bound = start.clone(), torch.zeros_like(start)
        for rows, p, q in order:
            addend = value[:rows].abs() + bound[:rows]
            value[:rows] += p @ q
            bound[:rows] += sum_bound(p, q, addend, c, value[:rows])
        return value, bound

    ref, bound12 = bound_in_order(calls)
    _, bound21 = bound_in_order(calls[::-1])
    assert_within(buf.reshape(W_total + 2, -1), ref, torch.maximum(bound12, bound21),
                  f"{backend} accumulated stack gradient {DT_ID[dtype]} into {DT_ID[buf_dtype]}")
    assert torch.equal(buf[21:].cpu(), initial[21:]), "rows beyond every prefix were touched"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("target", backend_targets())
def test_mask_gradient_is_deterministic(target, dtype):
    backend, device = target
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 3000, generator=g).to(dtype).to(device)
    dout = torch.randn(21, 3000, generator=g).to(dtype).to(device)
    impl = get_backend(backend)
    first = impl.masked_sum_backward_mask(x, dout)
    for _ in range(2):
        assert torch.equal(impl.masked_sum_backward_mask(x, dout), first)


@pytest.mark.parametrize("target", backend_targets())
def test_non_contiguous_trailing_shape(target):
    """A stack whose trailing dimensions are transposed is still summed correctly."""
    backend, device = target
    g = torch.Generator().manual_seed(9)
    full = torch.randn(8, 11, 6, generator=g).to(device)
    stack = full.transpose(1, 2)  # [8, 6, 11], not contiguous
    mask = torch.rand(4, 5, generator=g).to(device)
    out = fastedge.masked_writer_sum(stack, mask, backend=backend)
    ref = torch.einsum("rw,w...->r...", mask.double().cpu(), stack[:5].double().cpu())
    assert torch.allclose(out.double().cpu(), ref, atol=1e-5)


def test_prefix_is_a_view_not_a_copy():
    """Readers take the stack prefix as a view: a larger stack is not copied."""
    from fastedge.ops._dispatch import flat_rows
    stack = torch.randn(100, 4, 8)
    prefix = flat_rows(stack[:30])
    assert prefix.data_ptr() == stack.data_ptr() and prefix.stride() == (32, 1)


@pytest.mark.parametrize("fused", [False, True], ids=["masked", "sampled"])
def test_grad_stack_kept_with_retain_graph_and_released_without(fused):
    """With a caller-owned buffer the op drops its references to the stack and
    the buffer after a backward (a finished micro-batch's graph must not hold
    them), except under retain_graph=True, where a second backward accumulates
    the same gradient again, as autograd's own saved tensors allow."""
    g = torch.Generator().manual_seed(7)
    stack = torch.randn(6, 3, 5, generator=g)
    buf = torch.zeros_like(stack)
    la = torch.randn(4, 5, generator=g).requires_grad_(True)
    if fused:
        out, _ = ops.sampled_masked_writer_sum(stack, la, seed=3, grad_stack=buf)
    else:
        out = ops.masked_writer_sum(stack, torch.sigmoid(la), grad_stack=buf)
    dout = torch.randn(out.shape, generator=g)
    (d1,) = torch.autograd.grad(out, [la], dout, retain_graph=True)
    first = buf.clone()
    assert first.abs().sum() > 0
    (d2,) = torch.autograd.grad(out, [la], dout, retain_graph=True)
    torch.testing.assert_close(d2, d1)
    torch.testing.assert_close(buf, 2 * first)
    torch.autograd.grad(out, [la], dout)  # released now
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, [la], dout)


# the dot path with the stack backward by writer tiles (37 readers) and by columns (16)
FAST_CASES = [c for c in CASES if c[2] in (37, 16)][:2]


@pytest.mark.parametrize("case", FAST_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("target", backend_targets())
def test_precision_fast_within_its_claim(target, dtype, case, poison_fresh_memory):
    """precision="fast": forward, stack and mask gradients within the
    one-product claim (the mask, and for fp32 both operands, rounded once);
    backends without a one-product path stay within it by computing in full."""
    backend, device = target
    stack, mask, base, base_index = make_inputs(case, dtype, device, seed=3 + zlib.crc32(case_id(case).encode()),
                                                requires_grad=True)
    out = fastedge.masked_writer_sum(stack, mask, base, base_index, backend=backend, precision="fast")
    W, R = mask.shape[1], mask.shape[0]
    ref = reference64(stack, mask, base, base_index).reshape(R, -1)
    assert_within(out.reshape(R, -1), ref,
                  forward_bound(backend, device, dtype, stack, mask, base, base_index, ref, "fast"),
                  f"{backend} fast forward {DT_ID[dtype]}")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out.backward(dout.to(device))
    d2 = dout.double().reshape(R, -1)
    x64 = stack.detach()[:W].double().cpu().reshape(W, -1)
    m64 = mask.detach().double().cpu()
    dstack_ref = m64.t() @ d2
    assert_within(stack.grad[:W].reshape(W, -1), dstack_ref,
                  sum_bound(m64.t(), d2, None, claim(backend, device, dtype, "d_stack", precision="fast"),
                            dstack_ref), f"{backend} fast d stack {DT_ID[dtype]}")
    dmask_ref = d2 @ x64.t()
    assert_within(mask.grad, dmask_ref,
                  sum_bound(d2, x64.t(), None, claim(backend, device, dtype, "d_mask", precision="fast"),
                            dmask_ref), f"{backend} fast d mask {DT_ID[dtype]}")
