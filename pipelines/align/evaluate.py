"""Probe metrics of a checkpoint on held-out prompts: SFT, RLHF and Fast side by side.

Every (prompt, seed) pair is generated through :func:`model.generate.generate` (the
path users take, ``quality="full"`` or ``"fast"``), rated by the programmatic rater
(:mod:`pipelines.align.rater`) and, given a reward model, scored by it on the
sampled latents. Summaries are means with their standard errors over the pairs;
``network_evals`` and ``wall_s`` are per clip.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.align.config import HEADS
from pipelines.align.observer import decode_frames
from pipelines.align.rater import FRAME_PART_KEYS, rate_clip


@dataclass
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    quality: str = "full"
    steps: int = 20
    sampler: str = "heun"
    text_scale: float = 4.0
    duration_s: float = 17 / 16


def mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return m, se


@torch.no_grad()
def evaluate_prompts(
    pipeline, prompts: list[str], settings: EvalSettings, reward_model=None, keep=frozenset()
) -> dict:
    """Rows and their summary; ``keep``: (prompt, seed) pairs whose frames come back
    too (``frames``: {(prompt, seed): (T, H, W, 3) uint8}), for a contact sheet."""
    from model.generate import GenerationRequest, generate

    pipeline.eval()
    rows, frames = [], {}
    tokens = mask = None
    if reward_model is not None:
        tokens, mask = pipeline.text_encoder.encode(prompts)
    for pi, prompt in enumerate(prompts):
        for seed in settings.seeds:
            request = GenerationRequest(
                prompt=prompt,
                duration_s=settings.duration_s,
                seed=seed,
                steps=settings.steps,
                sampler=settings.sampler,
                text_scale=settings.text_scale,
                quality=settings.quality,
            )
            started = time.perf_counter()
            result = generate(request, pipeline=pipeline)
            wall = time.perf_counter() - started
            scores = rate_clip(prompt, result.clip)
            if (prompt, seed) in keep:
                frames[(prompt, seed)] = result.clip.frames
            row = {"prompt": prompt, "seed": seed, "wall_s": wall,
                   "network_evals": result.metadata["network_evals"]}  # fmt: skip
            row.update({h: scores.get(h) for h in HEADS})
            row["sync_recall"] = scores["sync_recall"]
            row["sync_precision"] = scores["sync_precision"]
            row["adherence_colour_frames"] = scores["adherence_colour_frames"]
            row.update({k: scores[k] for k in FRAME_PART_KEYS})
            if reward_model is not None:
                v, a = result.latents
                extra = {}
                if getattr(reward_model, "reads_frames", False):  # it sees decoded frames
                    extra["frames"] = decode_frames(pipeline.video_vae, v,
                                                   result.clip.frames.shape[0],
                                                   reward_model.observer_config.size).cpu()  # fmt: skip
                r = reward_model(
                    v.float().cpu(), a.float().cpu(), tokens[pi : pi + 1], mask[pi : pi + 1],
                    **extra,
                )[0]  # fmt: skip
                for k, h in enumerate(HEADS):
                    row[f"reward_{h}"] = float(r[k])
            rows.append(row)
    return {"rows": rows, "summary": summarize(rows), "frames": frames}


def contact_sheet(clips: dict[str, dict], keys: list, every: int = 4) -> np.ndarray:
    """(H, W, 3) uint8: for each (prompt, seed) of ``keys``, one row of every
    ``every``-th frame per model of ``clips`` ({model: {(prompt, seed): (T, H, W, 3)}}),
    in the models' order, a 4-pixel white rule between keys. Models without a key's
    frames are left out of its block."""
    blocks = []
    for key in keys:
        rows = [np.concatenate(list(c[key][::every]), axis=1) for c in clips.values() if key in c]
        if not rows:
            continue
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        blocks.append(np.concatenate(rows, axis=0))
        blocks.append(np.full((4, width, 3), 255, np.uint8))
    if not blocks:
        raise ValueError("contact_sheet: no frames for any of the keys")
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0))) for b in blocks[:-1]]
    return np.concatenate(blocks, axis=0)


def summarize(rows: list[dict]) -> dict:
    keys = [*HEADS, "sync_recall", "sync_precision", "adherence_colour_frames", *FRAME_PART_KEYS]
    keys += ["network_evals", "wall_s"]
    keys += [k for k in rows[0] if k.startswith("reward_")] if rows else []
    out = {"clips": len(rows)}
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        m, se = mean_se(values)
        out[key] = {"mean": round(m, 4), "se": round(se, 4), "n": len(values)}
    return out


def paired_by_objects(a: dict, b: dict, key: str) -> dict[str, dict]:
    """``b - a`` as :func:`paired_difference`, split by how many objects the prompt
    names: ``"one object"`` and ``"several objects"`` (prompts naming none are left
    out). A few-step student that draws a lone object as its teacher does but loses
    objects of busier scenes shows its loss in the second group only."""
    from core.probes.captions import parse_caption

    def group(prompt: str) -> str | None:
        named = sum(parse_caption(prompt).values())
        return None if named == 0 else ("one object" if named == 1 else "several objects")

    groups = {r["prompt"]: group(r["prompt"]) for r in (*a["rows"], *b["rows"])}

    def only(result: dict, name: str) -> dict:
        return {"rows": [r for r in result["rows"] if groups[r["prompt"]] == name]}

    out = {}
    for name in ("one object", "several objects"):
        ours = only(b, name)
        d, se = paired_difference(only(a, name), ours, key)
        out[name] = {"mean": round(d, 4), "se": round(se, 4), "clips": len(ours["rows"])}
    return out


def paired_difference(a: dict, b: dict, key: str) -> tuple[float, float]:
    """Mean and standard error of ``b - a`` over the (prompt, seed) pairs both rated."""
    index = {(r["prompt"], r["seed"]): r for r in a["rows"]}
    diffs = []
    for r in b["rows"]:
        other = index.get((r["prompt"], r["seed"]))
        if other is not None and r.get(key) is not None and other.get(key) is not None:
            diffs.append(float(r[key]) - float(other[key]))
    return mean_se(diffs)
