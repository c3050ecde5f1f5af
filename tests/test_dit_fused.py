"""The DiT's fused elementwise regions compute what the op-by-op modules compute.

``model.dit`` runs RMSNorm + RoPE on queries/keys, LayerNorm + AdaLN modulation and
the gated residual as single regions (compiled on CUDA) in the (B, N, H, hd) layout
attention is called in; here each is checked against the modules it replaced
(``nn.RMSNorm`` then :func:`model.rope.apply_rope` in (B, H, N, hd), ``nn.LayerNorm``
then :func:`model.dit.modulate`) on random inputs, forward and gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from model.dit import SelfAttention, gate_add, layer_norm, modulate, norm_modulate, rms_rope
from model.rope import apply_rope, rope_3d, video_positions


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_rms_rope_matches_rmsnorm_then_apply_rope():
    torch.manual_seed(0)
    b, n, h, hd = 2, 3 * 4 * 4, 3, 16
    x = torch.randn(b, n, h, hd, requires_grad=True)  # (B, N, H, hd)
    norm = nn.RMSNorm(hd, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    cos, sin = rope_3d(video_positions(3, 4, 4), hd, 10000.0, 0.5)  # (N, hd/2)
    ref = apply_rope(norm(x.transpose(1, 2)), cos, sin).transpose(1, 2)
    out = rms_rope(x, norm.weight, 1e-6, cos, sin)
    assert out.shape == x.shape and out.is_contiguous()
    assert _rel(out, ref) < 1e-6
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, norm.weight), g)
    gx, gw = torch.autograd.grad(out, (x, norm.weight), g)
    assert _rel(gx, gx_ref) < 1e-5 and _rel(gw, gw_ref) < 1e-5
    # Norm only (text queries) and RoPE only (no qk norm).
    assert _rel(rms_rope(x, norm.weight, 1e-6, None, None), norm(x)) < 1e-6
    rot = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert _rel(rms_rope(x, None, 0.0, cos, sin), rot) < 1e-6


def test_norm_modulate_layer_norm_and_gate_match_modules():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 32, requires_grad=True)
    shift, scale, gate = torch.randn(3, 2, 32).unbind(0)
    ln = nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    assert _rel(norm_modulate(x, shift, scale, 1e-6), modulate(ln(x), shift, scale)) < 1e-6
    affine = nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        affine.weight.normal_(1.0, 0.3)
        affine.bias.normal_(0.0, 0.3)
    assert _rel(layer_norm(x, affine.weight, affine.bias, 1e-6), affine(x)) < 1e-6
    y = torch.randn(2, 10, 32)
    assert _rel(gate_add(x, gate, y), x + gate[:, None] * y) < 1e-7


def test_self_attention_matches_head_major_reference():
    """The (B, N, H, hd) layout gives the attention of the (B, H, N, hd) formulation."""
    torch.manual_seed(2)
    attn = SelfAttention(dim=48, heads=3, qk_norm=True)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 3 * 4 * 4, 48)
    cos, sin = rope_3d(video_positions(3, 4, 4), 16, 10000.0, 0.5)
    q, k, v = attn.qkv(x).view(2, 48, 3, 3, 16).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 48, 48))
    assert _rel(attn(x, cos, sin), ref) < 1e-5
