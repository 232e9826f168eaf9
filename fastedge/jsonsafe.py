"""JSON that every reader accepts: no NaN or Infinity.

Python's `json` writes ``NaN``/``Infinity`` for non-finite floats, which
JavaScript's ``JSON.parse`` and other strict readers reject. `json_safe`
turns each into ``null``; in an object, the reason goes to a sibling key
``"<key>_note"`` (kept when the producer already wrote one, such as
`fastedge.evaluate.evaluate`'s ``faithfulness_note``). Tensors and numpy
scalars become plain numbers and lists on the way.
"""
from __future__ import annotations

import json
import math

__all__ = ["json_safe", "dumps"]


def _plain(obj):
    """Tensors and numpy scalars as Python numbers or lists."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if not isinstance(obj, (dict, list, tuple, str, bytes)) and hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return obj


def _non_finite(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def json_safe(obj):
    """A copy of `obj` with only JSON-safe values (module docstring)."""
    obj = _plain(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = str(k)
            v = _plain(v)
            if _non_finite(v):
                out[key] = None
                note = f"{key}_note"
                if note not in obj:
                    out[note] = f"not a finite number ({v})"
            else:
                out[key] = json_safe(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [None if _non_finite(_plain(v)) else json_safe(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """`json.dumps` of `json_safe(obj)`, refusing (ValueError) anything non-finite left."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
