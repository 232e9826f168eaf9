"""Data-parallel pruning (fastedge.distributed) on the CPU: two gloo ranks
launched with torchrun end with the masks and multipliers of one process on
the same global batches, write the log and the checkpoint once, resume, and
refuse a global batch that does not split evenly over the ranks.

This file is also the worker that torchrun runs on every rank
(``python tests/test_distributed.py OUT``).
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fastedge.prune import NonFiniteLossError, prune
from fastedge.tasks.induction import make_induction

STEPS = 4
# 4 micro-batches of 2 per global batch of 8: ranks 0 and 1 run 2 each. Masks
# start at 3 (not clamped at 1) and the sparsity term is the expected one, so
# that every log_alpha has a gradient from the first step; node multipliers on.
OPTS = dict(batch_size=8, micro_batch_size=2, checkpoint_every=2, progress=False, lr_warmup_steps=2,
            eval_batch_size=8, init_log_alpha=3.0, sparsity_estimate="expected", node_target_sparsity=0.3,
            seed=5)
TIMEOUT = 300  # a guard against a hang; the launch takes about 25 s


def _model():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=23, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval().double()  # float64: only the summation order differs


def _task():
    return make_induction(n_examples=40, seed=1, vocab_size=23, half_length=5, first_token=1, bos_token_id=0)


def _state(result):
    """The masks and the history (which has the edge multipliers of every step)."""
    return {"masks": [p.detach().clone() for p in result.edge_model.parameters()], "history": result.history}


def _worker(out: Path) -> None:
    from fastedge import distributed
    assert distributed.init_from_env()
    group = distributed.current()
    assert group.world_size == 2
    torch.set_num_threads(1)
    results = {}
    r = prune(_model(), _task(), target_sparsity=0.5, steps=STEPS, out_dir=str(out / "dp"), **OPTS)
    results["dp"] = _state(r)

    class Killed(Exception):
        pass
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # every rank dies in step 3, after the checkpoint at step 2
            raise Killed()
        return original(self, *args, **kwargs)
    torch.optim.AdamW.step = dying_step
    try:
        prune(_model(), _task(), target_sparsity=0.5, steps=STEPS, out_dir=str(out / "resumed"), **OPTS)
    except Killed:
        results["killed_after"] = torch.load(out / "resumed" / "checkpoints" / "latest.pt",
                                             weights_only=False)["step"]
    finally:
        torch.optim.AdamW.step = original
    r = prune(_model(), _task(), target_sparsity=0.5, steps=STEPS, out_dir=str(out / "resumed"), resume=True,
              **OPTS)
    results["resumed"] = _state(r)

    try:
        prune(_model(), _task(), target_sparsity=0.5, steps=1, **dict(OPTS, batch_size=6))
    except ValueError as exc:
        results["bad_split"] = str(exc)

    import fastedge
    forward, calls = fastedge.EdgeModel.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):  # rank 1's first micro-batch of step 2 (1-based, as in log.jsonl) gives NaN
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if group.rank == 1 and calls["n"] == 3:
            out.logits = out.logits * float("nan")
        return out
    fastedge.EdgeModel.forward = poisoned
    try:
        prune(_model(), _task(), target_sparsity=0.5, steps=STEPS, **OPTS)
    except NonFiniteLossError as exc:  # on every rank: none waits for the others
        results["non_finite"] = str(exc)
    finally:
        fastedge.EdgeModel.forward = forward

    from fastedge.cli import main  # the command line in the same process group
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["prune", "--steps", "2", "--batch-size", "4", "--n-examples", "24", "--out", str(out / "cli"),
                     "--no-progress", "--device", "cpu"])
    results["cli"] = (code, printed.getvalue())
    torch.save(results, out / f"rank{group.rank}.pt")
    distributed.destroy()


def _torchrun(args, cwd: Path, timeout: float = TIMEOUT):
    """torchrun with two ranks; on a timeout its whole process group (the
    agent and both workers) is killed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{output[-4000:]}")
    return proc.returncode, output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two ranks under torchrun, and the same runs in one process."""
    out = tmp_path_factory.mktemp("dp")
    code, output = _torchrun([__file__, str(out)], out)
    assert code == 0, output[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on each rank: the same kernels, the same roundings per micro-batch
    try:
        single = prune(_model(), _task(), target_sparsity=0.5, steps=STEPS, out_dir=str(out / "single"), **OPTS)
    finally:
        torch.set_num_threads(threads)
    return out, ranks, _state(single)


def _assert_same_run(got, want):
    torch.testing.assert_close(got["masks"], want["masks"], rtol=1e-12, atol=1e-12)
    got_h, want_h = got["history"], want["history"]
    assert [h["step"] for h in got_h] == [h["step"] for h in want_h] == list(range(1, STEPS + 1))
    for key in ("loss", "kl", "edge_sparsity", "lambda1", "lambda2", "target", "lr"):
        assert [h[key] for h in got_h] == pytest.approx([h[key] for h in want_h], rel=1e-12, abs=1e-12), key


def test_two_ranks_end_with_the_masks_and_multipliers_of_one_process(run):
    out, ranks, single = run
    for rank in ranks:  # replicated exactly, and equal to one process up to the summation order
        for x, y in zip(rank["dp"]["masks"], ranks[0]["dp"]["masks"]):
            assert torch.equal(x, y)
        _assert_same_run(rank["dp"], single)
    dp = torch.load(out / "dp" / "checkpoints" / "latest.pt", weights_only=False)
    one = torch.load(out / "single" / "checkpoints" / "latest.pt", weights_only=False)
    assert dp["step"] == one["step"] == STEPS and dp["config"]["micro_batch_size"] == 2
    assert set(dp["multipliers"]) == {"edge", "node"}
    torch.testing.assert_close(dp["multipliers"], one["multipliers"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp["edge_model"], one["edge_model"], rtol=1e-12, atol=1e-12)
    assert int(dp["edge_model"]["step"]) == STEPS * 4  # training forwards, as one process counts them
    # the masks moved: the comparison is not between two initial states
    assert min((m - OPTS["init_log_alpha"]).abs().max().item() for m in single["masks"]) > 0.1


def test_only_rank_0_writes_the_log_checkpoint_and_masks(run):
    out, _, _ = run
    files = sorted(str(p.relative_to(out / "dp")) for p in (out / "dp").rglob("*"))
    assert files == ["checkpoints", "checkpoints/latest.pt", "log.jsonl", "masks.pt"]
    lines = (out / "dp" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))


def test_killed_and_resumed_data_parallel_run_ends_like_one_process(run):
    out, ranks, single = run
    for rank in ranks:
        assert rank["killed_after"] == 2  # the checkpoint it resumed from
        _assert_same_run(rank["resumed"], single)
    lines = (out / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))


def test_a_non_finite_loss_on_one_rank_stops_every_rank(run):
    _, ranks, _ = run
    assert ranks[1]["non_finite"].startswith("step 2: KL is nan")
    assert ranks[0]["non_finite"].startswith("step 2: non-finite loss on rank 1; stopped. no checkpoint")


def test_command_line_under_torchrun_prints_and_writes_once(run):
    out, ranks, _ = run
    (code0, printed0), (code1, printed1) = ranks[0]["cli"], ranks[1]["cli"]
    assert code0 == code1 == 0
    assert printed0.count("circuit:") == 1 and printed1 == ""
    assert {"circuit.json", "metrics.json", "log.jsonl", "masks.pt", "checkpoints"} <= {
        p.name for p in (out / "cli").iterdir()}
    assert len((out / "cli" / "log.jsonl").read_text().splitlines()) == 2


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(run):
    _, ranks, _ = run
    for rank in ranks:
        message = rank["bad_split"]
        assert "2 ranks" in message and "batch_size 6" in message and "micro_batch_size 2" in message
        assert "3 micro-batches" in message and "multiple of micro_batch_size * world_size = 4" in message


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
