"""Tasks for Edge Pruning: clean and corrupted inputs of the same shape and the
positions whose next-token distributions are scored (docs/CONCEPTS.md section 3).

Built-in tasks (``get_task(name, tokenizer, **options)``)::

    ioi                indirect object identification          (fastedge.tasks.ioi)
    greater-than       year ranges, "from 1732 to 17" -> > 32    (fastedge.tasks.greater_than)
    gendered-pronoun   "So Mary is such a good friend, isn't" -> " she"
    boolean-instruct   boolean expressions, instruction prompt (fastedge.tasks.boolean_expressions)
    boolean-fewshot    boolean expressions, few-shot prompt
    induction          repeated random token sequences, token level (fastedge.tasks.induction)

Each text task generates text, tokenises it with any tokenizer (an object with
``encode(text) -> list[int]``), and keeps only the examples that fit it: clean
and corrupted of equal token length, answers single tokens where the task
needs that. It is deterministic in ``seed`` for a given tokenizer, and fails
(`TaskDataError`, saying why) when fewer than ``n_examples`` fit. Every fifth
example is in the validation split by default (``validation_fraction=0.2``).

Custom data: `load_jsonl` (the format is in `fastedge.tasks.base`),
`load_data` for JSONL, CSV, parquet and Hugging Face ``datasets`` folders
with named columns (`fastedge.tasks.files`), or ``load_task(path,
tokenizer)``.

Generated and loaded tasks keep their examples in an `ExampleStore`
(`fastedge.tasks.store`: flat arrays, 0.3 KB a 24-token induction example
against 2.9 KB as `Example` objects; examples are built on access), so that
``n_examples=100_000`` costs tens of megabytes rather than hundreds.
"""
from __future__ import annotations

import os
from typing import Callable

from fastedge.tasks.base import (Batch, Example, TaskData, TaskDataError, collate, encode, load_jsonl,
                                 save_jsonl, validation_flags)
from fastedge.tasks.files import Columns, load_data
from fastedge.tasks.store import ExampleStore
from fastedge.tasks.boolean_expressions import (evaluate_boolean_expression, make_boolean_expressions,
                                                make_boolean_fewshot, make_boolean_instruct)
from fastedge.tasks.gendered_pronoun import make_gendered_pronoun
from fastedge.tasks.greater_than import greater_than_answers, make_greater_than
from fastedge.tasks.induction import induction_task, make_induction
from fastedge.tasks.ioi import make_ioi
from fastedge.tasks.tokenizers import CharTokenizer, WordTokenizer

# name -> f(tokenizer, n_examples=..., seed=..., validation_fraction=..., **options) -> TaskData
TASKS: dict[str, Callable[..., TaskData]] = {
    "ioi": make_ioi,
    "greater-than": make_greater_than,
    "gendered-pronoun": make_gendered_pronoun,
    "boolean-instruct": make_boolean_instruct,
    "boolean-fewshot": make_boolean_fewshot,
    "induction": induction_task,
}


def get_task(name: str, tokenizer=None, **kw) -> TaskData:
    """Generate the built-in task ``name`` (see `TASKS`) with ``tokenizer``;
    ``kw`` go to its ``make_*`` function (``n_examples``, ``seed``,
    ``validation_fraction`` and task options)."""
    key = name.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(sorted(TASKS))} "
                         f"(or a path to a .jsonl file, with load_task)")
    if tokenizer is None and key != "induction":
        raise ValueError(f"task {key!r} needs a tokenizer")
    return TASKS[key](tokenizer, **kw)


def _is_datasets_folder(path: str) -> bool:
    """A folder written by ``datasets``' save_to_disk (not any folder that
    happens to share a task's name)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def load_task(name_or_path, tokenizer=None, **kw) -> TaskData:
    """A built-in task by name, or data from a file (a path ending in
    ``.jsonl``, ``.csv``, ``.parquet``, any existing file, or a ``datasets``
    folder) with `load_data` (JSONL unless the extension or the folder says
    otherwise)."""
    s = os.fspath(name_or_path)
    if s.endswith((".jsonl", ".csv", ".parquet")) or os.path.isfile(s) or _is_datasets_folder(s):
        if not os.path.exists(s):
            raise FileNotFoundError(f"no such task file: {s}")
        if tokenizer is None:
            raise ValueError(f"{s}: a task from a file needs a tokenizer")
        return load_data(s, tokenizer, **kw)
    return get_task(s, tokenizer, **kw)


__all__ = ["TASKS", "get_task", "load_task", "Example", "Batch", "TaskData", "TaskDataError", "collate",
           "load_jsonl", "load_data", "Columns", "ExampleStore", "save_jsonl", "encode", "validation_flags", "make_ioi", "make_greater_than",
           "greater_than_answers", "make_gendered_pronoun", "make_boolean_expressions", "make_boolean_instruct",
           "make_boolean_fewshot", "evaluate_boolean_expression", "make_induction", "induction_task",
           "CharTokenizer", "WordTokenizer"]
