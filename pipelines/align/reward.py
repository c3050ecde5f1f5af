"""The learned multi-head reward model: per-head Bradley-Terry scores of (prompt, clip).

**Why Bradley-Terry per head, not RewardDance's yes-probability.** RewardDance
frames reward as the probability a vision-language model gives the token "yes"
under a comparison prompt; what makes that work is the VLM's pretrained language
head and its scaling with model size. A team with such a model behind an
OpenAI-compatible endpoint uses it directly (:mod:`pipelines.align.judge`,
``reward_source="judge"``). Without one, a "yes" head trained from scratch on our
preferences is a logistic classifier of ``(A, B)`` pairs, i.e. ``sigmoid(g(A, B))``;
with ``g(A, B) = r(A) - r(B)`` that *is* Bradley-Terry, and a pointwise ``r`` is what
GRPO needs (a score per candidate, compared within the group). So: one scalar per
head, trained with ``-w log sigmoid(r_h(win) - r_h(lose))`` on the pairs of that
head (``w`` the pair's weight: people's pairs may count more than the rater's); the
heads share a trunk, so a head with few informative pairs borrows features.

**What it reads.** The VAE latents the DiT produces (video ``(Cv, T, h, w)``, audio
``(Ca, T * m)``) and the prompt's frozen text-encoder tokens, so DanceGRPO never
decodes a clip to score it (clips rated by people are encoded with the VAE first).

**The network** (:class:`RewardNetConfig`, presets ``tiny`` for CPU, ``small``,
``base`` for a GPU): one sequence of

- video patches (``video_patch`` x ``video_patch`` latent pixels per latent step,
  then a 3D convolution on the patch grid),
- audio tokens, one per video latent step (the branches' shared time grid, so an
  impact and its sound sit at the same time coordinate),
- the prompt's word tokens,

each with Fourier features of its (time, y, x) position and a type embedding, through
``depth`` transformer blocks whose norms are modulated by the pooled prompt (adaLN,
as DiT), so colour and count are read *relative to the prompt* and attention can
match a word to a patch. Each head then pools the sequence with its own learned query
and reads one score. Nothing in it repeats the rater's rules (no colour tables, no
onset detector): agreement on held-out *prompts* measures how far it generalises.

**What it sees** (schema version 3): where the preference table's candidates carry the
probes' frame-by-frame observations (the synthetic world), the model also holds an
observer (:mod:`pipelines.align.observer`) that reads the *decoded frames* and the audio
latents; it is trained on those observations first (dense labels on every candidate),
then frozen, and sync, adherence and motion are scored from what it sees and the prompt.
Read from latents alone, those heads ordered unseen prompts' pairs at chance
(BENCHMARKS.md, sessions 20-23). Such a model needs the frames to score:
:func:`pipelines.align.observer.decode_frames` (DanceGRPO and the evaluation decode
them with the pipeline's video VAE).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core import storage
from pipelines.align.config import HEADS, RewardConfig
from pipelines.align.observer import (
    OBSERVED_HEADS,
    PIXEL_READS,
    ClipObserver,
    ObservedScores,
    ObserverConfig,
    centre_error,
    colour_table_loss,
    event_recall_precision,
    observation_loss,
    observer_pixel_targets,
)

MODEL_NAME = "reward.safetensors"
META_NAME = "reward.json"
FORMAT = "duet-reward-model"
# 1: the convolutional net over latents (no format tag); 2: the prompt-conditioned
# transformer with its network config in the JSON; 3: and optionally the observer of
# decoded frames (pipelines.align.observer) with the scores read from what it sees;
# 4: the observer finds objects as heatmap peaks (version 3's density maps are gone);
# 5: and places each within its cell (the observer's offset head); 6: optionally a
# full-resolution pixel-class mask and impacts by the rater's rule (its config's
# heat_size, mask_width and impacts); 7: optionally the observed scores read the
# rater's rules over the observations (its config's rule_features); 8: optionally
# objects are counted from the mask, which may read each pixel's colour alone (its
# config's counts and mask_reads); 9: the mask may read each pixel as the probes'
# colour table does (its config's mask_reads "palette": a buffer of prototype colours).
REWARD_SCHEMA_VERSION = 9
# Versions 2 and 3 without an observer are version 9 models without one; a version 4
# observer is a version 9 one that puts every object at its cell's centre; a version 5
# observer is a version 9 one without a mask; a version 6 one is one without rule
# features (the field's default); a version 7 one counts its heatmap's peaks and its
# mask reads neighbourhoods (the defaults of counts and mask_reads); a version 8 one
# never reads "palette".
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8, 9)
OFFSET_KEYS = ("observer.offset.weight", "observer.offset.bias")


class RewardModelFileError(ValueError):
    """A reward model directory this code cannot load (old, foreign or damaged)."""


@dataclass(frozen=True)
class RewardNetConfig:
    width: int = 32
    depth: int = 1  # transformer blocks over the joint (video, audio, prompt) sequence
    head_dim: int = 16  # attention heads = width // head_dim (at least one)
    video_patch: int = 2  # spatial patch of the video latents
    mlp_ratio: float = 2.0
    frequencies: int = 4  # Fourier frequencies per position coordinate


REWARD_PRESETS = {
    "tiny": RewardNetConfig(width=32, depth=1, video_patch=4),  # CPU
    "small": RewardNetConfig(width=64, depth=2, video_patch=2),
    "base": RewardNetConfig(width=256, depth=6, head_dim=64, video_patch=2),  # a GPU
}


def net_config(cfg: RewardConfig) -> RewardNetConfig:
    """The preset of ``cfg.preset`` with ``cfg.width`` / ``cfg.depth`` where set."""
    if cfg.preset not in REWARD_PRESETS:
        raise ValueError(
            f"rlhf.reward.preset {cfg.preset!r} is not one of {sorted(REWARD_PRESETS)}"
        )
    net = REWARD_PRESETS[cfg.preset]
    over = {k: v for k, v in (("width", cfg.width), ("depth", cfg.depth)) if v is not None}
    return dataclasses.replace(net, **over)


def _fourier(coords: torch.Tensor, n: int) -> torch.Tensor:
    """(N, k) coordinates in [0, 1] -> (N, 2 k n) sines and cosines."""
    freqs = math.pi * 2.0 ** torch.arange(n, dtype=coords.dtype, device=coords.device)
    angles = coords[..., None] * freqs  # (N, k, n)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-norm attention + MLP; the norms' shift, scale and the gates come from the prompt."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x (B, N, w), p (B, w), keep (B, N) bool: keys attended to.
        b, n, w = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(p)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(b, n, w))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class RewardModel(nn.Module):
    def __init__(
        self,
        video_channels: int,
        audio_channels: int,
        text_dim: int,
        audio_per_video: int,
        net: RewardNetConfig | None = None,
        heads: tuple[str, ...] = HEADS,
        observer: ObserverConfig | None = None,
    ):
        super().__init__()
        net = net or RewardNetConfig()
        self.dims = {
            "video_channels": video_channels,
            "audio_channels": audio_channels,
            "text_dim": text_dim,
            "audio_per_video": audio_per_video,
        }
        self.net = net
        self.heads = tuple(heads)
        w, m, pp = net.width, audio_per_video, net.video_patch
        self.m, self.patch = m, pp
        self.text_pool = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, w), nn.GELU(), nn.Linear(w, w)
        )
        self.text_tokens = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, w))
        # Patches first, then a 3D convolution on the patch grid: the convolution at the
        # latents' full resolution would cost most of a CPU step.
        self.video_patch = nn.Conv3d(video_channels, w, (1, pp, pp), stride=(1, pp, pp))
        self.video_mix = nn.Conv3d(w, w, 3, padding=1)
        self.audio_in = nn.Conv1d(audio_channels, w, 3, padding=1)
        # One audio token per video latent step: the m audio latents of that step.
        self.audio_patch = nn.Conv1d(w, w, m, stride=m)
        self.position = nn.Linear(3 * 2 * net.frequencies, w)
        self.kind = nn.Parameter(torch.zeros(3, w))  # video, audio, text
        n_heads = max(1, w // net.head_dim)
        if w % n_heads:
            raise ValueError(f"reward width {w} is not a multiple of {n_heads} attention heads")
        self.blocks = nn.ModuleList(Block(w, n_heads, net.mlp_ratio) for _ in range(net.depth))
        self.norm = nn.LayerNorm(w)
        self.query = nn.Parameter(torch.randn(len(heads), w) / math.sqrt(w))
        self.key = nn.Linear(w, w)
        self.value = nn.Linear(w, w)
        # Within a group every candidate has the same prompt, so only how the clip's
        # features interact with the prompt can order them: a CLIP-like product term.
        self.match = nn.Linear(w, w)
        self.read = nn.Sequential(nn.Linear(2 * w, w), nn.GELU())
        self.out_w = nn.Parameter(torch.randn(len(heads), w) / math.sqrt(w))
        self.out_b = nn.Parameter(torch.zeros(len(heads)))
        # With an observer, the heads it serves are scored from what it sees in the
        # decoded frames (pipelines.align.observer), the others from the latents above.
        self.observer_config = observer
        self.observer = self.observed = None
        if observer is not None:
            self.observer = ClipObserver(observer, audio_channels)
            self.observed = ObservedScores(observer, text_dim)
            self.observed_columns = [self.heads.index(h) for h in OBSERVED_HEADS]

    @property
    def reads_frames(self) -> bool:
        """Whether :meth:`forward` needs the decoded frames
        (:func:`pipelines.align.observer.decode_frames` at ``observer_config.size``)."""
        return self.observer is not None

    def observe(self, frames: torch.Tensor, audio: torch.Tensor) -> dict:
        """What the observer sees: :meth:`pipelines.align.observer.ClipObserver.observe`."""
        return self.observer.observe(frames, audio)

    def prompt_vector(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.float().unsqueeze(-1)
        pooled = (tokens.float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
        return self.text_pool(pooled)  # (B, w)

    def _positions(self, t: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        coords = torch.stack([t, y, x], dim=-1).float()  # (N, 3) in [0, 1]
        return self.position(_fourier(coords, self.net.frequencies))  # (N, w)

    def forward(
        self,
        video: torch.Tensor,  # (B, Cv, T, h, w)
        audio: torch.Tensor,  # (B, Ca, Na), Na = T * m
        tokens: torch.Tensor,  # (B, L, D)
        mask: torch.Tensor,  # (B, L)
        frames: torch.Tensor | None = None,  # (B, F, 3, s, s) uint8, with an observer
        seen: dict | None = None,  # what the observer saw, if already known
    ) -> torch.Tensor:  # (B, heads)
        scores = self.latent_scores(video, audio, tokens, mask)
        if self.observer is None:
            return scores
        if seen is None:
            if frames is None:
                raise ValueError(
                    "this reward model reads decoded frames: pass frames "
                    "(pipelines.align.observer.decode_frames of the video latents at "
                    f"{self.observer_config.size} pixels)"
                )
            seen = self.observe(frames, audio)
        scores = scores.clone()
        scores[:, self.observed_columns] = self.observed(seen, tokens, mask)
        return scores

    def latent_scores(self, video, audio, tokens, mask) -> torch.Tensor:
        """(B, heads) scores read from the latents and the prompt alone."""
        b, _, t, h, w = video.shape
        dev = video.device
        p = self.prompt_vector(tokens, mask)
        # Video patches (pad the grid to whole patches).
        pad_h, pad_w = (-h) % self.patch, (-w) % self.patch
        hv = F.gelu(self.video_patch(F.pad(video.float(), (0, pad_w, 0, pad_h))))
        hv = hv + self.video_mix(hv)  # (B, w, T, h', w')
        _, width, _, hp, wp = hv.shape
        xv = hv.flatten(2).transpose(1, 2)  # (B, T h' w', w)
        tt, yy, xx = torch.meshgrid(
            torch.arange(t, device=dev) / max(t - 1, 1),
            torch.arange(hp, device=dev) / max(hp - 1, 1),
            torch.arange(wp, device=dev) / max(wp - 1, 1),
            indexing="ij",
        )
        xv = xv + self._positions(tt.flatten(), yy.flatten(), xx.flatten()) + self.kind[0]
        # Audio: one token per video latent step, at that step's time coordinate.
        ha = F.gelu(self.audio_in(audio.float()))[:, :, : t * self.m]
        xa = self.audio_patch(ha).transpose(1, 2)  # (B, T, w)
        ta = torch.arange(xa.shape[1], device=dev) / max(t - 1, 1)
        xa = xa + self._positions(ta, torch.zeros_like(ta), torch.zeros_like(ta)) + self.kind[1]
        # The prompt's words (position 0: the sentence order is in the encoder's output).
        xt = self.text_tokens(tokens.float()) + self.kind[2]  # (B, L, w)
        x = torch.cat([xv, xa, xt], dim=1)  # (B, N, w)
        keep = torch.cat(
            [torch.ones(b, xv.shape[1] + xa.shape[1], dtype=torch.bool, device=dev), mask.bool()],
            dim=1,
        )
        for block in self.blocks:
            x = block(x, p, keep)
        # Per head: attention pooling with the head's own query, then one score.
        x = self.norm(x)
        logits = torch.einsum("hw,bnw->bhn", self.query, self.key(x)) / math.sqrt(width)
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
        pooled = torch.einsum("bhn,bnw->bhw", logits.softmax(-1), self.value(x))  # (B, H, w)
        match = pooled * self.match(p)[:, None]  # (B, H, w)
        feats = self.read(torch.cat([pooled, match], dim=-1))
        return (feats * self.out_w).sum(-1) + self.out_b  # (B, H)


def save_reward_model(uri: str, model: RewardModel, meta: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, MODEL_NAME), save_safetensors(state))
    storage.write_json(
        storage.join(uri, META_NAME),
        {"format": FORMAT, "schema_version": REWARD_SCHEMA_VERSION, "dims": model.dims,
         "net": dataclasses.asdict(model.net), "heads": list(model.heads),
         "observer": dataclasses.asdict(model.observer_config) if model.reads_frames else None,
         **meta},
    )  # fmt: skip


def load_reward_model(uri: str) -> tuple[RewardModel, dict]:
    meta_uri = storage.join(uri, META_NAME)
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"{uri}: no trained reward model ({META_NAME} missing)")
    try:
        meta = storage.read_json(meta_uri)
    except ValueError as err:
        raise RewardModelFileError(f"{meta_uri}: not JSON ({err})") from err
    retrain = "; delete that directory and rerun the rlhf stage to train a current one"
    if not isinstance(meta, dict) or (meta.get("format") != FORMAT and "dims" not in meta):
        raise RewardModelFileError(f"{meta_uri}: not a Duet reward model (no format {FORMAT!r})")
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        what = "the convolutional model without the prompt's words" if version == 1 else "unknown"
        raise RewardModelFileError(
            f"{meta_uri}: reward model schema version {version!r} ({what}); this code reads "
            f"version {REWARD_SCHEMA_VERSION}" + retrain
        )
    if version == 3 and meta.get("observer"):
        raise RewardModelFileError(
            f"{meta_uri}: reward model schema version 3 with a density-map observer, which "
            f"this code no longer has (version {REWARD_SCHEMA_VERSION} finds objects as "
            "heatmap peaks)" + retrain
        )
    try:
        net = RewardNetConfig(**meta["net"])
        observer = ObserverConfig(**meta["observer"]) if meta.get("observer") else None
        model = RewardModel(**meta["dims"], net=net, heads=tuple(meta["heads"]),
                            observer=observer)  # fmt: skip
        state = load_safetensors(storage.read_bytes(storage.join(uri, MODEL_NAME)))
        if version == 4 and observer is not None:  # the offset head as built: cell centres
            state.update({k: model.state_dict()[k] for k in OFFSET_KEYS})
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise RewardModelFileError(f"{uri}: reward model weights or config unreadable: {err}"
                                   + retrain) from err  # fmt: skip
    return model.eval(), meta


def reward_exists(uri: str) -> bool:
    return storage.exists(storage.join(uri, META_NAME))


# ---------------------------------------------------------------------------------
# Training on preference pairs.


def rater_pairs(min_margin: float):
    """The default pair source: :func:`preference_pairs` of the table, weight 1 each."""
    from pipelines.align.preferences import preference_pairs

    def pairs(rows: list[dict], head: str) -> list[tuple[dict, dict, float]]:
        return [(w, lo, 1.0) for w, lo in preference_pairs(rows, head, min_margin)]

    return pairs


def _pair_index(rows: list[dict], pairs_of) -> dict[str, list[tuple[int, int, float]]]:
    """Per head: (winner, loser, weight) as positions in ``rows``. ``pairs_of(rows, head)``
    gives (winner row, loser row[, weight[, ...]]) tuples over the same row objects;
    a pair of weight 0 is dropped."""
    position = {id(r): i for i, r in enumerate(rows)}
    out = {}
    for h in HEADS:
        found = []
        for pair in pairs_of(rows, h):
            weight = float(pair[2]) if len(pair) > 2 else 1.0
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"preference pair weight must be >= 0, got {weight} ({h})")
            if weight > 0:
                found.append((position[id(pair[0])], position[id(pair[1])], weight))
        out[h] = found
    return out


def bradley_terry_loss(margin: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``-log sigmoid(r(win) - r(lose))`` over pairs: ``sum w l / sum w``."""
    per_pair = F.softplus(-margin)  # = -logsigmoid(margin), stable
    if weight is None:
        return per_pair.mean()
    weight = weight.to(per_pair)
    return (weight * per_pair).sum() / weight.sum().clamp_min(1e-12)


def split_by_prompt(rows: list[dict], holdout_fraction: float) -> list[dict]:
    """Set every row's ``split`` by its prompt: every ``round(1 / holdout_fraction)``-th
    of the sorted distinct prompts is ``val`` (at least one when there are two or more
    prompts), so no held-out prompt reaches training. Returns ``rows`` (changed in place)."""
    prompts = sorted({r["prompt"] for r in rows})
    every = max(2, round(1.0 / holdout_fraction)) if holdout_fraction > 0 else 0
    held = {p for i, p in enumerate(prompts) if every and i % every == every - 1}
    if not held and every and len(prompts) >= 2:
        held = {prompts[-1]}
    for r in rows:
        r["split"] = "val" if r["prompt"] in held else "train"
    return rows


def agreement(
    model: RewardModel, rows: list[dict], inputs: dict, min_margin: float, pairs_of=None
) -> dict[str, dict]:
    """Per head: the (weighted) fraction of pairs the model orders the same way."""
    batch = 64 if model.reads_frames else 256  # frames take memory
    with torch.no_grad():
        scores = torch.cat(
            [score_rows(model, inputs, range(i, min(i + batch, len(rows))))
             for i in range(0, len(rows), batch)]
        ).cpu()  # fmt: skip
    out = {}
    for h, pairs in _pair_index(rows, pairs_of or rater_pairs(min_margin)).items():
        k = HEADS.index(h)
        if not pairs:
            out[h] = {"pairs": 0, "agreement": None}
            continue
        total = sum(wt for _, _, wt in pairs)
        right = sum(wt for w, lo, wt in pairs if scores[w, k] > scores[lo, k])
        p = right / total
        out[h] = {
            "pairs": len(pairs),
            "agreement": round(p, 4),
            "stderr": round(math.sqrt(p * (1 - p) / len(pairs)), 4),
        }
    return out


def score_rows(model: RewardModel, inputs: dict, index, seen: dict | None = None):
    """(len(index), heads) scores of those rows; ``seen``: every row's observations
    (:func:`observe_rows`), else the observer (if any) reads ``inputs["frames"]``."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    frames = None
    if model.reads_frames and seen is None:
        if "frames" not in inputs:
            raise ValueError("this reward model reads decoded frames; the inputs hold none")
        frames = inputs["frames"][idx]
    return model(
        inputs["video"][idx], inputs["audio"][idx], inputs["tokens"][idx], inputs["mask"][idx],
        frames=frames, seen=None if seen is None else {k: v[idx] for k, v in seen.items()},
    )  # fmt: skip


# The colour mask's own training (fit_colour_mask): pixels a step, from this many
# random frames, at this learning rate (cosine), as measured in session 45.
COLOUR_PIXELS, COLOUR_FRAMES, COLOUR_LR = 8192, 64, 3e-3


def fit_colour_mask(mask: nn.Module, frames: torch.Tensor, rows: list[int], steps: int, gen):
    """Teach a colour mask (:class:`pipelines.align.observer.ClipObserver`'s with
    ``mask_reads`` "colour" or "palette") the probes' colour table on pixels drawn from the ``rows``'
    frames (N, F, 3, s, s): ``steps`` steps of :data:`COLOUR_PIXELS` pixels
    (:func:`pipelines.align.observer.colour_table_loss`). A pixel costs a few thousand
    multiply-adds, so it takes many more steps than the observer's in less time."""
    opt = torch.optim.AdamW(mask.parameters(), lr=COLOUR_LR)
    for step in range(steps):
        _cosine_lr(opt, COLOUR_LR, step, steps)
        opt.zero_grad(set_to_none=True)
        colour_table_loss(mask, sample_pixels(frames, rows, gen)).backward()
        opt.step()


def sample_pixels(frames: torch.Tensor, rows: list[int], gen) -> torch.Tensor:
    """:data:`COLOUR_PIXELS` pixels (n, 3) uint8 of the ``rows``' frames (N, F, 3, s, s),
    as many from each of :data:`COLOUR_FRAMES` random frames of random rows."""
    k, each = COLOUR_FRAMES, COLOUR_PIXELS // COLOUR_FRAMES
    row = torch.tensor(rows)[torch.randint(0, len(rows), (k,), generator=gen)]
    frame = torch.randint(0, frames.shape[1], (k,), generator=gen)
    ys, xs = (torch.randint(0, frames.shape[-1], (k, each), generator=gen) for _ in range(2))
    dev = frames.device
    picked = frames[row.to(dev), frame.to(dev)]  # (k, 3, s, s)
    return picked[torch.arange(k, device=dev)[:, None], :, ys.to(dev), xs.to(dev)].flatten(0, 1)


def observe_rows(model: RewardModel, inputs: dict, batch: int = 32) -> dict:
    """What the (frozen) observer sees in every row's frames, detached."""
    found = []
    with torch.no_grad():
        for i in range(0, inputs["frames"].shape[0], batch):
            found.append(
                model.observe(inputs["frames"][i : i + batch], inputs["audio"][i : i + batch])
            )
    return {k: torch.cat([f[k] for f in found]) for k in found[0]}


def _cosine_lr(opt, base: float, step: int, steps: int) -> None:
    for group in opt.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / steps))


def _step(opt, loss: torch.Tensor, losses: list[float], step: int, log) -> None:
    """One optimiser step on ``loss``; ``log(step, mean loss)`` every 100 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
    if log is not None and (step + 1) % 100 == 0:
        log(step + 1, statistics.fmean(losses[-100:]))


OBSERVATION_KEYS = ("counts", "impact", "onset")


def observation_labels(inputs: dict, index) -> dict:
    keys = OBSERVATION_KEYS + (("objects",) if "observed_objects" in inputs else ())
    return {k: inputs[f"observed_{k}"][index] for k in keys}


def fit_observer(model: RewardModel, inputs: dict, train: list[int], val: list[int], cfg,
                 log=None) -> dict:  # fmt: skip
    """Train ``model.observer`` on the observations of the ``train`` rows that carry
    them (``inputs["observed"]``): ``cfg.observer_steps`` steps of ``observer_batch``
    rows, a random window of ``observer_window`` frames each. Returns its report: on the
    ``val`` rows' observations, the count error per colour and frame (and that of
    seeing nothing), impact and onset recall and precision within a frame."""
    has = inputs["observed"].cpu()
    train = [i for i in train if has[i]]
    val = [i for i in val if has[i]]
    frames = inputs["frames"]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    pixel_reads = model.observer_config.mask_reads in PIXEL_READS
    colour = pixel_reads and cfg.observer_colour_steps > 0
    if colour:  # the colour mask first, on its own, then it stays as it is
        fit_colour_mask(model.observer.mask, frames, train, cfg.observer_colour_steps, gen)
        model.observer.mask.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.observer.parameters() if p.requires_grad],
                            lr=cfg.observer_lr, weight_decay=cfg.weight_decay)  # fmt: skip
    losses = []
    length = min(cfg.observer_window, frames.shape[1])
    for step in range(cfg.observer_steps):
        _cosine_lr(opt, cfg.observer_lr, step, cfg.observer_steps)
        pick = torch.tensor(train)[
            torch.randint(0, len(train), (cfg.observer_batch,), generator=gen)
        ]
        start = int(torch.randint(0, frames.shape[1] - length + 1, (1,), generator=gen))
        window = slice(start, start + length)
        clips = frames[pick]
        seen = model.observer(clips, inputs["audio"][pick], (start, length))
        labels = {k: v[:, window] for k, v in observation_labels(inputs, pick).items()}
        if colour:
            seen.pop("pixels")  # learned already
        elif "pixels" in seen:
            labels["pixels"] = observer_pixel_targets(model.observer_config, clips[:, window],
                                                      labels["objects"])  # fmt: skip
        balanced = not pixel_reads
        _step(opt, observation_loss(seen, labels, balanced), losses, step, log)
    report = {"steps": cfg.observer_steps, "train_rows": len(train), "val_rows": len(val),
              "colour_steps": cfg.observer_colour_steps if colour else 0,
              "final_loss": statistics.fmean(losses[-50:]) if losses else None}  # fmt: skip
    if val:
        idx = torch.tensor(val)
        seen = observe_rows(model, {k: inputs[k][idx] for k in ("frames", "audio")})
        labels = observation_labels(inputs, idx)
        report["val"] = {
            "count_error": round(float((seen["counts"] - labels["counts"]).abs().mean()), 4),
            "count_error_seeing_nothing": round(float(labels["counts"].abs().mean()), 4),
            "impact": event_recall_precision(seen["impact"].cpu(), labels["impact"].cpu()),
            "onset": event_recall_precision(seen["onset"].cpu(), labels["onset"].cpu()),
        }
        if "objects" in labels:
            report["val"]["centre_error"] = centre_error(
                seen["where"].cpu(), seen["counts"].cpu(), labels["objects"].cpu()
            )
        if model.observer.mask is not None:
            report["val"]["pixels"] = pixel_recall_precision(
                model.observer, inputs["frames"][idx], inputs["audio"][idx], labels["objects"]
            )
    return report


@torch.no_grad()
def pixel_recall_precision(observer, frames, audio, objects, batch: int = 8) -> dict:
    """The observer's pixel classes against :func:`pipelines.align.observer.pixel_targets`
    on these rows: the share of the objects' pixels it gives their colour (recall) and
    of the pixels it calls a colour that are that colour's (precision)."""
    right = found = labelled = 0
    for i in range(0, len(frames), batch):
        guess = observer(frames[i : i + batch], audio[i : i + batch])["pixels"].argmax(2)
        target = observer_pixel_targets(observer.cfg, frames[i : i + batch],
                                        objects[i : i + batch])  # fmt: skip
        right += int(((guess == target) & (target > 0)).sum())
        found += int((guess > 0).sum())
        labelled += int((target > 0).sum())
    return {"recall": round(right / max(1, labelled), 4),
            "precision": round(right / max(1, found), 4)}  # fmt: skip


def train_reward_model(
    rows: list[dict],
    inputs: dict,
    cfg: RewardConfig,
    dims: dict,
    log=None,
    pairs_of=None,
    device=None,
) -> tuple[RewardModel, dict]:
    """Fit on the ``train`` rows' pairs; report agreement on the ``val`` rows' pairs.
    Trained on ``device`` (default the CPU); the model comes back on the CPU.

    ``pairs_of(rows, head)`` gives (winner, loser, weight) tuples over ``rows`` (called
    once per split, so a pair never spans the split); by default the table's scores and
    ranks, weight 1. The stage sets the split by prompt (:func:`split_by_prompt`), so
    ``val_agreement`` is measured on prompts the model never saw; the report says how
    many held-out prompts also appear in training (0 there)."""
    pairs_of = pairs_of or rater_pairs(cfg.min_margin)
    train_rows = [i for i, r in enumerate(rows) if r["split"] == "train"]
    val_rows = [i for i, r in enumerate(rows) if r["split"] == "val"]
    sub = [rows[i] for i in train_rows]
    pairs = {
        h: [(train_rows[w], train_rows[lo], wt) for w, lo, wt in ps]
        for h, ps in _pair_index(sub, pairs_of).items()
    }
    usable = [h for h in HEADS if pairs[h]]
    if not usable:
        raise NoPreferencesError(no_pairs_message(rows, cfg.min_margin))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(device or "cpu")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    # Observations on training rows (the synthetic world's candidates): the observer
    # learns to see them first, then stays as it is while the scores learn the pairs.
    observing = (cfg.observe and "observed" in inputs
                 and bool(inputs["observed"][train_rows].any()))  # fmt: skip
    observer = None
    if observing:
        size = inputs["frames"].shape[-1]
        observer = ObserverConfig(
            colours=inputs["observed_counts"].shape[-1], width=cfg.observer_width, size=size,
            heat_size=size // max(1, size // cfg.observer_heat_size), mask_width=cfg.observer_mask_width,
            impacts="rule" if cfg.observer_mask_width and cfg.observer_rule_impacts
            else "learned", rule_features=cfg.observer_rule_features,
            counts="mask" if cfg.observer_mask_counts and cfg.observer_mask_width else "peaks",
            mask_reads=cfg.observer_mask_reads,
        )  # fmt: skip
    model = RewardModel(**dims, net=net_config(cfg), observer=observer).to(device)
    seen = observer_report = None
    if observing:
        observer_report = fit_observer(model, inputs, train_rows, val_rows, cfg, log)
        model.observer.requires_grad_(False)
        seen = observe_rows(model, inputs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)  # fmt: skip
    losses = []
    per_head = max(1, cfg.batch_pairs // len(usable))
    for step in range(cfg.steps):
        _cosine_lr(opt, cfg.lr, step, cfg.steps)
        # One forward for every head's pairs: winners then losers, head by head.
        win, lose, head_of, weight = [], [], [], []
        for h in usable:
            pick = torch.randint(0, len(pairs[h]), (per_head,), generator=gen).tolist()
            win += [pairs[h][i][0] for i in pick]
            lose += [pairs[h][i][1] for i in pick]
            weight += [pairs[h][i][2] for i in pick]
            head_of += [HEADS.index(h)] * per_head
        scores = score_rows(model, inputs, win + lose, seen)
        cols = torch.tensor(head_of)
        n = len(win)
        margin = scores[torch.arange(n), cols] - scores[torch.arange(n, 2 * n), cols]
        _step(opt, bradley_terry_loss(margin, torch.tensor(weight)), losses, step, log)
    model.eval()
    train_prompts = {r["prompt"] for r in sub}
    val_prompts = sorted({rows[i]["prompt"] for i in val_rows})
    report = {
        "net": dataclasses.asdict(model.net),
        "observer": observer_report,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_pairs": {h: len(pairs[h]) for h in HEADS},
        "train_prompt_count": len(train_prompts),
        "final_loss": statistics.fmean(losses[-50:]),
        "train_agreement": agreement(
            model, sub, _subset(inputs, train_rows), cfg.min_margin, pairs_of
        ),
        "held_out": {
            "prompts": val_prompts,
            "seen_in_training": sum(p in train_prompts for p in val_prompts),
        },
    }
    if val_rows:
        val = [rows[i] for i in val_rows]
        report["val_agreement"] = agreement(
            model, val, _subset(inputs, val_rows), cfg.min_margin, pairs_of
        )
    return model.cpu(), report


class NoPreferencesError(ValueError):
    """The preference data orders no pair of candidates on any head."""


class RewardFloorError(ValueError):
    """The reward model agrees too little with the rater to be optimised."""


def no_pairs_message(rows: list[dict], min_margin: float) -> str:
    from pipelines.align.preferences import groups

    spread = {}
    for h in HEADS:
        gaps = [
            max(v) - min(v)
            for members in groups(rows).values()
            if len(v := [r[f"score_{h}"] for r in members if r[f"score_{h}"] is not None]) > 1
        ]
        spread[h] = f"{max(gaps):.3f}" if gaps else "not rated"
    n_groups = len({r["group_id"] for r in rows})
    return (
        f"the preference data ({len(rows)} candidates in {n_groups} groups) holds no pair "
        f"whose rater scores differ by rlhf.reward.min_margin = {min_margin} or more on any "
        f"head (largest spread within a training group per head: "
        + ", ".join(f"{h} {v}" for h, v in spread.items())
        + "): the parent model's candidates are too alike for the rater to prefer one. "
        "Train the parent longer, draw more or more varied candidates "
        "(rlhf.preferences.candidates_per_prompt, rounds, eta), or lower "
        "rlhf.reward.min_margin; delete RUN/rlhf/preferences/ to draw them again"
    )


def check_agreement_floor(report: dict, weights, floor: float, min_pairs: int = 0) -> None:
    """Refuse a reward model whose held-out agreement with the rater on a head with
    weight > 0 is below ``floor``, unknown (no held-out pairs) or measured on fewer than
    ``min_pairs`` pairs. ``floor`` 0: no floor."""
    if floor <= 0:
        return
    val = report.get("val_agreement") or {}
    held = (report.get("held_out") or {}).get("prompts")
    where = f" of {len(held)} held-out prompt(s)" if held else ""
    bad = []
    for h, w in zip(HEADS, weights, strict=True):
        if w <= 0:
            continue
        found = val.get(h) or {}
        value, pairs = found.get("agreement"), found.get("pairs", 0)
        if value is None:
            bad.append(f"{h}: no held-out pairs (agreement unknown)")
        elif pairs < min_pairs:
            bad.append(
                f"{h}: held-out agreement {value:.3f} on only {pairs} pairs{where}, fewer "
                f"than rlhf.reward.min_val_pairs = {min_pairs} to judge it"
            )
        elif value < floor:
            bad.append(f"{h}: held-out agreement {value:.3f} on {pairs} pairs{where}")
    if bad:
        raise RewardFloorError(
            f"the reward model does not track the rater on head(s) DanceGRPO would optimise "
            f"(rlhf.reward.min_agreement = {floor}): " + "; ".join(bad) + ". Optimising it "
            "would move nothing the rater measures. Improve the reward model (more "
            "preference data: rlhf.preferences.rounds, candidates_per_prompt; "
            "rlhf.reward.steps, preset; delete RUN/rlhf/reward/ to retrain), give those "
            "heads weight 0 in rlhf.head_weights, or lower rlhf.reward.min_agreement "
            "(0 turns the floor off)"
        )


def _subset(inputs: dict, index: list[int]) -> dict:
    idx = torch.as_tensor(index, dtype=torch.long)
    return {k: v[idx] for k, v in inputs.items()}
