"""bench/methods.py and bench/eap_patching.py: their arithmetic against
independent references, and each end to end at a few pruning steps."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import eap_patching  # noqa: E402
import methods  # noqa: E402


def _ranks_reference(x):
    """Average ranks by counting (an independent route): 1 + #smaller + (#equal - 1) / 2."""
    return [1 + sum(b < a for b in x) + (sum(b == a for b in x) - 1) / 2 for a in x]


@pytest.mark.parametrize("n,ties", [(2, False), (7, False), (31, True), (110, True)])
def test_correlations_match_float64_references(n, ties):
    rng = random.Random(n)
    x = [rng.gauss(0, 1) for _ in range(n)]
    y = [a * 0.3 + rng.gauss(0, 1) for a in x]
    if ties:   # many exact zeros on both sides, as the MLP edges of the shipped model give
        for i in range(0, n, 3):
            x[i] = y[i] = 0.0
    t = torch.tensor([x, y], dtype=torch.float64)
    assert eap_patching.pearson(x, y) == pytest.approx(torch.corrcoef(t)[0, 1].item(), rel=1e-12, abs=1e-12)
    assert eap_patching.average_ranks(x) == _ranks_reference(x)
    rx, ry = _ranks_reference(x), _ranks_reference(y)
    want = torch.corrcoef(torch.tensor([rx, ry], dtype=torch.float64))[0, 1].item()
    assert eap_patching.spearman(x, y) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert math.isnan(eap_patching.pearson(x, [1.0] * n))   # no spread: undefined, not 0


def test_top_overlap_counts_by_magnitude():
    effects = [0.0, -5.0, 1.0, 4.0, -0.5]
    estimate = [3.0, 0.1, -2.0, 0.0, 1.0]
    # largest |effects|: 1, 3; largest |estimate|: 0, 2
    assert eap_patching.top_overlap(effects, estimate, k=2) == 0
    assert eap_patching.top_overlap(effects, estimate, k=3) == 1   # {1, 3, 2} & {0, 2, 4}
    assert eap_patching.top_overlap(effects, effects, k=4) == 4


def test_faithfulness_is_one_minus_divergence_over_the_empty_circuits():
    f, d, name = methods.faithfulness_of({"kl": 0.5, "empty_kl": 2.0, "faithfulness": float("nan")}, False)
    assert (f, d, name) == (0.75, 0.5, "kl")
    f, d, name = methods.faithfulness_of({"mse": 3.0, "empty_mse": 4.0, "faithfulness": 0.25}, True)
    assert (f, d, name) == (0.25, 3.0, "mse")
    assert math.isnan(methods.faithfulness_of({"kl": 0.0, "empty_kl": 0.0}, False)[0])


def test_trace_reports_the_first_check_at_the_threshold():
    trace = methods.Trace(every=10, k=3, evaluate_masks=None)
    trace.points = [(0, 0.0, 0.2), (10, 1.5, 0.98), (20, 3.0, 0.995), (30, 4.5, 0.9)]
    assert trace.first(0.99) == (20, 3.0)
    assert trace.first(0.999) == (None, None)
    assert trace.first(0.1) == (0, 0.0)


def _table(stdout, model):
    block = stdout[stdout.index(f"## {model}"):]
    block = block.split("\n## ")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("|").split("|")] for r in rows}


def test_methods_end_to_end_at_a_few_steps():
    models = ["induction"]
    try:
        import tracr.compiler.compiling  # noqa: F401
        models.append("tracr:xproportion")
    except ImportError:
        pass
    out = subprocess.run([sys.executable, str(REPO / "bench" / "methods.py"), "--models", *models,
                          "--methods", "eap", "--steps", "12", "--no-save"],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    for model in models:
        table = _table(out.stdout, model)
        assert list(table) == ["eap", *methods.PRUNING], table
        k = int(out.stdout.split(f"## {model}")[1].split("k = ")[1].split(",")[0])
        for name, cells in table.items():
            edges, faith = int(cells[2]), float(cells[3])
            assert 0 < edges and faith <= 1.0 + 1e-9, (name, cells)
            if name == "eap":   # from scores: never more than asked
                assert edges <= k
            cpr, cmd = float(cells[6]), float(cells[7])
            assert 0 <= cmd and cpr <= 0.999 + 1e-9 and cpr + cmd >= 0.999 - 1e-6, (name, cells)
        if model.startswith("tracr"):   # recall @k, recovered @k, recall @|N|, precision @|N|, recovered @|N|
            for cells in table.values():
                recall_k, recall, precision = float(cells[8]), float(cells[10]), float(cells[11])
                assert all(0 <= x <= 1 for x in (recall_k, recall, precision)), cells
                assert cells[9] in ("yes", "no") and cells[12] in ("yes", "no"), cells
                if cells[12] == "yes":   # recovered: every necessary edge, nothing outside the truth
                    assert recall == 1.0 and precision == 1.0, cells


def test_eap_patching_end_to_end():
    rows, detail = eap_patching.measure(n_examples=20, methods=("eap",))
    (row,) = rows
    assert row["n_edges"] == len(detail["effect"]) == len(detail["eap"]) == 110
    assert -1 <= row["pearson"] <= 1 and -1 <= row["spearman"] <= 1
    # the shipped model's MLPs write exactly 0: their out-edges change nothing, and score 0
    mlp = [i for i, e in enumerate(detail["edges"]) if e.startswith(("m0->", "m1->"))]
    assert mlp and all(detail["effect"][i] == 0 and detail["eap"][i] == 0 for i in mlp)
    assert row["max_abs_effect"] > 0
    text = eap_patching.markdown(rows, "abc1234", "a CPU", "2026-01-01T00:00Z", "python bench/eap_patching.py",
                                 detail)
    assert "| eap |" in text and "`abc1234`" in text
    top = max(range(110), key=lambda i: abs(detail["effect"][i]))
    assert f"| {detail['edges'][top]} | {detail['effect'][top]:.3g} | {detail['eap'][top]:.3g} |" in text
