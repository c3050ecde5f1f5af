"""What a clip shows, frame by frame, read from its decoded frames: the reward model's eyes.

**Why.** Every reward model that read only the VAE latents fitted its training pairs
and ordered unseen prompts' pairs at chance. Split in two (``bench/reward_concepts.py``,
BENCHMARKS.md session 23), the failure is perception: given the probes' own per-frame
observations (objects of each palette colour, impacts seen, onsets heard), a small
network over those and the prompt orders unseen prompts' pairs at 0.94 (sync) and
0.83 (adherence); predicted from the latents, the same observations are too coarse and
everything falls to chance. A group's candidates differ by a ball here or a frame there,
and the VAE decoder already knows how to turn latents into pixels; so the observer reads
the decoded frames, where a colour is a few pixels' values.

**What it learns from.** Dense labels on every candidate instead of one bit per pair:
the ``rlhf`` stage stores the probes' observations beside each candidate's latents
(:func:`pipelines.align.stages.observation_tensors`) wherever they mean something (the
synthetic world). The observer is trained on them first, then frozen, and the heads it
serves (:data:`OBSERVED_HEADS`) are scored by :class:`ObservedScores` from its
observations and the prompt, trained on the preference pairs (the rater's or people's).
A team with footage would supply the same per-frame observations from its own
detector; without them the reward model reads latents only
(:mod:`pipelines.align.reward`).

**The network.** :class:`ClipObserver`: per frame, a small convolution over the picture
and its change from the previous frame (at half the decoded resolution) gives a heatmap
per palette colour, as CenterNet finds objects: trained towards a peak of 1 at each
object's cell (penalty-reduced focal loss), an object is a local maximum above 0.5, the
count the number of them; an offset map per colour (CenterNet's, L1 at each object's
cell) says where in its cell the object lies, and ``where`` is the mean of those
positions (a cell is 4 pixels of a 128-pixel candidate); pooled per frame, a temporal
convolution gives the impact logit; the audio latents, resampled to the frame rate, the
onset logit. A density map whose sum is the count, tried first, did not learn to count
on decoded candidates in 3000 steps (BENCHMARKS.md, session 24).
:class:`ObservedScores`: per frame, the observed counts, the counts the prompt asks for
(attention from a learned query per colour over the prompt's word tokens), their
match, the frame-to-frame change, the colours' movement, impact and onset, through a
small MLP, averaged over frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The heads scored from observations: those the probes' observations describe.
OBSERVED_HEADS = ("sync", "adherence", "motion")
EVENT_FEATURES = 8  # ObservedScores' features of the impacts and onsets around a frame
HEAT_PRIOR = 0.1  # every cell's heatmap starts at this probability (CenterNet's choice)
PEAK = 0.5  # a local maximum of the heatmap above this is an object


@dataclass(frozen=True)
class ObserverConfig:
    colours: int = 8  # palette colours counted (core.probes.detect.COLOR_NAMES)
    width: int = 32  # channels of the frame convolution and the temporal ones
    size: int = 64  # decoded frames are read at size x size pixels
    score_width: int = 64  # hidden width of ObservedScores


class ClipObserver(nn.Module):
    def __init__(self, cfg: ObserverConfig, audio_channels: int):
        super().__init__()
        w, p = cfg.width, cfg.colours
        # Half resolution at once (4 x 4 windows, stride 2): a full-resolution layer
        # would cost most of a CPU step.
        self.picture = nn.Sequential(
            nn.Conv2d(6, w, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
        )  # fmt: skip
        # One heatmap a colour. It starts low everywhere: the many empty cells then
        # cost little at once, and the focal loss spends the steps on the objects.
        self.heat = nn.Conv2d(w, p, 1)
        nn.init.constant_(self.heat.bias, math.log(HEAT_PRIOR / (1 - HEAT_PRIOR)))
        # Where in its cell each colour's object lies, (y, x) in [0, 1) (CenterNet's
        # offset head): a cell is 4 pixels of a 128-pixel candidate, and the rater's
        # impacts are kinks of centres measured to a fraction of a pixel.
        self.offset = nn.Conv2d(w, 2 * p, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.constant_(self.offset.bias, 0.5)
        self.impact = nn.Sequential(
            nn.Conv1d(2 * w + 3 * p, w, 5, padding=2), nn.GELU(), nn.Conv1d(w, 1, 5, padding=2)
        )
        self.onset = nn.Sequential(
            nn.Conv1d(audio_channels, w, 5, padding=2), nn.GELU(),
            nn.Conv1d(w, w, 5, padding=2), nn.GELU(), nn.Conv1d(w, 1, 1),
        )  # fmt: skip

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, window=None) -> dict:
        """frames (B, F, 3, s, s) uint8, audio latents (B, Ca, Na) -> ``heat`` logits
        (B, F', P, s/2, s/2), ``offset`` (B, F', P, 2, s/2, s/2) in-cell positions,
        ``counts`` (B, F', P) and ``where`` (B, F', P, 2) of its peaks
        (:func:`heat_peaks`), ``impact`` and ``onset`` logits (B, F'); ``window``
        (start, length): those F' frames only."""
        start, f = window or (0, frames.shape[1])
        b = frames.shape[0]
        x = frames[:, max(0, start - 1) : start + f].float() / 127.5 - 1
        change = x.diff(dim=1)
        if start == 0:
            change = torch.cat([torch.zeros_like(x[:, :1]), change], 1)
        else:
            x = x[:, 1:]
        h = self.picture(torch.cat([x, change], 2).flatten(0, 1))  # (B F', w, s/2, s/2)
        heat = self.heat(h)  # (B F', P, s/2, s/2) logits
        offset = self.offset(h).unflatten(1, (-1, 2))  # (B F', P, 2, s/2, s/2)
        counts, where = heat_peaks(heat, offset)
        counts, where = counts.view(b, f, -1), where.view(b, f, -1, 2)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1).view(b, f, -1)
        feats = torch.cat([pooled, counts, where.flatten(2)], -1).transpose(1, 2)  # (B, C, F')
        sound = self.onset(audio.float())  # (B, 1, Na)
        onset = F.interpolate(sound, size=frames.shape[1], mode="linear", align_corners=False)
        return {
            "counts": counts,
            "where": where,
            "heat": heat.view(b, f, *heat.shape[1:]),
            "offset": offset.view(b, f, *offset.shape[1:]),
            "impact": self.impact(feats)[:, 0],
            "onset": onset[:, 0, start : start + f],
        }


def heat_peaks(
    heat: torch.Tensor, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmap logits (N, P, g, g) -> the objects in them: counts (N, P), the cells that
    are the largest of their 3 x 3 neighbourhood with probability above :data:`PEAK`,
    and ``where`` (N, P, 2), their mean position (y, x) in [0, 1], 0 where none (as the
    probes' centres of a colour are averaged): each peak's cell plus its ``offset``
    (N, P, 2, g, g) within the cell, or the cell's centre without one. Not
    differentiable: the focal and offset losses train the maps, these read them."""
    p = heat.detach().sigmoid()
    peak = ((p == F.max_pool2d(p, 3, 1, 1)) & (p > PEAK)).float()
    counts = peak.sum((2, 3))
    g = heat.shape[-1]
    cells = torch.arange(g, device=heat.device, dtype=torch.float32)
    if offset is None:
        inside = torch.full((2, 1, 1), 0.5, device=heat.device)
    else:
        inside = offset.detach().float().clamp(0, 1)  # (N, P, 2, g, g)
    cy = (peak * (cells[:, None] + inside[..., 0, :, :]) / g).sum((2, 3))
    cx = (peak * (cells[None] + inside[..., 1, :, :]) / g).sum((2, 3))
    return counts, torch.stack([cy, cx], -1) / counts.clamp_min(1)[..., None]


def heat_targets(objects: torch.Tensor, colours: int, grid: int, sigma: float = 1.0):
    """Objects (B, F, K, 3) as (colour index, x, y), x and y fractions of the frame, rows
    of colour -1 empty -> (B, F, colours, grid, grid) heatmap targets: 1 at each object's
    cell, falling off as a Gaussian of ``sigma`` cells around it (the largest where two
    of a colour overlap), as CenterNet trains its keypoints."""
    cells = torch.arange(grid, device=objects.device, dtype=torch.float32)

    def bump(coord):  # (B, F, K) fractions -> (B, F, K, grid), 1 at the object's cell
        cell = (coord * grid).floor().clamp(0, grid - 1)
        return torch.exp(-0.5 * ((cells - cell[..., None]) / sigma) ** 2)

    colour = objects[..., 0].long()
    one_hot = F.one_hot(colour.clamp_min(0), colours).float() * (colour >= 0)[..., None]
    per_object = torch.einsum("bfkp,bfky,bfkx->bfkpyx", one_hot, bump(objects[..., 2]),
                              bump(objects[..., 1]))  # fmt: skip
    return per_object.amax(2)


def offset_loss(offset: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """L1 of the in-cell positions ``offset`` (B, F, P, 2, g, g) at each object's cell
    against where in that cell the object (B, F, K, 3: colour, x, y) lies."""
    g = offset.shape[-1]
    b, f, k = torch.nonzero(objects[..., 0] >= 0, as_tuple=True)
    if b.numel() == 0:
        return offset.sum() * 0
    colour = objects[b, f, k, 0].long()
    pos = torch.stack([objects[b, f, k, 2], objects[b, f, k, 1]], -1) * g  # (n, 2) y, x
    cell = pos.floor().clamp(0, g - 1)
    found = offset[b, f, colour, :, cell[:, 0].long(), cell[:, 1].long()]  # (n, 2)
    return (found - (pos - cell)).abs().mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of heatmap ``logits`` against
    :func:`heat_targets`, per object: cells of target 1 are pulled up, the rest down,
    less near an object (the (1 - target)^4 factor) and less where already right."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    at_object = target > 1 - 1e-6
    pull_up = ((1 - p) ** 2 * p.log()).masked_fill(~at_object, 0)
    pull_down = ((1 - target) ** 4 * p**2 * (1 - p).log()).masked_fill(at_object, 0)
    return -(pull_up.sum() + pull_down.sum()) / at_object.sum().clamp_min(1)


def observation_loss(seen: dict, labels: dict) -> torch.Tensor:
    """The heatmaps' focal loss against the objects the probes found (``objects``
    (B, F, K, 3): colour, x, y), the in-cell positions' L1 at their cells, plus impact
    and onset cross-entropy against their labels (``impact`` and ``onset`` (B, F) in
    {0, 1})."""
    if "objects" not in labels:
        raise ValueError(
            "the observer learns where each object is: its labels need 'objects' "
            "(B, F, K, 3) as (colour index, x, y) beside the counts"
        )

    def events(logit, target):
        # Events are rare (a few frames of 33): a missed one costs as much as the quiet
        # frames together.
        pos = target.sum().clamp_min(1)
        weight = (target.numel() - pos) / pos
        return F.binary_cross_entropy_with_logits(logit, target, pos_weight=weight)

    heat = seen["heat"]
    target = heat_targets(labels["objects"], heat.shape[2], heat.shape[-1])
    return (
        focal_loss(heat, target)
        + offset_loss(seen["offset"], labels["objects"])
        + events(seen["impact"], labels["impact"])
        + events(seen["onset"], labels["onset"])
    )


def as_observations(seen: dict) -> dict:
    """The observer's output as :class:`ObservedScores` reads it (events as probabilities)."""
    return {
        "counts": seen["counts"],
        "where": seen["where"],
        "impact": seen["impact"].sigmoid(),
        "onset": seen["onset"].sigmoid(),
    }


class ObservedScores(nn.Module):
    """Scores of :data:`OBSERVED_HEADS` from observations and the prompt's word tokens."""

    def __init__(self, cfg: ObserverConfig, text_dim: int):
        super().__init__()
        w, p = cfg.score_width, cfg.colours
        self.query = nn.Parameter(torch.randn(p, w) / math.sqrt(w))
        self.key = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, w))
        self.value = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, w), nn.GELU(), nn.Linear(w, 1)
        )
        # Impacts and onsets a few frames apart still match (the rater allows two):
        # a learned window over both tracks says what happens around each frame.
        self.events = nn.Conv1d(2, EVENT_FEATURES, 5, padding=2)
        self.read = nn.Sequential(
            nn.Linear(7 * p + 4 + EVENT_FEATURES, w), nn.GELU(), nn.Linear(w, w), nn.GELU(),
            nn.Linear(w, len(OBSERVED_HEADS)),
        )  # fmt: skip

    def asked(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) word tokens -> (B, P) the count of each colour the prompt asks for."""
        k = self.key(tokens.float())  # (B, L, w)
        att = torch.einsum("pw,blw->bpl", self.query, k) / math.sqrt(k.shape[-1])
        att = att.masked_fill(~mask.bool()[:, None], float("-inf")).softmax(-1)
        return torch.einsum("bpl,bl->bp", att, self.value(tokens.float())[..., 0])

    def forward(self, seen: dict, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        counts = seen["counts"]  # (B, F, P)
        asked = self.asked(tokens, mask)[:, None].expand_as(counts)
        change = torch.cat([torch.zeros_like(counts[:, :1]), counts.diff(dim=1)], 1)
        where = seen["where"]  # (B, F, P, 2)
        step = torch.cat([torch.zeros_like(where[:, :1]), where.diff(dim=1)], 1)
        moved = step.norm(dim=-1) * counts.clamp(0, 1)  # a colour's centre moving, if there
        i, o = seen["impact"][..., None], seen["onset"][..., None]
        around = self.events(torch.cat([i, o], -1).transpose(1, 2)).transpose(1, 2)
        feats = torch.cat(
            [counts, asked, counts * asked, (counts - asked).abs(), change.abs(), change,
             moved, i, o, i * o, (i - o).abs(), around], -1,
        )  # fmt: skip
        return self.read(feats).mean(1)  # (B, len(OBSERVED_HEADS))


@torch.no_grad()
def decode_frames(video_vae: nn.Module, video: torch.Tensor, frames: int, size: int):
    """Latents (B, Cv, T, h, w) -> the first ``frames`` decoded frames at ``size`` pixels
    a side, (B, frames, 3, size, size) uint8 (what :class:`ClipObserver` reads)."""
    x = video_vae.decode(video.float())[:, :, :frames]  # (B, 3, F, H, W) in [-1, 1]
    b, _, f, h, w = x.shape
    x = x.transpose(1, 2).flatten(0, 1)
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).view(b, f, 3, size, size)


def colour_centres(objects: torch.Tensor, colours: int) -> torch.Tensor:
    """Objects (B, F, K, 3) as (colour, x, y) -> (B, F, colours, 2) each colour's mean
    centre (y, x), 0 where the frame has none: the observer's ``where``, from the probes."""
    colour = objects[..., 0].long()
    one_hot = F.one_hot(colour.clamp_min(0), colours).float()
    one_hot = one_hot * (colour >= 0)[..., None]  # (B, F, K, P)
    total = torch.einsum("bfkp,bfkc->bfpc", one_hot, objects[..., [2, 1]])
    return total / one_hot.sum(2)[..., None].clamp_min(1)


def centre_error(where: torch.Tensor, counts: torch.Tensor, objects: torch.Tensor) -> dict:
    """How far the observer's ``where`` (B, F, P, 2) lies from the labelled centres, in
    fractions of the frame's side, over the colour-frames where both it (``counts``
    (B, F, P)) and the labels see exactly one object of the colour (so ``where`` is that
    object's centre): how many such colour-frames and the mean distance."""
    exact = colour_centres(objects, counts.shape[-1]).to(where.device)
    labelled = F.one_hot(objects[..., 0].long().clamp_min(0), counts.shape[-1])
    labelled = (labelled * (objects[..., 0] >= 0)[..., None]).sum(2).to(counts.device)
    one = (counts == 1) & (labelled == 1)
    if not one.any():
        return {"colour_frames": 0}
    return {
        "colour_frames": int(one.sum()),
        "mean": round(float((where - exact).norm(dim=-1)[one].mean()), 5),
    }


def event_recall_precision(found: torch.Tensor, labels: torch.Tensor) -> dict:
    """Events (B, F) of probability ``found`` > 0.5 against ``labels`` in {0, 1}: a found
    event counts when a label lies within one frame of it, and the other way round."""
    hit = found > 0.5
    near = F.max_pool1d(labels.float()[:, None], 3, 1, 1)[:, 0] > 0
    around = F.max_pool1d(hit.float()[:, None], 3, 1, 1)[:, 0] > 0
    return {
        "precision": round(float((hit & near).sum()) / max(1, int(hit.sum())), 4),
        "recall": round(float((labels.bool() & around).sum()) / max(1, int(labels.sum())), 4),
    }
