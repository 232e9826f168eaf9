"""Task data: the built-in tasks with several tokenizers, the JSONL format and
its error messages, and batching."""
import json
import random
import re

import pytest
import torch

from fastedge.tasks import (TASKS, Batch, CharTokenizer, Example, TaskData, TaskDataError, WordTokenizer, collate,
                            encode, evaluate_boolean_expression, get_task, greater_than_answers, load_jsonl,
                            load_task, make_induction, save_jsonl, validation_flags)
from fastedge.tasks.base import IGNORE_INDEX
from fastedge.tasks.boolean_expressions import random_expression
from fastedge.tasks.gendered_pronoun import FEMALE_NAMES, MALE_NAMES

TEXT_TASKS = ["ioi", "greater-than", "gendered-pronoun", "boolean-instruct", "boolean-fewshot"]
N = 60


# -- tokenizers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def word():
    return WordTokenizer()


@pytest.fixture(scope="module")
def char():
    return CharTokenizer()


@pytest.fixture(scope="module")
def bpe(word):
    """A byte-level BPE tokenizer (Hugging Face `PreTrainedTokenizerFast`)
    trained offline on the tasks' own texts, with digit pairs split off (as
    GPT-2's vocabulary in effect does for most years)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    texts = []
    for name in TEXT_TASKS:
        for e in get_task(name, word, n_examples=150, seed=99).examples:
            m = e.meta
            texts += [m["clean_prompt"] + m["clean_answer_text"], m["corrupted_prompt"] + m["corrupted_answer_text"]]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(params=["word", "char", "bpe"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def test_char_tokenizer(char):
    assert char.vocab_size == len(char) == 101
    text = "When Mary and John went\tto the store,\n(1732) ~"
    ids = char.encode(text)
    assert len(ids) == len(text) and char.decode(ids) == text
    assert char.encode("é") == [char.unk_token_id]
    assert char.encode("ab", add_special_tokens=True)[0] == char.bos_token_id
    assert char.pad_token_id == 0 and min(char.encode(text)) >= 4
    assert char.decode([0, 1] + char.encode("x"), skip_special_tokens=True) == "x"


def test_word_tokenizer(word, tmp_path):
    text = "When Mary and John went to the store, John gave a drink to Mary"
    ids = word.encode(text)
    assert word.decode(ids) == text
    assert len(ids) == 15  # one token per word, and one for ","
    # numbers split into digit pairs from the left, so a year's end is one token
    assert word.convert_ids_to_tokens(word.encode(" 1732")) == [" 17", "32"]
    assert word.convert_ids_to_tokens(word.encode(" 170")) == [" 17", "0"]
    # unknown words fall back to characters, losslessly for ASCII
    odd = "Zyxwv qq\n  {x}~ 12345"
    assert word.decode(word.encode(odd)) == odd
    assert word.encode("ü") == [word.unk_token_id]
    assert len(word.encode(" Mary")) == 1 and len(word.encode(" she")) == 1 and len(word.encode(" True")) == 1
    # fixed ids: the same vocabulary every time, and save/load keeps it
    assert WordTokenizer().get_vocab() == word.get_vocab()
    word.save(tmp_path / "v.json")
    again = WordTokenizer.load(tmp_path / "v.json")
    assert again.get_vocab() == word.get_vocab() and again.encode(odd) == word.encode(odd)
    small = WordTokenizer.from_texts(["hello world"])
    assert small.convert_ids_to_tokens(small.encode("hello world")) == ["hello", " world"]


def test_encode_helper_any_tokenizer():
    class Plain:  # no add_special_tokens keyword
        def encode(self, text):
            return [ord(c) for c in text]

    class AddsBos:
        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    assert encode(Plain(), "ab") == [97, 98]
    assert encode(AddsBos(), "ab") == [97, 98]
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    assert encode(raw, "a b c") == [0, 1, 2]  # a tokenizers.Encoding result


# -- built-in tasks -----------------------------------------------------------------------

def check_task(data: TaskData, n: int, tokenizer=None, validation_fraction=0.2):
    assert isinstance(data, TaskData) and len(data) == n
    for e in data.examples:
        L = len(e.clean_ids)
        assert len(e.corrupted_ids) == L
        assert e.target_positions and all(0 <= p < L - 1 for p in e.target_positions)
        assert e.target_positions == list(range(e.target_positions[0], e.target_positions[-1] + 1))
        assert e.clean_answer == [e.clean_ids[p + 1] for p in e.target_positions]
        assert e.corrupted_answer == [e.corrupted_ids[p + 1] for p in e.target_positions]
        assert e.target_positions[-1] == L - 2  # the answer ends the sequence
        assert e.clean_ids != e.corrupted_ids
        if tokenizer is not None and "clean_prompt" in e.meta:
            m = e.meta
            p0 = e.target_positions[0] + 1
            assert e.clean_ids[:p0] == encode(tokenizer, m["clean_prompt"])
            assert e.corrupted_ids[:p0] == encode(tokenizer, m["corrupted_prompt"])
            assert e.clean_ids == encode(tokenizer, m["clean_prompt"] + m["clean_answer_text"])
            assert e.corrupted_ids == encode(tokenizer, m["corrupted_prompt"] + m["corrupted_answer_text"])
    n_val = sum(validation_flags(n, validation_fraction))
    assert len(data.split("validation")) == n_val
    assert len(data.split("train")) == n - n_val


def test_validation_flags():
    assert [i for i, f in enumerate(validation_flags(20, 0.2)) if f] == [4, 9, 14, 19]
    assert sum(validation_flags(100, 0.3)) == 30 and sum(validation_flags(7, 0)) == 0
    assert all(validation_flags(5, 1.0))
    assert validation_flags(50, 0.29)[:20] == validation_flags(20, 0.29)  # prefix-stable
    with pytest.raises(ValueError):
        validation_flags(3, 1.5)


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_task_with_tokenizer(name, tokenizer, request):
    is_char = isinstance(tokenizer, CharTokenizer)
    if is_char and name in ("gendered-pronoun", "boolean-instruct", "boolean-fewshot"):
        # " she"/" he" and " True"/" False" differ in characters: impossible, and said so
        with pytest.raises(TaskDataError, match="same length"):
            get_task(name, tokenizer, n_examples=N, seed=0)
        return
    kw = {"single_token_answers": False} if is_char else {}
    data = get_task(name, tokenizer, n_examples=N, seed=0, **kw)
    assert data.name == name
    check_task(data, N, tokenizer)
    if not is_char:
        assert all(len(e.target_positions) == 1 for e in data.examples)


def test_char_tokenizer_single_token_answers_fail_clearly(char):
    with pytest.raises(TaskDataError, match="single_token_answers=False"):
        get_task("ioi", char, n_examples=10)
    with pytest.raises(TaskDataError, match=r"only 0 of the 10 .*multi_token_answer"):
        get_task("greater-than", char, n_examples=10)


@pytest.mark.parametrize("name", TEXT_TASKS + ["induction"])
def test_seed_reproducibility(name, word):
    a = get_task(name, word, n_examples=30, seed=5)
    b = get_task(name, word, n_examples=30, seed=5)
    c = get_task(name, word, n_examples=30, seed=6)
    key = lambda d: [(e.clean_ids, e.corrupted_ids, e.target_positions, e.split) for e in d.examples]
    assert key(a) == key(b)
    assert key(a) != key(c)


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_validation_fraction(name, word):
    d = get_task(name, word, n_examples=40, seed=1, validation_fraction=0.5)
    check_task(d, 40, word, validation_fraction=0.5)
    assert len(get_task(name, word, n_examples=10, seed=1, validation_fraction=0.0).split("validation")) == 0


def test_ioi_semantics(word):
    d = get_task("ioi", word, n_examples=100, seed=3)
    orders = set()
    for e in d.examples:
        m = e.meta
        io, s, c = m["io"], m["s"], m["c"]
        orders.add(m["order"])
        assert len({io, s, c}) == 3
        cp, xp = m["clean_prompt"], m["corrupted_prompt"]
        words = re.findall(r"[A-Za-z]+", cp)
        assert words.count(io) == 1 and words.count(s) == 2
        xwords = re.findall(r"[A-Za-z]+", xp)
        assert xwords.count(io) == 1 and xwords.count(s) == 1 and xwords.count(c) == 1
        assert cp.index(io) < cp.index(s) if m["order"] == "ABBA" else cp.index(s) < cp.index(io)
        assert word.decode(e.clean_answer) == " " + io and word.decode(e.corrupted_answer) == " " + s
        # only the second mention of the subject differs
        diff = [i for i, (a, b) in enumerate(zip(e.clean_ids, e.corrupted_ids)) if a != b]
        assert len(diff) == 2 and diff[1] == len(e.clean_ids) - 1
    assert orders == {"ABBA", "BABA"}
    assert len({e.meta["template"] for e in d.examples}) >= 10


def test_greater_than_semantics(word):
    d = get_task("greater-than", word, n_examples=100, seed=3)
    for e in d.examples:
        m = e.meta
        yy, end, century = m["start_yy"], m["answer_yy"], m["century"]
        assert 2 <= yy < end <= 99
        assert f"{century}{yy:02d}" in m["clean_prompt"] and m["clean_prompt"].endswith(str(century))
        assert f"{century}01" in m["corrupted_prompt"] and m["corrupted_prompt"].endswith(str(century))
        assert word.decode(e.clean_answer) == f"{end:02d}" and word.decode(e.corrupted_answer) == "01"
        assert len(m["greater_ids"]) == 99 - yy and len(m["lesser_ids"]) == yy + 1
        assert e.clean_answer[0] in m["greater_ids"] and e.corrupted_answer[0] in m["lesser_ids"]
        assert not set(m["greater_ids"]) & set(m["lesser_ids"])
    table = greater_than_answers(word, 17)
    assert sorted(table) == list(range(100)) and all(len(v) == 1 for v in table.values())


def test_gendered_pronoun_semantics(word):
    d = get_task("gendered-pronoun", word, n_examples=100, seed=3)
    genders = set()
    for e in d.examples:
        m = e.meta
        genders.add(m["gender"])
        female = m["gender"] == "female"
        assert m["name"] in (FEMALE_NAMES if female else MALE_NAMES)
        assert m["corrupted_name"] in (MALE_NAMES if female else FEMALE_NAMES)
        assert word.decode(e.clean_answer) == (" she" if female else " he")
        assert word.decode(e.corrupted_answer) == (" he" if female else " she")
        assert m["clean_prompt"].replace(m["name"], m["corrupted_name"]) == m["corrupted_prompt"]
    assert genders == {"female", "male"}


def test_boolean_evaluator_matches_python():
    rng = random.Random(0)
    for _ in range(300):
        text, value = random_expression(rng, rng.randint(1, 6), not_probability=0.4, paren_probability=0.3)
        assert evaluate_boolean_expression(text) is value
        assert eval(text, {"__builtins__": {}}) is value  # generated text only: True/False/not/and/or/()
    assert evaluate_boolean_expression("not ( True and False ) or False") is True
    assert evaluate_boolean_expression("not True and False or True") is True
    with pytest.raises(ValueError):
        evaluate_boolean_expression("True and")


@pytest.mark.parametrize("name", ["boolean-instruct", "boolean-fewshot"])
def test_boolean_semantics(name, word):
    d = get_task(name, word, n_examples=100, seed=3)
    values = set()
    for e in d.examples:
        m = e.meta
        values.add(m["value"])
        assert evaluate_boolean_expression(m["expression"]) is m["value"]
        assert evaluate_boolean_expression(m["corrupted_expression"]) is (not m["value"])
        assert word.decode(e.clean_answer) == f" {m['value']}"
        assert word.decode(e.corrupted_answer) == f" {not m['value']}"
        assert m["clean_prompt"].endswith(f"Expression: {m['expression']}\nAnswer:")
        if name == "boolean-instruct":
            assert m["clean_prompt"].startswith("Evaluate the boolean expression")
        else:
            assert len(m["shots"]) == 3
            for expr, value in m["shots"]:
                assert evaluate_boolean_expression(expr) is value
                assert f"Expression: {expr}\nAnswer: {value}\n\n" in m["corrupted_prompt"]
    assert values == {True, False}
    d5 = get_task("boolean-fewshot", word, n_examples=5, seed=0, n_shots=5)
    assert all(len(e.meta["shots"]) == 5 for e in d5.examples)


def test_prepend_bos(word):
    plain = get_task("ioi", word, n_examples=10, seed=2)
    bos = get_task("ioi", word, n_examples=10, seed=2, prepend_bos=True)
    for a, b in zip(plain.examples, bos.examples):
        assert b.clean_ids == [word.bos_token_id] + a.clean_ids
        assert b.corrupted_ids[0] == word.bos_token_id
        assert b.target_positions == [p + 1 for p in a.target_positions]


def test_generation_error_names_the_reasons(word):
    with pytest.raises(TaskDataError, match=r"ioi: only \d+ of the 50 requested examples .*after 20 attempts"):
        get_task("ioi", word, n_examples=50, max_attempts=20)


# -- induction ----------------------------------------------------------------------------

def test_induction_structure():
    k = 6
    d = make_induction(40, seed=1, vocab_size=30, half_length=k, first_token=1, bos_token_id=0)
    check_task(d, 40)
    for e in d.examples:
        assert len(e.clean_ids) == 2 * k + 1 and e.clean_ids[0] == 0
        t = e.clean_ids[1:k + 1]
        s = e.corrupted_ids[1:k + 1]
        assert e.clean_ids[k + 1:] == t and e.corrupted_ids[k + 1:] == t
        assert len(set(t)) == k and not set(s) & set(t)
        assert all(1 <= x < 30 for x in t + s)
        # targets: the second-half positions predicting t2..tk (not the first repeated token)
        assert e.target_positions == list(range(k + 1, 2 * k))
        assert e.clean_answer == t[1:] == e.corrupted_answer
    no_bos = make_induction(5, seed=1, vocab_size=30, half_length=k, distinct=False)
    assert all(len(e.clean_ids) == 2 * k and e.target_positions == list(range(k, 2 * k - 1))
               for e in no_bos.examples)
    with pytest.raises(ValueError, match="distinct"):
        make_induction(5, vocab_size=10, half_length=6)
    with pytest.raises(ValueError, match="bos_token_id"):
        make_induction(5, vocab_size=30, half_length=4, bos_token_id=0)
    with pytest.raises(ValueError, match="vocab_size"):
        make_induction(5)
    # through the registry, the vocabulary comes from the tokenizer
    d = get_task("induction", CharTokenizer(), n_examples=8, seed=0, half_length=5, first_token=4)
    assert all(4 <= x < 101 for e in d.examples for x in e.clean_ids)


def test_induction_matches_shipped_generator():
    try:
        from fastedge.shipped import induction_batch
    except ImportError:
        pytest.skip("fastedge.shipped.induction_batch not available")
    ref = induction_batch(16, seed=3, k=7, vocab_size=40)
    d = make_induction(16, seed=3, vocab_size=40, half_length=7, first_token=1, bos_token_id=0)
    b = collate(d.examples)
    assert torch.equal(b.input_ids, ref.input_ids)
    assert torch.equal(b.corrupted_input_ids, ref.corrupted_input_ids)
    assert torch.equal(b.target_mask, ref.target_mask)


# -- registry -----------------------------------------------------------------------------

def test_registry(word, tmp_path):
    assert set(TASKS) == {"ioi", "greater-than", "gendered-pronoun", "boolean-instruct", "boolean-fewshot",
                          "induction"}
    with pytest.raises(ValueError, match="ioi.*greater-than|greater-than.*ioi") as err:
        get_task("no-such-task", word)
    for name in TASKS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_task("ioi", None)
    path = tmp_path / "t.jsonl"
    save_jsonl(get_task("ioi", word, n_examples=5), path)
    assert len(load_task(str(path), word)) == 5 and len(load_task(path, word)) == 5
    assert load_task("ioi", word, n_examples=7).name == "ioi"
    with pytest.raises(FileNotFoundError):
        load_task(tmp_path / "missing.jsonl", word)


# -- JSONL --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TEXT_TASKS)
def test_jsonl_round_trip(name, word, tmp_path):
    data = get_task(name, word, n_examples=25, seed=4)
    path = tmp_path / f"{name}.jsonl"
    save_jsonl(data, path)
    back = load_jsonl(path, word)
    assert back.name == name and len(back) == len(data)
    for a, b in zip(data.examples, back.examples):
        assert (a.clean_ids, a.corrupted_ids, a.target_positions, a.clean_answer, a.corrupted_answer, a.split) == \
               (b.clean_ids, b.corrupted_ids, b.target_positions, b.clean_answer, b.corrupted_answer, b.split)
    assert back.examples[0].source == f"{path}:1"


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _line(clean, corrupted, **extra):
    return json.dumps({"clean": clean, "corrupted": corrupted, **extra})


GOOD = _line("When Mary and John went to the store, John gave a drink to<predict> Mary</predict>",
             "When Mary and John went to the store, Paul gave a drink to<predict> John</predict>")


def test_jsonl_basic(word, tmp_path):
    path = _write(tmp_path, [GOOD, "", "   ", _line("a b<predict> c d</predict>", "a x<predict> e f</predict>",
                                                     split="validation", meta={"k": 1})])
    d = load_jsonl(path, word)
    assert d.name == "data" and len(d) == 2
    e0, e1 = d.examples
    assert e0.split == "train" and word.decode(e0.clean_answer) == " Mary" and word.decode(e0.corrupted_answer) == " John"
    assert e0.target_positions == [len(e0.clean_ids) - 2]
    assert e1.split == "validation" and e1.meta == {"k": 1} and e1.source.endswith(":4")
    assert len(e1.target_positions) == 2 and word.decode(e1.clean_answer) == " c d"
    assert word.decode(e1.corrupted_answer) == " e f"
    # lines without a split may be spread by a fraction
    path = _write(tmp_path, [GOOD] * 10)
    assert len(load_jsonl(path, word, validation_fraction=0.2, name="x").split("validation")) == 2
    assert load_jsonl(path, word, name="x").name == "x"
    bos = load_jsonl(path, word, prepend_bos=True).examples[0]
    assert bos.clean_ids[0] == word.bos_token_id


class MergingTokenizer:
    """Characters, except that "ab" is one token: "x a" + "b" is not prefix-consistent."""

    def encode(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(1000)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out


P = "<predict>"
Q = "</predict>"
MALFORMED = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"corrupted": f"a{P}b{Q}"}), "missing key 'clean'"),
    (json.dumps({"clean": f"a{P}b{Q}"}), "missing key 'corrupted'"),
    (json.dumps({"clean": 3, "corrupted": f"a{P}b{Q}"}), "'clean' must be a string"),
    (_line("no tags here", f"a{P}b{Q}"), r"exactly one <predict> tag, found 0"),
    (_line(f"a{P}b{Q}", f"a{P}b{Q}{P}c{Q}"), r"'corrupted' must hold exactly one <predict> tag, found 2"),
    (_line(f"a{P}b", f"a{P}b{Q}"), r"exactly one </predict> tag, found 0"),
    (_line(f"a{Q}b{P}", f"a{P}b{Q}"), "comes before"),
    (_line(f"a{P}b{Q} trailing", f"a{P}b{Q}"), "text after </predict>"),
    (_line(f"{P}b{Q}", f"a{P}b{Q}"), "empty prompt"),
    (_line(f"a{P}{Q}", f"a{P}b{Q}"), "empty answer"),
    (_line(f"a{P}b{Q}", f"a{P}b{Q}", split="test"), "unknown split 'test'"),
    (_line(f"a{P}b{Q}", f"a{P}b{Q}", splt="train"), r"unknown key\(s\) \['splt'\]"),
    (_line(f"a{P}b{Q}", f"a{P}b{Q}", meta=[1]), "'meta' must be an object"),
    (_line(f"When Mary{P} and{Q}", f"When Mary{P} and John{Q}"), r"different lengths \(3 vs 4 tokens\)"),
    (_line(f"When Mary{P} and John{Q}", f"When Mary and{P} John{Q}"), r"prompts tokenise to different lengths \(2 vs 3"),
]


@pytest.mark.parametrize("bad,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_jsonl_malformed_line_names_its_number(bad, message, word, tmp_path):
    path = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:3: ") + ".*" + message):
        load_jsonl(path, word)


def test_jsonl_prompt_not_prefix(tmp_path):
    path = _write(tmp_path, [_line(f"x y{P}z{Q}", f"x q{P}z{Q}"), _line(f"x a{P}b{Q}", f"x c{P}d{Q}")])
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:2: ") + "the clean prompt's tokens are not a prefix"):
        load_jsonl(path, MergingTokenizer())
    assert issubclass(TaskDataError, ValueError)


def test_jsonl_empty_file(word, tmp_path):
    with pytest.raises(TaskDataError, match="no examples"):
        load_jsonl(_write(tmp_path, [""]), word)


# -- examples, batches --------------------------------------------------------------------

def test_example_validates():
    ok = dict(clean_ids=[1, 2, 3], corrupted_ids=[1, 5, 3], target_positions=[1], clean_answer=[3],
              corrupted_answer=[3])
    Example(**ok)
    for change, msg in [({"corrupted_ids": [1, 2]}, "differ in length"), ({"target_positions": [2]}, "out of range"),
                        ({"target_positions": []}, "no target"), ({"clean_answer": [4]}, "clean_answer"),
                        ({"corrupted_answer": [2]}, "corrupted_answer"), ({"split": "dev"}, "split")]:
        with pytest.raises(TaskDataError, match=msg):
            Example(**{**ok, **change, "source": "src:1"})


def test_collate_and_batches(word):
    data = get_task("boolean-fewshot", word, n_examples=23, seed=0)
    lengths = [len(e.clean_ids) for e in data.examples]
    assert len(set(lengths)) > 1  # padding is exercised
    b = collate(data.examples[:5], pad_id=7)
    assert isinstance(b, Batch)
    S = max(lengths[:5])
    for t in (b.input_ids, b.corrupted_input_ids, b.attention_mask, b.target_mask, b.clean_answer,
              b.corrupted_answer):
        assert t.shape == (5, S)
    assert b.input_ids.dtype == torch.long and b.target_mask.dtype == torch.bool
    for i, e in enumerate(data.examples[:5]):
        n = len(e.clean_ids)
        assert b.input_ids[i, :n].tolist() == e.clean_ids and (b.input_ids[i, n:] == 7).all()
        assert b.corrupted_input_ids[i, :n].tolist() == e.corrupted_ids and (b.corrupted_input_ids[i, n:] == 7).all()
        assert b.attention_mask[i].tolist() == [1] * n + [0] * (S - n)
        assert b.target_mask[i].nonzero().flatten().tolist() == e.target_positions
        assert b.clean_answer[i][b.target_mask[i]].tolist() == e.clean_answer
        assert b.corrupted_answer[i][b.target_mask[i]].tolist() == e.corrupted_answer
        assert (b.clean_answer[i][~b.target_mask[i]] == IGNORE_INDEX).all()
        # the answer is the next clean token
        pos = torch.tensor(e.target_positions)
        assert b.input_ids[i, pos + 1].tolist() == e.clean_answer
    assert b.examples == tuple(data.examples[:5]) and len(b) == 5
    assert b.to("cpu").input_ids.equal(b.input_ids)

    sizes = [len(x) for x in data.batches(10)]
    assert sizes == [10, 10, 3]
    assert [len(x) for x in data.batches(10, drop_last=True)] == [10, 10]
    order = [x.input_ids for x in data.batches(23)][0]
    shuffled = [e for x in data.batches(4, shuffle=True, seed=1) for e in x.examples]
    again = [e for x in data.batches(4, shuffle=True, seed=1) for e in x.examples]
    assert [e.source for e in shuffled] == [e.source for e in again]
    assert sorted(e.source for e in shuffled) == sorted(e.source for e in data.examples)
    assert [e.source for e in shuffled] != [e.source for e in data.examples]
    assert order.shape[0] == 23
    with pytest.raises(ValueError):
        next(data.batches(0))
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(ValueError, match="unknown split"):
        data.split("test")
    # generated tasks keep their examples in an ExampleStore, which builds them on access: equal, not the same
    assert len(data[:4]) == 4 and data[0] == data.examples[0] and data[:4][3] == data.examples[3]
