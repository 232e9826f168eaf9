"""Smoke test of the kernel microbenchmark: `bench/ops.py --quick` runs end to
end (tiny shapes, every case, op, mode and provider) and writes its CSV and
markdown table; its checks refuse wrong answers for both ops; its CSV keeps
the rows of a file written with an older header."""
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXPECTED_COLUMNS = {
    "date", "device", "timing", "torch", "triton", "git_rev", "case", "op", "shape", "dtype",
    "mode", "provider", "status", "samples", "p20_ms", "p50_ms", "p80_ms", "speedup_vs_naive",
    "state_mb", "peak_extra_mb", "bytes_moved", "bw_gb_s", "frac_copy_bw", "copy_bw_gb_s",
    "copy_bw_method", "note",
}
CASES = {"gpt2-L0", "gpt2-L5", "gpt2-L11", "gpt2-resid_post"}
OPS = {"masked", "sampled"}
MODES = {"fwd", "bwd", "fwd+bwd"}
PROVIDERS = {"naive", "torch", "triton", "cuda"}
# The header of bench/results/ops.csv before the op and bandwidth columns.
OLD_HEADER = ("date,device,timing,torch,triton,fastedge,git_rev,threads,load1,case,model,readers,"
              "writers,total_writers,shape,dtype,mode,provider,status,samples,p20_ms,p50_ms,p80_ms,"
              "speedup_vs_naive,state_mb,peak_extra_mb,mem_method,max_abs_err_vs_naive,note").split(",")


def _quick_bytes(op, mode, R, W, G, N=2 * 8 * 64, e=4):
    """bytes_moved of the module docstring, written out again (float32, --quick T = 2x8x64)."""
    extra = 4 if op == "sampled" else 0
    fwd = W * N * e + G * N * e + R * W * 4 + R * N * e + extra
    bwd = R * N * e + W * N * e + 2 * W * N * 4 + 2 * R * W * 4 + extra
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def test_bench_ops_quick(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the benchmark never runs Triton on the CPU anyway
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ops.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(tmp_path / "ops.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert EXPECTED_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)
    keys = {(r["case"], r["op"], r["mode"], r["provider"]) for r in rows}
    assert keys == {(c, o, m, p) for c in CASES for o in OPS for m in MODES for p in PROVIDERS}
    assert len(rows) == len(keys)

    copy_bw = {r["copy_bw_gb_s"] for r in rows}
    assert len(copy_bw) == 1 and float(copy_bw.pop()) > 0, "one copy bandwidth per run, measured"
    assert all("MiB" in r["copy_bw_method"] and "CPU" in r["copy_bw_method"] for r in rows)
    shapes = {"gpt2-L0": (37, 14, 2), "gpt2-L5": (37, 79, 2), "gpt2-L11": (37, 157, 2),
              "gpt2-resid_post": (1, 158, 1)}  # R, W, base rows
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert r["dtype"] == "float32"
        if r["provider"] in ("naive", "torch"):  # always runnable on the CPU, both ops
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
            assert 0 < p20 <= p50 <= p80
            assert float(r["speedup_vs_naive"]) > 0
            assert int(r["samples"]) >= 1
            nbytes = int(r["bytes_moved"])
            assert nbytes == _quick_bytes(r["op"], r["mode"], *shapes[r["case"]]), r
            bw = float(r["bw_gb_s"])
            assert bw > 0
            assert abs(bw - nbytes / (p50 * 1e-3) / 1e9) <= 1e-3 * bw  # bytes / p50, GB/s
            frac = float(r["frac_copy_bw"])
            assert frac > 0
            assert abs(frac - bw / float(r["copy_bw_gb_s"])) <= 1e-2 * frac
        else:
            assert r["note"], "a skipped provider must say why"
            assert r["bytes_moved"] == r["bw_gb_s"] == r["frac_copy_bw"] == ""
    assert all(r["provider"] != "triton" or r["status"] == "skipped" for r in rows)

    md = list(tmp_path.glob("ops-*.md"))
    assert len(md) == 1
    text = md[0].read_text()
    assert "| case | op |" in text and "| GB/s | % of copy bw |" in text
    assert "| sampled |" in text and "| masked |" in text
    assert "copy bandwidth of this device" in text


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


def _run_bad_providers(ops, op, providers, bad_names):
    import dataclasses

    import torch
    table = ops.OPS[op].providers
    table.update(providers)
    try:
        model = dataclasses.replace(ops.MODELS["gpt2-small"], batch=2, seq=4, hidden=16)
        data = ops.WriterData.random(model.graph().n_writers, (2, 4, 16), torch.float32,
                                     torch.device("cpu"), 0)
        st = ops.Settings(reps=1, min_time=0.0, max_time=0.05, warmup_ms=1, rep_ms=1)
        cells = ops.run_case(ops.CASE_BY_NAME["gpt2-L5"], model, data, ["naive", "torch", *bad_names],
                             ["fwd", "bwd"], st, 1, lambda msg: None, op=op)
    finally:
        for name in providers:
            del table[name]
    assert all(c.op == op for c in cells)
    assert all(c.timing is None and c.bytes_moved is None for c in cells if c.status == "wrong")
    return {(c.provider, c.mode): c.status for c in cells}


def test_bench_sampled_checks_refuse_wrong_answers():
    ops = _load_bench_ops()

    class Off(ops.FastedgeSampledProvider):  # right shapes, wrong values
        def forward(self, s):
            out, edge_sum = super().forward(s)
            return out * 1.001, edge_sum

    class OffSum(ops.FastedgeSampledProvider):  # right output, wrong edge sum
        def forward(self, s):
            out, edge_sum = super().forward(s)
            return out, edge_sum + 1

    class OffGrad(ops.FastedgeSampledProvider):  # right forward, wrong d log_alpha
        def forward(self, s):
            out, edge_sum = super().forward(s)
            la = s["log_alpha"]
            return out + (la - la.detach()).nan_to_num(0, 0, 0).sum(), edge_sum

    class OtherSeed(ops.FastedgeSampledProvider):  # masks from another seed
        def forward(self, s):
            return super().forward(dict(s, seed=s["seed"] + 1))

    class NaiveOwnNoise(ops.NaiveSampledProvider):  # ignores the reference noise it is fed
        def check_state(self, state, problem):
            return state

    status = _run_bad_providers(ops, "sampled", {
        "off": Off("torch"), "offsum": OffSum("torch"), "offgrad": OffGrad("torch"),
        "otherseed": OtherSeed("torch"), "ownnoise": NaiveOwnNoise()},
        ["off", "offsum", "offgrad", "otherseed", "ownnoise"])
    for name in ("naive", "torch"):
        assert status[(name, "fwd")] == status[(name, "bwd")] == "ok", status
    for name in ("off", "offsum", "otherseed", "ownnoise"):
        assert status[(name, "fwd")] == status[(name, "bwd")] == "wrong", (name, status)
    assert status[("offgrad", "fwd")] == "ok" and status[("offgrad", "bwd")] == "wrong"


def test_bench_bytes_moved_formula():
    import dataclasses

    import torch
    ops = _load_bench_ops()
    model = dataclasses.replace(ops.MODELS["codellama-13b-b1"], batch=1, seq=2, hidden=8)
    data = ops.WriterData.random(model.graph().n_writers, (1, 2, 8), torch.bfloat16,
                                 torch.device("cpu"), 0)
    problem = ops.build_problem(ops.CASE_BY_NAME["cl13b-b1-L20"], model, data, 1)
    R, W, N, e = 121, 861, 16, 2  # bf16 storage, fp32 mask and gradient buffer
    fwd = W * N * e + 2 * N * e + R * W * 4 + R * N * e
    bwd = R * N * e + W * N * e + 2 * W * N * 4 + 2 * R * W * 4
    assert ops.bytes_moved("masked", "fwd", problem) == fwd
    assert ops.bytes_moved("masked", "bwd", problem) == bwd
    assert ops.bytes_moved("masked", "fwd+bwd", problem) == fwd + bwd
    assert ops.bytes_moved("sampled", "fwd+bwd", problem) == fwd + bwd + 8


def test_bench_csv_keeps_rows_written_with_an_old_header(tmp_path):
    ops = _load_bench_ops()
    path = tmp_path / "ops.csv"
    old_rows = [
        dict({c: f"{c}-{i}" for c in OLD_HEADER}, device="NVIDIA H200", provider="cuda",
             p50_ms=str(0.3 + i), legacy="kept")
        for i in range(2)
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, OLD_HEADER + ["legacy"])  # one column the benchmark no longer writes
        w.writeheader()
        w.writerows(old_rows)
    new = {c: f"new-{c}" for c in ops.COLUMNS}
    ops.append_csv(path, [new])

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert header == ops.COLUMNS + ["legacy"]
    assert len(rows) == 3
    for got, want in zip(rows, old_rows):
        assert {k: got[k] for k in want} == want, "an old row lost a value"
        for c in ("op", "bytes_moved", "bw_gb_s", "frac_copy_bw", "copy_bw_gb_s"):
            assert got[c] == ""
    assert {k: rows[2][k] for k in ops.COLUMNS} == new and rows[2]["legacy"] == ""

    # The header now differs from COLUMNS (the legacy column): appending again
    # rewrites it the same way and keeps all rows.
    ops.append_csv(path, [new])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["legacy"] == "kept" and rows[0]["device"] == "NVIDIA H200"

    # A file with the current header is appended to.
    path2 = tmp_path / "fresh.csv"
    ops.append_csv(path2, [new])
    ops.append_csv(path2, [new])
    with open(path2, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ops.COLUMNS and len(list(reader)) == 2


def test_bench_copy_bandwidth_cpu():
    import torch
    ops = _load_bench_ops()
    st = ops.Settings(reps=2, min_time=0.0, max_time=0.5, warmup_ms=1, rep_ms=1)
    bw = ops.measure_copy_bandwidth(torch.device("cpu"), 8, st)
    assert bw.gb_s is not None and 0.1 < bw.gb_s < 10_000, bw
    assert "8 MiB" in bw.method and "CPU" in bw.method
    off = ops.measure_copy_bandwidth(torch.device("cpu"), 0, st)
    assert off.gb_s is None and "not measured" in off.method


TRITON_SAMPLED = textwrap.dedent("""
    import dataclasses, importlib.util, sys
    import torch
    spec = importlib.util.spec_from_file_location("bops", sys.argv[1])
    ops = importlib.util.module_from_spec(spec)
    sys.modules["bops"] = ops
    spec.loader.exec_module(ops)
    from fastedge.backends import Call, explain

    class Interpreted(ops.FastedgeSampledProvider):  # the GPU-only guard lifted
        def skip_reasons(self, problem):
            lay = problem.layout
            calls = [Call(op="masked_sum", device=problem.device, dtype=problem.dtype,
                          n_readers=lay.n_readers, n_writers=lay.n_writers,
                          n_elements=problem.data.clean[0].numel(), grad_dtype=torch.float32),
                     Call(op="sample_masks", device=problem.device, dtype=torch.float32,
                          n_readers=lay.n_readers, n_writers=lay.n_writers)]
            return [r for c in calls for r in explain(c)["triton"]]

    ops.SAMPLED_PROVIDERS["triton"] = Interpreted("triton")
    model = dataclasses.replace(ops.MODELS["gpt2-small"], batch=1, seq=4, hidden=16)
    data = ops.WriterData.random(model.graph().n_writers, (1, 4, 16), torch.float32,
                                 torch.device("cpu"), 0)
    st = ops.Settings(reps=1, min_time=0.0, max_time=0.01, warmup_ms=1, rep_ms=1)
    for case in ("gpt2-L0", "gpt2-resid_post"):
        cells = ops.run_case(ops.CASE_BY_NAME[case], model, data, ["naive", "triton"],
                             ["fwd", "bwd"], st, 1, print, op="sampled")
        for c in cells:
            print("STATUS", case, c.provider, c.mode, c.status, c.note)
""")


def test_bench_sampled_triton_interpreted(tmp_path):
    """The sampled op's triton provider (the GPU path) agrees with fastedge's
    reference under the Triton interpreter, at a tiny shape."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = tmp_path / "triton_sampled.py"
    script.write_text(TRITON_SAMPLED)
    proc = subprocess.run([sys.executable, str(script), str(REPO / "bench" / "ops.py")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = [line.split(" ", 5)[1:] for line in proc.stdout.splitlines() if line.startswith("STATUS")]
    assert len(status) == 8, proc.stdout[-3000:]
    assert all(s[3] == "ok" for s in status), status


def test_bench_a_cell_whose_timing_raises_is_an_error_not_a_crash():
    """The H200 run of 2026-11-26 lost the whole kernel table to one cell
    whose repeated backward raised: such a cell is now reported, the others timed."""
    import dataclasses

    import torch
    ops = _load_bench_ops()
    model = dataclasses.replace(ops.MODELS["gpt2-small"], batch=1, seq=2, hidden=8)
    data = ops.WriterData.random(model.graph().n_writers, (1, 2, 8), torch.float32, torch.device("cpu"), 0)
    st = ops.Settings(reps=1, min_time=0.0, max_time=0.01, warmup_ms=1, rep_ms=1)
    measure = ops.measure

    def flaky(fn, device, s, label):
        if label == "gpt2-L0 masked bwd torch":
            fn()
            raise RuntimeError("Trying to backward through the graph a second time (simulated)\nmore")
        return measure(fn, device, s, label)

    ops.measure = flaky
    cells = ops.run_case(ops.CASE_BY_NAME["gpt2-L0"], model, data, ["naive", "torch"], ["fwd", "bwd", "fwd+bwd"],
                         st, 1, lambda msg: None)
    status = {(c.provider, c.mode): c for c in cells}
    err = status[("torch", "bwd")]
    assert err.status == "error" and err.timing is None
    assert err.note == "timing raised RuntimeError: Trying to backward through the graph a second time (simulated)"
    assert all(c.status == "ok" for k, c in status.items() if k != ("torch", "bwd"))
    rows = [ops.make_row(c, {"timing": "t"}, model, (1, 2, 8), "float32") for c in cells]
    assert "| bwd | torch | ERROR: timing raised RuntimeError" in ops.markdown(rows, [])


def test_bench_gpu_cells_get_at_least_five_samples(monkeypatch):
    """do_bench gives one sample for a call slower than --rep-ms; the GPU path
    tops such a cell up with timed calls to MIN_GPU_SAMPLES."""
    triton_testing = pytest.importorskip("triton.testing")
    ops = _load_bench_ops()
    st = ops.Settings(reps=3, min_time=0.0, max_time=1.0, warmup_ms=25, rep_ms=100)
    topped = []
    monkeypatch.setattr(ops, "_timed_calls", lambda fn, n: topped.append(n) or [2.0] * n)
    for given, extra in (([300.0], 4), ([9.0, 9.5, 10.0], 2), ([1.0] * 80, 0)):
        monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, return_mode: list(given))
        samples, method = ops._cuda_samples(lambda: None, st)
        assert len(samples) == max(5, len(given)) == ops.MIN_GPU_SAMPLES + max(0, len(given) - 5)
        assert samples[:len(given)] == given
        assert ("to 5 samples" in method) == (extra > 0)
        assert topped == ([extra] if extra else [])
        topped.clear()


def test_bench_ops_sparse_cases_zero_the_same_masks_in_both_layouts():
    """The sparse cases of bench/ops.py: -nodesP prunes whole writers (every
    mask of theirs 0, log_alpha -30 in both layouts: sampled masks exactly 0),
    -edgesP zeroes single edges; the authors' layout and fastedge's rows agree."""
    ops_bench = _load_bench_ops()
    model = ops_bench.MODELS["gpt2-small"]
    model = ops_bench.dataclasses.replace(model, batch=1, seq=2, hidden=8)
    data = ops_bench.WriterData.random(model.graph().n_writers, (1, 2, 8), torch.float32, "cpu", 0)
    for name, lo, hi in (("gpt2-L11-nodes90", 0.8, 0.97), ("gpt2-L11-edges50", 0.4, 0.6)):
        p = ops_bench.build_problem(ops_bench.CASE_BY_NAME[name], model, data, 3)
        dead = (p.mask == 0).all(0)
        zero = ((p.mask == 0) & p.valid).sum() / p.valid.sum()
        if "nodes" in name:
            assert lo < dead.float().mean() < hi and not dead[0]
            assert (p.log_alpha[:, dead][p.valid[:, dead]] == -30).all()
        else:
            assert lo < zero < hi and dead.float().mean() < 0.1
        assert torch.equal(ops_bench.to_rows(p.naive_masks, p.layout.n_writers) * p.valid, p.mask)
        la = ops_bench.to_rows(p.naive_log_alpha, p.layout.n_writers)
        assert torch.equal(la[p.valid], p.log_alpha[p.valid])
