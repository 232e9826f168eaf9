"""Progress of a pruning run on stderr.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (CI, a log file,
a pipe), a redrawn bar becomes one or two lines per step (2,000 lines for
the shipped model's default run), so there the run prints one plain line
every `every` steps and at the last step instead.

Both show the *training* numbers of the step just done: its loss and the KL
of the sampled masks on that step's batch. They are noisy and are not the
extracted circuit's KL, which the run reports at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from fastedge.run_summary import number

# plain lines per run when stderr is not a terminal (plus the last step's)
LINES_PER_RUN = 20


def default_every(total: int) -> int:
    """Steps between plain lines: about `LINES_PER_RUN` lines a run."""
    return max(1, -(-total // LINES_PER_RUN))


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


class _Bar:
    """tqdm's bar (a terminal)."""

    def __init__(self, total: int, start: int, stream):
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total, initial=start, desc="pruning", unit="step", dynamic_ncols=True,
                         file=stream)

    def update(self, record: dict) -> None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", train_kl=number(record["kl"]),
                              sparsity=f"{record['edge_sparsity']:.3f}", target=f"{record['target']:.3f}")

    def close(self) -> None:
        self._bar.close()


class _Lines:
    """One line every `every` steps and at the last step (not a terminal)."""

    def __init__(self, total: int, start: int, stream, every: int, clock=time.monotonic):
        self.total, self.every, self.stream, self.clock = total, every, stream, clock
        self.started = clock()
        self.first = start

    def update(self, record: dict) -> None:
        step = int(record["step"])
        if step % self.every and step != self.total:
            return
        done = step - self.first
        elapsed = self.clock() - self.started
        rate = f", {elapsed / done:.2f} s/step" if done > 0 else ""
        # the training KL is the sampled masks' on this step's batch (module docstring)
        print(f"pruning: step {step}/{self.total} ({100 * step // self.total}%{rate}) "
              f"loss {record['loss']:.4f}, training KL {number(record['kl'])}, "
              f"edge sparsity {record['edge_sparsity']:.3f} (target {record['target']:.3f})",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


def make_progress(total: int, start: int = 0, *, enabled: bool = True, stream: Optional[TextIO] = None,
                  every: Optional[int] = None):
    """The run's progress reporter, or None when `enabled` is false. It has
    ``update(record)`` (a `log.jsonl` record: step, loss, kl, edge_sparsity,
    target) and ``close()``. `stream` defaults to stderr; `every` to
    `default_every(total)` (plain lines only)."""
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        return _Bar(total, start, stream)
    return _Lines(total, start, stream, every if every is not None else default_every(total))
