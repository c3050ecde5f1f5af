"""Event sounds of the synthetic world and their placement in a stereo track.

Every sound starts at full amplitude on its first sample (no attack ramp), so an
onset detector can time it to within a millisecond even after AAC encoding. A
sound for an event at time ``t`` starts at sample ``round(t * sample_rate)``.
"""

from __future__ import annotations

import numpy as np


def thump(sample_rate: int, freq_hz: float, decay_s: float, rng: np.random.Generator) -> np.ndarray:
    """A floor impact: a decaying low sine plus a short noise burst. (N,) float32."""
    n = int(round(6.0 * decay_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    body = np.sin(2.0 * np.pi * freq_hz * t) * np.exp(-t / decay_s)
    burst = rng.standard_normal(n) * np.exp(-t / 0.004)
    # cos phase on the body would start at zero; the burst gives the sharp front.
    sound = 0.7 * body + 0.5 * burst
    return (sound / np.max(np.abs(sound))).astype(np.float32)


def click(sample_rate: int, freq_hz: float, rng: np.random.Generator) -> np.ndarray:
    """A hard contact click: a bright decaying tone plus noise, ~10 ms. (N,) float32."""
    decay_s = 0.008
    n = int(round(8.0 * decay_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    tone = np.cos(2.0 * np.pi * freq_hz * t) * np.exp(-t / decay_s)
    noise = rng.standard_normal(n) * np.exp(-t / 0.003)
    sound = 0.6 * tone + 0.4 * noise
    return (sound / np.max(np.abs(sound))).astype(np.float32)


def kick(sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A drum kick on a beat: a pitch sweep 160 -> 50 Hz with a click front. (N,) float32."""
    decay_s = 0.07
    n = int(round(5.0 * decay_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    freq = 50.0 + 110.0 * np.exp(-t / 0.03)
    phase = 2.0 * np.pi * np.cumsum(freq) / sample_rate
    body = np.cos(phase) * np.exp(-t / decay_s)
    front = rng.standard_normal(n) * np.exp(-t / 0.002)
    sound = 0.8 * body + 0.4 * front
    return (sound / np.max(np.abs(sound))).astype(np.float32)


def tone(sample_rate: int, freq_hz: float, duration_s: float) -> np.ndarray:
    """A plucked tone on a beat (instant attack, exponential decay). (N,) float32."""
    n = int(round(duration_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    sound = np.cos(2.0 * np.pi * freq_hz * t) * np.exp(-t / (duration_s / 4.0))
    return sound.astype(np.float32)


def pan_gains(x_px: float, width: int) -> tuple[float, float]:
    """Equal-power (left, right) gains for a source at horizontal position ``x_px``."""
    pos = float(np.clip(x_px / max(width - 1, 1), 0.0, 1.0))
    angle = pos * np.pi / 2.0
    return float(np.cos(angle)), float(np.sin(angle))


def place(track: np.ndarray, start_sample: int, sound: np.ndarray, left: float, right: float):
    """Add ``sound`` into ``track`` (2, N) from ``start_sample`` on, cut at the end."""
    n = track.shape[1]
    if start_sample >= n or start_sample + sound.shape[0] <= 0:
        return
    a, b = max(start_sample, 0), min(start_sample + sound.shape[0], n)
    piece = sound[a - start_sample : b - start_sample]
    track[0, a:b] += left * piece
    track[1, a:b] += right * piece


def room_tone(num_samples: int, rng: np.random.Generator, level: float = 0.0015) -> np.ndarray:
    """Very quiet stereo noise, so silence is not digital zero. (2, N) float32."""
    return (rng.standard_normal((2, num_samples)) * level).astype(np.float32)
