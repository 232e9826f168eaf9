"""The fused form: masks sampled from a seed inside the masked writer sum.

The reference reproduces it from the noise alone: a float64 computation here
takes the Philox noise of `fastedge.ops.edge_noise` / `node_noise`, applies
the hard-concrete formulas and sums with one einsum per reader; forward, the
edge-mask sum and every gradient must match it, within the bound each backend
claims (tests/tolerances.py) widened by the fp32 sampler's own error."""
import math

import pytest
import torch

import fastedge
from conftest import backend_targets
from tolerances import F32_ACC_UNIT, assert_within, claim, gamma, replace, sum_bound
from test_hard_concrete import hc64
from test_masked_sum import base_rows64

DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# What the fp32 sampler claims against float64 (measured on 2e5 draws: masks
# within 3e-7 = 2**-21.7, d log_alpha within 1.6e-6 relative plus 2.3e-7 per
# unit of dz; tests/test_hard_concrete.py holds every backend to 2e-6):
SAMPLE_ABS = 2.0 ** -20       # one hard-concrete sample
MASK_ABS = 2.0 ** -18         # m = z_edge * s_node: 2 * SAMPLE_ABS + an fp32 rounding
HC_GRAD_REL = 2.0 ** -17      # d log_alpha = g(log_alpha, u) * dz in fp32: relative part ...
HC_GRAD_ABS = 2.0 ** -20      # ... and absolute part, per unit of |dz|

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
    R, W = edge.shape
    N = stack[0].numel()
    m64 = _masks64(edge, node, seed, offset, training)
    # The kernels multiply the sampler's fp32 masks: within MASK_ABS of m64.
    m32, _ = fastedge.ops.sample_masks(ed.detach(), None if nd is None else nd.detach(), seed=seed,
                                   reader_offset=offset, training=training, backend=backend)
    assert_within(m32, m64, torch.full_like(m64, MASK_ABS), f"{backend} sampled masks")

    def with_sampling(c):
        return replace(c, mask_abs=c.mask_abs + MASK_ABS * (1 + c.mask_rel))

    xs64 = stack.double()[:W].reshape(W, N)
    fwd = with_sampling(claim(backend, device, dtype, "forward"))
    ref = out64.detach().reshape(R, N)
    assert_within(out.reshape(R, N), ref, sum_bound(m64, xs64, base_rows64(base, base_index, R), fwd, ref),
                  f"{backend} fused forward {DT_ID[dtype]}")
    assert abs(edge_sum.item() - sum64.item()) <= 1e-5 * max(1.0, abs(sum64.item()))

    torch.autograd.backward([out, edge_sum], [dout.to(device), torch.tensor(dsum, device=device)])

    # d stack: m^T dout, rounded once to the stack dtype; zero beyond the prefix
    d2 = dout.double().reshape(R, N)
    dx_ref = x64.grad.reshape(W, N)
    dstack = with_sampling(claim(backend, device, dtype, "d_stack"))
    assert_within(st.grad[:W].reshape(W, N), dx_ref, sum_bound(m64.t(), d2, None, dstack, dx_ref),
                  f"{backend} fused d stack {DT_ID[dtype]}")
    assert (st.grad.cpu()[W:] == 0).all()

    # d log_alpha = g * dz, dz = dm * s_node + dsum, with dm = dout x^T the
    # mask gradient (bounded by the d_mask claim) and g the hard-concrete
    # derivative; the sampler's fp32 arithmetic adds HC_GRAD_REL / HC_GRAD_ABS.
    dm64 = d2 @ xs64.t()
    dm_err = sum_bound(d2, xs64.t(), None, claim(backend, device, dtype, "d_mask"), dm64)
    u_e = fastedge.ops.edge_noise(seed, R, W, offset, "cpu").double()
    z64, g_edge = _value_and_derivative(edge, u_e, training)
    if node is not None:
        u_n = fastedge.ops.node_noise(seed, W, "cpu").double()
        s64, g_node = _value_and_derivative(node, u_n, training)
    else:
        s64 = torch.ones(W, dtype=torch.float64)
    dz_terms = dm64.abs() * s64 + abs(dsum)
    dz_err = dm_err * s64 + dm64.abs() * SAMPLE_ABS + 2 * F32_ACC_UNIT * dz_terms
    want = e64.grad
    bound = g_edge.abs() * dz_err + HC_GRAD_REL * want.abs() + HC_GRAD_ABS * dz_terms
    assert_within(ed.grad, want, bound, f"{backend} d edge log_alpha {DT_ID[dtype]}")
    assert ed.grad[0, 0] == 0
    if node is not None:
        # ds_node[w] = sum_r dm[r, w] z[r, w], reduced over readers in fp32
        ds_terms = (dm64.abs() * z64).sum(0)
        ds_err = (dm_err * z64 + dm64.abs() * SAMPLE_ABS).sum(0) + gamma(R, F32_ACC_UNIT) * ds_terms
        want = n64.grad
        bound = g_node.abs() * ds_err + HC_GRAD_REL * want.abs() + HC_GRAD_ABS * ds_terms
        assert_within(nd.grad, want, bound, f"{backend} d node log_alpha {DT_ID[dtype]}")

    if bs is not None:
        # plain PyTorch on every backend: fp32 sums over each base row's readers
        G = 1 if base_index is None else base.shape[0]
        gi = torch.zeros(R, dtype=torch.int64) if base_index is None else base_index
        readers_of = torch.nn.functional.one_hot(gi, G).t().double()
        want = b64.grad.reshape(G, N)
        assert_within(bs.grad.reshape(G, N), want,
                      sum_bound(readers_of, d2, None, claim("torch", device, dtype, "forward"), want),
                      f"{backend} fused d base {DT_ID[dtype]}")


def _value_and_derivative(log_alpha, u, training):
    """float64 hard-concrete sample and its derivative in log_alpha, elementwise."""
    la = log_alpha.double().clone().requires_grad_(True)
    z = hc64(la, u, training)
    (g,) = torch.autograd.grad(z.sum(), la)
    return z.detach(), g


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
