"""Bad input gets an error that names the problem; the dispatcher explains
every refusal."""
import pytest
import torch

import fastedge
from fastedge.backends import Call, NoBackendError, explain, priority, select


def test_mask_reads_more_writers_than_the_stack_has():
    with pytest.raises(ValueError, match="reads 9 writers but stack has only 4"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 9))


def test_mask_must_be_two_dimensional_and_float32():
    with pytest.raises(ValueError, match="mask must have 2 dimension"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(3))
    with pytest.raises(TypeError, match="mask must be float32.*got bfloat16"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 3).bfloat16())
    with pytest.raises(ValueError, match="at least one"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(0, 3))


def test_stack_dtype():
    with pytest.raises(TypeError, match="stack must be float32, bfloat16, float16 or float64, got int32"):
        fastedge.masked_writer_sum(torch.ones(4, 8, dtype=torch.int32), torch.rand(2, 3))


def test_base_shapes_and_index():
    stack, mask = torch.randn(4, 2, 5), torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"base must be \[\*T\]"):
        fastedge.masked_writer_sum(stack, mask, torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"base must be \[G, \*T\]"):
        fastedge.masked_writer_sum(stack, mask, torch.randn(2, 5), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="one entry per reader"):
        fastedge.masked_writer_sum(stack, mask, torch.randn(2, 2, 5), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match=r"in \[0, 2\).*got values in \[0, 2\]"):
        fastedge.masked_writer_sum(stack, mask, torch.randn(2, 2, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="base_index must be an integer"):
        fastedge.masked_writer_sum(stack, mask, torch.randn(2, 2, 5), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(TypeError, match="base must have the stack's dtype"):
        fastedge.masked_writer_sum(stack, mask, torch.randn(2, 5).double())
    with pytest.raises(ValueError, match="base_index was given without base"):
        fastedge.masked_writer_sum(stack, mask, None, torch.tensor([0, 1, 0]))


def test_devices_must_agree():
    with pytest.raises(ValueError, match="one device.*stack on cpu.*mask on meta"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 3, device="meta"))


def test_grad_buffer_checks():
    stack, mask = torch.randn(4, 2, 5), torch.rand(3, 4)
    with pytest.raises(ValueError, match="grad_stack must be"):
        fastedge.masked_writer_sum(stack, mask, grad_stack=torch.zeros(3, 2, 5))
    with pytest.raises(TypeError, match="grad_stack must be float32 or"):
        fastedge.masked_writer_sum(stack, mask, grad_stack=torch.zeros(4, 2, 5, dtype=torch.float64))


def test_hard_concrete_arguments():
    with pytest.raises(TypeError, match="log_alpha must be float32"):
        fastedge.hard_concrete(torch.zeros(3, dtype=torch.bfloat16), training=True)
    with pytest.raises(ValueError, match="u must have log_alpha's shape"):
        fastedge.hard_concrete(torch.zeros(3), training=True, u=torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="seed must lie in"):
        fastedge.sampled_masked_writer_sum(torch.randn(3, 4), torch.zeros(2, 3), seed=-1)
    with pytest.raises(ValueError, match=r"node_log_alpha must be \[W\] = \[3\]"):
        fastedge.sampled_masked_writer_sum(torch.randn(3, 4), torch.zeros(2, 3), torch.zeros(4), seed=1)


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 3), backend="fast")


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("FASTEDGE_BACKEND", "cuda")
    with pytest.raises(NoBackendError, match="forced backend 'cuda'.*\n  cuda: .*cpu"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 3))


def test_bad_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTEDGE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTEDGE_BACKEND='gpu' is not a backend"):
        fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 3))


def test_environment_forces_a_backend(monkeypatch):
    seen = []
    from fastedge.backends import get_backend
    impl = get_backend("reference")
    original = impl.masked_sum_forward
    monkeypatch.setattr(impl, "masked_sum_forward", lambda *a, **k: (seen.append(1), original(*a, **k)))
    monkeypatch.setenv("FASTEDGE_BACKEND", "reference")
    fastedge.masked_writer_sum(torch.randn(4, 8), torch.rand(2, 3))
    assert seen == [1]


def test_when_no_backend_can_run_every_reason_is_listed():
    call = Call(op="masked_sum", device=torch.device("cpu"), dtype=torch.int8, n_readers=2,
                n_writers=3, n_elements=8)
    with pytest.raises(NoBackendError) as info:
        select(call)
    message = str(info.value)
    for name in ("reference", "torch", "triton", "cuda"):
        assert f"  {name}: " in message
    assert "int8" in message
    reasons = explain(call)
    assert set(reasons) == {"reference", "torch", "triton", "cuda"} and all(reasons.values())


def test_default_choice():
    assert priority(torch.device("cuda"))[0] == "triton"
    assert priority(torch.device("cpu"))[0] == "torch"
    call = Call(op="masked_sum", device=torch.device("cpu"), dtype=torch.float32, n_readers=2,
                n_writers=3, n_elements=8)
    assert select(call).name == "torch"
