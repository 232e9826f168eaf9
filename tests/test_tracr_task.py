"""The Tracr task: the input space as examples whose targets are the model's
own outputs, and the objectives it asks for. Built on a small hand-made
Tracr-style model (no Tracr needed) and, where Tracr is installed, on the
paper's programs."""
import math

import pytest
import torch

import fastedge
from fastedge import objectives
from fastedge.tasks.base import Example, TaskDataError, collate
from fastedge.tracr import tasks as tracr_tasks
from fastedge.tracr.convert import TracrModel
from fastedge.tracr.inputs import _nth_input, input_space, input_space_size
from fastedge.tracr.modeling import TracrConfig, TracrForCausalLM


def _random_tracr(categorical=True, seed=0, layers=2, heads=2, vocab=("a", "b", "c"), max_len=4):
    torch.manual_seed(seed)
    input_vocab = ["BOS", "pad", *vocab]
    out_vocab = [0, 1, 2] if categorical else None
    cfg = TracrConfig(vocab_size=len(input_vocab), n_positions=max_len + 1, hidden_size=12,
                      num_hidden_layers=layers, num_attention_heads=heads, head_dim=3,
                      intermediate_size=8, output_size=3 if categorical else 1,
                      categorical_output=categorical, input_vocab=input_vocab, output_vocab=out_vocab,
                      bos_token="BOS", pad_token="pad", max_seq_len=max_len, program_name="rand")
    model = TracrForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return TracrModel(model=model.eval(), name="rand")


def test_input_space_enumerates_and_samples_without_listing():
    tm = _random_tracr()
    every = input_space(tm)
    assert len(every) == input_space_size(tm) == 3 + 9 + 27 + 81
    assert len(set(every)) == len(every) and every == sorted(every, key=lambda s: (len(s), s))
    assert all(_nth_input(tm.input_vocab, tm.max_seq_len, i) == x for i, x in enumerate(every))
    sample = input_space(tm, 17, seed=3)
    assert len(sample) == len(set(sample)) == 17 and set(sample) <= set(every)
    assert sample == input_space(tm, 17, seed=3) and sample != input_space(tm, 17, seed=4)
    with pytest.raises(ValueError, match="n_examples must be positive"):
        input_space(tm, 0)


@pytest.mark.parametrize("categorical", [True, False])
def test_task_targets_are_the_models_own_outputs(categorical):
    tm = _random_tracr(categorical)
    data = tracr_tasks.task(tm)
    assert len(data) == input_space_size(tm)
    assert data.meta["objective"] == ("kl" if categorical else "mse")
    batch = collate(data.examples)
    with torch.no_grad():
        logits = tm.model(batch.input_ids, attention_mask=batch.attention_mask).logits
    for row, ex in enumerate(data.examples):
        n = len(ex.meta["input"])
        assert ex.target_positions == list(range(1, n + 1))      # every position but BOS
        assert ex.clean_ids[0] == tm.config.input_vocab.index("BOS")
        if categorical:
            assert ex.clean_answer == logits[row, 1:n + 1].argmax(-1).tolist()
        corrupted_len = len(ex.corrupted_ids)
        assert corrupted_len == len(ex.clean_ids)                  # same length: interchange works


def test_large_spaces_are_sampled(monkeypatch):
    tm = _random_tracr()
    monkeypatch.setattr(tracr_tasks, "MAX_TASK_INPUTS", 50)
    assert len(tracr_tasks.task(tm)) == 50
    assert len(tracr_tasks.task(tm, n_examples=70)) == 70


def test_answer_offset_zero_examples_are_checked():
    with pytest.raises(TaskDataError, match="out of range"):
        Example([0, 1, 2], [0, 1, 2], [3], [0], [0], answer_offset=0)
    with pytest.raises(TaskDataError, match="clean_answer has 1 entries for 2 target positions"):
        Example([0, 1, 2], [0, 1, 2], [1, 2], [0], [0, 0], answer_offset=0)
    with pytest.raises(TaskDataError, match="answer_offset must be 0 or 1"):
        Example([0, 1, 2], [0, 1, 2], [1], [0], [0], answer_offset=2)
    Example([0, 1, 2], [0, 1, 2], [1, 2], [5, 6], [5, 6], answer_offset=0)   # last position allowed


@pytest.mark.parametrize("name", ["kl", "mse"])
def test_objectives_against_float64(name):
    g = torch.Generator().manual_seed(1)
    full, circ = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    T = 0.3
    obj = objectives.Objective(name, T)
    got = obj.divergence(obj.reference(full), circ)
    f, c = full.double() / T, circ.double() / T
    if name == "kl":
        p, q = f.softmax(-1), c.softmax(-1)
        want = (p * (p.log() - q.log())).sum(-1).mean()
    else:
        want = ((c - f) ** 2).sum(-1).mean()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    assert obj.divergence(obj.reference(full), full).abs().item() < 1e-6


def test_objective_is_checked():
    with pytest.raises(ValueError, match="objective must be one of"):
        objectives.Objective("l1")
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        objectives.Objective("kl", 0.0)
    data = fastedge.tasks.base.TaskData("t", [], {"objective": "xent"})
    with pytest.raises(ValueError, match="task 't'.*objective must be one of"):
        objectives.objective_of(data)


@pytest.mark.parametrize("categorical", [True, False])
def test_prune_and_evaluate_run_on_the_task(categorical, one_torch_thread):
    tm = _random_tracr(categorical)
    data = tracr_tasks.task(tm, n_examples=40, seed=1)
    result = fastedge.prune(tm.model, data, ablation="zero", target_sparsity=0.5, steps=3, batch_size=8,
                            node_masks=False, progress=False)
    m = result.metrics
    key = "kl" if categorical else "mse"
    assert set(m) >= {key, f"empty_{key}", "accuracy", "faithfulness"}
    assert all(math.isfinite(m[k]) for k in (key, f"empty_{key}", "accuracy"))
    # the full circuit reproduces every output: divergence 0, accuracy 1
    em = result.edge_model
    full = fastedge.Circuit(edges=list(em.graph.edges()), nodes=list(em.graph.writers), graph=em.graph,
                            ablation="zero")
    mf = fastedge.evaluate(em, data, full)
    # float32: the edge model's outputs differ from the plain model's by rounding
    # (about 1e-5 here), squared (mse) over the temperature 0.1
    assert mf[key] < 1e-6 and mf["accuracy"] == 1.0 and mf["faithfulness"] == pytest.approx(1.0, abs=1e-5)
