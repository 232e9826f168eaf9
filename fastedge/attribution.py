"""Edge attribution in one pass: EAP and EAP-IG on native Hugging Face models.

With every edge mask fixed at 1 (the full model), the derivative of a
metric ``m`` in edge mask ``z[r, w]`` is

    d m / d z[r, w] = (y_w - y~_w) . d m / d in_r

summed over the tokens: the writer's clean-minus-ablated difference against
the gradient at the reader's input. That is the edge's EAP score (Syed,
Rager and Conmy 2023; Hanna, Pezzelle and Belinkov 2024), and fastedge's
fused backward computes it for every edge of a layer in one pass over the
stack (`EdgeModel.unit_masks`: leaf masks whose ``.grad`` is the score).
Grouped k/v heads stay grouped: the score of a k/v reader is that of the
shared input (the sum of what EAP-IG's ungrouped copies would get).

Methods (`attribute`):

* ``"eap"``: one forward and one backward per batch, at the clean input.
* ``"eap-ig-inputs"``: the gradients are averaged over ``ig_steps`` runs on
  clean tokens whose embedding outputs are interpolated between ablated and
  clean, ``y~ + alpha (y - y~)`` at ``alpha = k / m`` for ``k = 0 .. m-1``
  (as the EAP-IG library's code does: the first step is the corrupted input
  and the clean input itself is never a step, so ``ig_steps=1`` is the
  gradient at the corrupted input, not EAP). Every score multiplies the
  *fixed* difference ``y_w - y~_w`` of the clean and ablated runs by the
  averaged gradient (`fastedge.model._Pin`).
* ``"eap-ig-activations"``: for each writer group in turn (the embeddings,
  then per layer all its heads at once, then its MLP, as the library's
  code groups them), ``ig_steps`` runs in which that group outputs the
  constant ``y~ + alpha (y - y~)`` at ``alpha = k / m`` for ``k = 1 .. m``
  and everything downstream runs freely; every run's gradient contributes to
  *every* edge's score, and the sum is divided by the number of runs
  (groups x steps), as in the library's code. The paper describes the
  interpolation per component; the code, which this follows, patches one
  group at a time and credits all edges from each run.

The ablated values ``y~`` are the edge model's ablation: the corrupted
input (interchange, the default), zero, or means.

Metrics: ``"logit_diff"`` (logit of the clean answer minus that of the
corrupted answer, averaged over an example's target positions; the default
for tasks), ``"logprob"`` (log-probability of the clean answer, averaged
likewise; the default for tasks whose clean and corrupted answers are the
same tokens, such as induction, where the logit difference is 0
everywhere), ``"kl"`` (KL(p_full || p) at the target positions, averaged;
for raw tensors, over every non-padded position; note that its gradient at
the full model is 0, so EAP with ``"kl"`` scores every edge 0 to first
order: use it with the EAP-IG methods), ``"projection"`` (the output
projected onto the full model's, mean-centred logits for categorical
outputs, the plain value for numerical ones; the default for tasks scored
on their own objective, the Tracr programs, whose answers are the full
model's outputs), or a callable mapping logits
``[B, S, V]`` (and, if it takes a second argument, the `Batch`) to one
value per example ``[B]``.

Scale and sign. Scores are averaged over examples (summed over each
example's tokens), and over the IG runs. ``sign="gate"`` (the default) is
the derivative in the mask, ``d m / d z``; ``sign="eap-ig"`` is the EAP-IG
library's convention, (corrupted - clean) . gradient, i.e. minus the gate
derivative. The library divides its accumulated scores by the number of
examples whatever the metric does within a batch: with a metric that
averages over the batch (MIB's ``mean=True``), its scores are ours divided
by the batch size (the same ranking).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastedge.graph import EdgeGraph

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")
SIGNS = ("gate", "eap-ig")
METRICS = ("logit_diff", "logprob", "kl", "projection")
SCORES_FORMAT = "fastedge.scores/1"


# -- scores -----------------------------------------------------------------------------------------

@dataclass
class EdgeScores:
    """A score for every edge of `graph`, in the layout of the masks: one
    ``[R_g, W_g]`` float64 tensor per reader group (``graph.groups`` order),
    as `EdgeModel.edge_log_alpha`. `flat` gives graph edge order, `by_name`
    a ``{(writer, reader): score}`` view."""
    graph: EdgeGraph
    scores: list
    method: str = ""
    sign: str = "gate"
    metric: str = ""
    ig_steps: Optional[int] = None
    n_examples: int = 0
    ablation: str = "interchange"
    model_name: str = ""
    task: str = ""
    d_model: Optional[int] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.graph, EdgeGraph):
            raise TypeError(f"graph must be an EdgeGraph, got {type(self.graph).__name__}")
        if len(self.scores) != len(self.graph.groups):
            raise ValueError(f"expected {len(self.graph.groups)} score tensors (one per reader group), "
                             f"got {len(self.scores)}")
        out = []
        for gi, (t, grp) in enumerate(zip(self.scores, self.graph.groups)):
            t = torch.as_tensor(t).detach().to("cpu", torch.float64)
            if tuple(t.shape) != (grp.n_readers, grp.n_writers):
                raise ValueError(f"scores {gi} ({grp.kind} readers"
                                 f"{'' if grp.layer is None else f' of layer {grp.layer}'}) must be "
                                 f"[{grp.n_readers}, {grp.n_writers}], got {list(t.shape)}")
            out.append(t)
        self.scores = out
        if self.sign not in SIGNS:
            raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {self.sign!r}")

    # -- views --------------------------------------------------------------------------------------

    def flat(self) -> Tensor:
        """Every edge's score in graph edge order ([n_edges], float64)."""
        return torch.cat([t.flatten() for t in self.scores])

    def by_name(self) -> dict:
        """``{(writer, reader): score}`` for every edge."""
        flat = self.flat().tolist()
        return {edge: flat[i] for i, edge in enumerate(self.graph.edges())}

    def __getitem__(self, edge) -> float:
        writer, reader = edge
        return float(self.flat()[self.graph.edge_index(writer, reader)])

    def with_sign(self, sign: str) -> "EdgeScores":
        """The same scores in convention `sign` ("gate" or "eap-ig")."""
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
        factor = 1.0 if sign == self.sign else -1.0
        return dataclasses.replace(self, scores=[t * factor for t in self.scores], sign=sign)

    def top(self, n: int, *, absolute: bool = True) -> list:
        """The `n` highest-scoring edges as (writer, reader) pairs, best first."""
        flat = self.flat().abs() if absolute else self.flat()
        order = torch.argsort(flat, descending=True, stable=True)[:n]
        return [self.graph.edge(i) for i in order.tolist()]

    def to_circuit(self, *, n_edges: Optional[int] = None, sparsity: Optional[float] = None,
                   absolute: bool = True):
        """`fastedge.Circuit.from_scores` of these scores."""
        from fastedge.circuit import Circuit
        return Circuit.from_scores(self, n_edges=n_edges, sparsity=sparsity, absolute=absolute)

    # -- files --------------------------------------------------------------------------------------

    def to_eap_graph_json(self, path=None, *, in_graph=None, d_model: Optional[int] = None) -> dict:
        """The scores as EAP-IG's graph JSON (the MIB circuit track's format),
        written to `path` when given: `fastedge.eap_graph.scores_to_eap_graph_json`,
        whose module docstring gives the mapping (the embedding writers summed
        into ``input``, each grouped k/v reader's score split evenly over its
        query heads' copies, ``resid_post`` as ``logits``). `in_graph`: None
        (no edge marked), True (all) or a `fastedge.Circuit`."""
        from fastedge.eap_graph import scores_to_eap_graph_json
        return scores_to_eap_graph_json(self, path, in_graph=in_graph, d_model=d_model)

    @classmethod
    def from_eap_graph_json(cls, path_or_dict, graph: EdgeGraph, **meta) -> "EdgeScores":
        """Scores of `graph` from an EAP-IG graph JSON (a path or the dict):
        `fastedge.eap_graph.scores_from_eap_graph_json` (``input``'s score to
        the first embedding writer, k/v copies summed)."""
        from fastedge.eap_graph import scores_from_eap_graph_json
        return scores_from_eap_graph_json(path_or_dict, graph, **meta)

    def to_dict(self) -> dict:
        return {"format": SCORES_FORMAT, "graph": self.graph.to_dict(), "scores": self.scores,
                "method": self.method, "sign": self.sign, "metric": self.metric, "ig_steps": self.ig_steps,
                "n_examples": self.n_examples, "ablation": self.ablation, "model_name": self.model_name,
                "task": self.task, "d_model": self.d_model, "info": dict(self.info)}

    def save(self, path) -> None:
        """Write fastedge's own format (a torch file, ``fastedge.scores/1``)."""
        torch.save(self.to_dict(), Path(path))

    @classmethod
    def load(cls, path) -> "EdgeScores":
        """Read `save`'s file; a file of another kind gets a ValueError naming it."""
        from fastedge.prune import load_checkpoint_file
        d = load_checkpoint_file(path, "scores file", expected_format=SCORES_FORMAT)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeScores":
        graph = EdgeGraph.from_dict(d["graph"])
        keys = ("method", "sign", "metric", "ig_steps", "n_examples", "ablation", "model_name", "task",
                "d_model", "info")
        return cls(graph=graph, scores=list(d["scores"]), **{k: d[k] for k in keys if k in d})

    @classmethod
    def from_masks(cls, em_or_masks, *, graph: Optional[EdgeGraph] = None, **meta) -> "EdgeScores":
        """A pruning run's masks as scores: each edge's ``log_alpha`` (an
        `EdgeModel`, its state dict, a ``masks.pt`` dict, or the per-group
        tensors with `graph`). Higher means kept more surely; rank with
        ``absolute=False``."""
        from fastedge.circuit import _unpack_masks
        edges, _, graph, found = _unpack_masks(em_or_masks, graph, None)
        meta.setdefault("method", "edge-pruning")
        meta.setdefault("ablation", found.get("ablation", "interchange"))
        if "d_model" in found:
            meta.setdefault("d_model", found["d_model"])
        return cls(graph=graph, scores=[t.detach() for t in edges], **meta)

    def __repr__(self) -> str:
        return (f"EdgeScores({self.method or 'scores'}, {self.graph.n_edges} edges, metric={self.metric!r}, "
                f"sign={self.sign!r}, n_examples={self.n_examples})")


# -- metrics ----------------------------------------------------------------------------------------

def _upcast(logits: Tensor) -> Tensor:
    """Logits in float32 at least (float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _target_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``values`` [B, S] over the positions where ``mask`` [B, S] holds."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def logit_diff(logits: Tensor, batch) -> Tensor:
    """Per example: logit of the clean answer minus that of the corrupted
    answer, averaged over the example's target positions ([B])."""
    logits = _upcast(logits)
    target = batch.target_mask.to(logits.device)
    clean = batch.clean_answer.to(logits.device).clamp(min=0)
    corrupted = batch.corrupted_answer.to(logits.device).clamp(min=0)
    diff = logits.gather(-1, clean[..., None])[..., 0] - logits.gather(-1, corrupted[..., None])[..., 0]
    return _target_mean(diff, target)


def answer_logprob(logits: Tensor, batch) -> Tensor:
    """Per example: log-probability of the clean answer, averaged over the
    example's target positions ([B])."""
    log_p = F.log_softmax(_upcast(logits), dim=-1)
    clean = batch.clean_answer.to(logits.device).clamp(min=0)
    return _target_mean(log_p.gather(-1, clean[..., None])[..., 0], batch.target_mask.to(logits.device))


def kl_to_full(logits: Tensor, full_logits: Tensor, where: Tensor) -> Tensor:
    """Per example: KL(p_full || p) averaged over the positions `where` ([B])."""
    log_p = F.log_softmax(_upcast(logits), dim=-1)
    full_log_probs = F.log_softmax(full_logits, dim=-1)
    kl = (full_log_probs.exp() * (full_log_probs - log_p)).sum(-1)
    return _target_mean(kl, where)


def projection(logits: Tensor, full_logits: Tensor, where: Tensor, *, center: bool = True) -> Tensor:
    """Per example: the output projected onto the full model's, ``<y, y_full>``
    over the vocabulary (both mean-centred when `center`: a logit difference
    towards the full model's preferences), averaged over the positions
    `where` ([B]). Unlike a divergence, its gradient at the full model is
    not 0; for numerical outputs (``center=False``) it is the output value
    times the full model's."""
    cur = _upcast(logits)
    ref = full_logits
    if center:
        cur = cur - cur.mean(-1, keepdim=True)
        ref = ref - ref.mean(-1, keepdim=True)
    return _target_mean((cur * ref).sum(-1), where)


class _Metric:
    """One value per example from a run's logits: a named metric or a callable."""

    def __init__(self, metric, has_task: bool, same_answers: bool = False, objective: Optional[str] = None):
        # objective: "kl" or "mse" for a task scored on its objective (Tracr programs), else None
        self.center = objective != "mse"
        if metric is None and has_task:
            metric = "projection" if objective else "logprob" if same_answers else "logit_diff"
        elif metric == "logit_diff" and same_answers:
            import warnings
            warnings.warn("metric 'logit_diff' is 0 for every example of this task (its clean and corrupted "
                          "answers are the same tokens), so every score is 0; use 'logprob', or 'kl' with an "
                          "EAP-IG method", stacklevel=3)
        if metric is None:
            raise ValueError("attribution on raw tensors needs metric=: 'kl', or a callable mapping "
                             "logits [B, S, V] to one value per example")
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(f"metric must be one of {', '.join(METRICS)} or a callable, got {metric!r}")
            if metric in ("logit_diff", "logprob") and not has_task:
                raise ValueError(f"metric {metric!r} needs a task (its answers); "
                                 f"with raw tensors pass metric='kl' or a callable")
            self.name, self.fn, self.takes_batch = metric, None, True
        elif callable(metric):
            self.name, self.fn = getattr(metric, "__name__", "callable"), metric
            try:
                params = [p for p in inspect.signature(metric).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                self.takes_batch = len(params) >= 2
            except (TypeError, ValueError):
                self.takes_batch = False
        else:
            raise TypeError(f"metric must be a name ({', '.join(METRICS)}) or a callable, got {type(metric).__name__}")

    def __call__(self, logits: Tensor, batch, full_logits: Optional[Tensor]) -> Tensor:
        if self.name == "logit_diff" and self.fn is None:
            value = logit_diff(logits, batch)
        elif self.name == "logprob" and self.fn is None:
            value = answer_logprob(logits, batch)
        elif self.name == "kl" and self.fn is None:
            value = kl_to_full(logits, full_logits, batch.target_mask.to(logits.device))
        elif self.name == "projection" and self.fn is None:
            value = projection(logits, full_logits, batch.target_mask.to(logits.device), center=self.center)
        else:
            value = self.fn(logits, batch) if self.takes_batch else self.fn(logits)
        B = logits.shape[0]
        if not isinstance(value, Tensor) or value.shape != (B,):
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"the metric must return one value per example (a [{B}] tensor), got {shape}")
        return value

    @property
    def needs_full(self) -> bool:
        return self.name in ("kl", "projection") and self.fn is None


@dataclass
class _RawBatch:
    """Raw tensors in the fields the metrics read (every non-padded position is a target)."""
    input_ids: Tensor
    corrupted_input_ids: Optional[Tensor]
    attention_mask: Tensor

    @property
    def target_mask(self) -> Tensor:
        return self.attention_mask.bool()


# -- attribution --------------------------------------------------------------------------------------

def attribute(model, task_or_ids, corrupted_ids: Optional[Tensor] = None, *, method: str = "eap",
              ig_steps: int = 5, metric: Union[str, Callable, None] = None, batch_size: int = 32,
              sign: str = "gate", attention_mask: Optional[Tensor] = None, ablation: Optional[str] = None,
              split: str = "train", n_examples: Optional[int] = None, model_name: str = "",
              task_name: str = "") -> EdgeScores:
    """Scores for every edge of `model` (a Hugging Face causal LM, or an
    `EdgeModel`) by `method` ("eap", "eap-ig-inputs", "eap-ig-activations";
    module docstring).

    Two forms:

    * ``attribute(model, task, method=...)``: over the task's `split`
      (default "train"; the first `n_examples` if given), in batches of
      `batch_size`; `metric` defaults to "logit_diff" ("logprob" where the
      clean and corrupted answers are the same tokens).
    * ``attribute(model, clean_ids, corrupted_ids, metric=fn, method=...)``:
      raw ``[B, S]`` token tensors (and `attention_mask`); `metric` is "kl" or
      a callable of the logits ``[B, S, V]`` giving ``[B]``.

    `ablation` ("interchange", "zero", "mean") patches a plain model that
    way (default interchange); an `EdgeModel` keeps its own. Returns
    `EdgeScores` in convention `sign` ("gate" or "eap-ig")."""
    from fastedge.model import EdgeModel, patch
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    if method != "eap":
        if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
            raise ValueError(f"ig_steps must be an integer of at least 1, got {ig_steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    has_task = not isinstance(task_or_ids, Tensor)
    batches, n_total, task_label, same_answers = _batches(task_or_ids, corrupted_ids, attention_mask,
                                                          batch_size, split, n_examples)
    objective = None
    if has_task and getattr(task_or_ids, "meta", {}).get("faithfulness") == "objective":
        from fastedge.objectives import objective_of
        objective = objective_of(task_or_ids).name     # "kl" or "mse"
    scorer = _Metric(metric, has_task, same_answers, objective)
    if method == "eap" and scorer.name == "kl" and scorer.fn is None:
        import warnings
        warnings.warn("EAP with metric 'kl' scores every edge 0 up to rounding: KL to the full model has "
                      "gradient 0 at the full model; use an EAP-IG method, or 'projection' / a metric of the "
                      "answers", stacklevel=2)

    owned = not isinstance(model, EdgeModel)
    if owned:
        em = patch(model, ablation=ablation or "interchange", node_masks=False)
    else:
        em = model
        if ablation is not None and ablation != em.ablation:
            raise ValueError(f"the EdgeModel was patched with ablation {em.ablation!r}, not {ablation!r}")
    if em.ablation == "interchange" and not has_task and corrupted_ids is None:
        raise ValueError("interchange ablation needs corrupted_ids (or patch the model with ablation "
                         "'zero' or 'mean')")
    device = em.edge_log_alpha[0].device
    saved_masks, was_training = em._fixed_masks, em.training
    try:
        em.eval()
        if em.ablation == "mean" and em._mean_outputs is None:
            first = next(iter(batches()))
            em.compute_mean_outputs(first.input_ids.to(device), first.attention_mask.to(device))
        masks = em.unit_masks()
        runs = 0
        for batch in batches():
            runs = _attribute_batch(em, batch, method, ig_steps, scorer, device)
        factor = 1.0 / (n_total * max(runs, 1))
        if sign == "eap-ig":
            factor = -factor
        scores = [(m.grad if m.grad is not None else torch.zeros_like(m)) * factor for m in masks]
        if all(not bool(t.any()) for t in scores):
            import warnings
            warnings.warn(f"every edge's score is 0: the metric {scorer.name!r} does not change to first order "
                          f"with any edge mask on these examples (a divergence from the full model has "
                          f"gradient 0 there; use an EAP-IG method, or 'projection' / a metric of the answers)",
                          stacklevel=2)
    finally:
        em._fixed_masks = saved_masks
        em.train(was_training)
        if owned:
            em.unpatch()
    config = getattr(em.model, "config", None)
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return EdgeScores(graph=em.graph, scores=scores, method=method, sign=sign, metric=scorer.name,
                      ig_steps=None if method == "eap" else ig_steps, n_examples=n_total, ablation=em.ablation,
                      model_name=model_name or getattr(config, "_name_or_path", "") or "",
                      task=task_name or task_label, d_model=None if d_model is None else int(d_model),
                      info={"runs_per_batch": runs})


def _batches(task_or_ids, corrupted_ids, attention_mask, batch_size, split, n_examples):
    """(a function giving the batches, the number of examples, the task's
    name, whether every example's clean and corrupted answers agree)."""
    if isinstance(task_or_ids, Tensor):
        ids = task_or_ids
        if ids.dim() != 2:
            raise ValueError(f"clean ids must be [batch, seq], got shape {list(ids.shape)}")
        if corrupted_ids is not None and corrupted_ids.shape != ids.shape:
            raise ValueError(f"corrupted ids must have the clean ids' shape {list(ids.shape)}, "
                             f"got {list(corrupted_ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the ids' shape {list(ids.shape)}, got {list(mask.shape)}")
        if n_examples is not None:
            ids, mask = ids[:n_examples], mask[:n_examples]
            corrupted_ids = None if corrupted_ids is None else corrupted_ids[:n_examples]

        def raw():
            for lo in range(0, ids.shape[0], batch_size):
                yield _RawBatch(ids[lo:lo + batch_size],
                                None if corrupted_ids is None else corrupted_ids[lo:lo + batch_size],
                                mask[lo:lo + batch_size])
        return raw, ids.shape[0], "", False
    if corrupted_ids is not None:
        raise TypeError("corrupted ids go with clean ids (tensors); a task carries its own")
    data = task_or_ids.split(split)
    if len(data) == 0:
        raise ValueError(f"task {getattr(task_or_ids, 'name', '?')!r} has no {split!r} examples")
    examples = list(data.examples)
    if n_examples is not None:
        examples = examples[:n_examples]

    def tasks():
        from fastedge.tasks.base import collate
        for lo in range(0, len(examples), batch_size):
            yield collate(examples[lo:lo + batch_size])
    same = all(e.clean_answer == e.corrupted_answer for e in examples)
    return tasks, len(examples), getattr(task_or_ids, "name", ""), same


def _attribute_batch(em, batch, method: str, steps: int, scorer: _Metric, device) -> int:
    """Backward the summed metric of every run of one batch into the unit
    masks' ``.grad``; returns the number of runs."""
    ids = batch.input_ids.to(device)
    attention = batch.attention_mask.to(device)
    corrupted = None if batch.corrupted_input_ids is None else batch.corrupted_input_ids.to(device)
    if method == "eap":
        with torch.enable_grad():
            out = em(ids, corrupted, attention_mask=attention, seed=0)
            full = _upcast(out.logits.detach()) if scorer.needs_full else None
            _backward(scorer(out.logits, batch, full))
        return 1
    clean = em.writer_deltas(ids, corrupted, attention_mask=attention)
    deltas = clean.writer_deltas
    full = _upcast(clean.logits) if scorer.needs_full else None
    g = em.graph
    n_emb = len(g.embeddings)
    if method == "eap-ig-inputs":
        patches = [(0, n_emb, k / steps) for k in range(steps)]
    else:
        groups = [(0, n_emb)]
        for layer in range(g.n_layers):
            head0 = g.writer_index[f"a{layer}.h0"]
            mlp = g.writer_index[f"m{layer}"]
            groups += [(head0, head0 + g.n_heads), (mlp, mlp + 1)]
        patches = [(lo, hi, k / steps) for lo, hi in groups for k in range(1, steps + 1)]
    for patch in patches:
        with torch.enable_grad():
            out = em.pinned_forward(ids, deltas, attention_mask=attention, patch=patch)
            _backward(scorer(out.logits, batch, full))
    return len(patches)


def _backward(values: Tensor) -> None:
    total = values.sum()
    if not torch.isfinite(total):
        raise ValueError(f"the metric is not finite on this batch ({total.item()}); attribution stopped")
    total.backward()
