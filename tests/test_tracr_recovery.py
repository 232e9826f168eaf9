"""The paper's claim, kept: the default command recovers the ground-truth
circuits of the two Tracr programs it studies (reverse, xproportion).

Recovery (`fastedge.tracr.truth`): the circuit contains every necessary
edge, nothing outside the weight-composition circuit, and reproduces every
output of the program on its whole input space under zero ablation.
Runs `fastedge prune --model tracr:<program>` with its defaults, as a user
would, on one CPU thread (about 20-40 s each on this project's CI machine).
"""
import json

import pytest

pytest.importorskip("tracr.compiler.compiling", reason="Tracr is not installed: pip install -e '.[tracr]'")

import fastedge.tracr as ft  # noqa: E402
from fastedge.circuit import Circuit  # noqa: E402
from fastedge.cli import main  # noqa: E402


@pytest.mark.parametrize("program", ["reverse", "xproportion"])
def test_default_command_recovers_the_ground_truth(program, tmp_path, one_torch_thread, capsys):
    out = tmp_path / program
    assert main(["prune", "--model", f"tracr:{program}", "--out", str(out), "--no-progress"]) == 0
    circuit = Circuit.load(out / "circuit.json")
    tm = ft.programs.load(program)
    truth = ft.ground_truth(tm)
    verdict = truth.judge(circuit)
    found = sorted(circuit.edges)
    with capsys.disabled():  # the edge sets, for the record
        print(f"\n{program}: found {len(found)} edges {found}\n  necessary {sorted(truth.necessary)}"
              f"\n  redundant {sorted(truth.redundant)}\n  verdict {verdict}")
    assert verdict["missing_necessary"] == []
    assert verdict["outside_truth"] == []
    assert verdict["outputs_reproduced"] is True
    assert verdict["recovered"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0           # every output reproduced, by the run's own evaluation
    assert circuit.ablation == "zero"
    assert circuit.node_labels                  # drawings name the RASP operations
    assert any("Aggregate" in t for texts in circuit.node_labels.values() for t in texts)
    from fastedge.draw import circuit_to_dot
    head = next(w for w, texts in circuit.node_labels.items() if any("Aggregate" in t for t in texts))
    assert f'"{head}" [' in circuit_to_dot(circuit) and "Aggregate)" in circuit_to_dot(circuit)
    from fastedge.draw import circuit_to_svg
    assert "Aggregate)" in circuit_to_svg(circuit)   # under the name, and in full in its tooltip
