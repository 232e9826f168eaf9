"""Tensors whose element offsets pass 2**31, over sparse files.

A file made with `truncate` has no blocks until something is written to it,
and `torch.from_file(shared=True)` maps it without reading it. A [rows, cols]
view with a row stride of 2**30 elements or more then reaches past element
2**31 while touching only the pages of its own rows: a few kilobytes of disk
and memory for a "16 GB" tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch


def sparse_tensor(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of `numel` zeros mapped from a new sparse file at `path`."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


def strided_rows(path: Path, rows: int, cols: int, row_stride: int, dtype: torch.dtype,
                 values: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] view, rows `row_stride` elements apart, over a sparse file,
    holding `values` (written row by row: only those pages are touched)."""
    assert values.shape == (rows, cols) and row_stride >= cols
    flat = sparse_tensor(path, (rows - 1) * row_stride + cols, dtype)
    view = flat.as_strided((rows, cols), (row_stride, 1))
    view.copy_(values.to(dtype))
    return view


def last_offset(view: torch.Tensor) -> int:
    """The largest element offset the view reaches from its first element."""
    return sum((n - 1) * s for n, s in zip(view.shape, view.stride()))
