"""The caption vocabulary a checkpoint was trained on, recorded in its config.json.

A tiny model knows only the words of its captions; a prompt of other words gets
noise with no warning. Every stage's final checkpoint records, under
``extra.caption_vocabulary``, the sorted words of the captions it trained on joined
with its parent checkpoint's, so a checkpoint carries everything its chain saw.
``duet generate`` warns about words outside it and names the nearest known ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

VOCABULARY_KEY = "caption_vocabulary"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def caption_words(text: str) -> list[str]:
    """Lower-case words of a caption or prompt, in order (digits and punctuation dropped)."""
    return _WORD.findall(text.lower())


def vocabulary_of(texts: Iterable[str], inherited: Iterable[str] = ()) -> list[str]:
    """The sorted words of ``texts`` and ``inherited`` (a parent checkpoint's)."""
    words = set(inherited)
    for text in texts:
        words.update(caption_words(text))
    return sorted(words)


def checkpoint_vocabulary(meta: dict) -> list[str] | None:
    """The vocabulary a checkpoint's metadata records; None for checkpoints without one."""
    found = (meta.get("extra") or {}).get(VOCABULARY_KEY)
    return list(found) if isinstance(found, list) else None


def unknown_words(prompt: str, vocabulary: Iterable[str]) -> dict[str, list[str]]:
    """Each word of ``prompt`` outside ``vocabulary`` -> up to three nearest known words."""
    known = sorted(set(vocabulary))
    out: dict[str, list[str]] = {}
    for word in caption_words(prompt):
        if word not in known and word not in out:
            out[word] = difflib.get_close_matches(word, known, n=3, cutoff=0.6)
    return out


def pick_examples(captions: list[str], vocabulary: list[str] | None, limit: int) -> list[str]:
    """Up to ``limit`` distinct captions with every word known, varied: the shortest,
    then each next one the caption bringing the most words not shown yet (deterministic),
    so six examples are not six colours of one sentence."""
    known = set(vocabulary) if vocabulary else None
    pool = sorted(
        {
            " ".join(text.split())
            for text in captions
            if caption_words(text) and (known is None or set(caption_words(text)) <= known)
        },
        key=lambda t: (len(t), t),
    )
    picked: list[str] = []
    shown: set[str] = set()
    while pool and len(picked) < limit:
        # The shortest first, then whichever shows the most words not shown yet.
        best = max(pool, key=lambda t: (len(set(caption_words(t)) - shown), -len(t)))
        best = best if picked else pool[0]
        pool.remove(best)
        picked.append(best)
        shown |= set(caption_words(best))
    return picked


def training_captions(curated_uri: str, fps: float, frame_buckets=None) -> list[str]:
    """Captions of the training-split clips of a curated manifest that are long enough
    for ``frame_buckets`` (the data config's default when None)."""
    from pipelines.train.config import DataConfig
    from pipelines.train.data import load_clip_rows

    buckets = {"frame_buckets": tuple(frame_buckets)} if frame_buckets else {}
    rows = load_clip_rows(DataConfig(curated_uri=curated_uri, **buckets), fps)
    return [row.text for row in rows if getattr(row, "text", "")]
