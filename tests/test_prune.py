"""The pruning loop on a tiny random-weight model: it learns, is repeatable,
resumes to the same masks, and stops cleanly on a non-finite loss."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastedge
from fastedge.prune import NonFiniteLossError, PruneConfig, prune
from fastedge.tasks.induction import make_induction


def _model():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=23, n_positions=32)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def _task():
    return make_induction(n_examples=40, seed=1, vocab_size=23, half_length=5, first_token=1, bos_token_id=0)


def _masks(em):
    return [p.detach().clone() for p in em.parameters()]


OPTS = dict(batch_size=4, checkpoint_every=3, progress=False, lr_warmup_steps=2, eval_batch_size=8)


def test_prune_schedules_the_target_ascends_the_multipliers_and_hits_the_sparsity():
    result = prune(_model(), _task(), target_sparsity=0.6, steps=12, sparsity_warmup_steps=6, **OPTS)
    assert len(result.history) == 12
    first, last = result.history[0], result.history[-1]
    assert first["target"] == pytest.approx(0.1) and last["target"] == pytest.approx(0.6)
    # masks start at 1 (sparsity 0 < target): ascent drives lambda1 down, steadily
    lambdas = [h["lambda1"] for h in result.history]
    assert all(b < a for a, b in zip(lambdas, lambdas[1:]))
    assert result.history[1]["lr"] == pytest.approx(0.8) and first["lr"] == pytest.approx(0.4)
    c = result.circuit
    assert abs(c.edge_sparsity - 0.6) < 0.15  # dead-edge pruning may overshoot a little on a tiny graph
    for key in ("kl", "logit_diff", "accuracy", "faithfulness"):
        assert key in result.metrics


def test_same_seed_same_masks_and_micro_batches_match():
    a = prune(_model(), _task(), target_sparsity=0.5, steps=5, seed=3, **OPTS)
    b = prune(_model(), _task(), target_sparsity=0.5, steps=5, seed=3, **OPTS)
    for x, y in zip(_masks(a.edge_model), _masks(b.edge_model)):
        assert torch.equal(x, y)
    c = prune(_model(), _task(), target_sparsity=0.5, steps=5, seed=4, **OPTS)
    assert any(not torch.equal(x, y) for x, y in zip(_masks(a.edge_model), _masks(c.edge_model)))


def test_gradient_accumulation_runs_and_learns():
    r = prune(_model(), _task(), target_sparsity=0.5, steps=4, micro_batch_size=2, **OPTS)
    assert len(r.history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in r.history)


def test_killed_and_resumed_run_ends_with_the_same_masks(tmp_path):
    full = prune(_model(), _task(), target_sparsity=0.5, steps=9, out_dir=str(tmp_path / "a"), **OPTS)

    class Killed(Exception):
        pass
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # killed during step 5, after the checkpoint at step 3
            raise Killed()
        return original(self, *args, **kwargs)
    torch.optim.AdamW.step = dying_step
    try:
        with pytest.raises(Killed):
            prune(_model(), _task(), target_sparsity=0.5, steps=9, out_dir=str(tmp_path / "b"), **OPTS)
    finally:
        torch.optim.AdamW.step = original
    state = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["step"] == 3
    resumed = prune(_model(), _task(), target_sparsity=0.5, steps=9, out_dir=str(tmp_path / "b"),
                    resume=True, **OPTS)
    for x, y in zip(_masks(full.edge_model), _masks(resumed.edge_model)):
        assert torch.equal(x, y)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_other_settings(tmp_path):
    prune(_model(), _task(), target_sparsity=0.5, steps=3, out_dir=str(tmp_path), **OPTS)
    with pytest.raises(ValueError, match="cannot resume with different settings.*seed"):
        prune(_model(), _task(), target_sparsity=0.5, steps=3, out_dir=str(tmp_path), resume=True,
              seed=9, **OPTS)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    model = _model()
    original = fastedge.EdgeModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            out.logits = out.logits * float("nan")
        return out
    fastedge.EdgeModel.forward = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 5: KL is nan.*last good checkpoint .* \(after step 3\)"):
            prune(model, _task(), target_sparsity=0.5, steps=9, out_dir=str(tmp_path), **OPTS)
    finally:
        fastedge.EdgeModel.forward = original
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)["step"] == 3
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]  # the message's step 5 is the next


def test_config_errors():
    with pytest.raises(ValueError, match="micro_batch_size"):
        PruneConfig(batch_size=4, micro_batch_size=8).validate()
    with pytest.raises(ValueError, match="steps"):
        PruneConfig(steps=0).validate()


def test_bf16_frozen_model_keeps_fp32_masks():
    r = prune(_model(), _task(), target_sparsity=0.5, steps=3, bf16=True, **OPTS)
    em = r.edge_model
    assert em.adapter.token_embedding.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in em.parameters())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in r.history)
