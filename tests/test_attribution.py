"""Attribution (fastedge.attribution): EAP against finite differences of the
naive oracle in every edge mask, EAP-IG against a plain-autograd
implementation of their definitions written here (on the naive oracle, with
gradients taken at every reader's input), the sign convention, the metrics,
low precision, and bad input.

The references share no code with fastedge's attribution: the finite
differences perturb one edge mask of `naive_edge_forward` at a time; the
EAP-IG references run `naive_hooked_run` (the full model, float64, with
writer outputs replaced and zero offsets added to reader inputs) and
multiply the fixed clean-minus-corrupted writer outputs by the offsets'
gradients.
"""
import math
import warnings

import pytest
import torch

import fastedge
from fastedge.attribution import EdgeScores, attribute
from fastedge.tasks.base import Example, TaskData
from hf_float64 import hf_in_float64
from naive_edge_model import naive_edge_forward, naive_hooked_run, naive_writer_outputs
from tiny_models import ARCHITECTURES, VOCAB, tiny_model

F64 = torch.float64
FD_STEP = 1e-4


def _ids(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),
            torch.randint(0, VOCAB, (batch, seq), generator=g))


def _metric(logits):
    """A nonlinear metric, one value per example."""
    return torch.log_softmax(logits[:, -1], -1)[:, 3] + 0.3 * logits[:, 1:, 5].mean(1) ** 2


def _per_reader(flat, graph):
    """Graph-edge-order scores as {(writer, reader): value}."""
    return {edge: float(flat[i]) for i, edge in enumerate(graph.edges())}


def _edge_mask_with(graph, writer, reader, value):
    mask = torch.ones(graph.n_readers, graph.n_writers, dtype=F64)
    mask[graph.reader_index[reader], graph.writer_index[writer]] = value
    return mask


def _finite_differences(model, graph, clean, corrupted, metric, ablation="interchange", means=None):
    """d mean(metric) / d z[r, w] at all-ones for every edge, by a one-sided
    second-order difference of the naive oracle (masks stay in [0, 1])."""
    def f(mask):
        with torch.no_grad():
            logits = naive_edge_forward(model, graph, clean, corrupted, mask, ablation=ablation,
                                        mean_outputs=means)
        return metric(logits).mean().item()
    f1 = f(torch.ones(graph.n_readers, graph.n_writers, dtype=F64))
    out = []
    for w, r in graph.edges():
        f_h = f(_edge_mask_with(graph, w, r, 1 - FD_STEP))
        f_2h = f(_edge_mask_with(graph, w, r, 1 - 2 * FD_STEP))
        out.append((3 * f1 - 4 * f_h + f_2h) / (2 * FD_STEP))
    return torch.tensor(out, dtype=F64)


def _assert_close_to_fd(scores: torch.Tensor, fd: torch.Tensor):
    # a second-order difference with h = 1e-4 in float64: truncation ~h^2 times
    # the third derivative, rounding ~1e-16 / h of the metric; 1e-6 of the
    # largest score covers both with room, and a dropped or doubled term misses
    # it by orders of magnitude
    scale = fd.abs().max().item()
    assert scale > 1e-5, "the reference scores are all ~0: the test would not see anything"
    err = (scores - fd).abs().max().item()
    print(f"max |EAP - finite difference| / largest score = {err / scale:.3g}")
    assert err <= 1e-6 * scale, f"max |EAP - finite difference| = {err:.3g} (largest score {scale:.3g})"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eap_equals_finite_differences_of_the_mask(arch):
    model = tiny_model(arch, seed=3).double()
    graph = fastedge.EdgeGraph.from_config(model.config)
    clean, corrupted = _ids(3, 6, seed=11)
    with hf_in_float64():
        scores = attribute(model, clean, corrupted, metric=_metric, method="eap")
    assert scores.n_examples == 3 and scores.sign == "gate"
    fd = _finite_differences(model, graph, clean, corrupted, _metric)
    _assert_close_to_fd(scores.flat(), fd)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_eap_other_ablations_equal_finite_differences(ablation):
    model = tiny_model("llama-gqa", seed=4).double()
    graph = fastedge.EdgeGraph.from_config(model.config)
    clean, reference = _ids(3, 5, seed=12)
    em = fastedge.patch(model, ablation=ablation, node_masks=False)
    means = None
    with hf_in_float64():
        if ablation == "mean":
            means = em.compute_mean_outputs(reference)
        scores = attribute(em, clean, metric=_metric, method="eap")
    fd = _finite_differences(model, graph, clean, None, _metric, ablation=ablation,
                             means=None if means is None else means.detach())
    _assert_close_to_fd(scores.flat(), fd)


# -- EAP-IG against its definition -----------------------------------------------------------------

def _writer_groups(graph, method):
    """The writer groups the reference interpolates, with their alphas (the library's code)."""
    emb = list(graph.embeddings)
    if method == "eap-ig-inputs":
        return [emb], lambda m: [k / m for k in range(m)]
    groups = [emb]
    for layer in range(graph.n_layers):
        groups.append([f"a{layer}.h{i}" for i in range(graph.n_heads)])
        groups.append([f"m{layer}"])
    return groups, lambda m: [k / m for k in range(1, m + 1)]


def _reference_ig(model, graph, clean, corrupted, metric, method, steps):
    """Plain-autograd EAP-IG on the naive oracle: for every run, the fixed
    clean-minus-corrupted writer outputs times the gradient at each reader's
    input, summed over tokens, averaged over examples and runs."""
    ys = naive_writer_outputs(model, graph, clean)
    ys_c = naive_writer_outputs(model, graph, corrupted)
    delta = ys - ys_c
    B, S = clean.shape
    D = ys.shape[-1]
    scores = torch.zeros(graph.n_readers, graph.n_writers, dtype=F64)
    groups, alphas = _writer_groups(graph, method)
    runs = 0
    for group in groups:
        for alpha in alphas(steps):
            def override(name, y, group=group, alpha=alpha):
                if name not in group:
                    return y
                w = graph.writer_index[name]
                return (ys_c[w] + alpha * delta[w]).detach()
            offsets = {r: torch.zeros(B, S, D, dtype=F64, requires_grad=True) for r in graph.readers}
            logits = naive_hooked_run(model, graph, clean, override=override, offsets=offsets)
            metric(logits).sum().backward()
            for r, name in enumerate(graph.readers):
                grad = offsets[name].grad
                if grad is None:   # a reader whose only path runs through the patched (constant) group
                    continue
                for w in range(graph.reader_prefix[r]):
                    scores[r, w] += (delta[w] * grad).sum()
            runs += 1
    scores /= B * runs
    return torch.tensor([scores[graph.reader_index[r], graph.writer_index[w]].item()
                         for w, r in graph.edges()], dtype=F64)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eap_ig_equals_its_definition(arch, method):
    model = tiny_model(arch, seed=5).double()
    graph = fastedge.EdgeGraph.from_config(model.config)
    clean, corrupted = _ids(2, 5, seed=13)
    steps = 3
    with hf_in_float64():
        scores = attribute(model, clean, corrupted, metric=_metric, method=method, ig_steps=steps)
    reference = _reference_ig(model, graph, clean, corrupted, _metric, method, steps)
    scale = reference.abs().max().item()
    assert scale > 1e-3
    err = (scores.flat() - reference).abs().max().item()
    print(f"max |fastedge - reference| / largest = {err / scale:.3g}")
    # both are exact float64 computations of the same sums in different orders
    assert err <= 1e-9 * scale, f"max |fastedge - reference| = {err:.3g} (largest {scale:.3g})"


def test_one_ig_step_is_the_gradient_at_the_corrupted_input_not_eap():
    """EAP-IG-inputs with one step evaluates alpha = 0 only (the library's
    integration points): the gradient at the corrupted input."""
    model = tiny_model("gpt2", seed=6).double()
    graph = fastedge.EdgeGraph.from_config(model.config)
    clean, corrupted = _ids(2, 5, seed=14)
    one = attribute(model, clean, corrupted, metric=_metric, method="eap-ig-inputs", ig_steps=1).flat()
    eap = attribute(model, clean, corrupted, metric=_metric, method="eap").flat()
    reference = _reference_ig(model, graph, clean, corrupted, _metric, "eap-ig-inputs", 1)
    assert (one - reference).abs().max() <= 1e-9 * reference.abs().max()
    assert (one - eap).abs().max() > 1e-3 * eap.abs().max()


def test_sign_conventions_differ_by_minus_one():
    model = tiny_model("qwen2", seed=7).double()
    clean, corrupted = _ids(2, 5, seed=15)
    gate = attribute(model, clean, corrupted, metric=_metric, method="eap")
    theirs = attribute(model, clean, corrupted, metric=_metric, method="eap", sign="eap-ig")
    assert theirs.sign == "eap-ig"
    assert torch.equal(theirs.flat(), -gate.flat())
    assert torch.equal(gate.with_sign("eap-ig").flat(), theirs.flat())


def test_batches_average_over_examples():
    """Scores are means over examples: batch size changes nothing (up to rounding)."""
    model = tiny_model("llama-gqa", seed=8).double()
    clean, corrupted = _ids(5, 6, seed=16)
    whole = attribute(model, clean, corrupted, metric=_metric, method="eap-ig-inputs", ig_steps=2, batch_size=5)
    split = attribute(model, clean, corrupted, metric=_metric, method="eap-ig-inputs", ig_steps=2, batch_size=2)
    assert torch.allclose(whole.flat(), split.flat(), rtol=1e-10, atol=1e-12 * whole.flat().abs().max())


# -- task metrics ---------------------------------------------------------------------------------

def _task(n=6, seq=7, seed=17, same_answers=False):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        clean = torch.randint(0, VOCAB, (seq,), generator=g).tolist()
        corrupted = torch.randint(0, VOCAB, (seq,), generator=g).tolist()
        positions = [seq - 3, seq - 2]
        if same_answers:
            for p in positions:
                corrupted[p + 1] = clean[p + 1]
        elif any(clean[p + 1] == corrupted[p + 1] for p in positions):
            for p in positions:
                corrupted[p + 1] = (clean[p + 1] + 1) % VOCAB
        examples.append(Example(clean, corrupted, positions, [clean[p + 1] for p in positions],
                                [corrupted[p + 1] for p in positions], source=f"t:{i}"))
    return TaskData("toy", examples)


def _task_metric_reference(model, task, name):
    """The same metric written as a callable on the batch, for the raw form."""
    from fastedge.tasks.base import collate
    batch = collate(task.examples)
    mask = batch.target_mask

    def fn(logits):
        lp = torch.log_softmax(logits, -1)
        clean = batch.clean_answer.clamp(min=0)
        wrong = batch.corrupted_answer.clamp(min=0)
        if name == "logit_diff":
            v = logits.gather(-1, clean[..., None])[..., 0] - logits.gather(-1, wrong[..., None])[..., 0]
        else:
            v = lp.gather(-1, clean[..., None])[..., 0]
        return (v * mask).sum(1) / mask.sum(1)
    return batch, fn


@pytest.mark.parametrize("name", ["logit_diff", "logprob"])
def test_task_metrics_equal_the_raw_form_with_the_same_metric(name):
    model = tiny_model("gpt2", seed=9).double()
    task = _task()
    from_task = attribute(model, task, method="eap", metric=name, batch_size=4)
    assert from_task.metric == name and from_task.n_examples == len(task)
    batch, fn = _task_metric_reference(model, task, name)
    raw = attribute(model, batch.input_ids, batch.corrupted_input_ids, attention_mask=batch.attention_mask,
                    metric=fn, method="eap")
    assert from_task.flat().abs().max() > 1e-5
    assert torch.allclose(from_task.flat(), raw.flat(), rtol=1e-9, atol=1e-12)


def test_default_metric_follows_the_answers():
    model = tiny_model("gpt2", seed=9).double()
    assert attribute(model, _task(), method="eap").metric == "logit_diff"
    assert attribute(model, _task(same_answers=True), method="eap").metric == "logprob"
    with pytest.warns(UserWarning, match="same tokens"):
        attribute(model, _task(same_answers=True), method="eap", metric="logit_diff")


def test_kl_metric_is_zero_for_eap_and_not_for_eap_ig():
    """KL to the full model is minimal at the full model: its EAP gradient is
    0 (the docstring says so); EAP-IG evaluates it away from there."""
    model = tiny_model("mistral", seed=10).double()
    task = _task()
    with pytest.warns(UserWarning, match="gradient 0 at the full model"):
        eap = attribute(model, task, method="eap", metric="kl")
    ig = attribute(model, task, method="eap-ig-inputs", metric="kl", ig_steps=2)
    assert ig.flat().abs().max() > 1e-4
    # (0 up to rounding: the reference distribution sums to 1 only to ~1e-16)
    assert eap.flat().abs().max() < 1e-6 * ig.flat().abs().max()


# -- precision, backends ---------------------------------------------------------------------------

def test_bf16_scores_track_float64():
    model = tiny_model("llama-gqa", seed=11)
    clean, corrupted = _ids(4, 6, seed=18)
    exact = attribute(model.double(), clean, corrupted, metric=_metric, method="eap-ig-inputs", ig_steps=2).flat()
    low = attribute(model.to(torch.bfloat16), clean, corrupted, metric=_metric, method="eap-ig-inputs",
                    ig_steps=2).flat()
    assert low.dtype == F64 and torch.isfinite(low).all()
    # bf16 activations carry 8 bits: each score is a sum of such products; the
    # scores as a whole agree to about 1% (relative L2: 0.73% here), not to float64
    rel = ((low - exact).norm() / exact.norm()).item()
    assert rel < 0.02, f"relative L2 error of bf16 scores {rel:.3g}"


def test_unit_masks_leave_the_model_as_it_was():
    model = tiny_model("gpt2", seed=12).double()
    em = fastedge.patch(model, node_masks=False)
    em.set_circuit([("tok_embeds", "resid_post")])
    fixed = [m.clone() for m in em._fixed_masks]
    clean, corrupted = _ids(2, 5, seed=19)
    attribute(em, clean, corrupted, metric=_metric, method="eap")
    assert all(torch.equal(a, b) for a, b in zip(fixed, em._fixed_masks))
    assert not any(p.grad is not None for p in em.parameters())


# -- scores objects ---------------------------------------------------------------------------------

def test_scores_views_and_file_round_trip(tmp_path):
    model = tiny_model("qwen2", seed=13).double()
    clean, corrupted = _ids(2, 5, seed=20)
    s = attribute(model, clean, corrupted, metric=_metric, method="eap")
    names = s.by_name()
    assert len(names) == s.graph.n_edges
    w, r = s.top(1)[0]
    assert abs(names[(w, r)]) == s.flat().abs().max().item() == abs(s[w, r])
    s.save(tmp_path / "scores.pt")
    back = EdgeScores.load(tmp_path / "scores.pt")
    assert torch.equal(back.flat(), s.flat()) and back.method == "eap" and back.graph == s.graph
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        EdgeScores.load(tmp_path / "other.pt")


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_clear_error():
    model = tiny_model("gpt2", seed=14).double()
    clean, corrupted = _ids(2, 5, seed=21)
    with pytest.raises(ValueError, match="method must be one of"):
        attribute(model, clean, corrupted, metric=_metric, method="eap-ig")
    with pytest.raises(ValueError, match="ig_steps"):
        attribute(model, clean, corrupted, metric=_metric, method="eap-ig-inputs", ig_steps=0)
    with pytest.raises(ValueError, match="needs metric="):
        attribute(model, clean, corrupted, method="eap")
    with pytest.raises(ValueError, match="needs a task"):
        attribute(model, clean, corrupted, metric="logit_diff")
    with pytest.raises(ValueError, match="one value per example"):
        attribute(model, clean, corrupted, metric=lambda logits: logits.sum())
    with pytest.raises(ValueError, match="shape"):
        attribute(model, clean, corrupted[:, :4], metric=_metric)
    with pytest.raises(ValueError, match="corrupted_ids"):
        attribute(model, clean, metric=_metric)
    with pytest.raises(ValueError, match="sign"):
        attribute(model, clean, corrupted, metric=_metric, sign="eap")
    with pytest.raises(ValueError, match="not finite"):
        attribute(model, clean, corrupted, metric=lambda logits: logits[:, 0, 0] * float("nan"))


@pytest.mark.parametrize("objective", ["kl", "mse"])
def test_tasks_scored_on_their_objective_default_to_the_projection(objective):
    """Tracr-style tasks (answers are the full model's own outputs) default
    to the projection onto the full model's output: centred logits for a
    categorical objective, plain values for a numerical one; equal to the
    same metric written out on raw tensors."""
    from fastedge.tasks.base import collate
    model = tiny_model("qwen2", seed=15).double()
    plain = _task(seed=23)
    task = TaskData("objective-task", plain.examples, meta={"faithfulness": "objective", "objective": objective})
    batch = collate(task.examples)
    with torch.no_grad(), hf_in_float64():
        full = model(batch.input_ids, attention_mask=batch.attention_mask).logits

    def written_out(logits):
        cur, ref = logits, full
        if objective == "kl":
            cur, ref = cur - cur.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)
        value = (cur * ref).sum(-1)
        mask = batch.target_mask.to(value.dtype)
        return (value * mask).sum(1) / mask.sum(1)
    with hf_in_float64():
        raw = attribute(model, batch.input_ids, batch.corrupted_input_ids, attention_mask=batch.attention_mask,
                        metric=written_out, method="eap-ig-inputs", ig_steps=2)
        scores = attribute(model, task, method="eap-ig-inputs", ig_steps=2)
    assert scores.metric == "projection"
    assert scores.flat().abs().max() > 1e-4
    assert torch.allclose(scores.flat(), raw.flat(), rtol=1e-9, atol=1e-12 * raw.flat().abs().max())
