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


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU steps


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


# -- fastedge's memory features (fastedge/model.py, "Memory"), sized on fake tensors ----------------


def _fake_step_memory(n_layers=2, n_heads=8, B=4, S=32, D=64, **patch_kwargs):
    """(step peak above what existed before, stack bytes, B*S*D*2) of one
    fastedge step (recompute_readers=True) of a bf16 Llama traced on fake tensors."""
    import fastedge
    import pruning_step as ps
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                      hidden_size=D, intermediate_size=96, vocab_size=101, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
        ids, corrupted = ps.random_batch(101, B, S, "cpu")
        full = torch.zeros(B, 101).log_softmax(-1)
        em = fastedge.patch(model, node_masks=False, recompute_readers=True, **patch_kwargs)
        em.train()
        opt = ps.make_optimizer(em)
        em.forward = functools.partial(em.forward, seed=0)
        with LiveTensorTracker(model, em, ids, corrupted, full) as t:
            ps.pruning_step(em, opt, ids, corrupted, full)
    stack = em.graph.n_writers * B * S * D * 2
    return t.peak_bytes, stack, B * S * D * 2


@pytest.fixture
def small_norm_chunks(monkeypatch):
    import fastedge.model
    monkeypatch.setattr(fastedge.model, "NORM_CHUNK_ELEMENTS", 4096)  # 64 rows of 64


def test_memory_beyond_stack_and_buffer_does_not_grow_with_depth(small_norm_chunks):
    """The peak holds the stack, its gradient buffer and one layer's reader
    region; per other layer only the regions' two [B, S, D] inputs stay.
    (A view of a layer's [R + 1, B, S, D] read kept as a region input, as
    once happened, adds 25 units per layer here.)"""
    peak2, stack2, unit = _fake_step_memory(n_layers=2)
    peak4, stack4, _ = _fake_step_memory(n_layers=4)
    extra2, extra4 = peak2 - 2 * stack2, peak4 - 2 * stack4
    assert extra4 - extra2 <= 2 * 3 * unit


def test_lean_norm_keeps_the_reader_norms_small(small_norm_chunks):
    """With lean_norm, a layer's reader norms keep only their bf16 input:
    the peak's layer part stays under 4 copies of the layer's read
    ([R + 1, B, S, D], R = 3 * 8 heads); Hugging Face's RMSNorm keeps a
    float32 copy and makes four more in its backward."""
    lean, stack, unit = _fake_step_memory(lean_norm=True)
    plain, _, _ = _fake_step_memory(lean_norm=False)
    read = 25 * unit
    assert lean - 2 * stack < 4 * read
    assert plain - 2 * stack > 8 * read


def test_float32_grad_buffer_costs_one_more_bf16_stack():
    bf16, stack, _ = _fake_step_memory()
    fp32, _, _ = _fake_step_memory(grad_buffer_dtype=torch.float32)
    assert fp32 - bf16 == stack


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_lean_norm_gives_the_same_values_and_gradients(arch, recompute, small_norm_chunks):
    """Chunked and recomputed, each row by the same ops: bitwise equal."""
    import fastedge
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import tiny_model, token_batch
    results = []
    for lean in (False, True):
        model = tiny_model(arch, dtype=torch.bfloat16)
        ids, corrupted = token_batch(3, 9)
        em = fastedge.patch(model, lean_norm=lean, recompute_readers=recompute)
        em.reset_masks(generator=torch.Generator().manual_seed(0), mean=0.5)  # gradients away from the clamp
        em.train()
        out = em(ids, corrupted, seed=3)
        (out.logits.float().pow(2).mean() + 1e-3 * (out.edge_mask_sum + out.node_mask_sum)).backward()
        results.append((out.logits.detach(), [p.grad for p in em.parameters()]))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert any(g.abs().sum() > 0 for g in grads_a)


def test_grad_buffer_dtype_is_checked():
    import fastedge
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import tiny_model
    with pytest.raises(ValueError, match="grad_buffer_dtype"):
        fastedge.patch(tiny_model("gpt2"), grad_buffer_dtype=torch.float16)


# -- bench/memory.py --------------------------------------------------------------------------------


def test_memory_cli_quick(tmp_path):
    """The whole pipeline on a 1-layer tiny Llama: traced points, the affine
    fit, the limits (traced: the largest micro-batch fits, one more does
    not), CSV and markdown."""
    import csv

    import memory
    argv = ["--quick", "--layers", "1", "--designs", "fastedge", "--cards", "0.02", "--micro-batch", "1",
            "--setting-micro", "0", "--grid", "16,64", "--out", str(tmp_path)]
    args = memory.parse_args(argv)
    result = memory.run(args, log=lambda *a: None)
    memory.write_outputs(result, args)
    fit = result["fits"]["fastedge"]
    assert fit.max_rel_residual < 2e-3          # affine in tokens (S^2 terms: the attention mask)
    (lim,) = [x for x in result["limits"] if x.kind == "micro"]
    usable = result["usable"][0.02]
    assert lim.max_batch >= 2
    assert lim.traced.total <= usable < lim.traced_next.total
    rows = list(csv.DictReader(open(tmp_path / "memory.csv")))
    assert {r["what"] for r in rows} >= {"point", "limit-micro", "limit-grid"}
    assert all(r["torch"] == torch.__version__ for r in rows)
    assert len(list(tmp_path.glob("memory-tiny-llama-*.md"))) == 1


def test_a_finished_graph_does_not_keep_the_stack():
    """In a gradient-accumulation loop, a micro-batch's output (and with it
    its graph) stays referenced until the next micro-batch's forward returns;
    the backward releases the stack and its gradient buffer, so they do not
    overlap the next micro-batch's."""
    import fastedge
    import pruning_step as ps
    model = _tiny_llama(torch.bfloat16)
    ids, corrupted = ps.random_batch(101, 4, 32, "cpu")
    full = torch.zeros(4, 101).log_softmax(-1)
    for recompute in (False, True):
        em = fastedge.patch(model, node_masks=False, recompute_readers=recompute)
        em.train()
        stack = em.graph.n_writers * 4 * 32 * 64 * 2
        with LiveTensorTracker(model, em, ids, corrupted, full) as t:
            out = em(ids, corrupted)
            loss = ps._loss(out, full)
            assert t.current_bytes > 2 * stack
            loss.backward()
            # left: the logits [4, 32, 101], the mask gradients and a few scalars
            # (26 kB); the stack and its buffer are 180 kB each
            assert t.current_bytes < stack / 2
            with pytest.raises(RuntimeError, match="second time"):
                loss.backward()
        em.unpatch()


def test_grad_precision_mode():
    """--grad-precision on 2 layers: bf16 runs are off float64 by bf16's
    rounding (percents), the float32 model by float32's (1e-6)."""
    import memory
    args = memory.parse_args(["--grad-precision", "--layers", "2"])
    res = memory.grad_precision(args, log=lambda *a: None)
    errors = {r["design"]: float(r["note"].split()[-1]) for r in res["rows"]}
    assert len(errors) == 4
    (fp32_model,) = [v for k, v in errors.items() if "float32 model" in k]
    assert fp32_model < 1e-4
    assert all(1e-4 < v < 0.1 for k, v in errors.items() if "float32 model" not in k)


def test_a_second_backward_raises_even_with_retain_graph():
    """A second backward would add every reader's gradient into the buffer
    again (wrong gradients), so the model refuses it loudly."""
    import fastedge
    import pruning_step as ps
    model = _tiny_llama(torch.float32)
    ids, corrupted = ps.random_batch(101, 2, 8, "cpu")
    full = torch.zeros(2, 101).log_softmax(-1)
    em = fastedge.patch(model, node_masks=False)
    em.train()
    loss = ps._loss(em(ids, corrupted), full)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    em.unpatch()
