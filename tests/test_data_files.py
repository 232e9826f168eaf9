"""--data as users keep it (issue 12): JSONL with a space before <predict>
(a GPT-2-style byte-level BPE tokenizer, built offline), CSV, parquet and
Hugging Face datasets folders with column names, row-numbered errors, and the
optional extras' messages."""
import csv
import json
import sys

import pytest

from fastedge.tasks import TaskDataError, load_jsonl
from fastedge.tasks.base import Encoder, Rejected, build_example
from fastedge.tasks.files import Columns, load_data
from fastedge.tasks.store import ExampleStore

NAMES = ["Mary", "John", "Paul", "Anna", "Lisa", "Mark"]


def _pairs(n=12):
    out = []
    for i in range(n):
        a, b, c = NAMES[i % 6], NAMES[(i + 1) % 6], NAMES[(i + 2) % 6]
        out.append((f"When {a} and {b} went to the store, {b} gave a drink to", a,
                    f"When {a} and {b} went to the store, {c} gave a drink to", b))
    return out


@pytest.fixture(scope="module")
def gpt2_style():
    """Byte-level BPE as GPT-2 has it (the space belongs to the next word's
    token: " Mary"), trained offline on the test's own sentences."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p + " " + a for p, a, x, b in _pairs()] * 5 + [" ".join(NAMES)] * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tagged(space_before_tag: bool):
    rows = []
    for i, (p, a, x, b) in enumerate(_pairs()):
        if space_before_tag:
            clean, corrupted = f"{p} <predict>{a}</predict>", f"{x} <predict>{b}</predict>"
        else:
            clean, corrupted = f"{p}<predict> {a}</predict>", f"{x}<predict> {b}</predict>"
        rows.append({"clean": clean, "corrupted": corrupted, "split": "validation" if i % 4 == 0 else "train"})
    return rows


def _fields(data):
    return [(e.clean_ids, e.corrupted_ids, e.target_positions, e.clean_answer, e.corrupted_answer, e.split)
            for e in data.examples]


# -- a space before <predict> -----------------------------------------------------------------

def test_space_before_the_tag_reads_as_the_answers_leading_space(tmp_path, gpt2_style):
    enc = Encoder(gpt2_style)
    p, a, x, b = _pairs()[0]
    with pytest.raises(Rejected, match="not a prefix"):  # the form as written does not tokenise apart
        build_example(enc, p + " ", a, x + " ", b)
    inside = load_jsonl(_jsonl(tmp_path / "inside.jsonl", _tagged(False)), gpt2_style)
    before = load_jsonl(_jsonl(tmp_path / "before.jsonl", _tagged(True)), gpt2_style)
    assert _fields(before) == _fields(inside)
    e = before.examples[0]
    assert gpt2_style.decode(e.clean_answer) == " Mary" and gpt2_style.decode(e.corrupted_answer) == " John"
    assert gpt2_style.decode(e.clean_ids[:e.target_positions[0] + 1]) == p


def test_space_before_the_tag_is_kept_where_the_tokenizer_splits_on_it(tmp_path):
    """A word-level tokenizer: the prompt's tokens are a prefix as written,
    so nothing moves (test_cli's data uses this form)."""
    from fastedge.tasks import WordTokenizer
    word = WordTokenizer()
    rows = [{"clean": "the cat sat on the <predict>mat</predict>", "corrupted": "the dog sat on the <predict>rug</predict>"}]
    e = load_jsonl(_jsonl(tmp_path / "w.jsonl", rows), word).examples[0]
    assert e.clean_answer == list(Encoder(word)("mat"))


def test_an_answer_that_merges_with_its_prompt_says_how_to_fix_the_line(tmp_path, gpt2_style):
    rows = _tagged(False)
    rows[2] = {"clean": "When Mary and John went to the store, John gave a drink to M<predict>ary</predict>",
               "corrupted": rows[2]["corrupted"]}
    path = _jsonl(tmp_path / "merge.jsonl", rows)
    with pytest.raises(TaskDataError) as info:
        load_jsonl(path, gpt2_style)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: ") and "merges with the end of the prompt" in msg
    assert "to<predict> Mary</predict>" in msg


# -- CSV ----------------------------------------------------------------------------------------

def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_reads_as_jsonl_does(tmp_path, gpt2_style):
    rows = _tagged(True)
    want = _fields(load_jsonl(_jsonl(tmp_path / "d.jsonl", rows), gpt2_style))
    path = _csv(tmp_path / "d.csv", ["id", "clean", "corrupted", "split"],
                [[i, r["clean"], r["corrupted"], r["split"]] for i, r in enumerate(rows)])
    data = load_data(path, gpt2_style)
    assert isinstance(data.examples, ExampleStore) and data.name == "d"
    assert _fields(data) == want
    assert data.examples[0].source == f"{path}:2"


def test_csv_with_named_columns_and_a_target_column(tmp_path, gpt2_style):
    tagged = load_jsonl(_jsonl(tmp_path / "d.jsonl", _tagged(False)), gpt2_style)
    rows = [[p, x, " " + a, f"{x}<predict> {b}</predict>", "validation" if i % 4 == 0 else "train"]
            for i, (p, a, x, b) in enumerate(_pairs())]
    path = _csv(tmp_path / "t.csv", ["prompt", "other", "answer", "other_tagged", "split"], rows)
    # the corrupted text tagged with its own answer: the same examples
    data = load_data(path, gpt2_style, columns=Columns(clean="prompt", corrupted="other_tagged", target="answer"))
    assert _fields(data) == _fields(tagged)
    # a corrupted prompt alone: its answer is the clean one
    same = load_data(path, gpt2_style, columns=Columns(clean="prompt", corrupted="other", target="answer"))
    for e in same.examples:
        assert e.corrupted_answer == e.clean_answer
    with pytest.raises(TaskDataError, match=r"no column 'answers'; the columns are 'prompt', 'other'"):
        load_data(path, gpt2_style, columns=Columns(clean="prompt", corrupted="other", target="answers"))


def test_csv_errors_name_the_line(tmp_path, gpt2_style):
    good = [[r["clean"], r["corrupted"], r["split"]] for r in _tagged(False)[:3]]
    header = ["clean", "corrupted", "split"]
    # two quoted fields of two lines each: the row takes lines 2 to 4, the next starts on line 5
    multi = [[good[0][0].replace("Mary and", "Mary\nand"), good[0][1].replace("Mary and", "Mary\nand"), "train"]]
    cases = [
        (good[:2] + [[good[2][0], good[2][1], "dev"]], 4, "unknown split 'dev'"),
        (good[:1] + [[good[1][0], good[1][1], "train", "extra"]], 3, "4 fields, the header has 3"),
        (good[:1] + [[good[1][0]]], 3, "1 fields, the header has 3"),
        (multi + [[good[1][0].replace("<predict>", ""), good[1][1], "train"]], 5, "exactly one <predict> tag"),
    ]
    for rows, line, what in cases:
        path = _csv(tmp_path / "bad.csv", header, rows)
        with pytest.raises(TaskDataError) as info:
            load_data(path, gpt2_style)
        assert str(info.value).startswith(f"{path}:{line}: ") and what in str(info.value), str(info.value)
    path = _csv(tmp_path / "cols.csv", ["text", "corrupted"], good)
    with pytest.raises(TaskDataError, match="no column 'clean'.*--clean-column"):
        load_data(path, gpt2_style)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TaskDataError, match="empty file"):
        load_data(tmp_path / "empty.csv", gpt2_style)


# -- parquet and datasets folders -------------------------------------------------------------

def test_parquet_reads_as_jsonl_does(tmp_path, gpt2_style):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _tagged(True)
    want = _fields(load_jsonl(_jsonl(tmp_path / "d.jsonl", rows), gpt2_style))
    table = pa.table({"clean": [r["clean"] for r in rows], "corrupted": [r["corrupted"] for r in rows],
                      "split": [r["split"] for r in rows], "other": list(range(len(rows)))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=5)
    data = load_data(tmp_path / "d.parquet", gpt2_style)
    assert _fields(data) == want
    bad = dict(table.to_pydict())
    bad["clean"][6] = None
    pq.write_table(pa.table(bad), tmp_path / "bad.parquet", row_group_size=5)
    with pytest.raises(TaskDataError, match=r"bad\.parquet:row 7: missing 'clean'"):
        load_data(tmp_path / "bad.parquet", gpt2_style)
    bad = dict(table.to_pydict())
    bad["split"][9] = "test"
    pq.write_table(pa.table(bad), tmp_path / "bad.parquet")
    with pytest.raises(TaskDataError, match=r"bad\.parquet:row 10: unknown split 'test'"):
        load_data(tmp_path / "bad.parquet", gpt2_style)


def test_datasets_folder_reads_as_jsonl_does(tmp_path, gpt2_style):
    datasets = pytest.importorskip("datasets")
    rows = _tagged(True)
    want = _fields(load_jsonl(_jsonl(tmp_path / "d.jsonl", rows), gpt2_style))
    columns = {"text": [r["clean"] for r in rows], "corrupted": [r["corrupted"] for r in rows],
               "split": [r["split"] for r in rows]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    data = load_data(tmp_path / "ds", gpt2_style, columns=Columns(clean="text"))
    assert _fields(data) == want and data.name == "ds"
    # a DatasetDict: its parts name the split
    parts = {s: datasets.Dataset.from_dict({k: [v for v, r in zip(vs, rows) if r["split"] == s]
                                            for k, vs in columns.items() if k != "split"})
             for s in ("train", "validation")}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    dd = load_data(tmp_path / "dd", gpt2_style, columns=Columns(clean="text"))
    assert sorted(_fields(dd)) == sorted(want)
    bad = dict(columns)
    bad["corrupted"] = list(bad["corrupted"])
    bad["corrupted"][4] = "no tags here"
    datasets.Dataset.from_dict(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(TaskDataError, match=r"bad:row 5: 'corrupted' must hold exactly one <predict> tag"):
        load_data(tmp_path / "bad", gpt2_style, columns=Columns(clean="text"))
    (tmp_path / "notds").mkdir()
    with pytest.raises(TaskDataError, match="not a datasets folder"):
        load_data(tmp_path / "notds", gpt2_style)


@pytest.mark.parametrize("suffix, module, extra", [(".parquet", "pyarrow", "parquet"), ("", "datasets", "datasets")])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, gpt2_style, suffix, module, extra):
    path = tmp_path / f"d{suffix}"
    if suffix:
        path.write_bytes(b"PAR1")
    else:
        path.mkdir()
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    if module == "pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=rf"pip install 'fastedge\[{extra}\]'"):
        load_data(path, gpt2_style)


# -- the command line --------------------------------------------------------------------------

def _model_folder(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel
    import torch
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=len(tokenizer), n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "tiny-bpe-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_reads_csv_with_column_flags_and_names_a_bad_row(tmp_path, capsys, gpt2_style):
    from fastedge.cli import main
    folder = _model_folder(tmp_path, gpt2_style)
    rows = [[p, x, " " + a, "validation" if i % 4 == 0 else "train"] for i, (p, a, x, b) in enumerate(_pairs())]
    path = _csv(tmp_path / "d.csv", ["prompt", "other", "answer", "split"], rows)
    out = tmp_path / "run"
    assert main(["prune", "--model", str(folder), "--data", str(path), "--clean-column", "prompt",
                 "--corrupted-column", "other", "--target-column", "answer", "--steps", "2", "--batch-size", "4",
                 "--target-sparsity", "0.5", "--out", str(out), "--no-progress"]) == 0
    assert (out / "circuit.json").exists()
    rows[5][3] = "held-out"
    _csv(path, ["prompt", "other", "answer", "split"], rows)
    capsys.readouterr()
    assert main(["prune", "--model", str(folder), "--data", str(path), "--clean-column", "prompt",
                 "--corrupted-column", "other", "--target-column", "answer", "--steps", "1",
                 "--out", str(tmp_path / "run-bad")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"fastedge: {path}:7: unknown split 'held-out'" in err


def test_cli_names_the_missing_extra(tmp_path, capsys, monkeypatch, gpt2_style):
    from fastedge.cli import main
    folder = _model_folder(tmp_path, gpt2_style)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(["prune", "--model", str(folder), "--data", str(tmp_path / "d.parquet"), "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fastedge[parquet]" in err


def test_help_shows_both_forms_and_the_column_flags():
    from fastedge.cli import build_parser
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["prune"].format_help().split())
    assert 'to<predict> X</predict>' in text and 'to <predict>X</predict>' in text
    for flag in ("--clean-column", "--corrupted-column", "--target-column"):
        assert flag in text


def test_load_task_reads_tables_and_datasets_folders_but_not_any_folder(tmp_path, monkeypatch, gpt2_style):
    from fastedge.tasks import load_task
    rows = _tagged(True)
    path = _csv(tmp_path / "d.csv", ["clean", "corrupted", "split"],
                [[r["clean"], r["corrupted"], r["split"]] for r in rows])
    want = _fields(load_jsonl(_jsonl(tmp_path / "d.jsonl", rows), gpt2_style))
    assert _fields(load_task(path, gpt2_style)) == want
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ioi").mkdir()  # a folder named like a task is not data
    from fastedge.tasks import WordTokenizer
    assert load_task("ioi", WordTokenizer(), n_examples=5).name == "ioi"
    with pytest.raises(FileNotFoundError, match="no such task file"):
        load_task(tmp_path / "missing.csv", gpt2_style)
