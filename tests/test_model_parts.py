"""Model unit tests: configs, VAEs, RoPE alignment, DiT, references, flow matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.media import AVClip
from model.audio_vae import AudioVAE, NeuralVocoder
from model.configs import PRESETS, ModelConfig, get_config
from model.dit import DualBranchDiT, TextConditioning, component_parameter_counts
from model.flow_matching import (
    add_noise,
    resolution_shift,
    sample_timesteps,
    schedule,
    shift_timesteps,
    velocity_target,
)
from model.pipeline import clip_tensors, parameter_breakdown
from model.references import ReferenceLatents, RefSlot
from model.rope import apply_rope, audio_positions, rope_1d, video_positions
from model.video_vae import ReconLossWeights, VideoVAE, motion_map, pick_crop, pixel_weights


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise_zero_init(module: torch.nn.Module, scale: float = 0.05) -> None:
    """AdaLN-zero makes a fresh DiT the identity; perturb it so every path matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _tiny_inputs(cfg: ModelConfig, batch: int = 2, latent_frames: int = 3):
    sf = cfg.video_vae.spatial_factor
    video = torch.randn(
        batch, cfg.video_vae.latent_channels, latent_frames, cfg.height // sf, cfg.width // sf
    )
    audio = torch.randn(
        batch, cfg.audio_vae.latent_channels, latent_frames * cfg.audio_latents_per_video_latent
    )
    t = torch.rand(batch)
    text = TextConditioning(
        torch.randn(batch, 6, cfg.text.embed_dim), torch.ones(batch, 6, dtype=torch.bool)
    )
    return video, audio, t, text


# -- configs and parameter counts ---------------------------------------------------


def test_parameter_counts_per_preset():
    totals = {}
    for name in PRESETS:
        rows = parameter_breakdown(get_config(name))
        assert all(n > 0 for _, n in rows), rows
        totals[name] = sum(n for _, n in rows)
    assert totals["tiny"] < 5e6
    assert 50e6 <= totals["small"] <= 150e6
    assert 1e9 <= totals["base"] <= 2e9
    assert totals["xl"] > 5e9
    assert totals["tiny"] < totals["small"] < totals["base"] < totals["xl"]


def test_config_roundtrip_and_validation():
    cfg = get_config("small")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    bad = get_config("tiny")
    bad.sample_rate = 44100  # 44100 / 64 mel frames per second is no whole hop
    with pytest.raises(ValueError, match="hop length"):
        bad.validate()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        get_config("tiny").num_latent_frames(8)


@pytest.mark.parametrize("name", list(PRESETS))
def test_audio_and_video_latents_of_a_clip_cover_the_same_time(name):
    """Each preset's real VAEs on a clip's own tensors: 1 + 4k frames give k + 1 video
    latent steps and exactly m (k + 1) audio latents, and the waveform they encode
    spans the seconds of those video latent steps."""
    cfg = get_config(name)
    sf, tf = cfg.video_vae.spatial_factor, cfg.video_vae.temporal_factor
    cfg.height = cfg.width = sf  # one latent pixel: only the time axis is checked here
    video_vae = VideoVAE(cfg.video_vae).eval()
    audio_vae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length).eval()
    m = cfg.audio_latents_per_video_latent
    for k in (1, 3):
        n = 1 + tf * k
        samples = round(n * cfg.sample_rate / cfg.fps)
        clip = AVClip(
            np.zeros((n, sf, sf, 3), np.uint8),
            cfg.fps,
            np.zeros((2, samples), np.float32),
            cfg.sample_rate,
        )
        video, audio = clip_tensors(clip, cfg)
        with torch.no_grad():
            zv, za = video_vae.encode(video[None]), audio_vae.encode(audio[None])
        assert zv.shape[2] == k + 1 and za.shape[-1] == m * (k + 1), (zv.shape, za.shape)
        assert audio.shape[-1] / cfg.sample_rate == pytest.approx((k + 1) * tf / cfg.fps)


# -- VAEs -----------------------------------------------------------------------------


def test_video_vae_shapes_causality_and_chunked_decode():
    cfg = get_config("tiny")
    vae = VideoVAE(cfg.video_vae).eval()
    x = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, cfg.video_vae.latent_channels, 5, 8, 8)  # 1 + 4k -> 1 + k, 8x
        # Causal: changing frames 9.. leaves latents 0..2 (frames 0..8) untouched.
        x2 = x.clone()
        x2[:, :, 9:] = 0
        z2 = vae.encode(x2)
        assert torch.equal(z2[:, :, :3], z[:, :, :3])
        assert not torch.equal(z2[:, :, 3:], z[:, :, 3:])
        # First frame alone: a still image is a one-frame video.
        assert vae.encode(x[:, :, :1]).shape[2] == 1
        _randomise_zero_init(vae.decoder, 0.02)
        zz = torch.randn(1, cfg.video_vae.latent_channels, 12, 8, 8)
        cfg.video_vae.decode_chunk_latent_frames = 0
        full = vae.decode(zz)
        assert full.shape == (1, 3, 45, 64, 64)
        cfg.video_vae.decode_chunk_latent_frames = 4
        chunked = vae.decode(zz)
        cfg.video_vae.decode_chunk_latent_frames = 0
        cfg.video_vae.decode_tile_latent_px = 4
        tiled = vae.decode(zz)
    assert chunked.shape == full.shape == tiled.shape
    assert (chunked - full).abs().max() < 1e-4
    assert (tiled - full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 6, 64, 64))


def test_motion_crops_find_the_small_moving_object():
    """A ball moving over a still backdrop: the most moving of 8 crops holds it (almost)
    nine times in ten, a uniform crop a quarter of the time; one candidate is the plain
    uniform draw (same generator calls as before the option existed)."""
    video = torch.zeros(3, 9, 64, 64)
    for t in range(9):  # a 6x6 ball moving right along the bottom left
        video[:, t, 40:46, 2 + t : 8 + t] = 0.8

    def hits(candidates: int) -> float:
        motion = motion_map(video)
        found = 0
        for seed in range(40):
            y, x = pick_crop(motion, 32, 8, candidates, torch.Generator().manual_seed(seed))
            found += bool(motion[:, y : y + 32, x : x + 32].sum() > 0)
        return found / 40

    assert hits(8) >= 0.7 and hits(1) <= 0.4  # expected 0.89 and 0.24
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    y = 8 * int(torch.randint(0, 5, (1,), generator=gen_b))
    x = 8 * int(torch.randint(0, 5, (1,), generator=gen_b))
    assert pick_crop(motion_map(video), 32, 8, 1, gen_a) == (y, x)


def test_pixel_weights_lift_a_still_object_only_with_the_standout_term():
    """A still green square and a moving ball on a gray backdrop: motion weighting
    lifts the ball alone (the square, unchanged over time, gets the backdrop's 1);
    the standout term lifts the square too, by its distance from the frame's median,
    and leaves the backdrop at 1."""
    video = torch.full((1, 3, 9, 32, 32), -0.1)  # gray backdrop, (B, 3, T, H, W)
    video[0, :, :, 4:10, 4:10] = torch.tensor([-0.6, 0.5, -0.5])[:, None, None, None]
    for t in range(9):
        video[0, :, t, 20:24, 2 + 2 * t : 6 + 2 * t] = 0.8
    square, backdrop = (0, 0, 4, 6, 6), (0, 0, 4, 28, 28)
    ball = (0, 0, 4, 21, 2 + 2 * 4 + 1)

    motion_only = pixel_weights(video, ReconLossWeights(motion=10.0))
    assert motion_only[square] == pytest.approx(1.0)
    assert motion_only[backdrop] == pytest.approx(1.0)
    assert motion_only[ball] == pytest.approx(1.0 + 10.0 * 0.9)

    both = pixel_weights(video, ReconLossWeights(motion=10.0, standout=10.0))
    assert both[square] == pytest.approx(1.0 + 10.0 * 0.6)  # largest channel gap: 0.6
    assert both[backdrop] == pytest.approx(1.0)
    assert both[ball] == pytest.approx(1.0 + 10.0 * 0.9 + 10.0 * 0.9)
    assert pixel_weights(video, ReconLossWeights()).eq(1.0).all()  # no weighting: the mean


def test_video_vae_levels_use_their_configured_time_kernels():
    cfg = get_config("tiny").video_vae  # level_time_kernels (1, 3)
    vae = VideoVAE(cfg)
    for level, kt in enumerate(cfg.level_time_kernels):
        enc_block = vae.encoder.levels[level][0]
        dec_block = vae.decoder.levels[len(cfg.channels) - 1 - level][1]  # after its Upsample
        for block in (enc_block, dec_block):
            assert block.conv1.conv.kernel_size[0] == kt
            assert block.conv2.conv.kernel_size[0] == kt


def test_audio_vae_shapes_and_griffin_lim_keeps_onsets():
    cfg = get_config("tiny")
    vae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length).eval()
    n_video_latents = 5
    n = cfg.audio_samples_for_latents(n_video_latents)
    wav = torch.zeros(1, 2, n)
    clicks = [0.5, 1.2]
    burst = torch.sin(torch.arange(300) * 0.7) * torch.exp(-torch.arange(300) / 60.0)
    for t in clicks:
        i = int(t * cfg.sample_rate)
        wav[0, :, i : i + 300] = 0.8 * burst
    with torch.no_grad():
        z = vae.encode(wav)
        assert z.shape == (
            1,
            cfg.audio_vae.latent_channels,
            n_video_latents * cfg.audio_latents_per_video_latent,
        )
        assert vae.decode(z).shape == wav.shape
        rebuilt = vae.mel_to_waveform(vae.waveform_to_mel(wav))
    assert rebuilt.shape == wav.shape
    frame = cfg.sample_rate // 100  # 10 ms energy frames
    energy = rebuilt[0, 0, : n // frame * frame].reshape(-1, frame).pow(2).mean(1)
    peaks = (energy > 0.1 * energy.max()).nonzero().flatten().float() / 100.0
    for t in clicks:
        assert (peaks - t).abs().min() < 0.03
    with pytest.raises(ValueError, match="multiple"):
        vae.encode(torch.zeros(1, 2, n + 1))


def test_neural_vocoder_learns():
    cfg = get_config("tiny")
    vae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length)
    vocoder = NeuralVocoder(cfg.audio_vae)
    t = torch.arange(8000) / cfg.sample_rate
    wav = (0.5 * torch.sin(2 * torch.pi * 440 * t))[None]
    opt = torch.optim.Adam(vocoder.parameters(), 3e-3)
    first = None
    for _ in range(25):
        loss, _ = vocoder.loss(wav, vae.mel)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


# -- RoPE time alignment ----------------------------------------------------------------


def test_rope_same_instant_same_temporal_position():
    cfg = get_config("tiny")
    m = cfg.audio_latents_per_video_latent
    n_video = 5
    video_t = video_positions(n_video, 2, 2)[:, 0].view(n_video, -1)[
        :, 0
    ]  # time of each latent frame
    audio_t = audio_positions(n_video * m, m)
    # Audio latents m*i .. m*i + m - 1 cover the frames of video latent i: same mean position.
    assert torch.allclose(audio_t.view(n_video, m).mean(dim=1), video_t)
    # The time each position stands for: audio latent j spans samples of the front-padded
    # waveform; its centre instant maps back to the same video latent index.
    spl = cfg.audio_samples_for_latents(1) // m
    pad = 3 * cfg.sample_rate // int(cfg.fps)
    for j in range(n_video * m):
        centre_s = ((j + 0.5) * spl - pad) / cfg.sample_rate
        frame_time = centre_s * cfg.fps  # in frame periods (negative inside the front pad)
        # Video latent i shows frames 4i-3 .. 4i, i.e. the interval [4i - 3, 4i + 1) in frame
        # periods, centred on 4i - 1: a frame time c belongs to latent position (c + 1) / 4.
        assert abs((frame_time + 1) / 4 - audio_t[j].item()) < 1e-5
    # Cross-modal RoPE scores depend only on the time difference: an audio key at the
    # same position as a video query scores as if neither were rotated.
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)
    pos_v = video_t[2:3]
    pos_a = audio_t[2 * m : 3 * m].mean().view(1)
    cq, sq = rope_1d(pos_v, 16, 10000.0)
    ck, sk = rope_1d(pos_a, 16, 10000.0)
    score = (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    assert torch.allclose(score, (q * k).sum(), atol=1e-5)


# -- DiT ---------------------------------------------------------------------------------


def test_dit_shapes_and_component_counts():
    cfg = get_config("tiny")
    dit = DualBranchDiT(cfg)
    video, audio, t, text = _tiny_inputs(cfg)
    out_v, out_a = dit(video, audio, t, text)
    assert out_v.shape == video.shape and out_a.shape == audio.shape
    # AdaLN-zero: a fresh model predicts exactly zero velocity.
    assert torch.count_nonzero(out_v) == 0 and torch.count_nonzero(out_a) == 0
    counts = component_parameter_counts(dit)
    assert sum(counts.values()) == sum(p.numel() for p in dit.parameters())
    with pytest.raises(ValueError, match="audio latents"):
        dit(video, audio[:, :, :-1], t, text)


def test_absent_references_change_no_bit_and_limits_raise():
    cfg = get_config("tiny")
    dit = DualBranchDiT(cfg).eval()
    _randomise_zero_init(dit)
    video, audio, t, text = _tiny_inputs(cfg)
    img = RefSlot(torch.randn(2, cfg.video_vae.latent_channels, 1, 8, 8))
    aud = RefSlot(torch.randn(2, cfg.audio_vae.latent_channels, 8))
    with torch.no_grad():
        base = dit(video, audio, t, text, ReferenceLatents(images=[img], audios=[aud]))
        padded = dit(
            video,
            audio,
            t,
            text,
            ReferenceLatents(
                images=[img, None, RefSlot(img.latent, torch.zeros(2, dtype=torch.bool))]
                + [None] * 6,
                videos=[None, None, None],
                audios=[aud, None, None],
            ),
        )
        none = dit(video, audio, t, text)
        empty = dit(video, audio, t, text, ReferenceLatents(images=[None] * 9))
    assert torch.equal(base[0], padded[0]) and torch.equal(base[1], padded[1])
    assert torch.equal(none[0], empty[0]) and torch.equal(none[1], empty[1])
    assert not torch.equal(base[0], none[0])  # present references do matter
    with pytest.raises(ValueError, match="too many image references"):
        ReferenceLatents(images=[None] * 10)
    with pytest.raises(ValueError, match="too many video references"):
        ReferenceLatents(videos=[None] * 4)
    with pytest.raises(ValueError, match="too many audio references"):
        ReferenceLatents(audios=[None] * 4)


def test_partially_present_reference_is_masked_per_sample():
    cfg = get_config("tiny")
    dit = DualBranchDiT(cfg).eval()
    _randomise_zero_init(dit)
    video, audio, t, text = _tiny_inputs(cfg)
    lat = torch.randn(2, cfg.video_vae.latent_channels, 1, 8, 8)
    with torch.no_grad():
        mixed = dit(
            video,
            audio,
            t,
            text,
            ReferenceLatents(images=[RefSlot(lat, torch.tensor([True, False]))]),
        )
        alone = dit(video[1:], audio[1:], t[1:], TextConditioning(text.tokens[1:], text.mask[1:]))
        withref = dit(video[:1], audio[:1], t[:1], TextConditioning(text.tokens[:1], text.mask[:1]),
                      ReferenceLatents(images=[RefSlot(lat[:1])]))  # fmt: skip
    assert torch.allclose(mixed[0][1:], alone[0], atol=1e-5)
    assert torch.allclose(mixed[0][:1], withref[0], atol=1e-5)


def test_cross_modal_attention_is_used():
    cfg = get_config("tiny")
    dit = DualBranchDiT(cfg).eval()
    _randomise_zero_init(dit)
    video, audio, t, text = _tiny_inputs(cfg)
    with torch.no_grad():
        _, audio_on = dit(video, audio, t, text)
        _, audio_off = dit(video, audio, t, text, cross_modal=False)
        # With the exchange on, the audio output depends on the video input ...
        _, audio_other_video = dit(torch.randn_like(video), audio, t, text)
        # ... and with it off, it does not.
        _, audio_off_other_video = dit(torch.randn_like(video), audio, t, text, cross_modal=False)
    assert (audio_on - audio_off).abs().max() > 1e-4
    assert (audio_on - audio_other_video).abs().max() > 1e-4
    assert torch.equal(audio_off, audio_off_other_video)


def test_bf16_autocast_forward():
    cfg = get_config("tiny")
    dit = DualBranchDiT(cfg).eval()
    _randomise_zero_init(dit)
    video, audio, t, text = _tiny_inputs(cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v, a = dit(video, audio, t, text)
    ref_v, _ = dit(video, audio, t, text)
    assert torch.isfinite(v.float()).all() and torch.isfinite(a.float()).all()
    assert (v.float() - ref_v).abs().max() < 0.1 * ref_v.abs().max() + 1e-3


def test_block_compiles_without_graph_breaks():
    cfg = get_config("tiny")
    dit = DualBranchDiT(cfg).eval()
    video, audio, t, text = _tiny_inputs(cfg)
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("args", args)

    block = dit.blocks[1]  # a block with cross-modal attention
    assert block.cross is not None
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        dit(video, audio, t, text)
    handle.remove()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(*captured["args"])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# -- flow matching -------------------------------------------------------------------------


def test_flow_matching_pieces():
    cfg = get_config("tiny").flow
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(10000, cfg, 1.0, gen)
    assert 0 < t.min() and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.02
    shifted = sample_timesteps(10000, cfg, 3.0, torch.Generator().manual_seed(0))
    assert float(shifted.mean()) > float(t.mean()) + 0.1  # more tokens -> noisier
    assert resolution_shift(256, cfg) == 1.0 and resolution_shift(4096, cfg) == 4.0
    u = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timesteps(u, 1.0), u)
    times = schedule(10, 3.0)
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all())
    assert schedule(4, 1.0, t_start=0.3)[0] == pytest.approx(0.3)
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    tt = torch.tensor([0.0, 0.5, 1.0])
    xt = add_noise(x0, noise, tt)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    # Following the exact velocity from noise lands on the data.
    assert torch.allclose(xt[2] - 1.0 * velocity_target(x0, noise)[2], x0[2])
    # Between the ends: the straight line (1 - t) x0 + t noise, one t per sample of a
    # video-shaped batch, and x_t - t v recovers the data at every t.
    x0, noise = torch.randn(5, 2, 3, 4, 4), torch.randn(5, 2, 3, 4, 4)
    tt = torch.tensor([0.1, 0.25, 0.5, 0.7, 0.93])
    xt = add_noise(x0, noise, tt)
    for i, t in enumerate(tt.tolist()):
        assert torch.allclose(xt[i], (1.0 - t) * x0[i] + t * noise[i], atol=1e-6)
    assert torch.allclose(xt - tt.view(-1, 1, 1, 1, 1) * velocity_target(x0, noise), x0, atol=1e-6)
    with pytest.raises(ValueError):
        schedule(0, 1.0)


def test_frames_and_audio_helpers():
    cfg = get_config("tiny")
    assert cfg.frames_for_duration(2.0) == 33
    assert (cfg.frames_for_duration(0.1) - 1) % 4 == 0
    # The clip's sound keeps its time against the frames: a click at frame 20 sits
    # (temporal_factor - 1) frames of front padding later in the model's waveform,
    # which is what lines audio latent group j up with video latent j.
    n, per_frame = 33, round(cfg.sample_rate / cfg.fps)
    wav = np.zeros((2, n * per_frame), np.float32)
    wav[:, 20 * per_frame] = 1.0
    clip = AVClip(np.zeros((n, 8, 8, 3), np.uint8), cfg.fps, wav, cfg.sample_rate)
    _, audio = clip_tensors(clip, cfg, n)
    assert audio.shape == (2, cfg.audio_samples_for_latents(cfg.num_latent_frames(n)))
    pad = (cfg.video_vae.temporal_factor - 1) * per_frame
    assert torch.nonzero(audio[0]).flatten().tolist() == [pad + 20 * per_frame]
