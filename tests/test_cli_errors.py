"""Bad input and faults: every one ends in a clear refusal, never a traceback
or a silent wrong answer (issue 11, "Unclear errors" and "The command line").

Command-line cases run `fastedge.cli.main` in process and check the exact
outcome: one line on stderr that starts with ``fastedge: `` and names the
problem, no traceback, and the exit status (2: refused, 1: a run that
started and failed, 130: interrupted). A few run the console entry point
in a subprocess, where the exit status itself matters. Op cases run on
every backend this machine has (torch, reference, and Triton under
TRITON_INTERPRET=1, set by conftest.py).
"""
import errno
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastedge
from fastedge import backends
from fastedge.cli import main

from tiny_models import tiny_model

WORDS = ["<pad>", "the", "cat", "dog", "sat", "on", "mat", "rug", "a"]
PAIRS = [("cat", "dog"), ("dog", "cat"), ("mat", "rug"), ("rug", "mat")]
FAST = ["--steps", "4", "--batch-size", "2", "--no-progress", "--target-sparsity", "0.5"]


# -- fixtures: a tiny GPT-2 with a word-level tokenizer, saved to folders ------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _save_gpt2(folder, *, tokenizer=True, vocab_size=len(WORDS), n_positions=16, nan_weight=False):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=vocab_size,
                                       n_positions=n_positions, bos_token_id=0, eos_token_id=0))
    if nan_weight:
        with torch.no_grad():
            model.transformer.h[0].attn.c_attn.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    if tokenizer:
        _tokenizer().save_pretrained(folder)
    return str(folder)


def _lines():
    return [json.dumps({"clean": f"the {a} sat on the <predict>{a}</predict>",
                        "corrupted": f"the {b} sat on the <predict>{b}</predict>",
                        "split": "validation" if i % 4 == 0 else "train"})
            for i, (a, b) in enumerate(PAIRS * 3)]


@pytest.fixture(autouse=True, scope="module")
def _no_loading_bars():
    """transformers draws progress bars on stderr while saving and loading;
    the lines these tests read are fastedge's."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def make_folders(root) -> dict:
    """A tiny GPT-2 with its tokenizer and a JSONL task for it, under `root`."""
    data = root / "data.jsonl"
    data.write_text("\n".join(_lines()) + "\n")
    return {"root": root, "data": str(data), "model": _save_gpt2(root / "tiny")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("cli-errors"))


@pytest.fixture(scope="module")
def finished_run(folders):
    """A finished 4-step run with a checkpoint every 2 steps."""
    out = folders["root"] / "finished"
    assert main(["prune", "--model", folders["model"], "--data", folders["data"], *FAST,
                 "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def _refused(capsys, argv, status=2):
    """Run the CLI; assert `status` and one line on stderr; return that line."""
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("fastedge: "), err
    return lines[0]


def _prune(folders, out, *extra):
    return ["prune", "--model", folders["model"], "--data", folders["data"], *FAST, "--out", str(out), *extra]


# -- model and data loading -------------------------------------------------------------------

def test_model_folder_without_a_tokenizer(folders, tmp_path, capsys):
    model = _save_gpt2(tmp_path / "no-tokenizer", tokenizer=False)
    line = _refused(capsys, ["prune", "--model", model, "--data", folders["data"], *FAST,
                             "--out", str(tmp_path / "o")])
    assert "no tokenizer" in line and "save_pretrained" in line and "no-tokenizer" in line
    assert "adds no token" not in line


def test_sequence_longer_than_the_model_positions(folders, tmp_path, capsys):
    model = _save_gpt2(tmp_path / "short", n_positions=4)
    line = _refused(capsys, ["eval", "--model", model, "--data", folders["data"]])
    assert "6 tokens" in line and "4 positions" in line and "data.jsonl:1" in line
    assert "IndexError" not in line


def test_token_id_outside_the_vocabulary(folders, tmp_path, capsys):
    model = _save_gpt2(tmp_path / "small-vocab", vocab_size=5)
    line = _refused(capsys, ["prune", "--model", model, "--data", folders["data"], *FAST,
                             "--out", str(tmp_path / "o")])
    assert "outside the vocabulary" in line and "0 to 4" in line and "data.jsonl:1" in line


def test_library_prune_refuses_a_task_the_model_cannot_take():
    from fastedge.prune import prune
    from fastedge.tasks.base import Example, TaskData, TaskDataError
    model = tiny_model("gpt2")  # 32 positions, 37 token ids
    long = Example(clean_ids=[1] * 40, corrupted_ids=[2] * 40, target_positions=[38],
                   clean_answer=[1], corrupted_answer=[2], source="long:0")
    with pytest.raises(TaskDataError, match="long:0: 40 tokens, but .* has 32 positions"):
        prune(model, TaskData("long", [long]), steps=1, batch_size=1, progress=False)
    foreign = Example(clean_ids=[1, 2, 99], corrupted_ids=[1, 3, 99], target_positions=[1],
                      clean_answer=[99], corrupted_answer=[99], source="foreign:0")
    with pytest.raises(TaskDataError, match="foreign:0: clean token id 99 lies outside the vocabulary"):
        prune(model, TaskData("foreign", [foreign]), steps=1, batch_size=1, progress=False)


def test_data_file_that_is_not_utf8_names_the_line(folders, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(("\n".join(_lines()[:2]) + "\n").encode()
                    + '{"clean": "the caf\xe9 <predict>cat</predict>"}\n'.encode("latin-1"))
    line = _refused(capsys, ["eval", "--model", folders["model"], "--data", str(bad)])
    assert "latin1.jsonl:3" in line and "not UTF-8" in line and "0xe9" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(folders, capsys):
    line = _refused(capsys, ["eval", "--model", folders["model"], "--data", folders["data"],
                             "--device", "cuda"])
    assert line.startswith("fastedge: --device cuda:") and "--device cpu" in line


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device(folders, device, capsys):
    line = _refused(capsys, ["eval", "--model", folders["model"], "--data", folders["data"],
                             "--device", device])
    assert f"--device {device}: not a device name; use cpu, cuda or cuda:N" in line


def test_unsupported_architecture(folders, tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM
    folder = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, ffn_dim=16,
                             vocab_size=len(WORDS), max_position_embeddings=16,
                             word_embed_proj_dim=16)).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    line = _refused(capsys, ["prune", "--model", str(folder), "--data", folders["data"], *FAST,
                             "--out", str(tmp_path / "o")])
    assert "'opt'" in line and "not supported" in line


# -- files, options and task data --------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing data", "data is a folder", "missing circuit", "draw missing"])
def test_missing_or_unreadable_files(folders, tmp_path, case, capsys):
    argv, expect = {
        "missing data": (["eval", "--model", folders["model"], "--data", str(tmp_path / "nope.jsonl")],
                         "no such data file: " + str(tmp_path / "nope.jsonl")),
        "data is a folder": (["eval", "--model", folders["model"], "--data", str(tmp_path)],
                             str(tmp_path) + ": not a datasets folder written by save_to_disk"),
        "missing circuit": (["eval", "--circuit", str(tmp_path / "c.json")], "c.json"),
        "draw missing": (["draw", str(tmp_path / "c.json")], "c.json"),
    }[case]
    assert expect in _refused(capsys, argv)


def test_unknown_task_is_named_as_such(capsys):
    line = _refused(capsys, ["eval", "--task", "nosuch"])  # the shipped model: it was "needs a tokenizer"
    assert line.startswith("fastedge: unknown task 'nosuch'; the tasks are ") and "ioi" in line


def test_invalid_task_data_is_one_line_naming_the_line(folders, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_lines()[0] + "\n{not json\n")
    line = _refused(capsys, ["prune", "--model", folders["model"], "--data", str(bad), *FAST,
                             "--out", str(tmp_path / "o")])
    assert "bad.jsonl:2: invalid JSON" in line


def test_option_checks_are_one_line(folders, tmp_path, capsys):
    line = _refused(capsys, _prune(folders, tmp_path / "o", "--steps", "0"))
    assert "steps" in line


def test_negative_seed_reports_the_value_given(folders, tmp_path, capsys):
    line = _refused(capsys, _prune(folders, tmp_path / "o", "--seed", "-1"))
    assert line.startswith("fastedge: --seed -1: a seed must be")  # not the derived noise seed -1000003
    with pytest.raises(ValueError, match="seed must be non-negative, got -1$"):
        fastedge.patch(tiny_model("gpt2"), seed=-1)


def test_argparse_usage_errors_still_exit_2(capsys):
    for argv in (["prune", "--no-such-option"], ["eval", "--batch-size", "many"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "usage: fastedge" in capsys.readouterr().err


def test_debug_shows_the_traceback(folders, tmp_path):
    for argv in (["--debug", "eval", "--model", folders["model"], "--data", str(tmp_path / "nope.jsonl")],
                 ["eval", "--model", folders["model"], "--data", str(tmp_path / "nope.jsonl"), "--debug"]):
        with pytest.raises(FileNotFoundError):
            main(argv)


def test_exit_status_of_the_console_command(tmp_path):
    """The real process: status 2 and one line for a refused input."""
    result = subprocess.run([sys.executable, "-m", "fastedge.cli", "draw", str(tmp_path / "missing.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"fastedge: {tmp_path / 'missing.json'}: "
                                                  f"No such file or directory"]


# -- circuits ----------------------------------------------------------------------------------

def test_compare_and_eval_refuse_another_models_circuits(finished_run, capsys):
    circuit = str(finished_run / "circuit.json")  # found on the tiny GPT-2; the shipped model is a Llama
    for argv in (["compare", circuit, circuit, "--task", "induction", "--n-examples", "8"],
                 ["eval", "--circuit", circuit, "--n-examples", "8"]):
        line = _refused(capsys, argv)
        assert "circuit.json was found on another model" in line and "give the --model" in line


@pytest.mark.parametrize("edges, expect", [
    ([("tok_embeds", "a0.h0.q", "extra")], "edge 0 is ('tok_embeds', 'a0.h0.q', 'extra'): expected a"),
    (["tok_embeds"], "edge 0 is 'tok_embeds': expected a [writer, reader] pair"),
    ("tok_embeds", "edges must be a list of (writer, reader) pairs, got the string 'tok_embeds'"),
    ([("tok_embeds", 3)], "edge 0 is ('tok_embeds', 3): expected a [writer, reader] pair"),
])
def test_set_circuit_refuses_malformed_edges(edges, expect):
    em = fastedge.patch(tiny_model("gpt2"))
    em.set_circuit([("tok_embeds", "a0.h0.q")])
    before = [m.clone() for m in em._fixed_masks]
    with pytest.raises(ValueError, match=re.escape(expect)):
        em.set_circuit(edges)
    assert all(torch.equal(a, b) for a, b in zip(before, em._fixed_masks))  # left as it was
    with pytest.raises(ValueError, match="nodes must be a list of writer names"):
        em.set_circuit([], nodes="a0.h0")


# -- checkpoints -------------------------------------------------------------------------------

def _copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "a tensor", "masks file"])
def test_resume_from_a_damaged_or_foreign_checkpoint_names_the_file(folders, finished_run, tmp_path,
                                                                   damage, capsys):
    out = _copy_run(finished_run, tmp_path)
    latest = out / "checkpoints" / "latest.pt"
    if damage == "garbage":
        latest.write_text("not a checkpoint\n")
    elif damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:300])
    elif damage == "empty":
        latest.write_bytes(b"")
    elif damage == "a tensor":
        torch.save(torch.zeros(3), latest)
    else:
        shutil.copy(out / "masks.pt", latest)
    line = _refused(capsys, _prune(folders, out, "--checkpoint-every", "2", "--resume"))
    assert line.startswith(f"fastedge: {latest}: ")
    assert ("corrupt or truncated" in line) == (damage in ("garbage", "truncated", "empty"))
    assert "delete it to start fresh" in line


def test_resume_without_a_checkpoint_says_the_run_starts_fresh(folders, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(_prune(folders, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "fastedge: warning: resume: no checkpoint at" in err and "starts fresh from step 1" in err
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_full_disk_while_checkpointing(folders, tmp_path, monkeypatch, capsys):
    """torch.save on a full disk: a 0-byte latest.tmp and an OSError(ENOSPC)
    (or torch's own 'unexpected pos' RuntimeError). The run stops with a line
    that names the path and the free space, the tmp file is gone, and the
    previous checkpoint is kept."""
    prune_module = importlib.import_module("fastedge.prune")  # fastedge.prune is also a function
    real_save = torch.save
    out = tmp_path / "full"
    latest = out / "checkpoints" / "latest.pt"
    for failure in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos 64 vs 0")):
        shutil.rmtree(out, ignore_errors=True)

        def save(obj, f, *args, _failure=failure, **kw):
            if isinstance(obj, dict) and obj.get("step", 0) >= 4:
                open(f, "wb").close()  # what a full disk leaves: an empty file
                raise _failure
            return real_save(obj, f, *args, **kw)

        monkeypatch.setattr(prune_module.torch, "save", save)
        line = _refused(capsys, _prune(folders, out, "--checkpoint-every", "2"), status=1)
        monkeypatch.setattr(prune_module.torch, "save", real_save)
        assert f"cannot write the checkpoint of step 4 to {latest}" in line
        assert " free in " in line and "the checkpoint of step 2 is kept" in line and "--resume" in line
        assert not (out / "checkpoints" / "latest.tmp").exists()
        assert prune_module.checkpoint_step(latest) == 2


# -- runs that stop ----------------------------------------------------------------------------

def test_nan_loss_message_uses_the_steps_of_log_jsonl(folders, tmp_path, monkeypatch, capsys):
    prune_module = importlib.import_module("fastedge.prune")  # fastedge.prune is also a function
    real = prune_module._micro_batch_loss

    def poisoned(t, step, j, chunk, target):  # step is 0-based here: the 3rd step fails
        kl, sparsity, loss = real(t, step, j, chunk, target)
        return (kl, sparsity, loss * float("nan")) if step == 2 else (kl, sparsity, loss)

    monkeypatch.setattr(prune_module, "_micro_batch_loss", poisoned)
    out = tmp_path / "nan"
    line = _refused(capsys, _prune(folders, out, "--checkpoint-every", "2"), status=1)
    logged = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2]
    assert line.startswith("fastedge: step 3: loss is nan; stopped.")
    assert f"the last good checkpoint is {out / 'checkpoints' / 'latest.pt'} (after step 2)" in line
    line = _refused(capsys, _prune(folders, tmp_path / "nan2", "--checkpoint-every", "10"), status=1)
    assert "no checkpoint had been written yet (the first comes after step 10" in line
    assert "pass out_dir" not in line


def test_a_model_with_nan_weights_fails_eval_and_prune(folders, tmp_path, capsys):
    model = _save_gpt2(tmp_path / "nan-weights", nan_weight=True)
    for argv in (["eval", "--model", model, "--data", folders["data"], "--out", str(tmp_path / "m.json")],
                 ["prune", "--model", model, "--data", folders["data"], *FAST, "--out", str(tmp_path / "o")]):
        line = _refused(capsys, argv, status=1)
        assert "not finite" in line and "transformer.h.0.attn.c_attn.weight" in line
    assert not (tmp_path / "m.json").exists()


def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes(folders, tmp_path, monkeypatch, capsys):
    prune_module = importlib.import_module("fastedge.prune")  # fastedge.prune is also a function
    real = prune_module._train_step

    def interrupted(t, step, indices):
        if step == 2:
            raise KeyboardInterrupt
        return real(t, step, indices)

    out = tmp_path / "ctrl-c"
    argv = _prune(folders, out, "--checkpoint-every", "2")
    monkeypatch.setattr(prune_module, "_train_step", interrupted)
    line = _refused(capsys, argv, status=130)
    monkeypatch.setattr(prune_module, "_train_step", real)
    latest = out / "checkpoints" / "latest.pt"
    assert line.startswith(f"fastedge: interrupted; the last checkpoint is {latest} (step 2); resume with: ")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "fastedge" and command[-1] == "--resume"
    assert main(command[1:]) == 0  # the command it gives does resume, and finishes
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_ctrl_c_before_the_first_checkpoint(folders, tmp_path, monkeypatch, capsys):
    prune_module = importlib.import_module("fastedge.prune")  # fastedge.prune is also a function
    monkeypatch.setattr(prune_module, "_train_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    capsys.readouterr()
    assert main(_prune(folders, tmp_path / "o", "--resume")) == 130
    warning, line = capsys.readouterr().err.strip().splitlines()  # --resume found no checkpoint: a warning
    assert warning.startswith("fastedge: warning: resume: no checkpoint at")
    assert line.startswith("fastedge: interrupted before the first checkpoint")
    assert "before the first checkpoint" in line and "nothing to resume" in line
    assert line.split("start again with: ", 1)[1].count("--resume") == 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_sigint_to_a_running_prune(folders, tmp_path):
    """A real Ctrl-C (SIGINT) to the command: status 130, one line, the checkpoint kept."""
    out = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "fastedge.cli", "prune", "--model", folders["model"], "--data",
           folders["data"], "--steps", "100000", "--batch-size", "2", "--no-progress",
           "--checkpoint-every", "1", "--out", str(out)]
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1")  # no loading bars on stderr
    # SIGINT as a terminal delivers it: a shell's background job (`.ci/run &`)
    # or a pytest-xdist worker may ignore SIGINT, and a child inherits that
    # (Python then installs no KeyboardInterrupt handler at all)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = out / "checkpoints" / "latest.pt"
    deadline = time.time() + 300   # a loaded machine (CI) can take minutes to the first checkpoint
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip() and "[transformers]" not in x]
    assert len(lines) == 1 and lines[0].startswith(f"fastedge: interrupted; the last checkpoint is {latest}")
    assert "Traceback" not in err
    from fastedge.prune import checkpoint_step
    assert checkpoint_step(latest) >= 1


# -- kernels: every backend that runs here -----------------------------------------------------

BACKENDS = ["torch", "reference", "triton"]


def _float64_sum(stack, mask):
    return (mask.double() @ stack.reshape(stack.shape[0], -1).double()).reshape(
        (mask.shape[0],) + tuple(stack.shape[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride0_stack_runs_or_is_refused_with_the_reason(backend, monkeypatch):
    torch.manual_seed(3)
    stack = torch.randn(1, 3, 40).expand(19, 3, 40)  # every row the same memory: row stride 0
    mask = torch.rand(17, 19, requires_grad=True)
    monkeypatch.setenv("FASTEDGE_BACKEND", backend)
    if backend == "triton":
        with pytest.raises(backends.NoBackendError, match="triton: the stack's rows overlap in memory "
                                                          "\\(row stride 0 < 120"):
            fastedge.masked_writer_sum(stack, mask)
        return
    out = fastedge.masked_writer_sum(stack, mask)
    torch.testing.assert_close(out.double(), _float64_sum(stack, mask.detach()), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expect = stack.reshape(19, -1).double().sum(-1).expand(17, 19)
    torch.testing.assert_close(mask.grad.double(), expect, rtol=1e-5, atol=1e-4)


def _triton_first(monkeypatch):
    """Dispatch as on a GPU, where Triton comes first."""
    monkeypatch.delenv("FASTEDGE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "priority", lambda device: ["triton", "torch", "reference"])


def test_stride0_stack_falls_back_from_triton(monkeypatch):
    torch.manual_seed(4)
    stack = torch.randn(1, 2, 24).expand(21, 2, 24)
    mask = torch.rand(18, 21)
    _triton_first(monkeypatch)
    out = fastedge.masked_writer_sum(stack, mask)
    torch.testing.assert_close(out.double(), _float64_sum(stack, mask), rtol=1e-5, atol=1e-5)
    reasons = backends.explain(backends.Call(op="masked_sum", device=torch.device("cpu"), dtype=torch.float32,
                                             n_readers=18, n_writers=21, n_elements=48, row_stride=0))
    assert reasons["torch"] == [] and any("overlap" in r for r in reasons["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_stack_with_masks_above_65504(backend, monkeypatch):
    """The fp16 products of the Triton kernels stop at 65504 (they used to give
    NaN): Triton refuses such masks; torch and reference compute them."""
    torch.manual_seed(5)
    stack = (torch.randn(20, 2, 32) * 1e-3).half().requires_grad_()
    mask = torch.rand(17, 20) * 2e5  # 17 readers: the kernels' tensor-core path
    monkeypatch.setenv("FASTEDGE_BACKEND", backend)
    if backend == "triton":
        with pytest.raises(backends.NoBackendError, match="triton: mask values up to 1\\d{5} with a float16 stack: .* 65504"):
            fastedge.masked_writer_sum(stack, mask)
        return
    out = fastedge.masked_writer_sum(stack, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _float64_sum(stack.detach(), mask), rtol=2e-3, atol=1e-2)
    dout = torch.randn_like(out) * 1e-3
    out.backward(dout)
    expect = (mask.double().t() @ dout.reshape(17, -1).double()).reshape(stack.shape)
    torch.testing.assert_close(stack.grad.double(), expect, rtol=2e-3, atol=1e-2)


def test_fp16_large_masks_fall_back_from_triton_and_in_range_masks_stay(monkeypatch):
    torch.manual_seed(6)
    stack = (torch.randn(20, 64) * 1e-3).half().requires_grad_()
    _triton_first(monkeypatch)
    big = torch.rand(17, 20) * 2e5
    out = fastedge.masked_writer_sum(stack, big)
    torch.testing.assert_close(out.double(), _float64_sum(stack.detach(), big), rtol=2e-3, atol=1e-2)
    dout = torch.randn_like(out) * 1e-3
    out.backward(dout)  # the backward falls back too
    torch.testing.assert_close(stack.grad.double(), big.double().t() @ dout.double(), rtol=2e-3, atol=1e-2)
    # masks up to 65504 still run on Triton, and right
    monkeypatch.setenv("FASTEDGE_BACKEND", "triton")
    in_range = torch.rand(17, 20) * 65504
    out = fastedge.masked_writer_sum(stack.detach(), in_range)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _float64_sum(stack.detach(), in_range), rtol=2e-3, atol=1e-2)


def test_the_range_check_costs_only_callers_fp16_masks(monkeypatch):
    """Reading the mask's range back is a host sync: fp16 stacks with a
    caller's mask pay it (forward and stack backward); the edge model's own
    masks (samples and circuits, in [0, 1]) and other dtypes never do."""
    masked_sum = importlib.import_module("fastedge.ops.masked_sum")
    real, measured = masked_sum.mask_abs_max, []
    monkeypatch.setattr(masked_sum, "mask_abs_max", lambda m, dtype: measured.append(dtype) or real(m, dtype))
    torch.manual_seed(7)
    stack = torch.randn(9, 2, 8, dtype=torch.float16, requires_grad=True)
    fastedge.masked_writer_sum(stack, torch.rand(5, 9)).float().sum().backward()
    assert [d for d in measured if d == torch.float16] == [torch.float16, torch.float16]
    measured.clear()
    fastedge.masked_writer_sum(stack, torch.rand(5, 9), unit_mask=True).float().sum().backward()
    assert measured == [] or all(d != torch.float16 for d in measured)
    em = fastedge.patch(tiny_model("gpt2", dtype=torch.float16))
    ids, corrupted = torch.randint(0, 37, (2, 6)), torch.randint(0, 37, (2, 6))
    measured.clear()
    em.train()
    em(ids, corrupted).logits.float().sum().backward()
    em.eval()
    em.set_circuit([("tok_embeds", "a0.h0.q")])
    with torch.no_grad():
        em(ids, corrupted)
    assert not any(d == torch.float16 for d in measured)
