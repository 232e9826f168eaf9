"""Indirect object identification (IOI).

Clean: two people are introduced, then one of them (the subject, S) gives
something to someone; the answer is the other one, the indirect object (IO)::

    When Mary and John went to the store, John gave a drink to -> " Mary"

The two names are introduced in either order (IO first, "ABBA", or S first,
"BABA"), with 15 templates, and lists of names, places and objects.

Corruption (our choice): the subject's *second* mention is replaced with a
third name C, so both introduced names are now candidates and the IO can no
longer be inferred::

    When Mary and John went to the store, Paul gave a drink to

Everything else, the first mentions included, is unchanged, so the corrupted
run differs from the clean one only at the second mention. The corrupted
sequence continues with the subject's name: ``corrupted_answer`` is S, the
usual contrast of IOI's logit difference (IO minus S). The answer tokens of a
sequence never influence the logits at its target positions (the model is
causal), so this choice only affects metrics.

By default (``single_token_answers=True``) every name used is a single token
with a leading space under the tokenizer, as IO, S and C must be for the logit
difference. With ``single_token_answers=False`` (e.g. a character tokenizer)
the three names of an example have the same number of tokens instead.

``Example.meta`` holds the template index, ``io``, ``s`` and ``c`` names, the
``order`` ("ABBA" or "BABA") and the texts.
"""
from __future__ import annotations

import random
from collections import defaultdict

from fastedge.tasks.base import Candidate, Encoder, TaskData, TaskDataError, generate_task

# {A} and {B} are the first mentions (in order), {S2} the subject's second mention
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S2} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S2} handed a {object} to",
    "While {A} and {B} were waiting at the {place}, {S2} passed a {object} to",
    "{A} and {B} spent the afternoon at the {place}. Later, {S2} offered a {object} to",
    "Then {A} and {B} walked into the {place}, and {S2} threw a {object} to",
    "Yesterday {A} and {B} met at the {place}, where {S2} sold a {object} to",
    "Once {A} and {B} had reached the {place}, {S2} lent a {object} to",
    "At the {place}, {A} and {B} talked for hours. Then {S2} showed a {object} to",
    "{A} and {B} had a long day at the {place}, so {S2} brought a {object} to",
    "Because {A} and {B} were bored at the {place}, {S2} sent a {object} to",
    "When {A} and {B} came back from the {place}, {S2} returned a {object} to",
    "Early in the morning {A} and {B} drove to the {place}, and {S2} gave a {object} to",
    "After a while, {A} and {B} left the {place}. Outside, {S2} tossed a {object} to",
    "On Sunday {A} and {B} visited the {place}, and there {S2} left a {object} for",
    "As {A} and {B} cleaned up the {place}, {S2} carried a {object} to",
)

NAMES = (
    "Mary", "John", "Alice", "Paul", "Emma", "David", "Sarah", "Michael", "Laura", "James",
    "Anna", "Peter", "Linda", "Mark", "Susan", "Robert", "Lisa", "Thomas", "Karen", "Daniel",
    "Rachel", "Kevin", "Julia", "Steven", "Helen", "Brian", "Amy", "Eric", "Kate", "Adam",
    "Grace", "Jack", "Lucy", "Ryan", "Sophie", "Henry", "Nancy", "George", "Claire", "Frank",
)

PLACES = (
    "store", "park", "school", "station", "office", "garden", "market", "library", "hospital", "restaurant",
    "beach", "museum", "house", "bank", "church", "farm", "river", "theater", "gym", "cafe",
)

OBJECTS = (
    "drink", "book", "ball", "letter", "pen", "ring", "hat", "cake", "bottle", "bag",
    "key", "map", "gift", "phone", "basket", "kite", "towel", "sandwich", "candle", "note",
)


def vocabulary_texts() -> list[str]:
    return list(TEMPLATES) + list(NAMES) + list(PLACES) + list(OBJECTS)


def _name_groups(enc: Encoder, names, single_token: bool) -> list[list[str]]:
    """Names grouped by their token count with a leading space, groups of at
    least three (an example needs three distinct names of one length)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for n in names:
        groups[enc.length(" " + n)].append(n)
    if single_token:
        return [groups[1]] if len(groups.get(1, ())) >= 3 else []
    return [groups[k] for k in sorted(groups) if len(groups[k]) >= 3]


def make_ioi(tokenizer, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2, *,
             single_token_answers: bool = True, templates=TEMPLATES, names=NAMES, places=PLACES,
             objects=OBJECTS, prepend_bos: bool = False, max_attempts=None) -> TaskData:
    """The IOI task (see the module docstring). Deterministic in ``seed`` for
    a given tokenizer."""
    templates, names, places, objects = tuple(templates), tuple(names), tuple(places), tuple(objects)
    if len(set(names)) < 3:
        raise ValueError("ioi: at least three distinct names are needed")

    def make_sampler(enc: Encoder):
        groups = _name_groups(enc, names, single_token_answers)
        if not groups:
            what = "single tokens (with a leading space)" if single_token_answers else "of the same token length"
            raise TaskDataError(f"ioi: fewer than three names are {what} under this tokenizer"
                                 + ("; pass single_token_answers=False to allow multi-token names"
                                    if single_token_answers else ""))
        weights = [len(g) for g in groups]

        def sample(rng: random.Random) -> Candidate:
            group = rng.choices(groups, weights)[0] if len(groups) > 1 else groups[0]
            t = rng.randrange(len(templates))
            io, s, c = rng.sample(group, 3)
            place = rng.choice(places)
            obj = rng.choice(objects)
            order = rng.choice(("ABBA", "BABA"))
            a, b = (io, s) if order == "ABBA" else (s, io)
            fill = dict(A=a, B=b, place=place, object=obj)
            clean = templates[t].format(S2=s, **fill)
            corrupted = templates[t].format(S2=c, **fill)
            return Candidate(clean, " " + io, corrupted, " " + s,
                             meta={"template": t, "io": io, "s": s, "c": c, "order": order})
        return sample

    return generate_task("ioi", tokenizer, n_examples=n_examples, seed=seed,
                         validation_fraction=validation_fraction, make_sampler=make_sampler,
                         single_token_answers=single_token_answers, prepend_bos=prepend_bos,
                         max_attempts=max_attempts)


__all__ = ["make_ioi", "TEMPLATES", "NAMES", "PLACES", "OBJECTS"]
