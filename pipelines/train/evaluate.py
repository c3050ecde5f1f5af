"""Prompt adherence of a checkpoint on held-out prompts, measured by the world's probes.

Each prompt is generated with a few seeds and probed like any video
(:func:`core.probes.probe.probe_clip`). Two numbers per clip:

- ``adherence``: multiset IoU of the (colour, shape) objects the prompt names and
  those detected (missing and extra objects both cost: recall and precision);
- ``colour_recall`` / ``colour_precision``: of the colours the prompt names, the
  fraction seen, and of the colours seen, the fraction named.

Prompts that name no coloured shape (talking faces named only by speech, say) are
skipped and counted.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from core.probes.captions import (
    caption_adherence,
    observed_objects,
    parse_caption,
    without_dialogue,
)
from core.probes.probe import probe_clip
from model.generate import GenerationRequest, generate
from model.pipeline import DuetPipeline


@dataclass
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 12
    duration_s: float = 2.0
    text_scale: float = 4.0


def held_out_prompts(rows, limit: int = 8) -> list[str]:
    """Distinct captions of held-out clips that name coloured shapes, without their
    dialogue; captions that had none come first (they are whole scenes the model
    was trained to draw, where a face without its line is only a part of one)."""
    seen, whole, cut = set(), [], []
    for row in rows:
        caption = without_dialogue(row.text)
        if caption and caption not in seen and parse_caption(caption):
            seen.add(caption)
            (cut if '"' in row.text else whole).append(caption)
    return (whole + cut)[:limit]


def clip_scores(prompt: str, clip) -> dict:
    probe = probe_clip(clip, include_frames=True)
    frames = probe["frames"]
    wanted_colours = {c for c, _ in parse_caption(prompt)}
    seen_colours = {c for c, _ in observed_objects(frames)}
    hit = wanted_colours & seen_colours
    return {
        "adherence": caption_adherence(prompt, frames),
        "colour_recall": len(hit) / len(wanted_colours) if wanted_colours else 1.0,
        "colour_precision": len(hit) / len(seen_colours) if seen_colours else 0.0,
    }


def evaluate_adherence(
    pipeline: DuetPipeline, prompts: list[str], settings: EvalSettings | None = None
) -> dict:
    """Mean scores over prompts x seeds, and the per-clip rows."""
    settings = settings or EvalSettings()
    rows = []
    for prompt in prompts:
        if not parse_caption(prompt):
            continue
        for seed in settings.seeds:
            request = GenerationRequest(
                prompt=prompt,
                duration_s=settings.duration_s,
                seed=seed,
                steps=settings.steps,
                text_scale=settings.text_scale,
            )
            clip = generate(request, pipeline=pipeline).clip
            rows.append({"prompt": prompt, "seed": seed, **clip_scores(prompt, clip)})
    if not rows:
        raise ValueError("no prompt names a coloured shape the probes can measure")
    summary = {
        key: statistics.fmean(r[key] for r in rows)
        for key in ("adherence", "colour_recall", "colour_precision")
    }
    return {**summary, "clips": len(rows), "rows": rows}


@torch.no_grad()
def held_out_flow_loss(
    pipeline: DuetPipeline,
    rows,
    times: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    seed: int = 0,
) -> float:
    """Mean rectified-flow loss on held-out clips with their own captions.

    Every clip is scored at the same flow times with the same noise (seeded), so two
    checkpoints are compared on identical inputs: a lower value means the model
    predicts held-out audio-video better given the text, which is what each
    training stage optimises, measured where it was not trained.
    """
    from model.flow_matching import add_noise, flow_matching_loss, velocity_target
    from pipelines.train.data import decode_clip

    if not rows:
        raise ValueError("no held-out clips to score")
    pipeline.eval()
    device = pipeline.device
    losses = []
    for i, row in enumerate(rows):
        video, audio = decode_clip(row, pipeline)
        zv = pipeline.video_vae.encode(video[None].to(device))
        za = pipeline.audio_vae.encode(audio[None].to(device))
        text = pipeline.encode_text([row.text])
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        for t_value in times:
            nv = torch.randn(zv.shape, generator=gen).to(device)
            na = torch.randn(za.shape, generator=gen).to(device)
            t = torch.full((1,), t_value, device=device)
            pred_v, pred_a = pipeline.dit(add_noise(zv, nv, t), add_noise(za, na, t), t, text)
            loss, _ = flow_matching_loss(
                pred_v, pred_a, velocity_target(zv, nv), velocity_target(za, na)
            )
            losses.append(float(loss))
    return statistics.fmean(losses)
