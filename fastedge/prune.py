"""Edge Pruning: learn masks that keep a model's behaviour on a task with few
edges (docs/CONCEPTS.md sections 3 and 4).

The objective of one step, minimised over the log_alphas and maximised over
the Lagrange multipliers:

    KL(p_full || p_circuit) at the target positions
      + lambda1 * (s - t) + lambda2 * (s - t)^2            (edges)
      [+ the same with its own multipliers for nodes, when a node target is set]

with ``s = 1 - sum(sampled edge masks) / n_edges`` and the target ``t`` raised
linearly from 0 over the sparsity warm-up. ``p_full`` is computed per
micro-batch with one no-grad forward of the unpatched model
(`_FullModelReference` says why it is not cached). AdamW with the paper's
defaults (learning rate 0.8 for log_alphas and multipliers, 200
learning-rate warm-up steps, no weight decay); the multipliers ascend (their
gradients are negated).

Runs save a checkpoint every ``checkpoint_every`` steps and whenever
``checkpoint_seconds`` (default 300) passed since the last one (atomically, to
``out_dir/checkpoints/latest.pt``) and resume from it, saying on stderr which
step they continue from: a run killed and
resumed ends with the same masks as an uninterrupted run with the same seed.
A non-finite loss stops the run with `NonFiniteLossError`, which names the
step and what was non-finite; the last good checkpoint is kept.

Micro-batch ``j`` of step ``k`` samples its hard-concrete masks with the seed
``seed * 1_000_003 + k * n_micro + j`` (`_noise_seed`): the seed of the
model's ``k * n_micro + j``-th training forward in one process. Under
`torch.distributed` with several ranks (`fastedge.distributed`), each rank
runs its block of every step's micro-batches with those seeds, and the
gradients are summed over ranks: the run computes what one process computes
with the same micro-batch size.
"""
from __future__ import annotations

import errno
import inspect
import json
import math
import numbers
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastedge import distributed, jsonsafe, objectives, sharding
from fastedge.model import EdgeModel, patch
from fastedge.progress import make_progress

CHECKPOINT_FORMAT = "fastedge.checkpoint/1"


class NonFiniteLossError(RuntimeError):
    """The loss (or a gradient) became NaN or infinite; the run stopped."""


class CheckpointError(ValueError):
    """A checkpoint (or masks file) that cannot be read or does not belong
    to this run; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the
    message names the path and the free space, and the previous checkpoint
    is kept."""

    def __init__(self, message: str, err: Optional[int] = None):
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class PruneConfig:
    target_sparsity: float = 0.95
    steps: int = 3000
    batch_size: int = 32
    micro_batch_size: Optional[int] = None     # gradient accumulation when < batch_size
    lr: float = 0.8                            # log_alphas
    lambda_lr: float = 0.8                     # Lagrange multipliers
    lr_warmup_steps: int = 200
    sparsity_warmup_steps: Optional[int] = None  # default: 5/6 of the steps (2,500 of 3,000)
    node_masks: bool = True
    node_target_sparsity: Optional[float] = None  # None: no node sparsity term
    # sparsity of the extracted circuit; default: the target when below 1, else the
    # circuit of the deterministic masks above 0.5 (extract_circuit_by_threshold)
    circuit_sparsity: Optional[float] = None
    ablation: str = "interchange"
    seed: int = 0
    bf16: bool = False                         # run the frozen model in bf16 (masks stay fp32)
    recompute_readers: bool = False
    precision: str = "full"                    # masked sums' products on the GPU: "full" or "fast" (patch)
    # log_alpha ~ N(init_log_alpha, 0.01). 10 (the authors'): every sampled mask starts
    # at exactly 1, where the hard-concrete clamp passes almost no gradient, so
    # masks move only through rare unclamped samples (fine over thousands of
    # steps). A smaller mean (3: deterministic masks 0.97) gives dense gradients
    # for short runs such as the shipped model's 1,000-step default.
    init_log_alpha: float = 10.0
    # The s of the sparsity term: "sampled" (docs/CONCEPTS.md: 1 - sum of sampled edge
    # masks / edges) or "expected" (1 - sum of P(z != 0) / edges, through
    # hard_concrete_l0), which has a gradient even where sampled masks are
    # clamped at 1 and so suits short runs.
    sparsity_estimate: str = "sampled"
    # Warm start (`prune(init_from=scores)`, `warm_start_log_alphas`): edges ranked by their
    # scores start at log_alpha from init_log_alpha (the best) down to init_floor (the
    # worst), linearly in rank. init_from records which scores ("sha256:..."), for resume.
    init_from: Optional[str] = None
    init_floor: float = 0.0
    # Preselection (HAP): only the top fraction of edges by the init_from scores is trained;
    # every other edge mask is fixed at 0 (log_alpha -inf). The sparsity target then ramps
    # from 1 - preselect (where the run starts) instead of from 0.
    preselect: Optional[float] = None
    checkpoint_every: int = 100
    # also a checkpoint whenever this many seconds passed since the last one
    # (None: steps only), so that a slow run stopped early keeps its work
    checkpoint_seconds: Optional[float] = 300.0
    eval_batch_size: int = 32
    progress: bool = True

    def validate(self) -> None:
        """Check every option before anything runs; a ValueError names the
        option and the value given. Counts are integers (steps, batch sizes,
        checkpoint_every, eval_batch_size at least 1; warm-ups at least 0 and
        1); learning rates finite and positive; targets finite, in [0, 2]
        (above 1 pushes harder, docs/CONCEPTS.md section 3; beyond 2 the penalty only
        grows); circuit_sparsity in [0, 1]; seed an integer in [0, 2**40)
        (it is scaled by 1,000,003 into every step's noise seed, which must
        stay below 2**63)."""
        for name in ("steps", "batch_size", "checkpoint_every", "eval_batch_size"):
            _check_int(name, getattr(self, name), low=1)
        if self.micro_batch_size is not None:
            _check_int("micro_batch_size", self.micro_batch_size, low=1)
            if self.micro_batch_size > self.batch_size:
                raise ValueError(f"micro_batch_size must lie in [1, batch_size={self.batch_size}], "
                                 f"got {self.micro_batch_size}")
        _check_int("lr_warmup_steps", self.lr_warmup_steps, low=0)
        if self.sparsity_warmup_steps is not None:
            _check_int("sparsity_warmup_steps", self.sparsity_warmup_steps, low=1)
        _check_int("seed", self.seed, low=0)
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"seed must be below 2**40 = {SEED_LIMIT}, got {self.seed}")
        if self.checkpoint_seconds is not None:
            _check_number("checkpoint_seconds", self.checkpoint_seconds, low=0.0)
            if not self.checkpoint_seconds > 0:
                raise ValueError(f"checkpoint_seconds must be positive (or None: steps only), "
                                 f"got {self.checkpoint_seconds!r}")
        for name in ("lr", "lambda_lr"):
            value = _check_number(name, getattr(self, name))
            if not value > 0:
                raise ValueError(f"{name} must be positive (the masks descend and the multipliers ascend "
                                 f"with it), got {value!r}")
        _check_number("target_sparsity", self.target_sparsity, low=0.0, high=TARGET_MAX)
        if self.node_target_sparsity is not None:
            _check_number("node_target_sparsity", self.node_target_sparsity, low=0.0, high=TARGET_MAX)
        if self.circuit_sparsity is not None:
            _check_number("circuit_sparsity", self.circuit_sparsity, low=0.0, high=1.0)
        _check_number("init_log_alpha", self.init_log_alpha)
        _check_number("init_floor", self.init_floor)
        if self.init_floor > self.init_log_alpha:
            raise ValueError(f"init_floor ({self.init_floor!r}) must not exceed init_log_alpha "
                             f"({self.init_log_alpha!r}): the worst-ranked edge starts at the floor")
        if self.preselect is not None:
            _check_number("preselect", self.preselect)
            if not 0.0 < self.preselect <= 1.0:
                raise ValueError(f"preselect must be a fraction of the edges in (0, 1], got {self.preselect!r}")
        if self.sparsity_estimate not in ("sampled", "expected"):
            raise ValueError(f"sparsity_estimate must be 'sampled' or 'expected', got {self.sparsity_estimate!r}")
        if self.ablation not in ("interchange", "zero", "mean"):
            raise ValueError(f"ablation must be one of interchange, zero, mean, got {self.ablation!r}")
        if self.precision not in ("full", "fast"):
            raise ValueError(f"precision must be 'full' or 'fast', got {self.precision!r}")

    @property
    def warmup(self) -> int:
        if self.sparsity_warmup_steps is not None:
            return self.sparsity_warmup_steps
        return max(1, (self.steps * 5) // 6)

    @property
    def target_start(self) -> float:
        """Where the sparsity target starts: 0, or with preselection the
        sparsity the run starts at (1 - preselect: the other edges are fixed at 0)."""
        return 0.0 if self.preselect is None else min(1.0 - self.preselect, self.target_sparsity)

    def target_at(self, step: int) -> float:
        """The sparsity target of `step` (0-based): linear from `target_start`
        (0 without preselection) to the target over the warm-up."""
        t0 = self.target_start
        return t0 + (self.target_sparsity - t0) * min(1.0, (step + 1) / self.warmup)


SEED_LIMIT = 2 ** 40     # seed * 1_000_003 + training forwards stays below 2**63
TARGET_MAX = 2.0         # sparsity targets above 1 push harder (the authors use 1.02 and 1.2)


def _check_int(name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def _check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = (f"lie in [{low:g}, {high:g}]" if low is not None and high is not None
                 else f"be at least {low:g}" if low is not None else f"be at most {high:g}")
        raise ValueError(f"{name} must {bound}, got {value!r}")
    return value


@dataclass
class PruneResult:
    circuit: object                 # fastedge.circuit.Circuit
    metrics: dict
    history: list = field(default_factory=list)
    edge_model: Optional[EdgeModel] = None
    wall_seconds: float = 0.0


class _Multipliers(nn.Module):
    """lambda1, lambda2 for edges (and for nodes): trained by gradient ascent."""

    def __init__(self, with_nodes: bool):
        super().__init__()
        self.edge = nn.Parameter(torch.zeros(2))
        self.node = nn.Parameter(torch.zeros(2)) if with_nodes else None

    @staticmethod
    def penalty(lambdas: torch.Tensor, s: torch.Tensor, t: float) -> torch.Tensor:
        gap = s - t
        return lambdas[0] * gap + lambdas[1] * gap * gap


class _FullModelReference:
    """The full model at a micro-batch's target positions: log p_full
    (objective ``kl``) or its outputs (``mse``; `fastedge.objectives`),
    computed with one no-grad forward of the unpatched model per micro-batch.
    Nothing is kept per example, so memory does not grow with the number of
    examples, and the KL is exact (the same float32 log-softmax as before).

    Where the model takes ``logits_to_keep`` (Hugging Face causal LMs), the
    head runs only at the positions that are a target in some row.

    Why not a cache (bench/data_scale.py on a 2-core AMD EPYC: a 2-layer,
    width-64 GPT-2 with GPT-2's 50,257-token vocabulary, batch 32, 8-token
    induction examples with 3 targets; bench/results/data-scale-*.md). The
    per-example cache of full-vocabulary log-probabilities held 201 KB per
    target position on the model's device (0.6 MB per example here; 20 GB
    for 100,000 one-target IOI examples on GPT-2), growing with every new
    example sampled: after 200 steps, 0.5 GB at 1K examples, 2.8 GB at 10K,
    3.7 GB at 100K, and 37 GB after 3,000 steps at 100K. Recomputed per
    batch, peak RSS is 1,488 / 1,491 / 1,503 MB at 1K / 10K / 100K and the
    CPU time per step 426 / 415 / 422 ms: flat. The price is the reference
    forward, 156 of the step's 632 ms of wall time (25%; 30 to 35% before
    the head ran at the targets only) for this tiny model, whose cost is its
    50K-vocabulary head; in a real model the transformer body dominates,
    and the plain forward is a fraction of the masked clean and corrupted
    forward and its backward that every step runs anyway. A top-k cache (k
    log-probabilities and indices plus the rest mass per target position,
    on the CPU) would save that forward for k * 8 + 4 bytes per target (52
    MB for k = 64 at 100K IOI examples, after a pass over all of them) but
    make the KL inexact: lumping the rest into one bucket gives the KL of
    the coarsened distributions, a lower bound whose error (the rest mass
    times the KL between the two rest distributions) is largest when the
    circuit drifts from the model, early in pruning. Exact and flat won;
    tests/test_data_scale.py checks the KL against float64.
    """

    def __init__(self, em: EdgeModel, device, objective: objectives.Objective = objectives.Objective()):
        self.em, self.device, self.objective = em, device, objective
        # Hugging Face causal LMs take logits_to_keep (positions whose logits the head computes):
        # the head then runs at the target positions only, not at every position
        try:
            self.keep = "logits_to_keep" in inspect.signature(em.model.forward).parameters
        except (TypeError, ValueError):
            self.keep = False

    @torch.no_grad()
    def get(self, batch) -> torch.Tensor:
        """The objective's reference at ``batch``'s target positions, in
        row-major order ([targets, V]): what `Objective.divergence` takes."""
        from fastedge.evaluate import full_logits
        from fastedge.model import position_ids_from_attention_mask
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        targets = batch.target_mask.to(self.device)
        columns = targets.any(0).nonzero().flatten()  # positions that are a target in some row, ascending
        if self.keep and len(columns) < targets.shape[1]:
            logits = self.em.model(ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask),
                                   logits_to_keep=columns).logits
            logits = logits[targets[:, columns]].float()  # row-major over (row, kept position): the same order
        else:
            logits = full_logits(self.em, ids, mask)[targets].float()
        if not torch.isfinite(logits).all():  # no mask can fix the model's own output
            raise NonFiniteLossError(non_finite_model_message(self.em.model))
        return self.objective.reference(logits)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def prune(model, task_or_dataset, *, target_sparsity: float = 0.95, steps: int = 3000,
          out_dir: Optional[str] = None, resume: bool = False, task_name: str = "",
          model_name: str = "", init_from=None, shard: Optional[str] = None, **options) -> PruneResult:
    """Prune `model` (a Hugging Face causal LM, or an `EdgeModel`) on a task
    (`fastedge.tasks.TaskData`). Returns the circuit at the target sparsity,
    its metrics on the validation split, and the training history.

    `options` are the fields of `PruneConfig` (batch_size, micro_batch_size,
    lr, lambda_lr, seed, bf16, checkpoint_every, ...). With `out_dir`,
    checkpoints go to ``out_dir/checkpoints`` and `resume=True` continues
    from the latest one.

    Warm start and preselection: `init_from` (`fastedge.attribution.EdgeScores`,
    or the path of a scores file or of a run's ``masks.pt``) initialises the
    edge log_alphas by rank (`warm_start_log_alphas`); with
    ``preselect=f`` only the top fraction `f` of the edges is trained and
    every other edge mask is fixed at 0 (HAP: Hybrid Attribution and
    Pruning), the sparsity target ramping from ``1 - f``.

    When `torch.distributed` is initialised with more than one rank (torchrun;
    see `fastedge.distributed`), the steps run data parallel: each rank runs
    its share of every global batch's micro-batches (`micro_batch_size`
    defaults to ``batch_size // world_size``), gradients and logged totals are
    summed over ranks, and only rank 0 writes files. Every rank returns the
    same result. ``shard="fsdp"`` also shards the frozen model's parameters
    over the ranks with FSDP2, one block per unit (`fastedge.sharding`).
    """
    cfg = PruneConfig(target_sparsity=target_sparsity, steps=steps, **options)
    init_scores = None
    if init_from is not None:
        init_scores = load_init_scores(init_from)
        cfg.init_from = scores_fingerprint(init_scores)
    elif cfg.preselect is not None:
        raise ValueError("preselect needs init_from (the scores that rank the edges)")
    cfg.validate()
    sharding.check_shard(shard)
    group = distributed.current()
    micro, n_micro = _micro_batches(cfg, group)
    started = time.time()
    from fastedge.tasks.base import collate

    data = task_or_dataset
    train = data.split("train")
    if len(train) == 0:
        raise ValueError(f"task {getattr(data, 'name', '?')!r} has no training examples")
    validation = data.split("validation")
    if len(validation) == 0:
        validation = train

    if isinstance(model, EdgeModel):
        em = model
    else:
        if cfg.bf16:
            model = model.to(torch.bfloat16)
        em = patch(model, ablation=cfg.ablation, node_masks=cfg.node_masks, seed=cfg.seed,
                   recompute_readers=cfg.recompute_readers, precision=cfg.precision)
    if hasattr(data, "check_fits"):
        from fastedge.adapters import input_limits
        vocab, positions = input_limits(em.model)
        data.check_fits(vocab_size=vocab, max_positions=positions, model_name=model_name or "the model")
    if shard == "fsdp" and not em._weights.sharded:
        sharding.shard_edge_model(em)
    device = _model_device(em.model)
    torch.manual_seed(cfg.seed)
    em.reset_masks(generator=torch.Generator(device="cpu").manual_seed(cfg.seed), mean=cfg.init_log_alpha)
    fixed_off = None
    if init_scores is not None:
        if init_scores.graph != em.graph:
            raise ValueError(f"init_from: the scores are for another graph ({init_scores.graph.n_edges} edges, "
                             f"{init_scores.graph.n_layers} layers) than this model's ({em.graph.n_edges} edges, "
                             f"{em.graph.n_layers} layers)")
        start, fixed_off = warm_start_log_alphas(init_scores, top=cfg.init_log_alpha, floor=cfg.init_floor,
                                                 preselect=cfg.preselect)
        with torch.no_grad():   # the rank-mapped values, plus the usual N(0, 0.01) init noise
            for p, value in zip(em.edge_log_alpha, start):
                p.add_(value.to(p) - cfg.init_log_alpha)
    em.to(device)
    em.seed = cfg.seed
    em.step.zero_()
    if em.ablation == "mean" and em._mean_outputs is None:
        reference = collate(train.examples[: min(len(train), 64)])
        em.compute_mean_outputs(reference.input_ids.to(device), reference.attention_mask.to(device))

    multipliers = _Multipliers(with_nodes=cfg.node_target_sparsity is not None and em.node_log_alpha is not None)
    multipliers.to(device=device, dtype=em.mask_dtype)
    optimizer = torch.optim.AdamW(
        [{"params": em.mask_parameters(), "lr": cfg.lr},
         {"params": list(multipliers.parameters()), "lr": cfg.lambda_lr}], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps)))
    sampler = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start = 0

    checkpoints = Path(out_dir) / "checkpoints" if out_dir else None
    latest = checkpoints / "latest.pt" if checkpoints else None
    task = task_fingerprint(data, task_name or getattr(data, "name", ""))
    if resume:
        if latest is None:
            raise ValueError("resume needs out_dir (where the checkpoints are)")
        if latest.exists():  # every rank loads it: the state is replicated
            state = load_checkpoint_file(latest, "checkpoint", map_location=device,
                                         expected_format=CHECKPOINT_FORMAT)
            try:
                _check_resumable(state, cfg, em)
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{latest}: {exc.args[0] if exc.args else exc}") from None
            _check_same_task(state, task, latest)
            _check_finite_state(state, latest)
            em.load_state_dict(state["edge_model"])
            multipliers.load_state_dict(state["multipliers"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.set_state(state["sampler"])
            history = state["history"]
            start = state["step"]
            if group.is_main:
                print(f"resuming from {latest}: step {start} of {cfg.steps} done, "
                      f"continuing at step {start + 1}", file=sys.stderr, flush=True)
        elif group.is_main:
            warnings.warn(f"resume: no checkpoint at {latest}; the run starts fresh from step 1")

    trainer = _Trainer(cfg=cfg, em=em, multipliers=multipliers, optimizer=optimizer, scheduler=scheduler,
                       reference=_FullModelReference(em, device, objectives.objective_of(data)),
                       examples=train.examples,
                       device=device, micro=micro, n_micro=n_micro, group=group, latest=latest,
                       fixed_off=None if fixed_off is None else [m.to(device) for m in fixed_off])
    writes = out_dir is not None and group.is_main  # only rank 0 writes files
    bar = make_progress(cfg.steps, start, enabled=cfg.progress) if group.is_main else None
    last_saved = _clock()
    em.train()
    if writes:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if not resume:
            (Path(out_dir) / "log.jsonl").unlink(missing_ok=True)
        elif start < len(history) or (Path(out_dir) / "log.jsonl").exists():
            # the log restarts from the checkpoint's history: steps after it are redone
            (Path(out_dir) / "log.jsonl").write_text("".join(jsonsafe.dumps(h) + "\n" for h in history))
    log_file = open(Path(out_dir) / "log.jsonl", "a") if writes else None
    try:
        for step in range(start, cfg.steps):
            indices = torch.randint(len(train), (cfg.batch_size,), generator=sampler).tolist()
            record = _train_step(trainer, step, indices)
            history.append(record)
            if log_file:
                log_file.write(jsonsafe.dumps(record) + "\n")
                log_file.flush()
            if bar is not None:
                bar.update(record)
            if writes and _checkpoint_due(cfg, step + 1, _clock() - last_saved):
                _save_checkpoint(latest, step + 1, cfg, em, multipliers, optimizer, scheduler, sampler,
                                 history, task)
                last_saved = _clock()
    finally:
        if bar is not None:
            bar.close()
        if log_file:
            log_file.close()

    from fastedge.evaluate import evaluate
    if writes:  # the learned masks, for sweeps over other sparsities (fastedge eval --masks)
        torch.save({"format": "fastedge.masks/1", "graph": em.graph.to_dict(), "edge_model": em.state_dict()},
                   Path(out_dir) / "masks.pt")
    distributed.barrier(group)  # rank 0's files exist when any rank returns
    em.eval()
    circuit = _extract(em, cfg)
    circuit.model_name = model_name or getattr(em.model.config, "_name_or_path", "") or ""
    circuit.task = task_name or getattr(data, "name", "")
    circuit.ablation = em.ablation
    # what drawings show beside each writer, where the model knows it (Tracr: the RASP operations)
    circuit.node_labels = dict(getattr(em.model.config, "writer_labels", None) or {})
    metrics = evaluate(em, validation, circuit, batch_size=cfg.eval_batch_size)
    metrics["steps"] = cfg.steps
    metrics["target_sparsity"] = cfg.target_sparsity
    circuit.metrics = dict(metrics)
    return PruneResult(circuit=circuit, metrics=metrics, history=history, edge_model=em,
                       wall_seconds=time.time() - started)


def _extract(em: EdgeModel, cfg: PruneConfig):
    """The run's circuit: at ``circuit_sparsity`` when given; else at the
    training target when it is below 1; else (targets at or above 1, where an
    edge count would be 0 or negative) the edges whose deterministic mask
    passes 0.5 (`fastedge.circuit.extract_circuit_by_threshold`)."""
    from fastedge.circuit import extract_circuit, extract_circuit_by_threshold
    if cfg.circuit_sparsity is not None:
        return extract_circuit(em, cfg.circuit_sparsity)
    if cfg.target_sparsity >= 1.0:
        return extract_circuit_by_threshold(em, 0.5)
    return extract_circuit(em, cfg.target_sparsity)


def _micro_batches(cfg: PruneConfig, group: distributed.Group) -> tuple[int, int]:
    """(examples per micro-batch, micro-batches per global batch). In one
    process the last micro-batch may be smaller; data parallel, the global
    batch must split into whole micro-batches, the same number on every rank.
    Data parallel, a missing micro_batch_size becomes batch_size // world
    (and is recorded in the config, so that a checkpoint names it)."""
    world = group.world_size
    if world == 1:
        micro = cfg.batch_size if cfg.micro_batch_size is None else cfg.micro_batch_size
        return micro, -(-cfg.batch_size // micro)
    if cfg.micro_batch_size is None:
        if cfg.batch_size % world:
            raise ValueError(
                f"data-parallel pruning over {world} ranks: batch_size {cfg.batch_size} does not split "
                f"evenly over {world} ranks; choose a batch_size that is a multiple of {world}, or set "
                f"micro_batch_size so that batch_size is a multiple of micro_batch_size * {world}")
        cfg.micro_batch_size = cfg.batch_size // world
    micro = cfg.micro_batch_size
    n_micro = cfg.batch_size // micro
    if cfg.batch_size % micro or n_micro % world:
        raise ValueError(
            f"data-parallel pruning over {world} ranks needs every rank to get the same number of whole "
            f"micro-batches: batch_size {cfg.batch_size} with micro_batch_size {micro} gives "
            + (f"{n_micro} full micro-batches and {cfg.batch_size % micro} examples left over"
               if cfg.batch_size % micro else f"{n_micro} micro-batches, which do not split evenly over "
                                              f"{world} ranks")
            + f"; batch_size must be a multiple of micro_batch_size * world_size = {micro * world}")
    return micro, n_micro


def _noise_seed(seed: int, step: int, n_micro: int, micro_index: int) -> int:
    """The hard-concrete noise seed of micro-batch `micro_index` (its index in
    the global batch) of step `step` (0-based). It is the seed one process
    has always given its k-th training forward (EdgeModel's own rule,
    ``seed * 1_000_003 + k``) with ``k = step * n_micro + micro_index``, so
    data-parallel ranks sample the masks one process would for the same
    micro-batch, and old checkpoints resume unchanged."""
    return seed * 1_000_003 + step * n_micro + micro_index


@dataclass
class _Trainer:
    """What an optimisation step needs; built once by `prune`."""
    cfg: PruneConfig
    em: EdgeModel
    multipliers: _Multipliers
    optimizer: torch.optim.Optimizer
    scheduler: object
    reference: _FullModelReference
    examples: list
    device: torch.device
    micro: int                   # examples per micro-batch
    n_micro: int                 # micro-batches per global batch
    group: distributed.Group
    latest: Optional[Path]       # the checkpoint, for error messages
    node_sparsity: Optional[torch.Tensor] = None  # the last micro-batch's sampled node sparsity, for the log
    fixed_off: Optional[list] = None  # preselection: per group, the edges held at log_alpha -inf


def _train_step(t: _Trainer, step: int, indices: list[int]) -> dict:
    """One optimisation step on the global batch `indices` (0-based `step`):
    this rank's micro-batches forward and backward (each loss weighted by its
    share of the batch), gradients and totals summed over ranks, ascent on the
    multipliers, the finiteness check, AdamW and the scheduler. Returns the
    step's log record."""
    cfg, em, multipliers = t.cfg, t.em, t.multipliers
    target = cfg.target_at(step)
    t.optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "kl": 0.0, "edge_sparsity": 0.0}
    if em.node_log_alpha is not None:   # node masks on: their sampled sparsity is logged too
        totals["node_sparsity"] = 0.0
    per_rank = t.n_micro // t.group.world_size
    failure = None
    for j in range(t.group.rank * per_rank, (t.group.rank + 1) * per_rank):
        chunk = indices[j * t.micro:(j + 1) * t.micro]
        weight = len(chunk) / cfg.batch_size
        kl, sparsity, loss = _micro_batch_loss(t, step, j, chunk, target)
        if not torch.isfinite(loss) and failure is None:
            failure = _non_finite_message(step, kl, sparsity, loss, t.latest, cfg.checkpoint_every)
        if failure is not None and not em._weights.sharded:
            break
        (loss * weight).backward()  # sharded: every rank runs every backward (they are collective)
        if failure is not None:
            continue
        totals["loss"] += loss.item() * weight
        totals["kl"] += kl.item() * weight
        totals["edge_sparsity"] += sparsity.item() * weight
        if "node_sparsity" in totals and t.node_sparsity is not None:
            totals["node_sparsity"] += t.node_sparsity.item() * weight
    if t.group.distributed:
        flags = [0.0] * t.group.world_size
        flags[t.group.rank] = float(failure is not None)
        summed = distributed.all_reduce_sum([*totals.values(), *flags], t.group, t.device)
        totals = dict(zip(totals, summed[:len(totals)]))
        failed = [r for r, f in enumerate(summed[len(totals):]) if f]
        if failed and failure is None:
            failure = (f"step {step + 1}: non-finite loss on rank{'s' if len(failed) > 1 else ''} "
                       f"{', '.join(map(str, failed))}; stopped. "
                       + _last_good(t.latest, cfg.checkpoint_every))
    if failure is not None:
        raise NonFiniteLossError(failure)
    distributed.all_reduce_gradients([p for _, p in _named_trainables(em, multipliers)], t.group)
    em.step.fill_((step + 1) * t.n_micro)  # training forwards so far, as EdgeModel counts them
    for p in multipliers.parameters():  # ascent on the multipliers
        if p.grad is not None:
            p.grad.neg_()
    bad = [name for name, p in _named_trainables(em, multipliers)
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise NonFiniteLossError(f"step {step + 1}: non-finite gradient in {', '.join(bad)} "
                                 f"(loss {totals['loss']:.4g}); "
                                 + _last_good(t.latest, cfg.checkpoint_every))
    lr_used = t.optimizer.param_groups[0]["lr"]
    t.optimizer.step()
    t.scheduler.step()
    if t.fixed_off is not None:   # preselection: the other edges stay at 0 whatever the optimizer did
        with torch.no_grad():
            for p, off in zip(em.edge_log_alpha, t.fixed_off):
                p.masked_fill_(off, float("-inf"))
    record = {"step": step + 1, **totals, "target": target,
              "lambda1": multipliers.edge[0].item(), "lambda2": multipliers.edge[1].item(), "lr": lr_used}
    if multipliers.node is not None:   # a node target: its schedule and multipliers
        record.update(node_target=_node_target(cfg, step), node_lambda1=multipliers.node[0].item(),
                      node_lambda2=multipliers.node[1].item())
    return record


def _node_target(cfg: PruneConfig, step: int) -> float:
    """The node sparsity target of `step` (0-based): linear from 0 over the warm-up, as the edges'."""
    return cfg.node_target_sparsity * min(1.0, (step + 1) / cfg.warmup)


def _micro_batch_loss(t: _Trainer, step: int, j: int, chunk: list[int], target: float):
    """(KL, edge sparsity, loss) of micro-batch `j` (examples `chunk`); its
    sampled node sparsity (None without node masks) goes to `t.node_sparsity`."""
    from fastedge.tasks.base import collate
    cfg, em, multipliers, device = t.cfg, t.em, t.multipliers, t.device
    batch = collate([t.examples[i] for i in chunk])
    full = t.reference.get(batch)
    out = em(batch.input_ids.to(device), batch.corrupted_input_ids.to(device),
             attention_mask=batch.attention_mask.to(device), seed=_noise_seed(em.seed, step, t.n_micro, j))
    # the objective (KL, or MSE for tasks that ask for it), logged as "kl"
    kl = t.reference.objective.divergence(full, out.logits[batch.target_mask.to(device)])
    sparsity = out.edge_sparsity if cfg.sparsity_estimate == "sampled" else _expected_sparsity(em)
    loss = kl + multipliers.penalty(multipliers.edge, sparsity, target)
    if multipliers.node is not None:
        loss = loss + multipliers.penalty(multipliers.node, out.node_sparsity, _node_target(cfg, step))
    t.node_sparsity = out.node_sparsity
    return kl, sparsity, loss


def _expected_sparsity(em: EdgeModel) -> torch.Tensor:
    """1 - (expected number of non-zero edge masks) / edges."""
    from fastedge.ops import hard_concrete_l0
    kept = sum(hard_concrete_l0(p).sum() for p in em.edge_log_alpha)
    return 1 - kept / em.graph.n_edges


def _named_trainables(em, multipliers):
    yield from (("edge/node log_alpha " + n, p) for n, p in em.named_parameters())
    yield from (("lagrange multiplier " + n, p) for n, p in multipliers.named_parameters())


def _last_good(latest: Optional[Path], checkpoint_every: int) -> str:
    """The sentence about checkpoints in a stopped run's message (steps are
    1-based, as in log.jsonl)."""
    if latest is None:
        return "no checkpoint was written (pass out_dir to keep one)"
    step = checkpoint_step(latest)
    if step is None:
        return (f"no checkpoint had been written yet (the first comes after step {checkpoint_every}"
                + ("; a smaller checkpoint_every / --checkpoint-every keeps one sooner)"
                   if checkpoint_every > 1 else ")"))
    return f"the last good checkpoint is {latest} (after step {step})"


def non_finite_model_message(model) -> str:
    """Why a model's own logits are NaN or infinite: its non-finite weights, or an overflow."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    where = (f"{len(bad)} of its weight tensors hold NaN or inf (first: {bad[0]})" if bad
             else "its weights are finite, so it overflows in its dtype (try float32, without bf16)")
    return f"the unpruned model's own logits are not finite on this task, so nothing can be learned: {where}"


def _non_finite_message(step, kl, sparsity, loss, latest, checkpoint_every) -> str:
    parts = []
    for name, value in (("KL", kl), ("edge sparsity", sparsity), ("loss", loss)):
        v = value.item()
        if not math.isfinite(v):
            parts.append(f"{name} is {v}")
    what = ", ".join(parts) or f"loss is {loss.item()}"
    return f"step {step + 1}: {what}; stopped. " + _last_good(latest, checkpoint_every)


# the clock of time-based checkpoints (a test replaces it with a fake one)
_clock = time.monotonic


def _checkpoint_due(cfg: PruneConfig, done: int, since_last: float) -> bool:
    """A checkpoint after `done` steps: every `checkpoint_every` steps, at the
    last step, and when `checkpoint_seconds` passed since the last one."""
    return (done % cfg.checkpoint_every == 0 or done == cfg.steps
            or (cfg.checkpoint_seconds is not None and since_last >= cfg.checkpoint_seconds))


def _save_checkpoint(path: Path, step, cfg, em, multipliers, optimizer, scheduler, sampler, history,
                     task: Optional[dict] = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "step": step, "config": asdict(cfg), "task": task,
             "graph": em.graph.to_dict(), "edge_model": em.state_dict(),
             "multipliers": multipliers.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "sampler": sampler.get_state(), "history": history}
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a run killed mid-save keeps the previous checkpoint
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # no partial file left behind, whatever stopped the write
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        # torch.save reports a full disk as a RuntimeError of its zip writer
        # ("unexpected pos 64 vs 0"): say what happened instead
        raise CheckpointWriteError(_write_failure(path, step, exc),
                                   errno.ENOSPC if _disk_full(exc, path) else getattr(exc, "errno", None)
                                   ) from exc


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_full(exc: BaseException, path: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    free = _free_bytes(path.parent)
    return free is not None and free < 1 << 20


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _write_failure(path: Path, step: int, exc: BaseException) -> str:
    free = _free_bytes(path.parent)
    reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip()
    kept = checkpoint_step(path)
    return (f"cannot write the checkpoint of step {step} to {path} ({reason}); "
            f"{'free space unknown' if free is None else _bytes(free) + ' free'} in {path.parent}; "
            + (f"the checkpoint of step {kept} is kept: " if kept is not None else "")
            + "free some space and run again with --resume")


def load_checkpoint_file(path, what: str = "checkpoint", map_location="cpu",
                         expected_format: Optional[str] = None) -> dict:
    """A checkpoint or masks file as a dict; a corrupt, truncated or foreign
    file (or one of another format than `expected_format`) gives a
    `CheckpointError` that names it and what to do."""
    path = Path(path)
    remedy = ("delete it to start fresh, or restore a good copy" if what == "checkpoint"
              else "write scores with fastedge attribute --out" if what == "scores file" else "run prune again to rewrite it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling fails in many ways on a damaged file
        detail = " ".join(str(exc).split()).split(". ")[0][:120] or type(exc).__name__
        raise CheckpointError(f"{path}: cannot read this {what}: it is corrupt or truncated ({detail}); "
                              f"{remedy}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if not isinstance(found, str) or not found.startswith("fastedge.") or (
            expected_format is not None and found != expected_format):
        held = f"format {found!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(f"{path}: not a fastedge {what} (it holds {held}"
                              + (f", expected {expected_format!r}" if expected_format else "")
                              + f"); {remedy}")
    return state


def checkpoint_step(path) -> Optional[int]:
    """The step a checkpoint was written after, or None when there is no
    readable checkpoint at `path`."""
    try:
        if not Path(path).exists():
            return None
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint has no step
        return None


_RESUME_KEYS = ("target_sparsity", "steps", "batch_size", "micro_batch_size", "lr", "lambda_lr",
                "lr_warmup_steps", "sparsity_warmup_steps", "node_masks", "node_target_sparsity",
                "ablation", "seed", "bf16", "init_log_alpha", "sparsity_estimate", "init_from",
                "init_floor", "preselect")


def _check_resumable(state, cfg: PruneConfig, em: EdgeModel) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a fastedge checkpoint (format {state.get('format')!r})")
    if state["graph"] != em.graph.to_dict():
        raise ValueError("the checkpoint was written for another model (its edge graph differs)")
    saved = state["config"]
    changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"cannot resume with different settings ({diffs})")


# -- the task a checkpoint belongs to -------------------------------------------------------

def task_fingerprint(data, name: str = "") -> dict:
    """What identifies a run's task, for the resume check: its name, its
    example counts, and a sha256 over every example in order (split, clean
    and corrupted token ids, target positions; the answers follow from
    these). Options of a built-in task (its seed, ``n_examples``, the
    tokenizer) act through the examples they make."""
    import hashlib
    h = hashlib.sha256()
    counts = {"train": 0, "validation": 0}
    for e in data.examples:
        counts[e.split] = counts.get(e.split, 0) + 1
        for part in (e.split, e.clean_ids, e.corrupted_ids, e.target_positions):
            h.update(json.dumps(part).encode())
            h.update(b";")
        h.update(b"\n")
    return {"name": name, "n_train": counts["train"], "n_validation": counts["validation"],
            "sha256": h.hexdigest()}


def _describe_task(task: dict) -> str:
    return (f"task {task.get('name') or '(unnamed)'!r} ({task.get('n_train')} train and "
            f"{task.get('n_validation')} validation examples, sha256 {str(task.get('sha256'))[:12]}...)")


def _check_same_task(state: dict, task: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of another task. A checkpoint written
    before checkpoints recorded their task (no "task" entry) cannot be
    checked: it resumes with a warning that says so (refusing would throw
    away a run that is most likely the same task; the next checkpoint
    records it)."""
    saved = state.get("task")
    if saved is None:
        import warnings
        warnings.warn(f"{path} records no task (written by an older fastedge): resuming it without "
                      f"checking that it was trained on this run's {_describe_task(task)}", stacklevel=3)
        return
    # the examples decide (a renamed copy of the same data resumes)
    if saved.get("sha256") != task["sha256"]:
        raise ValueError(f"cannot resume: {path} was written for {_describe_task(saved)}, but this run's "
                         f"data is {_describe_task(task)}; resume with the same task and data, or start "
                         f"a fresh run without resume (or in another output folder)")


def _check_finite_state(state: dict, path: Path) -> None:
    """Refuse a checkpoint whose masks, multipliers or optimizer state hold
    NaN (or +inf: -inf log_alphas are structural zeros, legal), naming the
    file and the first bad tensor."""
    def tensors(prefix, obj):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(f"{prefix}[{i}]", v)

    for part in ("edge_model", "multipliers", "optimizer"):
        for name, t in tensors(part, state.get(part)):
            if not t.is_floating_point():
                continue
            bad = torch.isnan(t) | (torch.isinf(t) if part != "edge_model" or "log_alpha" not in name
                                    else torch.isposinf(t))
            if bool(bad.any()):
                raise ValueError(f"cannot resume: {path} holds {int(bad.sum())} non-finite value(s) in {name} "
                                 f"(e.g. {t[bad].flatten()[0].item()}); it is not a good checkpoint. Delete it "
                                 f"to start fresh, or restore an earlier copy")


# -- warm starts and preselection from attribution scores ----------------------------------------

def load_init_scores(init_from):
    """`init_from` as `EdgeScores`: given as such, or the path of a scores
    file (``fastedge attribute --out``) or of a run's ``masks.pt`` (its
    log_alphas as scores, `EdgeScores.from_masks`)."""
    from fastedge.attribution import SCORES_FORMAT, EdgeScores
    if isinstance(init_from, EdgeScores):
        return init_from
    if not isinstance(init_from, (str, os.PathLike)):
        raise TypeError(f"init_from takes EdgeScores or the path of a scores or masks file, "
                        f"got {type(init_from).__name__}")
    state = load_checkpoint_file(init_from, "scores file")
    if state.get("format") == SCORES_FORMAT:
        return EdgeScores.from_dict(state)
    if state.get("format") == "fastedge.masks/1":
        return EdgeScores.from_masks(state)
    raise CheckpointError(f"{init_from}: holds {state.get('format')!r}, neither scores "
                          f"({SCORES_FORMAT!r}) nor masks ('fastedge.masks/1')")


def scores_fingerprint(scores) -> str:
    """"sha256:..." of the score values and how they rank (what a resumed run must match)."""
    import hashlib
    h = hashlib.sha256(scores.flat().numpy().tobytes())
    h.update(scores.method.encode())
    return "sha256:" + h.hexdigest()[:32]


def warm_start_log_alphas(scores, *, top: float, floor: float = 0.0, preselect: Optional[float] = None,
                          absolute: Optional[bool] = None):
    """Initial edge log_alphas from attribution scores, per group, and (with
    `preselect`) which edges are fixed off (per group bool, else None).

    Edges rank by ``|score|`` (by the signed score for a pruning run's masks,
    ``method == "edge-pruning"``, or as `absolute` says), best first, ties in
    graph edge order. Rank ``k`` of ``n`` starts at ``top - (top - floor) *
    k / (n - 1)``: the best edge where every mask starts without scores (the
    initial value, ``init_log_alpha``), the worst at `floor` (default 0, the
    deterministic mask's midpoint, whose hard-concrete sample is still
    non-zero 83% of the time). Every mask thus starts on, so the sparsity
    target's ramp from 0 keeps its meaning, and the low-ranked edges sit
    where a few steps of the sparsity pressure turn them off first.

    With ``preselect=f``, only the top ``ceil(f * n)`` edges are candidates:
    they are ranked among themselves over the same range, and every other
    edge starts (and stays: `prune` holds it) at ``-inf``, a mask of exactly 0."""
    if absolute is None:
        absolute = scores.method != "edge-pruning"
    flat = scores.flat()
    if torch.isnan(flat).any():
        raise ValueError("init_from: the scores contain NaN")
    values = flat.abs() if absolute else flat
    n = values.numel()
    order = torch.argsort(values, descending=True, stable=True)
    n_cand = n if preselect is None else max(1, math.ceil(preselect * n))
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = torch.arange(n, dtype=torch.float64)
    span = max(n_cand - 1, 1)
    start = top - (top - floor) * rank.clamp(max=span) / span
    off = rank >= n_cand
    start[off] = float("-inf")
    graph = scores.graph
    return graph.split_by_group(start), (graph.split_by_group(off) if preselect is not None else None)
