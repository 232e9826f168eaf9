"""Boolean Expressions: evaluate an expression of True, False, not, and, or
and parentheses, with Python's precedence (not > and > or), tokens separated
by spaces::

    not ( True and False ) or False  -> " True"

Two prompt variants:

* instruction (``boolean-instruct``)::

      Evaluate the boolean expression and answer True or False.
      Expression: not ( True and False ) or False
      Answer:                                   -> " True"

* few-shot (``boolean-fewshot``): ``n_shots`` solved examples (random
  expressions with their values), then the query::

      Expression: True and not False
      Answer: True

      Expression: ( False or False ) and True
      Answer: False

      Expression: not ( True and False ) or False
      Answer:                                   -> " True"

Corrupted: the query is replaced with another expression of the opposite
value whose prompt has the same number of tokens (the instruction or the
shots are unchanged). It is searched for by redrawing the literals of the
query's expression (same shape), then by drawing new expressions with the same
number of operands; the clean and corrupted answers are " True" and " False"
(or the reverse). Clean values are True or False with equal probability.

An expression has ``n_operands`` literals (a random number in the given
range), combined by a random binary tree of ``and``/``or``; each
sub-expression is negated with probability ``not_probability`` (never twice in
a row); parentheses are always written where precedence needs them and around
other compound operands with probability ``paren_probability``.
``Example.meta`` holds ``expression``, ``corrupted_expression``, ``value`` and,
for the few-shot variant, ``shots`` (a list of [expression, value]).
"""
from __future__ import annotations

import random
from typing import Optional, Union

from fastedge.tasks.base import Candidate, Encoder, Rejected, TaskData, TaskDataError, generate_task

INSTRUCTION = "Evaluate the boolean expression and answer True or False.\n"
QUERY = "Expression: {expr}\nAnswer:"
SHOT = "Expression: {expr}\nAnswer: {value}\n\n"
ANSWERS = {True: " True", False: " False"}

# expression trees: ("lit", bool) | ("not", node) | (op, left, right, paren_left, paren_right)
Node = tuple


def vocabulary_texts() -> list[str]:
    return [INSTRUCTION, QUERY, SHOT, "True False not and or"]


def _gen(rng: random.Random, n: int, not_p: float, paren_p: float, negatable: bool = True) -> Node:
    if n == 1:
        node: Node = ("lit", rng.random() < 0.5)
    else:
        k = rng.randint(1, n - 1)
        op = rng.choice(("and", "or"))
        left = _gen(rng, k, not_p, paren_p)
        right = _gen(rng, n - k, not_p, paren_p)
        node = (op, left, right, rng.random() < paren_p, rng.random() < paren_p)
    if negatable and rng.random() < not_p:
        node = ("not", node)
    return node


def _value(node: Node) -> bool:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "not":
        return not _value(node[1])
    if kind == "and":
        return _value(node[1]) and _value(node[2])
    return _value(node[1]) or _value(node[2])


def _needs_parens(child: Node, parent_op: str, side: str) -> bool:
    kind = child[0]
    if kind in ("lit", "not"):
        return False
    if parent_op == "not":
        return True
    if parent_op == "and":
        return kind == "or"
    return False  # under "or": "and" binds tighter; "or" is associative


def _render(node: Node) -> str:
    kind = node[0]
    if kind == "lit":
        return "True" if node[1] else "False"
    if kind == "not":
        inner = _render(node[1])
        return f"not ( {inner} )" if _needs_parens(node[1], "not", "") else f"not {inner}"
    op, left, right, pl, pr = node
    parts = []
    for child, flag, side in ((left, pl, "left"), (right, pr, "right")):
        text = _render(child)
        compound = child[0] not in ("lit",) and not (child[0] == "not" and child[1][0] == "lit")
        if _needs_parens(child, op, side) or (flag and compound):
            text = f"( {text} )"
        parts.append(text)
    return f"{parts[0]} {op} {parts[1]}"


def _relabel(rng: random.Random, node: Node) -> Node:
    """The same shape with fresh random literals."""
    kind = node[0]
    if kind == "lit":
        return ("lit", rng.random() < 0.5)
    if kind == "not":
        return ("not", _relabel(rng, node[1]))
    return (kind, _relabel(rng, node[1]), _relabel(rng, node[2]), node[3], node[4])


def evaluate_boolean_expression(text: str) -> bool:
    """The value of an expression of True, False, not, and, or and
    parentheses (space-separated or not), with Python's precedence."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"bad boolean expression {text!r} at token {pos}: expected {expected or 'more'}, "
                             f"got {tok!r}")
        pos += 1
        return tok

    def or_expr():
        v = and_expr()
        while peek() == "or":
            take()
            r = and_expr()
            v = v or r
        return v

    def and_expr():
        v = not_expr()
        while peek() == "and":
            take()
            r = not_expr()
            v = v and r
        return v

    def not_expr():
        if peek() == "not":
            take()
            return not not_expr()
        tok = take()
        if tok == "True":
            return True
        if tok == "False":
            return False
        if tok == "(":
            v = or_expr()
            take(")")
            return v
        raise ValueError(f"bad boolean expression {text!r}: unexpected {tok!r}")

    value = or_expr()
    if pos != len(tokens):
        raise ValueError(f"bad boolean expression {text!r}: trailing {tokens[pos:]}")
    return value


def random_expression(rng: random.Random, n_operands: int, *, not_probability: float = 0.3,
                      paren_probability: float = 0.5) -> tuple[str, bool]:
    """A random expression with ``n_operands`` literals and its value."""
    node = _gen(rng, n_operands, not_probability, paren_probability)
    return _render(node), _value(node)


def make_boolean_expressions(tokenizer, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2,
                             *, variant: str = "instruct", n_shots: int = 3,
                             n_operands: Union[int, tuple[int, int]] = (2, 4), not_probability: float = 0.3,
                             paren_probability: float = 0.5, instruction: str = INSTRUCTION,
                             single_token_answers: bool = False, prepend_bos: bool = False,
                             corruption_tries: int = 64, max_attempts: Optional[int] = None) -> TaskData:
    """The Boolean Expressions task, ``variant`` "instruct" or "fewshot" (see
    the module docstring)."""
    if variant not in ("instruct", "fewshot"):
        raise ValueError(f"boolean expressions: variant must be 'instruct' or 'fewshot', got {variant!r}")
    lo, hi = (n_operands, n_operands) if isinstance(n_operands, int) else tuple(n_operands)
    if not 1 <= lo <= hi:
        raise ValueError(f"boolean expressions: bad n_operands {n_operands!r}")
    if variant == "fewshot" and n_shots < 0:
        raise ValueError("boolean expressions: n_shots must be >= 0")
    name = f"boolean-{variant}"

    def make_sampler(enc: Encoder):
        probe = QUERY.format(expr="True")
        t = enc.length(probe + ANSWERS[True]) - enc.length(probe)
        f = enc.length(probe + ANSWERS[False]) - enc.length(probe)
        if t != f:
            raise TaskDataError(f"{name}: {ANSWERS[True]!r} and {ANSWERS[False]!r} tokenise to {t} and {f} tokens "
                                f"under this tokenizer; clean and corrupted answers must have the same length")

        def sample(rng: random.Random) -> Candidate:
            want = rng.random() < 0.5
            n = rng.randint(lo, hi)
            for _ in range(1000):
                node = _gen(rng, n, not_probability, paren_probability)
                if _value(node) == want:
                    break
            else:  # practically unreachable
                raise Rejected("value", "could not draw an expression with the wanted value")
            if variant == "instruct":
                head, shots = instruction, []
            else:
                shots = []
                for _ in range(n_shots):
                    e, v = random_expression(rng, rng.randint(lo, hi), not_probability=not_probability,
                                             paren_probability=paren_probability)
                    shots.append([e, v])
                head = "".join(SHOT.format(expr=e, value=v) for e, v in shots)
            expr = _render(node)
            clean = head + QUERY.format(expr=expr)
            length = enc.length(clean)
            corrupted_expr = None
            for i in range(corruption_tries):
                other = _relabel(rng, node) if i < corruption_tries // 2 else \
                    _gen(rng, n, not_probability, paren_probability)
                if _value(other) == want:
                    continue
                text = _render(other)
                if enc.length(head + QUERY.format(expr=text)) == length:
                    corrupted_expr = text
                    break
            if corrupted_expr is None:
                raise Rejected("no_corruption", f"no expression of the opposite value with the same token length "
                                                f"found in {corruption_tries} tries")
            meta = {"expression": expr, "corrupted_expression": corrupted_expr, "value": want}
            if variant == "fewshot":
                meta["shots"] = shots
            return Candidate(clean, ANSWERS[want], head + QUERY.format(expr=corrupted_expr), ANSWERS[not want],
                             meta=meta)
        return sample

    return generate_task(name, tokenizer, n_examples=n_examples, seed=seed,
                         validation_fraction=validation_fraction, make_sampler=make_sampler,
                         single_token_answers=single_token_answers, prepend_bos=prepend_bos,
                         max_attempts=max_attempts, meta={"variant": variant})


def make_boolean_instruct(tokenizer, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2,
                          **options) -> TaskData:
    """Boolean Expressions, instruction-prompting variant."""
    return make_boolean_expressions(tokenizer, n_examples, seed, validation_fraction, variant="instruct", **options)


def make_boolean_fewshot(tokenizer, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2,
                         **options) -> TaskData:
    """Boolean Expressions, few-shot variant (``n_shots`` solved examples, default 3)."""
    return make_boolean_expressions(tokenizer, n_examples, seed, validation_fraction, variant="fewshot", **options)


__all__ = ["make_boolean_expressions", "make_boolean_instruct", "make_boolean_fewshot",
           "evaluate_boolean_expression", "random_expression", "INSTRUCTION"]
