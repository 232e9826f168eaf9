"""Smoke test of the kernel microbenchmark: `bench/ops.py --quick` runs end to
end (tiny shapes, every case, mode and provider) and writes its CSV and
markdown table."""
import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPECTED_COLUMNS = {
    "date", "device", "timing", "torch", "triton", "git_rev", "case", "shape", "dtype", "mode",
    "provider", "status", "samples", "p20_ms", "p50_ms", "p80_ms", "speedup_vs_naive",
    "state_mb", "peak_extra_mb", "note",
}
CASES = {"gpt2-L0", "gpt2-L5", "gpt2-L11", "gpt2-resid_post"}
MODES = {"fwd", "bwd", "fwd+bwd"}
PROVIDERS = {"naive", "torch", "triton", "cuda"}


def test_bench_ops_quick(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the benchmark never runs Triton on the CPU anyway
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ops.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(tmp_path / "ops.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert EXPECTED_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)
    keys = {(r["case"], r["mode"], r["provider"]) for r in rows}
    assert keys == {(c, m, p) for c in CASES for m in MODES for p in PROVIDERS}
    assert len(rows) == len(keys)
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert r["dtype"] == "float32"
        if r["provider"] in ("naive", "torch"):  # always runnable on the CPU
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
            assert 0 < p20 <= p50 <= p80
            assert float(r["speedup_vs_naive"]) > 0
            assert int(r["samples"]) >= 1
        else:
            assert r["note"], "a skipped provider must say why"
    assert all(r["provider"] != "triton" or r["status"] == "skipped" for r in rows)

    md = list(tmp_path.glob("ops-*.md"))
    assert len(md) == 1 and "| case |" in md[0].read_text()


def _load_bench_ops():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fastedge_bench_ops", REPO / "bench" / "ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_bench_never_times_a_wrong_answer():
    import dataclasses

    import torch
    ops = _load_bench_ops()

    class Off(ops.FastedgeProvider):  # right shapes, wrong values
        def forward(self, s):
            (out,) = super().forward(s)
            return (out * 1.001,)

    class OffGrad(ops.FastedgeProvider):  # right forward, wrong mask gradient
        def forward(self, s):
            (out,) = super().forward(s)
            m = s["mask"]
            return (out + (m - m.detach()).sum(),)  # adds 0, but sum(dout) to every d mask

    ops.PROVIDERS["off"] = Off("torch")
    ops.PROVIDERS["offgrad"] = OffGrad("torch")
    model = dataclasses.replace(ops.MODELS["gpt2-small"], batch=2, seq=4, hidden=16)
    data = ops.WriterData.random(model.graph().n_writers, (2, 4, 16), torch.float32,
                                 torch.device("cpu"), 0)
    st = ops.Settings(reps=1, min_time=0.0, max_time=0.05, warmup_ms=1, rep_ms=1)
    cells = ops.run_case(ops.CASE_BY_NAME["gpt2-L5"], model, data, ["naive", "torch", "off", "offgrad"],
                         ["fwd", "bwd"], st, 1, lambda msg: None)
    status = {(c.provider, c.mode): c.status for c in cells}
    assert status[("torch", "fwd")] == status[("torch", "bwd")] == "ok"
    assert status[("off", "fwd")] == status[("off", "bwd")] == "wrong"
    assert status[("offgrad", "fwd")] == "ok" and status[("offgrad", "bwd")] == "wrong"
    assert all(c.timing is None for c in cells if c.status == "wrong")
    del ops.PROVIDERS["off"], ops.PROVIDERS["offgrad"]
