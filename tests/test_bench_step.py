"""Smoke test of the pruning-step benchmark: `bench/step.py --quick` runs the
floor, fastedge and the authors' design on a 2-layer GPT-2-shaped model on the
CPU, writes its CSV and markdown, and reports the ratios the issue asks for.
No timing is asserted (timings belong to benchmarks); memory is: the authors'
design keeps more live tensors than fastedge in the same step."""
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "step.py"), "--quick", "--device", "cpu",
                           "--kinds", "floor,fastedge,naive", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "step.csv")))
    assert [r["kind"] for r in rows] == ["floor", "fastedge", "naive"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["device"] and r["git_rev"] and r["torch"]
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["peak_mb"]) > float(r["weights_mb"]) > 0
        assert float(r["tokens_per_s"]) > 0
    by = {r["kind"]: r for r in rows}
    assert by["fastedge"]["backend"] == "torch"
    # the ratios are the same run's figures
    fe, nv, fl = by["fastedge"], by["naive"], by["floor"]
    assert abs(float(fe["naive_time_ratio"]) - float(nv["p50_ms"]) / float(fe["p50_ms"])) < 1e-3 * float(fe["naive_time_ratio"]) + 1e-3
    assert abs(float(fe["x_floor"]) - float(fe["p50_ms"]) / float(fl["p50_ms"])) < 1e-3 * float(fe["x_floor"]) + 1e-3
    assert float(fe["naive_mem_ratio"]) > 1.0   # the authors' design holds more in the same step
    mds = list(tmp_path.glob("step-gpt2-small-*.md"))
    assert len(mds) == 1 and "| fastedge |" in mds[0].read_text()
