"""Sharded pruning (fastedge.sharding, FSDP2) on the CPU: two gloo ranks
launched once with torchrun prune a tiny float64 model of every
architecture with ``shard="fsdp"`` and end with the masks and multipliers of
one process; the weights really are sharded, at most two units are
unsharded at a time and none after a step; a non-finite loss on one rank
stops both; the command line's ``--shard fsdp`` runs.

This file is also the worker that torchrun runs on every rank
(``python tests/test_sharding.py OUT``).
"""
import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import ARCHITECTURES, VOCAB, tiny_model  # noqa: E402

from fastedge.prune import NonFiniteLossError, prune  # noqa: E402
from fastedge.tasks.induction import make_induction  # noqa: E402

STEPS = 3
# 4 micro-batches of 1 per global batch: ranks 0 and 1 run 2 each. Masks
# start at 3 and the sparsity term is the expected one, so that every
# log_alpha has a gradient from the first step; node multipliers on.
OPTS = dict(batch_size=4, micro_batch_size=1, checkpoint_every=100, progress=False, lr_warmup_steps=1,
            eval_batch_size=8, init_log_alpha=3.0, sparsity_estimate="expected", node_target_sparsity=0.3,
            seed=5, lr=0.2)
# the variants each architecture runs with: the checkpointed reader regions
# (their recomputation in the backward needs the unit unsharded again) and
# the other ablations
VARIANTS = {"gpt2": {}, "llama-gqa": dict(recompute_readers=True), "mistral": dict(ablation="mean"),
            "qwen2": dict(recompute_readers=True), "neox-parallel": dict(recompute_readers=True),
            "neox-sequential": {}, "tracr": dict(ablation="zero", recompute_readers=True)}
NAMES = ARCHITECTURES + ["tracr"]
# saved with save_pretrained and loaded on the meta device, each rank reading its shards
# (fastedge.sharding.load_sharded); gpt2: the unembedding tied to the embedding; neox: renamed keys
LOADED = ["llama-gqa", "gpt2", "neox-parallel"]
TIMEOUT = 400  # a guard against a hang (a collective that one rank never joins)


def _model(name):
    if name == "tracr":
        from fastedge.tracr.modeling import TracrConfig, TracrForCausalLM
        config = TracrConfig(vocab_size=VOCAB, n_positions=16, hidden_size=20, num_hidden_layers=2,
                             num_attention_heads=2, head_dim=5, intermediate_size=13, output_size=VOCAB,
                             causal=True)
        torch.manual_seed(0)
        model = TracrForCausalLM(config).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        return model
    return tiny_model(name, dtype=torch.float64)


def _word_tokenizer():
    """A tokenizer of the tiny models' vocabulary: words w0 .. w36."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w0", eos_token="w0")


def _task():
    return make_induction(n_examples=24, seed=1, vocab_size=VOCAB, half_length=4, first_token=1, bos_token_id=0)


def _prune(name, **extra):
    return prune(_model(name), _task(), target_sparsity=0.5, steps=STEPS, **dict(OPTS, **VARIANTS[name], **extra))


ATTRIBUTED = ["gpt2", "llama-gqa", "neox-parallel"]
ATTRIBUTION_METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")


def _attribution(model_or_em):
    import fastedge
    return {m: fastedge.attribute(model_or_em, _task(), method=m, ig_steps=2, n_examples=6).flat()
            for m in ATTRIBUTION_METHODS}


def _state(result):
    return {"masks": [p.detach().clone() for p in result.edge_model.parameters()], "history": result.history,
            "metrics": result.metrics}


def _worker(out: Path) -> None:
    from fastedge import distributed, sharding
    from torch.distributed.tensor import DTensor
    assert distributed.init_from_env()
    group = distributed.current()
    assert group.world_size == 2
    torch.set_num_threads(1)
    results = {}
    logs = []
    init = sharding.FSDPWeights.__init__

    def logging_init(self, *args, **kwargs):  # every protocol object records its unshards and reshards
        init(self, *args, **kwargs)
        self.log = []
        logs.append(self.log)
    sharding.FSDPWeights.__init__ = logging_init
    try:
        for name in NAMES:
            r = _prune(name, shard="fsdp")
            state = _state(r)
            em = r.edge_model
            weight = em.adapter.blocks[0].state_dict()
            local = {k: v.to_local().clone() for k, v in weight.items() if isinstance(v, DTensor)}
            state["sharded"] = {k: (tuple(weight[k].shape), tuple(v.shape)) for k, v in local.items()}
            state["local"] = local
            state["left_unsharded"] = dict(em._weights._unsharded)
            state["log"] = list(logs[-1])
            results[name] = state
    finally:
        sharding.FSDPWeights.__init__ = init

    # attribution (fastedge.attribute) through a sharded model: its pinned runs drive the units too
    import fastedge
    for name in ATTRIBUTED:
        em = sharding.shard_edge_model(fastedge.patch(_model(name), node_masks=False))
        results[f"attribution-{name}"] = _attribution(em)

    # sharded over two ranks, killed in step 3 after the checkpoint at step 2; one process resumes it (below)
    class Killed(Exception):
        pass
    calls, original = {"n": 0}, torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed()
        return original(self, *args, **kwargs)
    torch.optim.AdamW.step = dying_step
    try:
        prune(_model("gpt2"), _task(), target_sparsity=0.5, steps=STEPS, shard="fsdp", out_dir=str(out / "resume"),
              **dict(OPTS, **VARIANTS["gpt2"], checkpoint_every=2))
    except Killed:
        results["killed_after"] = torch.load(out / "resume" / "checkpoints" / "latest.pt", weights_only=False)["step"]
    finally:
        torch.optim.AdamW.step = original
    for name in LOADED:  # meta-device loading, then pruning the already sharded model
        model = sharding.load_sharded(str(out / f"saved-{name}"), dtype=torch.float64, device="cpu")
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items() if isinstance(v, DTensor)}
        r = prune(model, _task(), target_sparsity=0.5, steps=STEPS, shard="fsdp",
                  **dict(OPTS, **VARIANTS[name]))
        results[f"loaded-{name}"] = dict(_state(r), full=full, buffers=buffers, local=local)

    import fastedge
    forward, calls = fastedge.EdgeModel.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):  # rank 1's first micro-batch of step 2 gives NaN
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if group.rank == 1 and calls["n"] == 3:
            out.logits = out.logits * float("nan")
        return out
    fastedge.EdgeModel.forward = poisoned
    try:
        _prune("llama-gqa", shard="fsdp")
    except NonFiniteLossError as exc:  # on every rank, none left waiting in a collective
        results["non_finite"] = str(exc)
    finally:
        fastedge.EdgeModel.forward = forward

    from fastedge.cli import main  # the command line in the same process group
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["prune", "--steps", "2", "--batch-size", "4", "--n-examples", "24", "--out", str(out / "cli"),
                     "--no-progress", "--device", "cpu", "--shard", "fsdp"])
    results["cli"] = (code, printed.getvalue())
    printed = io.StringIO()  # a saved model: loaded shard by shard, in bf16
    with contextlib.redirect_stdout(printed):
        code = main(["prune", "--model", str(out / "saved-llama-gqa"), "--task", "induction", "--bf16",
                     "--steps", "2", "--batch-size", "4", "--n-examples", "24", "--out", str(out / "cli-loaded"),
                     "--no-progress", "--device", "cpu", "--shard", "fsdp"])
    results["cli-loaded"] = (code, printed.getvalue())
    torch.save(results, out / f"rank{group.rank}.pt")
    distributed.destroy()


def _torchrun(args, cwd: Path):
    from test_distributed import _torchrun as launch
    return launch(args, cwd, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two sharded ranks under torchrun (every architecture in one launch),
    and the same runs in one process."""
    # one launch for the whole session: pytest-xdist's workers share the folder above their own
    # and take turns at the lock; the first runs torchrun, the others read its results
    from filelock import FileLock
    # (under xdist the session's folder is the parent of each worker's; without it, the
    # parent is shared by every pytest session, so the session's own folder is used)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "fsdp-run"
    with FileLock(str(shared / "fsdp-run.lock")):
        if not (out / "done").exists():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir()
            for name in LOADED:
                _model(name).save_pretrained(out / f"saved-{name}")
            _word_tokenizer().save_pretrained(out / "saved-llama-gqa")  # for the command line
            code, output = _torchrun([__file__, str(out)], out)
            assert code == 0, output[-6000:]
            (out / "done").write_text("")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on each rank: the same kernels, the same roundings per micro-batch
    try:
        single = {name: _state(_prune(name)) for name in NAMES}
        for name in ATTRIBUTED:
            single[f"attribution-{name}"] = _attribution(_model(name))
        # resumed in one process, unsharded, from the checkpoint of two sharded ranks
        mine = tmp_path_factory.mktemp("resume") / "resume"  # a copy: other workers resume it too
        shutil.copytree(out / "resume", mine)
        single["resumed"] = _state(prune(_model("gpt2"), _task(), target_sparsity=0.5, steps=STEPS,
                                         out_dir=str(mine), resume=True, **OPTS))
    finally:
        torch.set_num_threads(threads)
    return out, ranks, single


@pytest.mark.parametrize("name", NAMES)
def test_sharded_two_ranks_end_with_the_masks_and_multipliers_of_one_process(run, name):
    _, ranks, single = run
    want = single[name]
    for rank in ranks:
        got = rank[name]
        for x, y in zip(got["masks"], ranks[0][name]["masks"]):
            assert torch.equal(x, y)  # replicated exactly
        torch.testing.assert_close(got["masks"], want["masks"], rtol=1e-12, atol=1e-12)
        assert [h["step"] for h in got["history"]] == list(range(1, STEPS + 1))
        for key in ("loss", "kl", "edge_sparsity", "node_sparsity", "lambda1", "lambda2", "node_lambda1", "lr"):
            assert ([h[key] for h in got["history"]]
                    == pytest.approx([h[key] for h in want["history"]], rel=1e-12, abs=1e-12)), key
        for key in ("kl", "accuracy", "full_accuracy", "empty_kl"):  # evaluation ran sharded too
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-12, abs=1e-12), key
    # the masks moved: the comparison is not between two initial states
    assert min((m - OPTS["init_log_alpha"]).abs().max().item() for m in want["masks"]) > 0.05


@pytest.mark.parametrize("name", ATTRIBUTED)
def test_sharded_attribution_equals_one_process(run, name):
    """EAP and both EAP-IG methods on a sharded model: every rank gets the
    scores of the unsharded model (float64, to rounding)."""
    _, ranks, single = run
    want = single[f"attribution-{name}"]
    for rank in ranks:
        got = rank[f"attribution-{name}"]
        for method in ATTRIBUTION_METHODS:
            assert want[method].abs().max() > 1e-6, method
            torch.testing.assert_close(got[method], want[method], rtol=1e-12, atol=1e-12 * want[method].abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_half_of_every_block_parameter(run, name):
    _, ranks, _ = run
    sharded = ranks[0][name]["sharded"]
    assert sharded, "no parameter of block 0 is a DTensor: the model was not sharded"
    for key, (full, local) in sharded.items():
        assert local[0] == -(-full[0] // 2) and local[1:] == full[1:], key  # dim 0 split over 2 ranks
        assert ranks[1][name]["sharded"][key][1][0] == full[0] - local[0], key
    # the two ranks hold different halves
    assert any(not torch.equal(ranks[0][name]["local"][k], ranks[1][name]["local"][k])
               for k in ranks[0][name]["local"] if ranks[0][name]["local"][k].numel())


@pytest.mark.parametrize("name", NAMES)
def test_at_most_two_units_are_unsharded_and_none_after_the_run(run, name):
    _, ranks, _ = run
    for rank in ranks:
        log = rank[name]["log"]
        assert rank[name]["left_unsharded"] == {}
        live, most, phases = set(), 0, set()
        for what, unit, phase in log:
            phases.add(phase)
            if what in ("unshard", "prefetch"):
                live.add(unit)
            else:
                assert unit in live, (what, unit)
                live.discard(unit)
            most = max(most, len(live))
        assert most <= 2 and live == set()
        assert {"forward", "backward", "end"} <= phases  # the backward unsharded units again, and resharded them
        backward_units = [u for what, u, phase in log if phase == "backward" and what == "unshard"]
        assert None in backward_units and 0 in backward_units, backward_units


@pytest.mark.parametrize("name", LOADED)
def test_a_model_loaded_shard_by_shard_has_the_saved_weights_and_prunes_the_same(run, name):
    _, ranks, single = run
    want = _model(name)
    params = dict(want.named_parameters(remove_duplicate=False))
    for rank in ranks:
        got = rank[f"loaded-{name}"]
        for key, value in got["full"].items():
            assert torch.equal(value, want.state_dict()[key]), key
        for key, value in got["buffers"].items():  # rotary frequencies: recomputed, not left empty
            assert torch.equal(value, dict(want.named_buffers())[key]), key
        for key, shape in got["local"].items():  # each rank holds only its half
            assert shape[0] == -(-params[key].shape[0] // 2) or rank is ranks[1], key
        torch.testing.assert_close(got["masks"], single[name]["masks"], rtol=1e-12, atol=1e-12)
        assert ([h["kl"] for h in got["history"]]
                == pytest.approx([h["kl"] for h in single[name]["history"]], rel=1e-12, abs=1e-12))


def test_one_process_resumes_a_sharded_two_rank_run(run):
    _, ranks, single = run
    assert ranks[0]["killed_after"] == ranks[1]["killed_after"] == 2
    torch.testing.assert_close(single["resumed"]["masks"], single["gpt2"]["masks"], rtol=1e-12, atol=1e-12)
    assert ([h["lambda1"] for h in single["resumed"]["history"]]
            == pytest.approx([h["lambda1"] for h in single["gpt2"]["history"]], rel=1e-12, abs=1e-12))


def test_a_non_finite_loss_on_one_rank_stops_every_sharded_rank(run):
    _, ranks, _ = run
    assert ranks[1]["non_finite"].startswith("step 2: KL is nan")
    assert ranks[0]["non_finite"].startswith("step 2: non-finite loss on rank 1; stopped.")


def test_command_line_shards_under_torchrun(run):
    out, ranks, _ = run
    (code0, printed0), (code1, printed1) = ranks[0]["cli"], ranks[1]["cli"]
    assert code0 == code1 == 0
    assert printed0.count("circuit:") == 1 and printed1 == ""
    assert len((out / "cli" / "log.jsonl").read_text().splitlines()) == 2
    (code0, printed0), (code1, printed1) = ranks[0]["cli-loaded"], ranks[1]["cli-loaded"]
    assert code0 == code1 == 0, printed0
    assert printed0.count("circuit:") == 1 and printed1 == ""
    assert len((out / "cli-loaded" / "log.jsonl").read_text().splitlines()) == 2


def test_shard_is_checked():
    with pytest.raises(ValueError, match="shard must be None .* 'fsdp', got 'zero3'"):
        prune(_model("gpt2"), _task(), steps=1, shard="zero3", **OPTS)
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        prune(_model("gpt2"), _task(), steps=1, shard="fsdp", **OPTS)


def test_command_line_refuses_shard_without_torchrun(tmp_path, capsys):
    from fastedge.cli import main
    code = main(["prune", "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress", "--shard", "fsdp"])
    assert code != 0
    assert "--shard fsdp shards the model over the ranks of a torchrun launch" in capsys.readouterr().err


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
