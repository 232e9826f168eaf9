"""Live tensor memory, counted op by op: works on real tensors and on fake ones.

`LiveTensorTracker` is a `TorchDispatchMode`. Every tensor an op returns is
looked at once: its *untyped storage* (shared by all views of it) is counted
by ``nbytes`` from the moment it first appears until it is freed, which a
weak reference on the storage reports (PyTorch keeps one Python object per
live storage, so the reference dies exactly when the storage does, however
many tensors, views, autograd saved tensors or checkpoint frames held it).

    from memtrack import LiveTensorTracker
    with LiveTensorTracker(model, optimizer) as t:     # those count as the baseline
        step()
    t.baseline_bytes, t.peak_bytes, t.peak_total_bytes, t.current_bytes

Figures (bytes):

* ``current_bytes``: storages created inside the context and still alive;
* ``peak_bytes``: the largest ``current_bytes`` since entry or `reset_peak`;
* ``baseline_bytes``: storages that existed before entry: the modules,
  optimizers and tensors passed to the constructor or `track_external`
  (parameters, buffers, ``.grad`` and optimizer state), plus any other
  pre-existing storage the first time an op reads it (inputs, weights not
  registered). Each counted once, and kept in the figure even if freed later;
* ``peak_total_bytes``: the largest (pre-existing storages still alive +
  ``current_bytes``) since entry or `reset_peak`; a pre-existing storage
  that is only discovered as an op input counts from then on, so register
  the model to have it counted from the start.

For a pruning step, weights, inputs and masks exist before and after, and
``peak_total_bytes == baseline_bytes + peak_bytes``.

What it sees, and what it cannot:

* every tensor produced by an op through the dispatcher, including the
  outputs of autograd's backward formulas, tensors saved for the backward
  (they are op outputs: counted while alive), recomputation under
  `torch.utils.checkpoint`, optimizer state, ``.grad``;
* custom ops (``torch.ops.fastedge.*``) by their outputs only: temporaries
  allocated *inside* an op's implementation (or its fake kernel) are not
  visible, nor are allocator rounding, fragmentation, CUDA context or kernel
  workspaces (cuBLAS, SDPA): a budget must leave headroom for those;
* storages resized in place (``resize_``, ``out=`` arguments) are re-measured
  whenever an op touches them.

Why not `torch.distributed._tools.mem_tracker.MemTracker`: in torch 2.13 it
registers a gradient hook on every parameter of every module it sees run and
fails on a frozen model ("cannot register a hook on a tensor that doesn't
require gradient"), which is what a pruning step runs; this tracker needs
nothing from modules. tests/test_bench_memory.py checks it against known
allocations, against the CPU allocator's own events (torch.profiler) on a
real step, and fake against real.

Use under `FakeTensorMode` to size a step without allocating: enter the fake
mode *first*, then the tracker (the tracker must be the innermost mode so that
it sees the fake tensors the fake mode returns). Fake storages report their
``nbytes`` like real ones. `round_to` rounds each storage up to a multiple
(e.g. 512 for the CUDA caching allocator's block size); default exact bytes.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorTracker", "storages_of"]


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def storages_of(*objects) -> list[torch.Tensor]:
    """The tensors held by modules (parameters, buffers, their .grad),
    optimizers (state tensors), tensors and nested lists / dicts of them."""
    out: list[torch.Tensor] = []
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.grad is not None:
                out.append(obj.grad)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                out.extend(storages_of(p))
            out.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                out.extend(storages_of(*group["params"]))
            for state in obj.state.values():
                out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, dict):
            out.extend(storages_of(*obj.values()))
        elif isinstance(obj, (list, tuple, set)):
            out.extend(storages_of(*obj))
    return out


class LiveTensorTracker(TorchDispatchMode):
    """Counts live tensor storages (see the module docstring)."""

    def __init__(self, *external, device: Optional[str] = None, round_to: int = 1,
                 record_peak: bool = False):
        super().__init__()
        self.record_peak = record_peak
        self.peak_snapshot: list[tuple[str, tuple, str, int]] = []  # (op, shape, dtype, bytes) at peak
        self._peak_pending = False
        self.device_type = None if device is None else torch.device(device).type
        self.round_to = max(1, int(round_to))
        self._entries: dict[int, list] = {}   # id(storage) -> [weakref, nbytes, pre_existing, origin]
        self._external = list(external)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._baseline_live = 0
        self.peak_total_bytes = 0
        self.n_storages = 0          # storages created inside, ever
        self._active = False

    # -- registration ------------------------------------------------------------------

    def track_external(self, *objects) -> None:
        """Count these modules / optimizers / tensors as pre-existing (baseline)."""
        for t in storages_of(*objects):
            self._see(t, pre_existing=True)
        self._update_peak()

    def _size(self, storage) -> int:
        n = int(storage.nbytes())
        r = self.round_to
        return -(-n // r) * r if r > 1 else n

    def _see(self, t: torch.Tensor, pre_existing: bool, op: str = "") -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # e.g. sparse or wrapper subclasses without one
            return
        key = id(storage)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is storage:
            size = self._size(storage)
            if size != entry[1]:  # resized in place
                self._add(size - entry[1], entry[2])
                entry[1] = size
            return
        size = self._size(storage)
        ref = weakref.ref(storage, lambda _r, key=key: self._freed(key, _r))
        origin = None
        if self.record_peak:
            origin = ("(before the step)" if pre_existing else op, tuple(t.shape),
                      str(t.dtype).replace("torch.", ""))
        self._entries[key] = [ref, size, pre_existing, origin]
        if pre_existing:
            self.baseline_bytes += size
        else:
            self.n_storages += 1
        self._add(size, pre_existing)

    def _add(self, size: int, pre_existing: bool) -> None:
        if pre_existing:
            self._baseline_live += size
        else:
            self.current_bytes += size

    def _freed(self, key: int, ref) -> None:
        entry = self._entries.get(key)
        if entry is None or entry[0] is not ref:
            return
        if self._peak_pending:
            self._take_snapshot()
        del self._entries[key]
        if entry[2]:
            self._baseline_live -= entry[1]
        else:
            self.current_bytes -= entry[1]

    def _update_peak(self) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        total = self.current_bytes + self._baseline_live
        if total > self.peak_total_bytes:
            self.peak_total_bytes = total
            self._peak_pending = self.record_peak

    def _take_snapshot(self) -> None:
        """The storages live at the peak (taken when memory first falls after it)."""
        self._peak_pending = False
        self.peak_snapshot = [(e[3][0], e[3][1], e[3][2], e[1]) if e[3] else ("(before the step)", (), "", e[1])
                              for e in self._entries.values() if e[0]() is not None]

    def peak_breakdown(self, top: int = 20) -> list[tuple[str, int, int]]:
        """(what, count, bytes) of the storages live at the peak, largest first
        (needs ``record_peak=True``); `what` is the op that made them and their
        shape and dtype ("(before the step)" for the baseline)."""
        if self._peak_pending:
            self._take_snapshot()
        groups: dict[str, list[int]] = {}
        for op, shape, dtype, n in self.peak_snapshot:
            key = f"{op} {list(shape)} {dtype}"
            g = groups.setdefault(key, [0, 0])
            g[0] += 1
            g[1] += n
        rows = sorted(((k, c, b) for k, (c, b) in groups.items()), key=lambda r: -r[2])
        return rows[:top]

    def remeasure(self, *tensors) -> None:
        """Count these tensors' storages again after a resize that no op
        made (``untyped_storage().resize_``, as FSDP2 frees and re-allocates
        an unsharded parameter); an unseen storage counts as pre-existing."""
        for t in tensors:
            self._see(t, pre_existing=True)
        self._update_peak()

    def reset_peak(self) -> None:
        """Start the peaks again from the memory live now."""
        self.peak_bytes = self.current_bytes
        self.peak_total_bytes = self.current_bytes + self._baseline_live

    @property
    def live_total_bytes(self) -> int:
        return self.current_bytes + self._baseline_live

    # -- the mode ------------------------------------------------------------------------

    def __enter__(self):
        self.track_external(*self._external)
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        for t in flat_in:
            if _is_tensor(t):
                self._see(t, pre_existing=True)  # no-op (or a resize check) if already known
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        name = func.__name__ if self.record_peak else ""
        for t in flat_out:
            if _is_tensor(t):
                self._see(t, pre_existing=False, op=name)
        # in-place ops and out= arguments may have resized an input's storage
        for t in flat_in:
            if _is_tensor(t):
                self._see(t, pre_existing=True)
        self._update_peak()
        return out

    def summary(self, unit: float = 2 ** 30) -> str:
        return (f"baseline {self.baseline_bytes / unit:.3f}, peak {self.peak_bytes / unit:.3f}, "
                f"peak total {self.peak_total_bytes / unit:.3f}, live {self.current_bytes / unit:.3f} "
                f"(GiB)")
