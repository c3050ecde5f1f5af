"""generate(): determinism, reference limits, SDEdit editing, multi-shot layout, checkpoints, CLI.

Whether a *trained* model follows its references and per-shot prompts is measured in
tests/test_train_conditioning.py; here a hand-set DiT that copies its image reference
shows that the reference path (encoding, slot, guidance, decoding) carries the image
through to the output.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from core.media import AVClip, probe_media, read_clip
from model.checkpoint import CheckpointError
from model.generate import EditSpec, GenerationRequest, ReferenceSet, generate
from model.multishot import Shot, ShotPlan, layout
from model.pipeline import DuetPipeline, load_pipeline
from model.text_encoder import FrozenTextEncoder

FPS, SR = 16.0, 16000


@pytest.fixture(scope="module")
def text_encoder():
    return FrozenTextEncoder(max_tokens=32)


@pytest.fixture(scope="module")
def pipeline(text_encoder):
    torch.manual_seed(0)
    pipe = DuetPipeline.from_preset("tiny", seed=0, text_encoder=text_encoder)
    # A fresh DiT is the identity (AdaLN-zero); perturb it so conditioning matters.
    with torch.no_grad():
        for p in pipe.dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return pipe.eval()


def _ball_clip(num_frames: int = 17, color=(220, 40, 40)) -> AVClip:
    """A ball falling to the floor, with a click at the impact."""
    frames = np.full((num_frames, 64, 64, 3), 120, dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    impact = num_frames // 2
    for f in range(num_frames):
        y = 10 + 40 * min(f, impact) / impact if f <= impact else 50 - 30 * (f - impact) / impact
        frames[f][(yy - y) ** 2 + (xx - 32) ** 2 <= 25] = color
    audio = np.zeros((2, int(num_frames / FPS * SR)), dtype=np.float32)
    start = int(impact / FPS * SR)
    audio[:, start : start + 400] = (
        0.6 * np.sin(np.arange(400) * 0.5) * np.exp(-np.arange(400) / 80)
    )
    return AVClip(frames=frames, fps=FPS, audio=audio, sample_rate=SR)


def test_generate_shapes_and_seeded_determinism(pipeline):
    request = GenerationRequest(
        prompt="a red circle bounces", duration_s=1.0, seed=3, steps=2, sampler="heun"
    )
    a = generate(request, pipeline=pipeline)
    b = generate(request, pipeline=pipeline)
    c = generate(
        GenerationRequest(prompt="a red circle bounces", duration_s=1.0, seed=4, steps=2),
        pipeline=pipeline,
    )
    assert a.clip.frames.shape == (17, 64, 64, 3) and a.clip.frames.dtype == np.uint8
    assert a.clip.audio.shape == (2, 17 * SR // 16) and a.clip.sample_rate == SR
    assert np.array_equal(a.clip.frames, b.clip.frames) and np.array_equal(
        a.clip.audio, b.clip.audio
    )
    assert not np.array_equal(a.clip.frames, c.clip.frames)
    assert a.metadata["seed"] == 3 and a.metadata["num_frames"] == 17
    with pytest.raises(ValueError, match="prompt"):
        generate(GenerationRequest(prompt=""), pipeline=pipeline)
    with pytest.raises(ValueError, match="sampler"):
        generate(GenerationRequest(prompt="x", sampler="ddim"), pipeline=pipeline)


class FollowsImageReference(torch.nn.Module):
    """A hand-set DiT: the clean video it predicts is the latent of image slot 0 in
    every latent frame (zero where that slot is absent), the clean audio zero, and it
    returns the rectified-flow velocity (x - x0) / t of that prediction. It ignores
    the prompt, so what ``generate`` makes of it depends on the reference path alone:
    the image's encoding, its slot, and reference guidance."""

    def __init__(self, dit):
        super().__init__()
        self.inner = dit  # for the null prompt the sampler asks for

    def null_text_conditioning(self, batch, device=None):
        return self.inner.null_text_conditioning(batch, device)

    def forward(self, video, audio, t, text, references=None, shots=None):
        x0 = torch.zeros_like(video)
        slot = references.images[0] if references is not None and references.images else None
        if slot is not None:
            present = torch.ones(video.shape[0]) if slot.present is None else slot.present
            x0 = slot.latent.expand_as(video) * present.float().view(-1, 1, 1, 1, 1)
        return (video - x0) / t.view(-1, 1, 1, 1, 1), audio / t.view(-1, 1, 1)


def _generate_latents(pipe, monkeypatch, references, ref_scale=1.0):
    """(video latent handed to the decoder, decoded clip) of a generate() call."""
    seen = {}
    decode = pipe.decode_latents

    def capture(video, audio, *args, **kwargs):
        seen["video"] = video.clone()
        return decode(video, audio, *args, **kwargs)

    monkeypatch.setattr(pipe, "decode_latents", capture)
    request = GenerationRequest(
        prompt="a ball", duration_s=0.5, seed=2, steps=4, sampler="euler",
        text_scale=3.0, ref_scale=ref_scale, references=references,
    )  # fmt: skip
    clip = generate(request, pipeline=pipe).clip
    monkeypatch.undo()
    return seen["video"], clip


@contextlib.contextmanager
def _hand_set_dit(pipe):
    """The pipeline with its DiT replaced by FollowsImageReference, put back after (by
    hand: monkeypatch would delete a submodule on undo, not restore it)."""
    original = pipe.dit
    pipe.dit = FollowsImageReference(original)
    try:
        yield pipe
    finally:
        pipe.dit = original


def test_an_image_reference_steers_the_output_to_that_image(pipeline, monkeypatch):
    """With the hand-set model, generation lands on the reference image's latent in
    every frame; reference guidance scales that pull (ref_scale 2 lands twice as
    far); without an image reference, or with only a video reference (another
    slot), nothing pulls and the sample ends at zero."""
    red = np.zeros((64, 64, 3), np.uint8)
    red[...] = (220, 40, 40)
    with _hand_set_dit(pipeline) as pipe:
        target = pipe.encode_image(red)  # (1, Cv, 1, h, w)
        video, _ = _generate_latents(pipe, monkeypatch, ReferenceSet(images=[red]))
        assert video.shape[2] > 1 and torch.allclose(video, target.expand_as(video), atol=1e-4)
        video, _ = _generate_latents(pipe, monkeypatch, ReferenceSet(images=[red]), 2.0)
        assert torch.allclose(video, 2.0 * target.expand_as(video), atol=1e-4)
        for refs in (None, ReferenceSet(videos=[_ball_clip(9).frames])):
            video, _ = _generate_latents(pipe, monkeypatch, refs)
            assert torch.allclose(video, torch.zeros_like(video), atol=1e-4)


def test_an_image_reference_sets_the_colour_of_the_decoded_clip(monkeypatch):
    """The same hand-set model on the shipped checkpoint's trained VAE: a red image
    reference gives a red clip, a blue one a blue clip."""
    from model.checkpoint import DEFAULT_CHECKPOINT_DIR

    shipped = DuetPipeline.from_checkpoint(str(DEFAULT_CHECKPOINT_DIR)).eval()
    shipped.dit = FollowsImageReference(shipped.dit)  # a pipeline of this test's own
    means = {}
    for name, rgb in (("red", (220, 40, 40)), ("blue", (40, 40, 220))):
        image = np.zeros((shipped.config.height, shipped.config.width, 3), np.uint8)
        image[...] = rgb
        _, clip = _generate_latents(shipped, monkeypatch, ReferenceSet(images=[image]))
        means[name] = clip.frames.reshape(-1, 3).mean(0)
        assert np.abs(means[name] - np.array(rgb)).max() < 50, (name, means[name])
    assert means["red"][0] - means["red"][2] > 100 and means["blue"][2] - means["blue"][0] > 100


def test_references_are_counted_and_limited(pipeline):
    """Bookkeeping and limits (what the references do is checked above)."""
    image = _ball_clip().frames[0]
    refs = ReferenceSet(images=[image], videos=[_ball_clip(9).frames], audios=[_ball_clip().audio])
    request = GenerationRequest(
        prompt="a ball", duration_s=0.5, seed=1, steps=1, sampler="euler", references=refs
    )
    with_refs = generate(request, pipeline=pipeline)
    assert with_refs.metadata["references"] == {"images": 1, "videos": 1, "audios": 1}
    with pytest.raises(ValueError, match="too many image references: 10"):
        ReferenceSet(images=[image] * 10)
    with pytest.raises(ValueError, match="too many audio references: 4"):
        ReferenceSet(audios=[_ball_clip().audio] * 4)


def test_v2v_near_zero_strength_returns_source_up_to_vae_error(pipeline):
    source = _ball_clip()
    zv, za = pipeline.encode_clip(source)
    recon = pipeline.decode_latents(zv, za, source.num_frames)
    edited = generate(
        GenerationRequest(
            prompt="make it blue",
            seed=0,
            steps=1,
            sampler="euler",
            edit=EditSpec(source=source, strength=1e-3),
        ),  # fmt: skip
        pipeline=pipeline,
    ).clip
    assert edited.frames.shape == source.frames.shape
    to_recon = np.abs(edited.frames.astype(float) - recon.frames).mean()
    recon_err = np.abs(recon.frames.astype(float) - source.frames).mean()
    edit_err = np.abs(edited.frames.astype(float) - source.frames).mean()
    assert to_recon < 0.5  # grey levels: the edit is the VAE round trip
    assert edit_err <= recon_err + 0.5
    strong = generate(
        GenerationRequest(
            prompt="make it blue", seed=0, steps=2, edit=EditSpec(source=source, strength=0.9)
        ),
        pipeline=pipeline,
    ).clip
    assert np.abs(strong.frames.astype(float) - recon.frames).mean() > 5 * max(to_recon, 0.1)
    with pytest.raises(ValueError, match="strength"):
        generate(
            GenerationRequest(prompt="x", edit=EditSpec(source=source, strength=0.0)),
            pipeline=pipeline,
        )


def test_v2v_keep_audio_or_video(pipeline):
    source = _ball_clip()
    keep_audio = generate(
        GenerationRequest(
            prompt="night",
            seed=0,
            steps=2,
            edit=EditSpec(source=source, strength=0.8, keep="audio"),
        ),
        pipeline=pipeline,
    ).clip
    n = keep_audio.audio.shape[1]
    assert np.array_equal(keep_audio.audio, source.audio[:, :n])
    assert not np.array_equal(keep_audio.frames, source.frames)
    keep_video = generate(
        GenerationRequest(
            prompt="night",
            seed=0,
            steps=2,
            edit=EditSpec(source=source, strength=0.8, keep="video"),
        ),
        pipeline=pipeline,
    ).clip
    assert np.array_equal(keep_video.frames, source.frames)
    assert not np.array_equal(keep_video.audio, source.audio[:, : keep_video.audio.shape[1]])
    with pytest.raises(ValueError, match="keep"):
        generate(
            GenerationRequest(prompt="x", edit=EditSpec(source=source, keep="both")),
            pipeline=pipeline,
        )


def test_multishot_layout_text_masks_and_fades(pipeline):
    plan = ShotPlan(
        [
            Shot("a red circle bounces", 1.0),
            Shot("a blue circle bounces", 1.0, transition="fade", fade_s=0.5),
            Shot("a green circle bounces", 0.75, transition="cut"),
        ],
        subject="a circle on a gray floor",
    )
    cfg = pipeline.config
    num_frames, shots = layout(plan, cfg)
    assert num_frames == cfg.frames_for_duration(2.75)
    assert shots.video_latent_shot.tolist() == sorted(shots.video_latent_shot.tolist())
    assert set(shots.video_latent_shot.tolist()) == {0, 1, 2}
    assert (
        len(shots.audio_latent_shot)
        == len(shots.video_latent_shot) * cfg.audio_latents_per_video_latent
    )
    # Each video latent and its audio group agree on the shot.
    m = cfg.audio_latents_per_video_latent
    groups = shots.audio_latent_shot.view(-1, m)
    assert (groups.float().mean(dim=1) - shots.video_latent_shot.float()).abs().max() <= 0.5

    # This DiT was never trained on multi-shot footage: as a "stitched" checkpoint it
    # gets the plan's fades drawn on the decoded clip (the named fallback).
    pipeline.config.multishot = "stitched"
    try:
        out = generate(GenerationRequest(shots=plan, seed=0, steps=2), pipeline=pipeline)
    finally:
        pipeline.config.multishot = "continuous"
    clip = out.clip
    assert clip.num_frames == num_frames and out.metadata["shots"]["subject"] == plan.subject
    assert out.metadata["transitions"] == "applied"
    generated = generate(GenerationRequest(shots=plan, seed=0, steps=2), pipeline=pipeline)
    assert generated.metadata["transitions"] == "generated"
    assert generated.clip.frames[int(round(1.0 * FPS))].max() > 0  # nothing drawn on it
    boundary = int(round(1.0 * FPS))  # the fade's centre frame: dipped to black
    assert clip.frames[boundary].max() == 0
    assert np.abs(clip.audio[:, int(1.0 * SR) - 2 : int(1.0 * SR) + 2]).max() < 1e-3
    with pytest.raises(ValueError, match="transition"):
        Shot("x", 1.0, transition="wipe")
    with pytest.raises(ValueError, match="shot plan"):
        ShotPlan.from_json("{not json")
    assert ShotPlan.from_json('[{"prompt": "a", "duration_s": 1}]').shots[0].prompt == "a"


def test_shot_text_mask_routes_each_shot_to_its_prompt(pipeline):
    from model.multishot import shot_text

    plan = ShotPlan([Shot("red", 1.0), Shot("blue", 1.0)], subject="ball")
    _, shots = layout(plan, pipeline.config)
    text = shot_text(pipeline.text_encoder, plan)
    token_shot = shots.video_latent_shot
    mask = pipeline.dit._text_mask(text, token_shot, n_ref=0)[0, 0]  # (N, L)
    ids = text.shot_ids[0]
    for row, shot in zip(mask, token_shot.tolist(), strict=True):
        readable = set(ids[row].tolist())
        assert readable == {-1, shot}


def test_checkpoint_roundtrip_and_cli(pipeline, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    pipeline.save(ckpt)
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (
        tmp_path / "ckpt" / "config.json"
    ).exists()
    loaded = load_pipeline(ckpt, pipeline.text_encoder)
    for (k, a), (k2, b) in zip(
        pipeline.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(CheckpointError, match="missing"):
        load_pipeline(str(tmp_path / "nowhere"))

    from cli.main import app

    runner = CliRunner()
    info = runner.invoke(app, ["model", "info", "tiny", "--no-text-encoder"])
    assert info.exit_code == 0, info.output
    assert "dit.cross_modal" in info.output and "trainable (total)" in info.output
    out = str(tmp_path / "clip.mp4")
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "a red circle bounces",
            "--out",
            out,
            "--checkpoint",
            ckpt,
            "--steps",
            "2",
            "--duration",
            "1.0",
            "--seed",
            "5",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    info = probe_media(out)
    assert info.has_video and info.has_audio and info.width == 64 and info.frame_count == 17
    assert (tmp_path / "clip.json").exists()
    bad = runner.invoke(
        app, ["generate", "--prompt", "x", "--out", out, "--checkpoint", ckpt, "--steps", "0"]
    )
    assert bad.exit_code == 2 and "steps" in bad.output
    # Edit the clip we just wrote, keeping its audio.
    edited = str(tmp_path / "edited.mp4")
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompt",
            "blue",
            "--out",
            edited,
            "--checkpoint",
            ckpt,
            "--steps",
            "2",
            "--edit-source",
            out,
            "--strength",
            "0.5",
            "--keep",
            "audio",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert read_clip(edited).num_frames == 17


def test_trained_pipeline_with_vocoder_and_references_generates(tmp_path):
    """The shipped trainer (``pipelines.train``, local runner) trains every network of a
    pipeline a few steps -- both VAEs on motion-picked crops, the neural vocoder, the DiT
    with the clip's own first frame as image reference -- and what it writes generates
    through the neural vocoder, with an image reference."""
    from pipelines.train import train
    from pipelines.train.conditioning import CorpusSpec, build_corpus
    from pipelines.train.config import train_config_from

    spec = CorpusSpec(sources=1, shots_per_source=2, colourless_fraction=0.0)  # 17 frames
    manifest = build_corpus(str(tmp_path / "corpus"), spec)
    refs = {
        "reference_probability": 1.0, "own_frame_probability": 1.0, "max_images": 1,
        "max_videos": 0, "max_audios": 0, "multishot_probability": 0.0,
    }  # fmt: skip
    cfg = train_config_from(
        {
            "run_uri": str(tmp_path / "run"),
            "data": {"curated_uri": manifest, "frame_buckets": [17]},
            "vae": {
                "steps": 3,
                "batch_size": 2,
                "window_frames": 5,
                "crop_px": 32,
                "crop_candidates": 4,
                "vocoder_steps": 1,
                "log_every": 1,
                "checkpoint_every": 3,
                "eval_clips": 1,
            },
            "pretrain": {
                "steps": 3,
                "batch_size": 2,
                "log_every": 1,
                "checkpoint_every": 3,
                "references": refs,
            },
        }  # fmt: skip
    )
    finals = train(cfg, stages=("vae", "pretrain"))
    vae_rows = [
        json.loads(x) for x in (tmp_path / "run/vae/metrics.jsonl").read_text().splitlines()
    ]
    for key in ("video_loss", "audio_loss", "vocoder_loss"):
        assert len(vae_rows) == 3 and all(np.isfinite(r[key]) for r in vae_rows), key
    pipe = DuetPipeline.from_checkpoint(finals["pretrain"])
    assert pipe.use_neural_vocoder and not pipe.dit.training
    clip = read_clip(str(tmp_path / "corpus/clips/src000-00.mp4"))
    # The VAE stage calibrated the latents: the training clips encode to about unit scale.
    zv, _ = pipe.encode_clip(clip)
    assert 0.2 < float(zv.std()) < 5.0
    request = GenerationRequest(
        prompt="a red circle bounces on a gray floor", duration_s=17 / FPS, seed=0, steps=2,
        references=ReferenceSet(images=[clip.frames[0]]),
    )  # fmt: skip
    out = generate(request, pipeline=pipe)
    assert out.metadata["vocoder"] == "neural" and out.clip.num_frames == 17
    assert np.isfinite(out.clip.audio).all() and np.abs(out.clip.audio).max() > 0
