"""The command line around attribution scores: `fastedge attribute`,
`fastedge export-mib`, and `fastedge eval --scores ... --sweep ...`.

    fastedge attribute --model gpt2 --task ioi --method eap-ig-inputs --out scores.pt   # + scores.json
    fastedge eval --model gpt2 --task ioi --scores scores.pt --sweep mib                 # CPR and CMD
    fastedge export-mib --scores scores.pt --model-tag gpt2 --task-tag ioi --method eap-ig --out mib/
    fastedge export-mib --masks runs/ioi/masks.pt --model-tag gpt2 --task-tag ioi --method ep --out mib/

Options that name a choice (method, metric, sign, form, rank) are checked by
fastedge, not argparse, so that a wrong one is refused with the one line
every other refusal gets (`fastedge.cli_errors`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from fastedge.cli_errors import CliError

RANKS = ("abs", "signed")


# -- parsers ------------------------------------------------------------------------------------------

def add_attribute_parser(sub, add_model_and_task) -> None:
    p = sub.add_parser("attribute", help="score every edge in one pass (EAP, EAP-IG) and write the scores",
                       description="Attribution scores for every edge: writes fastedge's scores file (--out) "
                                   "and EAP-IG's graph JSON with scores beside it (the MIB format).")
    add_model_and_task(p)
    p.add_argument("--method", default="eap-ig-inputs", metavar="eap|eap-ig-inputs|eap-ig-activations",
                   help="eap: one forward and backward per batch; eap-ig-inputs: gradients averaged over "
                        "embeddings interpolated from corrupted to clean; eap-ig-activations: over each "
                        "component's interpolated outputs (default eap-ig-inputs)")
    p.add_argument("--ig-steps", type=int, default=5, help="interpolation steps of the EAP-IG methods (default 5)")
    p.add_argument("--metric", default=None, metavar="logit_diff|logprob|projection|kl",
                   help="what the scores are the derivative of: the logit difference of the clean and corrupted "
                        "answers (default), the clean answer's log-probability (the default where the two "
                        "answers are the same, as in induction), the output projected onto the full model's "
                        "(the default for tracr: models), or KL to the full model (0 for plain EAP: use it "
                        "with EAP-IG)")
    p.add_argument("--sign", default="gate", metavar="gate|eap-ig",
                   help="gate: the derivative in the edge's mask (default); eap-ig: the EAP-IG library's "
                        "(corrupted - clean) convention, minus the gate derivative")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    p.add_argument("--split", default="train", metavar="train|validation",
                   help="the task's examples to attribute over (default train)")
    p.add_argument("--ablation", default=None, metavar="interchange|zero|mean",
                   help="what a removed edge passes on, for the clean-minus-ablated differences "
                        "(default interchange; zero for tracr: models)")
    p.add_argument("--out", default="scores.pt", metavar="PT",
                   help="fastedge's scores file (default ./scores.pt); EAP-IG's JSON goes beside it")
    p.add_argument("--eap-json", default=None, metavar="JSON",
                   help="where EAP-IG's graph JSON with scores goes (default: --out with suffix .json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out and --eap-json files")


def add_export_mib_parser(sub) -> None:
    p = sub.add_parser("export-mib", help="write scores or a pruning run's masks as a MIB leaderboard submission",
                       description="Write a method's result in the MIB circuit track's submission layout: "
                                   "OUT/METHOD/{task}_{model}/importances.json (--form scores) or one binary "
                                   "circuit per edge fraction (--form circuits), counted in EAP-IG's graph.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", default=None, metavar="PT", help="a scores file of fastedge attribute")
    src.add_argument("--masks", default=None, metavar="PT",
                     help="masks.pt of fastedge prune: the masks' log_alphas are the scores (ranked signed)")
    p.add_argument("--model-tag", required=True, metavar="NAME",
                   help="MIB's name of the model: gpt2, qwen2.5, gemma2, llama3, interpbench")
    p.add_argument("--task-tag", required=True, metavar="NAME",
                   help="MIB's name of the task: ioi, mcqa, arithmetic-addition, arc-easy, ... ('_' becomes '-')")
    p.add_argument("--method", required=True, metavar="NAME", help="the method's name: the folder under --out")
    p.add_argument("--out", required=True, metavar="DIR", help="the submission's root folder")
    p.add_argument("--form", default="scores", metavar="scores|circuits|both",
                   help="scores: importances.json; circuits: binary circuits at MIB's edge fractions; both: "
                        "each in its own folder (default scores)")
    p.add_argument("--fractions", default=None, metavar="F1,F2,...",
                   help="edge fractions of the binary circuits (default MIB's: 0.001,0.002,0.005,0.01,0.02,0.05,"
                        "0.1,0.2,0.5; add 0 for an empty circuit)")
    p.add_argument("--rank", default=None, metavar="abs|signed",
                   help="rank edges by |score| or by the signed score for the binary circuits (default: abs for "
                        "attribution scores, signed for masks)")
    p.add_argument("--d-model", type=int, default=None, metavar="N",
                   help="the model's hidden size, which EAP-IG's format records (default: from the scores, or "
                        "for masks from the circuit.json beside them)")


def add_eval_scores_options(p) -> None:
    p.add_argument("--scores", default=None, metavar="PT",
                   help="a scores file of fastedge attribute, read only with --sweep: the circuits of the "
                        "top-scoring edges at each sparsity")
    p.add_argument("--rank", default=None, metavar="abs|signed",
                   help="with --scores: rank edges by |score| or signed (default abs; signed for "
                        "edge-pruning scores)")


# -- checks --------------------------------------------------------------------------------------------

def _one_of(value, options, option: str):
    if value is not None and value not in options:
        raise ValueError(f"{option} {value!r} is not one of {', '.join(options)}")
    return value


def _rank(value, default_absolute: bool) -> bool:
    _one_of(value, RANKS, "--rank")
    return default_absolute if value is None else value == "abs"


def _parse_fractions(text):
    from fastedge.cli import parse_numbers
    return None if text is None else parse_numbers(text, "--fractions", "edge fractions")


def _load_scores(path, option: str = "--scores"):
    """A scores file of `fastedge attribute`; anything else is refused with
    one line that says what the file is and where it goes instead."""
    from fastedge.attribution import SCORES_FORMAT, EdgeScores
    from fastedge.prune import load_checkpoint_file
    if not Path(path).exists():
        raise CliError(f"{option} {path}: no such file (write one with fastedge attribute)")
    state = load_checkpoint_file(path, "scores file")   # a damaged or foreign file: one line naming it
    found = state.get("format") if isinstance(state, dict) else None
    if found != SCORES_FORMAT:
        if isinstance(found, str) and found.startswith(("fastedge.masks", "fastedge.checkpoint")):
            raise CliError(f"{path} holds a pruning run's masks, not attribution scores: give it to --masks")
        held = f"format {found!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CliError(f"{path}: not a fastedge scores file (it holds {held}); write one with fastedge attribute")
    try:
        return EdgeScores.from_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"{path}: a malformed scores file ({exc}); write it again with fastedge attribute") from None


# -- attribute ----------------------------------------------------------------------------------------

def cmd_attribute(args) -> int:
    from fastedge.attribution import METHODS, METRICS, SIGNS
    from fastedge.cli import TRACR_PREFIX, _check_task_options, load_model_and_task
    from fastedge.tasks.base import SPLITS
    _one_of(args.method, METHODS, "--method")
    _one_of(args.metric, METRICS, "--metric")
    _one_of(args.sign, SIGNS, "--sign")
    _one_of(args.split, SPLITS, "--split")
    _one_of(args.ablation, ("interchange", "zero", "mean"), "--ablation")
    if args.ig_steps < 1:
        raise ValueError(f"--ig-steps must be at least 1, got {args.ig_steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_task_options(args)
    out = Path(args.out)
    eap_json = Path(args.eap_json) if args.eap_json else out.with_suffix(".json")
    if eap_json.resolve() == out.resolve():
        raise CliError(f"--eap-json {eap_json} is --out itself; give the JSON another name")
    if not args.overwrite:
        for path in (out, eap_json):
            if path.exists():
                raise CliError(f"{path} already exists; add --overwrite to replace it, or give another --out")
    for path in (out, eap_json):   # the output folders are made, as prune makes --out
        if path.parent.exists() and not path.parent.is_dir():
            raise CliError(f"{path}: {path.parent} is not a folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"{path}: cannot make the folder {path.parent} ({exc.strerror or exc})") from None
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    ablation = args.ablation or ("zero" if (args.model or "").startswith(TRACR_PREFIX) else "interchange")
    model, task, name = load_model_and_task(args)
    from fastedge.attribution import attribute
    why = ""
    if args.metric is None and getattr(task, "meta", {}).get("faithfulness") == "objective":
        why = " (the task's answers are the full model's own outputs)"   # the library picks projection
    elif args.metric is None and _answers_agree(task, args.split):   # the library then picks logprob
        why = " (the task's clean and corrupted answers are the same: no logit difference)"
    start = time.perf_counter()
    scores = attribute(model, task, method=args.method, ig_steps=args.ig_steps, metric=args.metric,
                       batch_size=args.batch_size, sign=args.sign, ablation=ablation, split=args.split,
                       n_examples=args.n_examples, model_name=name, task_name=getattr(task, "name", ""))
    seconds = time.perf_counter() - start
    scores.info["wall_seconds"] = round(seconds, 3)
    scores.save(out)
    written = [str(out)]
    note = ""
    if scores.d_model is not None:
        scores.to_eap_graph_json(eap_json)
        written.append(str(eap_json))
    else:
        note = " (no EAP-IG JSON: the model's config gives no hidden size)"
    print(summary_line(scores, seconds, why=why) + f"; wrote {' and '.join(written)}{note}")
    return 0


def _answers_agree(task, split: str) -> bool:
    """Whether every example of the split has the same clean and corrupted
    answer (the shipped induction task): its logit difference is 0 whatever
    the circuit, and `fastedge.attribute` defaults to "logprob"."""
    data = task.split(split)
    examples = list(data.examples)
    return bool(examples) and all(list(e.clean_answer) == list(e.corrupted_answer) for e in examples)


def summary_line(scores, seconds: float, n_top: int = 3, why: str = "") -> str:
    """One line: the method, examples, time and the top edges by |score|."""
    steps = f" ({scores.ig_steps} steps)" if scores.ig_steps else ""
    named = scores.by_name()
    top = ", ".join(f"{w}->{r} {named[(w, r)]:+.3g}" for w, r in scores.top(n_top))
    return (f"attribute: {scores.method}{steps} on {scores.n_examples} examples of {scores.task or 'the task'}, "
            f"metric {scores.metric}{why}, sign {scores.sign}, {seconds:.1f} s; top edges: {top}")


# -- export-mib ----------------------------------------------------------------------------------------

def cmd_export_mib(args) -> int:
    from fastedge.mib import FORMS, MIB_CIRCUIT_FRACTIONS, export_submission, load_masks_as_scores
    _one_of(args.form, FORMS, "--form")
    _one_of(args.rank, RANKS, "--rank")
    fractions = _parse_fractions(args.fractions)
    if fractions is not None and args.form == "scores":
        raise ValueError("--fractions sizes the binary circuits: give --form circuits or both")
    if args.d_model is not None and args.d_model < 1:
        raise ValueError(f"--d-model must be at least 1, got {args.d_model}")
    if args.scores:
        scores = _load_scores(args.scores)
    else:
        if not Path(args.masks).exists():
            raise CliError(f"--masks {args.masks}: no such file (fastedge prune writes RUN_DIR/masks.pt)")
        scores = load_masks_as_scores(args.masks, d_model=args.d_model)
    if scores.d_model is None and args.d_model is None:
        raise CliError(f"{args.scores or args.masks} does not record the model's hidden size, which EAP-IG's "
                       f"format needs (masks record it only through the run's circuit.json beside them): "
                       f"give --d-model")
    result = export_submission(scores, args.out, model_tag=args.model_tag, task_tag=args.task_tag,
                               method_tag=args.method, form=args.form,
                               fractions=MIB_CIRCUIT_FRACTIONS if fractions is None else fractions,
                               absolute=None if args.rank is None else args.rank == "abs", d_model=args.d_model)
    parts = []
    if result["importances"]:
        parts.append(f"{result['importances']} ({scores.graph.n_edges} fastedge edges as "
                     f"{result['n_edges_mib']} of EAP-IG's graph)")
    if result["circuits"]:
        sizes = ", ".join(f"{round(c['fraction'] * 100, 9):g}%: {c['n_edges_mib']}" for c in result["circuits"])
        folder = Path(result["circuits"][0]["path"]).parent
        parts.append(f"{len(result['circuits'])} binary circuits to {folder} (edges of EAP-IG's "
                     f"{result['n_edges_mib']}, ranked by {'|score|' if result['absolute'] else 'signed score'}: "
                     f"{sizes})")
    print("export-mib: wrote " + "; ".join(parts))
    return 0


# -- eval --scores --sweep ------------------------------------------------------------------------------

def eval_scores_sweep(args) -> int:
    """`fastedge eval --scores PT --sweep ...`: the curve of the top-n
    circuits from the scores, with MIB's CPR and CMD."""
    from fastedge.cli import (_check_full_model_finite, _emit, _parse_sweep, load_model_and_task)
    from fastedge.evaluate import check_sweep, sweep_scores
    if args.sweep is None:
        raise CliError("--scores is read only with --sweep (the circuits of the top-scoring edges at each "
                       "sparsity): add --sweep mib")
    if args.masks or args.circuit:
        raise CliError("--scores excludes --masks and --circuit: a sweep takes its circuits from one source")
    sparsities = check_sweep(_parse_sweep(args.sweep))    # refused before anything loads
    _rank(args.rank, True)
    scores = _load_scores(args.scores)
    absolute = _rank(args.rank, scores.method != "edge-pruning")
    model, task, name = load_model_and_task(args)
    from fastedge import patch
    em = patch(model, ablation=scores.ablation)
    if em.graph != scores.graph:
        g = scores.graph
        raise CliError(f"{args.scores} holds scores of another model ({g.n_layers} layers, {g.n_heads} heads, "
                       f"{g.n_edges} edges; {name} has {em.graph.n_layers} layers, {em.graph.n_heads} heads, "
                       f"{em.graph.n_edges} edges); give the --model they were computed on")
    if em.ablation == "mean":
        from fastedge.tasks.base import collate
        train = task.split("train") if len(task.split("train")) else task
        reference = collate(list(train.examples)[:64])
        device = em.edge_log_alpha[0].device
        em.compute_mean_outputs(reference.input_ids.to(device), reference.attention_mask.to(device))
    data = task.split("validation") if len(task.split("validation")) else task
    result = sweep_scores(em, data, scores, sparsities, batch_size=args.batch_size, absolute=absolute)
    _check_full_model_finite(result["points"][0] if result.get("points") else {}, model)
    _emit(result, args.out)
    return 0


__all__ = ["add_attribute_parser", "add_export_mib_parser", "add_eval_scores_options", "cmd_attribute",
           "cmd_export_mib", "eval_scores_sweep", "summary_line"]
