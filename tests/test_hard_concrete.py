"""Hard-concrete sampling: formulas against float64 written here, gradients,
statistics against closed forms, and the seeded in-kernel sampler."""
import math

import pytest
import torch

import fastedge
from fastedge.backends import get_backend
from fastedge.ops import philox
from conftest import backend_targets

BETA, L, R, EPS = 2 / 3, -0.1, 1.1, 1e-6


def hc64(log_alpha, u, training):
    """float64 hard concrete straight from docs/CONCEPTS.md section 3 (differentiable)."""
    if not training:
        return torch.sigmoid(0.8 * log_alpha / BETA)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return torch.clamp(s * (R - L) + L, 0.0, 1.0)


def fresh_log_alpha(n, seed):
    g = torch.Generator().manual_seed(seed)
    # a spread that visits both clamps and the interior
    return torch.randn(n, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", backend_targets())
def test_forward_and_gradient_match_float64(target, training, poison_fresh_memory):
    backend, device = target
    n = 1031
    la64 = fresh_log_alpha(n, 1).requires_grad_(True)
    u64 = fastedge.ops.draw_noise((n,), generator=torch.Generator().manual_seed(2)).double()
    z64 = hc64(la64, u64, training)
    dz = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (grad64,) = torch.autograd.grad(z64, la64, dz)

    la = la64.detach().float().to(device).requires_grad_(True)
    z = fastedge.hard_concrete(la, training=training, u=u64.float().to(device), backend=backend)
    assert z.dtype == torch.float32 and z.shape == la.shape
    assert torch.isfinite(z).all()
    assert (z.double().cpu() - z64.detach()).abs().max() < 2e-6
    (grad,) = torch.autograd.grad(z, la, dz.float().to(device))
    assert torch.isfinite(grad).all()
    assert (grad.double().cpu() - grad64).abs().max() < 2e-5 * max(1.0, grad64.abs().max().item())


def test_float64_on_reference_and_torch():
    la = fresh_log_alpha(257, 4).requires_grad_(True)
    u = fastedge.ops.draw_noise((257,), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for backend in ("reference", "torch"):
        z = fastedge.hard_concrete(la, training=True, u=u, backend=backend)
        assert z.dtype == torch.float64
        assert torch.allclose(z, hc64(la, u, True), atol=1e-14, rtol=0)


def test_explicit_noise_reproduces_and_generator_repeats():
    la = fresh_log_alpha(100, 6).float()
    a = fastedge.hard_concrete(la, training=True, generator=torch.Generator().manual_seed(9))
    b = fastedge.hard_concrete(la, training=True, generator=torch.Generator().manual_seed(9))
    c = fastedge.hard_concrete(la, training=True, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    u = fastedge.ops.draw_noise((100,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(fastedge.hard_concrete(la, training=True, u=u), a)


def test_structural_zero_minus_infinity():
    la = torch.tensor([-math.inf, 0.0, 3.0], requires_grad=True)
    for training in (True, False):
        z = fastedge.hard_concrete(la, training=training, u=torch.full((3,), 0.5))
        assert z[0] == 0
        (g,) = torch.autograd.grad(z.sum(), la)
        assert torch.isfinite(g).all() and g[0] == 0


def test_l0_and_deterministic_closed_forms():
    la = fresh_log_alpha(64, 7).float()
    l0 = fastedge.hard_concrete_l0(la).double()
    expect = torch.sigmoid(la.double() - BETA * math.log(-L / R))
    assert torch.allclose(l0, expect, atol=1e-6)
    det = fastedge.hard_concrete_deterministic(la).double()
    assert torch.allclose(det, torch.sigmoid(0.8 * la.double() / BETA), atol=1e-6)
    assert torch.equal(fastedge.hard_concrete(la, training=False), fastedge.hard_concrete_deterministic(la))


# -- statistics ------------------------------------------------------------------

def closed_forms(log_alpha: float):
    """P(z = 0), P(z = 1), E[z] and Var[z] for u ~ U(eps, 1 - eps).

    z is monotone in u, so the fractions come from the two quantiles where the
    stretched sample crosses 0 and 1, and the moments from integrating z(u)
    over u in float64 (a fine midpoint rule over the interior).
    """
    def u_at(level):  # the u where s * (r - l) + l == level
        s = (level - L) / (R - L)
        return 1 / (1 + math.exp(-(BETA * math.log(s / (1 - s)) - log_alpha)))
    width = 1 - 2 * EPS
    u0, u1 = u_at(0.0), u_at(1.0)
    p0 = (min(max(u0, EPS), 1 - EPS) - EPS) / width
    p1 = (1 - EPS - min(max(u1, EPS), 1 - EPS)) / width
    n = 2_000_000
    u = torch.linspace(EPS, 1 - EPS, n + 1, dtype=torch.float64)
    u = (u[:-1] + u[1:]) / 2
    z = hc64(torch.full_like(u, log_alpha), u, True)
    return p0, p1, z.mean().item(), z.var().item()


def check_statistics(z: torch.Tensor, log_alpha: float):
    n = z.numel()
    p0, p1, mean, var = closed_forms(log_alpha)
    f0 = (z == 0).double().mean().item()
    f1 = (z == 1).double().mean().item()
    for name, got, p in (("P(z=0)", f0, p0), ("P(z=1)", f1, p1)):
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(got - p) <= 4 * se, f"{name}: {got:.5f} vs {p:.5f} (4 se = {4 * se:.5f})"
    se = math.sqrt(var / n)
    got = z.double().mean().item()
    assert abs(got - mean) <= 4 * se, f"E[z]: {got:.5f} vs {mean:.5f} (4 se = {4 * se:.5f})"


@pytest.mark.parametrize("log_alpha", [-1.5, 0.0, 0.7, 2.5])
def test_statistics_torch_generator(log_alpha):
    n = 100_000
    la = torch.full((n,), log_alpha)
    z = fastedge.hard_concrete(la, training=True, generator=torch.Generator().manual_seed(123))
    check_statistics(z, log_alpha)


@pytest.mark.parametrize("log_alpha", [-1.5, 0.0, 0.7, 2.5])
@pytest.mark.parametrize("target", backend_targets())
def test_statistics_seeded_sampler(target, log_alpha):
    """The in-kernel Philox sampler: 100,000 edge masks (200 readers x 500
    writers) with one log_alpha match the closed forms."""
    backend, device = target
    la = torch.full((200, 500), log_alpha, device=device)
    m, edge_sum = get_backend(backend).sample_masks(la, None, 2024, 0, True)
    check_statistics(m.cpu().reshape(-1), log_alpha)
    assert abs(edge_sum.item() - m.double().sum().item()) < 1e-3 * m.numel()


# -- the seeded sampler ------------------------------------------------------------

@pytest.mark.parametrize("target", backend_targets())
def test_seeded_sampler_repeats_and_changes(target):
    backend, device = target
    la = fresh_log_alpha(37 * 41, 8).float().reshape(37, 41).to(device)
    node = fresh_log_alpha(41, 9).float().to(device)
    impl = get_backend(backend)
    a, sa = impl.sample_masks(la, node, 77, 5, True)
    b, sb = impl.sample_masks(la, node, 77, 5, True)
    c, _ = impl.sample_masks(la, node, 78, 5, True)
    d, _ = impl.sample_masks(la, node, 77, 6, True)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c), "another seed gave the same masks"
    assert not torch.equal(a, d), "another reader offset gave the same masks"
    # reader_offset addresses global readers: rows 3.. of one call are a call at offset 3
    tail, _ = impl.sample_masks(la[3:].contiguous(), node, 77, 8, True)
    assert torch.equal(tail, a[3:])


def test_philox_noise_bit_identical_across_backends():
    """Every backend that shares the generator gives the same noise, bit for
    bit, and the same masks up to rounding; the reference reproduces them from
    the noise alone."""
    from conftest import _CPU_TARGETS
    la = fresh_log_alpha(19 * 53, 10).float().reshape(19, 53)
    node = fresh_log_alpha(53, 11).float()
    seed, offset = (1 << 40) + 12345, 1000
    u_edge = fastedge.ops.edge_noise(seed, 19, 53, offset, "cpu")
    u_node = fastedge.ops.node_noise(seed, 53, "cpu")
    expect = (hc64(la.double(), u_edge.double(), True) * hc64(node.double(), u_node.double(), True)[None, :])
    for backend, device in _CPU_TARGETS:
        m, s = get_backend(backend).sample_masks(la, node, seed, offset, True)
        assert (m.double() - expect).abs().max() < 1e-6, backend
        zsum = hc64(la.double(), u_edge.double(), True).sum()
        assert abs(s.item() - zsum.item()) < 1e-3, backend


def test_philox_known_values():
    """Philox4x32-10 against the published known-answer vectors (Random123 kat_vectors)."""
    def words(seed_lo, seed_hi, ctr):
        c0 = torch.tensor([ctr[0]]); c1 = torch.tensor([ctr[1]])
        return philox.philox_uint32(seed_lo | (seed_hi << 32), c0, c1, ctr[2], ctr[3]).item()
    assert words(0, 0, (0, 0, 0, 0)) == 0x6627E8D5
    assert words(0xFFFFFFFF, 0xFFFFFFFF, (0xFFFFFFFF,) * 4) == 0x408F276D
    assert words(0xA4093822, 0x299F31D0, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == 0xD16CFE09
