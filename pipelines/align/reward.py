"""The learned multi-head reward model: per-head Bradley-Terry scores of (prompt, clip).

**Why Bradley-Terry per head, not RewardDance's yes-probability.** RewardDance
frames reward as the probability a vision-language model gives the token "yes"
under a comparison prompt; what makes that work is the VLM's pretrained language
head and its scaling with model size. Duet has no pretrained VLM that reads its
latents, and a "yes" head trained from scratch on our preferences is a logistic
classifier of ``(A, B)`` pairs, i.e. ``sigmoid(g(A, B))``; with ``g(A, B) =
r(A) - r(B)`` that *is* Bradley-Terry, and a pointwise ``r`` is what GRPO needs (a
score per candidate, compared within the group, without a reference candidate at
every step). So: one scalar per head, trained with ``-log sigmoid(r_h(win) -
r_h(lose))`` on the rater's pairs of that head; the heads share a trunk, so a head
with few informative pairs borrows features from the others.

**Where it lives and what it reads.** ``pipelines/align`` (it is trained by the
``rlhf`` stage and only that stage uses it). It scores the VAE latents the DiT
produces (video ``(Cv, T, h, w)`` and audio ``(Ca, Na)``, normalised) with the
prompt's frozen text tokens, so DanceGRPO never decodes a clip to score it; clips
rated by people are encoded with the VAE first. The trunk:

- video: two 3D convolutions (the second strided in space), FiLM-modulated by the
  pooled prompt (so colour and count are read *relative to the prompt*), then pooled
  over space per latent step;
- audio: two 1D convolutions, grouped per video latent step (the branches' shared
  time grid);
- sync: a temporal convolution over the per-step concatenation of both, so an
  impact and its sound are compared at the same latent time;
- heads: a small MLP from the pooled features and the prompt to one score per head.

Nothing in it repeats the rater's rules (no colour tables, no onset detector), so
agreement on held-out groups measures how far it generalises from them.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core import storage
from pipelines.align.config import HEADS, RewardConfig

MODEL_NAME = "reward.safetensors"
META_NAME = "reward.json"
REWARD_SCHEMA_VERSION = 1


class RewardModel(nn.Module):
    def __init__(
        self,
        video_channels: int,
        audio_channels: int,
        text_dim: int,
        audio_per_video: int,
        width: int = 64,
        heads: tuple[str, ...] = HEADS,
    ):
        super().__init__()
        self.dims = {
            "video_channels": video_channels,
            "audio_channels": audio_channels,
            "text_dim": text_dim,
            "audio_per_video": audio_per_video,
            "width": width,
        }
        self.heads = tuple(heads)
        w = width
        self.m = audio_per_video
        self.text = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, w), nn.GELU())
        self.video1 = nn.Conv3d(video_channels, w, 3, padding=1)
        # Strided in space: half the grid is enough to place objects and count them.
        self.video2 = nn.Conv3d(w, w, 3, stride=(1, 2, 2), padding=1)
        self.film = nn.Linear(w, 2 * w)
        self.audio1 = nn.Conv1d(audio_channels, w, 3, padding=1)
        self.audio2 = nn.Conv1d(w, w, 3, padding=1)
        self.audio_group = nn.Linear(w * audio_per_video, w)
        self.sync = nn.Conv1d(2 * w, w, 3, padding=1)
        self.out = nn.Sequential(nn.Linear(5 * w, 2 * w), nn.GELU(), nn.Linear(2 * w, len(heads)))

    def prompt_vector(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.float().unsqueeze(-1)
        pooled = (tokens.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.text(pooled)  # (B, w)

    def forward(
        self,
        video: torch.Tensor,  # (B, Cv, T, h, w)
        audio: torch.Tensor,  # (B, Ca, Na), Na = T * m
        tokens: torch.Tensor,  # (B, L, D)
        mask: torch.Tensor,  # (B, L)
    ) -> torch.Tensor:  # (B, heads)
        p = self.prompt_vector(tokens, mask)
        hv = F.gelu(self.video1(video.float()))
        gamma, beta = self.film(p).chunk(2, dim=-1)
        hv = hv * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
        hv = F.gelu(self.video2(hv))
        v_time = hv.mean(dim=(3, 4))  # (B, w, T)
        v_max = hv.amax(dim=(2, 3, 4))  # (B, w): the strongest evidence anywhere
        ha = F.gelu(self.audio2(F.gelu(self.audio1(audio.float()))))  # (B, w, Na)
        b, w, na = ha.shape
        t = v_time.shape[-1]
        a_time = self.audio_group(
            ha[:, :, : t * self.m].reshape(b, w, t, self.m).permute(0, 2, 1, 3).reshape(b, t, -1)
        ).transpose(1, 2)  # (B, w, T)
        joint = F.gelu(self.sync(torch.cat([v_time, a_time], dim=1)))  # (B, w, T)
        feats = torch.cat([v_time.mean(-1), v_max, a_time.mean(-1), joint.mean(-1), p], dim=-1)
        return self.out(feats)


def save_reward_model(uri: str, model: RewardModel, meta: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, MODEL_NAME), save_safetensors(state))
    storage.write_json(
        storage.join(uri, META_NAME),
        {"schema_version": REWARD_SCHEMA_VERSION, "dims": model.dims, "heads": list(model.heads),
         **meta},
    )  # fmt: skip


def load_reward_model(uri: str) -> tuple[RewardModel, dict]:
    meta_uri = storage.join(uri, META_NAME)
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"{uri}: no trained reward model ({META_NAME} missing)")
    meta = storage.read_json(meta_uri)
    if meta.get("schema_version") != REWARD_SCHEMA_VERSION:
        raise ValueError(f"{meta_uri}: unknown reward model schema version")
    model = RewardModel(**meta["dims"], heads=tuple(meta["heads"]))
    model.load_state_dict(load_safetensors(storage.read_bytes(storage.join(uri, MODEL_NAME))))
    return model.eval(), meta


def reward_exists(uri: str) -> bool:
    return storage.exists(storage.join(uri, META_NAME))


# ---------------------------------------------------------------------------------
# Training on the rater's pairs.


def _pair_index(rows: list[dict], min_margin: float) -> dict[str, list[tuple[int, int]]]:
    from pipelines.align.preferences import preference_pairs

    position = {id(r): i for i, r in enumerate(rows)}
    return {
        h: [(position[id(w)], position[id(lo)]) for w, lo in preference_pairs(rows, h, min_margin)]
        for h in HEADS
    }


def agreement(
    model: RewardModel, rows: list[dict], inputs: dict, min_margin: float
) -> dict[str, dict]:
    """Per head: the fraction of the rater's pairs the model orders the same way."""
    with torch.no_grad():
        scores = score_rows(model, inputs, range(len(rows)))
    out = {}
    for h, pairs in _pair_index(rows, min_margin).items():
        k = HEADS.index(h)
        if not pairs:
            out[h] = {"pairs": 0, "agreement": None}
            continue
        right = sum(1 for w, lo in pairs if scores[w, k] > scores[lo, k])
        p = right / len(pairs)
        out[h] = {
            "pairs": len(pairs),
            "agreement": round(p, 4),
            "stderr": round(math.sqrt(p * (1 - p) / len(pairs)), 4),
        }
    return out


def score_rows(model: RewardModel, inputs: dict, index) -> torch.Tensor:
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return model(
        inputs["video"][idx], inputs["audio"][idx], inputs["tokens"][idx], inputs["mask"][idx]
    )


def train_reward_model(
    rows: list[dict], inputs: dict, cfg: RewardConfig, dims: dict, log=None
) -> tuple[RewardModel, dict]:
    """Fit on the ``train`` groups' pairs; report agreement on the ``val`` groups."""
    train_rows = [i for i, r in enumerate(rows) if r["split"] == "train"]
    val_rows = [i for i, r in enumerate(rows) if r["split"] == "val"]
    sub = [rows[i] for i in train_rows]
    pairs = {
        h: [(train_rows[w], train_rows[lo]) for w, lo in ps]
        for h, ps in _pair_index(sub, cfg.min_margin).items()
    }
    usable = [h for h in HEADS if pairs[h]]
    if not usable:
        raise ValueError("the preference data holds no pair with a preference on any head")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RewardModel(**dims, width=cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    per_head = max(1, cfg.batch_pairs // len(usable))
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        # One forward for every head's pairs: winners then losers, head by head.
        win, lose, head_of = [], [], []
        for h in usable:
            pick = torch.randint(0, len(pairs[h]), (per_head,), generator=gen).tolist()
            win += [pairs[h][i][0] for i in pick]
            lose += [pairs[h][i][1] for i in pick]
            head_of += [HEADS.index(h)] * per_head
        scores = score_rows(model, inputs, win + lose)
        cols = torch.tensor(head_of)
        n = len(win)
        margin = scores[torch.arange(n), cols] - scores[torch.arange(n, 2 * n), cols]
        loss = -F.logsigmoid(margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 100 == 0:
            log(step + 1, statistics.fmean(losses[-100:]))
    model.eval()
    report = {
        "train_pairs": {h: len(pairs[h]) for h in HEADS},
        "final_loss": statistics.fmean(losses[-50:]),
        "train_agreement": agreement(model, sub, _subset(inputs, train_rows), cfg.min_margin),
    }
    if val_rows:
        val = [rows[i] for i in val_rows]
        report["val_agreement"] = agreement(model, val, _subset(inputs, val_rows), cfg.min_margin)
    return model, report


def _subset(inputs: dict, index: list[int]) -> dict:
    idx = torch.as_tensor(index, dtype=torch.long)
    return {k: v[idx] for k, v in inputs.items()}
