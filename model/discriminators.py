"""Discriminators and GAN losses for the decoders: the vocoder and the video VAE.

Audio (HiFi-GAN / Vocos family, kept small): a multi-period discriminator (the
waveform folded into ``period`` columns, 2D convs along time: periodic structure,
i.e. pitch and phase) and a multi-resolution STFT discriminator (log-magnitude
spectrograms at three resolutions: spectral texture). Both return per-scale logits
and the feature maps of every layer, for least-squares GAN losses and feature
matching. Video: a PatchGAN (pix2pix / taming-transformers' VQGAN) on single frames.
Latents: a head on a diffusion network's last hidden tokens (DMD2's classifier on the
fake score's features), for the Fast student's GAN term on real clips.

Training with one backward pass: the trainers in Duet take one loss and one
optimizer step per batch. The generator's adversarial terms are computed through
the discriminator with its parameters detached (:func:`detached`), so they move
only the generator; the discriminator's own loss sees the generator's output
detached, so it moves only the discriminator. Summing both gives each network
exactly its own GAN gradient in a single backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

LRELU = 0.1

Outputs = list[tuple[torch.Tensor, list[torch.Tensor]]]  # per sub-discriminator: logits, features


def detached(module: nn.Module, *args):
    """``module(*args)`` with its parameters cut from the graph: gradients reach the
    inputs (the generator) and never the module."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args)


# -- audio ------------------------------------------------------------------------


@dataclass
class AudioDiscriminatorConfig:
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (16, 32, 64)
    # (n_fft, hop) of the spectrogram discriminators.
    resolutions: tuple[tuple[int, int], ...] = ((512, 128), (256, 64), (128, 32))
    resolution_channels: int = 16


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: tuple[int, ...]):
        super().__init__()
        self.period = period
        layers, cin = [], 1
        for cout in channels:
            layers.append(nn.Conv2d(cin, cout, (5, 1), stride=(3, 1), padding=(2, 0)))
            cin = cout
        layers.append(nn.Conv2d(cin, cin, (5, 1), padding=(2, 0)))
        self.layers = nn.ModuleList(layers)
        self.out = nn.Conv2d(cin, 1, (3, 1), padding=(1, 0))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, n = wav.shape  # (B, N) -> (B, 1, N / period, period)
        pad = (-n) % self.period
        x = F.pad(wav, (0, pad), mode="reflect" if pad < n else "constant")
        x = x.view(b, 1, -1, self.period)
        feats = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), LRELU)
            feats.append(x)
        return self.out(x).flatten(1), feats


class ResolutionDiscriminator(nn.Module):
    def __init__(self, n_fft: int, hop: int, channels: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c = channels
        self.layers = nn.ModuleList(
            [
                # Strided along frequency from the first layer: a spectrogram has far
                # more bins than the texture needs, and full-width layers cost most.
                nn.Conv2d(1, c, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4)),
                nn.Conv2d(c, c, (3, 3), padding=(1, 1)),
            ]
        )
        self.out = nn.Conv2d(c, 1, (3, 3), padding=(1, 1))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True)
        x = torch.log(spec.abs().clamp_min(1e-5))[:, None].transpose(2, 3)  # (B, 1, T, F)
        feats = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), LRELU)
            feats.append(x)
        return self.out(x).flatten(1), feats


class AudioDiscriminator(nn.Module):
    """Multi-period + multi-resolution STFT discriminators on mono waveforms (B, N)."""

    def __init__(self, cfg: AudioDiscriminatorConfig | None = None):
        super().__init__()
        cfg = cfg or AudioDiscriminatorConfig()
        self.periods = nn.ModuleList(
            [PeriodDiscriminator(p, cfg.period_channels) for p in cfg.periods]
        )
        self.resolutions = nn.ModuleList(
            [ResolutionDiscriminator(n, h, cfg.resolution_channels) for n, h in cfg.resolutions]
        )

    def forward(self, wav: torch.Tensor) -> Outputs:
        return [d(wav) for d in self.periods] + [d(wav) for d in self.resolutions]


# -- video ------------------------------------------------------------------------


@dataclass
class PatchDiscriminatorConfig:
    channels: int = 32
    layers: int = 3  # stride-2 layers: each output logit judges a ~(2^layers * 6) px patch


class PatchDiscriminator(nn.Module):
    """PatchGAN on frames: (B, 3, T, H, W) -> logits (B*T, 1, h, w), one per patch.

    Per frame (2D), so it judges what a frame looks like (sharp edges, solid colours
    of small objects) and costs little next to the 3D VAE it trains."""

    def __init__(self, cfg: PatchDiscriminatorConfig | None = None, in_channels: int = 3):
        super().__init__()
        cfg = cfg or PatchDiscriminatorConfig()
        layers: list[nn.Module] = []
        cin, cout = in_channels, cfg.channels
        for i in range(cfg.layers):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            if i > 0:
                layers.append(nn.GroupNorm(min(8, cout), cout))
            layers.append(nn.LeakyReLU(0.2))
            cin, cout = cout, cout * 2
        layers += [nn.Conv2d(cin, cin, 3, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        return self.net(frames)


# -- latents ----------------------------------------------------------------------


class TokenCriticHead(nn.Module):
    """DMD2's GAN classifier on a DiT's last hidden tokens: one logit per clip.

    Each branch's tokens (video (B, Nv, Dv), audio (B, Na, Da)) go through a small
    per-token MLP; a clip's logit is the mean over its video tokens plus the mean over
    its audio tokens, so every place in the clip votes (a PatchGAN over tokens). The
    tokens come from the fake score, which has seen the noise level and the prompt,
    so the judgement is conditional on both. The last layer starts at zero: a new
    head says "undecided" (logit 0) until it learns."""

    def __init__(self, video_dim: int, audio_dim: int, hidden: int = 128):
        super().__init__()
        self.video = self._mlp(video_dim, hidden)
        self.audio = self._mlp(audio_dim, hidden)

    @staticmethod
    def _mlp(dim: int, hidden: int) -> nn.Sequential:
        net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    def forward(self, video_tokens: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        video = self.video(video_tokens.float()).mean(dim=(1, 2))  # (B,)
        audio = self.audio(audio_tokens.float()).mean(dim=(1, 2))  # (B,)
        return video + audio


# -- losses -----------------------------------------------------------------------


def logistic_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN's classifier loss: ``softplus(-real) + softplus(fake)``,
    each averaged (logits of real and generated samples, any shape)."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def logistic_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``softplus(-fake)``: large while the classifier
    calls the samples generated."""
    return F.softplus(-fake).mean()


def lsgan_discriminator_loss(real: Outputs, fake: Outputs) -> torch.Tensor:
    """Least squares (HiFi-GAN): real logits to 1, fake to 0, summed over scales."""
    return sum(
        torch.mean((1 - r) ** 2) + torch.mean(f**2)
        for (r, _), (f, _) in zip(real, fake, strict=True)
    )


def lsgan_generator_loss(fake: Outputs) -> torch.Tensor:
    return sum(torch.mean((1 - f) ** 2) for f, _ in fake)


def feature_matching_loss(real: Outputs, fake: Outputs) -> torch.Tensor:
    """L1 between the discriminator's feature maps of real and generated audio."""
    total = 0.0
    for (_, real_feats), (_, fake_feats) in zip(real, fake, strict=True):
        for r, f in zip(real_feats, fake_feats, strict=True):
            total = total + F.l1_loss(f, r.detach())
    return total


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN's balance (taming-transformers): ``|grad rec| / |grad gan|`` at the
    decoder's last layer, so the adversarial term pushes that layer about as hard as
    the reconstruction does whatever their raw scales. Detached: a weight, not a loss.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
