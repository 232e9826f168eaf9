"""torch.library registration: opcheck, fake tensors, torch.compile."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastedge


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    stack = torch.randn(9, 2, 13, generator=g).to(dtype)
    mask = torch.rand(5, 7, generator=g)
    base = torch.randn(3, 2, 13, generator=g).to(dtype)
    base_index = torch.tensor([0, 2, 1, 1, 0])
    return stack, mask, base, base_index


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_opcheck_masked_writer_sum(backend):
    stack, mask, base, base_index = _inputs()
    prefix = stack[:7].clone().requires_grad_(True)
    mask.requires_grad_(True)
    base.requires_grad_(True)
    op = torch.ops.fastedge.masked_writer_sum.default
    torch.library.opcheck(op, (prefix, mask, base, base_index, None, backend))
    torch.library.opcheck(op, (prefix, mask, None, None, None, backend))
    torch.library.opcheck(op, (prefix, mask, base[0].detach().requires_grad_(True), None, None, backend))


def test_opcheck_masked_writer_sum_with_grad_buffer():
    stack, mask, _, _ = _inputs()
    prefix = stack[:7].clone().requires_grad_(True)
    buf = torch.zeros(9, 2, 13)
    torch.library.opcheck(torch.ops.fastedge.masked_writer_sum.default,
                          (prefix, mask.requires_grad_(True), None, None, buf, "torch"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_backward_ops():
    stack, mask, _, _ = _inputs()
    dout = torch.randn(5, 2, 13)
    torch.library.opcheck(torch.ops.fastedge.masked_writer_sum_backward_stack.default,
                          (mask, dout, stack[:7], "torch"))
    torch.library.opcheck(torch.ops.fastedge.masked_writer_sum_backward_mask.default,
                          (stack[:7], dout, mask, "torch"))
    torch.library.opcheck(torch.ops.fastedge.masked_writer_sum_accumulate_grad_.default,
                          (torch.zeros(9, 2, 13), mask, dout, "torch"))


@pytest.mark.parametrize("training", [True, False])
def test_opcheck_hard_concrete(training):
    la = torch.randn(4, 17).requires_grad_(True)
    u = fastedge.ops.draw_noise((4, 17), generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.fastedge.hard_concrete.default, (la, u if training else None, training, "torch"))
    torch.library.opcheck(torch.ops.fastedge.hard_concrete_backward.default,
                          (la.detach(), u if training else None, training, torch.randn(4, 17), "torch"))


@pytest.mark.parametrize("with_node", [True, False])
def test_opcheck_fused(with_node):
    stack, _, base, base_index = _inputs()
    edge = (torch.randn(5, 7) + 1).requires_grad_(True)
    node = (torch.randn(7) + 1).requires_grad_(True) if with_node else None
    prefix = stack[:7].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastedge.sampled_masked_writer_sum.default,
                          (prefix, edge, node, base.requires_grad_(True), base_index, None, 5, 3, True, "torch"))
    torch.library.opcheck(torch.ops.fastedge.sample_masks.default, (edge, node, 5, 3, True, "torch"))
    torch.library.opcheck(torch.ops.fastedge.sample_masks_backward.default,
                          (edge.detach(), None if node is None else node.detach(), 5, 3, True,
                           torch.randn(5, 7), torch.tensor(0.5), "torch"))


def test_fake_tensors_flow_through_forward_and_backward():
    with FakeTensorMode():
        stack = torch.empty(1641, 8, 72, 64, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.empty(121, 1600, requires_grad=True)
        base = torch.empty(8, 72, 64, dtype=torch.bfloat16)
        out = fastedge.masked_writer_sum(stack, mask, base)
        assert out.shape == (121, 8, 72, 64) and out.dtype == torch.bfloat16
        out.sum().backward()
        assert stack.grad.shape == stack.shape and mask.grad.shape == mask.shape
        edge = torch.empty(121, 1600, requires_grad=True)
        out2, s = fastedge.sampled_masked_writer_sum(stack, edge, seed=1)
        assert out2.shape == (121, 8, 72, 64) and s.shape == ()


def test_torch_compile_fullgraph():
    stack, mask, base, base_index = _inputs()
    edge = torch.randn(5, 7) + 1

    def step(stack, mask, edge):
        out = fastedge.masked_writer_sum(stack, mask, base, base_index)
        out2, s = fastedge.sampled_masked_writer_sum(stack, edge, seed=3)
        return out.sum() + out2.sum() + s

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_(True) for t in (stack, mask, edge)]
    args_eager = [t.clone().requires_grad_(True) for t in (stack, mask, edge)]
    loss = compiled(*args)
    loss_eager = step(*args_eager)
    assert torch.allclose(loss, loss_eager)
    loss.backward()
    loss_eager.backward()
    for a, b in zip(args, args_eager):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
