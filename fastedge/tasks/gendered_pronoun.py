"""Gendered Pronoun: a tag question about a named person.

Clean::

    So Mary is such a good friend, isn't  -> " she"

Corrupted: the name is replaced with one of the other gender (with the same
number of tokens), so the answer flips::

    So James is such a good friend, isn't  -> " he"

``clean_answer`` is the pronoun that fits the clean name, ``corrupted_answer``
the one that fits the corrupted name. Clean names are female or male with
equal probability. The two pronouns must tokenise to the same number of tokens
(they do for GPT-2-like and word tokenizers; a character tokenizer cannot
satisfy it, and the task then fails saying so). ``Example.meta`` holds the
template index, ``name``, ``corrupted_name`` and ``gender`` ("female" or
"male") of the clean name.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Optional

from fastedge.tasks.base import Candidate, Encoder, TaskData, TaskDataError, generate_task

# {name}; the prompt ends right before the pronoun
TEMPLATES = (
    "So {name} is such a good friend, isn't",
    "Well, {name} is always on time, isn't",
    "I think {name} is really tall, isn't",
    "You know, {name} is a great cook, isn't",
    "Honestly, {name} is very funny, isn't",
    "So {name} was at the party last night, wasn't",
    "Clearly {name} was the best player on the team, wasn't",
    "I guess {name} likes to read before bed, doesn't",
    "Everyone says {name} works very hard, doesn't",
    "It seems {name} lives close to the station, doesn't",
    "So {name} can speak three languages, can't",
    "Apparently {name} has finished the report, hasn't",
    "Surely {name} will come to the meeting, won't",
    "Remember that {name} was born in the spring, wasn't",
)

FEMALE_NAMES = (
    "Mary", "Alice", "Emma", "Sarah", "Laura", "Anna", "Linda", "Susan", "Lisa", "Karen",
    "Rachel", "Julia", "Helen", "Amy", "Kate", "Grace", "Lucy", "Sophie", "Nancy", "Claire",
    "Emily", "Jessica", "Olivia", "Hannah", "Rose",
)

MALE_NAMES = (
    "John", "Paul", "David", "Michael", "James", "Peter", "Mark", "Robert", "Thomas", "Daniel",
    "Kevin", "Steven", "Brian", "Eric", "Adam", "Jack", "Ryan", "Henry", "George", "Frank",
    "William", "Richard", "Joseph", "Edward", "Tom",
)

PRONOUNS = {"female": " she", "male": " he"}


def vocabulary_texts() -> list[str]:
    return list(TEMPLATES) + list(FEMALE_NAMES) + list(MALE_NAMES) + list(PRONOUNS.values())


def make_gendered_pronoun(tokenizer, n_examples: int = 1000, seed: int = 0, validation_fraction: float = 0.2,
                          *, single_token_answers: bool = False, templates=TEMPLATES,
                          female_names=FEMALE_NAMES, male_names=MALE_NAMES, prepend_bos: bool = False,
                          max_attempts: Optional[int] = None) -> TaskData:
    """The Gendered Pronoun task (see the module docstring). With
    ``single_token_answers`` the pronouns must be single tokens."""
    templates = tuple(templates)
    names = {"female": tuple(female_names), "male": tuple(male_names)}
    other = {"female": "male", "male": "female"}

    def make_sampler(enc: Encoder):
        prompt = templates[0].format(name=names["female"][0])
        base = enc.length(prompt)
        she = enc.length(prompt + PRONOUNS["female"]) - base
        he = enc.length(prompt + PRONOUNS["male"]) - base
        if she != he:
            raise TaskDataError(f"gendered-pronoun: {PRONOUNS['female']!r} and {PRONOUNS['male']!r} tokenise to "
                                f"{she} and {he} tokens under this tokenizer; clean and corrupted answers must "
                                f"have the same length")
        by_len = {g: defaultdict(list) for g in names}
        for g, ns in names.items():
            for n in ns:
                by_len[g][enc.length(" " + n)].append(n)

        def sample(rng: random.Random) -> Candidate:
            gender = rng.choice(("female", "male"))
            name = rng.choice(names[gender])
            # a name of the other gender with the same token count, if any (else any: rejected later)
            pool = by_len[other[gender]].get(enc.length(" " + name)) or list(names[other[gender]])
            corrupted_name = rng.choice(pool)
            t = rng.randrange(len(templates))
            return Candidate(templates[t].format(name=name), PRONOUNS[gender],
                             templates[t].format(name=corrupted_name), PRONOUNS[other[gender]],
                             meta={"template": t, "name": name, "corrupted_name": corrupted_name,
                                   "gender": gender})
        return sample

    return generate_task("gendered-pronoun", tokenizer, n_examples=n_examples, seed=seed,
                         validation_fraction=validation_fraction, make_sampler=make_sampler,
                         single_token_answers=single_token_answers, prepend_bos=prepend_bos,
                         max_attempts=max_attempts)


__all__ = ["make_gendered_pronoun", "TEMPLATES", "FEMALE_NAMES", "MALE_NAMES", "PRONOUNS"]
