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
on decoded candidates in 3000 steps (BENCHMARKS.md, session 24). With ``mask_width``,
a pixel-class network at full resolution beside the heatmaps (read then at
``heat_size``): a colour's ``where`` is the centroid of its confident pixels, a quarter
of a pixel off at the median where the peaks are 1.3 (session 43), and with ``impacts``
"rule" the impacts are those the rater's own tracker and kink rule find in the mask's
objects (:func:`impacts_by_rule`), which agree with the rule on the probes' objects at
precision 0.88 and recall 0.91 where the learned head reached 0.14 / 0.52. With
``counts`` "mask" the counts and centres are those of the mask's cleaned objects too,
as the probes count and place theirs; with ``mask_reads`` "colour" the mask reads each
pixel's colour alone and learns the probes' colour table, which their cleaning of
objects then turns into their objects (session 45); with "palette" it reads the colour
as the table does, quantised to the table's cell and as distances to the colours the
table compares it with (:class:`PaletteFeatures`), and gets the table's edge pixels
right too (session 46).
:class:`ObservedScores`: per frame, the observed counts, the counts the prompt asks for
(attention from a learned query per colour over the prompt's word tokens), their
match, the frame-to-frame change, the colours' movement, impact and onset, through a
small MLP, averaged over frames. With ``rule_features``, sync and motion are instead a
linear read of the rater's own sync and motion rules computed over the observations
(:func:`rule_features`), which a mean over frames cannot form, and the MLP scores
adherence alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from core.probes.detect import (
    BACKGROUND,
    COLOR_NAMES,
    LUT_SHIFT,
    color_lut,
    min_object_area,
    object_pixels,
    subpixel_centroid,
)
from core.probes.probe import TRACK_GATE_FRACTION
from core.probes.tracks import segment_events
from core.synth import palette
from pipelines.align.rater import IMPACT_TYPES, SYNC_TOLERANCE_FRAMES

# The heads scored from observations: those the probes' observations describe.
OBSERVED_HEADS = ("sync", "adherence", "motion")
EVENT_FEATURES = 8  # ObservedScores' features of the impacts and onsets around a frame
HEAT_PRIOR = 0.1  # every cell's heatmap starts at this probability (CenterNet's choice)
PEAK = 0.5  # a local maximum of the heatmap above this is an object
IMPACT_WAYS = ("learned", "rule")
COUNT_WAYS = ("peaks", "mask")
MASK_READS = ("neighbourhood", "colour", "palette")
# The mask reads that class each pixel by its own colour alone (1 x 1 layers), trained
# on the probes' colour table; "neighbourhood" is the other.
PIXEL_READS = ("colour", "palette")
# ObservedScores' clip-level features with ``rule_features`` (:func:`rule_features`):
# the first SYNC_RULES score sync, the rest motion.
RULE_FEATURES, SYNC_RULES = 7, 4
# A colour is in the mask when at least this share of the probes' smallest object's
# area is confidently of it.
MASK_MIN_SHARE = 0.5


@dataclass(frozen=True)
class ObserverConfig:
    colours: int = 8  # palette colours counted (core.probes.detect.COLOR_NAMES)
    width: int = 32  # channels of the frame convolution and the temporal ones
    size: int = 64  # decoded frames are read at size x size pixels
    score_width: int = 64  # hidden width of ObservedScores
    # The heatmaps read the frames pooled to heat_size pixels a side (0: size): a
    # full-resolution CenterNet did not learn to find objects (session 42).
    heat_size: int = 0
    # Channels of the full-resolution pixel-class network (0: none, ``where`` from the
    # heatmap peaks): each colour's centre is then the centroid of its confident
    # pixels, to a quarter of a pixel where the peaks place it to about one.
    mask_width: int = 0
    # What the mask reads: "neighbourhood" (two 3 x 3 layers over the frame and its
    # change, trained to call a colour only where the probes found an object of it) or
    # "colour" (each pixel's own colour through 1 x 1 layers, trained on the probes'
    # colour table; the probes' cleaning of objects is then :func:`mask_objects`'s).
    # Without the found-only rule, which no local network can learn, and with a plain
    # cross-entropy whose probabilities stay calibrated at 0.5: an exact table's
    # objects are the probes' own (session 45). "palette": the same 1 x 1 layers over
    # :class:`PaletteFeatures` (the pixel at its table cell's centre and its distances
    # to the table's prototype colours), which learn the table's edges as well as its
    # insides (held out: pixel errors a fifth of "colour"'s, session 46).
    mask_reads: str = "neighbourhood"
    # How impacts are read: "learned" (a temporal convolution over the pooled frames)
    # or "rule" (the rater's tracker and kink rule over the mask's objects; needs
    # mask_width).
    impacts: str = "learned"
    # ObservedScores scores sync and motion by a linear read of the rater's own rules
    # computed over the observations (:func:`rule_features`) instead of its per-frame
    # features: a mean over frames cannot form the rules' ratios and medians, and with
    # the probes' exact observations it ordered unseen prompts' pairs at 0.75-0.81
    # (sync) and 0.74-0.80 (motion); beside the rules it still overfitted (session 44).
    rule_features: bool = False
    # How a colour's objects are counted: "peaks" (the heatmap's, at heat_size) or
    # "mask" (the mask's cleaned objects, :func:`mask_objects`, as the probes count
    # theirs; needs mask_width).
    counts: str = "peaks"

    def __post_init__(self):
        if self.impacts not in IMPACT_WAYS:
            raise ValueError(f"observer impacts {self.impacts!r}: one of {IMPACT_WAYS}")
        if self.counts not in COUNT_WAYS:
            raise ValueError(f"observer counts {self.counts!r}: one of {COUNT_WAYS}")
        if self.mask_reads not in MASK_READS:
            raise ValueError(f"observer mask_reads {self.mask_reads!r}: one of {MASK_READS}")
        for way in ("impacts", "counts"):
            if getattr(self, way) in ("rule", "mask") and self.mask_width < 1:
                raise ValueError(f"observer {way} {getattr(self, way)!r} reads the pixel "
                                 "masks: set mask_width")  # fmt: skip
        heat = self.heat_size or self.size
        if self.size % heat:
            raise ValueError(f"observer heat_size {heat} must divide size {self.size}")


class PaletteFeatures(nn.Module):
    """What the probes' colour table (:func:`core.probes.detect.color_lut`) reads of a
    pixel: (N, 3, H, W) pixels in [-1, 1] -> (N, 3 + K, H, W), the centre of the pixel's
    cell of the table (the table's own quantisation) and its squared distance to each of
    the K prototype colours the table weighs it against (every palette colour by day and
    night, every backdrop tone). The table is a rule over those distances (the nearest
    palette colour, when within a bound and nearer than every backdrop), so layers over
    them learn it at the edges, where pixels blend an object's colour with the
    backdrop's. Held out, over raw colours the same layers missed 2.5% of the objects'
    pixels and the rater's rule read impacts from their objects at precision 0.65 and
    recall 0.69; over these, 0.5% and 0.85 / 0.83 (session 46). The prototypes are a
    buffer, saved with the weights they were learned with."""

    def __init__(self):
        super().__init__()
        tones = [rgb for _, rgb in palette.color_prototypes()] + palette.background_prototypes()
        prototypes = torch.from_numpy(np.stack(tones).astype(np.float32)) / 127.5 - 1
        self.register_buffer("prototypes", prototypes)  # (K, 3)
        self.channels = 3 + len(tones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cell = 1 << LUT_SHIFT
        level = torch.div((x + 1) * 127.5 + 0.5, cell, rounding_mode="floor").clamp(0, 255 // cell)
        centre = (level * cell + cell / 2) / 127.5 - 1  # (N, 3, H, W)
        gap = centre[:, None] - self.prototypes[None, :, :, None, None]  # (N, K, 3, H, W)
        return torch.cat([centre, -4 * gap.square().sum(2)], 1)  # the scale measured


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
        self.cfg = cfg
        self.mask = None
        if cfg.mask_width and cfg.mask_reads in PIXEL_READS:
            # Every pixel's class from its own colour: the probes' colour table is a
            # function of it alone.
            m = cfg.mask_width
            reads = [PaletteFeatures()] if cfg.mask_reads == "palette" else []
            inputs = reads[0].channels if reads else 3
            self.mask = nn.Sequential(
                *reads, nn.Conv2d(inputs, m, 1), nn.GELU(), nn.Conv2d(m, m, 1), nn.GELU(),
                nn.Conv2d(m, p + 1, 1),
            )  # fmt: skip
        elif cfg.mask_width:
            # Every pixel's class, background or a palette colour, at full resolution:
            # two 3 x 3 layers see a 5 x 5 neighbourhood, enough for a colour's edge.
            m = cfg.mask_width
            self.mask = nn.Sequential(
                nn.Conv2d(6, m, 3, padding=1), nn.GELU(),
                nn.Conv2d(m, m, 3, padding=1), nn.GELU(),
                nn.Conv2d(m, p + 1, 1),
            )  # fmt: skip

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, window=None) -> dict:
        """frames (B, F, 3, s, s) uint8, audio latents (B, Ca, Na) -> ``heat`` logits
        (B, F', P, g, g) (g: half the heatmaps' side), ``offset`` (B, F', P, 2, g, g)
        in-cell positions, ``counts`` (B, F', P) of its peaks (:func:`heat_peaks`),
        ``where`` (B, F', P, 2) (the mask's centroids where it sees the colour, else
        the peaks'), ``impact`` and ``onset`` logits (B, F'), and with a mask
        ``pixels`` (B, F', P + 1, s, s) class logits; ``window`` (start, length):
        those F' frames only."""
        start, f = window or (0, frames.shape[1])
        b = frames.shape[0]
        x = frames[:, max(0, start - 1) : start + f].float() / 127.5 - 1
        change = x.diff(dim=1)
        if start == 0:
            change = torch.cat([torch.zeros_like(x[:, :1]), change], 1)
        else:
            x = x[:, 1:]
        both = torch.cat([x, change], 2).flatten(0, 1)  # (B F', 6, s, s)
        pool = frames.shape[-1] // (self.cfg.heat_size or frames.shape[-1])
        h = self.picture(F.avg_pool2d(both, pool) if pool > 1 else both)  # (B F', w, g, g)
        heat = self.heat(h)  # (B F', P, g, g) logits
        offset = self.offset(h).unflatten(1, (-1, 2))  # (B F', P, 2, g, g)
        counts, where = heat_peaks(heat, offset)
        seen = {}
        if self.mask is not None:
            pixels = self._pixel_logits(both)  # (B F', P + 1, s, s)
            found, centre = mask_centres(pixels.detach().softmax(1)[:, 1:])
            where = torch.where(found[..., None], centre, where)
            seen["pixels"] = pixels.view(b, f, *pixels.shape[1:])
        counts, where = counts.view(b, f, -1), where.view(b, f, -1, 2)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1).view(b, f, -1)
        feats = torch.cat([pooled, counts, where.flatten(2)], -1).transpose(1, 2)  # (B, C, F')
        sound = self.onset(audio.float())  # (B, 1, Na)
        onset = F.interpolate(sound, size=frames.shape[1], mode="linear", align_corners=False)
        return seen | {
            "counts": counts,
            "where": where,
            "heat": heat.view(b, f, *heat.shape[1:]),
            "offset": offset.view(b, f, *offset.shape[1:]),
            "impact": self.impact(feats)[:, 0],
            "onset": onset[:, 0, start : start + f],
        }

    def _pixel_logits(self, both: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(N, 6, s, s) frames and changes -> (N, P + 1, s, s) class logits; without
        gradients a chunk of frames at a time (full-resolution activations are large)."""
        if self.cfg.mask_reads in PIXEL_READS:
            both = both[:, :3]  # the frame, not its change
        if torch.is_grad_enabled():
            return self.mask(both)
        return torch.cat([self.mask(both[i : i + chunk]) for i in range(0, len(both), chunk)])

    @torch.no_grad()
    def observe(self, frames: torch.Tensor, audio: torch.Tensor) -> dict:
        """What :class:`ObservedScores` reads (:func:`as_observations`), impacts by the
        rater's rule from the mask's objects when ``impacts`` is "rule", and the counts
        and centres of those objects when ``counts`` is "mask"."""
        seen = self(frames, audio)
        out = as_observations(seen)
        if self.cfg.impacts == "learned" and self.cfg.counts == "peaks":
            return out
        probs = seen["pixels"].softmax(2)[:, :, 1:].float().cpu().numpy()  # (B, F, P, s, s)
        pictures = frames.cpu().numpy()  # (B, F, 3, s, s): objects centred as the probes do
        clips = [mask_objects(c, p) for c, p in zip(probs, pictures, strict=True)]
        device = out["onset"].device
        if self.cfg.impacts == "rule":
            side = frames.shape[-1]
            out["impact"] = torch.stack([impacts_by_rule(c, side) for c in clips]).to(device)
        if self.cfg.counts == "mask":  # and where they are, as the probes place them
            counted = [object_counts(c, self.cfg.colours, frames.shape[-1]) for c in clips]
            out["counts"] = torch.stack([c for c, _ in counted]).to(device)
            out["where"] = torch.stack([w for _, w in counted]).to(device)
        return out


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


def mask_centres(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, s, s) pixel probabilities of each colour -> found (N, P), where at least
    half the probes' smallest object's pixels are above 0.5, and their centroid
    (N, P, 2) as (y, x) fractions of the side."""
    s = probs.shape[-1]
    mass, centre = centroids((probs > 0.5).float())
    return mass >= MASK_MIN_SHARE * min_object_area(s), centre


def centroids(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, s, s) pixel weights -> their sum (N, P) and centroid (N, P, 2) as (y, x)
    fractions of the side (pixel centres at (i + 0.5) / s)."""
    s = weight.shape[-1]
    c = (torch.arange(s, device=weight.device, dtype=weight.dtype) + 0.5) / s
    mass = weight.sum((2, 3))
    cy = (weight.sum(3) * c).sum(2) / mass.clamp_min(1e-6)
    cx = (weight.sum(2) * c).sum(2) / mass.clamp_min(1e-6)
    return mass, torch.stack([cy, cx], -1)


def pixel_targets(
    frames: torch.Tensor, objects: torch.Tensor, colours: int, found_only: bool = True
) -> torch.Tensor:
    """(B, F, 3, s, s) uint8 frames and the probes' objects (B, F, K, 3) -> (B, F, s, s)
    class targets: 1 + the palette colour of each pixel (the probes' own colour table,
    :func:`core.probes.detect.color_lut`), else 0; with ``found_only`` only where the
    probes found that colour in the frame (stray pixels of a colour no object has are
    background too)."""
    table = table_classes(frames)  # (B, F, s, s)
    if not found_only:
        return table
    cls = table - 1
    colour = objects[..., 0].long()
    present = (F.one_hot(colour.clamp_min(0), colours) * (colour >= 0)[..., None]).sum(2) > 0
    keep = torch.gather(present, 2, cls.clamp_min(0).flatten(2)).view_as(cls) & (cls >= 0)
    return torch.where(keep, cls + 1, torch.zeros_like(cls))


def table_classes(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 pixels -> (..., H, W) 1 + each one's palette colour by the
    probes' colour table (:func:`core.probes.detect.color_lut`), 0 where it is none."""
    lut = _colour_table(pixels.device)
    n = lut.shape[0]
    r, g, b = (pixels >> LUT_SHIFT).long().unbind(-3)
    return lut.flatten()[(r * n + g) * n + b] + 1  # the table says -1 for no colour


@functools.lru_cache(maxsize=4)
def _colour_table(device: torch.device) -> torch.Tensor:
    """The probes' colour table on ``device``, made once: every training step reads it."""
    return torch.from_numpy(color_lut().astype(np.int64)).to(device)


def observer_pixel_targets(cfg: ObserverConfig, frames: torch.Tensor, objects: torch.Tensor):
    """:func:`pixel_targets` as an observer with ``cfg`` learns them: found-only for
    the neighbourhood mask, the colour table's for the masks that read a pixel alone
    (:data:`PIXEL_READS`)."""
    found_only = cfg.mask_reads not in PIXEL_READS
    return pixel_targets(frames, objects, cfg.colours, found_only=found_only)


def colour_table_loss(mask: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A colour mask's cross-entropy on loose ``pixels`` (n, 3) uint8 against the probes'
    colour table (:func:`table_classes`): its classes are a function of each pixel's
    colour alone, so pixels drawn from many frames teach it as whole frames do, at a
    fraction of the cost."""
    column = pixels.T[None, :, :, None]  # (1, 3, n, 1)
    x = column.float().div(127.5).sub(1)
    return F.cross_entropy(mask(x), table_classes(column))  # (1, P + 1, n, 1), (1, n, 1)


def mask_loss(
    pixels: torch.Tensor, target: torch.Tensor, objects: torch.Tensor, balanced: bool = True
) -> torch.Tensor:
    """Class logits ``pixels`` (B, F, P + 1, s, s) against :func:`pixel_targets`
    (cross-entropy; ``balanced``: the mean over background pixels plus that over
    objects', else over all pixels, whose probabilities then stay calibrated), plus the
    L1 of each colour's soft centroid against the probes' centre where the frame has
    exactly one object of it, in units of 4 pixels (so a quarter-pixel error still
    pulls)."""
    s = pixels.shape[-1]
    logits = pixels.flatten(0, 1)
    # Objects are a few percent of the pixels: background and objects weigh alike, or
    # calling everything background is where the steps go first.
    per_pixel = F.cross_entropy(logits, target.flatten(0, 1), reduction="none")
    on = target.flatten(0, 1) > 0
    if balanced:
        loss = per_pixel[~on].mean() + (per_pixel[on].mean() if on.any() else 0)
    else:
        loss = per_pixel.mean()
    colour = objects[..., 0].long()
    per = (F.one_hot(colour.clamp_min(0), logits.shape[1] - 1) * (colour >= 0)[..., None]).sum(2)
    one = (per == 1).flatten(0, 1)  # (B F, P)
    if not one.any():
        return loss
    _, soft = centroids(logits.softmax(1)[:, 1:])
    exact = colour_centres(objects, logits.shape[1] - 1).flatten(0, 1).to(soft.dtype)
    return loss + (soft - exact).abs().sum(-1)[one].mean() * s / 4


def mask_objects(probs: np.ndarray, frames: np.ndarray | None = None) -> list[list[dict]]:
    """One clip's pixel probabilities (F, P, s, s) -> per frame the objects as the
    probes report them to the tracker: each colour's connected regions above 0.5 of at
    least the probes' smallest object's area, cleaned as the probes clean theirs
    (:func:`core.probes.detect.object_pixels`: the fringes a 3 x 3 opening removes go,
    holes are filled), in the probes' order (by x, then y), centred in pixels (pixel
    centres at integers): with the clip's ``frames`` (F, 3, s, s) uint8 as the probes
    centre theirs (:func:`core.probes.detect.subpixel_centroid`, each edge pixel
    weighted by how far its colour lies from the backdrop's towards the object's),
    else at the region's probability-weighted centroid. The rater's kink rule needs
    the former: on the colour table's own regions, impacts from probability-weighted
    centres had precision 0.69 and recall 0.78, from the probes' centring 1.0 and 1.0
    (session 45)."""
    f, p, s, _ = probs.shape
    least = min_object_area(s)
    out = []
    on = probs > 0.5
    seen = on.sum((2, 3)) >= least  # (F, P): most colours are absent from most frames
    for k in range(f):
        found = []
        if frames is not None:  # the probes' labels: a colour where one is confident
            picture = np.ascontiguousarray(frames[k].transpose(1, 2, 0))
            labels = np.where(on[k].any(0), on[k].argmax(0), BACKGROUND).astype(np.int8)
        for c in np.nonzero(seen[k])[0]:
            regions, _ = ndimage.label(on[k, c])
            sizes = np.bincount(regions.ravel())
            for r, box in enumerate(ndimage.find_objects(regions), start=1):
                if box is None or sizes[r] < least:
                    continue
                cleaned = object_pixels(regions[box] == r)
                area = 0 if cleaned is None else int(cleaned[1].sum())
                if area < least:
                    continue
                if frames is not None:
                    origin = (box[0].start, box[1].start)
                    x, y = subpixel_centroid(picture, labels, cleaned[1], origin, int(c))
                else:
                    weight = probs[k, c][box] * cleaned[1]
                    ys, xs = np.mgrid[box[0], box[1]]
                    total = float(weight.sum())
                    x, y = float((weight * xs).sum() / total), float((weight * ys).sum() / total)
                found.append({"color": COLOR_NAMES[c], "shape": "circle", "x": x, "y": y,
                              "area": float(area)})  # fmt: skip
        found.sort(key=lambda d: (d["x"], d["y"]))
        out.append(found)
    return out


def object_counts(
    objects: list[list[dict]], colours: int, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame objects (:func:`mask_objects`) of ``side``-pixel frames -> counts
    (F, colours) of each palette colour's objects in each frame and ``where``
    (F, colours, 2), their mean centre (y, x) as fractions of the side, 0 where none
    (the probes' centres: :func:`colour_centres`)."""
    table = torch.full((len(objects), max([1, *map(len, objects)]), 3), -1.0)  # (F, K, 3)
    for k, found in enumerate(objects):
        for j, d in enumerate(found):
            table[k, j] = torch.tensor([COLOR_NAMES.index(d["color"]), d["x"] + 0.5, d["y"] + 0.5])
    table[..., 1:] /= side  # colour -1 rows stay out of both sums below
    colour = table[..., 0].long()
    counts = (F.one_hot(colour.clamp_min(0), colours) * (colour >= 0)[..., None]).sum(1)
    return counts.float(), colour_centres(table[None], colours)[0]


def impacts_by_rule(objects: list[list[dict]], side: int) -> torch.Tensor:
    """Per-frame objects (:func:`mask_objects`) of ``side``-pixel frames -> (F,) 1 at
    each frame where the rater's tracker and kink rule
    (:func:`core.probes.tracks.segment_events`) find an impact or collision, else 0.
    The rule's thresholds are in pixels a frame, so it runs in frame units (fps 1)."""
    f = len(objects)
    found = torch.zeros(f)
    for ev in segment_events(objects, (0, f), 1.0, TRACK_GATE_FRACTION * side)[1]:
        if ev["type"] in IMPACT_TYPES:
            found[min(f - 1, max(0, round(ev["time_s"])))] = 1
    return found


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


def observation_loss(seen: dict, labels: dict, balanced_mask: bool = True) -> torch.Tensor:
    """The heatmaps' focal loss against the objects the probes found (``objects``
    (B, F, K, 3): colour, x, y), the in-cell positions' L1 at their cells, plus impact
    and onset cross-entropy against their labels (``impact`` and ``onset`` (B, F) in
    {0, 1}); with a mask, :func:`mask_loss` against ``pixels`` (:func:`pixel_targets`),
    ``balanced_mask`` or not."""
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
    loss = (
        focal_loss(heat, target)
        + offset_loss(seen["offset"], labels["objects"])
        + events(seen["impact"], labels["impact"])
        + events(seen["onset"], labels["onset"])
    )
    if "pixels" in seen:
        if "pixels" not in labels:
            raise ValueError(
                "this observer classifies pixels: its labels need 'pixels' (B, F, s, s), "
                "pixel_targets of the frames it read"
            )
        loss = loss + mask_loss(seen["pixels"], labels["pixels"], labels["objects"], balanced_mask)
    return loss


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
        self.sync_rules = self.motion_rules = None
        if cfg.rule_features:
            self.sync_rules = nn.Linear(SYNC_RULES, 1)
            self.motion_rules = nn.Linear(RULE_FEATURES - SYNC_RULES, 1)

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
        scores = self.read(feats).mean(1)  # (B, len(OBSERVED_HEADS))
        if self.sync_rules is None:
            return scores
        rules = rule_features(seen)  # (B, RULE_FEATURES)
        by_head = {
            "sync": self.sync_rules(rules[:, :SYNC_RULES]),
            "adherence": scores[:, OBSERVED_HEADS.index("adherence"), None],
            "motion": self.motion_rules(rules[:, SYNC_RULES:]),
        }
        return torch.cat([by_head[h] for h in OBSERVED_HEADS], -1)


def rule_features(seen: dict) -> torch.Tensor:
    """Observations (``counts`` (B, F, P), ``where`` (B, F, P, 2), ``impact`` and ``onset``
    (B, F) probabilities) -> (B, :data:`RULE_FEATURES`): the rater's sync and motion
    (:mod:`pipelines.align.rater`) computed over them. Sync: the F1, recall and precision
    of impacts that have an onset within ``SYNC_TOLERANCE_FRAMES`` and onsets that have
    an impact (each counted once, not matched one to one as the rater does), and whether
    there are any events. Motion: the share of frames holding the median number of
    objects (0 when that is none), the share of each colour's objects whose colour was
    in the previous frame within the tracker's gate (where the colour's mean centre
    stands for its objects), and their product, the rater's motion score."""
    hit = (seen["impact"] > 0.5).float()  # (B, F)
    heard = (seen["onset"] > 0.5).float()
    reach = int(SYNC_TOLERANCE_FRAMES)

    def near(x):  # 1 where an event lies within the tolerance
        return F.max_pool1d(x[:, None], 2 * reach + 1, 1, reach)[:, 0]

    recall = (hit * near(heard)).sum(1) / hit.sum(1).clamp_min(1)
    precision = (heard * near(hit)).sum(1) / heard.sum(1).clamp_min(1)
    f1 = 2 * recall * precision / (recall + precision).clamp_min(1e-6)
    events = ((hit.sum(1) + heard.sum(1)) > 0).float()
    counts = seen["counts"].float()  # (B, F, P)
    total = counts.sum(-1)  # (B, F)
    median = total.median(dim=1).values  # (B,)
    stable = (total == median[:, None]).float().mean(1) * (median > 0)
    step = seen["where"].float().diff(dim=1).norm(dim=-1)  # (B, F - 1, P)
    linked = counts[:, 1:] * (counts[:, :-1] > 0) * (step <= TRACK_GATE_FRACTION)
    continuity = linked.sum((1, 2)) / counts[:, 1:].sum((1, 2)).clamp_min(1)
    return torch.stack([f1, recall, precision, events, stable, continuity, stable * continuity], -1)


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
