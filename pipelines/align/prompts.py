"""Prompt sets of the alignment stages: training prompts and held-out prompts."""

from __future__ import annotations

from core.probes.captions import without_dialogue
from pipelines.align.config import PromptSplit


def manifest_prompts(data_cfg, fps: float) -> list[str]:
    """Distinct captions (dialogue removed) of every split, from any corpus.

    Real footage's captions are prompts like any other; which rater heads apply to
    them is :func:`pipelines.align.rater.skipped_heads`' business, not the prompt set's.
    """
    from pipelines.train.data import TrainDataError, load_clip_rows

    captions = []
    for split in ("train", "val"):
        try:
            rows = load_clip_rows(data_cfg, fps, split=split)
        except TrainDataError:
            continue
        captions += [row.text for row in rows]
    return caption_prompts(captions)


def caption_prompts(captions) -> list[str]:
    """Distinct, sorted prompts of captions: quoted dialogue, what follows it and the
    verb that introduces it dropped (:func:`core.probes.captions.without_dialogue`)."""
    found = {without_dialogue(c) for c in captions if c}
    return sorted(p for p in found if p)


def split_prompts(prompts: list[str], split: PromptSplit) -> tuple[list[str], list[str]]:
    """(training, held-out): every ``holdout_every``-th prompt of the sorted list is held out."""
    prompts = sorted(dict.fromkeys(prompts))[: split.max_prompts]
    held = [p for i, p in enumerate(prompts) if i % split.holdout_every == split.holdout_every - 1]
    train = [p for p in prompts if p not in held]
    if not train or not held:
        raise ValueError(
            f"{len(prompts)} prompt(s) cannot be split into training and held-out prompts "
            f"(holdout_every={split.holdout_every})"
        )
    return train, held
