"""The `fastedge` command line: prune, eval, draw, compare, report, attribute, export-mib.

    fastedge prune                       # the shipped induction model, on a CPU in about two minutes
    fastedge prune --model gpt2 --task ioi --target-sparsity 0.98 --steps 3000 --out runs/ioi
    fastedge eval --model gpt2 --task ioi --circuit runs/ioi/circuit.json
    fastedge draw runs/ioi/circuit.json --out circuit.pdf
    fastedge compare a/circuit.json b/circuit.json [--model M --task T]
    fastedge report runs/ioi [--sweep sweep.json]   # rebuild runs/ioi/report.html
    fastedge attribute --model gpt2 --task ioi --method eap-ig-inputs --out scores.pt   # fastedge.cli_attribute
    fastedge eval --model gpt2 --task ioi --scores scores.pt --sweep mib
    fastedge export-mib --scores scores.pt --model-tag gpt2 --task-tag ioi --method eap-ig --out mib/
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional

from fastedge import cli_attribute  # attribute, export-mib, eval --scores
from fastedge.cli_errors import EXIT_FAILED, EXIT_INTERRUPTED, CliError, describe, one_line

SHIPPED = "shipped"
TRACR_PREFIX = "tracr:"


def _add_model_and_task(p: argparse.ArgumentParser, *, require_task: bool = False) -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face Hub name or a local folder saved with save_pretrained; "
                        "tracr:<program> (reverse, xproportion, ...: fastedge.tracr.programs) compiles a "
                        "RASP program, whose input space is the task (needs the tracr extra); "
                        "default: the tiny induction model shipped with fastedge")
    src = p.add_mutually_exclusive_group(required=require_task)
    src.add_argument("--task", default=None,
                     help="a built-in task: ioi, greater-than, gendered-pronoun, boolean-instruct, "
                          "boolean-fewshot, induction (default: induction for the shipped model)")
    src.add_argument("--data", default=None, metavar="PATH",
                     help='your examples: a JSONL file, one a line: {"clean": "... to<predict> X</predict>", '
                          '"corrupted": "... to<predict> Y</predict>", "split": "train"|"validation"} '
                          '(a space before the tag, "to <predict>X</predict>", is read as the answer " X"); '
                          'or a CSV or parquet file, or a Hugging Face datasets folder (save_to_disk), '
                          'with the same columns')
    p.add_argument("--clean-column", default="clean", metavar="NAME",
                   help="--data's column (JSONL key) of clean texts (default: clean)")
    p.add_argument("--corrupted-column", default="corrupted", metavar="NAME",
                   help="--data's column of corrupted texts (default: corrupted)")
    p.add_argument("--target-column", default=None, metavar="NAME",
                   help="--data's column of clean answers; the texts are then prompts without "
                        "<predict> tags (default: none, the answers are tagged in the texts)")
    p.add_argument("--n-examples", type=int, default=None,
                   help="examples to generate for a built-in task (default: the task's own)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="run the frozen model in bfloat16")
    p.add_argument("--seed", type=int, default=0, help="seed for data, masks and sampling (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastedge", description="Find circuits in language models with Edge Pruning.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="learn edge masks and write the circuit, its metrics and a picture",
                       description="Prune a model on a task: writes circuit.json, metrics.json, "
                                   "circuit.svg, log.jsonl, checkpoints/ and report.html to --out.")
    _add_model_and_task(p)
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="fraction of edges to remove (default 0.95; for the shipped model 1.0, with the "
                        "circuit extracted at 0.9)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default 3000; 1000 for the shipped model)")
    p.add_argument("--circuit-sparsity", type=float, default=None,
                   help="edge sparsity of the extracted circuit (default: the target when below 1; for "
                        "targets of 1 or more, the edges whose deterministic mask exceeds 0.5)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default 32)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="examples per forward pass; gradients accumulate over the batch "
                        "(under torchrun: default batch size / ranks)")
    p.add_argument("--recompute-readers", action="store_true",
                   help="recompute each layer's reader inputs in the backward (less memory: use it for "
                        "large models; CodeLlama-13B at micro-batches of 8 x 72 tokens needs it on 80 GB)")
    p.add_argument("--shard", choices=["fsdp"], default=None,
                   help="under torchrun: shard the frozen model's weights over the ranks with FSDP2, one "
                        "block per unit, for models too large for one device (default: every rank holds "
                        "the whole model)")
    p.add_argument("--precision", choices=["full", "fast"], default="full",
                   help="masked sums on the GPU: full (the fp32 masks carried to 2^-16 in bf16 products) "
                        "or fast (masks rounded once to the model's dtype: one product, the authors' precision)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the masks' log_alphas (default 0.8; 0.1 for the shipped model, "
                        "0.05 for tracr: models)")
    p.add_argument("--lambda-lr", type=float, default=None,
                   help="learning rate of the Lagrange multipliers (default 0.8; 0.01 for tracr: models)")
    p.add_argument("--ablation", choices=["interchange", "zero", "mean"], default=None,
                   help="what a removed edge passes to its reader instead of the writer's output: "
                        "interchange (the writer's output on the corrupted input), zero, or mean (its "
                        "mean output over training inputs) (default interchange; zero for tracr: models)")
    p.add_argument("--no-node-masks", action="store_true", help="learn edge masks only")
    p.add_argument("--init-from", default=None, metavar="SCORES",
                   help="warm start: initialise the edge masks from attribution scores (a file written by "
                        "fastedge attribute, or a run's masks.pt), by rank: the best edges start where "
                        "masks start without scores, the worst at log_alpha 0")
    p.add_argument("--preselect", type=float, default=None, metavar="FRACTION",
                   help="with --init-from: train only this top fraction of the edges by score and hold every "
                        "other edge at 0 (Hybrid Attribution and Pruning); the sparsity target ramps from "
                        "1 - FRACTION")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M",
                   help="also a checkpoint whenever M minutes passed since the last one (default 5; "
                        "0: only every --checkpoint-every steps)")
    p.add_argument("--out", default="fastedge-out", metavar="DIR", help="output folder (default ./fastedge-out)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (without it, a folder holding a run's "
                          "log.jsonl or checkpoint is refused)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (neither fastedge's nor transformers' model-loading bars); "
                        "without it, a terminal gets a progress bar and a log or pipe a line every "
                        "1/20 of the steps")

    p = sub.add_parser("eval", help="evaluate a circuit (or the full model) on a task",
                       description="Prints KL to the full model, logit difference, accuracy and "
                                   "normalised faithfulness as JSON.")
    _add_model_and_task(p)
    p.add_argument("--circuit", default=None, metavar="JSON", help="circuit.json (default: the full model)")
    p.add_argument("--masks", default=None, metavar="PT",
                   help="masks.pt written by prune, read only with --sweep (circuits extracted from these "
                        "masks at each sparsity); the run's own circuit is its circuit.json: --circuit")
    p.add_argument("--sweep", default=None, metavar="mib|S1,S2,...",
                   help="the faithfulness curve over circuits extracted from --masks, with MIB's CPR and CMD: "
                        "'mib' for MIB's edge fractions (kept 0.001 ... 1), or edge sparsities that span "
                        "MIB's range (include 0 and at least 0.999)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="examples per forward pass while evaluating (default 32; lower it when memory is short)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    cli_attribute.add_eval_scores_options(p)

    p = sub.add_parser("draw", help="draw a circuit as SVG (built in), PNG or PDF (graphviz), or DOT text")
    p.add_argument("circuit", metavar="CIRCUIT_JSON")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file; its suffix picks the format: .svg (drawn by fastedge), .png or .pdf "
                        "(need graphviz), .dot (graphviz's text format) (default: circuit.svg beside the JSON)")
    p.add_argument("--engine", choices=("builtin", "graphviz"), default=None,
                   help="who draws: builtin (fastedge's own SVG; the default for .svg) or graphviz's `dot` "
                        "(the default for .png and .pdf)")

    p = sub.add_parser("compare", help="compare two circuits: shared and unique edges, IoU, and "
                                       "(with --model and --task) the faithfulness of their intersection and union")
    p.add_argument("first", metavar="A_JSON")
    p.add_argument("second", metavar="B_JSON")
    _add_model_and_task(p)
    p.add_argument("--batch-size", type=int, default=32,
                   help="examples per forward pass while evaluating (default 32)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the comparison to this JSON file")

    p = sub.add_parser("report", help="rebuild a run's report.html (circuit, metrics, training plots)",
                       description="Write RUN_DIR/report.html, one self-contained page that opens offline: "
                                   "the circuit, the metrics beside the full model's, and plots of the "
                                   "training log; with a sweep, the faithfulness curve with CPR and CMD.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a fastedge prune run")
    p.add_argument("--sweep", default=None, metavar="JSON",
                   help="the result of fastedge eval --masks RUN_DIR/masks.pt --sweep ... --out JSON "
                        "(default: RUN_DIR/sweep.json when there is one)")
    cli_attribute.add_attribute_parser(sub, _add_model_and_task)
    cli_attribute.add_export_mib_parser(sub)
    for p in sub.choices.values():  # --debug after the command too (SUPPRESS keeps the global value)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error instead of a one-line message")
    return parser


# -- loading ------------------------------------------------------------------------

def resolve_device(requested: Optional[str]) -> str:
    """The device to run on: `requested` when this machine has it, else a
    refusal that names the device and what to use instead."""
    import torch
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {requested}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return str(device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = ("this PyTorch is a CPU build" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
            raise CliError(f"--device {requested}: {why}; use --device cpu, or leave --device out")
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {requested}: this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
        return str(device)
    try:  # another accelerator (mps, xpu, ...): usable when a tensor can live there
        torch.empty(0, device=device)
    except Exception as exc:  # noqa: BLE001 - any failure means the device is unusable
        raise CliError(f"--device {requested}: not available here ({one_line(str(exc))}); "
                       f"use cpu or cuda") from None
    return str(device)


# tokenizer files that AutoTokenizer reads from a local folder
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                    "spiece.model", "vocab.txt")


def _load_tokenizer(model: str):
    """(tokenizer or None, why none). A local folder without tokenizer files
    has no tokenizer, even where AutoTokenizer builds an empty one."""
    from transformers import AutoTokenizer
    folder = Path(model)
    if folder.is_dir() and not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None, (f"the model folder {model} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...): "
                      f"save one beside the model with tokenizer.save_pretrained({model!r})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        return None, f"no tokenizer could be loaded for {model} ({one_line(str(exc))[:200]})"
    if len(tokenizer) == 0:
        return None, f"the tokenizer of {model} is empty (no vocabulary)"
    return tokenizer, ""


def load_model_and_task(args):
    import torch
    device = resolve_device(args.device)
    tokenizer, no_tokenizer = None, "the shipped model has no text tokenizer"
    if args.model and args.model.startswith(TRACR_PREFIX):
        return load_tracr_model_and_task(args, device)
    if args.model in (None, SHIPPED):
        from fastedge import shipped
        model = shipped.load_shipped_model()
        name = "fastedge/shipped/" + shipped.SHIPPED_MODEL_NAME
    elif getattr(args, "shard", None):  # --shard fsdp: each rank reads only its shards (fastedge.sharding)
        from fastedge.sharding import load_for_command_line
        model, tokenizer, no_tokenizer = load_for_command_line(args, device, _check_local_folder, _load_tokenizer)
        name = args.model
    else:
        from transformers import AutoModelForCausalLM
        _check_local_folder(args.model)
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager")
        except (OSError, ValueError) as exc:
            local = "" if Path(args.model).expanduser().exists() else \
                f" (and there is no local folder {args.model})"
            raise CliError(f"cannot load model {args.model!r}{local}: {one_line(str(exc))}") from None
        tokenizer, no_tokenizer = _load_tokenizer(args.model)
        name = args.model
    model = model.to(device).eval()
    from fastedge.threads import pick_cpu_threads
    pick_cpu_threads(model, device)   # one thread for tiny models on a CPU (fastedge.threads)
    if args.bf16:
        model = model.to(torch.bfloat16)
    task = load_task(args, tokenizer, shipped_model=args.model in (None, SHIPPED), no_tokenizer=no_tokenizer)
    check_task_fits_model(task, model, name)
    return model, task, name


def _looks_like_a_path(name: str) -> bool:
    """A --model that can only be a local folder: a Hub id is ``name`` or
    ``owner/name``, never absolute, never starting with . or ~, never with
    two slashes or a backslash."""
    return (name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or "\\" in name
            or name.count("/") > 1 or Path(name).is_absolute())


def _check_local_folder(name: str) -> None:
    """A local model folder that is not there is reported as such, not as a
    Hub id that transformers finds malformed or cannot download."""
    path = Path(name).expanduser()
    if _looks_like_a_path(name) and not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        where = f" (the nearest existing folder is {parent})" if parent is not None else ""
        raise CliError(f"--model {name}: no such folder{where}; give a folder saved with "
                       f"save_pretrained, or a Hugging Face Hub name such as gpt2")
    if path.exists() and not path.is_dir():
        raise CliError(f"--model {name} is a file; give the folder that save_pretrained wrote "
                       f"(with config.json), or a Hugging Face Hub name")


def load_tracr_model_and_task(args, device):
    """``--model tracr:<program>``: compile the named RASP program
    (`fastedge.tracr.programs`); the task is its input space."""
    import fastedge.tracr as ft
    program = args.model[len(TRACR_PREFIX):]
    if args.task or args.data:
        raise CliError(f"--model {args.model} brings its own task (the program's input space); "
                       f"drop --task/--data")
    try:
        ft.programs.spec(program)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not ft.tracr_available():
        raise CliError(f"--model {args.model} needs Tracr: pip install -e \".[tracr]\"")
    tm = ft.programs.load(program)
    model = tm.model.to(device).eval()
    from fastedge.threads import pick_cpu_threads
    pick_cpu_threads(model, device)   # a few dozen dimensions wide: one thread, as for any tiny model
    task = ft.task(tm, n_examples=args.n_examples, seed=args.seed)
    return model, task, args.model


def check_task_fits_model(task, model, name: str) -> None:
    """Refuse a task whose token ids or lengths the model cannot take (an
    IndexError deep inside the embedding otherwise)."""
    from fastedge.adapters import input_limits
    vocab, positions = input_limits(model)
    task.check_fits(vocab_size=vocab, max_positions=positions, model_name=name)


def load_task(args, tokenizer, *, shipped_model: bool, no_tokenizer: str = ""):
    from fastedge import tasks
    kw = {"seed": args.seed}
    if args.n_examples is not None:
        kw["n_examples"] = args.n_examples
    if args.data:
        if tokenizer is None:
            raise CliError(f"--data needs a model with a tokenizer: {no_tokenizer}")
        from fastedge.tasks.files import Columns, load_data
        columns = Columns(clean=args.clean_column, corrupted=args.corrupted_column, target=args.target_column)
        try:
            return load_data(args.data, tokenizer, columns=columns)
        except ImportError as e:  # an optional extra (pyarrow, datasets) is missing: the message names it
            raise CliError(str(e)) from None
    name = args.task if args.task is not None else ("induction" if shipped_model else None)
    if name is None:
        raise CliError("give --task or --data for this model")
    if not name.strip():   # an empty --task is a mistake, not a request for the default
        raise CliError("--task is empty: give a task name (ioi, greater-than, gendered-pronoun, "
                       "boolean-instruct, boolean-fewshot, induction) or --data FILE")
    if shipped_model and name == "induction":
        from fastedge.shipped.defaults import induction_task
        return induction_task(**kw)
    if name.strip().lower().replace("_", "-") not in tasks.TASKS:
        raise CliError(f"unknown task {name!r}; the tasks are {', '.join(sorted(tasks.TASKS))}, "
                       f"or give your own with --data FILE.jsonl")
    if tokenizer is None and name != "induction":
        raise CliError(f"task {name!r} needs a tokenizer: {no_tokenizer}")
    return tasks.get_task(name, tokenizer, **kw)


# -- option checks -------------------------------------------------------------------------

def _check_task_options(args) -> None:
    """Options every command that builds a task shares (--seed: `check_seed`,
    in main); a ValueError names the option and the user's value."""
    if args.n_examples is not None and args.n_examples < 1:
        raise ValueError(f"--n-examples must be at least 1, got {args.n_examples}")


def _check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")


def parse_numbers(text: str, option: str, what: str) -> list:
    """Numbers separated by commas, as `option` takes them; a ValueError
    names the item that is not a number."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{option} takes {what} separated by commas; "
                             f"{item.strip()!r} in {text!r} is not a number") from None
    return values


def _parse_sweep(text: str) -> list:
    """--sweep: "mib" (MIB's fractions of edges kept) or edge sparsities "S1,S2,..."."""
    if text.strip().lower() == "mib":
        return None
    return parse_numbers(text, "--sweep", "edge sparsities (or 'mib')")


# -- commands ---------------------------------------------------------------------------

def cmd_prune(args) -> int:
    # under torchrun (`torchrun --nproc_per_node N -m fastedge.cli prune ...`) every rank joins the
    # process group and prunes data parallel; only rank 0 prints and writes
    from fastedge import distributed
    # every rank looks at --out before any rank writes there (rank 0 writes only after the barrier)
    _check_output_folder(args)
    owns_group = distributed.init_from_env(device=args.device)
    try:
        distributed.barrier(distributed.current())
        return _prune(args, main_rank=distributed.current().is_main)
    finally:
        if owns_group:
            distributed.destroy()


def _prune(args, *, main_rank: bool) -> int:
    from fastedge.prune import prune
    # transformers' weight-loading bars too: with --no-progress, and in a log or pipe,
    # where a bar is redrawn as lines
    if not main_rank or args.no_progress or not _stderr_is_terminal():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    shipped_model = args.model in (None, SHIPPED)
    if shipped_model:
        from fastedge.shipped.defaults import PRUNE_DEFAULTS as defaults
    elif (args.model or "").startswith(TRACR_PREFIX):
        from fastedge.tracr.tasks import PRUNE_DEFAULTS as defaults
    else:
        defaults = {"target_sparsity": 0.95, "steps": 3000}
    # a user's 0 stays 0 (and is refused below), never a default
    options = dict(batch_size=args.batch_size if args.batch_size is not None else defaults.get("batch_size", 32),
                   seed=args.seed, ablation=args.ablation or defaults.get("ablation", "interchange"),
                   node_masks=not args.no_node_masks and defaults.get("node_masks", True),
                   checkpoint_every=args.checkpoint_every,
                   checkpoint_seconds=_checkpoint_seconds(args.checkpoint_minutes),
                   progress=not args.no_progress, micro_batch_size=args.micro_batch_size,
                   recompute_readers=args.recompute_readers, precision=args.precision)
    if args.preselect is not None:
        if args.init_from is None:
            raise ValueError("--preselect needs --init-from (the scores that rank the edges)")
        options["preselect"] = args.preselect
    for key in ("lr", "lambda_lr"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
        elif key in defaults:
            options[key] = defaults[key]
    for key in ("sparsity_warmup_steps", "lr_warmup_steps", "init_log_alpha", "circuit_sparsity",
                "sparsity_estimate"):
        if key in defaults:
            options[key] = defaults[key]
    if args.circuit_sparsity is not None:
        options["circuit_sparsity"] = args.circuit_sparsity
    elif args.target_sparsity is not None:
        options.pop("circuit_sparsity", None)
    target = args.target_sparsity if args.target_sparsity is not None else defaults["target_sparsity"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    # every numeric option checked before the model loads (ValueError naming it and its value)
    from fastedge.prune import PruneConfig
    _check_task_options(args)
    PruneConfig(target_sparsity=target, steps=steps, **options).validate()
    if args.shard:
        from fastedge.sharding import check_command_line
        check_command_line(args)
    init_from = None
    if args.init_from is not None:   # read (and checked) before the model loads
        from fastedge.prune import load_init_scores
        init_from = load_init_scores(args.init_from)
    model, task, name = load_model_and_task(args)
    out = Path(args.out)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            _remove_run_files(out)
    result = prune(model, task, target_sparsity=target, steps=steps, out_dir=str(out),
                   resume=args.resume, model_name=name, task_name=getattr(task, "name", ""),
                   init_from=init_from, shard=args.shard, **options)
    if not main_rank:
        return 0
    circuit = result.circuit
    circuit.save(out / "circuit.json")
    metrics = dict(result.metrics, wall_seconds=round(result.wall_seconds, 2), model=name,
                   task=getattr(task, "name", ""))
    from fastedge.jsonsafe import dumps
    (out / "metrics.json").write_text(dumps(metrics, indent=2) + "\n")   # strict JSON: NaN -> null + note
    drawn = _draw(circuit, out / "circuit.svg")
    faith = metrics["faithfulness"]
    faith_text = (f"faithfulness {faith:.3f}" if faith == faith
                  else "faithfulness n/a (clean and corrupted answers agree on this task)")
    objective = "kl" if "kl" in metrics else "mse"   # mse: numerical Tracr programs
    from fastedge.run_summary import number, sparsity_note, training_line
    training = training_line(result.history, objective)
    if training:
        print(training)
    print(f"circuit: {circuit.n_edges} edges kept of {circuit.graph.n_edges} "
          f"(edge sparsity {circuit.edge_sparsity:.4f}); on the validation split with these edges fixed: "
          f"{objective.upper()} {number(metrics[objective])} to the full model "
          f"(empty circuit {number(metrics['empty_' + objective])}), {faith_text}, accuracy {metrics['accuracy']:.3f} "
          f"(full model {metrics['full_accuracy']:.3f})")
    note = sparsity_note(circuit)
    if note:
        print(f"note: {note}")
    print(f"wrote {out / 'circuit.json'}, {out / 'metrics.json'}, {drawn}, {out / 'log.jsonl'}, "
          f"{out / 'masks.pt'}, {out / 'checkpoints'}/ in {result.wall_seconds:.1f} s")
    _write_report(out)
    return 0


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# what a prune run writes to --out (what --overwrite removes; nothing else in the folder)
RUN_FILES = ("log.jsonl", "checkpoints/latest.pt", "masks.pt", "circuit.json", "metrics.json",
             "circuit.svg", "report.html")


def _checkpoint_seconds(minutes: float) -> Optional[float]:
    """--checkpoint-minutes as PruneConfig.checkpoint_seconds (0: None, steps only)."""
    if not math.isfinite(minutes) or minutes < 0:
        raise ValueError(f"--checkpoint-minutes must be 0 or more (0: steps only), got {minutes:g}")
    return minutes * 60.0 if minutes > 0 else None


def _check_output_folder(args) -> None:
    """Refuse to start a fresh run over another run's log and checkpoint
    (it would silently replace them) unless --overwrite or --resume says so."""
    if args.resume or args.overwrite:
        return
    out = Path(args.out)
    found = [name for name in ("log.jsonl", "checkpoints/latest.pt") if (out / name).exists()]
    if not found:
        return
    from fastedge.prune import checkpoint_step
    step = checkpoint_step(out / "checkpoints" / "latest.pt")
    held = " and ".join(found) + (f", checkpoint after step {step}" if step is not None else "")
    raise CliError(f"--out {out} already holds a run ({held}); continue it with --resume, replace it "
                   f"with --overwrite, or give another --out")


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _write_report(out: Path) -> None:
    """report.html beside a finished run's files. The run's results are
    already written, so a failure here is a warning, not a failed run."""
    from fastedge.report import build_report
    try:
        print(f"wrote {build_report(out)}")
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded
        warnings.warn(f"could not write {out / 'report.html'} ({type(exc).__name__}: {one_line(str(exc))}); "
                      f"the run's other files are complete; retry with: fastedge report {out}")


def _draw(circuit, path: Path) -> str:
    """The run's picture, drawn by fastedge itself (no graphviz needed)."""
    from fastedge.draw import draw_circuit
    return str(draw_circuit(circuit, path, engine="builtin"))


def cmd_eval(args) -> int:
    from fastedge import patch
    from fastedge.circuit import Circuit
    from fastedge.evaluate import evaluate
    _check_task_options(args)
    _check_batch_size(args)
    if args.scores:
        from fastedge.cli_attribute import eval_scores_sweep
        return eval_scores_sweep(args)
    if args.rank is not None:
        raise ValueError("--rank orders the edges of --scores; it is read only with --scores")
    if args.sweep is not None:
        if not args.masks:
            raise CliError("--sweep needs --masks (the masks.pt that prune wrote)")
        if args.circuit:
            raise ValueError("--circuit and --sweep exclude each other: a sweep extracts its circuits "
                             "from --masks")
        from fastedge.evaluate import check_sweep
        sparsities = check_sweep(_parse_sweep(args.sweep))   # refused before the model loads
    elif args.masks:
        raise ValueError(f"--masks {args.masks} is only read with --sweep (a circuit file goes to --circuit)")
    circuit = Circuit.load(args.circuit) if args.circuit else None
    model, task, name = load_model_and_task(args)
    em = patch(model)
    data = task.split("validation") if len(task.split("validation")) else task
    if args.sweep is not None:
        from fastedge.evaluate import sweep
        from fastedge.prune import load_checkpoint_file
        state = load_checkpoint_file(args.masks, "masks file")  # masks.pt or a checkpoint
        if state.get("graph") != em.graph.to_dict():
            raise CliError(f"{args.masks} was learned on another model than {name}; "
                           f"give the --model it was pruned on")
        em.load_state_dict(state["edge_model"])
        result = sweep(em, data, sparsities, batch_size=args.batch_size)
        _check_full_model_finite(result["points"][0] if result.get("points") else {}, model)
        _emit(result, args.out)
        return 0
    if circuit is not None:
        _check_same_model(circuit, em, args.circuit, name)
    else:
        em.set_circuit(em.graph.edges())
    metrics = evaluate(em, data, circuit, batch_size=args.batch_size)
    _check_full_model_finite(metrics, model)
    _emit(metrics, args.out)
    return 0


def _check_same_model(circuit, em, path: str, model_name: str) -> None:
    if circuit.graph != em.graph:
        g = circuit.graph
        raise CliError(f"{path} was found on another model ({g.n_layers} layers, {g.n_heads} heads, "
                       f"{g.n_writers} writers; {model_name} has {em.graph.n_layers} layers, "
                       f"{em.graph.n_heads} heads, {em.graph.n_writers} writers); give the --model "
                       f"it was found on")


def _check_full_model_finite(metrics: dict, model) -> None:
    """A model whose own logits are NaN or infinite gives NaN metrics that
    mean nothing: fail (status 1) and say why."""
    if all(v is None or math.isfinite(v) for v in (metrics.get("full_logit_diff"), metrics.get("kl"),
                                                   metrics.get("mse"))):
        return
    from fastedge.prune import non_finite_model_message
    raise CliError(non_finite_model_message(model) + "; its metrics would all be NaN", status=EXIT_FAILED)


def _emit(result: dict, out: Optional[str]) -> None:
    """Print a JSON result, and write it to `out` when given."""
    from fastedge.jsonsafe import dumps
    text = dumps(result, indent=2, default=list)   # strict JSON: NaN -> null + note
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def cmd_draw(args) -> int:
    from fastedge.circuit import Circuit
    from fastedge.draw import GraphvizNotFoundError, draw_circuit
    circuit = Circuit.load(args.circuit)
    out = Path(args.out) if args.out else Path(args.circuit).with_name("circuit.svg")
    try:
        draw_circuit(circuit, out, engine=args.engine)
    except GraphvizNotFoundError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from fastedge.report import build_report
    print(f"wrote {build_report(args.run_dir, sweep=args.sweep)}")
    return 0


def cmd_compare(args) -> int:
    from fastedge.circuit import Circuit, compare_circuits
    a, b = Circuit.load(args.first), Circuit.load(args.second)
    report = compare_circuits(a, b)
    report = {k: (v if not isinstance(v, (list, set, tuple)) or len(v) <= 50 else f"{len(v)} items")
              for k, v in report.items()}
    if args.task or args.data or args.model:
        _check_task_options(args)
        _check_batch_size(args)
        from fastedge import patch
        from fastedge.evaluate import evaluate
        model, task, name = load_model_and_task(args)
        em = patch(model)
        for path, circuit in ((args.first, a), (args.second, b)):
            _check_same_model(circuit, em, path, name)
        data = task.split("validation") if len(task.split("validation")) else task
        for label, circuit in (("intersection", a.intersection(b)), ("union", a.union(b))):
            report[label] = {"n_edges": circuit.n_edges,
                             **{k: v for k, v in evaluate(em, data, circuit, batch_size=args.batch_size).items()
                                if k in ("kl", "logit_diff", "accuracy", "faithfulness", "edge_sparsity")}}
    _emit(report, args.out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit status (module docstring of
    `fastedge.cli_errors`). argparse's own usage errors exit 2 as usual."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    commands = {"prune": cmd_prune, "eval": cmd_eval, "draw": cmd_draw, "compare": cmd_compare,
                "report": cmd_report, "attribute": cli_attribute.cmd_attribute,
                "export-mib": cli_attribute.cmd_export_mib}
    if args.debug:
        _check_options(args)
        return commands[args.command](args)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        try:
            _check_options(args)
            return commands[args.command](args)
        except KeyboardInterrupt:
            print(f"fastedge: {_interrupted(args, argv)}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - sorted by describe(); unknown ones re-raised
            known = describe(exc)
            if known is None:
                raise
            message, status = known
            print(f"fastedge: {message}", file=sys.stderr)
            return status


def _check_options(args) -> None:
    """Checks every command shares, before anything loads (the numbers are
    checked by each command: `_check_task_options`, `PruneConfig.validate`)."""
    if hasattr(args, "device"):
        resolve_device(args.device)
    if hasattr(args, "seed"):
        check_seed(args.seed)


# The command line's seeds: one 32-bit word, the range every tool that takes a
# seed accepts (the library's own limit, `fastedge.prune.SEED_LIMIT`, is wider)
CLI_SEED_LIMIT = 2 ** 32


def check_seed(seed: int) -> int:
    """--seed, as the user gave it, in [0, 2**32)."""
    if not 0 <= seed < CLI_SEED_LIMIT:
        raise ValueError(f"--seed {seed}: a seed must be a whole number in [0, 2**32); give a "
                         f"non-negative one, such as --seed 0")
    return seed


_FASTEDGE_DIR = str(Path(__file__).resolve().parent)


def _one_line_warnings(others):
    """A `warnings.showwarning` that prints fastedge's own warnings as one
    line and passes other libraries' to `others` (Python's usual form)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not str(Path(filename).resolve()).startswith(_FASTEDGE_DIR):
            others(message, category, filename, lineno, file, line)
            return
        print(f"fastedge: warning: {one_line(str(message))}", file=sys.stderr if file is None else file)
    return show


def _interrupted(args, argv: list[str]) -> str:
    """What Ctrl-C leaves: for prune, the last checkpoint and the command that resumes from it."""
    if args.command != "prune":
        return "interrupted"
    from fastedge.prune import checkpoint_step
    latest = Path(args.out) / "checkpoints" / "latest.pt"
    step = checkpoint_step(latest)
    if step is None:
        again = shlex.join(["fastedge", *[a for a in argv if a not in ("--resume", "--overwrite")],
                            "--overwrite"])
        every = f"one every {args.checkpoint_every} steps"
        if args.checkpoint_minutes > 0:
            every += f" or {args.checkpoint_minutes:g} minutes"
        return (f"interrupted before the first checkpoint was written ({every}); "
                f"nothing to resume, start again with: {again}")
    kept = [a for a in argv if a != "--overwrite"]   # --resume and --overwrite exclude each other
    resume = shlex.join(["fastedge", *kept, *([] if "--resume" in kept else ["--resume"])])
    return f"interrupted; the last checkpoint is {latest} (step {step}); resume with: {resume}"


if __name__ == "__main__":
    sys.exit(main())
