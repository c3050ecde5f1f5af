"""Audio VAE: stereo waveform -> log-mel -> 1D convolutional latent, and back.

The mel hop length comes from :attr:`ModelConfig.mel_hop_length`, so the latent
frame rate is an exact multiple of the video latent rate. Framing is centred
(``torch.stft(center=True)``) with the last frame dropped, so ``N`` samples give
exactly ``N / hop`` mel frames and mel frame ``f`` is centred on sample ``f * hop``.

Waveform reconstruction: :func:`griffin_lim` (weight-free default, fast Griffin-Lim
with momentum on ``torch.stft``/``torch.istft``) or :class:`NeuralVocoder`, a small
trainable network predicting STFT magnitude and phase (Vocos style) for ``istft``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.configs import AudioVAEConfig

# The posterior's log-variance starts near this value (std ~ 0.02) instead of 0: a
# unit-variance start drowns the untrained encoder's signal in noise and the
# decoder learns to ignore the latent (posterior collapse) before it can help.
LOGVAR_OFFSET = -8.0

LOG_MEL_FLOOR = 1e-5
# Normalised log-mel = (log(mel) - OFFSET) / SCALE keeps network inputs near [-1, 1].
LOG_MEL_OFFSET = -5.0
LOG_MEL_SCALE = 4.0


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular HTK-mel filters, area-normalised."""
    n_bins = n_fft // 2 + 1
    # Built on the CPU explicitly (also under a meta-device context), moved with the module.
    cpu = dict(dtype=torch.float64, device="cpu")
    freqs = torch.linspace(0.0, sample_rate / 2, n_bins, **cpu)
    lo = _hz_to_mel(torch.tensor(fmin, **cpu))
    hi = _hz_to_mel(torch.tensor(sample_rate / 2, **cpu))
    mels = torch.linspace(float(lo), float(hi), n_mels + 2, **cpu)
    edges = _mel_to_hz(mels)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    fb = fb * (2.0 / (upper - lower))  # equal area per filter (Slaney normalisation)
    return fb.float()


class MelSpectrogram(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, fmin: float = 0.0):
        super().__init__()
        if hop > n_fft:
            raise ValueError(f"hop {hop} larger than n_fft {n_fft}")
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer(
            "fb", mel_filterbank(sample_rate, n_fft, n_mels, fmin), persistent=False
        )

    def stft(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, N) -> complex (B, n_fft/2+1, N/hop + 1)."""
        return torch.stft(
            wav, self.n_fft, self.hop, window=self.window, center=True, return_complex=True
        )

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(
            spec, self.n_fft, self.hop, window=self.window, center=True, length=length
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, C, N) waveform -> normalised log-mel (B, C, n_mels, N / hop)."""
        b, c, n = wav.shape
        if n % self.hop:
            raise ValueError(f"waveform length {n} is not a multiple of hop {self.hop}")
        mag = self.stft(wav.reshape(b * c, n).float()).abs()[..., :-1]  # drop the tail frame
        mel = torch.einsum("mf,bft->bmt", self.fb, mag)
        log_mel = torch.log(mel.clamp_min(LOG_MEL_FLOOR))
        return ((log_mel - LOG_MEL_OFFSET) / LOG_MEL_SCALE).view(b, c, -1, n // self.hop)

    def to_magnitude(self, norm_log_mel: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel (B, n_mels, T) -> linear magnitude (B, n_fft/2+1, T + 1).

        The mel filterbank's pseudo-inverse gives a non-negative least-squares-ish
        magnitude; the last frame is repeated so istft returns T * hop samples.
        """
        mel = torch.exp(norm_log_mel * LOG_MEL_SCALE + LOG_MEL_OFFSET)
        mel = torch.where(mel <= LOG_MEL_FLOOR * 1.0001, torch.zeros_like(mel), mel)
        inv = torch.linalg.pinv(self.fb)  # (F, M)
        mag = torch.einsum("fm,bmt->bft", inv, mel).clamp_min(0.0)
        return torch.cat([mag, mag[..., -1:]], dim=-1)


def griffin_lim(
    mel: MelSpectrogram,
    magnitude: torch.Tensor,
    length: int,
    iters: int = 32,
    momentum: float = 0.99,
    generator: torch.Generator | None = None,
    return_phase: bool = False,
) -> torch.Tensor:
    """Fast Griffin-Lim: magnitude (B, F, T+1) -> waveform (B, length), or with
    ``return_phase`` the final unit-modulus phase estimate (B, F, T+1)."""
    if generator is None:
        angles = torch.ones_like(magnitude, dtype=torch.complex64)
    else:
        phase = torch.rand(magnitude.shape, generator=generator) * 2 * math.pi
        angles = torch.polar(torch.ones_like(phase), phase).to(magnitude.device)
    previous = torch.zeros_like(angles)
    for _ in range(iters):
        wav = mel.istft(magnitude * angles, length)
        rebuilt = mel.stft(wav)
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        angles = accelerated / accelerated.abs().clamp_min(1e-8)
        previous = rebuilt
    if return_phase:
        return angles
    return mel.istft(magnitude * angles, length)


def griffin_lim_shared_phase(
    mel: MelSpectrogram,
    magnitude: torch.Tensor,  # (B, C, F, T+1): one magnitude per channel
    length: int,
    iters: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Griffin-Lim for multichannel audio with one phase estimate shared by the channels.

    A mel spectrogram carries no phase and no inter-channel time difference, so the
    only stereo image it can express is a level difference per time-frequency bin.
    Running Griffin-Lim per channel draws an independent phase for each (a random
    start, and the iterations converge to unrelated local optima): a source panned
    to the centre comes out decorrelated, heard as a phasey image with no position.
    Estimating the phase once, on the mid magnitude (the channels' mean), and giving
    every channel that phase with its own magnitude keeps the channels coherent and
    their level differences intact. Returns (B, C, length).
    """
    b, c, f, t = magnitude.shape
    phase = griffin_lim(
        mel, magnitude.mean(dim=1), length, iters, generator=generator, return_phase=True
    )  # (B, F, T+1) unit complex
    spec = magnitude * phase[:, None]
    return mel.istft(spec.reshape(b * c, f, t), length).view(b, c, length)


class ResBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, cin)
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.norm2 = nn.GroupNorm(1, cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv1d(cfg.audio_channels * cfg.n_mels, ch[0], 3, padding=1)
        layers = []
        cin = ch[0]
        for cout in ch:
            layers += [
                ResBlock1d(cin if i == 0 else cout, cout) for i in range(cfg.res_blocks_per_level)
            ]
            layers.append(nn.Conv1d(cout, cout, 4, stride=2, padding=1))  # halve the frame rate
            cin = cout
        layers.append(ResBlock1d(cin, cin))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(1, cin)
        self.conv_out = nn.Conv1d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (B, C*M, T) -> (B, 2L, T/4)
        h = self.body(self.conv_in(mel))
        return self.conv_out(F.silu(self.norm_out(h)))


class AudioDecoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv1d(cfg.latent_channels, ch[-1], 3, padding=1)
        layers: list[nn.Module] = [ResBlock1d(ch[-1], ch[-1])]
        for level in reversed(range(len(ch))):
            cin, cout = ch[level], ch[level - 1] if level > 0 else ch[0]
            layers.append(nn.ConvTranspose1d(cin, cin, 4, stride=2, padding=1))  # double
            layers += [
                ResBlock1d(cin if i == 0 else cout, cout) for i in range(cfg.res_blocks_per_level)
            ]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(1, ch[0])
        self.conv_out = nn.Conv1d(ch[0], cfg.audio_channels * cfg.n_mels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L, T/4) -> (B, C*M, T)
        h = self.body(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))


class AudioVAE(nn.Module):
    def __init__(self, cfg: AudioVAEConfig, sample_rate: int, hop_length: int):
        super().__init__()
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.mel = MelSpectrogram(sample_rate, cfg.n_fft, hop_length, cfg.n_mels, cfg.mel_fmin)
        self.encoder = AudioEncoder(cfg)
        self.decoder = AudioDecoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    @property
    def samples_per_latent(self) -> int:
        return self.hop_length * self.cfg.temporal_factor

    def waveform_to_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, C, N) -> normalised log-mel (B, C, M, N / hop)."""
        if wav.dim() != 3 or wav.shape[1] != self.cfg.audio_channels:
            raise ValueError(
                f"audio must be (B, {self.cfg.audio_channels}, N), got {tuple(wav.shape)}"
            )
        if wav.shape[-1] % self.samples_per_latent:
            raise ValueError(
                f"audio length {wav.shape[-1]} must be a multiple of {self.samples_per_latent}"
            )
        return self.mel(wav)

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.view(1, -1, 1)) / self.latent_std.view(1, -1, 1)

    def _denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1) + self.latent_mean.view(1, -1, 1)

    def encode_mel_distribution(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, m, t = mel.shape
        mean, logvar = self.encoder(mel.reshape(b, c * m, t)).chunk(2, dim=1)
        return mean, (logvar + LOGVAR_OFFSET).clamp(-20.0, 4.0)

    def encode(
        self, wav: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, C, N) -> normalised latents (B, L, N / samples_per_latent)."""
        mean, logvar = self.encode_mel_distribution(self.waveform_to_mel(wav))
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self._normalise(z)

    def decode_mel(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, L, T') -> normalised log-mel (B, C, M, 4T')."""
        mel = self.decoder(self._denormalise(z))
        b, _, t = mel.shape
        return mel.view(b, self.cfg.audio_channels, self.cfg.n_mels, t)

    def loss(
        self, wav: torch.Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mel = self.waveform_to_mel(wav)
        mean, logvar = self.encode_mel_distribution(mel)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        recon = self.decoder(mean + torch.exp(0.5 * logvar) * noise).view_as(mel)
        rec = F.l1_loss(recon, mel) + F.mse_loss(recon, mel)
        kl = 0.5 * torch.mean(mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return rec + kl_weight * kl, {"recon": float(rec.detach()), "kl": float(kl.detach())}

    @torch.no_grad()
    def calibrate(self, waveforms: list[torch.Tensor]) -> None:
        means = [self.encode_mel_distribution(self.waveform_to_mel(w))[0] for w in waveforms]
        flat = torch.cat([m.transpose(0, 1).reshape(m.shape[1], -1) for m in means], dim=1)
        self.latent_mean.copy_(flat.mean(dim=1))
        self.latent_std.copy_(flat.std(dim=1).clamp_min(1e-3))

    def mel_to_waveform(
        self,
        mel: torch.Tensor,
        vocoder: NeuralVocoder | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised log-mel (B, C, M, T) -> waveform (B, C, T * hop) in [-1, 1]."""
        b, c, m, t = mel.shape
        flat = mel.reshape(b * c, m, t).float()
        length = t * self.hop_length
        if vocoder is None:
            mag = self.mel.to_magnitude(flat).view(b, c, -1, t + 1)
            wav = griffin_lim_shared_phase(
                self.mel, mag, length, self.cfg.griffin_lim_iters, generator=generator
            )
        else:
            wav = vocoder(flat, self.mel, length)
        return wav.view(b, c, length).clamp(-1.0, 1.0)

    def decode(
        self,
        z: torch.Tensor,
        vocoder: NeuralVocoder | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised latents (B, L, T') -> waveform (B, C, T' * samples_per_latent)."""
        return self.mel_to_waveform(self.decode_mel(z), vocoder, generator)


# (n_fft, hop) of the multi-resolution STFT distance (Parallel WaveGAN's, at 16 kHz).
STFT_RESOLUTIONS = ((256, 64), (512, 128), (1024, 256))


def mr_stft_distance(
    pred: torch.Tensor, target: torch.Tensor, resolutions=STFT_RESOLUTIONS
) -> torch.Tensor:
    """Multi-resolution STFT distance of waveforms (..., N): spectral convergence plus
    log-magnitude L1, averaged over resolutions (0 = identical magnitudes). Phase is
    not compared, so it scores what is heard, not the sample values."""
    pred, target = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    total = 0.0
    for n_fft, hop in resolutions:
        window = torch.hann_window(n_fft, device=pred.device)
        p = torch.stft(pred, n_fft, hop, window=window, return_complex=True).abs()
        t = torch.stft(target, n_fft, hop, window=window, return_complex=True).abs()
        sc = torch.linalg.norm(p - t) / torch.linalg.norm(t).clamp_min(1e-5)
        log_l1 = F.l1_loss(torch.log(p.clamp_min(1e-5)), torch.log(t.clamp_min(1e-5)))
        total = total + sc + log_l1
    return total / len(resolutions)


class NeuralVocoder(nn.Module):
    """Normalised log-mel -> STFT magnitude and phase -> istft (Vocos style).

    A small dilated 1D conv stack predicting log-magnitude and phase per STFT bin,
    trained as a GAN (:meth:`loss` with an :class:`~model.discriminators.AudioDiscriminator`:
    least-squares adversarial and feature-matching terms) on top of a mel L1 and a
    multi-resolution STFT distance, as HiFi-GAN and Vocos are. Each channel of a
    stereo clip is vocoded by the same deterministic function of its own mel, so
    channels that agree stay in phase (no random phase to decorrelate them).
    """

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        n_bins = cfg.n_fft // 2 + 1
        ch = cfg.vocoder_channels
        self.conv_in = nn.Conv1d(cfg.n_mels, ch, 7, padding=3)
        self.blocks = nn.Sequential(
            *[ResBlock1d(ch, ch, dilation=2 ** (i % 3)) for i in range(cfg.vocoder_layers)]
        )
        self.norm_out = nn.GroupNorm(1, ch)
        self.conv_out = nn.Conv1d(ch, 2 * n_bins, 1)
        # Start from quiet output (magnitude e^-4): audio spectra are mostly near zero,
        # and a unit-magnitude start spends the first steps just turning it down.
        nn.init.constant_(self.conv_out.bias[:n_bins], -4.0)

    def spectrum(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, M, T) -> complex (B, F, T + 1)."""
        mel = torch.cat([mel, mel[..., -1:]], dim=-1)
        h = self.blocks(self.conv_in(mel))
        log_mag, phase = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        mag = torch.exp(log_mag.clamp(max=8.0))
        # The phase is used as an angle directly (Vocos: cos p + i sin p): it wraps
        # smoothly, where a squashed pi * tanh(p) cannot cross +-pi.
        return torch.polar(mag, phase)

    def forward(self, mel: torch.Tensor, analysis: MelSpectrogram, length: int) -> torch.Tensor:
        return analysis.istft(self.spectrum(mel), length)

    def loss(
        self,
        wav: torch.Tensor,
        analysis: MelSpectrogram,
        discriminator: nn.Module | None = None,
        adv_weight: float = 1.0,
        fm_weight: float = 2.0,
        mel_weight: float = 45.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """wav (B, N) mono -> loss of re-synthesising it from its own mel.

        Without ``discriminator``: mel L1 + multi-resolution STFT distance. With one,
        also the generator's least-squares adversarial and feature-matching terms
        (through the discriminator with its parameters detached) and the
        discriminator's own loss (on the output detached): one backward trains both
        (see :mod:`model.discriminators`).
        """
        from model.discriminators import (
            detached,
            feature_matching_loss,
            lsgan_discriminator_loss,
            lsgan_generator_loss,
        )

        target_mel = analysis(wav[:, None])[:, 0]
        pred = self(target_mel, analysis, wav.shape[-1])
        mel_l1 = F.l1_loss(analysis(pred[:, None])[:, 0], target_mel)
        stft = mr_stft_distance(pred, wav)
        total = mel_weight * mel_l1 + stft
        metrics = {"mel": float(mel_l1.detach()), "mr_stft": float(stft.detach())}
        if discriminator is None:
            return total, metrics
        real = discriminator(wav)
        d_loss = lsgan_discriminator_loss(real, discriminator(pred.detach()))
        fake = detached(discriminator, pred)
        g_adv = lsgan_generator_loss(fake)
        fm = feature_matching_loss(real, fake)
        total = total + adv_weight * (g_adv + fm_weight * fm) + d_loss
        metrics |= {"g_adv": float(g_adv.detach()), "fm": float(fm.detach())}
        metrics["d_loss"] = float(d_loss.detach())
        return total, metrics


VOCODER_KIND = "duet.vocoder"


def save_vocoder(uri: str, vocoder: NeuralVocoder, cfg: AudioVAEConfig) -> None:
    """A standalone vocoder checkpoint (safetensors + config.json with its config)."""
    from dataclasses import asdict

    from model.checkpoint import save_state

    save_state(uri, vocoder.state_dict(), {"kind": VOCODER_KIND, "audio_vae": asdict(cfg)})


def load_vocoder(uri: str) -> NeuralVocoder:
    """Read a vocoder checkpoint; a missing, truncated, corrupt or foreign one raises
    :class:`~model.checkpoint.CheckpointError` naming the file and what is wrong."""
    from core.config import ConfigError, config_from_dict
    from model.checkpoint import CheckpointError, load_state

    try:
        tensors, meta = load_state(uri)
    except CheckpointError:
        raise
    except Exception as err:  # a file system or format error the checks did not name
        raise CheckpointError(f"{uri}: unreadable vocoder checkpoint: {err}") from err
    if meta.get("kind") != VOCODER_KIND:
        raise CheckpointError(f"{uri}: not a vocoder checkpoint (kind {meta.get('kind')!r})")
    try:
        cfg = config_from_dict(AudioVAEConfig, meta.get("audio_vae", {}))
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{uri}: bad vocoder config: {err}") from err
    vocoder = NeuralVocoder(cfg)
    try:
        vocoder.load_state_dict(tensors)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"{uri}: weights do not fit the vocoder config: {err}") from err
    return vocoder.eval()
