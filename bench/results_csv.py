"""Benchmark rows under bench/results/, shared by the benchmarks: where a row
came from (`git_revision`, from `bench/revision.py`; `device_name`) and
appending rows to a CSV.

A file written before a benchmark gained columns is rewritten (through a
temporary file, then renamed) with the union of both headers: the
benchmark's `columns` first, in their order, then the file's other columns.
Every old row keeps its values and gets empty cells in the new columns; a
file whose header already matches is appended to.
"""
from __future__ import annotations

import csv
import os
import platform
import re
import sys
from pathlib import Path
from typing import Callable, Optional

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from revision import git_revision  # noqa: E402,F401  (re-exported: every benchmark records this)


def device_name(device) -> str:
    """The GPU's name, or the CPU model with its logical CPUs and torch threads."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if found:
            model = found.group(1).strip()
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def cpu_slug(device: str) -> str:
    """A file-name slug of a CPU `device_name`: "cpu-" and the first two words
    of its model ("cpu-amd-epyc")."""
    return "cpu-" + "-".join(device.split()[:2]).lower().replace("(", "").replace(")", "")


def significant(digits: int) -> Callable[[object], str]:
    """A cell formatter: floats to `digits` significant digits, None empty."""
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return _plain(value)
    return fmt


def _plain(value) -> str:
    return "" if value is None else str(value)


def append_csv(path: Path, rows: list[dict], columns: list[str],
               fmt: Optional[Callable[[object], str]] = None) -> None:
    """Append `rows` (dicts; keys outside `columns` are dropped) to `path`,
    each value written through `fmt` (default: str, None as empty)."""
    fmt = fmt or _plain
    path.parent.mkdir(parents=True, exist_ok=True)
    new = [{c: fmt(r.get(c)) for c in columns} for r in rows]
    if not path.exists() or not path.stat().st_size:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(new)
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        old = None if header == columns else list(reader)
    if old is None:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, columns).writerows(new)
        return
    merged = columns + [c for c in header if c not in columns]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, merged, restval="")
        w.writeheader()
        w.writerows(old)
        w.writerows(new)
    tmp.replace(path)
