"""Tracr-compiled models: circuits known by construction.

Tracr compiles a RASP program into transformer weights, so which edges carry
the computation is known before any pruning. This package converts a
compiled model into a native PyTorch / Hugging Face model that
`fastedge.patch` supports, gives the program's input space as a task, and
the ground-truth circuit to judge a pruning run against:

    import fastedge, fastedge.tracr
    tm = fastedge.tracr.programs.load("reverse")       # or from_tracr(compiled)
    task = fastedge.tracr.task(tm)
    result = fastedge.prune(tm.model, task, **fastedge.tracr.PRUNE_DEFAULTS)
    truth = fastedge.tracr.ground_truth(tm)
    truth.judge(result.circuit)                        # perfect recovery?

The model itself (`TracrForCausalLM`, `TracrConfig`) needs only PyTorch and
transformers; converting and compiling need the ``tracr`` extra
(``pip install -e ".[tracr]"``: tracr-pypi and JAX).
"""
from __future__ import annotations

import importlib

from fastedge.tracr.modeling import MODEL_TYPE, TracrConfig, TracrForCausalLM, register

register()

__all__ = ["MODEL_TYPE", "TracrConfig", "TracrForCausalLM", "TracrModel", "from_tracr",
           "compile_program", "programs", "ground_truth", "GroundTruth", "task", "PRUNE_DEFAULTS",
           "tracr_available"]


def tracr_available() -> bool:
    """Whether Tracr (the ``tracr`` extra) can be imported."""
    try:
        import tracr.compiler.compiling  # noqa: F401
    except ImportError:
        return False
    return True


_LAZY = {"TracrModel": "convert", "from_tracr": "convert", "compile_program": "convert",
         "TracrConversionError": "convert", "programs": None, "ground_truth": "truth",
         "GroundTruth": "truth", "task": "tasks", "PRUNE_DEFAULTS": "tasks", "TracrTask": "tasks"}


def __getattr__(name):
    # the parts that import Tracr or the rest of fastedge load on first use
    if name not in _LAZY:
        raise AttributeError(f"module 'fastedge.tracr' has no attribute {name!r}")
    module = importlib.import_module(f"fastedge.tracr.{_LAZY[name] or name}")
    return module if _LAZY[name] is None else getattr(module, name)
