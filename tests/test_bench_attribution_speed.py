"""bench/attribution_speed.py: a smoke run at toy sizes, its table, and the
arguments bench/gpu.sh gives it."""
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import attribution_speed  # noqa: E402


def test_the_metric_is_the_last_tokens_log_probability():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 5))

    class B:
        input_ids = ids
    got = attribution_speed.last_token_logprob(logits, B)
    want = [torch.log_softmax(logits[b, 3].double(), -1)[ids[b, 4]].item() for b in range(3)]
    assert got.shape == (3,) and torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64),
                                                atol=1e-6)


def test_smoke_run_writes_rows(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "attribution_speed.py"), "--quick", "--device",
                          "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    import csv
    rows = list(csv.DictReader(open(tmp_path / "attribution_speed.csv")))
    assert [r["kind"] for r in rows] == list(attribution_speed.KINDS)
    by = {r["kind"]: r for r in rows}
    assert float(by["pruning-step"]["x_pruning_step"]) == 1.0
    for kind in ("eap", "eap-ig-inputs"):
        assert float(by[kind]["median_s"]) > 0
        ratio = float(by[kind]["median_s"]) / float(by["pruning-step"]["median_s"])
        assert abs(float(by[kind]["x_pruning_step"]) - ratio) <= 1e-3 * ratio
    assert by["eap"]["revision"] and by["eap"]["command"].startswith("python bench/attribution_speed.py")
    (md,) = tmp_path.glob("attribution-speed-*.md")
    assert "| eap-ig-inputs |" in md.read_text()


def test_faithfulness_rows_in_the_table():
    rows = [{"kind": "to-faithfulness: edge-pruning", "faithfulness_model": "induction", "threshold": 0.99,
             "k_trace": 11, "steps_to_threshold": 400, "seconds_to_threshold": 12.5, "attribution_s": None,
             "steps_per_s": 30.0},
            {"kind": "to-faithfulness: warm (eap-ig-inputs)", "faithfulness_model": "induction", "threshold": 0.99,
             "k_trace": 11, "steps_to_threshold": None, "seconds_to_threshold": None, "attribution_s": 0.4,
             "steps_per_s": 31.0}]
    text = attribution_speed.markdown(rows, "abc1234", "a GPU", "2026-01-01T00:00Z", "cmd")
    assert "| induction | edge-pruning | 11 | 400 | 12.5 | – | 30.0 |" in text
    assert "| induction | warm (eap-ig-inputs) | 11 | not reached | – | 0.40 | 31.0 |" in text


def test_the_gpu_stage_arguments_are_known():
    text = (REPO / "bench" / "gpu.sh").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("stage attribution ")]
    argv = re.sub(r'"\$OUT_DIR"', "OUT", line).split()[5:]   # after: stage NAME LIMIT $PY SCRIPT
    args = attribution_speed.parse_args(argv)   # an unknown flag exits (SystemExit)
    assert args.to_faithfulness and args.device == "cuda" and args.out == "OUT" and not args.quick
    assert (args.examples, args.seq, args.layers) == (100, 32, None)   # GPT-2 small, 100 examples
