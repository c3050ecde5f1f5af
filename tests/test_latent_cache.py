"""The latent cache is keyed by everything that decides the latents: a cache written
with one VAE is never read back for another.

Two tiny pipelines share a text encoder; B differs from A by one VAE weight, by
its latent calibration, or by configuration alone (identical weights, another mel
band or another audio latent rate). Each must get its own cache folder, holding
latents its own VAE computes; an identical copy of A finds A's cache and encodes
nothing.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from core.media import AVClip, write_mp4
from model.pipeline import DuetPipeline
from model.text_encoder import FrozenTextEncoder
from pipelines.train import latents as latents_module
from pipelines.train.config import train_config_from
from pipelines.train.data import ClipRow
from pipelines.train.latents import LatentStore, cache_key
from pipelines.train.loop import ensure_latents, latent_cache_uri
from pipelines.train.runtime import Runtime

FPS, SR = 16, 16000


@pytest.fixture(scope="module")
def text_encoder():
    return FrozenTextEncoder(max_tokens=16)


def _pipeline(text_encoder, seed: int = 0) -> DuetPipeline:
    return DuetPipeline.from_preset("tiny", seed=seed, text_encoder=text_encoder).eval()


@pytest.fixture
def clip_row(tmp_path) -> ClipRow:
    frames = np.zeros((17, 64, 64, 3), np.uint8)
    for f in range(17):
        frames[f, 20:36, 4 + 2 * f : 20 + 2 * f] = (220, 40, 40)  # a red square moving right
    t = np.arange(17 * SR // FPS) / SR
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    uri = str(tmp_path / "clip.mp4")
    write_mp4(uri, AVClip(frames, FPS, np.stack([tone, tone]), SR), crf=0)
    return ClipRow("c0", "s0", uri, 0.0, 17, 17, "a red square", True, math.nan, 0)


def _changed_weight(p: DuetPipeline) -> DuetPipeline:
    q = copy.deepcopy(p)
    with torch.no_grad():
        next(q.video_vae.parameters()).add_(0.01)
    return q


def _changed_calibration(p: DuetPipeline) -> DuetPipeline:
    q = copy.deepcopy(p)
    q.audio_vae.latent_std.mul_(2.0)
    return q


def _changed_mel_band(p: DuetPipeline) -> DuetPipeline:
    """Same weights, a VAE configured with another mel band (its filterbank is no weight)."""
    cfg = copy.deepcopy(p.config)
    cfg.audio_vae.mel_fmin = 300.0
    q = DuetPipeline(cfg, p.text_encoder)
    q.load_state_dict(p.state_dict())
    return q.eval()


def _changed_audio_rate(p: DuetPipeline) -> DuetPipeline:
    """Same weights, 2 audio latents per video latent instead of 4 (another mel hop)."""
    cfg = copy.deepcopy(p.config)
    cfg.audio_latents_per_video_latent = 2
    q = DuetPipeline(cfg, p.text_encoder)
    q.load_state_dict(p.state_dict())
    return q.eval()


CHANGES = {
    "vae weight": _changed_weight,
    "latent calibration": _changed_calibration,
    "mel band": _changed_mel_band,
    "audio latent rate": _changed_audio_rate,
}


def test_the_key_follows_the_vae_and_the_clip_geometry(text_encoder):
    a = _pipeline(text_encoder)
    assert cache_key(a, (33,)) == cache_key(copy.deepcopy(a), (33,))
    assert cache_key(a, (33,)) != cache_key(a, (17, 33))
    # The DiT is trained on the latents, it does not make them: it is not in the key.
    b = copy.deepcopy(a)
    with torch.no_grad():
        next(b.dit.parameters()).add_(1.0)
    assert cache_key(b, (33,)) == cache_key(a, (33,))
    # Nor do the decoders: a decoder-only fine-tune keeps the cache.
    with torch.no_grad():
        next(b.video_vae.decoder.parameters()).add_(1.0)
        next(b.audio_vae.decoder.parameters()).add_(1.0)
    assert cache_key(b, (33,)) == cache_key(a, (33,))
    for name, change in CHANGES.items():
        assert cache_key(change(a), (33,)) != cache_key(a, (33,)), name


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_cache_written_with_one_vae_is_not_read_for_another(
    text_encoder, clip_row, tmp_path, monkeypatch, change
):
    cfg = train_config_from(
        {"run_uri": str(tmp_path / "run"), "data": {"latent_cache_uri": str(tmp_path / "lat")}}
    )
    encoded: list[str] = []
    original = latents_module.encode_rows

    def counting(pipeline, rows):
        encoded.extend(r.clip_id for r in rows)
        return original(pipeline, rows)

    monkeypatch.setattr(latents_module, "encode_rows", counting)
    rt = Runtime()
    a = _pipeline(text_encoder)
    uri_a = ensure_latents(cfg, a, [clip_row], rt)
    assert encoded == ["c0"]
    # An identical VAE finds the cache and encodes nothing.
    assert ensure_latents(cfg, copy.deepcopy(a), [clip_row], rt) == uri_a and encoded == ["c0"]

    b = CHANGES[change](a)
    uri_b = ensure_latents(cfg, b, [clip_row], rt)
    assert uri_b == latent_cache_uri(cfg, b) != uri_a
    assert encoded == ["c0", "c0"], "B read the latents A wrote"
    cached_a, cached_b = LatentStore(uri_a).get("c0"), LatentStore(uri_b).get("c0")
    with torch.no_grad():
        zv, za = b.encode_clip(_read(clip_row), 17)
    assert torch.allclose(cached_b.video, zv[0], atol=1e-5)
    assert torch.allclose(cached_b.audio, za[0], atol=1e-5)
    # And they are not A's: what B would have trained on from A's cache was wrong.
    differs = [
        cached_a.video.shape != cached_b.video.shape
        or not torch.allclose(cached_a.video, cached_b.video, atol=1e-5),
        cached_a.audio.shape != cached_b.audio.shape
        or not torch.allclose(cached_a.audio, cached_b.audio, atol=1e-5),
    ]
    assert any(differs), f"{change}: the latents did not change, so the test shows nothing"


def _read(row: ClipRow) -> AVClip:
    from core.media import read_clip

    return read_clip(row.clip_uri, require_audio=False)
