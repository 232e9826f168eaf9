"""bench/gpu.sh's logic on the CPU, with a fake `python` (its $PYTHON) that
records each call and fails the stages it is told to: every stage runs when
one fails, the summary gives each stage's rc, the exit status says whether
any failed, the time budget holds, the revision it resolves reaches every
stage; and the ops stage's own arguments, run for real on the CPU at a tiny
shape with the Triton provider under the interpreter, do not crash."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_SH = REPO / "bench" / "gpu.sh"
STAGES = ["tests", "step-gpt2", "step-codellama", "ops", "variants", "memory-check", "attribution", "tune"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")

# Which stage a python call is, from its arguments.
FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import json, os, sys, time
    argv = sys.argv[1:]
    if argv[:1] == ["bench/revision.py"]:  # the revision: the real thing
        os.execv({python!r}, [{python!r}] + argv)
    if argv[:1] == ["-c"]:  # set-up probes: import checks, versions, the CUDA arch, the extension
        print("90" if "get_device_capability" in argv[1] else "fake set-up")
        sys.exit(0)
    stage = {{"pytest": "tests", "bench/ops.py": "ops", "bench/memory.py": "memory-check",
              "bench/tune.py": "tune", "bench/attribution_speed.py": "attribution"}}.get(
        argv[1] if argv[0] == "-m" else argv[0])
    if argv[0] == "bench/step.py":
        stage = "step-codellama" if "codellama-13b" in argv else "step-gpt2"
    if argv[0] == "bench/tune.py" and "--variants" in argv:
        stage = "variants"
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({{"stage": stage, "argv": argv, "rev": os.environ.get("FASTEDGE_GIT_REV"),
                            "source": os.environ.get("FASTEDGE_SOURCE_HASH")}}) + "\\n")
    if stage in os.environ.get("FAKE_FAIL", "").split(","):
        print(f"fake {{stage}}: failing on purpose")
        sys.exit(3)
    if stage in os.environ.get("FAKE_SLOW", "").split(","):
        time.sleep(60)
    print(f"fake {{stage}}: ok" + ("\\n12 passed in 0.01s" if stage == "tests" else ""))
""")


def run_gpu_sh(tmp_path, *stages, fail=(), slow=(), env_extra=None, rev_env=True):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    calls = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTEDGE_", "GPU_SH_"))}
    env.update(PYTHON=str(fake), OUT=str(out), FAKE_CALLS=str(calls), FAKE_FAIL=",".join(fail),
               FAKE_SLOW=",".join(slow))
    if rev_env:
        line = subprocess.run([sys.executable, str(REPO / "bench" / "revision.py"), "--env"],
                              check=True, capture_output=True, text=True).stdout.split()
        env.update(kv.split("=", 1) for kv in line)
    env.update(env_extra or {})
    proc = subprocess.run(["bash", str(GPU_SH), *stages], env=env, capture_output=True, text=True,
                          timeout=120)
    log = (out / "gpu-run.log").read_text() if (out / "gpu-run.log").exists() else ""
    made = [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []
    return proc, log, made


def summary(log: str) -> dict:
    """stage -> its summary line, from the summary at the end of the log."""
    tail = log[log.rindex("summary (revision"):]
    found = dict(re.findall(r"\]   ([\w-]+): (.*)", tail))
    return found


def test_every_stage_runs_and_passes(tmp_path):
    proc, log, calls = run_gpu_sh(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c["stage"] for c in calls] == STAGES
    s = summary(log)
    assert list(s) == STAGES and all(v.startswith("rc=0 ") for v in s.values()), s
    assert "all stages passed" in log and "12 passed in 0.01s" in proc.stdout


def test_a_failing_stage_does_not_stop_the_others(tmp_path):
    proc, log, calls = run_gpu_sh(tmp_path, fail=("step-gpt2", "ops"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [c["stage"] for c in calls] == STAGES, "a stage after a failing one did not run"
    s = summary(log)
    assert s["step-gpt2"].startswith("rc=3 ") and s["ops"].startswith("rc=3 ")
    assert all(s[x].startswith("rc=0 ") for x in STAGES if x not in ("step-gpt2", "ops")), s
    assert "FAILED: step-gpt2 ops" in log
    assert "fake ops: failing on purpose" in log  # the stage's own output is in the log


def test_a_stage_that_runs_too_long_is_stopped_and_the_budget_holds(tmp_path):
    # 8 s of budget: `tests` hangs and is cut at what is left; the rest are reported as not run
    proc, log, calls = run_gpu_sh(tmp_path, "tests", "ops", slow=("tests",),
                                  env_extra={"GPU_SH_BUDGET_S": "8", "GPU_SH_MIN_STAGE_S": "3"})
    assert proc.returncode == 1
    s = summary(log)
    cut = re.match(r"rc=124 in (\d+) s \(timed out at (\d+) s\)", s["tests"])
    assert cut and 3 <= int(cut.group(2)) <= 8 and int(cut.group(1)) <= 9, s
    assert s["ops"].startswith("not run: ") and "budget" in s["ops"], s
    assert [c["stage"] for c in calls] == ["tests"]


def test_stages_can_be_chosen_and_unknown_ones_are_refused(tmp_path):
    proc, log, calls = run_gpu_sh(tmp_path, "ops", "tune")
    assert proc.returncode == 0 and [c["stage"] for c in calls] == ["ops", "tune"]
    assert list(summary(log)) == ["ops", "tune"]
    proc, _, _ = run_gpu_sh(tmp_path, "ops", "opz")
    assert proc.returncode == 2 and "unknown stage 'opz'" in proc.stderr


def test_the_callers_revision_reaches_every_stage(tmp_path):
    want = subprocess.run([sys.executable, str(REPO / "bench" / "revision.py"), "--env"], check=True,
                          capture_output=True, text=True).stdout.split()[0].split("=", 1)[1]
    proc, log, calls = run_gpu_sh(tmp_path)
    assert {c["rev"] for c in calls} == {want} and {c["source"] for c in calls} == {None}
    assert f"revision: {want}\n" in log and "NOT tied" not in log


def test_without_a_revision_or_with_other_files_the_results_are_untied(tmp_path):
    fp = subprocess.run([sys.executable, str(REPO / "bench" / "revision.py"), "--source-hash"],
                        check=True, capture_output=True, text=True).stdout.strip()
    proc, log, calls = run_gpu_sh(tmp_path, "tune", rev_env=False)
    assert proc.returncode == 0
    assert calls[0]["rev"] == f"untied+src.{fp}" and "FASTEDGE_GIT_REV is not set" in log
    assert "NOT tied to a commit" in log
    proc, log, calls = run_gpu_sh(tmp_path, "tune", env_extra={"FASTEDGE_SOURCE_HASH": "00000000"})
    assert calls[-1]["rev"] == f"untied+src.{fp}" and "NOT tied to a commit" in log


def _load(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"fastedge_bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_step_stages_take_enough_steps_for_a_p50(tmp_path):
    _, _, calls = run_gpu_sh(tmp_path, "step-gpt2", "step-codellama")
    step = _load("step")
    for c in calls:
        args = step.parse_args(c["argv"][1:])  # refused (SystemExit) if it would record too few
        assert args.steps >= step.MIN_TIMED_STEPS == 5, c
        assert not args.no_record
    with pytest.raises(SystemExit, match="at least 5 timed"):
        step.parse_args(["--steps", "4"])
    assert step.parse_args(["--steps", "2", "--no-record"]).steps == 2


OPS_ON_CPU = textwrap.dedent("""
    import importlib.util, sys
    import torch
    spec = importlib.util.spec_from_file_location("bops", sys.argv[1])
    ops = importlib.util.module_from_spec(spec)
    sys.modules["bops"] = ops
    spec.loader.exec_module(ops)
    from fastedge.backends import Call, explain

    def interpreted(cls):  # the Triton provider with its GPU-only guard lifted
        class Interpreted(cls):
            def skip_reasons(self, problem):
                lay = problem.layout
                calls = [Call(op="masked_sum", device=problem.device, dtype=problem.dtype,
                              n_readers=lay.n_readers, n_writers=lay.n_writers,
                              n_elements=problem.data.clean[0].numel(), grad_dtype=torch.float32)]
                if self.op == "sampled":
                    calls.append(Call(op="sample_masks", device=problem.device, dtype=torch.float32,
                                      n_readers=lay.n_readers, n_writers=lay.n_writers))
                return [r for c in calls for r in explain(c)["triton"]]
        return Interpreted("triton")

    ops.PROVIDERS["triton"] = interpreted(ops.FastedgeProvider)
    ops.SAMPLED_PROVIDERS["triton"] = interpreted(ops.FastedgeSampledProvider)

    measure = ops.measure
    def counted(fn, device, st, label):  # how often each timed callable ran
        calls = [0]
        def once():
            calls[0] += 1
            return fn()
        timing = measure(once, device, st, label)
        print("CALLS", label, calls[0], flush=True)
        return timing
    ops.measure = counted
    sys.exit(ops.main(sys.argv[2:]))
""")


def test_the_ops_stage_arguments_run_on_the_cpu(tmp_path):
    """The ops stage exactly as gpu.sh launches it, plus a tiny shape and the
    CPU: both ops, every mode (the bwd mode repeats a backward with
    retain_graph=True, where the H200 run crashed), the naive, torch and
    (interpreted) triton providers, a GPT-2 case and a CodeLlama-13B
    layer's shape in bf16. The op's checks compare every provider with the
    reference first."""
    pytest.importorskip("triton")
    _, _, calls = run_gpu_sh(tmp_path, "ops")
    (argv,) = [c["argv"] for c in calls]
    assert argv[0] == "bench/ops.py"
    ops_args = argv[1:]
    i = ops_args.index("--ops")
    assert ops_args[i + 1].split(",") == ["masked", "sampled"]
    assert "--modes" not in ops_args and "--providers" not in ops_args  # every mode and provider

    script = tmp_path / "ops_on_cpu.py"
    script.write_text(OPS_ON_CPU)
    out = tmp_path / "ops-out"
    tiny = ["--device", "cpu", "--cases", "gpt2-L5,cl13b-b8-L0", "--batch", "1", "--seq", "2",
            "--hidden", "16", "--copy-mib", "1", "--reps", "2", "--min-time", "0", "--max-time", "0",
            "--out", str(out)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(script), str(REPO / "bench" / "ops.py"), *ops_args, *tiny],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    import csv
    rows = list(csv.DictReader(open(out / "ops.csv")))
    got = {(r["case"], r["op"], r["mode"], r["provider"]): r for r in rows}
    calls = {tuple(line.split()[1:5]): int(line.split()[5]) for line in proc.stdout.splitlines()
             if line.startswith("CALLS ")}
    for case in ("gpt2-L5", "cl13b-b8-L0"):
        for op in ("masked", "sampled"):
            for mode in ("fwd", "bwd", "fwd+bwd"):
                for provider in ("naive", "torch", "triton"):
                    r = got[(case, op, mode, provider)]
                    assert r["status"] == "ok", r
                    assert calls[(case, op, mode, provider)] >= 2, "each cell's call repeats"
                assert got[(case, op, mode, "cuda")]["status"] == "skipped"
