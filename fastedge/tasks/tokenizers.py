"""Two tiny, deterministic tokenizers that need no download.

Both follow the small part of the Hugging Face interface that fastedge uses:
``encode(text, add_special_tokens=False) -> list[int]``, ``decode(ids)``,
``vocab_size`` (also ``len(tokenizer)``), ``pad_token_id``, ``bos_token_id``,
``eos_token_id`` and ``unk_token_id``. ``encode`` adds nothing unless
``add_special_tokens=True`` (then it prepends BOS).

* `CharTokenizer`: one token per character. The default alphabet is tab,
  newline and printable ASCII (space to ``~``): 97 characters after the four
  special tokens, so ``vocab_size == 101``. Any other character is ``<unk>``.
* `WordTokenizer`: GPT-2-like pieces (a word or a number with its leading
  space, one punctuation character with its leading space, or one whitespace
  character), looked up in a fixed vocabulary. Numbers split into pairs of
  digits from the left (``" 1732"`` -> ``" 17"``, ``"32"``), so a year's last
  two digits are one token, as with GPT-2 for most years. A piece not in the
  vocabulary falls back to its leading space and the rest, then to single
  characters (every printable ASCII character is in the vocabulary), so
  encoding ASCII text never loses anything.

Ids are fixed: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the
vocabulary in a deterministic order. The default `WordTokenizer` vocabulary is
the characters, the digit pairs and every word of the built-in tasks' templates
and word lists (see `default_word_vocabulary`). Changing those lists changes
the default vocabulary: a model trained with it should keep its vocabulary with
`WordTokenizer.save` / `WordTokenizer.load`.
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Optional, Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
UNK_TEXT = "\ufffd"

# tab, newline, then printable ASCII from space to "~"
DEFAULT_ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))


class _Base:
    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    unk_token_id = UNK_ID
    pad_token = "<pad>"
    bos_token = "<bos>"
    eos_token = "<eos>"
    unk_token = "<unk>"

    _id_to_token: list[str]
    _token_to_id: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._id_to_token[int(i)] for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._id_to_token):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self._id_to_token)})")
            if i < len(SPECIAL_TOKENS):
                if skip_special_tokens:
                    continue
                out.append(UNK_TEXT if i == UNK_ID else SPECIAL_TOKENS[i])
            else:
                out.append(self._id_to_token[i])
        return "".join(out)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._encode(text)
        return [BOS_ID] + ids if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}


class CharTokenizer(_Base):
    """One token per character of ``alphabet`` (default: tab, newline and
    printable ASCII; ``vocab_size`` 101); other characters are ``<unk>``."""

    def __init__(self, alphabet: Optional[str] = None):
        alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("the alphabet has repeated characters")
        self.alphabet = alphabet
        self._id_to_token = list(SPECIAL_TOKENS) + list(alphabet)
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        # special-token names are not characters: a "<" in text is the character
        self._char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}

    def _encode(self, text: str) -> list[int]:
        get = self._char_to_id.get
        return [get(c, UNK_ID) for c in text]

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# a word or a 1-2 digit group with an optional leading space, one other
# non-space character with an optional leading space, or one whitespace character
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,2}| ?[^\sA-Za-z0-9]|\s")


def base_word_vocabulary() -> list[str]:
    """What every `WordTokenizer` vocabulary holds: the default characters,
    each non-space printable character with a leading space, and the digit
    groups with and without a leading space."""
    chars = list(DEFAULT_ALPHABET)
    spaced = [" " + c for c in DEFAULT_ALPHABET[3:]]  # printable, non-space
    digits = [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]
    return chars + spaced + digits + [" " + d for d in digits]


def words_of(texts: Iterable[str]) -> list[str]:
    """The sorted, distinct alphabetic words in ``texts`` (template
    placeholders such as ``{name}`` contribute their inner word too: harmless)."""
    found = set()
    for t in texts:
        found.update(re.findall(r"[A-Za-z]+", t))
    return sorted(found)


def default_word_vocabulary() -> list[str]:
    """The default `WordTokenizer` vocabulary (without the special tokens):
    `base_word_vocabulary`, then every word of the built-in tasks, each with
    and without a leading space, in sorted order."""
    from fastedge.tasks import boolean_expressions, gendered_pronoun, greater_than, ioi
    texts: list[str] = []
    for module in (ioi, greater_than, gendered_pronoun, boolean_expressions):
        texts.extend(module.vocabulary_texts())
    words = words_of(texts)
    return base_word_vocabulary() + [w for word in words for w in (word, " " + word)]


class WordTokenizer(_Base):
    """Word-level tokenizer over a fixed vocabulary (default:
    `default_word_vocabulary`); see the module docstring for how text splits."""

    def __init__(self, vocabulary: Optional[Iterable[str]] = None, *, extra_words: Iterable[str] = ()):
        vocab = default_word_vocabulary() if vocabulary is None else list(vocabulary)
        for w in extra_words:
            vocab.extend([w, " " + w])
        seen = set(SPECIAL_TOKENS)
        tokens = list(SPECIAL_TOKENS)
        for t in base_word_vocabulary() + vocab:
            if not isinstance(t, str) or not t:
                raise ValueError(f"vocabulary entries must be non-empty strings, got {t!r}")
            if t not in seen:
                seen.add(t)
                tokens.append(t)
        self._id_to_token = tokens
        self._token_to_id = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """A tokenizer whose vocabulary is the base one plus every word of
        ``texts`` (with and without a leading space), in sorted order."""
        return cls([w for word in words_of(texts) for w in (word, " " + word)])

    def _encode(self, text: str) -> list[int]:
        vocab = self._token_to_id
        ids: list[int] = []
        pos = 0
        for m in _PIECE.finditer(text):
            if m.start() != pos:  # cannot happen: the pattern covers every character
                raise AssertionError("WordTokenizer: text not covered by the pattern")
            pos = m.end()
            piece = m.group()
            i = vocab.get(piece)
            if i is not None:
                ids.append(i)
                continue
            if piece[0] == " " and len(piece) > 1 and piece[1:] in vocab:
                ids.extend((vocab[" "], vocab[piece[1:]]))
                continue
            ids.extend(vocab.get(c, UNK_ID) for c in piece)
        if pos != len(text):
            raise AssertionError("WordTokenizer: text not covered by the pattern")
        return ids

    def save(self, path: str) -> None:
        """Write the vocabulary (in id order, special tokens included) as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "WordTokenizer", "tokens": self._id_to_token}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if data.get("type") != "WordTokenizer" or not isinstance(tokens, list) \
                or tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS \
                or not set(base_word_vocabulary()) <= set(tokens):
            raise ValueError(f"{path}: not a saved WordTokenizer")
        tok = cls.__new__(cls)
        tok._id_to_token = list(tokens)
        tok._token_to_id = {t: i for i, t in enumerate(tokens)}
        if len(tok._token_to_id) != len(tokens):
            raise ValueError(f"{path}: repeated tokens in the vocabulary")
        return tok

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


__all__ = ["CharTokenizer", "WordTokenizer", "default_word_vocabulary", "base_word_vocabulary",
           "DEFAULT_ALPHABET", "SPECIAL_TOKENS"]
