"""bench/memtrack.py (live tensor memory on real and fake tensors) and bench/memory.py."""
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from memtrack import LiveTensorTracker  # noqa: E402

MB = 2 ** 20


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU steps: one thread (a busy shared CPU makes OpenMP spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fake_or_not(fake):
    return FakeTensorMode(allow_non_fake_inputs=True) if fake else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_known_allocations(fake):
    with _fake_or_not(fake):
        with LiveTensorTracker() as t:
            a = torch.empty(MB, dtype=torch.uint8)
            b = torch.empty(MB // 2, dtype=torch.float32)          # 2 MiB
            assert t.current_bytes == 3 * MB and t.peak_bytes == 3 * MB
            view = a.view(2, -1)[1]                                  # shares a's storage
            assert t.current_bytes == 3 * MB
            del a
            assert t.current_bytes == 3 * MB                         # the view keeps it alive
            del view
            assert t.current_bytes == 2 * MB
            t.reset_peak()
            assert t.peak_bytes == 2 * MB
            c = b * 2                                                # a new 2 MiB storage
            assert t.peak_bytes == 4 * MB
            del b, c
            assert t.current_bytes == 0 and t.peak_bytes == 4 * MB
            d = torch.empty(0)
            torch.ones(MB // 4, out=d)                               # resized in place: 1 MiB
            assert t.current_bytes == MB
            del d
        assert t.current_bytes == 0 and t.baseline_bytes == 0


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_baseline_and_autograd_saved_tensors(fake):
    with _fake_or_not(fake):
        lin = torch.nn.Linear(256, 512, bias=False)                  # 512 KiB of weight
        x = torch.randn(64, 256, requires_grad=True)                 # 64 KiB
        with LiveTensorTracker(lin) as t:
            assert t.baseline_bytes == 512 * 256 * 4
            y = lin(x)                                               # 128 KiB, saved by tanh
            z = y.tanh()                                             # tanh saves its output z
            del y                                                    # mm saved x and W, not y
            assert t.current_bytes == 64 * 512 * 4
            loss = z.sum()
            loss.backward()
            del z, loss
            # what is left: the gradients of W and x
            assert t.current_bytes == (512 * 256 + 64 * 256) * 4
        # x was only discovered as an op input: it joins the baseline then
        assert t.baseline_bytes == (512 * 256 + 64 * 256) * 4


def _tiny_llama(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=64,
                      intermediate_size=96, vocab_size=101, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)


def _tiny_step(kind, recompute=True, dtype=torch.float32, B=4, S=9, micro=2):
    import pruning_step as ps
    model = _tiny_llama(dtype)
    ids, corrupted = ps.random_batch(101, B, S, "cpu")
    full = torch.zeros(B, 101).log_softmax(-1)
    fn, masked = ps.step_fn(kind, model, ids, corrupted, full, micro, recompute)
    if kind == "fastedge":  # a fixed seed: the step counter cannot be read from a fake tensor
        masked.forward = functools.partial(masked.forward, seed=0)
    return fn, (model, masked, ids, corrupted, full)


def _profiler_peak(fn):
    """Peak of live bytes from the CPU allocator's own events (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("kind", ["floor", "naive", "fastedge"])
def test_peak_agrees_with_the_allocator(kind):
    """On real CPU tensors the tracker's peak is the allocator's peak (the
    profiler's allocation events, an independent count), except for what
    custom ops allocate inside themselves, which the tracker cannot see."""
    fn, _ = _tiny_step(kind)
    fn()  # the optimizer state exists from now on, as in every later step
    with LiveTensorTracker() as t:
        fn()
    alloc_peak = _profiler_peak(fn)
    if kind == "floor":       # plain aten ops only
        assert t.peak_bytes == alloc_peak
    elif kind == "naive":     # plain aten ops; a few bytes of kernel scratch
        assert alloc_peak - 1024 <= t.peak_bytes <= alloc_peak
    else:                     # fastedge's ops: their internal temporaries are invisible
        assert 0.9 * alloc_peak <= t.peak_bytes <= alloc_peak


def test_known_extra_allocation_raises_the_peak_exactly():
    fn, _ = _tiny_step("fastedge")
    fn()  # the optimizer state exists from now on
    with LiveTensorTracker() as plain:
        fn()
    with LiveTensorTracker() as extra:
        held = torch.empty(12345, dtype=torch.uint8)
        fn()
        del held
    assert extra.peak_bytes == plain.peak_bytes + 12345
    assert extra.baseline_bytes == plain.baseline_bytes


@pytest.mark.parametrize("kind,recompute", [("fastedge", True), ("fastedge", False), ("naive", True)])
def test_fake_step_counts_what_the_real_step_allocates(kind, recompute):
    """The same step traced on fake tensors (nothing allocated) gives the same
    figures as on real tensors, custom ops and checkpointing included."""
    figures = []
    for fake in (False, True):
        with _fake_or_not(fake):
            fn, held = _tiny_step(kind, recompute, dtype=torch.bfloat16)
            with LiveTensorTracker(*held) as t:
                fn()
            figures.append((t.baseline_bytes, t.peak_bytes, t.peak_total_bytes))
            del fn, held
    assert figures[0] == figures[1]
    assert figures[0][1] > 0
