"""Decoders: stereo-coherent Griffin-Lim, tiled video VAE encode/decode, the GAN
vocoder and the video VAE's adversarial loss (issue 22)."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
import torch

from model.audio_vae import AudioVAE, NeuralVocoder, load_vocoder, mr_stft_distance, save_vocoder
from model.checkpoint import CheckpointError
from model.configs import get_config
from model.discriminators import AudioDiscriminator, AudioDiscriminatorConfig, adaptive_weight
from model.video_vae import VideoVAE
from pipelines.train.config import VAEStageConfig
from pipelines.train.loop import COLOUR_ORDERS, VAEPair, permute_colours


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _panned_source(cfg, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """(1, 2, N): a chord with decaying noise bursts, panned left (R = 0.6 L)."""
    gen = torch.Generator().manual_seed(seed)
    spl = cfg.audio_samples_for_latents(1)
    n = spl * max(1, round(seconds * cfg.sample_rate / spl))
    t = torch.arange(n) / cfg.sample_rate
    src = sum(0.2 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 330.0, 495.0))
    for start in (0.1, 0.45, 0.8):
        i = int(start * cfg.sample_rate)
        k = torch.arange(min(2000, n - i))
        src[i : i + len(k)] += 0.4 * torch.randn(len(k), generator=gen) * torch.exp(-k / 300.0)
    return torch.stack([src, 0.6 * src])[None]


def test_griffin_lim_keeps_stereo_channels_correlated():
    """A panned source decodes to channels as correlated as the original's (1.0 here);
    an independent random phase per channel gave -0.01."""
    cfg = get_config("tiny")
    vae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length).eval()
    wav = _panned_source(cfg)
    with torch.no_grad():
        mel = vae.waveform_to_mel(wav)
        out = vae.mel_to_waveform(mel, generator=torch.Generator().manual_seed(3))
    assert out.shape == wav.shape
    assert _corr(out[0, 0], out[0, 1]) > 0.95
    # The level difference survives: the right channel stays about 0.6 of the left.
    ratio = float(out[0, 1].norm() / out[0, 0].norm())
    assert abs(ratio - 0.6) < 0.05


# -- long clips in tiles ----------------------------------------------------------------


def _active_video_vae(**overrides) -> VideoVAE:
    """tiny's video VAE with every residual branch open (fresh ones start closed, which
    would hide a tile's missing context behind near-identity blocks)."""
    torch.manual_seed(0)
    vae = VideoVAE(dataclasses.replace(get_config("tiny").video_vae, **overrides)).eval()
    for module in vae.modules():
        if hasattr(module, "conv2"):
            torch.nn.init.normal_(module.conv2.conv.weight, std=0.05)
    return vae


def _untiled(vae: VideoVAE) -> VideoVAE:
    whole = dataclasses.replace(
        vae.cfg,
        encode_chunk_latent_frames=0,
        decode_chunk_latent_frames=0,
        encode_tile_latent_px=0,
        decode_tile_latent_px=0,
    )
    twin = VideoVAE(whole).eval()
    twin.load_state_dict(vae.state_dict())
    return twin


def _compare_tiled(vae: VideoVAE, x: torch.Tensor) -> tuple[float, float]:
    whole = _untiled(vae)
    with torch.no_grad():
        z, z_whole = vae.encode(x), whole.encode(x)
        frames, frames_whole = vae.decode(z_whole), whole.decode(z_whole)
    assert z.shape == z_whole.shape and frames.shape == frames_whole.shape == x.shape
    return float((z - z_whole).abs().max()), float((frames - frames_whole).abs().max())


def test_tiled_video_vae_matches_untiled():
    """Chunks of 4 latent frames, and 4x4-latent-pixel tiles, give the whole clip's
    latents and frames to float rounding (1e-4 on values of std ~0.3): the default
    left context (10 latent frames to encode, 8 to decode) and spatial margin (4 latent
    pixels) cover the networks' receptive fields, measured on this VAE (a context of
    8 to encode left the last chunk 0.19 off; a margin of 2 left tiles 0.24 off), so
    a tile computes what the whole clip computes there and no seam can form."""
    gen = torch.Generator().manual_seed(1)
    chunked = _active_video_vae(encode_chunk_latent_frames=4, decode_chunk_latent_frames=4)
    x = torch.rand(1, 3, 1 + 4 * 13, 32, 32, generator=gen) * 2 - 1
    assert max(_compare_tiled(chunked, x)) < 1e-4
    tiled = _active_video_vae(encode_tile_latent_px=4, decode_tile_latent_px=4)
    x = torch.rand(1, 3, 1 + 4 * 2, 64, 64, generator=gen) * 2 - 1
    assert max(_compare_tiled(tiled, x)) < 1e-4


def test_tile_blending_hides_cut_context():
    """With no margin a tile misses its neighbours' context; cross-fading 2-pixel
    overlaps cuts what that costs (mean error 0.14 vs 0.19 for hard-cut tiles)."""
    errors = {}
    for overlap in (0, 2):
        vae = _active_video_vae(
            decode_chunk_latent_frames=0,
            decode_tile_latent_px=4,
            decode_tile_margin_latent_px=0,
            tile_overlap_latent_px=overlap,
        )
        z = torch.randn(1, 8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            errors[overlap] = float((vae.decode(z) - _untiled(vae).decode(z)).abs().mean())
    assert errors[2] < 0.85 * errors[0]


def test_tiled_video_vae_working_size_is_bounded():
    """Neither network ever sees more than one tile of a long clip: the largest input
    either gets is the same for a clip twice as long, and within one tile plus its
    context and margin (counted by forward hooks)."""
    chunk, ctx, tile, margin = 2, 2, 3, 1
    vae = _active_video_vae(
        encode_chunk_latent_frames=chunk,
        encode_context_latent_frames=ctx,
        decode_chunk_latent_frames=chunk,
        decode_context_latent_frames=ctx,
        encode_tile_latent_px=tile,
        decode_tile_latent_px=tile,
        decode_tile_margin_latent_px=margin,
        tile_overlap_latent_px=1,
    )
    seen: dict[str, list[tuple[int, ...]]] = {"encoder": [], "decoder": []}
    for name in seen:
        getattr(vae, name).register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(tuple(args[0].shape[2:]))
        )
    largest = []
    for latents in (6, 12):
        for calls in seen.values():
            calls.clear()
        x = torch.zeros(1, 3, 1 + 4 * (latents - 1), 48, 48)
        with torch.no_grad():
            assert vae.decode(vae.encode(x)).shape == x.shape
        largest.append({k: tuple(max(s[i] for s in v) for i in range(3)) for k, v in seen.items()})
    assert largest[0] == largest[1]
    sf = vae.cfg.spatial_factor
    assert largest[1]["encoder"] == (1 + 4 * (chunk + ctx - 1),) + ((tile + 2 * margin) * sf,) * 2
    assert largest[1]["decoder"] == (chunk + ctx,) + (tile + 2 * margin,) * 2


# -- the GAN vocoder ---------------------------------------------------------------------


def test_gan_vocoder_beats_griffin_lim_on_its_clip():
    """A vocoder trained briefly (200 steps of mel + multi-resolution STFT loss, then 20
    with the discriminators on at a low weight) on one panned clip scores a lower multi-resolution STFT
    distance on it than Griffin-Lim (measured ~1.7 vs 1.96), and keeps its stereo
    channels as correlated as the original's."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    vae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length).eval()
    wav = _panned_source(cfg)
    vocoder = NeuralVocoder(cfg.audio_vae)
    disc = AudioDiscriminator(
        AudioDiscriminatorConfig(periods=(2, 3, 5), period_channels=(8, 16), resolution_channels=8)
    )
    opt = torch.optim.AdamW(
        [{"params": vocoder.parameters(), "lr": 2e-3}, {"params": disc.parameters(), "lr": 2e-4}],
        betas=(0.8, 0.99),
    )
    for step in range(220):
        # A fresh discriminator's gradient is noise at first: it joins at a tenth of
        # its full weight (the VAE stage ramps it in over vae.vocoder_gan_ramp_steps).
        loss, metrics = vocoder.loss(wav[0], vae.mel, disc if step >= 200 else None, 0.1)
        opt.zero_grad()
        loss.backward()
        if step == 200:  # one backward trains both networks
            assert all(p.grad is not None for p in disc.parameters())
            assert {"g_adv", "fm", "d_loss"} <= set(metrics)
        opt.step()
    with torch.no_grad():
        mel = vae.waveform_to_mel(wav)
        neural = vae.mel_to_waveform(mel, vocoder.eval())
        griffin = vae.mel_to_waveform(mel, generator=torch.Generator().manual_seed(0))
    assert float(mr_stft_distance(neural, wav)) < 0.95 * float(mr_stft_distance(griffin, wav))
    assert _corr(neural[0, 0], neural[0, 1]) > 0.95


def test_truncated_or_corrupt_vocoder_checkpoint_is_refused(tmp_path):
    cfg = get_config("tiny").audio_vae
    torch.manual_seed(0)
    vocoder = NeuralVocoder(cfg)
    good = str(tmp_path / "good")
    save_vocoder(good, vocoder, cfg)
    loaded = load_vocoder(good)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.parameters(), vocoder.parameters(), strict=True)
    )
    weights = tmp_path / "good" / "model.safetensors"
    data = weights.read_bytes()
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", truncated)
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_vocoder(str(truncated))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "good", corrupt)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # inside the tensor data: the size still matches
    (corrupt / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vocoder(str(corrupt))
    other = str(tmp_path / "other")
    save_vocoder(other, NeuralVocoder(cfg), dataclasses.replace(cfg, vocoder_channels=64))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_vocoder(other)


# -- the video VAE's adversarial loss ----------------------------------------------------


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    out = layer(x)
    rec = (out - y).pow(2).mean()
    gan = -3.0 * out.tanh().mean()
    weight = adaptive_weight(rec, gan, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    assert torch.allclose(weight, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert not weight.requires_grad
    # Tripling the adversarial loss divides its weight by three.
    assert torch.allclose(adaptive_weight(rec, 3 * gan, layer.weight), weight / 3, rtol=1e-3)


def test_video_discriminator_is_off_before_warm_up():
    """The VAE stage's patch discriminator neither trains nor weighs on the VAE before
    vae.video_gan_start; from then on one backward gives both networks gradients."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    parts = SimpleNamespace(
        video_vae=VideoVAE(cfg.video_vae),
        audio_vae=AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length),
        vocoder=None,
    )
    pair = VAEPair(parts, with_vocoder=False, settings=VAEStageConfig(video_gan_start=3))
    assert pair.gan_components() == ("video_disc",)
    windows = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    no_audio = torch.zeros(2, dtype=torch.bool)
    for step, on in ((2, False), (3, True)):
        pair.zero_grad(set_to_none=True)
        loss, metrics = pair(windows, torch.zeros(2, 2, 1), no_audio, None, step)
        loss.backward()
        disc_grads = [p.grad for p in pair.video_disc.parameters()]
        assert all((g is not None) == on for g in disc_grads)
        assert ("video_adv_weight" in metrics) == on
        assert pair.video_vae.last_layer.grad is not None
    assert metrics["video_adv_weight"] > 0


def test_vae_stage_checkpoint_keeps_the_discriminators_for_resume(tmp_path):
    """The discriminators are training-only components: a training checkpoint holds
    them beside the pipeline's weights (which stay loadable as a pipeline) and a
    resumed stage gets them back exactly."""
    from model.pipeline import DuetPipeline
    from pipelines.train import state as ckpt

    settings = VAEStageConfig(vocoder_steps=1, vocoder_gan_start=0, video_gan_start=0)
    torch.manual_seed(0)
    pipe = DuetPipeline.from_preset("tiny", seed=0)
    pair = VAEPair(pipe, with_vocoder=True, settings=settings)
    components = ("video_vae", "audio_vae", "vocoder") + pair.gan_components()
    assert pair.gan_components() == ("audio_disc", "video_disc")
    opt = torch.optim.AdamW(pair.parameters(), 1e-3)
    n = pipe.audio_vae.samples_per_latent * 4
    windows, audio = torch.rand(1, 3, 5, 32, 32) * 2 - 1, 0.1 * torch.randn(1, 2, n)
    loss, metrics = pair(windows, audio, torch.tensor([True]), None, 0)
    assert {"vocoder_g_adv", "vocoder_fm", "video_adv_weight"} <= set(metrics)
    loss.backward()
    opt.step()
    model_state, opt_tensors, groups, _ = ckpt.gather_training_state(pair, opt, None)
    trained: dict[str, dict] = {}
    for key, value in model_state.items():
        comp, rest = key.split(".", 1)
        trained.setdefault(comp, {})[rest] = value
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in groups
    ]
    state = ckpt.TrainState(stage="vae", step=1, param_groups=groups)
    uri = str(tmp_path / "checkpoint_00000001")
    ckpt.write_checkpoint(uri, pipe, trained, opt_tensors, None, state)
    assert DuetPipeline.from_checkpoint(uri).config.name == "tiny"
    resumed = VAEPair(DuetPipeline.from_preset("tiny", seed=1), True, settings)
    ckpt.restore_checkpoint(uri, components, resumed, torch.optim.AdamW(resumed.parameters()), None)
    for name in ("audio_disc", "video_disc"):
        live, back = getattr(pair, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(live[k], back[k]) for k in live)


def test_colour_permutation_reorders_channels_and_draws_nothing_when_off():
    """``vae.colour_permute``: with probability p a window's RGB channels come back in
    one of the five other orders (all five drawn, each a true reordering); at p = 0
    the window is returned untouched and the step's generator is not advanced, so
    recipes without the option keep their random streams (and resume bit for bit)."""
    clip = torch.stack([torch.full((2, 4, 4), v) for v in (-0.5, 0.1, 0.9)])  # (3, T, H, W)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert permute_colours(clip, 0.0, gen) is clip
    assert torch.equal(gen.get_state(), state)

    orders, permuted = set(), 0
    for seed in range(200):
        out = permute_colours(clip, 0.5, torch.Generator().manual_seed(seed))
        order = tuple(int(torch.nonzero(clip[:, 0, 0, 0] == v)) for v in out[:, 0, 0, 0])
        assert sorted(order) == [0, 1, 2] and out.shape == clip.shape
        if order != (0, 1, 2):
            permuted += 1
            orders.add(order)
    assert orders == set(COLOUR_ORDERS) and 70 <= permuted <= 130  # expected 100
    always = permute_colours(clip, 1.0, torch.Generator().manual_seed(1))
    assert not torch.equal(always, clip)
    with pytest.raises(ValueError, match="colour_permute"):
        VAEStageConfig(colour_permute=1.5).validate()
