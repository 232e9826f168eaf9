"""A newcomer's first hour (issue 12): what the command line says and writes
when used as the README tells, on a tiny GPT-2 saved to a folder.

Items: eval --masks without --sweep (3), the concepts doc replacing SPEC.md
(4), resume and output folders (5), the end-of-run summary (6), progress
output (7), and the smaller items (8).
"""
import importlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastedge.cli import build_parser, main
from test_cli_errors import FAST, make_folders

ROOT = Path(__file__).resolve().parents[1]
prune_module = importlib.import_module("fastedge.prune")  # fastedge.prune is also a function


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("newcomer"))


@pytest.fixture(autouse=True)
def _no_loading_bars():
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _prune(folders, out, *extra):
    return ["prune", "--model", folders["model"], "--data", folders["data"], *FAST, "--out", str(out), *extra]


def _one_line(capsys, argv, status=2):
    capsys.readouterr()
    assert main(argv) == status
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("fastedge: "), err
    return err[0]


# -- 3. eval --masks without --sweep ----------------------------------------------------------

def test_eval_masks_without_sweep_is_refused_and_points_to_the_circuit(capsys):
    """Chosen: refused before anything loads (not ignored); the run's circuit at
    its target is its circuit.json, which the message and --help point to."""
    line = _one_line(capsys, ["eval", "--masks", "run/masks.pt"])
    assert "--masks run/masks.pt is only read with --sweep" in line and "--circuit" in line
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions}
    assert "only with --sweep" in helps["masks"] and "--circuit" in helps["masks"]


# -- 4. the concepts doc --------------------------------------------------------------------

def test_no_reference_to_a_missing_spec_file():
    """README, docs and every docstring a user reads point at docs/CONCEPTS.md,
    which exists, never at SPEC.md, which the repository does not hold."""
    assert not (ROOT / "SPEC.md").exists()
    concepts = ROOT / "docs" / "CONCEPTS.md"
    assert concepts.exists()
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "fastedge").rglob("*.py"))]
    offenders = [f"{f.relative_to(ROOT)}:{i}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"\bSPEC\b(?!IAL)", line)]
    assert offenders == []
    assert "docs/CONCEPTS.md" in (ROOT / "README.md").read_text()


def test_concepts_doc_names_what_the_code_names():
    """Every writer and reader name of a GPT-2 and a grouped-k/v Llama graph
    matches a name pattern of the doc's section 1 tables, every pattern names
    something, and the doc's edge counts are the graphs'."""
    from fastedge.graph import EdgeGraph
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig
    text = (ROOT / "docs" / "CONCEPTS.md").read_text()
    section = text[text.index("## 1."):text.index("## 2.")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    patterns = {p for line in rows for p in re.findall(r"`([^`]+)`", line.split("|")[1])}
    regexes = {p: re.compile(re.sub(r"\\\{[a-z]\\\}", r"\\d+", re.escape(p)) + "$") for p in patterns}
    graphs = [EdgeGraph.from_config(GPT2Config(n_layer=2, n_head=3)),
              EdgeGraph.from_config(LlamaConfig(num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, hidden_size=64)),
              EdgeGraph.from_config(GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32))]
    used = set()
    for g in graphs:
        for name in [*g.writers, *g.readers]:
            hits = [p for p, r in regexes.items() if r.match(name)]
            assert hits, f"{name} is not named in docs/CONCEPTS.md"
            used.update(hits)
    assert used == patterns, patterns - used
    assert "{:,}".format(EdgeGraph.from_config(GPT2Config()).n_edges) in section
    from fastedge import patch, shipped
    assert f"| {patch(shipped.load_shipped_model()).graph.n_edges} |" in section


# -- 5. resume and output folders -------------------------------------------------------------

def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_prune(folders, out, "--checkpoint-every", "2")) == 0
    log = (out / "log.jsonl").read_text()
    line = _one_line(capsys, _prune(folders, out))
    assert f"--out {out} already holds a run" in line and "step 4" in line
    assert "--resume" in line and "--overwrite" in line
    assert (out / "log.jsonl").read_text() == log  # untouched
    (out / "stale-note.txt").write_text("mine")
    (out / "report.html").write_text("old")
    assert main(_prune(folders, out, "--overwrite", "--steps", "3")) == 0
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "stale-note.txt").read_text() == "mine"  # only the run's own files are replaced
    assert (out / "report.html").read_text() != "old"
    with pytest.raises(SystemExit):  # argparse: the two exclude each other
        main(_prune(folders, out, "--overwrite", "--resume"))


def test_a_resumed_run_says_which_step_it_continues_from(folders, tmp_path, capsys):
    out = tmp_path / "run"
    real = prune_module._train_step

    def stop_at_3(t, step, indices):
        if step == 2:
            raise KeyboardInterrupt
        return real(t, step, indices)

    prune_module._train_step = stop_at_3
    try:
        line = _one_line(capsys, _prune(folders, out, "--checkpoint-every", "2", "--overwrite"), status=130)
    finally:
        prune_module._train_step = real
    again = line.split("resume with: ", 1)[1].split()
    assert "--overwrite" not in again and again[-1] == "--resume"   # the two exclude each other
    assert main(again[1:]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoints' / 'latest.pt'}: step 2 of 4 done, continuing at step 3" in err


@pytest.mark.parametrize("minutes, expected", [("5", [2, 4]), ("3", [1, 2, 3, 4]), ("0", [4])])
def test_checkpoints_are_also_time_based(folders, tmp_path, monkeypatch, minutes, expected):
    """Steps of 4 minutes each on a fake clock: a checkpoint whenever the
    interval passed since the last one, long before --checkpoint-every 100,
    and at the last step; --checkpoint-minutes 0: only at the last step."""
    now = [0.0]
    saved = []
    real_step, real_save = prune_module._train_step, prune_module._save_checkpoint

    def four_minutes(*a):
        now[0] += 240.0
        return real_step(*a)

    monkeypatch.setattr(prune_module, "_clock", lambda: now[0])
    monkeypatch.setattr(prune_module, "_train_step", four_minutes)
    monkeypatch.setattr(prune_module, "_save_checkpoint",
                        lambda path, step, *a, **k: (saved.append(step), real_save(path, step, *a, **k)))
    out = tmp_path / f"timed-{minutes}"
    assert main(_prune(folders, out, "--checkpoint-every", "100", "--checkpoint-minutes", minutes)) == 0
    assert saved == expected
    assert prune_module.checkpoint_step(out / "checkpoints" / "latest.pt") == 4


def test_checkpoint_due_rules():
    cfg = prune_module.PruneConfig(steps=10, checkpoint_every=4, checkpoint_seconds=60.0)
    assert [d for d in range(1, 11) if prune_module._checkpoint_due(cfg, d, 0.0)] == [4, 8, 10]
    assert prune_module._checkpoint_due(cfg, 1, 60.0) and not prune_module._checkpoint_due(cfg, 1, 59.9)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="checkpoint_seconds"):
            prune_module.PruneConfig(checkpoint_seconds=bad).validate()


def test_ctrl_c_before_the_first_checkpoint_gives_a_command_that_runs(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prune_module, "_train_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "o"
    line = _one_line(capsys, _prune(folders, out), status=130)
    assert "one every 100 steps or 5 minutes" in line
    again = line.split("start again with: ", 1)[1].split()
    assert again[-1] == "--overwrite"
    monkeypatch.undo()
    (out / "log.jsonl").write_text('{"step": 1}\n')  # what an interrupted run leaves
    assert main(again[1:]) == 0


# -- 6. the end of a run -------------------------------------------------------------------------

def test_the_summary_says_what_each_number_is(folders, tmp_path, capsys):
    capsys.readouterr()
    assert main(_prune(folders, tmp_path / "o")) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    last = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()][-1]
    assert "training (last step, 4): KL" in out and "sampled masks on one batch" in out
    assert "not the circuit's" in out
    from fastedge.run_summary import number
    assert f"KL {number(last['kl'])} and edge sparsity" in out
    assert f"with these edges fixed: KL {number(metrics['kl'])} to the full model" in out


def test_number_keeps_small_values_readable():
    from fastedge.run_summary import number
    assert number(4.2e-6) == "4.20e-06" and number(0.0) == "0" and number(2.8371) == "2.837"
    assert number(float("nan")) == "n/a" and number(None) == "n/a"
    assert float(number(3.3e-5)) == pytest.approx(3.3e-5)


def test_sparsity_note_explains_dead_edge_pruning():
    """A circuit asked at a sparsity its masks cannot give: the note names the
    requested and achieved counts and the dead edges removed (from info)."""
    from fastedge.circuit import extract_circuit
    from fastedge.run_summary import sparsity_note
    import fastedge
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    em = fastedge.patch(GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=10,
                                                  n_positions=8)))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in em.mask_parameters():
            p.copy_(torch.randn_like(p) * 3)
    found = None
    for s in [i / 40 for i in range(1, 40)]:
        c = extract_circuit(em, s)
        if c.n_edges != c.info["target_n_edges"] and c.info["n_edges_pruned"] > 0:
            found = (s, c)
            break
    assert found, "no sparsity at which dead-edge pruning moved the count"
    s, c = found
    note = sparsity_note(c)
    assert f"not the requested {s:g}" in note and f"{c.n_edges} edges kept against {c.info['target_n_edges']}" in note
    assert f"held {c.info['n_edges_pruned']} dead edge(s)" in note
    for s in [i / 40 for i in range(0, 41)]:   # a word exactly when the count differs
        c = extract_circuit(em, s)
        assert (sparsity_note(c) is None) == (c.n_edges == c.info["target_n_edges"])
    from fastedge.circuit import extract_circuit_by_threshold
    t = extract_circuit_by_threshold(em, 0.5)
    assert "training target was 1 or more" in sparsity_note(t) and "--circuit-sparsity" in sparsity_note(t)


# -- 7. output noise -------------------------------------------------------------------------

def test_progress_in_a_log_is_a_line_every_n_steps():
    from fastedge.progress import default_every, make_progress
    stream = io.StringIO()  # not a terminal
    bar = make_progress(100, stream=stream, every=25)
    for step in range(1, 101):
        bar.update({"step": step, "loss": 1.0, "kl": 2.84, "edge_sparsity": 0.5, "target": 0.6})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [int(re.search(r"step (\d+)/100", x).group(1)) for x in lines] == [25, 50, 75, 100]
    assert all("training KL 2.84," in x and "\r" not in x for x in lines)
    assert default_every(1000) == 50 and default_every(7) == 1
    assert make_progress(10, enabled=False) is None


def test_prune_into_a_pipe_prints_few_lines_and_no_loading_bars(folders, tmp_path):
    """A real process with stderr a pipe: 40 steps give 20 plain lines; with
    --no-progress, nothing from fastedge or transformers but the summary."""
    base = [sys.executable, "-m", "fastedge.cli", "prune", "--model", folders["model"], "--data",
            folders["data"], "--batch-size", "2", "--target-sparsity", "0.5", "--steps", "40"]
    run = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    progress = [x for x in run.stderr.splitlines() if x.startswith("pruning: step")]
    assert len(progress) == 20 and "\r" not in run.stderr and "Loading" not in run.stderr
    quiet = subprocess.run(base + ["--out", str(tmp_path / "b"), "--no-progress"], capture_output=True,
                           text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert "pruning" not in quiet.stderr and "Loading" not in quiet.stderr and "%|" not in quiet.stderr


@pytest.mark.parametrize("flag", ["--no-progress", None])
def test_no_progress_turns_off_transformers_bars_on_a_terminal(folders, tmp_path, monkeypatch, flag):
    from transformers.utils import logging as hf_logging
    monkeypatch.setattr(importlib.import_module("fastedge.cli"), "_stderr_is_terminal", lambda: True)
    monkeypatch.setattr(prune_module, "make_progress", lambda *a, **k: None)  # no bar in the test's output
    hf_logging.enable_progress_bar()
    argv = [a for a in _prune(folders, tmp_path / "o") if a != "--no-progress"] + ([flag] if flag else [])
    assert main(argv) == 0
    assert hf_logging.is_progress_bar_enabled() == (flag is None)


# -- 8. smaller items ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["./no-such-model", "models/no/such", "/nonexistent/model"])
def test_a_missing_local_model_folder_is_reported_as_such(folders, name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line(capsys, ["eval", "--model", name, "--data", folders["data"]])
    assert f"--model {name}: no such folder" in line and "Hub" in line
    assert "repo id" not in line.lower() and "repo_id" not in line


def test_help_agrees_with_readme_and_defaults():
    from fastedge.shipped.defaults import PRUNE_DEFAULTS as shipped
    from fastedge.tracr.tasks import PRUNE_DEFAULTS as tracr
    readme = " ".join((ROOT / "README.md").read_text().split())
    cli_doc = importlib.import_module("fastedge.cli").__doc__
    assert "about two minutes" in readme and "about two minutes" in cli_doc
    assert "about a minute" not in cli_doc
    assert "about a minute" not in importlib.import_module("fastedge.shipped.defaults").__doc__
    sub = build_parser()._subparsers._group_actions[0].choices
    prune_help = {a.dest: a.help or "" for a in sub["prune"]._actions}
    default_lr = prune_module.PruneConfig().lr
    assert f"default {default_lr:g}; {shipped['lr']:g} for the shipped model, {tracr['lr']:g} for tracr" \
        in prune_help["lr"]
    assert f"default {prune_module.PruneConfig().lambda_lr:g}; {tracr['lambda_lr']:g} for tracr" \
        in prune_help["lambda_lr"]
    assert "interchange" in prune_help["ablation"] and "corrupted" in prune_help["ablation"]
    for command in ("eval", "compare"):
        assert {a.dest: a.help for a in sub[command]._actions}["batch_size"]


def test_default_output_folder_is_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "fastedge-out/" in lines or "/fastedge-out/" in lines


def _readme_block(after: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return block.group(1)


def test_readme_patching_snippet_runs():
    """The README's 'Patching a model' snippet, as printed there, on a tiny
    GPT-2 saved where its from_pretrained looks (no download)."""
    code = _readme_block("## Patching a model")
    assert "from_pretrained(" in code
    from transformers import GPT2Config, GPT2LMHeadModel
    import transformers
    torch.manual_seed(0)
    tiny = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50257, n_positions=64))
    real = transformers.AutoModelForCausalLM.from_pretrained
    transformers.AutoModelForCausalLM.from_pretrained = staticmethod(lambda *a, **k: tiny)
    try:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = real
    loss = scope["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    grads = [p.grad for p in scope["em"].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bench_memory_states_its_run_time():
    doc = (ROOT / "bench" / "memory.py").read_text()
    head = doc.split('"""')[1]
    assert re.search(r"\d+ minutes", head), head[:300]
    assert re.search(r"python bench/memory\.py +# .*minutes", (ROOT / "README.md").read_text())


def test_readme_says_how_threads_matter_on_a_shared_cpu():
    readme = (ROOT / "README.md").read_text()
    assert "OMP_NUM_THREADS=1" in readme


def test_small_models_run_on_one_cpu_thread_unless_the_user_chose(monkeypatch):
    from fastedge.threads import SMALL_HIDDEN, pick_cpu_threads
    from transformers import GPT2Config, GPT2LMHeadModel
    before = torch.get_num_threads()
    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=SMALL_HIDDEN, vocab_size=10, n_positions=8))
    wide = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=SMALL_HIDDEN + 2, vocab_size=10, n_positions=8))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert pick_cpu_threads(wide, "cpu") is None and torch.get_num_threads() == 2
        assert pick_cpu_threads(small, "cuda:0") is None and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert pick_cpu_threads(small, "cpu") is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert pick_cpu_threads(small, "cpu") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_progress_on_a_terminal_is_tqdms_bar_with_the_training_kl_named():
    from fastedge.progress import make_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = make_progress(3, stream=stream)
    for step in (1, 2, 3):
        bar.update({"step": step, "loss": 1.0, "kl": 4.2e-6, "edge_sparsity": 0.5, "target": 0.6})
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "3/3" in text and "train_kl=4.20e-06" in text
    assert "pruning: step" not in text


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_checkpoint_minutes_must_be_a_finite_count_of_minutes(capsys, tmp_path, bad):
    line = _one_line(capsys, ["prune", "--checkpoint-minutes", bad, "--out", str(tmp_path / "o")])
    assert line.startswith("fastedge: --checkpoint-minutes must be 0 or more") and not (tmp_path / "o").exists()
