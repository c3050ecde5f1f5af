"""Does a trained DiT use its role references? Its denoising loss with and without them.

A model can ignore a reference input and still train well: the caption says most of
what the clip holds. Generation then does not follow references, and sampling
settings cannot fix it. This measures the training-side question directly, on the
run's own data: batches drawn by the stage's batch builder with one kind of role
reference per pass (image subject, video motion or audio tempo; no I2V first frame,
no multi-shot), and for each sample that got a reference, the flow-matching loss of
the branch the reference speaks to (video for image and video references, positions
weighted toward what stands out of the backdrop, where a subject is; audio for audio
references) with its own reference, with another sample's (the batch
rolled by one) and with none, all at the same noise and times. A model that uses
the reference denoises better with its own: ``gain_vs_none`` and
``gain_vs_other`` (paired mean +- standard error over samples) above zero. Zero
gains say that training never made the reference worth reading.

Used by ``bench/quality.py`` beside the generation-side conditioning measures.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from model.flow_matching import add_noise, resolution_shift, sample_timesteps, velocity_target
from model.references import ReferenceLatents, RefSlot

# A reference's subject is a few percent of a frame's latent positions: the plain
# mean loss hides what reading it gains, so positions are weighted by how far they
# stand out of their frame's median latent (pipelines.train.loop.latent_standout).
STANDOUT = 10.0
KIND_LIMITS = {
    "image": {"max_images": 1, "max_videos": 0, "max_audios": 0},
    "video": {"max_images": 0, "max_videos": 1, "max_audios": 0},
    "audio": {"max_images": 0, "max_videos": 0, "max_audios": 1},
}


def roll_references(refs: ReferenceLatents) -> ReferenceLatents:
    """Every slot's latent and presence moved one sample along the batch."""

    def roll(slot: RefSlot | None) -> RefSlot | None:
        if slot is None:
            return None
        present = None if slot.present is None else slot.present.roll(1, 0)
        return RefSlot(slot.latent.roll(1, 0), present)

    return ReferenceLatents(
        [roll(s) for s in refs.images],
        [roll(s) for s in refs.videos],
        [roll(s) for s in refs.audios],
    )


def has_reference(refs: ReferenceLatents | None, batch_size: int) -> torch.Tensor:
    """(B,) bool: which samples have at least one present slot."""
    out = torch.zeros(batch_size, dtype=torch.bool)
    if refs is None:
        return out
    for slot in refs.images + refs.videos + refs.audios:
        if slot is not None:
            out |= (
                torch.ones(batch_size, dtype=torch.bool) if slot.present is None else slot.present
            )
    return out


@torch.no_grad()
def branch_losses(
    dit, batch, references, flow, patch: int, seed: int, standout: float = STANDOUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-sample video and audio flow-matching losses of ``batch`` under
    ``references``; video positions weighted by how far they stand out of their
    frame's median latent (``standout``; 0 = the plain mean). The same ``seed`` gives
    every call the same noise and times (the text, bindings included, is the batch's
    in every call)."""
    from pipelines.train.loop import _refs_to, latent_standout, weighted_mean

    device = next(dit.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x0v, x0a = batch.video, batch.audio  # (B, Cv, T, h, w), (B, Ca, Na)
    nv = torch.randn(x0v.shape, generator=gen)
    na = torch.randn(x0a.shape, generator=gen)
    tokens = x0v.shape[2] * (x0v.shape[3] // patch) * (x0v.shape[4] // patch) + x0a.shape[2]
    t = sample_timesteps(x0v.shape[0], flow, resolution_shift(tokens, flow), gen)
    xv, xa = add_noise(x0v, nv, t).to(device), add_noise(x0a, na, t).to(device)
    text = dataclasses.replace(
        batch.text, tokens=batch.text.tokens.to(device), mask=batch.text.mask.to(device)
    )
    pred_v, pred_a = dit(xv, xa, t.to(device), text, _refs_to(references, device))
    err_v = (pred_v.float() - velocity_target(x0v, nv).to(device).float()) ** 2
    err_a = (pred_a.float() - velocity_target(x0a, na).to(device).float()) ** 2
    video = weighted_mean(err_v, latent_standout(x0v.to(device), standout))
    return video.cpu(), weighted_mean(err_a, None).cpu()


def paired(diffs: list[float]) -> dict:
    n = len(diffs)
    if n == 0:
        return {"samples": 0, "mean": None, "se": None}
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return {"samples": n, "mean": mean, "se": math.sqrt(var / n)}


def reference_usage(cfg, stage: str, batches: int = 8, seed: int = 0, device="cpu") -> dict:
    """{kind: {"gain_vs_none", "gain_vs_other", "loss_own", "branch"}} for the run's
    final ``stage`` checkpoint (kinds whose pairs the data lacks are left out)."""
    from model.pipeline import DuetPipeline
    from pipelines.train.batches import BatchBuilder
    from pipelines.train.config import stage_data
    from pipelines.train.data import load_clip_rows
    from pipelines.train.latents import LatentStore
    from pipelines.train.loop import dataset_pairs, ensure_latents, final_uri
    from pipelines.train.runtime import local_runtime

    pipeline = DuetPipeline.from_checkpoint(final_uri(cfg, stage)).to(device).eval()
    mcfg, d = pipeline.config, pipeline.config.dit
    data = stage_data(cfg, stage)
    rows = load_clip_rows(data, mcfg.fps)
    store = LatentStore(ensure_latents(cfg, pipeline, rows, local_runtime(), data))
    pairs = dataset_pairs(data)
    base = cfg.stage(stage).references
    batch_size = cfg.stage(stage).batch_size
    out = {}
    for kind, limits in KIND_LIMITS.items():
        sampling = dataclasses.replace(
            base, reference_probability=1.0, i2v_probability=0.0, own_frame_probability=None,
            multishot_probability=0.0, **limits,
        )  # fmt: skip
        builder = BatchBuilder(
            rows, rows, store, sampling, mcfg.text.max_tokens,
            (d.max_image_refs, d.max_video_refs, d.max_audio_refs), d.ref_time_stride,
            mcfg.audio_latents_per_video_latent, pairs=pairs,
            binder=lambda phrase: pipeline.text_encoder.embed_tokens(phrase),
        )  # fmt: skip
        paired_rows = [i for i, r in enumerate(rows) if builder.pairs.get(r.clip_id, {}).get(kind)]
        if not paired_rows:
            continue
        gen = torch.Generator().manual_seed(seed)
        vs_none, vs_other, own_losses = [], [], []
        for k in range(batches):
            pick = torch.randint(len(paired_rows), (batch_size,), generator=gen).tolist()
            b = builder.build([paired_rows[j] for j in pick], gen)
            with_ref = has_reference(b.references, batch_size)
            if b.references is None or not bool(with_ref.any()):
                continue
            branch = 1 if kind == "audio" else 0
            own, none, other = (
                branch_losses(pipeline.dit, b, refs, mcfg.flow, d.video_patch, k)[branch]
                for refs in (b.references, None, roll_references(b.references))
            )
            # Another's only where the rolled-in sample had one too.
            other_ok = with_ref & with_ref.roll(1, 0)
            vs_none += (none - own)[with_ref].tolist()
            vs_other += (other - own)[other_ok].tolist()
            own_losses += own[with_ref].tolist()
        out[kind] = {
            "gain_vs_none": paired(vs_none),
            "gain_vs_other": paired(vs_other),
            "loss_own": sum(own_losses) / len(own_losses) if own_losses else None,
            "branch": "audio" if kind == "audio" else "video",
        }
    return out
