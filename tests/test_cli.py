"""The command line end to end, in a temporary folder, on the shipped model
and on a tiny model saved to a local folder (the Hub path, offline)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from fastedge.cli import build_parser, main

HAS_DOT = shutil.which("dot") is not None


def test_help_reads_well(capsys):
    for argv in (["--help"], ["prune", "--help"], ["eval", "--help"], ["draw", "--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--task", "--data", "--target-sparsity", "--steps", "--batch-size",
                   "--seed", "--out", "--resume"):
        assert option in text


def test_prune_eval_draw_compare_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--steps", "6", "--batch-size", "4", "--out", str(out), "--no-progress",
                 "--checkpoint-every", "3", "--n-examples", "40"]) == 0
    for name in ("circuit.json", "metrics.json", "log.jsonl", "masks.pt", "checkpoints/latest.pt"):
        assert (out / name).exists(), name
    assert (out / "circuit.svg").read_text().rstrip().endswith("</svg>")   # drawn by fastedge, graphviz or not
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"kl", "accuracy", "edge_sparsity", "wall_seconds"} <= set(metrics)
    assert "<svg" in (out / "report.html").read_text()   # the run report (tests/test_report.py)
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["format"] == "fastedge.Circuit/1" and circuit["task"]

    assert main(["eval", "--circuit", str(out / "circuit.json"), "--n-examples", "20",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert "kl" in json.loads((tmp_path / "eval.json").read_text())
    assert main(["eval", "--masks", str(out / "masks.pt"), "--sweep", "0,0.5,0.9,0.999", "--n-examples", "20",
                 "--out", str(tmp_path / "sweep.json")]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["points"]) == 4 and "cpr" in sweep and "cmd" in sweep

    if HAS_DOT:
        assert main(["draw", str(out / "circuit.json"), "--out", str(tmp_path / "c.png")]) == 0
        assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

    out2 = tmp_path / "run2"
    assert main(["prune", "--steps", "4", "--batch-size", "4", "--out", str(out2), "--no-progress",
                 "--seed", "1", "--n-examples", "40"]) == 0
    assert main(["compare", str(out / "circuit.json"), str(out2 / "circuit.json"), "--n-examples", "20",
                 "--task", "induction", "--out", str(tmp_path / "cmp.json")]) == 0
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert "intersection" in report and "union" in report

    # resume: nothing left to do, the same circuit comes out
    assert main(["prune", "--steps", "6", "--batch-size", "4", "--out", str(out), "--no-progress",
                 "--checkpoint-every", "3", "--n-examples", "40", "--resume"]) == 0
    assert json.loads((out / "circuit.json").read_text())["edges"] == circuit["edges"]


def test_local_model_folder_and_jsonl_data(tmp_path, capsys):
    """The Hub code path, offline: a tiny model and tokenizer saved to a folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "the", "cat", "dog", "sat", "on", "mat", "rug", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=len(words), n_positions=16)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    data = tmp_path / "data.jsonl"
    lines = []
    for i, (a, b) in enumerate([("cat", "dog"), ("dog", "cat"), ("mat", "rug"), ("rug", "mat")] * 3):
        lines.append(json.dumps({"clean": f"the {a} sat on the <predict>{a}</predict>",
                                 "corrupted": f"the {b} sat on the <predict>{b}</predict>",
                                 "split": "validation" if i % 4 == 0 else "train"}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["prune", "--model", str(folder), "--data", str(data), "--steps", "3", "--batch-size", "4",
                 "--target-sparsity", "0.5", "--out", str(out), "--no-progress"]) == 0
    assert (out / "circuit.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n")
    capsys.readouterr()
    # bad data is refused with one line naming the line (exit status 2), not a traceback
    assert main(["prune", "--model", str(folder), "--data", str(bad), "--steps", "1",
                 "--out", str(tmp_path / "run-bad")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("fastedge: ")][-1].startswith(
        f"fastedge: {bad}:2: invalid JSON")


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "fastedge.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "prune" in result.stdout
