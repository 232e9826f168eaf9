"""The fused form: masks sampled from a seed inside the masked writer sum.

The reference reproduces it from the noise alone: a float64 computation here
takes the Philox noise of `fastedge.ops.edge_noise` / `node_noise`, applies
the hard-concrete formulas and sums with one einsum per reader; forward, the
edge-mask sum and every gradient must match it."""
import math

import pytest
import torch

import fastedge
from conftest import backend_targets
from tolerances import assert_matches_reference
from test_hard_concrete import hc64

DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (W_total, W, R, T, use node masks, base form)
CASES = [
    (1, 1, 1, (5,), False, "none"),
    (9, 7, 37, (3, 11), True, "indexed"),
    (30, 19, 16, (101,), True, "shared"),
    (12, 12, 3, (1000,), False, "shared"),
]


def case_id(c):
    return f"W{c[1]}of{c[0]}-R{c[2]}-T{'x'.join(map(str, c[3]))}-{'node' if c[4] else 'edge'}-{c[5]}"


def inputs(case, dtype, device, seed):
    W_total, W, R, T, use_node, base_form = case
    g = torch.Generator().manual_seed(seed)
    stack = torch.randn((W_total,) + T, generator=g).to(dtype)
    # log_alphas spread so that masks land at 0, at 1 and in between
    edge = torch.randn(R, W, generator=g) * 2 + 0.5
    edge[0, 0] = -math.inf  # a structural zero
    node = torch.randn(W, generator=g) * 2 + 1 if use_node else None
    base = base_index = None
    if base_form == "shared":
        base = torch.randn(T, generator=g).to(dtype)
    elif base_form == "indexed":
        base = torch.randn((2,) + T, generator=g).to(dtype)
        base_index = torch.randint(0, 2, (R,), generator=g)
    return stack, edge, node, base, base_index


def reference64(stack, edge, node, base, base_index, seed, offset, training):
    """Differentiable float64 forward from the noise; returns (out, edge_sum, leaves)."""
    R, W = edge.shape
    x = stack.double()[:W].clone().requires_grad_(True)
    e = edge.double().clone().requires_grad_(True)
    u_e = fastedge.ops.edge_noise(seed, R, W, offset, "cpu").double()
    z = hc64(e, u_e, training)
    m = z
    n = None
    if node is not None:
        n = node.double().clone().requires_grad_(True)
        s = hc64(n, fastedge.ops.node_noise(seed, W, "cpu").double(), training)
        m = z * s[None, :]
    b = None if base is None else base.double().clone().requires_grad_(True)
    rows = []
    for r in range(R):
        acc = torch.einsum("w,w...->...", m[r], x)
        if b is not None:
            acc = acc + (b if base_index is None else b[int(base_index[r])])
        rows.append(acc)
    # -inf log_alpha: z is exactly 0, and the float64 graph's gradient there is 0 too
    return torch.stack(rows), z.sum(), (x, e, n, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("target", backend_targets())
def test_fused_forward_and_gradients(target, dtype, case, training, poison_fresh_memory):
    backend, device = target
    seed, offset = 991 + case[2], 17
    stack, edge, node, base, base_index = inputs(case, dtype, device, seed)
    out64, sum64, (x64, e64, n64, b64) = reference64(stack, edge, node, base, base_index, seed,
                                                     offset, training)
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(out64.shape, generator=g).to(dtype)
    dsum = 0.37
    torch.autograd.backward([out64, sum64], [dout.double(), torch.tensor(dsum, dtype=torch.float64)])

    st = stack.to(device).requires_grad_(True)
    ed = edge.to(device).requires_grad_(True)
    nd = None if node is None else node.to(device).requires_grad_(True)
    bs = None if base is None else base.to(device).requires_grad_(True)
    bi = None if base_index is None else base_index.to(device)
    out, edge_sum = fastedge.sampled_masked_writer_sum(st, ed, nd, bs, bi, seed=seed,
                                                       reader_offset=offset, training=training,
                                                       backend=backend)
    assert out.dtype == dtype and edge_sum.dtype == torch.float32
    # yardstick for the storage dtype: the float64 masks applied in the storage dtype
    R, W = edge.shape
    with torch.no_grad():
        m32 = _masks64(edge, node, seed, offset, training).to(dtype)
        plain = torch.einsum("rw,w...->r...", m32, stack[:W])
        if base is not None:
            plain = plain + (base if base_index is None else base[base_index])
    assert_matches_reference(out.detach().cpu(), out64.detach(), plain.to(dtype), dtype,
                             f"{backend} fused forward")
    assert abs(edge_sum.item() - sum64.item()) <= 1e-5 * max(1.0, abs(sum64.item()))

    torch.autograd.backward([out, edge_sum], [dout.to(device), torch.tensor(dsum, device=device)])
    for name, got, want in (("edge", ed.grad, e64.grad), ("node", None if nd is None else nd.grad,
                                                            None if n64 is None else n64.grad)):
        if want is None:
            continue
        assert torch.isfinite(got).all(), f"{name} log_alpha gradient is not finite"
        err = (got.double().cpu() - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        # gradients reduce over N in fp32 from storage-dtype inputs: rtol by dtype
        tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
        assert err <= tol * scale, f"d {name} log_alpha: error {err:.3g} > {tol * scale:.3g}"
    assert ed.grad[0, 0] == 0
    dx_ref = x64.grad.reshape(W, -1)
    got = st.grad.cpu()[:W].reshape(W, -1)
    plain_dx = (m32.t() @ dout.reshape(R, -1)).to(dtype)
    assert_matches_reference(got, dx_ref, plain_dx, dtype, f"{backend} fused d stack")
    assert (st.grad.cpu()[W:] == 0).all()
    if bs is not None:
        assert (bs.grad.double().cpu() - b64.grad).abs().max() <= 1e-2 * max(1, b64.grad.abs().max().item()) \
            if dtype != torch.float32 else torch.allclose(bs.grad.double().cpu(), b64.grad, atol=1e-5)


def _masks64(edge, node, seed, offset, training):
    R, W = edge.shape
    z = hc64(edge.double(), fastedge.ops.edge_noise(seed, R, W, offset, "cpu").double(), training)
    if node is not None:
        z = z * hc64(node.double(), fastedge.ops.node_noise(seed, W, "cpu").double(), training)[None, :]
    return z


@pytest.mark.parametrize("target", backend_targets())
def test_fused_equals_materialised_masks(target):
    """`sample_masks` gives the masks the fused op uses: the unfused op on them
    gives the same output."""
    backend, device = target
    stack, edge, node, _, _ = inputs(CASES[1], torch.float32, device, 5)
    stack, edge, node = stack.to(device), edge.to(device), node.to(device)
    out, s = fastedge.sampled_masked_writer_sum(stack, edge, node, seed=8, reader_offset=2, backend=backend)
    m, s2 = fastedge.ops.sample_masks(edge, node, seed=8, reader_offset=2, backend=backend)
    assert torch.equal(s, s2)
    assert torch.allclose(out, fastedge.masked_writer_sum(stack, m, backend=backend), atol=1e-6)


def test_node_mask_shared_across_layers():
    """A writer's node mask depends only on (seed, writer): two calls with
    different reader offsets see the same node masks."""
    edge = torch.full((2, 6), 20.0)  # edge masks all 1
    node = torch.randn(6, generator=torch.Generator().manual_seed(1))
    m1, _ = fastedge.ops.sample_masks(edge, node, seed=3, reader_offset=0)
    m2, _ = fastedge.ops.sample_masks(edge, node, seed=3, reader_offset=100)
    assert torch.equal(m1[0], m2[0]) and torch.equal(m1[0], m1[1])
