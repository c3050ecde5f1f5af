"""Prompt sets of the alignment stages: training prompts and held-out prompts."""

from __future__ import annotations

from core.probes.captions import parse_caption
from pipelines.align.config import PromptSplit


def manifest_prompts(data_cfg, fps: float) -> list[str]:
    """Distinct captions (dialogue removed) that name a coloured shape, from every split."""
    from pipelines.train.data import TrainDataError, load_clip_rows

    found = set()
    for split in ("train", "val"):
        try:
            rows = load_clip_rows(data_cfg, fps, split=split)
        except TrainDataError:
            continue
        for row in rows:
            caption = row.text.split('"')[0].strip()
            if caption and parse_caption(caption):
                found.add(caption)
    return sorted(found)


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
