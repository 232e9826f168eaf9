"""Greater-Than: continue a year range with a later year.

Clean::

    The war lasted from the year 1732 to the year 17  -> a two-digit end, greater than 32

Corrupted: the same sentence with the start year's last two digits replaced
by ``01`` ("... from the year 1701 to the year 17"), so "greater than the
start" no longer singles out the years after 32.

Answers stored in the `Example` (documented choices):

* ``clean_answer``: one valid end year's two digits, ``start + 1 + r`` with
  ``r`` uniform in ``0 .. min(9, 98 - start)`` (a near, plausible end year);
* ``corrupted_answer``: the corrupted start's digits, ``"01"``: an answer that
  is wrong for the clean prompt (the clean logit difference favours a later
  year over it).

The task's real metric is the probability difference: the total probability
of the two-digit ends greater than the start minus that of the ends at most
the start. For it, ``Example.meta`` holds ``start_yy`` and ``century`` and,
when every two-digit end is one token (``single_token_answers=True``, the
default), ``greater_ids`` and ``lesser_ids``: the token ids of the ends
``start_yy + 1 .. 99`` and ``00 .. start_yy`` (any end that is not one token
after the prompt is left out and listed in ``years_not_single_tokens``). `greater_than_answers` gives the
whole year-to-token table for a tokenizer.

Start years: centuries 11 to 19, last two digits 02 to 98 (so a later year in
the same century exists and differs from 01).
"""
from __future__ import annotations

import random
from typing import Optional

from fastedge.tasks.base import Candidate, Encoder, Example, TaskData, generate_task

NOUNS = (
    "war", "siege", "expedition", "drought", "famine", "dynasty", "rebellion", "treaty", "voyage", "reign",
    "plague", "construction", "occupation", "truce", "migration", "crusade", "embargo", "alliance",
    "conflict", "journey",
)

# {noun}, {start} (four digits), {century} (two digits); the prompt ends with the century
TEMPLATES = (
    "The {noun} lasted from the year {start} to the year {century}",
    "The {noun} went on from the year {start} until the year {century}",
    "The {noun} began in the year {start} and ended in the year {century}",
    "The {noun} started in the year {start} and continued until the year {century}",
    "The {noun} ran from the year {start} to the year {century}",
    "The {noun} was recorded from the year {start} through the year {century}",
)

CENTURIES = tuple(range(11, 20))
START_RANGE = (2, 98)  # inclusive range of the start's last two digits
CORRUPTED_YY = 1


def vocabulary_texts() -> list[str]:
    return list(TEMPLATES) + list(NOUNS)


def greater_than_answers(tokenizer, century: int = 17, *, template: str = TEMPLATES[0],
                         noun: str = "war", start_yy: int = 32) -> dict[int, list[int]]:
    """``{yy: token ids}`` of the end year's two digits ``yy`` (0..99) after
    the prompt of ``template`` with ``century``, for every ``yy`` whose
    tokens extend the prompt's tokens (a prefix-consistent continuation)."""
    enc = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer)
    prompt = template.format(noun=noun, start=f"{century}{start_yy:02d}", century=century)
    p = enc(prompt)
    out = {}
    for yy in range(100):
        full = enc(prompt + f"{yy:02d}")
        if full[:len(p)] == p and len(full) > len(p):
            out[yy] = list(full[len(p):])
    return out


def make_greater_than(tokenizer, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2, *,
                      single_token_answers: bool = True, templates=TEMPLATES, nouns=NOUNS,
                      centuries=CENTURIES, prepend_bos: bool = False, max_attempts: Optional[int] = None
                      ) -> TaskData:
    """The Greater-Than task (see the module docstring)."""
    templates, nouns, centuries = tuple(templates), tuple(nouns), tuple(int(c) for c in centuries)
    for c in centuries:
        if not 10 <= c <= 99:
            raise ValueError(f"greater-than: centuries must be two-digit numbers, got {c}")

    def make_sampler(enc: Encoder):
        def sample(rng: random.Random) -> Candidate:
            t = rng.randrange(len(templates))
            noun = rng.choice(nouns)
            century = rng.choice(centuries)
            yy = rng.randint(*START_RANGE)
            end = yy + 1 + rng.randint(0, min(9, 98 - yy))
            fill = dict(noun=noun, century=century)
            clean = templates[t].format(start=f"{century}{yy:02d}", **fill)
            corrupted = templates[t].format(start=f"{century}{CORRUPTED_YY:02d}", **fill)
            return Candidate(clean, f"{end:02d}", corrupted, f"{CORRUPTED_YY:02d}",
                             meta={"template": t, "noun": noun, "century": century, "start_yy": yy,
                                   "answer_yy": end})
        return sample

    tables: dict = {}

    def finish(ex: Example, cand: Candidate, enc: Encoder) -> None:
        if not single_token_answers:
            return
        # year-to-token table for this example's prompt shape (cached per template and century)
        key = (cand.meta["template"], cand.meta["century"])
        table = tables.get(key)
        if table is None:
            full = greater_than_answers(enc, cand.meta["century"], template=templates[cand.meta["template"]],
                                        noun=cand.meta["noun"], start_yy=cand.meta["start_yy"])
            table = {yy: ids[0] for yy, ids in full.items() if len(ids) == 1}
            tables[key] = table
        yy = cand.meta["start_yy"]
        ex.meta["greater_ids"] = [table[y] for y in range(yy + 1, 100) if y in table]
        ex.meta["lesser_ids"] = [table[y] for y in range(0, yy + 1) if y in table]
        if len(table) < 100:  # some ends are not one token: the probability difference misses them
            ex.meta["years_not_single_tokens"] = sorted(set(range(100)) - set(table))

    return generate_task("greater-than", tokenizer, n_examples=n_examples, seed=seed,
                         validation_fraction=validation_fraction, make_sampler=make_sampler,
                         single_token_answers=single_token_answers, prepend_bos=prepend_bos,
                         max_attempts=max_attempts, finish=finish)


__all__ = ["make_greater_than", "greater_than_answers", "TEMPLATES", "NOUNS", "CENTURIES"]
