"""How exactly can a learned observer place objects in decoded frames, reading them which way?

    python -m bench.observer_centres --videos '/tmp/raw/*.mp4' --clips 100 \\
        [--checkpoint checkpoints/default] [--steps 600] [--ways lut,peaks64,peaks128,mask128,product]

The reward model's sync head needs each object's centre to a fraction of a pixel: the
rater's kink rule finds 75% of its impacts at 0.25 px of centre error and 47% at 1 px
(BENCHMARKS.md, session 31), and the observer's CenterNet peaks, read at 64 px, place
them to about a pixel. This bench compares ways of reading centres on the same frames.

Frames: windows of 33 frames (at frames 0 and 48) of each of ``--clips`` videos (the
synthetic world's, e.g. ``duet synth`` output at 128 px), passed through the
checkpoint's video VAE (encode, decode), so they carry a decoder's blur and artefacts as
generated candidates do. Labels: the rater's probes (``core.probes.detect``) on each
decoded frame, each object's colour and coverage-weighted centre. Cached in
``--cache`` (reused when the settings match). Three quarters of the videos train, the
rest are scored.

Ways:
- ``lut``: no learning; each colour's centroid of the palette's pixel classes
  (``label_pixels``) where the probes found that colour: what a mask that copied the
  palette's classes would give (without the probes' opening, size floor and edge
  weighting).
- ``peaks64`` / ``peaks128``: the product's :class:`ClipObserver` (CenterNet heatmaps and
  in-cell offsets) trained with its own loss on the probes' objects, its frames read at 64
  (the product's default) or 128 px; a colour's centre is the mean of its peaks.
- ``mask128``: a small full-resolution network classifying every pixel into background
  or a palette colour (cross-entropy against the palette's classes of the colours the
  probes found, plus the L1 of each colour's soft centroid against the probes' centre);
  a colour's centre is the centroid of its pixels above probability 0.5.
- ``product``: the product's :class:`ClipObserver` as the reward stage builds it by
  default (frames at 128 px, heatmaps at 64, a pixel mask of
  ``RewardConfig.observer_mask_width`` channels), trained with its own loss; a colour's
  centre is its ``where`` where the mask finds the colour.

For ``product``, also the impacts the rater's tracker and kink rule read from its mask's
objects (:func:`pipelines.align.observer.impacts_by_rule`) against those the same rule
reads from the probes' objects, within a frame: precision and recall.

Printed per way, on the held-out videos' colour-frames where the probes see exactly one
object of the colour and the way finds it: how many, the mean, median and 90th
percentile of the centre error in pixels, and the presence error (the share of
colour-frames where the way and the probes disagree about the colour being there).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WINDOW = 33  # frames a window (1 + 4 k: whole VAE latent steps)
STARTS = (0, 48)
MAX_OBJECTS = 6
MIN_MASS = 10.0  # pixels above 0.5: fewer and the colour counts as absent
READ_S = 6.0  # seconds read from each video: both windows at 13.5 fps or more
PEAKS_SIZE = {"peaks64": 64, "peaks128": 128}


def reconstructions(paths: list[str], checkpoint: str) -> dict:
    """Decoded windows (N, F, 3, S, S) uint8, their probed objects (N, F, K, 3) as
    (colour, x, y) fractions of the side (colour -1: none) and each window's video."""
    from core.media import read_video
    from core.probes.detect import COLOR_NAMES, detect_objects, min_object_area
    from model.pipeline import load_pipeline

    vae = load_pipeline(checkpoint).video_vae.eval()
    frames, objects, video = [], [], []
    for v, path in enumerate(paths):
        clip, _ = read_video(path, 0.0, READ_S)
        side = clip.shape[1]
        for start in (s for s in STARTS if s + WINDOW <= clip.shape[0]):
            x = torch.from_numpy(clip[start : start + WINDOW]).permute(3, 0, 1, 2)[None]
            with torch.no_grad():
                y = vae.decode(vae.encode(x.float() / 127.5 - 1))[0, :, :WINDOW]
            decoded = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
            found = np.full((WINDOW, MAX_OBJECTS, 3), -1.0, np.float32)
            for f, frame in enumerate(decoded.numpy()):
                for k, d in enumerate(detect_objects(frame, min_object_area(side))[:MAX_OBJECTS]):
                    found[f, k] = (COLOR_NAMES.index(d["color"]), (d["x"] + 0.5) / side,
                                   (d["y"] + 0.5) / side)  # fmt: skip
            frames.append(decoded.permute(0, 3, 1, 2).contiguous())
            objects.append(torch.from_numpy(found))
            video.append(v)
        print(f"decoded {v + 1}/{len(paths)} videos ({len(frames)} windows)", flush=True)
    return {
        "frames": torch.stack(frames),
        "objects": torch.stack(objects),
        "video": torch.tensor(video),
    }


def load_or_make(args) -> dict:
    from safetensors.torch import load_file, save_file

    paths = sorted(glob.glob(args.videos))[: args.clips]
    if not paths:
        raise SystemExit(f"no videos match {args.videos!r}")
    settings = {"paths": paths, "checkpoint": os.path.abspath(args.checkpoint)}
    meta = args.cache + ".json"
    if os.path.exists(args.cache) and os.path.exists(meta):
        with open(meta) as f:
            if json.load(f) == settings:
                return load_file(args.cache)
    data = reconstructions(paths, args.checkpoint)
    save_file(data, args.cache)
    with open(meta, "w") as f:
        json.dump(settings, f)
    return data


class MaskCentres(nn.Module):
    """Every pixel's class (background or a palette colour) at full resolution, from the
    frame and its change from the previous frame."""

    def __init__(self, colours: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(6, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, colours + 1, 1),
        )  # fmt: skip

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, S, S) uint8 -> (B F, P + 1, S, S) logits."""
        x = frames.float() / 127.5 - 1
        change = torch.cat([torch.zeros_like(x[:, :1]), x.diff(dim=1)], 1)
        return self.net(torch.cat([x, change], 2).flatten(0, 1))


def resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    b, f, c, s, _ = frames.shape
    if s == size:
        return frames
    x = F.interpolate(frames.flatten(0, 1).float(), size=(size, size), mode="area")
    return x.round().to(torch.uint8).view(b, f, c, size, size)


def train_way(way: str, data: dict, train: torch.Tensor, args) -> nn.Module | None:
    from pipelines.align.observer import (
        ClipObserver,
        ObserverConfig,
        centroids,
        observation_loss,
        pixel_targets,
    )

    if way == "lut":
        return None
    frames, objects, present, centres = (data[k] for k in ("frames", "objects", "present",
                                                           "centres"))  # fmt: skip
    torch.manual_seed(args.seed)
    colours = present.shape[-1]
    if way == "mask128":
        model = MaskCentres(colours)
    elif way == "product":
        from pipelines.align.config import RewardConfig

        cfg = RewardConfig()
        model = ClipObserver(ObserverConfig(colours=colours, width=cfg.observer_width,
                                            size=frames.shape[-1], heat_size=cfg.observer_heat_size,
                                            mask_width=cfg.observer_mask_width), audio_channels=2)  # fmt: skip
    else:
        model = ClipObserver(ObserverConfig(size=PEAKS_SIZE[way]), audio_channels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        pick = train[torch.randint(len(train), (args.batch,), generator=gen)]
        start = int(torch.randint(WINDOW - args.window + 1, (), generator=gen))
        span = slice(start, start + args.window)
        clip = frames[pick, span]
        if way == "mask128":
            logits = model(clip)
            target = pixel_targets(clip, objects[pick, span], colours).flatten(0, 1)
            _, soft = centroids(logits.softmax(1)[:, 1:])
            on = present[pick, span].flatten(0, 1)
            err = (soft - centres[pick, span].flatten(0, 1)).abs().sum(-1)[on]
            loss = F.cross_entropy(logits, target)
            if err.numel():  # no object in the whole batch: the classes alone
                loss = loss + err.mean() * clip.shape[-1] / 4
        else:
            side = clip.shape[-1] if way == "product" else PEAKS_SIZE[way]
            seen = model(resize(clip, side), torch.zeros(len(pick), 2, 2 * args.window))
            quiet = torch.zeros(len(pick), args.window)
            labels = {"objects": objects[pick, span], "impact": quiet, "onset": quiet}
            if way == "product":
                labels["pixels"] = pixel_targets(clip, labels["objects"], colours)
            loss = observation_loss(seen, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"{way} step {step} loss {float(loss.detach()):.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def read_centres(way: str, model, frames: torch.Tensor, objects: torch.Tensor):
    """Held-out frames -> (found (N, F, P) bool, centres (N, F, P, 2)) as the way reads
    them, and for ``product`` the impacts (N, F) the rule reads from its mask's objects."""
    from core.probes.detect import COLOR_NAMES
    from pipelines.align.observer import (
        centroids,
        impacts_by_rule,
        mask_centres,
        mask_objects,
        pixel_targets,
    )

    b, f = frames.shape[:2]
    if way == "lut":
        colours = len(COLOR_NAMES)
        classes = pixel_targets(frames, objects, colours)
        weight = F.one_hot(classes, colours + 1)[..., 1:].permute(0, 1, 4, 2, 3)
        mass, where = centroids(weight.flatten(0, 1).float())
        return (mass > 0).view(b, f, -1), where.view(b, f, -1, 2), None
    if way == "mask128":
        found, where = [], []
        for i in range(b):  # one window at a time: full-resolution maps are large
            p = model(frames[i : i + 1]).softmax(1)[:, 1:]
            mass, centre = centroids((p > 0.5).float())
            found.append(mass > MIN_MASS)
            where.append(centre)
        return torch.stack(found), torch.stack(where), None
    if way == "product":
        found, where, impacts = [], [], []
        for i in range(b):
            seen = model(frames[i : i + 1], torch.zeros(1, 2, 2 * f))
            probs = seen["pixels"][0].softmax(1)[:, 1:]
            found.append(mask_centres(probs)[0])
            where.append(seen["where"][0])
            impacts.append(impacts_by_rule(mask_objects(probs.numpy()), frames.shape[-1]))
        return torch.stack(found), torch.stack(where), torch.stack(impacts)
    seen = model(resize(frames, PEAKS_SIZE[way]), torch.zeros(b, 2, 2 * f))
    return seen["counts"] == 1, seen["where"], None


def rule_agreement(found: torch.Tensor, objects: torch.Tensor, side: int) -> dict:
    """Impacts (N, F) the rule read from a mask's objects against those it reads from
    the probes' objects (N, F, K, 3), within a frame: precision and recall."""
    from bench.reward_concepts import impacts_by_rule
    from pipelines.align.observer import event_recall_precision

    probed = impacts_by_rule(objects, side, jitter=0.0)
    return {**event_recall_precision(found, probed), "probed": int(probed.sum()),
            "found": int(found.sum())}  # fmt: skip


def centre_errors(err: torch.Tensor) -> dict:
    """Mean, median and 90th percentile of centre errors in pixels (None when none)."""
    if err.numel() == 0:
        return {"mean_px": None, "median_px": None, "p90_px": None}
    return {"mean_px": round(float(err.mean()), 3), "median_px": round(float(err.median()), 3),
            "p90_px": round(float(err.quantile(0.9)), 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", required=True, help="glob of the world's videos")
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--cache", default="/tmp/observer_centres.safetensors")
    ap.add_argument("--ways", default="lut,peaks64,peaks128,mask128")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    unknown = sorted(set(ways) - {"lut", "peaks64", "peaks128", "mask128", "product"})
    if unknown:
        ap.error(f"unknown way(s) {unknown}")

    from core.probes.detect import COLOR_NAMES
    from pipelines.align.observer import colour_centres

    data = load_or_make(args)
    objects = data["objects"]
    colours = len(COLOR_NAMES)
    colour = objects[..., 0].long()
    one_hot = F.one_hot(colour.clamp_min(0), colours) * (colour >= 0)[..., None]
    labelled = one_hot.sum(2)  # (N, F, P) objects of each colour
    data["present"] = labelled > 0
    data["centres"] = colour_centres(objects, colours)
    videos = data["video"].unique()
    held = videos[int(0.75 * len(videos)) :]
    test = torch.isin(data["video"], held)
    train, val = torch.nonzero(~test)[:, 0], torch.nonzero(test)[:, 0]
    side = data["frames"].shape[-1]
    print(f"{len(train)} training windows, {len(val)} held out ({len(held)} videos), {side} px")

    rows = []
    for way in ways:
        began = time.monotonic()
        model = train_way(way, data, train, args)
        found, where, impacts = read_centres(way, model, data["frames"][val], objects[val])
        one = labelled[val] == 1
        scored = one & found
        err = (where - data["centres"][val]).norm(dim=-1)[scored] * side
        rows.append({
            "way": way, "found": int(scored.sum()), "of": int(one.sum()),
            **centre_errors(err),
            "presence_error": round(float((found != data["present"][val]).float().mean()), 4),
            "seconds": round(time.monotonic() - began),
        })  # fmt: skip
        if impacts is not None:
            rows[-1]["impacts"] = rule_agreement(impacts, objects[val], side)
        print(json.dumps(rows[-1]), flush=True)
    print("\n| way | one-object colour-frames found | mean px | median px | p90 px | "
          "presence error | s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for r in rows:
        print(f"| {r['way']} | {r['found']} / {r['of']} | {r['mean_px']} | {r['median_px']} | "
              f"{r['p90_px']} | {r['presence_error']} | {r['seconds']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
