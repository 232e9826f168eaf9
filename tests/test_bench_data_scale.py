"""bench/data_scale.py: the flatness verdict and the old cache's size from
its rows, and one real size end to end (a few steps)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import data_scale  # noqa: E402


def _row(n, rss, cpu):
    return {"n_examples": n, "steps": 200, "batch_size": 32, "peak_rss_mb": rss, "store_mb": n * 1e-4,
            "build_s": 0.1, "step_cpu_median_ms": cpu, "step_median_ms": cpu * 1.5, "step_mean_ms": cpu * 1.6,
            "reference_median_ms": cpu / 3, "load_average": 5.0}


def test_verdict_and_the_old_cache():
    flat = [_row(1000, 1000.0, 400.0), _row(10000, 1050.0, 420.0), _row(100000, 1099.0, 439.0)]
    assert abs(data_scale.spread(flat, "peak_rss_mb") - 0.099) < 1e-12
    text = data_scale.markdown(flat, "abc1234", "a CPU", "2026-01-01T00:00Z")
    assert "peak RSS 9.9%" in text and "(limit 10%: flat)" in text and "`abc1234`" in text
    steep = flat[:2] + [_row(100000, 1101.0, 439.0)]
    assert "NOT flat" in data_scale.markdown(steep, "abc1234", "a CPU", "2026-01-01T00:00Z")
    # 0.6 MB per training example sampled; 800 training examples all drawn in 6,400 draws
    per = (data_scale.HALF - 1) * data_scale.VOCAB * 4
    assert f"{800 * (1 - (1 - 1 / 800) ** 6400) * per / 1e9:.1f} GB at 1,000" in data_scale.before(flat)


def test_one_size_runs_end_to_end():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "data_scale.py"), "--sizes", "300", "--steps", "7",
                          "--no-save"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.splitlines()[0])
    assert row["n_examples"] == 300 and row["steps"] == 7 and row["peak_rss_mb"] > 100
    assert 0 < row["reference_median_ms"] < row["step_median_ms"]
    assert "| 300 |" in out.stdout
