"""Learning signals that cannot flip by the draw: each training method, on fixed data
with fixed seeds, moves what it optimises by a wide margin.

Every corpus here is written losslessly (the same frames every run) and every draw
is seeded, so on one machine each test gives the same numbers every time; the
margins are wide so that another CPU's arithmetic cannot flip them. How much a
recipe *gains on held-out prompts* is a quality question, measured by
``python -m bench.quality`` (BENCHMARKS.md), not here.

The trained models come from the session's short chain (``tiny_chain_run``,
tests/conftest.py: every stage at the fewest steps on the conditioning corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core import storage
from core.media import read_clip
from model.pipeline import DuetPipeline
from pipelines.align.config import HEADS, RewardConfig
from pipelines.align.reward import train_reward_model
from pipelines.align.sampling import encode_prompts, latent_shapes, sampling_times
from pipelines.align.stages import reward_dims
from pipelines.train.conditioning import CorpusSpec, build_corpus

pytestmark = pytest.mark.slow


def _metrics(stage_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(stage_uri + "/metrics.jsonl").splitlines()]


def _corpus_digest(manifest: str) -> str:
    """Hash of what training reads: decoded frames and audio, captions, manifest rows."""
    digest = hashlib.sha256()
    for row in pq.read_table(manifest).to_pylist():
        clip = read_clip(row["clip_uri"])
        digest.update(clip.frames.tobytes())
        digest.update(np.ascontiguousarray(clip.audio).tobytes())
        digest.update(json.dumps({k: v for k, v in row.items() if k != "clip_uri"}).encode())
    return digest.hexdigest()


def test_the_training_corpus_is_the_same_every_time_it_is_built(tmp_path):
    """Built twice, the conditioning corpus decodes to the same frames and sound.
    (Written at a CRF instead, libx264 gave different frames for 10 sources in one
    build of two.)"""
    spec = CorpusSpec(sources=10)
    first = build_corpus(str(tmp_path / "a"), spec)
    second = build_corpus(str(tmp_path / "b"), spec)
    assert _corpus_digest(first) == _corpus_digest(second)


@pytest.mark.parametrize(("stage", "most"), [("vae", 0.5), ("pretrain", 0.7), ("distill", 0.6)])
def test_each_stage_loss_falls_on_fixed_data(tiny_chain_run, stage, most):
    """The mean of the last two logged losses is at most ``most`` of the first two."""
    losses = [r["loss"] for r in _metrics(f"{tiny_chain_run.run_uri}/{stage}")]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    print(f"{stage}: {first:.4f} -> {last:.4f} ({last / first:.2f})")
    assert last <= most * first, losses


def test_trainer_final_weights_are_the_ema(tiny_chain_run):
    """The stage's final DiT is the EMA the trainer kept (model.ema, tested in
    tests/test_ema.py), not the last step's raw weights."""
    from safetensors.torch import load_file

    from pipelines.train.state import EMA_NAME, latest_checkpoint

    run = tiny_chain_run.run_uri
    last = latest_checkpoint(f"{run}/pretrain")
    ema = load_file(f"{last}/{EMA_NAME}")
    raw = load_file(f"{last}/model.safetensors")
    final = load_file(f"{run}/pretrain/final/model.safetensors")
    assert ema and all(torch.equal(final[f"dit.{k}"], v) for k, v in ema.items())
    moved = [k for k, v in ema.items() if not torch.equal(raw[f"dit.{k}"], v)]
    assert len(moved) > 0.9 * len(ema), (len(moved), len(ema))


def _preference_row(group: str, candidate: int, split: str, **scores) -> dict:
    row = {
        "group_id": group, "candidate": candidate, "prompt": "a circle bounces on a gray floor",
        "references": "{}", "seed": 0, "noise_seed": candidate, "clip_uri": "",
        "latent_uri": "", "rater_id": "known-order", "split": split,
    }  # fmt: skip
    for h in HEADS:
        row[f"score_{h}"] = scores.get(h)
        row[f"rank_{h}"] = None
    return row


def test_reward_model_ranks_held_out_pairs_of_known_order(tiny_chain_run):
    """Each corpus clip's latents against two damaged copies: noise on the picture
    (worse for the visual head) and noise on the sound (worse for the audio head).
    Trained on three sources' groups, the reward model orders the fourth source's
    pairs on both heads (chance 0.5)."""
    run = tiny_chain_run.run_uri
    pipe = DuetPipeline.from_checkpoint(f"{run}/sft/final").eval()
    clips = pq.read_table(tiny_chain_run.data.curated_uri).to_pylist()
    gen = torch.Generator().manual_seed(0)
    rows, videos, audios = [], [], []
    for clip_row in clips:
        with torch.no_grad():
            zv, za = pipe.encode_clip(read_clip(clip_row["clip_uri"]))
        split = "val" if clip_row["source_id"] == "src003" else "train"
        noisy_v = zv + 0.7 * torch.randn(zv.shape, generator=gen)
        noisy_a = za + 0.7 * torch.randn(za.shape, generator=gen)
        group = clip_row["clip_id"]
        for k, (v, a, visual, audio) in enumerate(
            [(zv, za, 1.0, 1.0), (noisy_v, za, 0.0, 1.0), (zv, noisy_a, 1.0, 0.0)]
        ):
            rows.append(_preference_row(group, k, split, visual=visual, audio=audio))
            videos.append(v[0])
            audios.append(a[0])
    tokens, mask = encode_prompts(pipe, [rows[0]["prompt"]])
    n = len(rows)
    inputs = {
        "video": torch.stack(videos), "audio": torch.stack(audios),
        "tokens": tokens.expand(n, -1, -1), "mask": mask.expand(n, -1),
    }  # fmt: skip
    _, report = train_reward_model(rows, inputs, RewardConfig(steps=150), reward_dims(pipe))
    val = report["val_agreement"]
    print(json.dumps(val))
    for head in ("visual", "audio"):
        assert val[head]["pairs"] == 8
        assert val[head]["agreement"] >= 0.875, val


def _student_endpoints(pipe, couplings, tokens, mask, steps: int) -> tuple:
    """Euler from each coupling's noise with its prompt, one evaluation per step."""
    from model.dit import TextConditioning
    from model.samplers import Conditioning, Guidance, sample
    from pipelines.train.batches import pad_text

    nv, na = couplings["noise_video"], couplings["noise_audio"]
    v_shape, a_shape = (1, *nv.shape[1:]), (1, *na.shape[1:])
    times = torch.tensor(sampling_times(pipe.config, v_shape, a_shape, steps))
    rows = [tokens[p][mask[p]] for p in couplings["prompt"].tolist()]
    t, m, _ = pad_text(rows, None, tokens.shape[1])
    cond = Conditioning(text=TextConditioning(t, m))
    with torch.no_grad():
        return sample(pipe.dit, nv, na, cond, times, "euler", Guidance(1.0, 1.0))


def test_distilled_student_matches_its_teacher_on_its_couplings(tiny_chain_run):
    """In 4 Euler steps without guidance, the student lands nearer its guided
    teacher's 4-step Heun endpoints (the stage's couplings) than the teacher itself
    does with those 4 Euler steps: distillation moved it toward its targets."""
    from safetensors.torch import load as load_safetensors

    from pipelines.align.stages import distill_prompts, prompt_sets

    cfg = tiny_chain_run
    run = cfg.run_uri
    couplings = load_safetensors(storage.read_bytes(f"{run}/distill/couplings.safetensors"))
    train_prompts, held_out = prompt_sets(cfg)
    prompts = distill_prompts(train_prompts, held_out, cfg.distill.extra_prompts)
    errors = {}
    for name, stage in (("teacher", "rlhf"), ("student", "distill")):
        pipe = DuetPipeline.from_checkpoint(f"{run}/{stage}/final").eval()
        tokens, mask = encode_prompts(pipe, prompts)
        v, a = _student_endpoints(pipe, couplings, tokens, mask, steps=4)
        errors[name] = float(
            ((v - couplings["video"]) ** 2).mean() + ((a - couplings["audio"]) ** 2).mean()
        )
    print(errors)
    assert errors["student"] <= 0.6 * errors["teacher"], errors


class _LatentMean(torch.nn.Module):
    """A fixed reward: the mean of the final video latents, times ``sign``, on every
    head (the weights pick the first)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, video, audio, tokens, mask):  # -> (G, heads)
        return (self.sign * video.float().mean(dim=(1, 2, 3, 4)))[:, None].expand(-1, len(HEADS))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dance_grpo_raises_a_fixed_reward_in_six_steps(tiny_chain_run, sign):
    """DanceGRPO (``pipelines.align.grpo``: SDE rollouts, group advantages, clipped
    ratio) on the SFT model with a fixed reward raises it on fixed evaluation noise,
    whichever way the reward points (so no drift of the sampler passes for learning).

    Plain SGD: the objective's gradient is what is under test. (With Adam at 3e-4 the
    direction was a coin flip in 3-6 steps: the per-element mean log-probability
    makes every gradient tiny, and Adam's first steps move each weight by the
    learning rate whatever its gradient, so noise moves as far as signal.)"""
    from pipelines.align import grpo

    torch.manual_seed(0)
    cfg = tiny_chain_run
    pipe = DuetPipeline.from_checkpoint(f"{cfg.run_uri}/sft/final")
    settings = dataclasses.replace(cfg.rlhf, group_size=8, sample_steps=4, lr=3.0)
    prompts = ["a red circle bounces on a gray floor"]
    tokens, mask = encode_prompts(pipe, prompts)
    v_shape, a_shape, frames = latent_shapes(pipe.config, 17 / 16)
    policy = grpo.GRPO(
        settings=settings, module=pipe.dit, dit=pipe.dit, reference=None,
        reward_model=_LatentMean(sign), pipeline=pipe, tokens=tokens, mask=mask,
        prompts=prompts, shapes=(v_shape, a_shape, frames),
        times=sampling_times(pipe.config, v_shape, a_shape, settings.sample_steps),
        device=torch.device("cpu"), weights=(1.0, 0.0, 0.0, 0.0, 0.0),
    )  # fmt: skip

    def evaluate() -> tuple[float, float]:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            r = torch.cat(
                [policy.rewards(0, *policy.rollout(0, gen).final)[:, 0] for _ in range(4)]
            )
        return float(r.mean()), float(r.std() / len(r) ** 0.5)

    before = evaluate()
    opt = torch.optim.SGD(pipe.dit.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        loss, _, _ = policy.step([0], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    print(f"reward {before[0]:+.3f} +- {before[1]:.3f} -> {after[0]:+.3f} +- {after[1]:.3f}")
    assert after[0] - before[0] >= 0.05
    assert after[0] - before[0] >= 5 * (before[1] ** 2 + after[1] ** 2) ** 0.5


def test_reference_usage_runs_on_the_runs_own_reference_batches(tiny_chain_run):
    """bench/quality.py's reference-usage diagnostic on the chain's pretrain model:
    the stage's builder draws one kind of role reference per pass from the corpus's
    same-source pairs (image and video here: no speaker labels, so no audio pairs),
    every paired loss is finite, and the same call gives the same numbers."""
    import math

    from pipelines.train.reference_usage import reference_usage

    first = reference_usage(tiny_chain_run, "pretrain", batches=2)
    assert set(first) == {"image", "video"}, first
    for kind, u in first.items():
        for gain in (u["gain_vs_none"], u["gain_vs_other"]):
            assert gain["samples"] > 0 and math.isfinite(gain["mean"]), (kind, u)
        assert u["loss_own"] > 0
    assert reference_usage(tiny_chain_run, "pretrain", batches=2) == first
