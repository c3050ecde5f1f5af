"""Dual-branch diffusion transformer: a video branch and an audio branch.

Each :class:`DualBlock` holds one block per branch. A branch block is
self-attention (RoPE: 3D for video, 1D for audio) -> text cross-attention ->
MLP, with AdaLN-zero timestep modulation (PixArt-style: the timestep drives the
modulation, text enters through cross-attention only, so multi-shot sequences can
give every shot its own prompt). Each branch has its own flow time (``t`` may be
one (B,) tensor for both, or a pair ``(t_video, t_audio)``): its own time embedding
drives its own modulation, so one branch can be clean (t = 0, given) while the other
is generated (video-to-audio, audio-to-video). At the blocks listed in
``DiTConfig.cross_modal_blocks`` the branches also attend to each other, in both
directions, with 1D temporal RoPE on both sides measured in video latent steps:
the relative position of a video and an audio token is their time difference.
The exchange's modulation comes from the branch's time embedding plus a projection
of the *other* branch's (zero-initialised, so a checkpoint that predates it computes
what it did when the two times are equal): the video knows how noisy the audio it
reads is (clean given sound or noise), and back.

Reference tokens are appended in context to the branch that owns them (see
:mod:`model.references`); they are clean, so their modulation comes from time 0
whatever the sample's time. Shapes: video latents (B, Cv, T, H, W) become
T*(H/p)*(W/p) tokens; audio latents (B, Ca, Na) become Na tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.configs import BranchConfig, ModelConfig
from model.references import ReferenceEmbedder, ReferenceLatents, RefTokens
from model.rope import audio_positions, rope_1d, rope_3d, video_positions


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


# -- fused elementwise regions -----------------------------------------------------
# Each function below is one memory-bound region between matmuls. On CUDA it runs as
# one compiled kernel (torch.compile; its backward fused too), float32 inside and the
# input dtype out, so under bf16 autocast no float32 copy of an activation is written
# or kept for backward (eager LayerNorm under autocast returns float32, and the
# modulate after it kept that float32 tensor: 2 bytes per element more per norm). On
# the CPU, under a dispatch mode (FLOP counting, selective checkpointing) or with
# FUSED_REGIONS off, the same code runs op by op.
FUSED_REGIONS = True
_compiled: dict = {}
# Each region meets several shapes, strides (q/k are views of the fused qkv output),
# batch sizes and grad modes: a first static graph, then dynamic ones. Dynamo's
# default of 8 graphs per function ran out in inference (batch 1 and 2, four
# attention kinds); past this limit a region runs op by op instead (no error: the
# compile is not fullgraph).
_RECOMPILE_LIMIT = 64


def _fused(fn):
    def run(x: torch.Tensor, *args):
        # Inside a compiled block the outer graph fuses the region itself.
        if not (FUSED_REGIONS and x.is_cuda) or torch.compiler.is_compiling():
            return fn(x, *args)
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn)
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return _compiled[fn](x, *args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.eager = fn
    return run


@_fused
def norm_modulate(x, shift, scale, eps: float):  # (B, N, D), (B, D) x2 -> (B, N, D)
    """``modulate(LayerNorm(x), shift, scale)`` (no affine) in x's dtype."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (h * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


@_fused
def layer_norm(x, weight, bias, eps: float):  # (B, N, D) -> (B, N, D) in x's dtype
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


@_fused
def gate_add(x, gate, y):  # x + gate * y: (B, N, D), (B, D), (B, N, D)
    return x + gate[:, None] * y


# Reference tokens are clean: their shift/scale/gate come from time 0 (``*_ref``,
# (B, D)), the clip's from the sample's time. ``is_ref`` (N,) bool picks per token
# inside the region, so no (B, N, D) modulation tensor is materialised on CUDA.
@_fused
def norm_modulate_split(x, shift, scale, shift_ref, scale_ref, is_ref, eps: float):
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    sel = is_ref[None, :, None]
    sh = torch.where(sel, shift_ref.float()[:, None], shift.float()[:, None])
    sc = torch.where(sel, scale_ref.float()[:, None], scale.float()[:, None])
    return (h * (1 + sc) + sh).to(x.dtype)


@_fused
def gate_add_split(x, gate, gate_ref, is_ref, y):
    return x + torch.where(is_ref[None, :, None], gate_ref[:, None], gate[:, None]) * y


def _norm_mod(x, mod, i: int, eps: float):
    """modulate(LayerNorm(x), chunk i, chunk i + 1); mod = (chunks, ref chunks, is_ref)."""
    main, ref, is_ref = mod
    if ref is None:
        return norm_modulate(x, main[i], main[i + 1], eps)
    return norm_modulate_split(x, main[i], main[i + 1], ref[i], ref[i + 1], is_ref, eps)


def _gate(x, mod, i: int, y):
    main, ref, is_ref = mod
    if ref is None:
        return gate_add(x, main[i], y)
    return gate_add_split(x, main[i], ref[i], is_ref, y)


@_fused
def rms_rope(x, weight, eps: float, cos, sin):
    """(B, N, H, hd) -> RMSNorm (when weight is given) then RoPE (when cos is given),
    same layout, contiguous, x's dtype. Equals ``apply_rope(RMSNorm(x^T))^T``: pairs
    (i, i + hd/2), cos/sin (N, hd/2)."""
    out = x.float()
    if weight is not None:
        out = out * torch.rsqrt(out.square().mean(-1, keepdim=True) + eps) * weight.float()
    if cos is not None:
        half = out.shape[-1] // 2
        x1, x2 = out[..., :half], out[..., half:]
        c, s = cos[:, None], sin[:, None]  # (N, 1, hd/2): broadcast over heads
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.to(x.dtype)


def _qk(norm: nn.Module, x: torch.Tensor, rope=None) -> torch.Tensor:
    """Queries or keys (B, N, H, hd): the module's RMSNorm (or none) and RoPE, fused."""
    weight, eps = None, 0.0
    if isinstance(norm, nn.RMSNorm):
        weight, eps = norm.weight, norm.eps if norm.eps is not None else 1e-6
    if weight is None and rope is None:
        return x
    cos, sin = rope if rope is not None else (None, None)
    return rms_rope(x, weight, eps, cos, sin)


def attention(q, k, v, mask=None) -> torch.Tensor:
    """(B, N, H, hd) q and (B, M, H, hd) k/v -> (B, N, H, hd).

    The transposes are views: SDPA takes (B, H, N, hd) with any strides but a unit
    last one, and the flash/cuDNN kernels write their output in q's memory layout,
    so the result's transpose back is a view too and no copy brackets the call.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def patchify_video(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T*(H/p)*(W/p), C*p*p), time-major token order."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, t * (h // p) * (w // p), c * p * p)


def unpatchify_video(x: torch.Tensor, c: int, t: int, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify_video`."""
    b = x.shape[0]
    x = x.view(b, t, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, t, h, w)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) in [0, 1] -> (B, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    """Learned projection of frozen text-encoder tokens into a branch's width."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.fc1 = nn.Linear(text_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, Dt) -> (B, L, D)
        return self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask=None):  # x (B, N, D); cos/sin (N, hd/2)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)  # (B, N, H, hd)
        q, k = _qk(self.q_norm, q, (cos, sin)), _qk(self.k_norm, k, (cos, sin))
        return self.proj(attention(q, k, v, mask).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from x, keys/values from a context of another width; optional RoPE."""

    def __init__(self, q_dim: int, kv_dim: int, heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(q_dim, inner)
        self.kv = nn.Linear(kv_dim, 2 * inner)
        self.proj = nn.Linear(inner, q_dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x, context, mask=None, q_rope=None, k_rope=None):
        b, n, _ = x.shape
        m = context.shape[1]
        q = _qk(self.q_norm, self.q(x).view(b, n, self.heads, self.head_dim), q_rope)
        k, v = self.kv(context).view(b, m, 2, self.heads, self.head_dim).unbind(2)
        k = _qk(self.k_norm, k, k_rope)  # (B, M, H, hd)
        out = attention(q, k, v, mask)  # (B, N, H, hd)
        return self.proj(out.reshape(b, n, self.heads * self.head_dim))


class BranchBlock(nn.Module):
    """One branch's half of a dual block; modulation also feeds the cross-modal step."""

    def __init__(self, cfg: BranchConfig, qk_norm: bool, has_cross_modal: bool):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.heads, qk_norm)
        self.norm_text = nn.LayerNorm(d, eps=1e-6)
        self.text_attn = CrossAttention(d, d, cfg.heads, d // cfg.heads, qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)
        )
        # shift/scale/gate for attention and MLP (+ for the cross-modal exchange).
        self.num_mod = 9 if has_cross_modal else 6
        self.modulation = nn.Linear(d, self.num_mod * d)

    def modulations(self, c, c_ref, n_main: int, n: int):
        """(chunks of the sample's time, chunks of time 0 for reference tokens or None,
        (N,) bool is-reference) from time embeddings c / c_ref (B, D)."""
        main = self.modulation(F.silu(c)).chunk(self.num_mod, dim=-1)
        if c_ref is None or n == n_main:
            return main, None, None
        ref = self.modulation(F.silu(c_ref)).chunk(self.num_mod, dim=-1)
        return main, ref, torch.arange(n, device=c.device) >= n_main

    def exchange_modulation(self, c_cross):
        """Shift, scale, gate (B, D) of the cross-modal step, from the time embedding
        that also carries the other branch's time."""
        return self.modulation(F.silu(c_cross)).chunk(self.num_mod, dim=-1)[6:9]

    def attend(self, x, mod, text, text_mask, rope, mask):
        h = _norm_mod(x, mod, 0, self.norm1.eps)
        x = _gate(x, mod, 2, self.attn(h, *rope, mask))
        nt = self.norm_text
        return x + self.text_attn(layer_norm(x, nt.weight, nt.bias, nt.eps), text, text_mask)

    def feed_forward(self, x, mod):
        return _gate(x, mod, 5, self.mlp(_norm_mod(x, mod, 3, self.norm2.eps)))


class CrossModalExchange(nn.Module):
    """Bidirectional video <-> audio attention on the clip's own (non-reference) tokens.

    ``mod_v``/``mod_a``: shift, scale, gate of each side (see
    :meth:`BranchBlock.exchange_modulation`: they know both branches' times)."""

    def __init__(
        self, video: BranchConfig, audio: BranchConfig, heads: int, head_dim: int, qk_norm: bool
    ):
        super().__init__()
        self.norm_v = nn.LayerNorm(video.dim, elementwise_affine=False, eps=1e-6)
        self.norm_a = nn.LayerNorm(audio.dim, elementwise_affine=False, eps=1e-6)
        self.video_from_audio = CrossAttention(video.dim, audio.dim, heads, head_dim, qk_norm)
        self.audio_from_video = CrossAttention(audio.dim, video.dim, heads, head_dim, qk_norm)

    def forward(self, xv, xa, mod_v, mod_a, rope_v, rope_a):
        hv = norm_modulate(xv, mod_v[0], mod_v[1], self.norm_v.eps)
        ha = norm_modulate(xa, mod_a[0], mod_a[1], self.norm_a.eps)
        # Both directions read the same pre-exchange states: symmetric, order-free.
        dv = self.video_from_audio(hv, ha, q_rope=rope_v, k_rope=rope_a)
        da = self.audio_from_video(ha, hv, q_rope=rope_a, k_rope=rope_v)
        return gate_add(xv, mod_v[2], dv), gate_add(xa, mod_a[2], da)


class DualBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        d = cfg.dit
        self.has_cross_modal = index in d.cross_modal_blocks
        self.video = BranchBlock(d.video, d.qk_norm, self.has_cross_modal)
        self.audio = BranchBlock(d.audio, d.qk_norm, self.has_cross_modal)
        self.cross = (
            CrossModalExchange(
                d.video, d.audio, d.cross_modal_heads, d.cross_modal_head_dim, d.qk_norm
            )
            if self.has_cross_modal
            else None
        )

    def forward(
        self,
        xv: torch.Tensor,  # (B, Nv + Nv_ref, Dv)
        xa: torch.Tensor,  # (B, Na + Na_ref, Da)
        # Time embeddings (B, Dv): the video branch's time, time 0 for its reference
        # tokens (None when it has none), and the exchange's (both branches' times).
        cv: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
        ca: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],  # (B, Da) each
        text_v: torch.Tensor,  # (B, L, Dv)
        text_a: torch.Tensor,  # (B, L, Da)
        text_mask_v: torch.Tensor,  # (B, 1, 1 or Nv + Nv_ref, L) bool
        text_mask_a: torch.Tensor,
        rope_v: tuple[torch.Tensor, torch.Tensor],  # (Nv + Nv_ref, hd/2) each
        rope_a: tuple[torch.Tensor, torch.Tensor],
        rope_xv: tuple[torch.Tensor, torch.Tensor],  # (Nv, cross hd/2): time-only
        rope_xa: tuple[torch.Tensor, torch.Tensor],
        mask_v: torch.Tensor | None,  # (B, 1, 1, Nv + Nv_ref) bool or None
        mask_a: torch.Tensor | None,
        n_main_v: int,
        n_main_a: int,
        cross_modal: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mv = self.video.modulations(cv[0], cv[1], n_main_v, xv.shape[1])
        ma = self.audio.modulations(ca[0], ca[1], n_main_a, xa.shape[1])
        xv = self.video.attend(xv, mv, text_v, text_mask_v, rope_v, mask_v)
        xa = self.audio.attend(xa, ma, text_a, text_mask_a, rope_a, mask_a)
        if self.cross is not None and cross_modal:
            xmv = self.video.exchange_modulation(cv[2])
            xma = self.audio.exchange_modulation(ca[2])
            new_v, new_a = self.cross(
                xv[:, :n_main_v], xa[:, :n_main_a], xmv, xma, rope_xv, rope_xa
            )
            xv = torch.cat([new_v, xv[:, n_main_v:]], dim=1)
            xa = torch.cat([new_a, xa[:, n_main_a:]], dim=1)
        return self.video.feed_forward(xv, mv), self.audio.feed_forward(xa, ma)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(norm_modulate(x, shift, scale, self.norm.eps))


@dataclass
class TextConditioning:
    """Frozen-encoder tokens of the prompt(s) of each sample."""

    tokens: torch.Tensor  # (B, L, D_text)
    mask: torch.Tensor  # (B, L) bool, True = real token
    # Multi-shot: shot index of every text token, -1 = shared by all shots.
    shot_ids: torch.Tensor | None = None  # (B, L) long


@dataclass
class ShotLayout:
    """Shot index of every latent time step (multi-shot generation)."""

    # (T,) long: shot of each video latent frame; (B, T) when the samples of a
    # training batch cut at different times.
    video_latent_shot: torch.Tensor
    audio_latent_shot: torch.Tensor  # (Na,) or (B, Na) long


class DualBranchDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.dit
        dv, da = d.video.dim, d.audio.dim
        self.video_channels = cfg.video_vae.latent_channels
        self.audio_channels = cfg.audio_vae.latent_channels
        self.patch = d.video_patch
        self.video_in = nn.Linear(self.video_channels * self.patch**2, dv)
        self.audio_in = nn.Linear(self.audio_channels, da)
        self.time_v = TimestepEmbedder(dv)
        self.time_a = TimestepEmbedder(da)
        # The other branch's time embedding, added to a branch's for the cross-modal
        # exchange (audio -> video width, and back).
        self.other_time_v = nn.Linear(da, dv)
        self.other_time_a = nn.Linear(dv, da)
        self.register_load_state_dict_pre_hook(_zero_fill_new_keys)
        self.text_v = TextProjection(cfg.text.embed_dim, dv)
        self.text_a = TextProjection(cfg.text.embed_dim, da)
        # Stands in for the prompt when text is dropped (training) or unconditional (CFG).
        self.null_text = nn.Parameter(torch.randn(cfg.text.embed_dim) * 0.02)
        self.references = ReferenceEmbedder(d, dv, da)
        self.blocks = nn.ModuleList(DualBlock(cfg, i) for i in range(d.depth))
        self.video_out = FinalLayer(dv, self.video_channels * self.patch**2)
        self.audio_out = FinalLayer(da, self.audio_channels)
        self._init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter again, e.g. after ``to_empty`` of a meta-device
        build (large presets, torchtitan style: meta -> parallelize -> to_empty -> this).
        Works on FSDP2-sharded parameters too."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        r = self.references
        for p in (self.null_text, r.image_slots, r.video_slots, r.audio_slots):
            nn.init.normal_(p, std=0.02)
        self._init_weights()

    def _init_weights(self) -> None:
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        for emb in (self.time_v, self.time_a):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # AdaLN-zero: every residual branch starts closed, the network is the identity.
        for block in self.blocks:
            for branch in (block.video, block.audio):
                nn.init.zeros_(branch.modulation.weight)
                nn.init.zeros_(branch.modulation.bias)
                nn.init.zeros_(branch.text_attn.proj.weight)
                nn.init.zeros_(branch.text_attn.proj.bias)
        # Zero: the exchange starts from each branch's own time, as before these existed.
        for lin in (self.other_time_v, self.other_time_a):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for final in (self.video_out, self.audio_out):
            for lin in (final.modulation, final.linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # -- conditioning helpers ----------------------------------------------------
    def null_text_conditioning(self, batch: int, device=None) -> TextConditioning:
        tokens = self.null_text.detach().view(1, 1, -1).expand(batch, 1, -1).to(device)
        return TextConditioning(tokens, torch.ones(batch, 1, dtype=torch.bool, device=device))

    def drop_text(self, text: TextConditioning, drop: torch.Tensor) -> TextConditioning:
        """Replace the prompts of samples where drop (B,) is True by the null token."""
        keep = ~drop.to(text.tokens.device)
        null_row = torch.zeros_like(text.tokens)
        null_row[:, 0] = self.null_text.to(text.tokens.dtype)
        tokens = torch.where(keep[:, None, None], text.tokens, null_row)
        null_mask = torch.zeros_like(text.mask)
        null_mask[:, 0] = True
        mask = torch.where(keep[:, None], text.mask, null_mask)
        shot_ids = text.shot_ids
        if shot_ids is not None:
            null_ids = torch.full_like(shot_ids, -1)
            shot_ids = torch.where(keep[:, None], shot_ids, null_ids)
        return TextConditioning(tokens, mask, shot_ids)

    def _text_mask(self, text: TextConditioning, token_shot: torch.Tensor | None, n_ref: int):
        """(B, 1, 1 or N, L) bool mask of which text tokens each query token may read."""
        valid = text.mask[:, None, None, :]  # (B, 1, 1, L)
        if token_shot is None or text.shot_ids is None:
            return valid
        ids = text.shot_ids[:, None, None, :]  # (B, 1, 1, L)
        shot = token_shot if token_shot.dim() == 2 else token_shot[None]  # (B or 1, N_main)
        own = (ids == -1) | (ids == shot[:, None, :, None])  # (B, 1, N_main, L)
        mask = own & valid
        if n_ref:
            mask = torch.cat([mask, valid.expand(-1, -1, n_ref, -1)], dim=2)
        return mask

    def _unused_zero(self) -> torch.Tensor:
        """0, computed from the parameters that only some batches use (reference slots
        of each kind, null_text), so that every parameter gets a gradient every step.

        FSDP2 reduce-scatters only the gradients that exist: a slot used on one rank and
        not on another would give the ranks different collectives (a hang on NCCL, an
        abort on gloo). DDP then needs no find_unused_parameters either.
        """
        r = self.references
        params = (self.null_text, r.image_slots, r.video_slots, r.audio_slots)
        return sum(p.sum() for p in params) * 0.0

    # -- forward -----------------------------------------------------------------
    def forward(
        self,
        video: torch.Tensor,  # (B, Cv, T, H, W) noisy video latents
        audio: torch.Tensor,  # (B, Ca, Na) noisy audio latents
        t: torch.Tensor | tuple[torch.Tensor, torch.Tensor],  # (B,) or (t_video, t_audio)
        text: TextConditioning,
        references: ReferenceLatents | None = None,
        shots: ShotLayout | None = None,
        cross_modal: bool = True,
        text_drop: torch.Tensor | None = None,  # (B,) bool: prompt replaced by null_text
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted velocities with the input shapes: (B, Cv, T, H, W), (B, Ca, Na).

        ``t``: flow time in [0, 1], one (B,) tensor for both branches or a pair
        ``(t_video, t_audio)`` of (B,) tensors; a branch at t = 0 is clean (given).

        ``text_drop`` applies :meth:`drop_text` inside forward, where parameters
        sharded by FSDP2 (``null_text``) are gathered; activation checkpointing,
        compile and sharding are applied from outside (:mod:`model.parallelize`).
        """
        if text_drop is not None:
            text = self.drop_text(text, text_drop)
        b, cv_, t_lat, h, w = video.shape
        if cv_ != self.video_channels or audio.shape[1] != self.audio_channels:
            raise ValueError(
                f"latent channels must be video {self.video_channels} / audio "
                f"{self.audio_channels}, got {cv_} / {audio.shape[1]}"
            )
        if h % self.patch or w % self.patch:
            raise ValueError(f"latent grid {h}x{w} not divisible by patch {self.patch}")
        m = self.cfg.audio_latents_per_video_latent
        n_audio = audio.shape[2]
        if n_audio != t_lat * m:
            raise ValueError(
                f"{t_lat} video latent frames need {t_lat * m} audio latents, got {n_audio}"
            )
        d = self.cfg.dit
        hd_v, hd_a = d.video.dim // d.video.heads, d.audio.dim // d.audio.heads
        device = video.device

        # Tokens of the clip itself.
        xv = self.video_in(patchify_video(video, self.patch))  # (B, Nv, Dv)
        xa = self.audio_in(audio.transpose(1, 2))  # (B, Na, Da)
        n_main_v, n_main_a = xv.shape[1], xa.shape[1]
        pos_v = video_positions(t_lat, h // self.patch, w // self.patch)  # (Nv, 3)
        pos_a = audio_positions(n_audio, m)  # (Na,)
        time_v = pos_v[:, 0]

        # References, appended in context.
        ref_v: RefTokens | None = None
        ref_a: RefTokens | None = None
        if references is not None:
            ref_v = self.references.video_tokens(
                references, patchify_video, self.video_in, self.patch
            )
            ref_a = self.references.audio_tokens(references, self.audio_in, m)
        mask_v, xv, pos_v = _append_refs(xv, pos_v, ref_v)
        mask_a, xa, pos_a = _append_refs(xa, pos_a, ref_a)

        rope_v = tuple(
            x.to(device) for x in rope_3d(pos_v, hd_v, d.rope_theta, d.video_rope_time_fraction)
        )
        rope_a = tuple(x.to(device) for x in rope_1d(pos_a, hd_a, d.rope_theta))
        rope_xv = tuple(x.to(device) for x in rope_1d(time_v, d.cross_modal_head_dim, d.rope_theta))
        rope_xa = tuple(
            x.to(device) for x in rope_1d(pos_a[:n_main_a], d.cross_modal_head_dim, d.rope_theta)
        )

        # Text: per-token shot masks for multi-shot sequences.
        token_shot_v = token_shot_a = None
        if shots is not None:
            hw = (h // self.patch) * (w // self.patch)
            token_shot_v = shots.video_latent_shot.to(device).repeat_interleave(hw, dim=-1)
            token_shot_a = shots.audio_latent_shot.to(device)
        text_mask_v = self._text_mask(text, token_shot_v, xv.shape[1] - n_main_v)
        text_mask_a = self._text_mask(text, token_shot_a, xa.shape[1] - n_main_a)
        text_tokens = text.tokens.to(self.text_v.fc1.weight.dtype)
        text_v, text_a = self.text_v(text_tokens), self.text_a(text_tokens)

        t_v, t_a = (t, t) if isinstance(t, torch.Tensor) else t
        cv, ca = self.time_v(t_v), self.time_a(t_a)  # (B, Dv), (B, Da)
        # Reference tokens are clean: time 0 (computed only for a branch that has some).
        cv_ref = self.time_v(torch.zeros_like(t_v)) if ref_v is not None else None
        ca_ref = self.time_a(torch.zeros_like(t_a)) if ref_a is not None else None
        times_v = (cv, cv_ref, cv + self.other_time_v(ca))
        times_a = (ca, ca_ref, ca + self.other_time_a(cv))
        for block in self.blocks:
            args = (xv, xa, times_v, times_a, text_v, text_a, text_mask_v, text_mask_a, rope_v,
                    rope_a, rope_xv, rope_xa, mask_v, mask_a, n_main_v, n_main_a, cross_modal)  # fmt: skip
            xv, xa = block(*args)

        out_v = self.video_out(xv[:, :n_main_v], cv)
        out_a = self.audio_out(xa[:, :n_main_a], ca)
        if torch.is_grad_enabled():
            out_v = out_v + self._unused_zero()
        out_v = unpatchify_video(out_v, self.video_channels, t_lat, h, w, self.patch)
        return out_v, out_a.transpose(1, 2)


# State-dict keys added after checkpoints were shipped. An older checkpoint lacks them;
# they load as zeros, with which the network computes exactly what it computed before.
NEW_KEYS = re.compile(r"(^|\.)other_time_[va]\.(weight|bias)$")


def is_new_key(key: str) -> bool:
    return NEW_KEYS.search(key) is not None


def _zero_fill_new_keys(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of DualBranchDiT: zeros for the other-time weights an
    older checkpoint lacks, on the device and dtype of its stored time embedding."""
    like = state_dict.get(prefix + "time_v.mlp.0.weight")
    if like is None:
        return  # not this module's weights at all: strict loading reports it
    for name in ("other_time_v", "other_time_a"):
        for kind, param in getattr(module, name).named_parameters():
            key = f"{prefix}{name}.{kind}"
            if key not in state_dict:
                state_dict[key] = torch.zeros(param.shape, dtype=like.dtype, device=like.device)


def fill_new_keys(state: dict, expected: dict) -> dict:
    """``state`` plus zeros for every key of ``expected`` (a state dict, any device,
    DTensors included) that ``state`` lacks and :func:`is_new_key` names."""
    missing = [k for k in expected if k not in state and is_new_key(k)]
    if not missing:
        return state
    return {**state, **{k: torch.zeros(tuple(expected[k].shape)) for k in missing}}


def _append_refs(x: torch.Tensor, pos: torch.Tensor, ref: RefTokens | None):
    """Concatenate reference tokens and build the key mask for self-attention."""
    if ref is None:
        return None, x, pos
    x = torch.cat([x, ref.tokens.to(x.dtype)], dim=1)
    pos = torch.cat([pos, ref.positions], dim=0)
    mask = None
    if ref.present is not None:
        main = torch.ones(
            x.shape[0], x.shape[1] - ref.tokens.shape[1], dtype=torch.bool, device=x.device
        )
        mask = torch.cat([main, ref.present], dim=1)[:, None, None, :]  # (B, 1, 1, N)
    return mask, x, pos


def component_parameter_counts(module: nn.Module) -> dict[str, int]:
    """Parameters of each direct child, plus the module's own under ``"(own)"``."""
    counts = {
        name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()
    }
    own = sum(p.numel() for p in module.parameters(recurse=False))
    if own:
        counts["(own)"] = own
    return counts
