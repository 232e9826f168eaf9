"""Task data from files: JSONL, CSV, parquet, and Hugging Face ``datasets``
folders (``Dataset.save_to_disk``), read one row at a time into an
`ExampleStore` (no list of all the rows or examples is built).

Every format has the same columns (JSONL: keys), named by
`Columns` (the CLI's ``--clean-column``, ``--corrupted-column``,
``--target-column``):

* ``clean`` and ``corrupted``: the texts. By default each holds its answer
  between tags, ``"... to<predict> Mary</predict>"`` (the JSONL convention of
  `fastedge.tasks.base`). A space before the tag, ``"... to <predict>Mary</predict>"``,
  is accepted too: when the prompt's tokens are not a prefix of the full
  text's (GPT-2-style tokenizers put the space in the next word's token), the
  prompt's trailing whitespace moves into the answer, which makes it
  ``" Mary"``, the token the model predicts.
* ``target`` (only when a target column is named): the clean answer in a
  column of its own; the clean text is then the prompt alone. The corrupted
  text is a prompt alone too (its answer is then the same text) or holds its
  own tagged answer.
* ``split`` (optional): "train" or "validation"; missing (null, or a
  table's empty cell) means train (or `validation_flags` with
  ``validation_fraction``).
* JSONL only: ``meta`` (an object, kept in `Example.meta`); a JSONL line with
  any other key is refused. Tables may hold other columns; they are not read.

A bad row stops the load with a `TaskDataError` that names it: ``path:line``
for JSONL and CSV (the line the row starts on; the CSV header is line 1),
``path:row N`` (from 1) for parquet and datasets folders.

``pyarrow`` (parquet; the ``parquet`` extra) and ``datasets`` (the
``datasets`` extra) are optional: without them the error names the extra to
install. CSV uses the standard library.
"""
from __future__ import annotations

import csv
import json
import os
from array import array
from dataclasses import dataclass
from typing import Iterator, Optional

from fastedge.tasks.base import (PREDICT_CLOSE, PREDICT_OPEN, SPLITS, Encoder, Rejected, TaskData,
                                 TaskDataError, build_example, validation_flags)
from fastedge.tasks.store import ExampleStore

FORMATS = ("jsonl", "csv", "parquet", "datasets")


@dataclass(frozen=True)
class Columns:
    """Which column (JSONL key) holds what (module docstring)."""
    clean: str = "clean"
    corrupted: str = "corrupted"
    target: Optional[str] = None
    split: str = "split"

    def names(self) -> list[str]:
        return [c for c in (self.clean, self.corrupted, self.target, self.split) if c is not None]


def detect_format(path) -> str:
    """``datasets`` for a folder, else by the file's extension (``.csv``,
    ``.parquet`` / ``.pq``); anything else is read as JSONL."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "datasets"
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(ext, "jsonl")


def load_data(path, tokenizer, *, columns: Columns = Columns(), name: Optional[str] = None,
              prepend_bos: bool = False, validation_fraction: Optional[float] = None,
              format: Optional[str] = None) -> TaskData:
    """Read a task from a JSONL, CSV or parquet file or a ``datasets``
    folder (module docstring); `format` overrides `detect_format`."""
    path = os.fspath(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; the formats are {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data {'folder' if fmt == 'datasets' else 'file'}: {path}")
    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows,
            "datasets": _datasets_rows}[fmt](path, columns)
    enc = Encoder(tokenizer, prepend_bos=prepend_bos)
    store = ExampleStore()
    unsplit = array("q")
    for where, row in rows:
        ex, given = _row_example(enc, row, where, columns, "meta" if fmt == "jsonl" else None)
        if not given:
            unsplit.append(len(store))
        store.append(ex)
    if not len(store):
        raise TaskDataError(f"{path}: no examples")
    if validation_fraction is not None:
        for i, flag in zip(unsplit, validation_flags(len(unsplit), validation_fraction)):
            if flag:
                store.set_split(i, "validation")
    if name is None:
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return TaskData(name, store, {"path": path, "prepend_bos": prepend_bos, "format": fmt})


# -- one row -----------------------------------------------------------------------------

def parse_tagged(text: str, where: str, key: str) -> tuple[str, str]:
    """(prompt, answer) of ``"prompt<predict>answer</predict>"``."""
    for tag in (PREDICT_OPEN, PREDICT_CLOSE):
        if text.count(tag) != 1:
            raise TaskDataError(f"{where}: {key!r} must hold exactly one {tag} tag, found {text.count(tag)}")
    prompt, rest = text.split(PREDICT_OPEN)
    if PREDICT_CLOSE not in rest:
        raise TaskDataError(f"{where}: {key!r}: {PREDICT_CLOSE} comes before {PREDICT_OPEN}")
    answer, after = rest.split(PREDICT_CLOSE)
    if after != "":
        raise TaskDataError(f"{where}: {key!r}: text after {PREDICT_CLOSE} ({after[:40]!r}); "
                            f"the answer must end the text")
    if prompt == "":
        raise TaskDataError(f"{where}: {key!r}: empty prompt before {PREDICT_OPEN}")
    if answer == "":
        raise TaskDataError(f"{where}: {key!r}: empty answer inside {PREDICT_OPEN}...{PREDICT_CLOSE}")
    return prompt, answer


def space_into_answer(enc: Encoder, prompt: str, answer: str) -> tuple[str, str]:
    """``"to "``, ``"Mary"`` becomes ``"to"``, ``" Mary"`` when the prompt's
    tokens are not a prefix of the full text's and moving its trailing
    whitespace into the answer makes them one (GPT-2-style byte-level BPE,
    SentencePiece); otherwise the pair is returned unchanged."""
    stripped = prompt.rstrip()
    if stripped == prompt or not stripped:
        return prompt, answer
    p, full = enc(prompt), enc(prompt + answer)
    if full[:len(p)] == p:
        return prompt, answer
    return stripped, prompt[len(stripped):] + answer


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise TaskDataError(f"{where}: missing {key!r}" + ("" if key in row else f" (the row has: "
                                                            f"{', '.join(map(str, row)) or 'nothing'})"))
    value = row[key]
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _row_example(enc: Encoder, row: dict, where: str, columns: Columns, meta_key: Optional[str] = None):
    """(the row's Example, whether its split was given); `meta_key`: the
    key of an object kept as `Example.meta` (JSONL's "meta")."""
    clean, corrupted = _text(row, columns.clean, where), _text(row, columns.corrupted, where)
    split = row.get(columns.split)
    if split == "" and meta_key is None:  # an empty cell of a table; JSONL says null or leaves the key out
        split = None
    if split is not None and split not in SPLITS:
        raise TaskDataError(f"{where}: unknown split {split!r}; use one of {list(SPLITS)}")
    meta = row.get(meta_key) if meta_key is not None else None
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TaskDataError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
    if columns.target is None:
        c_prompt, c_answer = parse_tagged(clean, where, columns.clean)
        x_prompt, x_answer = parse_tagged(corrupted, where, columns.corrupted)
    else:
        c_answer = _text(row, columns.target, where)
        if c_answer == "":
            raise TaskDataError(f"{where}: empty answer in {columns.target!r}")
        for key, text in ((columns.clean, clean), (columns.corrupted, corrupted)):
            if key == columns.clean and (PREDICT_OPEN in text or PREDICT_CLOSE in text):
                raise TaskDataError(f"{where}: {key!r} holds a {PREDICT_OPEN} tag, but the answer comes from "
                                    f"{columns.target!r}; remove the tags, or drop the target column")
            if text == "":
                raise TaskDataError(f"{where}: empty {key!r}")
        c_prompt = clean
        if PREDICT_OPEN in corrupted or PREDICT_CLOSE in corrupted:
            x_prompt, x_answer = parse_tagged(corrupted, where, columns.corrupted)
        else:
            x_prompt, x_answer = corrupted, c_answer
    c_prompt, c_answer = space_into_answer(enc, c_prompt, c_answer)
    x_prompt, x_answer = space_into_answer(enc, x_prompt, x_answer)
    try:
        ex = build_example(enc, c_prompt, c_answer, x_prompt, x_answer, split=split or "train",
                           source=where, meta=meta)
    except Rejected as r:
        hint = (f"; write the answer's leading space inside the tag ('to{PREDICT_OPEN} Mary{PREDICT_CLOSE}') "
                f"or check that the answer starts a new token" if r.reason == "prompt_not_prefix" else "")
        raise TaskDataError(f"{where}: {r.detail}{hint}") from None
    return ex, split is not None


# -- rows of each format ---------------------------------------------------------------------

def _jsonl_rows(path: str, columns: Columns) -> Iterator[tuple[str, dict]]:
    allowed = set(columns.names()) | {"meta"}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskDataError(f"{where}: a line must be a JSON object, got {type(obj).__name__}")
            for key in (columns.clean, columns.corrupted):
                if key not in obj:
                    raise TaskDataError(f"{where}: missing key {key!r}")
            unknown = sorted(set(obj) - allowed)
            if unknown:
                raise TaskDataError(f"{where}: unknown key(s) {unknown}; allowed: "
                                    f"{[k for k in (*columns.names(), 'meta')]}")
            yield where, obj


def _csv_rows(path: str, columns: Columns) -> Iterator[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
        except UnicodeDecodeError:
            raise TaskDataError(f"{path}:1: not UTF-8; save the file as UTF-8") from None
        except csv.Error as e:
            raise TaskDataError(f"{path}:1: not a CSV header ({e})") from None
        if header is None:
            raise TaskDataError(f"{path}: empty file (a CSV file needs a header line)")
        _check_header(path, header, columns)
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise TaskDataError(f"{path}:{start}: not UTF-8; save the file as UTF-8") from None
            except csv.Error as e:
                raise TaskDataError(f"{path}:{start}: malformed CSV ({e})") from None
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in row:  # more fields than the header names
                raise TaskDataError(f"{where}: {len(header) + len(row[None])} fields, the header has {len(header)}")
            if any(v is None for v in row.values()):
                raise TaskDataError(f"{where}: {sum(v is not None for v in row.values())} fields, "
                                    f"the header has {len(header)}")
            if not any(row.values()):
                continue  # a blank line
            yield where, row


def _check_header(path: str, header, columns: Columns) -> None:
    need = [c for c in (columns.clean, columns.corrupted, columns.target) if c is not None]
    missing = [c for c in need if c not in header]
    if missing:
        raise TaskDataError(f"{path}: no column {', '.join(map(repr, missing))}; the columns are "
                            f"{', '.join(map(repr, header))} (name them with --clean-column, "
                            f"--corrupted-column, --target-column)")


def _parquet_rows(path: str, columns: Columns) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow: pip install 'fastedge[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow reports a bad file in several ways
        raise TaskDataError(f"{path}: not a parquet file ({' '.join(str(e).split())[:120]})") from None
    header = pf.schema_arrow.names
    _check_header(path, header, columns)
    read = [c for c in columns.names() if c in header]
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=read):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


def _datasets_rows(path: str, columns: Columns) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path}: reading a Hugging Face datasets folder needs datasets: "
                          f"pip install 'fastedge[datasets]'") from None
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - not a folder written by save_to_disk
        raise TaskDataError(f"{path}: not a datasets folder written by save_to_disk "
                            f"({' '.join(str(e).split())[:160]})") from None
    if isinstance(loaded, datasets.DatasetDict):  # its splits name the examples' split
        unknown = [k for k in loaded if k not in SPLITS]
        if unknown:
            raise TaskDataError(f"{path}: split(s) {unknown} of this DatasetDict are not {list(SPLITS)}; "
                                f"save only those, or one Dataset with a split column")
        parts = [(f"{path}[{k}]", loaded[k], k) for k in loaded]
    else:
        parts = [(path, loaded, None)]
    for label, ds, split in parts:
        _check_header(label, ds.column_names, columns)
        read = [c for c in columns.names() if c in ds.column_names]
        n = 0
        for batch in ds.select_columns(read).iter(batch_size=1024):
            for i in range(len(batch[read[0]])):
                n += 1
                row = {c: batch[c][i] for c in read}
                if split is not None:
                    if row.get(columns.split) not in (None, "", split):
                        raise TaskDataError(f"{label}:row {n}: split {row[columns.split]!r} in the "
                                            f"{split!r} part of the DatasetDict")
                    row[columns.split] = split
                yield f"{label}:row {n}", row
