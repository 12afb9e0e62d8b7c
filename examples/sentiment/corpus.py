"""A synthetic movie-review corpus from a small random grammar.

Each review has a hidden overall opinion; every sentence draws its sentiment
words from a level near that opinion, so most reviews lean one way but many are
mixed ("the acting was superb but the plot was dull"). Reviews are short, lower
case, and use a few hundred words, including negations, intensifiers and
exclamation marks that VADER scores.
"""
from __future__ import annotations

import random

# Sentiment levels from very negative (0) to very positive (4).
ADJECTIVES = [
    ["terrible", "awful", "horrible", "dreadful", "painful", "pathetic", "disgusting", "atrocious"],
    ["bad", "boring", "dull", "weak", "poor", "messy", "forgettable", "disappointing"],
    ["okay", "average", "uneven", "ordinary", "predictable", "fine", "passable", "acceptable"],
    ["good", "nice", "solid", "fun", "enjoyable", "charming", "engaging", "pleasant"],
    ["great", "excellent", "wonderful", "amazing", "brilliant", "superb", "beautiful", "fantastic"],
]
VERDICTS = [
    ["a complete waste of time", "the worst film i have seen", "an insult to the audience", "a total disaster"],
    ["not worth the ticket", "a letdown", "hard to sit through", "a missed chance"],
    ["worth a look on a slow night", "nothing special", "fine for a rainy day", "a mixed bag"],
    ["worth watching", "a good time", "easy to like", "a nice surprise"],
    ["a true masterpiece", "one of the best films of the year", "a joy from start to finish", "a triumph"],
]
ADVICE = [
    ["avoid it at all costs", "do not waste your money", "skip this one"],
    ["i would not recommend it", "wait for something better", "you can skip it"],
    ["see it if you are curious", "it is up to you", "maybe rent it"],
    ["i would recommend it", "give it a try", "see it with friends"],
    ["do not miss it", "see it as soon as you can", "i loved every minute"],
]
ASPECTS = ["acting", "plot", "story", "script", "music", "ending", "dialogue", "pacing", "direction",
           "cast", "soundtrack", "camera work", "lead actor", "villain", "humor", "final scene"]
SUBJECTS = ["this movie", "this film", "the sequel", "this drama", "this comedy", "this thriller", "the remake"]
OPENERS = [
    "i watched {s} last night", "i saw {s} with my family", "i went to see {s} on a friday",
    "my friends took me to {s}", "i finally watched {s}", "we rented {s} over the weekend",
    "i had heard a lot about {s}", "i caught {s} on television",
]
INTENSIFIERS = ["really", "very", "truly", "quite", "so", "extremely"]
CONTRASTS = ["but", "although", "while", "yet"]


def _adj(rng: random.Random, level: int) -> str:
    word = rng.choice(ADJECTIVES[level])
    roll = rng.random()
    if roll < 0.25:
        return f"{rng.choice(INTENSIFIERS)} {word}"
    if roll < 0.35 and level != 2:
        # "not good" reads as negative, "not terrible" as mildly positive
        return f"not {rng.choice(ADJECTIVES[4 - level])}"
    return word


def _level(rng: random.Random, opinion: float) -> int:
    return min(4, max(0, round(rng.gauss(opinion, 1.0))))


def _sentence(rng: random.Random, opinion: float) -> str:
    kind = rng.random()
    a1, a2 = rng.sample(ASPECTS, 2)
    if kind < 0.35:
        return f"the {a1} was {_adj(rng, _level(rng, opinion))}"
    if kind < 0.6:
        conj = rng.choice(["and", *CONTRASTS]) if rng.random() < 0.5 else "and"
        return f"the {a1} was {_adj(rng, _level(rng, opinion))} {conj} the {a2} was {_adj(rng, _level(rng, opinion))}"
    if kind < 0.8:
        return f"it is {rng.choice(VERDICTS[_level(rng, opinion)])}"
    return rng.choice(ADVICE[_level(rng, opinion)])


def review(rng: random.Random) -> str:
    """One review: an opener, two or three opinion sentences, sometimes an exclamation."""
    opinion = rng.uniform(-0.5, 4.5)
    parts = [rng.choice(OPENERS).format(s=rng.choice(SUBJECTS))]
    for _ in range(rng.randint(2, 3)):
        parts.append(_sentence(rng, opinion))
    text = " . ".join(parts)
    return text + (" !" if rng.random() < 0.2 else " .")


def reviews(n: int, seed: int) -> list[str]:
    """``n`` reviews from a generator seeded with ``seed``."""
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def split_prompt(text: str, rng: random.Random, min_words: int = 2, max_words: int = 8) -> tuple[str, str]:
    """A prompt of the first 2-8 words (as the paper's IMDb prefixes) and the rest, which starts with a space."""
    words = text.split(" ")
    k = rng.randint(min_words, min(max_words, len(words) - 1))
    return " ".join(words[:k]), " " + " ".join(words[k:])


def prompts(n: int, seed: int) -> list[str]:
    """``n`` review prefixes from fresh reviews."""
    rng = random.Random(seed)
    return [split_prompt(review(rng), rng)[0] for _ in range(n)]
