"""Paraphrased captions for Moving Digits: what a person would type, from the ground truth the dataset knows.

A caption is a subject phrase and a motion phrase per digit ("a seven drifting upward"); the ground truth (digit,
direction, colour, bounce) is never read back from the text, so paraphrases need no parser. Templates are the
pairs (subject form i, motion form j) of the tables below; the TRAIN set and the HELD-OUT set split those pairs
(held out: (i + j) % 4 == 3), so an evaluation caption has a phrasing no training caption has, in words the
vocabulary knows.

    paraphrase_for(7, "up", rng=rng)                  # e.g. "the number seven glides to the top"
    paraphrase_for(7, "up", "red", heldout=True, rng=rng)
    all_paraphrases(7, "up")                          # every clause the train set can write
"""

from __future__ import annotations

from typing import Optional

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# direction -> phrases after a verb ("moves upward", "drifting to the top")
DIRECTION_PHRASES = {
    "left": ("to the left", "left", "leftward", "towards the left", "to the left side"),
    "right": ("to the right", "right", "rightward", "towards the right", "to the right side"),
    "up": ("up", "upward", "upwards", "to the top", "towards the top"),
    "down": ("down", "downward", "downwards", "to the bottom", "towards the bottom"),
}

# subject forms: {d} the numeral, {w} the number word, {c} "COLOUR " or ""; {a} "a" / "an" before what follows
SUBJECTS = (
    "the {c}digit {d}",
    "{a} {c}{w}",
    "the {c}number {w}",
    "{a} {c}handwritten {d}",
    "the {c}{d}",
    "{a} {c}digit {w}",
)
# motion forms: {v} a verb ("moves"), {g} its -ing form ("moving"), {p} a direction phrase
MOTIONS = (
    "{v} {p}",
    "{g} {p}",
    "is {g} {p}",
    "that {v} {p}",
    "slowly {v} {p}",
    "{v} steadily {p}",
)
VERBS = (("moves", "moving"), ("drifts", "drifting"), ("slides", "sliding"), ("travels", "travelling"),
         ("goes", "going"), ("glides", "gliding"))


def is_heldout(subject: int, motion: int) -> bool:
    return (subject + motion) % 4 == 3


TEMPLATES = {
    split: [(i, j) for i in range(len(SUBJECTS)) for j in range(len(MOTIONS)) if is_heldout(i, j) == (split == "heldout")]
    for split in ("train", "heldout")
}


def _article(word: str) -> str:
    return "an" if (word[:1] in "aeiou" and word != "one") or word in ("8", "11", "18") else "a"


def _clause(template: tuple[int, int], digit: int, direction: str, color: Optional[str], bounces: bool,
            verb: int, phrase: int) -> str:
    subject, motion = SUBJECTS[template[0]], MOTIONS[template[1]]
    colour = f"{color} " if color else ""
    head = subject.replace("{a} ", "")  # the words the article goes before
    following = head.format(c=colour, d=digit, w=NUMBER_WORDS[digit]).split()[0]
    text = subject.format(a=_article(following), c=colour, d=digit, w=NUMBER_WORDS[digit])
    v, g = VERBS[verb]
    text += " " + motion.format(v=v, g=g, p=DIRECTION_PHRASES[direction][phrase])
    return text + (" and bounces" if bounces else "")


def paraphrase_for(digit, direction, color=None, bounces=False, *, rng: np.random.Generator,
                   heldout: bool = False) -> str:
    """A paraphrased caption (scalars, or lists for several digits) drawn with `rng`: a template of the train or
    held-out set, a verb and a direction phrase per clause; two clauses are joined by " and "."""
    digits = list(digit) if isinstance(digit, (list, tuple)) else [digit]
    n = len(digits)

    def per(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * n

    directions, colors, bounce_flags = per(direction), per(color), per(bounces)
    templates = TEMPLATES["heldout" if heldout else "train"]
    clauses = []
    for d, di, c, b in zip(digits, directions, colors, bounce_flags):
        if di not in DIRECTION_PHRASES:
            raise ValueError(f"unknown direction {di!r}; expected one of {tuple(DIRECTION_PHRASES)}")
        template = templates[int(rng.integers(len(templates)))]
        verb, phrase = int(rng.integers(len(VERBS))), int(rng.integers(len(DIRECTION_PHRASES[di])))
        clauses.append(_clause(template, int(d), di, c, bool(b), verb, phrase))
    return " and ".join(clauses)


def all_paraphrases(digit: int, direction: str, color=None, bounces: bool = False, heldout: bool = False) -> list[str]:
    """Every caption one clause of the set can be (for the vocabulary and for tests)."""
    return [_clause(t, digit, direction, color, bounces, v, p) for t in TEMPLATES["heldout" if heldout else "train"]
            for v in range(len(VERBS)) for p in range(len(DIRECTION_PHRASES[direction]))]
