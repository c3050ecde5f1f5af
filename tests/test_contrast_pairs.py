"""Known-order pairs from the corpus for the reward model (pipelines.align.contrast_pairs):
which clips and captions they use, what their latents are, and that a reward model
trained on them orders the pairs of clips it never saw."""

from __future__ import annotations

import dataclasses
import json

import torch

from model.pipeline import DuetPipeline
from pipelines.align.config import HEADS, RewardConfig
from pipelines.align.contrast_pairs import (
    CONTRAST_RATER_ID,
    contrast_latents,
    contrast_pairs,
    contrast_rows,
    pick_contrasts,
)
from pipelines.align.preferences import preference_pairs
from pipelines.align.reward import train_reward_model
from pipelines.align.stages import corpus_contrast_inputs, reward_dims

CAPTIONS = [
    "a red circle bounces on a gray floor",
    "a blue square bounces on a gray floor",
    'a yellow face says "a red ball"',  # dialogue: its prompt is "a yellow face"
    "the camera pans over a gray wall",  # names no colour: a sync pair only
    "two green triangles collide",  # held out below
    "a red circle bounces on a gray floor",
]
SOUND = [True, True, False, True, True, False]


def test_picks_pair_other_colours_never_use_held_out_prompts_and_need_sound_for_sync():
    held = ["two green triangles collide"]
    prompts, picks = pick_contrasts(CAPTIONS, SOUND, held, count=10, seed=0)
    assert prompts[2] == "a yellow face"
    used = {i for i, _, _ in picks}
    assert used == {0, 1, 2, 3, 5}  # 4 is held out (and no clip pairs with it)
    for i, other, sync in picks:
        assert sync == SOUND[i]
        if other is not None:
            assert other != 4 and prompts[other] != prompts[i]
            assert {"red", "blue", "yellow"} >= {w for w in prompts[other].split()} & {
                "red", "blue", "yellow", "green",
            }  # fmt: skip
    assert dict((i, o) for i, o, _ in picks)[3] is None  # colourless: no caption pair

    rows = contrast_rows(prompts, picks)
    assert all(r["rater_id"] == CONTRAST_RATER_ID and r["split"] == "train" for r in rows)
    assert not any(r["prompt"] in held for r in rows)
    for head in HEADS:  # the table's own rules find nothing in them
        assert preference_pairs(rows, head, 0.05) == []
    adherence = contrast_pairs(rows, "adherence", 0.5)
    sync = contrast_pairs(rows, "sync", 1.0)
    assert len(adherence) == 4 and len(sync) == 3  # clips 0, 1, 2, 5 / clips 0, 1, 3 (sound)
    for win, lose, weight in adherence:
        assert weight == 0.5 and win["clip"] == lose["clip"] and win["prompt"] != lose["prompt"]
        assert (win["contrast_role"], lose["contrast_role"]) == ("own", "other_caption")
    for win, lose, _ in sync:
        assert win["clip"] == lose["clip"] and win["prompt"] == lose["prompt"]
        assert lose["contrast_role"] == "shifted_sound"
    assert contrast_pairs(rows, "motion", 1.0) == [] and contrast_pairs(rows, "sync", 0.0) == []


def test_shifted_rows_rotate_the_sound_and_nothing_else():
    prompts, picks = pick_contrasts(CAPTIONS[:2], [True, True], [], count=2, seed=0)
    rows = contrast_rows(prompts, picks)
    video = {i: torch.randn(2, 3, 4, 4) for i in range(2)}
    audio = {i: torch.arange(12.0).repeat(3, 1) + 100 * i for i in range(2)}  # (Ca=3, N=12)
    v, a = contrast_latents(rows, lambda i: (video[i], audio[i]), shift_steps=2, audio_per_video=2)
    for row, vr, ar in zip(rows, v, a, strict=True):
        assert torch.equal(vr, video[row["clip"]])
        want = audio[row["clip"]]
        if row["contrast_role"] == "shifted_sound":
            want = torch.roll(want, 4, dims=-1)
            assert not torch.equal(ar, audio[row["clip"]])
        assert torch.equal(ar, want)


def test_a_reward_model_trained_on_contrasts_orders_unseen_clips_sync(tiny_chain_run):
    """On the short chain's corpus (one-colour balls, four sources): contrast rows from
    the corpus's own clips, through the stage's function, at the preference rows'
    latent shape; trained on the pairs of half the clips, the reward model orders the
    other half's sync pairs (chance 0.5)."""
    cfg = tiny_chain_run
    pipe = DuetPipeline.from_checkpoint(f"{cfg.run_uri}/sft/final").eval()
    mcfg = pipe.config
    like = {  # the preference rows' latent shape: 17 frames
        "video": torch.zeros(1, mcfg.video_vae.latent_channels, 5, 8, 8),
        "audio": torch.zeros(1, mcfg.audio_vae.latent_channels, 5 * mcfg.audio_latents_per_video_latent),
    }  # fmt: skip
    cfg = dataclasses.replace(
        cfg, rlhf=dataclasses.replace(
            cfg.rlhf, reward=dataclasses.replace(cfg.rlhf.reward, corpus_contrasts=64)),
    )  # fmt: skip
    rows, inputs = corpus_contrast_inputs(cfg, pipe, [], like)
    assert inputs["video"].shape[1:] == like["video"].shape[1:]
    assert inputs["audio"].shape[1:] == like["audio"].shape[1:]
    assert len(rows) == inputs["video"].shape[0] == inputs["tokens"].shape[0]
    picks = sorted({r["clip"] for r in rows})
    val_clips = set(picks[len(picks) // 2 :])
    for r in rows:
        r["split"] = "val" if r["clip"] in val_clips else "train"

    def pairs_of(sub, head):
        return contrast_pairs(sub, head, 1.0)

    _, report = train_reward_model(
        rows, inputs, RewardConfig(steps=150), reward_dims(pipe), pairs_of=pairs_of
    )
    val = report["val_agreement"]
    print(json.dumps(val))
    assert val["adherence"]["pairs"] > 0 and val["sync"]["pairs"] >= 6
    # Sound moved off its impacts is learnt from half the clips (8 of 8 here). Whether
    # own-caption-over-another's generalises needs more than this corpus's ~16 clips
    # and three colours (3 of 5 here): bench/quality.py measures it at scale.
    assert val["sync"]["agreement"] >= 0.875, val


def test_the_rlhf_stage_trains_its_reward_model_with_the_corpus_contrasts(tiny_chain_run):
    """The short chain asks for 8 contrasts: the stage's reward model report counts
    them and its training pairs include theirs (more sync pairs than the table's)."""
    from pipelines.align.reward import load_reward_model

    _, meta = load_reward_model(f"{tiny_chain_run.run_uri}/rlhf/reward")
    report = meta["report"]
    assert report["corpus_contrasts"] == 8
    assert report["train_pairs"]["adherence"] > 0 and report["train_pairs"]["sync"] > 0
    assert report["train_agreement"]["sync"]["pairs"] == report["train_pairs"]["sync"]
