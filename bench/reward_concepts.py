"""Where does the reward model lose the rater: reading the clip, or relating it to the prompt?

    python -m bench.reward_concepts --cache DIR --concepts exact,learned,none,frames,pixels

A diagnostic of the learned reward model (``pipelines.align.reward``) on a preference
table that ``python -m bench.reward_generalisation --manifest ... --cache DIR`` drew
(``DIR/preferences/preferences.parquet`` and ``DIR/inputs.safetensors``, the rows'
latents and prompt tokens). It splits the reward model in two, as a concept-bottleneck
model does:

1. **observations**, per video latent step (the VAE's temporal windows): how many
   objects of each palette colour the probes detect (averaged over the window's
   frames), whether the probes see an impact in it, whether they hear an onset in it.
   Labelled once by decoding every candidate's latents and probing the clip
   (``DIR/observations.safetensors``, reused; ``--workers`` processes);
2. **scores** per head, read only from those observations and the prompt: a small
   network over each step's (observed counts, counts the prompt asks for, impact,
   onset, frame-to-frame change), averaged over steps; "asks for" is attention from a
   learned query per colour over the prompt's word tokens. Trained with the stage's
   per-head Bradley-Terry loss on the training prompts' pairs.

``--concepts``: ``exact`` feeds the scores the probes' own observations (what the
reward model could do if it read the clip perfectly), ``learned`` those predicted
from the latents by the reward model's trunk (``--preset``; trained on the
observations of the training rows beside the pairs, observations detached from the
pair loss), ``none`` the product's reward model unchanged (its own heads).
``frames`` and ``pixels`` work frame by frame on tables whose candidate files carry
the stage's observations (``rlhf`` tables since session 23): ``frames`` the probes'
own, ``pixels`` those a small convolutional observer reads from the candidates'
decoded frames (``--size`` pixels a side, decoded once into the cache) and their
audio latents, trained first on the training rows' observations (``--observer-steps``
of ``--observer-batch`` candidates, ``--observer-window`` frames each), then frozen
while the scores train on the pairs; it prints the held-out count error (and that of
predicting no object), and impact and onset precision and recall within a frame. Held-out
agreement per head is on the pairs of prompts never trained on (the stage's split),
with binomial standard errors; ``--train-prompts`` cuts training to the first K
training prompts. The palette and the probes are the synthetic world's: this measures
the world heads (sync, adherence, motion), not footage.

``--mask-width``, ``--mask-reads``, ``--counts`` and ``--impacts`` (``pixels`` only)
choose the observer's way of placing and counting objects and reading impacts
(defaults: the product's, a pixel mask reading each pixel's colour, objects counted
by the heatmap's peaks and impacts by the rater's rule over the mask's objects;
``--mask-width 0 --impacts learned --size 64`` is the observer of sessions 25-42). ``--save DIR`` keeps
the trained reward model.

``--rule-features off`` scores ``frames`` and ``pixels`` from per-frame features only, as
the reward model did before session 44 (default ``on``: sync and motion by a linear read
of the rater's rules computed over the observations,
:func:`pipelines.align.observer.rule_features`).

``--mix none,counts,where,impact`` (``pixels`` only) then scores the trained observer's
own observations of every row with one part at a time replaced by the probes' (``none``:
all its own), each with fresh scores trained on the same pairs, and prints where its
counts miss (over, under, and the error rate on frames where the probes' count of a
colour changes against steady frames): which part of what it sees costs the heads.

``--counts peaks,mask`` (``pixels`` with ``--mix``) reads the same trained observer's
objects both ways, from its heatmap's peaks and from its mask's cleaned objects (as the
probes count theirs), and prints the count errors and mixes of each.

``--impact-rule 0,0.25,0.5`` first reads impacts the rater's way (its tracker and kink
rule, ``core.probes.tracks``) from the probes' object centres, moved by Gaussian
jitter of each given size in pixels of the candidates, and prints their precision and
recall against the stored impacts: how exactly an observer must place objects before
the rater's own rule finds its impacts; each row also scores the exact observations
with those impacts (``frames``, ``ObservedScores``) and prints the held-out agreement: what
an observer placing objects that exactly, reading impacts by the rule, would reach.

``--spoil`` (``frames`` only) takes one part of the exact observations away to say
what it is worth: ``impacts`` (none seen) or ``grid:N`` (each object's centre
snapped to an N-cell grid, as an observer with N cells a side places it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

OBS_NAME = "observations.safetensors"
WORLD = ("sync", "adherence", "motion")


def step_of(frame: int, temporal_factor: int) -> int:
    """The video latent step that holds ``frame`` (step 0 is frame 0 alone)."""
    return 0 if frame <= 0 else (frame - 1) // temporal_factor + 1


_PIPE: dict = {}


def _observe(job) -> dict:
    """Probe one candidate decoded from its latents: per-step colour counts, impact, onset."""
    from core.probes.detect import COLOR_NAMES, min_object_area
    from core.probes.probe import probe_clip
    from model.pipeline import DuetPipeline
    from pipelines.align.rater import IMPACT_TYPES

    checkpoint, video, audio, frames = job
    if "pipe" not in _PIPE:
        torch.set_num_threads(1)
        _PIPE["pipe"] = DuetPipeline.from_checkpoint(checkpoint).eval()
    pipe = _PIPE["pipe"]
    tf = pipe.config.video_vae.temporal_factor
    steps = video.shape[1]
    clip = pipe.decode_latents(video[None], audio[None], num_frames=frames)
    side = min(clip.frames.shape[1:3])
    probe = probe_clip(clip, include_frames=True, min_object_area=min_object_area(side))
    counts = np.zeros((steps, len(COLOR_NAMES)), np.float32)
    for f, dets in enumerate(probe["frames"]):
        for d in dets:
            counts[step_of(f, tf), COLOR_NAMES.index(d["color"])] += 1
    per_step = np.bincount([step_of(f, tf) for f in range(len(probe["frames"]))], minlength=steps)
    counts /= np.maximum(per_step, 1)[:, None]
    impact, onset = np.zeros(steps, np.float32), np.zeros(steps, np.float32)
    for e in probe["visual_events"]:
        if e["type"] in IMPACT_TYPES:
            impact[min(steps - 1, step_of(round(e["time_s"] * clip.fps), tf))] = 1
    for t in probe["audio_onsets_s"]:
        onset[min(steps - 1, step_of(round(t * clip.fps), tf))] = 1
    return {"counts": counts, "impact": impact, "onset": onset}


def per_step(file: dict, steps: int, temporal_factor: int) -> dict:
    """A candidate file's frame-by-frame observations (``rlhf`` stage tables since session
    23) as this bench's per-step ones."""
    counts = file["observed_colour_counts"].float()  # (frames, colours)
    index = torch.tensor([step_of(f, temporal_factor) for f in range(counts.shape[0])])
    summed = torch.zeros(steps, counts.shape[1]).index_add_(0, index, counts)
    out = {"counts": summed / torch.bincount(index, minlength=steps).clamp_min(1)[:, None]}
    for name in ("impact", "onset"):
        out[name] = torch.zeros(steps).index_reduce_(
            0, index, file[f"observed_{name}"].float(), "amax", include_self=True
        )
    return out


def observations(cache: str, rows, inputs: dict, checkpoint: str, frames: int, workers: int):
    path = os.path.join(cache, OBS_NAME)
    if os.path.exists(path):
        return load_file(path)
    files = [load_file(r["latent_uri"]) if r["latent_uri"] else {} for r in rows]
    if all("observed_colour_counts" in f for f in files):  # written by the stage
        from model.checkpoint import model_config, read_meta

        tf = model_config(read_meta(checkpoint), checkpoint).video_vae.temporal_factor
        steps = inputs["video"].shape[2]
        found = [per_step(f, steps, tf) for f in files]
        return {k: torch.stack([f[k] for f in found]) for k in found[0]}
    jobs = [(checkpoint, v, a, frames) for v, a in zip(inputs["video"], inputs["audio"],
                                                       strict=True)]  # fmt: skip
    t0 = time.perf_counter()
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            found = list(pool.map(_observe, jobs, chunksize=8))
    else:
        found = [_observe(j) for j in jobs]
    out = {k: torch.from_numpy(np.stack([f[k] for f in found])) for k in found[0]}
    save_file(out, path)
    print(f"observations of {len(jobs)} candidates in {time.perf_counter() - t0:.0f} s")
    return out


class ConceptScores(nn.Module):
    """Per-head scores from per-step observations (B, T, P), impact, onset and the prompt."""

    def __init__(self, colours: int, text_dim: int, heads: int, width: int = 64):
        super().__init__()
        self.query = nn.Parameter(torch.randn(colours, width) / math.sqrt(width))
        self.key = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.value = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width), nn.GELU(),
                                   nn.Linear(width, 1))  # fmt: skip
        self.read = nn.Sequential(nn.Linear(6 * colours + 4, width), nn.GELU(),
                                  nn.Linear(width, width), nn.GELU(), nn.Linear(width, heads))  # fmt: skip

    def forward(self, counts, impact, onset, tokens, mask) -> torch.Tensor:
        k = self.key(tokens.float())  # (B, L, w)
        att = torch.einsum("pw,blw->bpl", self.query, k) / math.sqrt(k.shape[-1])
        att = att.masked_fill(~mask.bool()[:, None], float("-inf")).softmax(-1)
        asked = torch.einsum("bpl,bl->bp", att, self.value(tokens.float())[..., 0])  # (B, P)
        asked = asked[:, None].expand_as(counts)
        change = torch.cat([torch.zeros_like(counts[:, :1]), counts.diff(dim=1)], 1)
        i, o = impact[..., None], onset[..., None]
        feats = torch.cat([counts, asked, counts * asked, (counts - asked).abs(), change.abs(),
                           change, i, o, i * o, (i - o).abs()], -1)  # fmt: skip
        return self.read(feats).mean(1)  # (B, heads)


class ObservingTrunk(nn.Module):
    """The product's reward network with observation heads on its video and audio tokens."""

    def __init__(self, reward, colours: int):
        super().__init__()
        self.reward = reward
        w = reward.net.width
        self.counts = nn.Linear(w, colours)  # per patch, summed over the step's patches
        nn.init.constant_(self.counts.bias, -4.0)  # near-empty patches at the start
        self.impact = nn.Linear(w, 1)
        self.onset = nn.Linear(w, 1)

    def forward(self, video, audio, tokens, mask):
        captured = {}
        hook = self.reward.norm.register_forward_hook(lambda m, i, o: captured.update(x=o))
        try:
            scores = self.reward(video, audio, tokens, mask)
        finally:
            hook.remove()
        x = captured["x"]  # (B, N, w): video patches, audio steps, words
        b, _, t, h, w = video.shape
        p = self.reward.patch
        patches = t * (-(-h // p)) * (-(-w // p))
        xv = x[:, :patches].reshape(b, t, patches // t, -1)
        counts = F.softplus(self.counts(xv)).sum(2)  # (B, T, P)
        impact = self.impact(xv.mean(2))[..., 0]
        onset = self.onset(x[:, patches : patches + t])[..., 0]
        return scores, counts, impact, onset


FRAMES_NAME = "frames{size}.safetensors"


def observed_inputs(cache: str, rows, inputs: dict, checkpoint: str, size: int) -> dict:
    """``inputs`` as the ``rlhf`` stage hands them to a reward model with an observer
    (:func:`pipelines.align.stages.observer_inputs`: every candidate's decoded frames and
    the probes' observations from its file); the decoding is cached in ``cache``."""
    from model.pipeline import DuetPipeline
    from pipelines.align.stages import observer_inputs

    path = os.path.join(cache, FRAMES_NAME.format(size=size))
    if os.path.exists(path):
        return {**inputs, **load_file(path)}
    t0 = time.perf_counter()
    pipe = DuetPipeline.from_checkpoint(checkpoint).eval()
    out = observer_inputs(pipe, rows, inputs, size)
    if "frames" not in out:
        raise SystemExit(f"{cache}: the candidates carry no observations (a table drawn "
                         "before session 23, or on footage): draw it again")  # fmt: skip
    save_file({k: v.contiguous() for k, v in out.items() if k not in inputs}, path)
    print(f"frames of {len(rows)} candidates decoded in {time.perf_counter() - t0:.0f} s")
    return out


def stored(rows, inputs: dict) -> dict:
    """``inputs`` plus the probes' observations stored in the candidates' files
    (:func:`pipelines.align.stages.stored_observations`), without decoding frames."""
    from pipelines.align.stages import stored_observations

    seen = stored_observations(rows)
    if not seen:
        raise SystemExit("the candidates carry no observations (a table drawn before "
                         "session 23, or on footage): draw it again")  # fmt: skip
    return {**inputs, **seen}


def _split(rows, train_prompts: int) -> tuple[list[int], list[int], int]:
    keep = set(sorted({r["prompt"] for r in rows if r["split"] == "train"})[: train_prompts
                                                                          or None])  # fmt: skip
    train = [i for i, r in enumerate(rows) if r["split"] == "train" and r["prompt"] in keep]
    val = [i for i, r in enumerate(rows) if r["split"] == "val"]
    return train, val, len(keep)


def _pairs(rows, index, min_margin: float) -> dict:
    from pipelines.align.config import HEADS
    from pipelines.align.preferences import preference_pairs

    sub = [rows[i] for i in index]
    where = {id(r): i for r, i in zip(sub, index, strict=True)}
    return {h: [(where[id(a)], where[id(b)]) for a, b in preference_pairs(sub, h, min_margin)]
            for h in HEADS}  # fmt: skip


def _fit(params, scores, pairs: dict, args, lr: float, weight_decay: float, batch_pairs: int):
    """Per-head Bradley-Terry on ``pairs`` (positions in the table): ``scores(idx, True)``
    gives (B, heads) scores and an optional extra loss."""
    from pipelines.align.config import HEADS
    from pipelines.align.reward import bradley_terry_loss

    gen = torch.Generator().manual_seed(args.seed)
    usable = [h for h in HEADS if pairs[h]]
    per_head = max(1, batch_pairs // len(usable))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        win, lose, cols = [], [], []
        for h in usable:
            pick = torch.randint(0, len(pairs[h]), (per_head,), generator=gen).tolist()
            win += [pairs[h][i][0] for i in pick]
            lose += [pairs[h][i][1] for i in pick]
            cols += [HEADS.index(h)] * per_head
        s, aux = scores(torch.tensor(win + lose), True)
        n, c = len(win), torch.tensor(cols)
        loss = bradley_terry_loss(s[torch.arange(n), c] - s[torch.arange(n, 2 * n), c])
        if aux is not None:
            loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _agreements(rows, every: torch.Tensor, train, val, min_margin: float) -> dict:
    from pipelines.align.config import HEADS

    out = {}
    for name, index in (("train", train), ("held_out", val)):
        found = _pairs(rows, index, min_margin)
        out[name] = {}
        for h in WORLD:
            k = HEADS.index(h)
            right = sum(float(every[a, k] > every[b, k]) for a, b in found[h])
            p = right / max(1, len(found[h]))
            out[name][h] = {"agreement": round(p, 3), "pairs": len(found[h]),
                            "stderr": round(math.sqrt(p * (1 - p) / max(1, len(found[h]))), 3)}  # fmt: skip
    return out


def _dims(inputs) -> dict:
    return {"video_channels": inputs["video"].shape[1], "audio_channels": inputs["audio"].shape[1],
            "text_dim": inputs["tokens"].shape[-1],
            "audio_per_video": inputs["audio"].shape[-1] // inputs["video"].shape[2]}  # fmt: skip


def run(rows, inputs, obs, args, concepts: str) -> dict:
    """``exact``, ``learned`` (latents) or ``none``: per-step observations."""
    from pipelines.align.config import HEADS, RewardConfig
    from pipelines.align.reward import RewardModel, net_config

    cfg = RewardConfig(preset=args.preset, steps=args.steps, seed=args.seed)
    torch.manual_seed(args.seed)
    train, val, n_prompts = _split(rows, args.train_prompts)
    dev = torch.device(args.device)
    data = {k: v.to(dev) for k, v in {**inputs, **obs}.items()}
    colours = obs["counts"].shape[-1]
    dims = _dims(inputs)
    trunk = ObservingTrunk(RewardModel(**dims, net=net_config(cfg)), colours).to(dev)
    head = ConceptScores(colours, dims["text_dim"], len(HEADS)).to(dev)
    params = list(head.parameters()) + (list(trunk.parameters()) if concepts != "exact" else [])

    def scores(idx, with_loss=False):
        s, counts, impact, onset = trunk(
            *(data[k][idx] for k in ("video", "audio", "tokens", "mask"))
        )
        aux = None
        if concepts == "none":
            return s, aux
        if with_loss and concepts == "learned":
            aux = (F.mse_loss(counts, data["counts"][idx])
                   + F.binary_cross_entropy_with_logits(impact, data["impact"][idx])
                   + F.binary_cross_entropy_with_logits(onset, data["onset"][idx]))  # fmt: skip
        if concepts == "exact":
            seen = (data["counts"][idx], data["impact"][idx], data["onset"][idx])
        else:  # detached: the pairs train the scores, the observations train the trunk
            seen = (counts.detach(), impact.detach().sigmoid(), onset.detach().sigmoid())
        return head(*seen, data["tokens"][idx], data["mask"][idx]), aux

    t0 = time.perf_counter()
    _fit(params, scores, _pairs(rows, train, cfg.min_margin), args, cfg.lr, cfg.weight_decay,
         cfg.batch_pairs)  # fmt: skip
    trunk.eval()
    head.eval()
    with torch.no_grad():
        every = torch.cat([scores(torch.arange(i, min(i + 128, len(rows))))[0]
                           for i in range(0, len(rows), 128)]).cpu()  # fmt: skip
        _, counts, _, _ = trunk(*(data[k][val] for k in ("video", "audio", "tokens", "mask")))
    out = {"seconds": round(time.perf_counter() - t0, 1), "train_prompts": n_prompts,
           # only the learned trunk's observation heads are trained
           "count_mae_val": round(float((counts - data["counts"][val]).abs().mean()), 4)
           if concepts == "learned" else None}  # fmt: skip
    return out | _agreements(rows, every, train, val, cfg.min_margin)


def impacts_by_rule(objects: torch.Tensor, side: int, jitter: float, seed: int = 0) -> torch.Tensor:
    """Objects (N, F, K, 3) as (colour, x, y) fractions -> (N, F) impacts as the rater
    finds them (:func:`pipelines.align.observer.impacts_by_rule`: its tracker and kink
    rule) from the centres in pixels of a ``side``-pixel frame, each moved by Gaussian
    noise of ``jitter`` pixels."""
    from core.probes.detect import COLOR_NAMES
    from pipelines.align.observer import impacts_by_rule as rule

    rng = np.random.default_rng(seed)
    found = []
    for clip in objects.numpy():
        dets = []
        for row in clip:
            row = row[row[:, 0] >= 0]
            xy = row[:, 1:] * side - 0.5 + rng.normal(0, jitter, row[:, 1:].shape)
            dets.append([
                {"color": COLOR_NAMES[int(c)], "shape": "circle", "x": float(x), "y": float(y),
                 "area": 1.0} for c, (x, y) in zip(row[:, 0], xy, strict=True)
            ])  # fmt: skip
        found.append(rule(dets, side))
    return torch.stack(found)


def spoil(inputs: dict, how: str) -> dict:
    """``inputs`` with one part of the probes' observations taken away (``--spoil``)."""
    if not how:
        return inputs
    out = dict(inputs)
    if how == "impacts":
        out["observed_impact"] = torch.zeros_like(inputs["observed_impact"])
    elif how.startswith("grid:") and how[5:].isdigit() and int(how[5:]) > 0:
        cells, objects = int(how[5:]), inputs["observed_objects"].clone()
        snapped = ((objects[..., 1:] * cells).floor().clamp(0, cells - 1) + 0.5) / cells
        objects[..., 1:] = torch.where(objects[..., :1] >= 0, snapped, objects[..., 1:])
        out["observed_objects"] = objects
    else:
        raise SystemExit(f"--spoil {how!r}: give impacts or grid:N (N cells a side)")
    return out


def run_frames(rows, inputs, args, concepts: str) -> dict:
    """``frames``: the probes' frame-by-frame observations scored by the product's
    :class:`pipelines.align.observer.ObservedScores`; ``pixels``: the product's reward
    model with its observer (:func:`pipelines.align.reward.train_reward_model` on the
    stage's inputs), which learns to see them in the decoded frames first."""
    from pipelines.align.config import RewardConfig
    from pipelines.align.observer import colour_centres
    from pipelines.align.reward import (
        observe_rows,
        save_reward_model,
        score_rows,
        train_reward_model,
    )

    cfg = RewardConfig(preset=args.preset, steps=args.steps, seed=args.seed,
                       observer_steps=args.observer_steps, observer_batch=args.observer_batch,
                       observer_window=args.observer_window, observer_size=args.size,
                       observer_mask_width=args.mask_width, observer_mask_reads=args.mask_reads,
                       observer_rule_impacts=args.impacts == "rule",
                       observer_rule_features=args.rule_features == "on",
                       observer_mask_counts=args.counts.split(",")[0] == "mask")  # fmt: skip
    train, val, n_prompts = _split(rows, args.train_prompts)
    t0 = time.perf_counter()
    out = {"train_prompts": n_prompts}
    dev = torch.device(args.device)
    exact = {k: inputs[f"observed_{k}"].to(dev) for k in ("counts", "impact", "onset")}
    exact["where"] = colour_centres(inputs["observed_objects"], exact["counts"].shape[-1])
    exact["where"] = exact["where"].to(dev)
    if concepts == "pixels":
        kept = set(train) | set(val)
        sub = [r | {"split": r["split"] if i in kept else "unused"} for i, r in enumerate(rows)]
        model, report = train_reward_model(sub, inputs, cfg, _dims(inputs), device=dev)
        out["observer"] = report["observer"]
        if args.save:  # before the reads below change how its observer counts
            save_reward_model(args.save, model, {"report": report})
        with torch.no_grad():
            every = torch.cat([score_rows(model, inputs, range(i, min(i + 64, len(rows))))
                               for i in range(0, len(rows), 64)])  # fmt: skip
        if args.mix:
            out["reads"] = {}
            for way in args.counts.split(","):  # the same observer, counting this way
                model.observer.cfg = dataclasses.replace(model.observer.cfg, counts=way)
                seen = {k: v.to(dev) for k, v in observe_rows(model, inputs).items()
                        if k in exact}  # fmt: skip
                read = {"count_errors": count_errors(seen["counts"][val], exact["counts"][val]),
                        "mixes": {}}  # fmt: skip
                for part in args.mix.split(","):  # the observer's, with this part exact
                    mixed = {**seen, **({} if part == "none" else {part: exact[part]})}
                    got = _agreements(rows, fit_scores(rows, mixed, inputs, args, cfg, train,
                                                       dev), train, val, cfg.min_margin)  # fmt: skip
                    read["mixes"][part] = got["held_out"]
                out["reads"][way] = read
    else:
        every = fit_scores(rows, exact, inputs, args, cfg, train, dev)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out | _agreements(rows, every.cpu(), train, val, cfg.min_margin)


def fit_scores(rows, seen: dict, inputs: dict, args, cfg, train, dev) -> torch.Tensor:
    """The product's ObservedScores trained on the training pairs over the observations
    ``seen`` (``counts``, ``where``, ``impact``, ``onset`` of every row); every row's
    scores (N, heads)."""
    from pipelines.align.config import HEADS
    from pipelines.align.observer import OBSERVED_HEADS, ObservedScores, ObserverConfig

    torch.manual_seed(args.seed)
    head = ObservedScores(ObserverConfig(colours=seen["counts"].shape[-1],
                                         rule_features=cfg.observer_rule_features),
                          inputs["tokens"].shape[-1]).to(dev)  # fmt: skip
    tokens, mask = inputs["tokens"].to(dev), inputs["mask"].to(dev)
    cols = [HEADS.index(h) for h in OBSERVED_HEADS]

    def scores(idx, with_loss=False):
        full = torch.zeros(len(idx), len(HEADS), device=dev)
        full[:, cols] = head({k: v[idx] for k, v in seen.items()}, tokens[idx], mask[idx])
        return full, None

    pairs = _pairs(rows, train, cfg.min_margin)
    pairs = {h: (v if h in OBSERVED_HEADS else []) for h, v in pairs.items()}
    _fit(list(head.parameters()), scores, pairs, args, cfg.lr, cfg.weight_decay,
         cfg.batch_pairs)  # fmt: skip
    head.eval()
    with torch.no_grad():
        return torch.cat([scores(torch.arange(i, min(i + 128, len(rows))))[0]
                          for i in range(0, len(rows), 128)]).cpu()  # fmt: skip


def count_errors(found: torch.Tensor, exact: torch.Tensor) -> dict:
    """Where the observer's counts (N, F, P) miss the probes': colour-frames over and
    under, and the error rate on frames where the probes' count of a colour changes
    (from or to the next frame: what the motion head reads) against steady ones."""
    wrong = found != exact
    change = torch.zeros_like(wrong)
    step = exact.diff(dim=1) != 0
    change[:, 1:] |= step
    change[:, :-1] |= step
    return {
        "colour_frames": wrong.numel(),
        "over": int((found > exact).sum()),
        "under": int((found < exact).sum()),
        "error_at_changes": round(float(wrong[change].float().mean()), 4),
        "change_colour_frames": int(change.sum()),
        "error_when_steady": round(float(wrong[~change].float().mean()), 4),
    }


def main(argv=None) -> int:
    from pipelines.align.config import RewardConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="a bench.reward_generalisation --cache DIR")
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--frames", type=int, default=33, help="frames a candidate")
    ap.add_argument("--concepts", default="exact,learned,none,frames,pixels")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument(
        "--train-prompts", type=int, default=0, help="first K training prompts (0: all)"
    )
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="processes that label observations")
    ap.add_argument("--size", type=int, default=64, help="decoded frames' side (pixels)")
    ap.add_argument("--observer-steps", type=int, default=1500)
    ap.add_argument("--observer-batch", type=int, default=8, help="candidates a step")
    ap.add_argument("--observer-window", type=int, default=16, help="frames a candidate a step")
    ap.add_argument("--mask-width", type=int, default=RewardConfig.observer_mask_width,
                    help="pixels only: the observer's pixel-mask channels (0: centres from "
                    "the heatmap peaks)")  # fmt: skip
    ap.add_argument(
        "--mask-reads",
        choices=("palette", "colour", "neighbourhood"),
        default=RewardConfig.observer_mask_reads,
        help="pixels only: the mask reads each pixel's colour as the colour table does, its "
        "colour alone, or its neighbourhood",
    )
    ap.add_argument("--rule-features", choices=("on", "off"), default="on",
                    help="sync and motion scored by a read of the rater's rules over the "
                    "observations (the product's default) or from per-frame features")  # fmt: skip
    ap.add_argument("--impacts", choices=("rule", "learned"), default="rule",
                    help="pixels only: impacts by the rater's rule from the mask's objects "
                    "(needs --mask-width) or the observer's learned head")  # fmt: skip
    ap.add_argument("--counts", default="mask" if RewardConfig.observer_mask_counts else "peaks",
                    help="pixels only: how the observer counts objects, peaks or mask (needs "
                    "--mask-width); with --mix a list, e.g. peaks,mask: its observations "
                    "are read each way (the first trains the reward model)")  # fmt: skip
    ap.add_argument("--spoil", default="", help="frames only: impacts | grid:N")
    ap.add_argument("--impact-rule", default="", help="jitters in pixels, e.g. 0,0.25,0.5")
    ap.add_argument("--mix", default="",
                    help="pixels only: score the observer's observations with each named part "
                    "exact, e.g. none,counts,where,impact")  # fmt: skip
    ap.add_argument("--save", default="", help="pixels only: keep its trained reward model here")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.impacts == "rule" and args.mask_width < 1:
        ap.error("--impacts rule reads the observer's pixel masks: give --mask-width >= 1")
    counts = args.counts.split(",")
    if not set(counts) <= {"peaks", "mask"} or (len(counts) > 1 and not args.mix):
        ap.error("--counts: peaks or mask, a list of them only with --mix")
    if "mask" in counts and args.mask_width < 1:
        ap.error("--counts mask reads the observer's pixel masks: give --mask-width >= 1")

    from pipelines.align.preferences import TABLE_NAME, read_preferences
    from pipelines.align.reward import split_by_prompt

    rows = read_preferences(os.path.join(args.cache, "preferences", TABLE_NAME))
    split_by_prompt(rows, args.holdout)
    inputs = load_file(os.path.join(args.cache, "inputs.safetensors"))
    obs = None  # the per-step observations (exact, learned, none), labelled once needed
    results = {}
    observed = None  # the stored observations and the decoded frames, once needed
    if args.impact_rule:
        from pipelines.align.observer import event_recall_precision

        seen = stored(rows, inputs)
        from model.checkpoint import model_config

        where = os.path.join(args.checkpoint, "config.json")
        with open(where) as f:
            model_cfg = model_config(json.load(f), where)
        labelled = seen["observed_impact"]
        results["impact_rule"] = {}
        for jitter in [float(j) for j in args.impact_rule.split(",")]:
            found = impacts_by_rule(seen["observed_objects"], int(model_cfg.width), jitter,
                                    args.seed)  # fmt: skip
            pr = event_recall_precision(found, labelled)
            # What the heads would agree if an observer placed objects this exactly and
            # read impacts by the rule: the exact observations with these impacts.
            r = run_frames(rows, {**seen, "observed_impact": found}, args, "frames")
            pr["held_out"] = {h: r["held_out"][h]["agreement"] for h in WORLD}
            results["impact_rule"][str(jitter)] = pr
            print(f"impacts by the rater's rule, centres jittered {jitter} px: precision "
                  f"{pr['precision']:.3f}, recall {pr['recall']:.3f} ({int(found.sum())} found, "
                  f"{int(labelled.sum())} stored); scored with them, held-out "
                  + ", ".join(f"{h} {v:.3f}" for h, v in pr["held_out"].items()))  # fmt: skip
    for concepts in args.concepts.split(","):
        if concepts == "pixels":
            observed = observed_inputs(
                args.cache, rows, inputs, os.path.abspath(args.checkpoint), args.size
            )
            r = run_frames(rows, observed, args, concepts)
        elif concepts == "frames":  # the stored observations alone: no frames decoded
            r = run_frames(rows, spoil(observed or stored(rows, inputs), args.spoil), args,
                           concepts)  # fmt: skip
        else:
            if obs is None:
                obs = observations(args.cache, rows, inputs, os.path.abspath(args.checkpoint),
                                   args.frames, args.workers)  # fmt: skip
            r = run(rows, inputs, obs, args, concepts)
        results[concepts] = r
        error = ""
        if r.get("count_mae_val") is not None:
            error = f", held-out count error {r['count_mae_val']}"
        if (r.get("observer") or {}).get("val"):
            error = f", observer on held-out candidates: {json.dumps(r['observer']['val'])}"
        spoiled = f" less {args.spoil}" if concepts == "frames" and args.spoil else ""
        print(f"\n{concepts} observations{spoiled}, {r['train_prompts']} training prompts, "
              f"{r['seconds']} s{error}:")  # fmt: skip
        for h in WORLD:
            v, t = r["held_out"][h], r["train"][h]
            print(f"  {h:10s} held-out {v['agreement']:.3f} +- {v['stderr']:.3f} ({v['pairs']} "
                  f"pairs)  train {t['agreement']:.3f}")  # fmt: skip
        for way, read in (r.get("reads") or {}).items():
            print(f"  counted by its {way}, against the probes' counts (held out): "
                  f"{read['count_errors']}")  # fmt: skip
            for part, got in read["mixes"].items():
                print(f"    its observations with {part} exact: held-out "
                      + ", ".join(f"{h} {got[h]['agreement']:.3f}" for h in WORLD))  # fmt: skip
    if args.json:
        from core import storage

        storage.write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
