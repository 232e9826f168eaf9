"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set
here, at the top, when there is no CUDA device: the `triton` backend then runs
its kernels on the CPU. On a GPU machine the same tests also run the `triton`
and `cuda` backends on the device (marker `gpu`).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tracr (the optional extra) runs on JAX, whose XLA compiles code for every
# weight shape while Tracr assembles a model and for every input length it
# runs: most of the Tracr tests' time. Without LLVM's expensive passes this
# takes about 30% less CPU (60 s instead of 86 s for every supported
# program), and Tracr's outputs are the same (its residual stream differs
# from ours by the same amounts either way). Set before JAX starts its
# backend; a user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

# The suite runs in two processes (pytest-xdist, `-n 2` in pyproject.toml): one
# thread each, or four threads would fight over two cores (measured: tiny
# models run up to 10 times slower under that contention). Subprocesses the
# tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


HAS_TRITON = _triton_importable()

# (backend, device) pairs every op test runs on; GPU pairs carry the `gpu` marker.
_CPU_TARGETS = [("reference", "cpu"), ("torch", "cpu")]
if HAS_TRITON:
    _CPU_TARGETS.append(("triton", "cpu"))
_GPU_TARGETS = [("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]


def backend_targets():
    params = [pytest.param(t, id=f"{t[0]}-{t[1]}") for t in _CPU_TARGETS]
    params += [pytest.param(t, id=f"{t[0]}-{t[1]}", marks=[pytest.mark.gpu]) for t in _GPU_TARGETS]
    return params


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_fresh_memory():
    """Fill every freshly allocated tensor (torch.empty, also inside the
    launchers) with NaN, so that an element a kernel forgets to write fails."""
    import torch.utils.deterministic as det
    old_flag = det.fill_uninitialized_memory
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_flag
    torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, then back: tiny CPU steps, where a busy
    shared CPU makes OpenMP's worker threads spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
