"""Bad input never gives a silent wrong answer (issue 11, "Silent wrong
results"): each case asserts the exact outcome, the same NaN on every backend
or a refusal that names the problem and the value."""
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastedge
from fastedge.circuit import extract_circuit, extract_circuit_by_threshold
from fastedge.prune import prune
from fastedge.tasks.induction import make_induction


def _model(seed=0):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=23, n_positions=32)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def _task(seed=1, n_examples=40):
    return make_induction(n_examples=n_examples, seed=seed, vocab_size=23, half_length=5, first_token=1,
                          bos_token_id=0)


OPTS = dict(batch_size=4, checkpoint_every=3, progress=False, lr_warmup_steps=2, eval_batch_size=8)


def _random_masks(em, seed=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in em.edge_log_alpha:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() * scale)
        em.node_log_alpha.copy_(torch.randn(em.node_log_alpha.shape, generator=g) * scale)


# -- 6. targets at or above 1: the circuit of the deterministic masks above 0.5 ---------------------

def _threshold_reference(em, threshold, node_threshold=0.5):
    """Kept edges by the definition, in float64, before dead-edge pruning."""
    scale = 0.8 / (2 / 3)
    node = torch.sigmoid(em.node_log_alpha.detach().double() * scale) > node_threshold
    g = em.graph
    kept = set()
    for grp, la in zip(g.groups, em.edge_log_alpha):
        z = torch.sigmoid(la.detach().double() * scale)
        for r in range(grp.n_readers):
            for w in range(grp.n_writers):
                if z[r, w] > threshold and node[w]:
                    kept.add((g.writers[w], g.readers[grp.first_reader + r]))
    return kept


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.93])
def test_threshold_extraction_keeps_exactly_the_masks_above_the_threshold(threshold):
    em = fastedge.patch(_model())
    _random_masks(em)
    c = extract_circuit_by_threshold(em, threshold, prune_dead=False)
    expected = _threshold_reference(em, threshold)
    assert 0 < len(expected) < em.graph.n_edges  # the case separates the edges
    assert set(c.edges) == expected
    assert c.info["method"] == "threshold" and c.info["threshold"] == threshold
    assert c.info["target_sparsity"] is None
    # with pruning: a subset, and the same as extract_circuit at that edge count's pruned search
    pruned = extract_circuit_by_threshold(em, threshold)
    assert set(pruned.edges) <= expected
    assert fastedge.extract_circuit_by_threshold is extract_circuit_by_threshold


def test_threshold_extraction_refuses_bad_thresholds_and_nan_masks():
    em = fastedge.patch(_model())
    _random_masks(em)
    for bad in (1.0, -0.1, float("nan"), "half"):
        with pytest.raises(ValueError, match="threshold must be"):
            extract_circuit_by_threshold(em, bad)
    with torch.no_grad():
        em.edge_log_alpha[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        extract_circuit_by_threshold(em)


@pytest.mark.parametrize("target", [1.0, 1.02, 1.5])
def test_prune_with_a_target_at_or_above_one_extracts_by_threshold(target):
    r = prune(_model(), _task(), target_sparsity=target, steps=6, sparsity_warmup_steps=3, lr=0.5,
              init_log_alpha=0.5, **OPTS)
    em = r.edge_model
    expected = extract_circuit_by_threshold(em, 0.5)
    assert r.circuit.edges == expected.edges
    assert r.circuit.info["method"] == "threshold" and r.circuit.info["threshold"] == 0.5
    # the old behaviour (an edge count of 0) would give an empty circuit here
    assert r.circuit.n_edges > 0
    # an explicit circuit sparsity still wins
    r2 = prune(_model(), _task(), target_sparsity=target, steps=2, circuit_sparsity=0.5, **OPTS)
    assert r2.circuit.info["method"] == "exact" and r2.circuit.info["target_sparsity"] == 0.5


def test_extract_circuit_above_one_points_to_the_threshold_extraction():
    em = fastedge.patch(_model())
    with pytest.raises(ValueError, match="extract_circuit_by_threshold"):
        extract_circuit(em, 1.2)


# -- 4. NaN masks: NaN in gives NaN out on every backend; noise must lie in (0, 1) -----------------

from conftest import backend_targets  # noqa: E402
from fastedge import ops  # noqa: E402
from fastedge.backends import get_backend  # noqa: E402

NAN = float("nan")


def _nan_log_alpha(n=37, seed=11):
    """Random log_alphas (float64 source) with NaN at known places, and the
    structural zero / saturation cases beside them."""
    la = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 3
    la[[0, 5, n - 1]] = NAN
    la[7], la[8] = float("-inf"), float("inf")
    return la


def _assert_nan_exactly_where(got, where):
    got = got.detach().cpu()
    assert torch.equal(torch.isnan(got), where), f"NaN at {torch.isnan(got).nonzero().flatten().tolist()}, " \
                                                 f"expected at {where.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", backend_targets())
def test_nan_log_alpha_gives_nan_masks_on_every_backend(target, training):
    backend, device = target
    la = _nan_log_alpha().to(device).requires_grad_(True)
    u = ops.draw_noise(la.shape, generator=torch.Generator().manual_seed(3)).to(device)
    z = fastedge.hard_concrete(la, training=training, u=u if training else None, backend=backend)
    _assert_nan_exactly_where(z, torch.isnan(la.detach().cpu()))
    assert z[7].item() == 0.0 and z[8].item() == 1.0   # -inf and +inf stay exact
    # values and gradients agree with the float64 reference backend, NaN for NaN
    la64 = la.detach().cpu().double().requires_grad_(True)
    u64 = u.cpu().double() if training else None
    z64 = fastedge.hard_concrete(la64, training=training, u=u64, backend="reference")
    assert torch.allclose(z.detach().cpu().double(), z64.detach(), atol=2e-6, rtol=0, equal_nan=True)
    dz = torch.randn(la.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g,) = torch.autograd.grad(z, la, dz.float().to(device))
    (g64,) = torch.autograd.grad(z64, la64, dz)
    assert torch.allclose(g.cpu().double(), g64, atol=2e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("target", backend_targets())
def test_backends_given_noise_outside_the_interval_agree_on_nan(target):
    """Below the public op's check, a backend handed u outside (0, 1) (or NaN)
    gives NaN, not a clamped 0 (the Triton kernels did)."""
    backend, device = target
    la = torch.tensor([0.5, -1.0, 2.0, 1.0], device=device)
    u = torch.tensor([1.5, -0.25, NAN, 0.5], device=device)
    z = get_backend(backend).hard_concrete_forward(la, u, True)
    _assert_nan_exactly_where(z, torch.tensor([True, True, True, False]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("target", backend_targets())
def test_nan_log_alpha_gives_nan_in_sampled_masks_and_the_fused_sum(target, training):
    backend, device = target
    g = torch.Generator().manual_seed(4)
    R, W = 6, 9
    edge = (torch.randn(R, W, generator=g, dtype=torch.float64) * 3).float()
    node = (torch.randn(W, generator=g, dtype=torch.float64) * 3).float()
    edge[1, 2] = NAN
    node[5] = NAN
    edge, node = edge.to(device), node.to(device)
    m, edge_sum = ops.sample_masks(edge, node, seed=7, training=training, backend=backend)
    want = torch.zeros(R, W, dtype=torch.bool)
    want[1, 2] = True
    want[:, 5] = True
    _assert_nan_exactly_where(m, want)
    assert math.isnan(edge_sum.item())
    stack = torch.randn(W + 2, 3, 8, generator=g).to(device)
    out, fused_sum = ops.sampled_masked_writer_sum(stack, edge, node, seed=7, training=training,
                                                   backend=backend)
    assert math.isnan(fused_sum.item())
    # node 5 feeds every reader: every reader's input is NaN
    assert torch.isnan(out.detach().cpu()).all(dim=(1, 2)).tolist() == [True] * R
    # without the NaNs, the same call is finite (the NaN comes from the input, not the op)
    clean_out, clean_sum = ops.sampled_masked_writer_sum(stack, edge.nan_to_num(0.5), node.nan_to_num(0.5),
                                                         seed=7, training=training, backend=backend)
    assert torch.isfinite(clean_out).all() and math.isfinite(clean_sum.item())


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.25, NAN, float("inf")])
@pytest.mark.parametrize("target", backend_targets())
def test_hard_concrete_refuses_noise_outside_the_open_interval(target, bad):
    backend, device = target
    la = torch.zeros(2, 3, device=device)
    u = torch.full((2, 3), 0.5, device=device)
    u[1, 2] = bad
    with pytest.raises(ValueError, match=r"u must lie in the open interval \(0, 1\), got "
                                         + (r"nan" if bad != bad else repr(bad).replace(".", r"\.")) + r" at index \(1, 2\)"):
        fastedge.hard_concrete(la, training=True, u=u, backend=backend)
    # the nearest legal values pass
    u[1, 2] = 1e-7 if bad <= 0 else 1 - 1e-7
    assert torch.isfinite(fastedge.hard_concrete(la, training=True, u=u, backend=backend)).all()


# -- 9. EdgeModel after unpatch; patching twice; weights never get gradients ------------------------

from fastedge.model import UnpatchedError  # noqa: E402


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 23, (2, 7), generator=g), torch.randint(1, 23, (2, 7), generator=g)


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_unpatched_edge_model_refuses_to_run_and_gives_the_model_back():
    model = _model()
    model.train()
    model.transformer.wte.weight.requires_grad_(False)   # a user's own frozen weight
    before = _flags(model)
    em = fastedge.patch(model)
    ids, corrupted = _inputs()
    em(ids, corrupted).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())     # weights never get gradients
    assert all(p.grad is not None for p in em.parameters())
    assert em.unpatch() is model
    assert _flags(model) == before and model.training
    with pytest.raises(UnpatchedError, match="unpatched.*fastedge.patch"):
        em(ids, corrupted)
    with pytest.raises(UnpatchedError):
        em.compute_mean_outputs(ids)
    assert em.unpatch() is model and _flags(model) == before   # a second unpatch changes nothing
    assert all(p.grad is None for p in model.parameters())


def test_patching_twice_then_unpatching_restores_the_original_flags():
    import gc
    model = _model()
    before = _flags(model)
    assert all(before.values())
    ids, corrupted = _inputs(1)
    first = fastedge.patch(model)
    second = fastedge.patch(model)
    second.unpatch()
    # the first patch is still live: it keeps the weights frozen and runs without touching them
    assert not any(_flags(model).values())
    first(ids, corrupted).logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    first.unpatch()
    assert _flags(model) == before          # not the frozen state the second patch found
    # in the other order, and with the first patch dropped instead of unpatched
    a, b = fastedge.patch(model), fastedge.patch(model)
    a.unpatch()
    assert not any(_flags(model).values())
    b.unpatch()
    assert _flags(model) == before
    dropped = fastedge.patch(model)
    kept = fastedge.patch(model)
    del dropped
    gc.collect()
    kept.unpatch()
    assert _flags(model) == before


# -- 1. resuming across tasks; 8. resuming a checkpoint with NaN masks ----------------------------

from fastedge.prune import task_fingerprint  # noqa: E402
from fastedge.tasks.base import Example, TaskData  # noqa: E402


def _checkpoint(out):
    return out / "checkpoints" / "latest.pt"


def _interrupted_run(out, task=None):
    """A 6-step run whose checkpoint says it stopped after step 3; returns the
    checkpoint's state."""
    prune(_model(), task or _task(), target_sparsity=0.5, steps=6, out_dir=str(out), **OPTS)
    state = torch.load(_checkpoint(out), weights_only=False)
    state["step"], state["history"] = 3, state["history"][:3]
    torch.save(state, _checkpoint(out))
    return state


def test_task_fingerprint_sees_every_part_of_the_examples():
    task = _task()
    fp = task_fingerprint(task, "induction")
    assert fp == task_fingerprint(_task(), "induction")          # deterministic
    assert fp["n_train"] + fp["n_validation"] == len(task)

    def changed(**kw):
        e = task.examples[3]
        fields = dict(clean_ids=list(e.clean_ids), corrupted_ids=list(e.corrupted_ids),
                      target_positions=list(e.target_positions), split=e.split)
        fields.update(kw)
        fields["clean_answer"] = [fields["clean_ids"][p + 1] for p in fields["target_positions"]]
        fields["corrupted_answer"] = [fields["corrupted_ids"][p + 1] for p in fields["target_positions"]]
        examples = list(task.examples)
        examples[3] = Example(**fields)
        return task_fingerprint(TaskData(task.name, examples), "induction")["sha256"]

    e = task.examples[3]
    assert changed()  == fp["sha256"]
    assert changed(clean_ids=[e.clean_ids[0] % 22 + 1] + list(e.clean_ids[1:])) != fp["sha256"]
    assert changed(corrupted_ids=list(e.corrupted_ids[:-1]) + [e.corrupted_ids[-1] % 22 + 1]) != fp["sha256"]
    assert changed(target_positions=list(e.target_positions[1:])) != fp["sha256"]
    assert changed(split="validation" if e.split == "train" else "train") != fp["sha256"]
    swapped = list(task.examples)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert task_fingerprint(TaskData(task.name, swapped))["sha256"] != fp["sha256"]


def test_resume_refuses_a_checkpoint_of_another_task(tmp_path):
    _interrupted_run(tmp_path, _task(seed=1))
    other = _task(seed=2)
    other.name = "other-data"
    with pytest.raises(ValueError, match=r"cannot resume: .*latest\.pt was written for task 'induction' "
                                         r"\(\d+ train and \d+ validation examples.*this run's data is "
                                         r"task 'other-data'"):
        prune(_model(), other, target_sparsity=0.5, steps=6, out_dir=str(tmp_path), resume=True, **OPTS)
    # the same data under another name resumes (the examples decide)
    same = _task(seed=1)
    same.name = "renamed"
    r = prune(_model(), same, target_sparsity=0.5, steps=6, out_dir=str(tmp_path), resume=True, **OPTS)
    assert len(r.history) == 6


def test_resume_of_an_old_checkpoint_without_a_task_warns(tmp_path):
    state = _interrupted_run(tmp_path)
    del state["task"]
    torch.save(state, _checkpoint(tmp_path))
    with pytest.warns(UserWarning, match=r"latest\.pt records no task .*without checking"):
        r = prune(_model(), _task(), target_sparsity=0.5, steps=6, out_dir=str(tmp_path), resume=True, **OPTS)
    assert len(r.history) == 6
    assert torch.load(_checkpoint(tmp_path), weights_only=False)["task"] == task_fingerprint(_task(), "induction")


@pytest.mark.parametrize("where", ["edge", "node", "multiplier", "optimizer", "posinf"])
def test_resume_refuses_a_checkpoint_with_non_finite_state(tmp_path, where):
    state = _interrupted_run(tmp_path)
    if where == "edge":
        state["edge_model"]["edge_log_alpha.1"][0, 2] = NAN
        name = r"edge_model\.edge_log_alpha\.1"
    elif where == "node":
        state["edge_model"]["node_log_alpha"][3] = NAN
        name = r"edge_model\.node_log_alpha"
    elif where == "posinf":
        state["edge_model"]["edge_log_alpha.0"][0, 0] = float("inf")
        name = r"edge_model\.edge_log_alpha\.0"
    elif where == "multiplier":
        state["multipliers"]["edge"][1] = float("-inf")
        name = r"multipliers\.edge"
    else:
        state["optimizer"]["state"][0]["exp_avg_sq"].view(-1)[0] = NAN
        name = r"optimizer\.state\.0\.exp_avg_sq"
    torch.save(state, _checkpoint(tmp_path))
    with pytest.raises(ValueError, match=r"cannot resume: .*latest\.pt holds 1 non-finite value\(s\) in " + name):
        prune(_model(), _task(), target_sparsity=0.5, steps=6, out_dir=str(tmp_path), resume=True, **OPTS)


def test_resume_accepts_structural_zeros(tmp_path):
    """-inf log_alphas are structural zeros (mask exactly 0), not damage."""
    state = _interrupted_run(tmp_path)
    state["edge_model"]["edge_log_alpha.0"][0, 0] = float("-inf")
    torch.save(state, _checkpoint(tmp_path))
    r = prune(_model(), _task(), target_sparsity=0.5, steps=6, out_dir=str(tmp_path), resume=True, **OPTS)
    assert r.edge_model.edge_log_alpha[0][0, 0].item() == float("-inf")


# -- the command line: a refusal is one line "fastedge: <message>" and exit status 2

from fastedge.cli import main  # noqa: E402


def _cli_refuses(argv, capsys, match):
    """main(argv) exits 2 with one error line ``fastedge: <message>``
    matching `match` (no traceback); returns the message."""
    import re
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"{argv} exited {rc}: {err}"
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("fastedge: ") and not x.startswith("fastedge: warning:")]
    assert len(lines) == 1, err
    message = lines[0][len("fastedge: "):]
    assert re.search(match, message), f"{message!r} does not match {match!r}"
    return message


def _no_model_load(monkeypatch):
    """Option checks come before the model loads: loading fails the test."""
    import fastedge.cli as cli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(cli, "load_model_and_task", refuse)


# -- 2. no option turns a user's 0 into a default; 7. numeric options checked up front -----------

PRUNE = ["prune", "--no-progress", "--steps", "3", "--n-examples", "40"]


@pytest.mark.parametrize("option,value,match", [
    ("--batch-size", "0", r"batch_size must be at least 1, got 0"),
    ("--micro-batch-size", "0", r"micro_batch_size must be at least 1, got 0"),
    ("--steps", "0", r"steps must be at least 1, got 0"),
    ("--checkpoint-every", "0", r"checkpoint_every must be at least 1, got 0"),
    ("--n-examples", "0", r"--n-examples must be at least 1, got 0"),
    ("--lr", "0", r"lr must be positive .*got 0\.0"),
    ("--lr", "-0.1", r"lr must be positive .*got -0\.1"),
    ("--lr", "nan", r"lr must be a finite number, got nan"),
    ("--lambda-lr", "-1", r"lambda_lr must be positive .*got -1\.0"),
    ("--lambda-lr", "inf", r"lambda_lr must be a finite number, got inf"),
    ("--seed", "-1", r"--seed -1: a seed must be a whole number in \[0, 2\*\*32\)"),
    ("--seed", str(2 ** 32), r"--seed 4294967296: a seed must be a whole number in \[0, 2\*\*32\)"),
    ("--target-sparsity", "-0.5", r"target_sparsity must lie in \[0, 2\], got -0\.5"),
    ("--target-sparsity", "nan", r"target_sparsity must be a finite number, got nan"),
    ("--target-sparsity", "3", r"target_sparsity must lie in \[0, 2\], got 3\.0"),
    ("--circuit-sparsity", "1.5", r"circuit_sparsity must lie in \[0, 1\], got 1\.5"),
    ("--circuit-sparsity", "-inf", r"circuit_sparsity must be a finite number, got -inf"),
])
def test_prune_refuses_bad_numbers_before_loading_the_model(option, value, match, capsys, monkeypatch, tmp_path):
    _no_model_load(monkeypatch)
    _cli_refuses(PRUNE + ["--out", str(tmp_path), f"{option}={value}"], capsys, match)
    assert not (tmp_path / "checkpoints").exists()


def test_an_empty_task_is_refused_not_defaulted(capsys, tmp_path):
    _cli_refuses(PRUNE + ["--out", str(tmp_path), "--task="], capsys, r"--task is empty: give a task name")


@pytest.mark.parametrize("command", ["eval", "compare"])
@pytest.mark.parametrize("option,value,match", [
    ("--batch-size", "0", r"--batch-size must be at least 1, got 0"),
    ("--batch-size", "-3", r"--batch-size must be at least 1, got -3"),
    ("--n-examples", "0", r"--n-examples must be at least 1, got 0"),
    ("--seed", "-1", r"--seed -1: a seed must be a whole number in \[0, 2\*\*32\)"),
])
def test_eval_and_compare_refuse_bad_numbers(command, option, value, match, capsys, monkeypatch, tmp_path):
    _no_model_load(monkeypatch)
    argv = ["eval"] if command == "eval" else ["compare", "a.json", "b.json", "--task", "induction"]
    if command == "compare":   # compare reads its circuits first: give it two
        em = fastedge.patch(_model())
        c = extract_circuit(em, 0.5)
        for name in ("a.json", "b.json"):
            c.save(tmp_path / name)
        argv = ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--task", "induction"]
    _cli_refuses(argv + [f"{option}={value}"], capsys, match)


@pytest.mark.parametrize("options,match", [
    (dict(lr=-0.1), r"lr must be positive"),
    (dict(lambda_lr=float("nan")), r"lambda_lr must be a finite number, got nan"),
    (dict(batch_size=0), r"batch_size must be at least 1, got 0"),
    (dict(steps=2.5), r"steps must be an integer, got 2\.5"),
    (dict(batch_size=True), r"batch_size must be an integer, got True"),
    (dict(micro_batch_size=0), r"micro_batch_size must be at least 1, got 0"),
    (dict(micro_batch_size=9), r"micro_batch_size must lie in \[1, batch_size=4\], got 9"),
    (dict(sparsity_warmup_steps=0), r"sparsity_warmup_steps must be at least 1, got 0"),
    (dict(lr_warmup_steps=-1), r"lr_warmup_steps must be at least 0, got -1"),
    (dict(eval_batch_size=0), r"eval_batch_size must be at least 1, got 0"),
    (dict(seed=-1), r"seed must be at least 0, got -1"),
    (dict(node_target_sparsity=float("inf")), r"node_target_sparsity must be a finite number, got inf"),
    (dict(init_log_alpha=float("nan")), r"init_log_alpha must be a finite number, got nan"),
    (dict(target_sparsity=-0.1), r"target_sparsity must lie in \[0, 2\], got -0\.1"),
    (dict(circuit_sparsity=1.01), r"circuit_sparsity must lie in \[0, 1\], got 1\.01"),
    (dict(ablation="resample"), r"ablation must be one of interchange, zero, mean, got 'resample'"),
])
def test_prune_config_refuses_bad_options(options, match):
    kw = dict(OPTS)
    kw.update(options)
    target = kw.pop("target_sparsity", 0.5)
    steps = kw.pop("steps", 3)
    with pytest.raises(ValueError, match=match):
        fastedge.PruneConfig(target_sparsity=target, steps=steps, **kw).validate()
    with pytest.raises(ValueError, match=match):
        prune(_model(), _task(), target_sparsity=target, steps=steps, **kw)


def test_negative_lr_never_trains():
    """The issue's case: a negative learning rate made masks climb; now refused."""
    with pytest.raises(ValueError, match=r"lr must be positive .* got -0\.8"):
        prune(_model(), _task(), target_sparsity=0.5, steps=3, lr=-0.8, **OPTS)


# -- 3. CPR and CMD as MIB computes them; sweeps that cannot define them are refused ----------------

from fastedge.evaluate import MIB_EDGE_FRACTIONS, check_sweep, faithfulness_areas  # noqa: E402


def test_areas_on_mib_fractions_match_a_float64_trapezoid():
    x = torch.tensor(MIB_EDGE_FRACTIONS, dtype=torch.float64)
    for seed in range(3):
        f = torch.randn(len(x), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.7 + 0.4
        areas = faithfulness_areas(x.tolist(), f.tolist())
        assert areas["cpr"] == pytest.approx(torch.trapezoid(f, x).item(), rel=1e-12, abs=1e-15)
        assert areas["cmd"] == pytest.approx(torch.trapezoid((1 - f).abs(), x).item(), rel=1e-12, abs=1e-15)
        # order of the points does not matter
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        assert faithfulness_areas(x[perm].tolist(), f[perm].tolist()) == pytest.approx(areas, rel=1e-12)
    # a perfect circuit at every size: CMD 0; MIB's curve spans 0.999 of the axis
    assert faithfulness_areas(list(MIB_EDGE_FRACTIONS), [1.0] * 10) == {"cpr": pytest.approx(0.999), "cmd": 0.0}


@pytest.mark.parametrize("fractions,faith,match", [
    ([0.1], [-0.12], r"1 point\(s\) cannot define them"),          # the case: was CPR = CMD = 0
    ([], [], r"0 point\(s\) cannot define them"),
    ([0.1, 0.5], [0.3, 0.8], r"cover only 0\.1 to 0\.5"),          # was integrated over [0.1, 0.5] only
    ([0.0, 0.5], [0.0, 0.8], r"cover only 0 to 0\.5"),
    ([0.002, 1.0], [0.1, 1.0], r"cover only 0\.002 to 1"),
    ([0.0, 0.5, 0.5, 1.0], [0, 0.1, 0.1, 1], r"edge fraction 0\.5 appears more than once"),
    ([-0.1, 1.0], [0.0, 1.0], r"edge fractions lie in \[0, 1\], got -0\.1"),
    ([0.0, float("nan"), 1.0], [0.0, 0.1, 1.0], r"edge fractions lie in \[0, 1\], got nan"),
    ([0.0, 1.0], [0.0, float("nan")], r"finite faithfulness .* at edge fraction 1 it is nan"),
])
def test_areas_refuse_points_that_cannot_define_them(fractions, faith, match):
    with pytest.raises(ValueError, match=match):
        faithfulness_areas(fractions, faith)


def test_check_sweep_defaults_to_mib_and_refuses_narrow_sweeps():
    assert [round(1 - s, 12) for s in check_sweep(None)] == list(MIB_EDGE_FRACTIONS)
    assert check_sweep([0.999, 0, 0.5]) == [0.999, 0.0, 0.5]
    for bad, match in (([0.9], r"1 point"), ([0.5, 0.9], r"cover only 0\.1 to 0\.5"),
                       ([0.0, 1.2], r"sweep sparsities are numbers in \[0, 1\], got 1\.2"),
                       ([0.0, "x"], r"got 'x'")):
        with pytest.raises(ValueError, match=match):
            check_sweep(bad)


@pytest.mark.parametrize("sweep_arg,match", [
    ("0.9", r"1 point\(s\) cannot define them"),
    ("0.5,0.9", r"cover only 0\.1 to 0\.5"),
    ("0,abc", r"--sweep takes edge sparsities .* 'abc' in '0,abc' is not a number"),
    ("", r"--sweep takes edge sparsities .* '' in '' is not a number"),
])
def test_cli_sweep_that_cannot_define_the_areas_is_refused_up_front(sweep_arg, match, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    _cli_refuses(["eval", "--masks", "masks.pt", f"--sweep={sweep_arg}"], capsys, match)


def test_cli_eval_refuses_masks_without_sweep_and_circuit_with_sweep(capsys, monkeypatch):
    _no_model_load(monkeypatch)
    _cli_refuses(["eval", "--masks", "m.pt"], capsys, r"--masks m\.pt is only read with --sweep")
    _cli_refuses(["eval", "--masks", "m.pt", "--sweep", "mib", "--circuit", "c.json"], capsys,
                 r"--circuit and --sweep exclude each other")


# -- 5. strict JSON: no NaN or Infinity in circuit.json, metrics.json, log.jsonl or eval output ------

from fastedge.jsonsafe import dumps as strict_dumps, json_safe  # noqa: E402


def _strict(text):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_safe_writes_null_with_a_note():
    obj = {"a": float("nan"), "b": 1.5, "c": [1.0, float("inf")], "d": {"e": float("-inf")},
           "f": float("nan"), "f_note": "mine", "t": torch.tensor(float("nan"))}
    out = _strict(strict_dumps(obj))
    assert out == {"a": None, "a_note": "not a finite number (nan)", "b": 1.5, "c": [1.0, None],
                   "d": {"e": None, "e_note": "not a finite number (-inf)"}, "f": None, "f_note": "mine",
                   "t": None, "t_note": "not a finite number (nan)"}
    assert json_safe({"x": 2}) == {"x": 2}


def test_default_run_writes_strict_json(tmp_path, capsys):
    """The shipped model's task: clean and corrupted answers agree, so
    faithfulness is undefined; the files say so in null + a note."""
    out = tmp_path / "run"
    assert main(["prune", "--steps", "3", "--batch-size", "4", "--out", str(out), "--no-progress",
                 "--checkpoint-every", "3", "--n-examples", "40"]) == 0
    metrics = _strict((out / "metrics.json").read_text())
    circuit = _strict((out / "circuit.json").read_text())
    for m in (metrics, circuit["metrics"]):
        assert m["faithfulness"] is None and m["faithfulness_note"].startswith("undefined: the full model")
    for line in (out / "log.jsonl").read_text().splitlines():
        _strict(line)
    assert fastedge.Circuit.load(out / "circuit.json").metrics["faithfulness"] is None
    # eval and its sweep print and write strict JSON too
    assert main(["eval", "--circuit", str(out / "circuit.json"), "--n-examples", "20",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert _strict((tmp_path / "eval.json").read_text())["faithfulness"] is None
    assert main(["eval", "--masks", str(out / "masks.pt"), "--sweep", "mib", "--n-examples", "20",
                 "--out", str(tmp_path / "sweep.json")]) == 0
    sweep = _strict((tmp_path / "sweep.json").read_text())
    assert len(sweep["points"]) == len(MIB_EDGE_FRACTIONS)
    assert sweep["cpr"] is None and sweep["cmd"] is None and "finite faithfulness" in sweep["areas_note"]
    assert [p["edge_fraction"] for p in sweep["points"]] == list(MIB_EDGE_FRACTIONS)


# -- the command-line forms of items 1 and 6, on the shipped model ----------------------------------

def test_cli_resume_with_other_data_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["prune", "--steps", "3", "--batch-size", "4", "--out", str(out), "--no-progress",
            "--checkpoint-every", "3"]
    assert main(base + ["--n-examples", "40"]) == 0
    _cli_refuses(base + ["--n-examples", "30", "--resume"], capsys,
                 r"cannot resume: .*latest\.pt was written for task 'induction' \(\d+ train .*this run's data "
                 r"is task 'induction' \(\d+ train")
    assert main(base + ["--n-examples", "40", "--resume"]) == 0      # the same data resumes


def test_cli_target_above_one_extracts_by_threshold(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--steps", "3", "--batch-size", "4", "--out", str(out), "--no-progress",
                 "--n-examples", "40", "--target-sparsity", "1.5"]) == 0
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["extraction"]["method"] == "threshold" and saved["extraction"]["threshold"] == 0.5
    masks = torch.load(out / "masks.pt", weights_only=False)
    from fastedge import shipped
    em = fastedge.patch(shipped.load_shipped_model())
    em.load_state_dict(masks["edge_model"])
    assert saved["edges"] == [list(e) for e in extract_circuit_by_threshold(em, 0.5).edges]
    assert saved["n_edges"] > 0
