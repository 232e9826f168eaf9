"""bench/memory_sharded.py: one rank's step of sharded pruning on fake tensors
(the layer loop's FSDP protocol over emulated units), and bench/memory.py --ranks."""
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import memory  # noqa: E402
import memory_sharded as ms  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = 2  # 70B-shaped layers, on fake tensors: a trace takes about a second


@pytest.fixture(scope="module")
def fake70():
    return ms.ShardedFakeModel("llama-3-70b", ranks=8, n_layers=LAYERS)


def test_each_rank_holds_one_eighth_of_the_weights(fake70):
    weights, shards = fake70.weights, fake70.shard_bytes
    assert weights / 8 <= shards <= weights / 8 + 8 * 2 * 100  # ceil(numel / 8) per parameter
    assert fake70.block_bytes == sum(p.numel() * 2 for p in fake70.model.model.layers[0].parameters())
    # sharded between steps: every parameter's storage is empty
    assert all(p.untyped_storage().nbytes() == 0 for p in fake70.model.parameters())


def test_sharded_peak_is_the_unsharded_peak_less_the_weights_plus_the_shards_and_live_units(fake70):
    micro, seq = 2, 24
    sharded = fake70.trace(micro, seq)
    plain = memory.FakeBench("llama-3-70b", torch.bfloat16, LAYERS).trace("fastedge", micro, seq)
    others = plain.total - plain.weights     # activations, stack, masks, optimizer state
    units = max(fake70.block_bytes, fake70.root_bytes, fake70.embed_bytes)
    # the same ops in the same order: at any moment the sharded rank holds what one device holds
    # less the weights, plus the shards and at most two unsharded units and one all-gather buffer
    assert sharded["total"] >= others + fake70.shard_bytes + fake70.block_bytes
    assert sharded["total"] <= others + fake70.shard_bytes + 3 * units
    assert sharded["before"] < fake70.shard_bytes + 0.1 * plain.weights  # the shards, not the weights
    assert all(not u.unsharded for u in fake70.units)  # everything resharded after the step


def test_unsharded_units_come_back_for_the_backward(fake70, monkeypatch):
    """The protocol unshards in the backward (the hooks of fastedge.sharding):
    without them the step would run its backward on freed weights."""
    calls = []
    unshard = ms.FakeUnit.unshard

    def spy(self, async_op=False):
        if not self.unsharded:  # (the protocol calls unshard on unsharded units too: a no-op)
            calls.append((fake70.units.index(self), torch.is_grad_enabled()))
        return unshard(self, async_op)
    monkeypatch.setattr(ms.FakeUnit, "unshard", spy)
    fake70.trace(1, 8)
    blocks = list(range(1, 1 + LAYERS))
    forward = [i for i, grad in calls if grad]
    backward = [i for i, grad in calls if not grad]  # the engine runs hooks with grad mode off
    embed = fake70.units.index(fake70.embed)
    assert forward == [embed, *blocks, 0]          # embedding, blocks in order, the final reader's root
    assert backward == [0, *reversed(blocks)]      # root, then the blocks from the last (prefetched)


def test_plan_fits_and_searches(fake70, tmp_path):
    plan = ms.plan("llama-3-70b", 8, {"small": 20.0}, seqs=(16,), n_layers=LAYERS, headroom_gib=0,
                   headroom_frac=0, fit_points=((1, 16), (2, 16), (1, 64)), log=lambda *a: None)
    assert plan["residual"] < 0.05
    lim, = plan["limits"]
    assert lim["traced"]["total"] <= 20e9 < lim["traced_next"]["total"]
    assert lim["traced_next"]["micro_batch"] == lim["max_micro"] + 1
    # the stack and its buffer per token: writers x hidden x 2 bytes, twice
    assert plan["writers"] == LAYERS * 65 + 1 and plan["stack_per_token"] == plan["writers"] * 8192 * 2


def test_command_line_ranks_writes_the_table(tmp_path):
    code = memory.main(["--model", "llama-3-70b", "--layers", "1", "--ranks", "8", "--card", "h100-80gb",
                        "--seqs", "72", "--no-verify", "--out", str(tmp_path)])
    assert code == 0
    md, = tmp_path.glob("memory-sharded-llama-3-70b-8ranks-*.md")
    text = md.read_text()
    assert "`python bench/memory.py --model llama-3-70b --layers 1 --ranks 8" in text
    assert "| llama-3-70b | h100-80gb | 74.4 | 72 |" in text
    assert "limit-sharded" in (tmp_path / "memory.csv").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-3-70b,nope", "--ranks", "8"], "nope"),
    (["--model", "llama-3-70b,qwen2-72b"], "a comma list only with --ranks"),
    (["--model", "llama-3-70b", "--ranks", "0"], "--ranks must be at least 1"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        memory.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_card_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--card 'b200'"):
        memory.main(["--model", "llama-3-70b", "--layers", "1", "--ranks", "8", "--card", "b200",
                     "--out", str(tmp_path)])
