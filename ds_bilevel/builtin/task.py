"""A synthetic instruction-following task whose learning is visible.

Each example is a (prompt, response) pair from one of four skills with short,
exactly checkable answers, so the loss on the response and the exact-match
accuracy both show progress within a few hundred steps:

- parity:    "Is 47 even or odd?"                 -> "odd"
- successor: "What letter comes after k?"         -> "l"
- larger:    "Which is larger, 38 or 52?"          -> "52"
- reverse:   "Reverse the letters: a b c"          -> "c b a"

Generation is a pure function of (seed, index), so every rank builds the same data.
"""

from __future__ import annotations

import random
import string

SKILLS = ("parity", "successor", "larger", "reverse")
LETTERS = string.ascii_lowercase


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10, 100)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def _successor(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(LETTERS) - 1)
    return f"What letter comes after {LETTERS[i]}?", LETTERS[i + 1]


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.sample(LETTERS[:8], 3)
    return f"Reverse the letters: {' '.join(word)}", " ".join(reversed(word))


_MAKERS = {"parity": _parity, "successor": _successor, "larger": _larger, "reverse": _reverse}


def make_example(seed: int, index: int, skills: tuple[str, ...] = SKILLS) -> dict[str, str]:
    rng = random.Random(seed * 1_000_003 + index)
    skill = skills[index % len(skills)]
    prompt, response = _MAKERS[skill](rng)
    return {"prompt": prompt, "response": response, "skill": skill}


def make_split(seed: int, size: int, skills: tuple[str, ...] = SKILLS) -> list[dict[str, str]]:
    return [make_example(seed, i, skills) for i in range(size)]


def corpus_for_tokenizer() -> list[str]:
    """Text the builtin tokenizer is trained on: every template with many fillers."""
    lines = []
    for ex in make_split(seed=12345, size=4000):
        lines.append(ex["prompt"])
        lines.append(ex["response"])
    return lines
