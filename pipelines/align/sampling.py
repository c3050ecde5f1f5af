"""What the alignment stages sample with: a clip's latent shapes, the shifted time
grid of a step count, and the prompts' text tokens (the rlhf and distill stages, and
reflow's teacher couplings, all build on them)."""

from __future__ import annotations

from model.flow_matching import resolution_shift, schedule


def latent_shapes(mcfg, duration_s: float) -> tuple[tuple, tuple, int]:
    """Video and audio latent shapes (batch 1) of a clip, and its frame count."""
    frames = mcfg.frames_for_duration(duration_s)
    n_lat = mcfg.num_latent_frames(frames)
    sf = mcfg.video_vae.spatial_factor
    v = (1, mcfg.video_vae.latent_channels, n_lat, mcfg.height // sf, mcfg.width // sf)
    a = (1, mcfg.audio_vae.latent_channels, n_lat * mcfg.audio_latents_per_video_latent)
    return v, a, frames


def sampling_times(mcfg, v_shape, a_shape, steps: int) -> list[float]:
    p = mcfg.dit.video_patch
    tokens = v_shape[2] * (v_shape[3] // p) * (v_shape[4] // p) + a_shape[2]
    return [float(x) for x in schedule(steps, resolution_shift(tokens, mcfg.flow))]


def encode_prompts(pipeline, prompts: list[str]):
    tokens, mask = pipeline.text_encoder.encode(prompts)
    return tokens, mask
