"""The main job on the shipped model: `fastedge prune`'s defaults find the
known induction mechanism and a faithful circuit at 90% edge sparsity."""
import torch

from fastedge import shipped
from fastedge.cli import main
from fastedge.circuit import Circuit

# KL(full || circuit) at 90% edge sparsity must stay below this; the empty
# circuit (every edge corrupted) sits near 19 nats on this task, and the
# previous-token head with three induction heads reaches about 1e-5.
KL_BOUND = 0.01


def test_default_prune_finds_previous_token_head_feeding_an_induction_key(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--out", str(out), "--no-progress"]) == 0
    circuit = Circuit.load(out / "circuit.json")
    metrics = circuit.metrics
    assert circuit.edge_sparsity >= 0.9
    heads = shipped.IDENTIFIED_HEADS
    mechanism = [(w, r) for w, r in circuit.edges
                 if w in heads["previous_token"] and r.endswith(".k")
                 and r[: -len(".k")] in heads["induction"]]
    assert mechanism, f"no previous-token -> induction-key edge in {circuit.edges}"
    assert metrics["kl"] < KL_BOUND, metrics
    assert metrics["accuracy"] >= 0.95
