"""The closing lines of `fastedge prune`: what each number is.

A run shows two kinds of KL. The progress line's is the *training* KL: the
sampled (random) masks' on the last step's batch, noisy by design. The
summary's is the *extracted circuit's*: its edges fixed (kept or removed,
nothing in between), on the validation split. They answer different
questions and can differ by orders of magnitude.

The circuit's edge sparsity can also differ from the one asked for. The
extraction (`fastedge.circuit.extract_circuit`) keeps the top edges by mask,
then removes dead edges (edges whose reader reaches no kept output, or whose
writer is fed by no kept edge), and picks the threshold whose circuit after
that removal is closest to the requested count; removing one edge can take
a whole path with it, so not every count is reachable. ``circuit.info``
records what happened, and `sparsity_note` says it in words.
"""
from __future__ import annotations

from typing import Optional


def number(x: Optional[float]) -> str:
    """A metric in a precision that shows it: 4 significant digits, tiny
    values in exponent form (never ``0.0000`` for 4e-06)."""
    if x is None or x != x:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def training_line(history: list, objective: str = "kl") -> Optional[str]:
    """What the last progress line showed, named as what it is."""
    if not history or objective not in history[-1]:
        return None
    last = history[-1]
    return (f"training (last step, {int(last['step'])}): {objective.upper()} {number(last[objective])} and "
            f"edge sparsity {last['edge_sparsity']:.3f} of the sampled masks on one batch (the progress "
            f"line's numbers; noisy, not the circuit's)")


def sparsity_note(circuit) -> Optional[str]:
    """Why the circuit's edge sparsity is not the one requested (None when
    it keeps the requested number of edges, the nearest whole count, or when
    nothing was requested)."""
    info = circuit.info or {}
    n_all = circuit.graph.n_edges
    kept = circuit.n_edges
    pruned = int(info.get("n_edges_pruned") or 0)
    before = info.get("n_edges_thresholded")
    if info.get("method") == "threshold":
        why = (f"the training target was 1 or more, so the circuit is the edges whose deterministic mask "
               f"passes {info.get('threshold', 0.5):g}")
        if pruned:
            why += f" ({before} edges), less {pruned} dead edge(s) that reach no kept output or are fed by none"
        return (f"edge sparsity {circuit.edge_sparsity:.4f} is what the masks gave: {why}; "
                f"--circuit-sparsity S extracts a circuit of a chosen size instead")
    requested = info.get("target_sparsity")
    n_target = info.get("target_n_edges")
    # the requested count is the nearest whole number of edges: only a different count needs a word
    if requested is None or n_target is None or kept == n_target:
        return None
    parts = [f"edge sparsity {circuit.edge_sparsity:.4f}, not the requested {requested:g}: "
             f"{kept} edges kept against {n_target} asked (of {n_all})"]
    if pruned:
        parts.append(f"the top {before} edges by mask held {pruned} dead edge(s) (reaching no kept output, "
                     f"or fed by no kept edge), which change nothing and were removed, and no threshold gives "
                     f"a circuit closer to {n_target} after that removal")
    else:
        parts.append(f"no threshold on the masks gives exactly {n_target} edges (tied mask values, or "
                     f"dead edges that one more edge brings back to life)")
    return "; ".join(parts)
