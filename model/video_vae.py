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

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.configs import VideoVAEConfig

# The posterior's log-variance starts near this value (std ~ 0.02) instead of 0: a
# unit-variance start drowns the untrained encoder's signal in noise and the
# decoder learns to ignore the latent (posterior collapse) before it can help.
LOGVAR_OFFSET = -8.0

# cuDNN indexes a convolution's tensors with 32-bit integers. PyTorch splits a larger
# one along the batch, which a batch of one cannot be, and then falls back to slow
# kernels or huge workspaces: every decoder activation of a piece stays below this
# (with a margin: the plan counts the largest activation, not cuDNN's scratch).
MAX_PIECE_ELEMENTS = int(0.9 * 2**31)
# A few piece shapes per clip size (edge tiles are narrower): Dynamo's default of 8
# graphs would run out after a few sizes; past this limit the decoder runs eagerly.
DECODE_RECOMPILE_LIMIT = 64


@dataclass
class FastDecode:
    """How :meth:`VideoVAE.decode` runs on a GPU (``fast``); the CPU path ignores it.

    On the CPU the config's chunks and tiles bound memory and the decode is float32.
    On a GPU memory is plentiful and the recomputed context is what costs: base at
    832x480 x 5 s recomputed 3.6x the decoder's work with 8-latent chunks (12 of
    left context each) and 32-px tiles. ``plan`` picks the chunk and (non-square) tile
    that recompute least while every activation stays under
    :data:`MAX_PIECE_ELEMENTS`; ``bf16`` runs it under bf16 autocast (pieces are
    blended in float32); ``compile`` runs the decoder through ``torch.compile`` (one
    static graph per piece shape, about 16 s each on first use), which fuses the
    norm / SiLU / time-pad passes that took half the bf16 decode. Measured on an
    H200 (base, 832x480 x 5 s, ``bench/infer_gpu.py --decode-sweep``): config fp32
    6.69 s; plan fp32 2.72 s; plan bf16 2.35 s; + compile 1.09 s; channels_last and
    cudnn.benchmark no change; untiled (pieces over 2^31 elements) silently wrong.
    """

    plan: bool = True
    bf16: bool = True
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: bool = True


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
    def encode_distribution(
        self, x: torch.Tensor, tiled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) posterior mean and log-variance.

        ``tiled``: long clips in chunks of latent frames, large frames in spatial
        tiles (see :meth:`_encode_chunked`); training windows pass False.
        """
        self._check_input(x)
        h = self._encode_chunked(x) if tiled else self.encoder(x)
        mean, logvar = h.chunk(2, dim=1)
        return mean, (logvar + LOGVAR_OFFSET).clamp(-20.0, 4.0)

    def _encode_chunked(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1+4k, H, W) -> (B, 2C, 1+k, h, w), at most ``encode_chunk`` +
        ``encode_context`` latent frames per encoder call.

        A chunk of latents a..b-1 is encoded from frames 4m .. 4(b-1) with
        m = a - context: local frame 0 (global 4m) is encoded alone and dropped, and
        local latent r is global latent m + r because the causal downsamplers pair
        frames (4m+1, 4m+2), (4m+3, 4m+4), ... exactly as the full clip does. With
        m = 0 the chunk starts at the clip's own first frame and is exact outright.
        """
        cfg = self.cfg
        tf, sf = cfg.temporal_factor, cfg.spatial_factor

        def run(v: torch.Tensor) -> torch.Tensor:
            tile, margin = cfg.encode_tile_latent_px, cfg.decode_tile_margin_latent_px
            return self._spatial_tiles(self.encoder, v, tile, margin, sf, 1)

        n = 1 + (x.shape[2] - 1) // tf
        chunk, ctx = cfg.encode_chunk_latent_frames, cfg.encode_context_latent_frames
        if chunk <= 0 or n <= chunk:
            return run(x)
        pieces = []
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            m = max(0, a - ctx)
            pieces.append(run(x[:, :, tf * m : tf * (b - 1) + 1])[:, :, a - m :])
        return torch.cat(pieces, dim=2)

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
    def decode(self, z: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
        """Normalised latents (B, C, 1+k, h, w) -> float32 frames (B, 3, 1+4k, 8h, 8w).

        Long clips are decoded in chunks of latent frames, each with a few latent
        frames of left context whose output is dropped; large frames in spatial tiles
        with a margin that is cropped away. ``fast`` (default: on a GPU) takes the
        chunks, tiles and precision from :attr:`fast_decode` instead of the config.
        """
        z = self._denormalise(z)
        fast = z.is_cuda if fast is None else fast
        cfg = self.cfg
        if not fast:
            tile = cfg.decode_tile_latent_px
            return self._decode_chunked(
                z, cfg.decode_chunk_latent_frames, (tile, tile), self.decoder
            )
        opts = self.fast_decode
        if opts.plan:
            chunk, tile = self.decode_plan(*z.shape[2:])
        else:
            chunk, tile = cfg.decode_chunk_latent_frames, (cfg.decode_tile_latent_px,) * 2
        decoder = self._compiled_decoder() if opts.compile and z.is_cuda else self.decoder

        def run(v: torch.Tensor) -> torch.Tensor:
            if opts.channels_last:
                v = v.contiguous(memory_format=torch.channels_last_3d)
            return decoder(v).float()  # blend and crop in float32

        autocast = (
            torch.autocast(z.device.type, torch.bfloat16) if opts.bf16 else contextlib.nullcontext()
        )
        flags = (
            torch.backends.cudnn.flags(enabled=True, benchmark=True)
            if opts.cudnn_benchmark and z.is_cuda
            else contextlib.nullcontext()
        )
        limit = torch._dynamo.config.patch(recompile_limit=DECODE_RECOMPILE_LIMIT)
        with autocast, flags, limit:
            return self._decode_chunked(z, chunk, tile, run)

    @property
    def fast_decode(self) -> FastDecode:
        # A plain attribute, not a buffer: no state-dict key, set per process.
        if "_fast_decode" not in self.__dict__:
            self.__dict__["_fast_decode"] = FastDecode()
        return self.__dict__["_fast_decode"]

    def _compiled_decoder(self):
        if "_decoder_compiled" not in self.__dict__:
            self.__dict__["_decoder_compiled"] = torch.compile(self.decoder, dynamic=False)
        return self.__dict__["_decoder_compiled"]

    def _decode_chunked(self, z: torch.Tensor, chunk: int, tile: tuple[int, int], fn):
        ctx = self.cfg.decode_context_latent_frames
        n = z.shape[2]
        if chunk <= 0 or n <= chunk:
            return self._decode_tiled(z, tile, fn)
        tf = self.cfg.temporal_factor
        pieces = []
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            first = max(0, start - ctx)
            out = self._decode_tiled(z[:, :, first:end], tile, fn)
            if start == 0:
                pieces.append(out)
            else:
                # Latent first -> local frame 0; latent first + r -> local frames
                # tf*r - tf + 1 .. tf*r. Keep the frames of latents start .. end-1.
                lo = tf * (start - first) - tf + 1
                pieces.append(out[:, :, lo:])
        return torch.cat(pieces, dim=2)

    def _decode_tiled(self, z: torch.Tensor, tile: tuple[int, int], fn) -> torch.Tensor:
        margin = self.cfg.decode_tile_margin_latent_px
        return self._spatial_tiles(fn, z, tile, margin, 1, self.cfg.spatial_factor)

    def decoder_peak_elements(self, n: int, h: int, w: int) -> int:
        """Elements of the decoder's largest activation for (n latent frames, h, w)."""
        cfg = self.cfg
        ch = cfg.channels
        peak = ch[-1] * (n + 2) * h * w
        for level in reversed(range(len(ch))):
            cin, cout = ch[level], ch[level - 1] if level > 0 else ch[0]
            if level in cfg.temporal_down_levels:
                peak = max(peak, 2 * cin * n * h * w)  # the temporal 1x1 conv's frame pairs
                n = 2 * n - 1
            h, w = 2 * h, 2 * w
            peak = max(peak, max(cin, cout) * (n + 2) * h * w)  # + causal time pad
        return max(peak, cfg.in_channels * cfg.patch_size**2 * n * h * w)

    def decode_plan(self, n: int, h: int, w: int) -> tuple[int, tuple[int, int]]:
        """(chunk latent frames, (tile h, tile w)) that recompute the least decoder
        work (left context and tile margins) with every activation of a piece under
        :data:`MAX_PIECE_ELEMENTS`. Chunk 0 / a tile >= the frame: not split."""
        cache = self.__dict__.setdefault("_decode_plans", {})
        if (n, h, w) not in cache:
            cache[n, h, w] = self._search_plan(n, h, w)
        return cache[n, h, w]

    def _search_plan(self, n: int, h: int, w: int) -> tuple[int, tuple[int, int]]:
        ctx, margin = self.cfg.decode_context_latent_frames, self.cfg.decode_tile_margin_latent_px
        overlap = self.cfg.tile_overlap_latent_px
        rows = [(t, *_tile_cost(h, t, margin, overlap)) for t in _tile_sizes(h)]
        cols = [(t, *_tile_cost(w, t, margin, overlap)) for t in _tile_sizes(w)]
        best = None
        for chunk in [0] + list(range(n - 1, 0, -1)):
            t_work, t_max = _chunk_cost(n, chunk, ctx)
            if best is not None and t_work * h * w >= best[0]:
                continue  # even unsplit frames would cost more than the best so far
            # The peak is proportional to the piece's area: the largest area allowed.
            area = MAX_PIECE_ELEMENTS // self.decoder_peak_elements(t_max, 1, 1)
            for th, h_work, h_max in rows:
                for tw, w_work, w_max in cols:
                    cost = t_work * h_work * w_work
                    if h_max * w_max <= area and (best is None or cost < best[0]):
                        best = (cost, chunk, (th, tw))
        if best is None:  # not even one latent frame of the smallest tile fits
            return 1, (8, 8)
        return best[1], best[2]

    def _spatial_tiles(self, fn, x: torch.Tensor, tile, margin: int, scale_in: int, scale_out: int):
        """``fn`` over overlapping spatial tiles of ``x``, cross-faded where they overlap.

        Sizes are in latent pixels (``scale_in`` / ``scale_out`` input / output pixels
        per latent pixel: 1 and 8 to decode, 8 and 1 to encode). Each tile is run
        with ``margin`` latent pixels of extra context on every side, cropped away;
        neighbours overlap by ``tile_overlap_latent_px`` and are blended with linear
        ramps, so what a tile's cut context changes fades out instead of stepping.
        ``tile``: one size for both sides or (height, width).
        """
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        hl, wl = x.shape[-2] // scale_in, x.shape[-1] // scale_in
        if th <= 0 or tw <= 0 or (hl <= th and wl <= tw):
            return fn(x)
        th, tw = min(th, hl), min(tw, wl)
        overlap = max(0, min(self.cfg.tile_overlap_latent_px, th - 1, tw - 1))
        out = weight = None
        for y0 in tile_starts(hl, th, overlap):
            y1 = min(hl, y0 + th)
            for x0 in tile_starts(wl, tw, overlap):
                x1 = min(wl, x0 + tw)
                ya, yb = max(0, y0 - margin), min(hl, y1 + margin)
                xa, xb = max(0, x0 - margin), min(wl, x1 + margin)
                piece = fn(x[..., ya * scale_in : yb * scale_in, xa * scale_in : xb * scale_in])
                top, left = (y0 - ya) * scale_out, (x0 - xa) * scale_out
                piece = piece[
                    ..., top : top + (y1 - y0) * scale_out, left : left + (x1 - x0) * scale_out
                ]
                wy = blend_ramp((y1 - y0) * scale_out, overlap * scale_out, y0 > 0, y1 < hl)
                wx = blend_ramp((x1 - x0) * scale_out, overlap * scale_out, x0 > 0, x1 < wl)
                w = (wy[:, None] * wx[None]).to(piece)
                if out is None:
                    out = piece.new_zeros(piece.shape[:-2] + (hl * scale_out, wl * scale_out))
                    weight = piece.new_zeros(hl * scale_out, wl * scale_out)
                ys, xs = (
                    slice(y0 * scale_out, y1 * scale_out),
                    slice(x0 * scale_out, x1 * scale_out),
                )
                out[..., ys, xs] += piece * w
                weight[ys, xs] += w
        return out / weight

    # -- training ----------------------------------------------------------------
    def loss(
        self,
        x: torch.Tensor,  # (B, 3, T, H, W) in [-1, 1]
        weights: ReconLossWeights | None = None,
        generator: torch.Generator | None = None,
        discriminator: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Reconstruction (L1 + MSE, per pixel weighted by :func:`pixel_weights`) plus a
        small KL term on the raw posterior.

        ``discriminator`` (a :class:`~model.discriminators.PatchDiscriminator`, passed
        only once the trainer's warm-up is over) adds VQGAN's adversarial term: the
        generator's hinge loss through the discriminator with its parameters
        detached, scaled by ``weights.gan`` times the adaptive weight (reconstruction
        over adversarial gradient norm at the decoder's last layer), plus the
        discriminator's own hinge loss on the reconstruction detached.
        """
        w = weights or ReconLossWeights()
        mean, logvar = self.encode_distribution(x, tiled=False)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        recon = self.decoder(z)
        err = (recon - x).abs() + (recon - x).pow(2)  # (B, 3, T, H, W)
        weight = pixel_weights(x, w)  # (B, 1, T, H, W)
        rec = (err * weight).sum() / (weight.sum() * x.shape[1])
        kl = 0.5 * torch.mean(mean.pow(2) + logvar.exp() - 1.0 - logvar)
        total = rec + w.kl * kl
        parts = {"recon": float(rec.detach()), "kl": float(kl.detach())}
        if discriminator is not None:
            from model.discriminators import adaptive_weight, detached, hinge_discriminator_loss

            g_loss = -detached(discriminator, recon).mean()
            d_weight = w.gan * adaptive_weight(rec, g_loss, self.last_layer)
            d_loss = hinge_discriminator_loss(discriminator(x), discriminator(recon.detach()))
            total = total + d_weight * g_loss + d_loss
            parts |= {"g_adv": float(g_loss.detach()), "d_loss": float(d_loss.detach())}
            parts["adv_weight"] = float(d_weight)
        return total, parts

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight (where VQGAN balances its losses)."""
        return self.decoder.conv_out.conv.weight

    @torch.no_grad()
    def calibrate(self, videos: list[torch.Tensor]) -> None:
        """Set per-channel latent mean/std from posterior means of sample videos."""
        means = [self.encode_distribution(v)[0] for v in videos]
        flat = torch.cat([m.transpose(0, 1).reshape(m.shape[1], -1) for m in means], dim=1)
        self.latent_mean.copy_(flat.mean(dim=1))
        self.latent_std.copy_(flat.std(dim=1).clamp_min(1e-3))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of ``tile``-long tiles covering ``size``, neighbours overlapping by
    at least ``overlap`` (the last tile is flush with the end)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _chunk_cost(n: int, chunk: int, ctx: int) -> tuple[int, int]:
    """(latent frames decoded in all, most in one chunk) for chunks with left context."""
    if chunk <= 0 or n <= chunk:
        return n, n
    sizes = [min(n, a + chunk) - max(0, a - ctx) for a in range(0, n, chunk)]
    return sum(sizes), max(sizes)


def _tile_cost(size: int, tile: int, margin: int, overlap: int) -> tuple[int, int]:
    """(latent px decoded in all along one side, most in one tile), margins included."""
    if size <= tile:
        return size, size
    overlap = max(0, min(overlap, tile - 1))
    sizes = [
        min(size, a + tile + margin) - max(0, a - margin) for a in tile_starts(size, tile, overlap)
    ]
    return sum(sizes), max(sizes)


def _tile_sizes(size: int) -> list[int]:
    """Tile sizes worth trying along a side of ``size`` latent px (even, >= 8)."""
    return [size] + list(range(min(size - 1, size - size % 2), 7, -2))


def blend_ramp(length: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """(length,) cross-fade weights of one tile: linear ramps over ``overlap`` at the
    sides that have a neighbour, never zero (so every pixel is covered)."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = (torch.arange(overlap) + 0.5) / overlap
        if lead:
            w[:overlap] = ramp
        if trail:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


@dataclass(frozen=True)
class ReconLossWeights:
    """How :meth:`VideoVAE.loss` weighs its terms (a VAE stage's config carries them)."""

    kl: float = 1e-6
    # Pixels that differ from the window's temporal median (moving objects).
    motion: float = 0.0
    # Pixels that differ from their own frame's spatial median (whatever stands out
    # of the backdrop, moving or not).
    standout: float = 0.0
    gan: float = 0.1


def pixel_weights(x: torch.Tensor, w: ReconLossWeights) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 1, T, H, W) per-pixel loss weights >= 1.

    Small objects cover a few percent of a frame: an unweighted loss is content to
    paint the backdrop and lets their colour drift into it. The motion term up-weights
    what moves; the standout term also what sits still, by its distance from its
    frame's median colour. On textured real footage most pixels stand out a little,
    so that weight spreads out rather than concentrating.
    """
    weight = torch.ones_like(x[:, :1])
    if w.motion > 0:
        weight = weight + w.motion * motion_map(x).unsqueeze(1)
    if w.standout > 0:
        weight = weight + w.standout * standout_map(x)
    return weight


def standout_map(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) pixels or latents -> (B, 1, T, H, W): each position's largest
    channel distance from its own frame's median (the backdrop, where one dominates)."""
    backdrop = x.flatten(3).median(dim=3).values[..., None, None]  # (B, C, T, 1, 1)
    return (x - backdrop).abs().amax(dim=1, keepdim=True)


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
