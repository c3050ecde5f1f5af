"""The GPU decode plan of the video VAE: pieces under cuDNN's 32-bit limit, less
recomputation than the config's tiles, and the same frames as the config decode."""

import pytest
import torch

import model.video_vae as video_vae
from model.configs import get_config
from model.video_vae import FastDecode, VideoVAE, _chunk_cost, _tile_cost


def _largest_activation(vae: VideoVAE, z: torch.Tensor) -> int:
    """Largest tensor any decoder module sees or makes during ``decode(fast=True)``."""
    largest = [0]

    def hook(module, inputs, output):
        for t in (*inputs, output):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel())

    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules()]
    with torch.no_grad():
        vae.decode(z, fast=True)
    for h in handles:
        h.remove()
    return largest[0]


@pytest.mark.parametrize("seconds", [5, 10])
def test_base_plan_stays_under_32bit_and_recomputes_less(seconds):
    cfg = get_config("base")
    cfg.width, cfg.height = 832, 480
    with torch.device("meta"):  # shapes only: base at 480p, no arithmetic
        vae = VideoVAE(cfg.video_vae)
    vae.__dict__["_fast_decode"] = FastDecode(bf16=False, compile=False)
    n = cfg.num_latent_frames(cfg.frames_for_duration(seconds))
    z = torch.empty(1, cfg.video_vae.latent_channels, n, 60, 104, device="meta")
    assert vae.decoder_peak_elements(n, 60, 104) > 2**31  # the plan has to split
    assert _largest_activation(vae, z) <= video_vae.MAX_PIECE_ELEMENTS
    vc = cfg.video_vae
    chunk, (th, tw) = vae.decode_plan(n, 60, 104)
    m, o = vc.decode_tile_margin_latent_px, vc.tile_overlap_latent_px

    def work(chunk, th, tw):
        return (
            _chunk_cost(n, chunk, vc.decode_context_latent_frames)[0]
            * _tile_cost(60, th, m, o)[0]
            * _tile_cost(104, tw, m, o)[0]
        )

    config = work(vc.decode_chunk_latent_frames, vc.decode_tile_latent_px, vc.decode_tile_latent_px)
    assert work(chunk, th, tw) < 0.6 * config


def test_planned_decode_matches_config_decode(monkeypatch):
    torch.manual_seed(0)
    cfg = get_config("tiny").video_vae
    vae = VideoVAE(cfg).eval()
    for m in vae.decoder.modules():
        if hasattr(m, "conv2"):  # zero-initialised: give every layer a say
            m.conv2.conv.reset_parameters()
    z = torch.randn(1, cfg.latent_channels, 17, 16, 28)
    # A small budget forces chunks and non-square tiles on a small clip.
    monkeypatch.setattr(video_vae, "MAX_PIECE_ELEMENTS", vae.decoder_peak_elements(14, 16, 16))
    chunk, (th, tw) = vae.decode_plan(*z.shape[2:])
    assert 0 < chunk < 17 and th != tw
    vae.__dict__["_fast_decode"] = FastDecode(bf16=False, compile=False)
    cfg.decode_chunk_latent_frames, cfg.decode_tile_latent_px = 0, 0
    with torch.no_grad():
        whole, planned = vae.decode(z, fast=False), vae.decode(z, fast=True)
    assert planned.shape == whole.shape
    assert (planned - whole).abs().max() < 0.05 * whole.abs().max()
    assert (planned - whole).abs().mean() < 1e-3 * whole.abs().mean() + 1e-4
