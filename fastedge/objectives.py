"""How far the circuit's outputs are from the full model's, at the target
positions: the term pruning minimises (docs/CONCEPTS.md section 3), chosen by the task.

* ``kl`` (the default; every language task): KL(p_full || p_circuit) over
  the output vocabulary, averaged over target positions. A task may set a
  softmax ``temperature`` (default 1): Tracr's categorical outputs are 0/1
  scores over the output space, whose softmax at temperature 1 gives the
  output only e / (e + V - 1) of the probability (0.48 for V = 4), so that
  even the empty circuit is close in KL; at 0.1 the full model's
  distribution is its output (probability above 0.9999).
* ``mse``: the squared difference of the outputs (divided by the
  ``temperature``: the same scale as the logits' for KL), summed over the
  output dimensions and averaged over target positions. For models whose output is
  a number rather than a distribution: a numerical Tracr program
  (`fastedge.tracr`) reads one value from the residual stream.

A task names its objective in ``TaskData.meta["objective"]`` (and
``meta["temperature"]``). `Objective.reference` turns the full model's logits
at the target positions [T, V] into what is kept per example; `divergence`
compares the circuit's logits [T, V] with it and returns the mean over T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("kl", "mse")


@dataclass(frozen=True)
class Objective:
    name: str = "kl"
    temperature: float = 1.0

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")

    def reference(self, full_logits: torch.Tensor) -> torch.Tensor:
        """What is kept of the full model: log-probabilities, or the outputs."""
        full_logits = full_logits.float()
        if self.name == "kl":
            return F.log_softmax(full_logits / self.temperature, dim=-1)
        return full_logits

    def divergence(self, ref: torch.Tensor, circuit_logits: torch.Tensor) -> torch.Tensor:
        """Mean over target positions: KL(p_full || p_circuit), or the
        squared error summed over output dimensions."""
        circuit_logits = circuit_logits.float()
        if self.name == "kl":
            log_q = F.log_softmax(circuit_logits / self.temperature, dim=-1)
            return (ref.exp() * (ref - log_q)).sum(-1).mean()
        return ((circuit_logits - ref) / self.temperature).pow(2).sum(-1).mean()


def objective_of(data) -> Objective:
    """The objective a task asks for (KL at temperature 1 when it names none)."""
    meta = getattr(data, "meta", None) or {}
    try:
        return Objective(meta.get("objective", "kl"), float(meta.get("temperature", 1.0)))
    except ValueError as e:
        raise ValueError(f"task {getattr(data, 'name', '?')!r}: {e}") from None
