"""The vae stage's vocoder recipe (issue 22): random segments drawn from the step's
seeded generator, mel + MR-STFT losses with the GAN only at the end, configs from
before the recipe still loading, and the pipeline decoding with the vocoder only when
the stage trained it."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import ConfigError, load_config
from model.audio_vae import AudioVAE, NeuralVocoder
from model.configs import get_config
from model.discriminators import AudioDiscriminator, AudioDiscriminatorConfig
from model.pipeline import DuetPipeline
from pipelines.train.config import TrainConfig, VAEStageConfig, train_config_from
from pipelines.train.data import ClipRow, has_dialogue
from pipelines.train.loop import (
    DecodedClips,
    VAEPair,
    finish_vae,
    lr_at,
    step_generator,
    vocoder_gan_start,
    vocoder_gan_weight,
    vocoder_loss,
    vocoder_segments,
    vocoder_training_audio,
)
from pipelines.train.runtime import Runtime


def _tone_clip(sample_rate: int, n: int) -> torch.Tensor:
    """(1, 2, n): a chord with decaying noise bursts, right channel at 0.6 of left."""
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(n) / sample_rate
    src = sum(0.2 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 330.0, 495.0))
    for start in range(0, n - 2000, 3000):
        k = torch.arange(2000)
        src[start : start + 2000] += 0.3 * torch.randn(2000, generator=gen) * torch.exp(-k / 300)
    return torch.stack([src, 0.6 * src])[None]


def test_segments_come_from_the_step_generator():
    """Same (seed, step, rank): the same segments whatever the global RNG did; another
    rank or step: other segments. Each is a slice of one channel on the latent grid,
    1 s long, and clamped to a clip shorter than that."""
    cfg = get_config("tiny")
    avae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length)
    spl = avae.samples_per_latent
    audio = torch.randn(2, 2, 3 * cfg.sample_rate)  # two 3 s stereo clips
    s = VAEStageConfig()

    def draw(step, rank, global_seed):
        torch.manual_seed(global_seed)
        return vocoder_segments(audio, s, avae, step_generator(0, "vae", step, rank))

    first = draw(5, 0, 1)
    assert first.shape == (4, cfg.sample_rate)
    assert torch.equal(first, draw(5, 0, 2))
    assert not torch.equal(first, draw(5, 1, 1))
    assert not torch.equal(first, draw(6, 0, 1))
    flat = audio.flatten(0, 1)
    for seg in first:
        assert any(
            torch.equal(seg, flat[r, o : o + len(seg)])
            for r in range(4)
            for o in range(0, flat.shape[1] - len(seg) + 1, spl)
        )
    short = audio[..., : 3 * spl]  # shorter than a segment: clamped to the clip
    assert vocoder_segments(short, s, avae, step_generator(0, "vae", 0, 0)).shape == (4, 3 * spl)
    whole = VAEStageConfig(vocoder_segments=0)  # the old recipe: every channel whole
    assert torch.equal(vocoder_segments(audio, whole, avae, None), flat)


def test_clips_with_dialogue_get_their_share_of_the_segments():
    """``vocoder_speech_share`` of the step's segments come from the clips with
    dialogue (here all 0.7), the rest from the batch (all 0.1), cut to one length;
    without dialogue clips, or at share 0, the batch alone as before."""
    cfg = get_config("tiny")
    avae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length)
    batch = torch.full((2, 2, 3 * cfg.sample_rate), 0.1)
    speech = torch.full((1, 2, 2 * cfg.sample_rate), 0.7)

    def sources(share, speech_clips):
        s = VAEStageConfig(vocoder_speech_share=share)
        wav = vocoder_training_audio(batch, speech_clips, s, avae, step_generator(0, "vae", 0, 0))
        assert wav.shape == (4, cfg.sample_rate)
        return sorted(round(float(seg.mean()), 3) for seg in wav)

    assert sources(0.5, speech) == [0.1, 0.1, 0.7, 0.7]
    assert sources(1.0, speech) == [0.7] * 4
    assert sources(0.25, speech) == [0.1, 0.1, 0.1, 0.7]
    assert sources(0.0, speech) == [0.1] * 4
    assert sources(1.0, None) == [0.1] * 4
    short = speech[..., : cfg.sample_rate // 2]  # shorter than a segment: every one cut to it
    s = VAEStageConfig(vocoder_speech_share=0.5)
    wav = vocoder_training_audio(batch, short, s, avae, step_generator(0, "vae", 0, 0))
    assert wav.shape[0] == 4 and wav.shape[1] <= cfg.sample_rate // 2
    assert has_dialogue('a green face says "hello world"')
    assert not has_dialogue("a red ball bounces") and not has_dialogue('a "" b')
    with pytest.raises(ConfigError, match="vocoder_speech_share"):
        train_config_from({"vae": {"vocoder_speech_share": 1.5}})


def test_stage_vocoder_loss_goes_down_with_the_gan_only_at_the_end():
    """24 steps of the stage's vocoder loss with its optimizer settings on one fixed
    1 s clip (0.25 s segments): the mel and MR-STFT terms fall; the GAN joins for the
    last 5% only."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    avae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length)
    audio = _tone_clip(cfg.sample_rate, cfg.sample_rate)
    s = VAEStageConfig(steps=24, vocoder_steps=24, vocoder_segment_s=0.25, warmup_steps=5)
    assert vocoder_gan_start(s) == 23  # the last 5%, rounded down: one step
    vocoder = NeuralVocoder(cfg.audio_vae)
    disc = AudioDiscriminator(
        AudioDiscriminatorConfig(periods=(2, 3), period_channels=(8, 16), resolution_channels=8)
    )
    groups = [{"params": list(vocoder.parameters()), "lr": s.audio_lr}]
    groups.append({"params": list(disc.parameters()), "lr": s.disc_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    base = [g["lr"] for g in groups]
    history = []
    for step in range(s.steps):
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr_at(step, s.steps, lr, s.warmup_steps)
        gen = step_generator(0, "vae", step, 0)
        loss, metrics = vocoder_loss(vocoder, disc, avae, audio, s, gen, step)
        assert ("g_adv" in metrics) == (step >= 23), step
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vocoder.parameters(), s.grad_clip)
        opt.step()
        history.append(metrics)
    first, last = history[:4], history[-4:]
    # Measured: mel 0.87 -> 0.37, MR-STFT 4.27 -> 2.74.
    for key, ratio in (("mel", 0.6), ("mr_stft", 0.8)):
        before = sum(m[key] for m in first) / 4
        after = sum(m[key] for m in last) / 4
        assert after < ratio * before, (key, before, after)


def test_gan_schedule_and_old_configs_still_load(tmp_path):
    """Defaults: the GAN for the last 5% of the stage at 0.1, ramped in. A recipe file
    written before the recipe (vocoder_gan_start = 50, a ramp of 100) loads through
    core.config's one loader and keeps its start; nonsense is refused."""
    s = TrainConfig().vae
    assert (s.vocoder_segments, s.vocoder_segment_s) == (4, 1.0)
    assert vocoder_gan_start(s) == 285
    assert vocoder_gan_weight(s, 284) == 0.0
    assert 0 < vocoder_gan_weight(s, 285) < vocoder_gan_weight(s, 299) <= 0.1
    assert vocoder_gan_weight(VAEStageConfig(steps=4000), 3999) == pytest.approx(0.1)
    # A short run rounds to no GAN step: no discriminator to build, train or save.
    assert vocoder_gan_start(VAEStageConfig(steps=3)) == -1
    old = tmp_path / "old.toml"
    old.write_text(
        "[vae]\nsteps = 300\nvocoder_steps = 1\nvocoder_gan_start = 50\n"
        "vocoder_gan_ramp_steps = 100\n"
    )
    s = train_config_from(str(old)).vae
    assert vocoder_gan_start(s) == 50 and vocoder_gan_weight(s, 49) == 0.0
    assert vocoder_gan_weight(s, 149) == pytest.approx(0.1)
    assert vocoder_gan_start(train_config_from({"vae": {"vocoder_gan_start": -1}}).vae) == -1
    old_json = tmp_path / "old.json"
    old_json.write_text(json.dumps({"steps": 10, "vocoder_gan_start": None}))
    assert vocoder_gan_start(load_config(VAEStageConfig, str(old_json))) == -1
    with pytest.raises(ConfigError, match="vocoder_gan_fraction"):
        train_config_from({"vae": {"vocoder_gan_fraction": 1.5}})
    with pytest.raises(ConfigError, match="vocoder_segment_s"):
        train_config_from({"vae": {"vocoder_segment_s": 0}})


def test_vae_pair_trains_the_vocoder_on_segments_and_the_gan_only_when_it_runs():
    """The stage's module feeds the vocoder 4 segments of 1 s (not the clips whole) and
    builds no discriminator for a run too short to reach the GAN."""
    torch.manual_seed(0)
    pipe = DuetPipeline.from_preset("tiny", seed=0)
    short = VAEPair(pipe, with_vocoder=True, settings=VAEStageConfig(steps=3, vocoder_steps=1))
    assert short.gan_components() == ()
    assert VAEPair(pipe, True, VAEStageConfig(vocoder_steps=1)).gan_components() == ("audio_disc",)
    seen = []
    pipe.vocoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    windows, audio = torch.rand(1, 3, 5, 32, 32) * 2 - 1, _tone_clip(16000, 3 * 16000)
    _, metrics = short(windows, audio, torch.tensor([True]), step_generator(0, "vae", 0, 0), 0)
    frames = 16000 // pipe.audio_vae.hop_length
    assert seen == [(4, pipe.config.audio_vae.n_mels, frames)]
    assert {"vocoder_mel", "vocoder_mr_stft"} <= set(metrics) and "vocoder_g_adv" not in metrics


def test_the_audio_vae_hears_the_dialogue_clips_only_when_asked():
    """``audio_vae_speech``: the audio VAE reconstructs the step's clips with dialogue
    beside the batch's (cut to one length); off, it sees the batch alone, as before."""
    torch.manual_seed(0)
    pipe = DuetPipeline.from_preset("tiny", seed=0)
    seen, reconstruct = [], pipe.audio_vae.loss

    def spy(wav, *args, **kwargs):
        seen.append(wav.clone())
        return reconstruct(wav, *args, **kwargs)

    pipe.audio_vae.loss = spy
    windows = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    audio = _tone_clip(16000, 3 * 16000)
    speech = torch.full((1, 2, 2 * 16000), 0.25)

    def heard(on: bool) -> torch.Tensor:
        seen.clear()
        s = VAEStageConfig(steps=3, vocoder_steps=1, audio_vae_speech=on)
        pair = VAEPair(pipe, with_vocoder=True, settings=s)
        pair(windows, audio, torch.tensor([True]), step_generator(0, "vae", 0, 0), 0, speech)
        return seen[0]

    off, on = heard(False), heard(True)
    assert torch.equal(off, audio)
    assert on.shape == (2, 2, 2 * 16000)
    assert torch.equal(on[0], audio[0, :, : 2 * 16000]) and torch.equal(on[1], speech[0])
    assert train_config_from({"vae": {"audio_vae_speech": True}}).vae.audio_vae_speech


def test_pipeline_decodes_with_the_vocoder_only_when_the_stage_trained_it(tmp_path):
    """finish_vae switches the pipeline to its vocoder only if the stage trained it on
    sound; config.json records the choice and decoding follows it: the vocoder, or
    Griffin-Lim with one phase shared by the stereo channels (the audio VAE's
    mel_to_waveform without a vocoder; test_decoders checks that phase keeps stereo)."""
    torch.manual_seed(0)
    pipe = DuetPipeline.from_preset("tiny", seed=0)
    spl = pipe.audio_vae.samples_per_latent
    # 5 video latents (17 frames, 1.06 s) and 1.25 s of audio: past the front pad.
    z_audio = pipe.audio_vae.encode(_tone_clip(16000, 20 * spl))
    z_video = torch.zeros(1, pipe.config.video_vae.latent_channels, 5, 8, 8)
    for vocoder_steps, has_audio, neural in ((0, True, False), (2, False, False), (2, True, True)):
        pipe.use_neural_vocoder = False  # a fresh pipeline's
        rows = [ClipRow(f"c{i}", "s", "", 0.0, 5, 5, "", has_audio, 0.0, 0) for i in range(2)]
        decoded = DecodedClips(pipe)
        for row in rows:
            video = torch.rand(3, 5, 64, 64) * 2 - 1
            decoded.cache[row.clip_id] = (video, _tone_clip(16000, spl)[0])
        cfg = TrainConfig(vae=VAEStageConfig(vocoder_steps=vocoder_steps, eval_clips=1))
        finish_vae(cfg, pipe, rows, decoded, Runtime())
        assert pipe.use_neural_vocoder == neural, (vocoder_steps, has_audio)
        if (vocoder_steps, has_audio) == (2, False):
            continue  # same checkpoint as the first case
        uri = tmp_path / f"ckpt{int(neural)}"
        pipe.save(str(uri))
        assert json.loads((uri / "config.json").read_text())["use_neural_vocoder"] == neural
        loaded = DuetPipeline.from_checkpoint(str(uri)).eval()
        out = torch.from_numpy(loaded.decode_latents(z_video, z_audio, seed=3).audio)
        assert out.shape[1] == round(17 * 16000 / pipe.config.fps)
        with torch.no_grad():
            vocoded = loaded.audio_vae.decode(z_audio, loaded.vocoder)[0]
            griffin = loaded.audio_vae.decode(z_audio, None, torch.Generator().manual_seed(3))[0]
        pad = loaded.audio_front_pad
        want = (vocoded if neural else griffin)[:, pad : pad + out.shape[1]]
        assert torch.allclose(out, want, atol=1e-5)
        # The two paths differ: the comparison above tells them apart.
        assert not torch.allclose(vocoded, griffin, atol=1e-3)
