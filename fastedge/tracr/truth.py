"""The ground-truth circuit of a Tracr-compiled model, and the judge of
"perfect recovery" (the paper's claim for reverse and xproportion).

Two edge sets, both subsets of the patched model's `EdgeGraph`:

* ``edges``, the weight-composition circuit: ``w -> r`` where writer ``w``'s
  output dimensions meet the dimensions reader ``r`` reads with nonzero
  weights (`fastedge.tracr.spaces`). Keeping only these edges under zero
  ablation leaves every output unchanged, on any input: an edge outside it
  carries nothing its reader can see.
* ``necessary``: the edges of that circuit whose removal alone (zero
  ablation, every other weight-composition edge kept) changes some output on
  the program's input space. The rest, ``redundant``, are "redundant on this
  distribution": for instance a head's reads of a direction that is constant
  over the inputs. Redundancy is per edge: removing two redundant edges
  together can change outputs (`GroundTruth.redundant_jointly_removable`).

A circuit *recovers* the ground truth when it contains every necessary edge,
contains no edge outside the weight-composition circuit, and reproduces every
output on the input space under zero ablation (`GroundTruth.judge`).

Outputs are compared as the program reads them, at every position but BOS
(and not on padding): a categorical program's decoded class (the argmax)
must be equal; a numerical program's value must be within
`NUMERICAL_TOLERANCE`. All runs use a float64 copy of the model, so float
rounding is far below either criterion.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from fastedge.graph import EdgeGraph
from fastedge.tracr import spaces
from fastedge.tracr.convert import TracrModel
from fastedge.tracr.inputs import batch_ids, input_space, input_space_size

# A numerical output counts as changed when it moves by more than this
# (absolute). Measured on xproportion (float64 runs, all 1,364 inputs): its
# outputs are fractions k/n with n <= 5, and removing any necessary edge
# moves some output by 0.2 to 1.0 (the smallest real change seen is 0.2);
# removing a redundant edge (the query's or key's read of the BOS direction)
# moves outputs by at most 6.2e-9, which is Tracr's own approximation error
# (its outputs differ from the exact fractions by up to 6.2e-9: the BOS
# token keeps a sliver of attention), and the whole weight-composition
# circuit reproduces the full model to 2e-32. The float32 model itself
# differs from the float64 one by up to 2.5e-8. 1e-4 sits over three orders
# of magnitude from both sides.
NUMERICAL_TOLERANCE = 1e-4

# Inputs the ground truth runs on at most (all of the space by default):
# past this, pass n_examples (as for `fastedge.tracr.task`).
MAX_INPUTS = 200_000
_CHUNK_ELEMENTS = 1 << 25     # 256 MiB of float64 writer stack per forward


@contextlib.contextmanager
def _one_thread():
    """Run on one CPU thread, restoring the setting after. Tracr models are
    tiny (a forward of all 1,364 xproportion inputs is tens of MFLOP):
    threads only add overhead, and on a loaded machine they make each
    forward tens of times slower (measured: 0.03 s on one thread, 0.3-1.1 s
    on two, for shuffle_dyck on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Outputs:
    """The program's outputs on its input space, from a float64 copy of the
    model, for the full model and for any circuit under zero ablation."""

    def __init__(self, tm: TracrModel, inputs: list, tolerance: float):
        from fastedge.model import patch
        model = copy.deepcopy(tm.model).to(torch.float64)
        self.categorical = tm.categorical
        self.tolerance = tolerance
        self.ids, self.mask = batch_ids(tm, inputs)
        # every position but BOS, and no padding
        self.scored = self.mask.bool().clone()
        self.scored[:, 0] = False
        self.em = patch(model, ablation="zero", node_masks=False)
        self.graph = self.em.graph
        # rows per forward: the edge model's writer stack (writers x rows x
        # S x D float64) stays under _CHUNK_ELEMENTS
        per_row = self.graph.n_writers * self.ids.shape[1] * model.config.hidden_size
        self.chunk = max(1, _CHUNK_ELEMENTS // per_row)
        with torch.no_grad():
            self.reference = self._run(model)

    def _run(self, fn) -> torch.Tensor:
        """Decoded outputs [B, S] of `fn(ids, attention_mask=...)`, in chunks of rows."""
        out = []
        for start in range(0, self.ids.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            logits = fn(self.ids[rows], attention_mask=self.mask[rows]).logits
            out.append(logits.argmax(-1) if self.categorical else logits[..., 0])
        return torch.cat(out)

    @torch.no_grad()
    def of(self, edges: Iterable[tuple[str, str]]) -> torch.Tensor:
        """Decoded outputs [B, S] of the circuit `edges` (zero ablation)."""
        self.em.set_circuit(list(edges))
        return self._run(self.em)

    def compare(self, edges: Iterable[tuple[str, str]]) -> dict:
        """How the circuit's outputs differ from the full model's: the number
        of changed outputs and, for a numerical program, the largest change."""
        out = self.of(edges)
        if self.categorical:
            changed = (out != self.reference) & self.scored
            return {"changed_outputs": int(changed.sum())}
        diff = (out - self.reference).abs().masked_fill(~self.scored, 0.0)
        # a NaN counts as changed
        changed = ((diff > self.tolerance) | diff.isnan()) & self.scored
        return {"changed_outputs": int(changed.sum()), "max_abs_change": float(diff.max())}


@dataclass
class GroundTruth:
    """The ground truth of one Tracr model (see the module docstring).
    ``edges``, ``necessary``, ``redundant`` are sets of ``(writer, reader)``;
    ``effects`` gives, per weight-composition edge, what removing it alone
    does (``changed_outputs`` of ``n_inputs`` inputs' outputs, and
    ``max_abs_change`` for a numerical program)."""
    graph: EdgeGraph
    edges: set
    necessary: set
    redundant: set
    write_dims: dict = field(repr=False)
    read_dims: dict = field(repr=False)
    effects: dict = field(repr=False)
    categorical: bool = True
    tolerance: Optional[float] = None
    n_inputs: int = 0
    complete: bool = True                   # the circuit alone reproduces every output
    redundant_jointly_removable: bool = True
    name: str = ""
    residual_labels: list = field(default_factory=list, repr=False)   # Tracr's names of the dims
    _outputs: Optional[_Outputs] = field(default=None, repr=False, compare=False)

    def via(self, writer: str, reader: str) -> list[str]:
        """The residual directions (Tracr's labels, e.g. ``"indices:3"``) where
        `writer` writes and `reader` reads: why the edge is in the circuit."""
        dims = np.intersect1d(self.write_dims[writer], self.read_dims[reader])
        return [self.residual_labels[i] if i < len(self.residual_labels) else str(i) for i in dims]

    def _ordered(self, edges: Iterable) -> list[tuple[str, str]]:
        g = self.graph
        return sorted(edges, key=lambda e: g.edge_index(*e))

    def judge(self, circuit_or_edges, *, check_outputs: bool = True) -> dict:
        """Whether a circuit (a `fastedge.Circuit` of this graph, or an
        iterable of ``(writer, reader)`` pairs) recovers the ground truth:
        ``recovered`` when ``missing_necessary`` and ``outside_truth`` are
        empty and ``outputs_reproduced`` (its outputs under zero ablation
        on the input space, compared with the full model's). With
        `check_outputs` False, or without the model, ``outputs_reproduced``
        is None and ``recovered`` judges the edge sets only."""
        edges = self._edges_of(circuit_or_edges)
        missing = self._ordered(self.necessary - edges)
        outside = self._ordered(edges - self.edges)
        verdict = {"recovered": False, "missing_necessary": missing, "outside_truth": outside,
                   "outputs_reproduced": None, "n_edges": len(edges),
                   "redundant_kept": len(edges & self.redundant)}
        if check_outputs and self._outputs is not None:
            with _one_thread():
                diff = self._outputs.compare(edges)
            verdict["outputs_reproduced"] = diff["changed_outputs"] == 0
            verdict.update(diff)
        verdict["recovered"] = not missing and not outside and verdict["outputs_reproduced"] is not False
        return verdict

    def _edges_of(self, circuit_or_edges) -> set:
        from fastedge.circuit import Circuit
        if isinstance(circuit_or_edges, Circuit):
            if circuit_or_edges.graph != self.graph:
                raise ValueError("the circuit's graph is not this model's edge graph")
            pairs = circuit_or_edges.edges
        else:
            pairs = circuit_or_edges
        edges = set()
        for item in pairs:
            # (a two-letter string would unpack as a pair)
            if isinstance(item, str) or not hasattr(item, "__len__") or len(item) != 2:
                raise ValueError(f"an edge is a (writer, reader) pair, got {item!r}")
            w, r = item
            self.graph.edge_index(w, r)     # raises KeyError on an unknown or impossible edge
            edges.add((w, r))
        return edges

    def to_dict(self) -> dict:
        """Plain data (edge lists in graph order, as [writer, reader])."""
        def pairs(s):
            return [list(e) for e in self._ordered(s)]
        return {
            "name": self.name, "categorical": self.categorical, "tolerance": self.tolerance,
            "n_inputs": self.n_inputs, "n_graph_edges": self.graph.n_edges,
            "edges": pairs(self.edges), "necessary": pairs(self.necessary),
            "redundant": pairs(self.redundant), "complete": self.complete,
            "redundant_jointly_removable": self.redundant_jointly_removable,
            "effects": {f"{w} -> {r}": self.effects[(w, r)] for w, r in self._ordered(self.edges)},
            "via": {f"{w} -> {r}": self.via(w, r) for w, r in self._ordered(self.edges)},
            "write_dims": {k: [int(i) for i in v] for k, v in self.write_dims.items()},
            "read_dims": {k: [int(i) for i in v] for k, v in self.read_dims.items()},
        }

    def __str__(self) -> str:
        lines = [f"ground truth of {self.name or 'a Tracr model'}: {len(self.edges)} weight-composition "
                 f"edges of {self.graph.n_edges} ({len(self.necessary)} necessary, {len(self.redundant)} "
                 f"redundant on {self.n_inputs} inputs)"]
        for w, r in self._ordered(self.edges):
            kind = "necessary" if (w, r) in self.necessary else "redundant"
            lines.append(f"  {w} -> {r}  {kind}  via {_summarise(self.via(w, r))}")
        return "\n".join(lines)


def _summarise(labels: list[str]) -> str:
    """``["indices:0", "indices:1", "tokens:BOS"]`` -> ``"indices (2 dims), tokens:BOS"``."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.split(":", 1)[0], []).append(label)
    return ", ".join(members[0] if len(members) == 1 else f"{name} ({len(members)} dims)"
                     for name, members in groups.items())


def ground_truth(tm: TracrModel, *, n_examples: Optional[int] = None, seed: int = 0,
                 tolerance: Optional[float] = None) -> GroundTruth:
    """The ground truth of a converted Tracr model (`fastedge.tracr.from_tracr`
    or `fastedge.tracr.programs.load`): the weight-composition circuit, and
    which of its edges are necessary on the input space (all of it, or a
    seeded sample of `n_examples` inputs, as `fastedge.tracr.task`).
    `tolerance` (numerical programs only) defaults to `NUMERICAL_TOLERANCE`."""
    if not isinstance(tm, TracrModel):
        raise TypeError(f"ground_truth takes a fastedge.tracr.TracrModel (from from_tracr or "
                        f"programs.load), got {type(tm).__name__}")
    if tm.categorical and tolerance is not None:
        raise ValueError("tolerance applies to numerical programs only; a categorical output is "
                         "compared by its decoded class")
    if tolerance is None and not tm.categorical:
        tolerance = NUMERICAL_TOLERANCE
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance}")

    if n_examples is None and input_space_size(tm) > MAX_INPUTS:
        raise ValueError(f"this program's input space has {input_space_size(tm):,} inputs (more than "
                         f"{MAX_INPUTS:,}): pass n_examples to judge necessity on a seeded sample")

    with _one_thread():
        outputs = _Outputs(tm, input_space(tm, n_examples, seed), tolerance or 0.0)
        writes = spaces.write_dims(tm.model)
        reads = spaces.read_dims(tm.model, writes)
        edges = spaces.composition_edges(outputs.graph, writes, reads)
        truth = set(edges)
        complete = outputs.compare(edges)["changed_outputs"] == 0
        effects, necessary = {}, set()
        for e in edges:
            effects[e] = outputs.compare(truth - {e})
            if effects[e]["changed_outputs"]:
                necessary.add(e)
        redundant = truth - necessary
        jointly = outputs.compare(necessary)["changed_outputs"] == 0
    return GroundTruth(graph=outputs.graph, edges=truth, necessary=necessary, redundant=redundant,
                       write_dims=writes, read_dims=reads, effects=effects,
                       categorical=tm.categorical, tolerance=tolerance,
                       n_inputs=int(outputs.ids.shape[0]), complete=complete,
                       redundant_jointly_removable=jointly, name=tm.name,
                       residual_labels=list(tm.config.residual_labels), _outputs=outputs)
