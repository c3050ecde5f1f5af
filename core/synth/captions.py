"""Captions templated from a shot's ground truth (colour, shape, count, motion)."""

from __future__ import annotations

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "face": "faces"}


def count_phrase(count: int, color: str, noun: str) -> str:
    """``a red circle`` / ``an orange square`` / ``three blue triangles``."""
    if count == 1:
        article = "an" if color[0] in "aeiou" else "a"
        return f"{article} {color} {noun}"
    word = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    return f"{word} {color} {PLURALS.get(noun, noun + 's')}"


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_objects(objects: list[dict]) -> str:
    """Group objects by (colour, shape) in order of first appearance and count them."""
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        key = (obj["color"], obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    return join_phrases([count_phrase(n, c, s) for (c, s), n in groups.items()])


def plural_verb(objects: list[dict], singular: str, plural: str) -> str:
    return singular if len(objects) == 1 else plural
