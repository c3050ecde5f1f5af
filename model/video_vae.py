"""Causal 3D convolutional video VAE: 8x spatial, 4x temporal, first frame alone.

``1 + 4k`` frames become ``1 + k`` latent frames: latent 0 sees frame 0 only (so a
still image is a one-frame video) and latent ``i`` summarises frames ``4i-3 .. 4i``.
Every convolution is causal in time (it pads with copies of the first frame on the
left, never looks ahead) and normalisation is per position over channels, so a
latent never depends on later frames or on far-away pixels. That locality is what
makes chunked and tiled decoding reproduce the full decode.

Latents leave :meth:`VideoVAE.encode` normalised per channel by the buffers
``latent_mean`` / ``latent_std`` (set by :meth:`VideoVAE.calibrate`), which is the
scale the diffusion transformer is trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.configs import VideoVAEConfig

# The posterior's log-variance starts near this value (std ~ 0.02) instead of 0: a
# unit-variance start drowns the untrained encoder's signal in noise and the
# decoder learns to ignore the latent (posterior collapse) before it can help.
LOGVAR_OFFSET = -8.0


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at every (t, h, w): no statistics across time or space."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...)
        rms = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * rms * self.weight.view(shape)


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C*p*p, T, h, w) -> (B, C, T, h*p, w*p)."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.view(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, t, h * p, w * p)


class CausalConv3d(nn.Module):
    """3D conv whose time axis only looks back (left pad with the first frame)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, time_kernel: int | None = None):
        super().__init__()
        kt = kernel if time_kernel is None else time_kernel
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(
            cin, cout, (kt, kernel, kernel), padding=(0, kernel // 2, kernel // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_pad:
            first = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([first, x], dim=2)
        return self.conv(x)


class ResBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, time_kernel: int = 3):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, time_kernel=time_kernel)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, time_kernel=time_kernel)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        # Residual branch starts closed: a deep stack begins as (near) identity maps,
        # which trains faster and more stably from scratch.
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W; optionally halve time causally (1 + 2n -> 1 + n frames)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.temporal = (
            nn.Conv3d(channels, channels, (2, 1, 1), stride=(2, 1, 1)) if temporal else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial(x)
        if self.temporal is not None:
            # Prepend a copy of frame 0 so the first output pair is (f0, f0): frame 0
            # is encoded alone, later outputs see pairs (f1, f2), (f3, f4), ...
            x = self.temporal(torch.cat([x[:, :, :1], x], dim=2))
        return x


class Upsample(nn.Module):
    """Inverse of :class:`Downsample`: 1 + n -> 1 + 2n frames, 2x H and W."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = nn.Conv3d(channels, 2 * channels, 1) if temporal else None
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal is not None:
            b, c, t, h, w = x.shape
            pairs = self.temporal(x).view(b, c, 2, t, h, w)  # two frames per latent frame
            x = pairs.permute(0, 1, 3, 2, 4, 5).reshape(b, c, 2 * t, h, w)[:, :, 1:]
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.spatial(x)


class VideoEncoder(nn.Module):
    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        ch = cfg.channels
        self.patch = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.in_channels * self.patch**2, ch[0])
        self.levels = nn.ModuleList()
        cin = ch[0]
        for level, cout in enumerate(ch):
            kt = cfg.level_time_kernels[level]
            blocks = [
                ResBlock3d(cin if i == 0 else cout, cout, kt)
                for i in range(cfg.res_blocks_per_level)
            ]
            down = Downsample(cout, temporal=level in cfg.temporal_down_levels)
            self.levels.append(nn.Sequential(*blocks, down))
            cin = cout
        self.mid = ResBlock3d(cin, cin)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, 2C, T', H/8, W/8)
        h = self.conv_in(space_to_depth(x, self.patch))
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VideoDecoder(nn.Module):
    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        ch = cfg.channels
        self.patch = cfg.patch_size
        # Time kernel 1 at the decoder's ends keeps its temporal receptive field (and so
        # the left context chunked decoding needs) small; the mid block mixes time.
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[-1], time_kernel=1)
        self.mid = ResBlock3d(ch[-1], ch[-1])
        self.levels = nn.ModuleList()
        for level in reversed(range(len(ch))):
            cin = ch[level]
            cout = ch[level - 1] if level > 0 else ch[0]
            up = Upsample(cin, temporal=level in cfg.temporal_down_levels)
            kt = cfg.level_time_kernels[level]
            blocks = [
                ResBlock3d(cin if i == 0 else cout, cout, kt)
                for i in range(cfg.res_blocks_per_level)
            ]
            self.levels.append(nn.Sequential(up, *blocks))
        self.norm_out = ChannelRMSNorm(ch[0])
        self.conv_out = CausalConv3d(ch[0], cfg.in_channels * self.patch**2, time_kernel=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, C, T', h, w) -> (B, 3, T, 8h, 8w)
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return depth_to_space(self.conv_out(F.silu(self.norm_out(h))), self.patch)


class VideoVAE(nn.Module):
    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VideoEncoder(cfg)
        self.decoder = VideoDecoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # -- geometry ----------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"video must be (B, {self.cfg.in_channels}, T, H, W), got {tuple(x.shape)}"
            )
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        t, h, w = x.shape[2:]
        if (t - 1) % tf:
            raise ValueError(f"video needs 1 + {tf}k frames, got {t}")
        if h % sf or w % sf:
            raise ValueError(f"video height and width must be multiples of {sf}, got {h}x{w}")

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (z - self.latent_mean.view(shape)) / self.latent_std.view(shape)

    def _denormalise(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return z * self.latent_std.view(shape) + self.latent_mean.view(shape)

    # -- encode ------------------------------------------------------------------
    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) posterior mean and log-variance."""
        self._check_input(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, (logvar + LOGVAR_OFFSET).clamp(-20.0, 4.0)

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, 1+4k, H, W) in [-1, 1] -> normalised latents (B, C, 1+k, H/8, W/8)."""
        mean, logvar = self.encode_distribution(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self._normalise(z)

    # -- decode ------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, 1+k, h, w) -> frames (B, 3, 1+4k, 8h, 8w).

        Long clips are decoded in chunks of latent frames, each with a few latent
        frames of left context whose output is dropped; large frames in spatial tiles
        with a margin that is cropped away.
        """
        z = self._denormalise(z)
        chunk = self.cfg.decode_chunk_latent_frames
        ctx = self.cfg.decode_context_latent_frames
        n = z.shape[2]
        if chunk <= 0 or n <= chunk:
            return self._decode_tiled(z)
        tf = self.cfg.temporal_factor
        pieces = []
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            first = max(0, start - ctx)
            out = self._decode_tiled(z[:, :, first:end])
            if start == 0:
                pieces.append(out)
            else:
                # Latent first -> local frame 0; latent first + r -> local frames
                # tf*r - tf + 1 .. tf*r. Keep the frames of latents start .. end-1.
                lo = tf * (start - first) - tf + 1
                pieces.append(out[:, :, lo:])
        return torch.cat(pieces, dim=2)

    def _decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        tile = self.cfg.decode_tile_latent_px
        h, w = z.shape[3:]
        if tile <= 0 or (h <= tile and w <= tile):
            return self.decoder(z)
        margin = self.cfg.decode_tile_margin_latent_px
        sf = self.cfg.spatial_factor
        rows = []
        for y0 in range(0, h, tile):
            y1 = min(h, y0 + tile)
            cols = []
            for x0 in range(0, w, tile):
                x1 = min(w, x0 + tile)
                ya, yb = max(0, y0 - margin), min(h, y1 + margin)
                xa, xb = max(0, x0 - margin), min(w, x1 + margin)
                out = self.decoder(z[:, :, :, ya:yb, xa:xb])
                top, left = (y0 - ya) * sf, (x0 - xa) * sf
                cols.append(out[:, :, :, top : top + (y1 - y0) * sf, left : left + (x1 - x0) * sf])
            rows.append(torch.cat(cols, dim=4))
        return torch.cat(rows, dim=3)

    # -- training ----------------------------------------------------------------
    def loss(
        self,
        x: torch.Tensor,
        kl_weight: float = 1e-6,
        generator: torch.Generator | None = None,
        motion_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Reconstruction (L1 + MSE) plus a small KL term on the raw posterior.

        ``motion_weight`` > 0 up-weights pixels that differ from the window's temporal
        median (moving objects): small moving objects cover few pixels, and without
        it an unweighted loss is content to paint the static background alone.
        """
        mean, logvar = self.encode_distribution(x)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        recon = self.decoder(z)
        err = (recon - x).abs() + (recon - x).pow(2)  # (B, 3, T, H, W)
        if motion_weight > 0:
            background = x.median(dim=2, keepdim=True).values
            moving = (x - background).abs().amax(dim=1, keepdim=True)  # (B, 1, T, H, W)
            weight = 1.0 + motion_weight * moving
            rec = (err * weight).sum() / (weight.sum() * x.shape[1])
        else:
            rec = err.mean()
        kl = 0.5 * torch.mean(mean.pow(2) + logvar.exp() - 1.0 - logvar)
        total = rec + kl_weight * kl
        return total, {"recon": float(rec.detach()), "kl": float(kl.detach())}

    @torch.no_grad()
    def calibrate(self, videos: list[torch.Tensor]) -> None:
        """Set per-channel latent mean/std from posterior means of sample videos."""
        means = [self.encode_distribution(v)[0] for v in videos]
        flat = torch.cat([m.transpose(0, 1).reshape(m.shape[1], -1) for m in means], dim=1)
        self.latent_mean.copy_(flat.mean(dim=1))
        self.latent_std.copy_(flat.std(dim=1).clamp_min(1e-3))


def motion_map(video: torch.Tensor) -> torch.Tensor:
    """(..., 3, T, H, W) in [-1, 1] -> (..., T, H, W): each pixel's largest channel
    distance from the clip's temporal median, i.e. where something moves."""
    return (video - video.median(dim=-3, keepdim=True).values).abs().amax(dim=-4)


def pick_crop(
    motion: torch.Tensor,  # (T, H, W) of the training window
    crop: int,
    multiple: int,
    candidates: int,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Top-left (y, x) of a ``crop``-pixel square on a ``multiple``-pixel grid: the one
    with the most motion among ``candidates`` random ones (1 = uniform).

    Small moving objects cover a few percent of a frame; uniform crops of a quarter
    of it miss them on most steps, and a VAE trained so learns to paint the backdrop
    and drops them (seen on the tiny world: whole colours vanished).
    """
    h, w = motion.shape[-2:]
    best, best_energy = (0, 0), -1.0
    for _ in range(max(1, candidates)):
        y = multiple * int(torch.randint(0, (h - crop) // multiple + 1, (1,), generator=generator))
        x = multiple * int(torch.randint(0, (w - crop) // multiple + 1, (1,), generator=generator))
        if candidates <= 1:
            return y, x
        energy = float(motion[:, y : y + crop, x : x + crop].sum())
        if energy > best_energy:
            best, best_energy = (y, x), energy
    return best


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.permute(3, 0, 1, 2).contiguous()


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
