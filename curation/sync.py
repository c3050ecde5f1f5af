"""Audio-video offset of a clip: cross-correlate the audio onset envelope with the
visual motion envelope.

Both envelopes are put on one time grid ``upsample`` times finer than the frame
rate, normalised, and cross-correlated over ``+-max_lag_ms``; a parabola through
the peak and its neighbours gives a sub-frame offset.

Sign: ``offset_ms > 0`` means the sound comes *late* (audio lags picture); the
clip is corrected by taking its audio ``offset_ms`` later from the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.records import ClipRecord
from curation.stage import Resources, SourceContext, Stage

STATIONARY_FEATURE = "activity"
VISUAL_FEATURES = (
    "auto",
    "flow_acceleration",
    "motion",
    "motion_onset",
    "acceleration",
    "activity",
)


@dataclass(frozen=True)
class SyncConfig:
    tolerance_ms: float = 45.0  # ITU-R BT.1359's detectability limit for sound ahead of picture
    max_lag_ms: float = 400.0
    min_confidence: float = 0.25
    upsample: int = 4
    visual_feature: str = "auto"
    # Share of all frame-difference energy that falls on the 2% most active pixels,
    # above which the scene's sound sources are taken to stay in place (a speaking
    # mouth, a pulsing light) and loudness is paired with motion energy. Measured on
    # the synthetic world (5 seeds per kind): talking heads 1.00, beat pulses
    # 0.77-1.00, bouncing balls <= 0.66, collisions <= 0.33, pans <= 0.08.
    stationary_motion_share: float = 0.8
    # And the centre of the motion must stay put: its spread over the clip, as a
    # fraction of the frame width (talking heads <= 0.003, beat pulses <= 0.011; a
    # small object crossing a dark scene, whose motion is just as concentrated,
    # >= 0.025; balls, collisions, pans >= 0.05).
    stationary_max_travel: float = 0.018
    flow_width: int = 64  # optical flow runs on frames this wide (accuracy holds, cost /1.6)
    correct: bool = False  # shift out-of-sync clips' audio by the measured offset
    # Fades: frames are brought to one brightness before differencing (a fade is a
    # gain ramp, not motion); frames darker than ``dark_fraction`` of the clip's
    # median brightness carry no picture to match. The runs of frames more than
    # ``fade_tolerance`` darker than the median at either end of the clip are taken
    # as fading, and their time is left out of the match on both sides: the sound
    # fades with the picture, and a loudness ramp would otherwise pull the estimate.
    fade_aware: bool = True
    dark_fraction: float = 0.35
    fade_tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.visual_feature not in VISUAL_FEATURES:
            raise ValueError(f"visual_feature must be one of {VISUAL_FEATURES}")
        if self.upsample < 1:
            raise ValueError("upsample must be >= 1")


@dataclass(frozen=True)
class SyncEstimate:
    offset_ms: float
    confidence: float  # normalised correlation at the peak, in [-1, 1]
    verdict: str  # "in_sync" | "out_of_sync" | "uncertain"
    method: str = ""  # "<visual envelope>~<audio envelope>" that gave the estimate
    prominence: float = 0.0  # (peak - median) / std of the correlation curve


def visual_envelope(
    luma: np.ndarray, fps: float, feature: str, flow_width: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame visual activity and the time (s, clip-relative) each value belongs to.

    ``luma``: (T, h, w). A difference of frames ``t-1`` and ``t`` measures change
    during the interval between them, so it is stamped at its middle,
    ``(t - 0.5) / fps``; a second difference centred on frame ``t`` at ``t / fps``.

    ``flow_acceleration`` (the default) is the mean magnitude of the change in dense
    optical flow between consecutive frame pairs: sounds come from impacts,
    collisions and onsets, which are changes of velocity, while raw pixel change
    mostly follows speed and saturates on fast small objects.
    """
    t = luma.shape[0]
    if feature == "flow_acceleration":
        return _flow_acceleration(luma, fps, flow_width)
    if feature == "activity":
        return _activity(luma, fps)
    flat = luma.reshape(t, -1).astype(np.float32)
    if feature == "acceleration":
        if t < 3:
            return np.zeros(0), np.zeros(0)
        accel = np.abs(flat[2:] - 2 * flat[1:-1] + flat[:-2]).mean(axis=1)  # (T-2,)
        return accel, np.arange(1, t - 1) / fps
    motion = np.abs(np.diff(flat, axis=0)).mean(axis=1)  # (T-1,)
    times = (np.arange(1, t) - 0.5) / fps
    if feature == "motion_onset":
        onset = np.maximum(np.diff(motion, prepend=motion[:1]), 0.0)
        return onset, times
    return motion, times


def _activity(
    luma: np.ndarray, fps: float, top_fraction: float = 0.02
) -> tuple[np.ndarray, np.ndarray]:
    """How far the most active pixels are from their resting value, per frame.

    For sources that stay in place (a mouth, a pulsing light) this follows the
    state (how open, how bright), which is what loudness follows; a frame
    difference follows its rate of change instead, a quarter cycle off.
    """
    t = luma.shape[0]
    flat = luma.reshape(t, -1).astype(np.float32)
    if t < 3:
        return np.zeros(0), np.zeros(0)
    energy = np.abs(np.diff(flat, axis=0)).sum(axis=0)
    count = max(1, int(top_fraction * energy.size))
    active = np.argpartition(energy, -count)[-count:]
    region = flat[:, active]  # (T, count)
    rest = np.median(region, axis=0)
    return np.abs(region - rest).mean(axis=1), np.arange(t) / fps


def _flow_acceleration(luma: np.ndarray, fps: float, width: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    t, h, w = luma.shape
    if t < 3:
        return np.zeros(0), np.zeros(0)
    size = (min(width, w), max(8, int(round(h * min(width, w) / w))))
    small = [
        cv2.resize(frame, size, interpolation=cv2.INTER_AREA).astype(np.uint8) for frame in luma
    ]
    # Farneback: pyramid scale 0.5, 2 levels, 7 px window, 3 iterations, poly_n 5, sigma 1.1.
    flow = np.stack(
        [
            cv2.calcOpticalFlowFarneback(small[i - 1], small[i], None, 0.5, 2, 7, 3, 5, 1.1, 0)
            for i in range(1, t)
        ]
    )  # (T-1, h', w', 2), flow i spans frames i..i+1
    accel = np.linalg.norm(flow[1:] - flow[:-1], axis=-1).mean(axis=(1, 2))  # (T-2,)
    # The velocity change between spans (t-1, t) and (t, t+1) happens at frame t.
    return accel, np.arange(1, t - 1) / fps


def audio_log_energy(audio: np.ndarray, sample_rate: int, rate_hz: float) -> np.ndarray:
    """Log energy in windows two hops wide, one value per ``1 / rate_hz`` s centred at
    ``k / rate_hz``. ``audio``: (C, N) or (N,)."""
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    hop = sample_rate / rate_hz
    n = int(np.floor(mono.size / hop))
    if n < 3:
        return np.zeros(0)
    half = int(round(hop))
    power = np.concatenate([[0.0], np.cumsum(mono.astype(np.float64) ** 2)])
    centres = np.round(np.arange(n) * hop).astype(np.int64)
    lo = np.clip(centres - half, 0, mono.size)
    hi = np.clip(centres + half, 0, mono.size)
    energy = (power[hi] - power[lo]) / np.maximum(hi - lo, 1)
    return np.log10(energy + 1e-8)


def audio_onset_envelope(audio: np.ndarray, sample_rate: int, rate_hz: float) -> np.ndarray:
    """Half-wave rectified rise of log energy (previous window to next), centred on k."""
    log_energy = audio_log_energy(audio, sample_rate, rate_hz)
    if log_energy.size < 3:
        return np.zeros(0)
    rise = np.zeros(log_energy.size)
    rise[1:-1] = log_energy[2:] - log_energy[:-2]
    return np.maximum(rise, 0.0)


def estimate_offset(
    luma: np.ndarray,
    fps: float,
    audio: np.ndarray,
    sample_rate: int,
    config: SyncConfig | None = None,
) -> SyncEstimate:
    """Offset between a clip's audio and its frames (see the module docstring for sign).

    With ``visual_feature="auto"`` the pairing follows where the motion is. Objects
    that travel make sound when their velocity changes (impacts, collisions), so
    optical-flow acceleration is matched to sound onsets. Sources that stay in place
    -- a speaking mouth, a pulsing light -- sound while they move, so when motion is
    concentrated on few pixels (``stationary_motion_share``) motion energy is
    matched to loudness instead. Choosing by correlation strength alone fails: on
    event scenes the smooth loudness curve correlates fairly well at a wrong lag.
    """
    cfg = config or SyncConfig()
    if cfg.visual_feature != "auto":
        return _estimate_pair(luma, fps, audio, sample_rate, cfg, cfg.visual_feature, "onset")
    where = luma
    if cfg.fade_aware:
        # The fading frames at the clip's ends are left out: a fade's global
        # change must not decide the pairing.
        _, fading = gain_normalised(luma, cfg.dark_fraction, cfg.fade_tolerance)
        where = luma[~fading] if int((~fading).sum()) >= 2 else luma
    if (
        motion_concentration(where) >= cfg.stationary_motion_share
        and motion_travel(where) <= cfg.stationary_max_travel
    ):
        return _estimate_pair(luma, fps, audio, sample_rate, cfg, STATIONARY_FEATURE, "energy")
    return _estimate_pair(luma, fps, audio, sample_rate, cfg, "flow_acceleration", "onset")


def gain_normalised(
    luma: np.ndarray, dark_fraction: float, fade_tolerance: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Frames scaled to the clip's median brightness, and which frames are fading.

    A fade multiplies a frame by a gain; dividing it out leaves the scene's own
    change, so a fade next to speech does not read as motion at the wrong time.
    """
    flat = luma.reshape(luma.shape[0], -1).astype(np.float32)
    means = flat.mean(axis=1)
    reference = float(np.median(means))
    if reference <= 1e-3:
        return luma, np.zeros(luma.shape[0], bool)
    dark = means < dark_fraction * reference
    gain = reference / np.maximum(means, 1e-3)
    # A clip lies inside one shot, so a fade can only be at its ends: the run of
    # darker-than-usual frames it starts with (fade-in) or ends with (fade-out).
    # Brightness changes inside (a light switched on: the event itself) stay.
    low = means < (1.0 - fade_tolerance) * reference
    fading = np.zeros_like(low)
    i = 0
    while i < low.size and low[i]:
        fading[i] = True
        i += 1
    j = low.size - 1
    while j >= i and low[j]:
        fading[j] = True
        j -= 1
    # Only fading frames are scaled; scaling the others by their small fluctuations
    # (a mouth opening) would smear motion over the whole frame.
    dark &= fading
    gain[dark | ~fading] = 1.0
    normed = np.clip(luma.astype(np.float32) * gain[:, None, None], 0, 255)
    if luma.dtype == np.uint8:
        normed = normed.astype(np.uint8)
    return normed, fading


def motion_travel(luma: np.ndarray) -> float:
    """How far the centre of frame-difference energy moves over the clip: its
    energy-weighted standard deviation, as a fraction of the frame width."""
    if luma.shape[0] < 2:
        return 0.0
    t, h, w = luma.shape
    energy = np.abs(np.diff(luma.astype(np.float32), axis=0)).reshape(t - 1, -1)
    total = energy.sum(axis=1) + 1e-9
    ys, xs = np.mgrid[0:h, 0:w]
    cx = energy @ xs.ravel().astype(np.float32) / total
    cy = energy @ ys.ravel().astype(np.float32) / total
    weights = total / total.sum()
    mx, my = float(weights @ cx), float(weights @ cy)
    return float(np.sqrt(weights @ ((cx - mx) ** 2 + (cy - my) ** 2)) / w)


def motion_concentration(luma: np.ndarray, top_fraction: float = 0.02) -> float:
    """Share of the clip's frame-difference energy on its ``top_fraction`` most active
    pixels: near 1 when motion stays in one place, small when it travels."""
    if luma.shape[0] < 2:
        return 0.0
    per_pixel = np.zeros(luma.shape[1:], dtype=np.float64)
    for i in range(1, luma.shape[0]):
        per_pixel += np.abs(luma[i].astype(np.float32) - luma[i - 1].astype(np.float32))
    flat = np.sort(per_pixel.ravel())[::-1]
    total = flat.sum()
    if total <= 0:
        return 0.0
    return float(flat[: max(1, int(top_fraction * flat.size))].sum() / total)


def _estimate_pair(
    luma: np.ndarray,
    fps: float,
    audio: np.ndarray,
    sample_rate: int,
    cfg: SyncConfig,
    visual_feature: str,
    audio_feature: str,
) -> SyncEstimate:
    method = f"{visual_feature}~{audio_feature}"
    rate = fps * cfg.upsample
    dark = np.zeros(luma.shape[0], bool)
    if cfg.fade_aware:
        luma, dark = gain_normalised(luma, cfg.dark_fraction, cfg.fade_tolerance)
    visual, vtimes = visual_envelope(luma, fps, visual_feature, cfg.flow_width)
    if audio_feature == "onset":
        audio_env = audio_onset_envelope(audio, sample_rate, rate)
    else:
        audio_env = audio_log_energy(audio, sample_rate, rate)
    if visual.size < 4 or audio_env.size < 4:
        return SyncEstimate(0.0, 0.0, "uncertain", method)
    grid = np.arange(audio_env.size) / rate
    inside = (grid >= vtimes[0]) & (grid <= vtimes[-1])
    audio_valid = np.ones(grid.size, bool)
    if dark.any():
        # Leave out grid points within 1.5 frames of a fading frame, on the picture's
        # side and on the sound's (both describe the fade there, not the scene).
        dark_times = np.flatnonzero(dark) / fps
        near_dark = np.abs(grid[:, None] - dark_times[None, :]).min(axis=1) <= 1.5 / fps
        inside &= ~near_dark
        audio_valid = ~near_dark
    # Visual envelope resampled onto the audio grid; zero outside the frames' span.
    vis = np.where(inside, np.interp(grid, vtimes, visual), 0.0)
    max_lag = int(round(cfg.max_lag_ms / 1000.0 * rate))
    corr = _normalised_xcorr(vis, audio_env, inside, max_lag, audio_valid)
    if corr is None:
        return SyncEstimate(0.0, 0.0, "uncertain", method)
    best = int(np.argmax(corr))
    peak = float(corr[best])
    frac = 0.0
    if 0 < best < corr.size - 1:
        left, right = corr[best - 1], corr[best + 1]
        denom = left - 2 * peak + right
        if denom < 0:
            frac = float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))
    lag = best - max_lag + frac
    offset_ms = lag / rate * 1000.0
    if not np.isfinite(peak) or peak < cfg.min_confidence:
        verdict = "uncertain"
    elif abs(offset_ms) > cfg.tolerance_ms:
        verdict = "out_of_sync"
    else:
        verdict = "in_sync"
    valid = corr[corr > -1.0]
    prominence = float((peak - np.median(valid)) / (np.std(valid) + 1e-9))
    return SyncEstimate(
        float(offset_ms), peak if np.isfinite(peak) else 0.0, verdict, method, prominence
    )


def _normalised_xcorr(
    vis: np.ndarray,
    aud: np.ndarray,
    inside: np.ndarray,
    max_lag: int,
    audio_valid: np.ndarray | None = None,
) -> np.ndarray | None:
    """Pearson correlation of ``vis[t]`` with ``aud[t + lag]`` for lag in ``[-max_lag, max_lag]``,
    over the visual span only. ``(2 * max_lag + 1,)`` or None when either signal is flat."""
    idx = np.flatnonzero(inside)
    if idx.size < 4:
        return None
    v = vis[idx]
    v = v - v.mean()
    v_norm = np.sqrt(np.sum(v**2))
    if v_norm < 1e-12:
        return None
    out = np.full(2 * max_lag + 1, -1.0)
    for k, lag in enumerate(range(-max_lag, max_lag + 1)):
        j = idx + lag
        ok = (j >= 0) & (j < aud.size)
        if audio_valid is not None:
            ok[ok] &= audio_valid[j[ok]]
        if ok.sum() < max(4, idx.size // 2):
            continue
        a = aud[j[ok]]
        vv = v[ok] - v[ok].mean()
        a = a - a.mean()
        denom = np.sqrt(np.sum(vv**2) * np.sum(a**2))
        if denom < 1e-12:
            continue
        out[k] = float(np.sum(vv * a) / denom)
    if np.all(out <= -1.0):
        return None
    return out


class SyncStage(Stage):
    """Measures a clip's offset and stores offset, confidence, verdict and the verdict flag."""

    name = "sync"
    version = "2"
    kind = "clip"

    def __init__(self, config: SyncConfig | None = None):
        self.config = config or SyncConfig()

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)

    def process(self, ctx: SourceContext) -> None:
        w = ctx.window
        if w.audio is None:
            clip = w.clip
            clip.sync_verdict = "no_audio"
            clip.verdicts["av_sync_ok"] = None
            return
        self(w.clip, w.luma, w.audio, w.sample_rate)

    def __call__(
        self, clip: ClipRecord, luma: np.ndarray, audio: np.ndarray, sample_rate: int
    ) -> ClipRecord:
        est = estimate_offset(luma, clip.fps, audio, sample_rate, self.config)
        clip.sync_offset_ms = est.offset_ms
        clip.sync_confidence = est.confidence
        clip.sync_verdict = est.verdict
        clip.sync_method = est.method
        clip.sync_corrected = bool(self.config.correct and est.verdict == "out_of_sync")
        clip.verdicts["av_sync_ok"] = est.verdict != "out_of_sync" or clip.sync_corrected
        clip.scores["sync_offset_ms"] = est.offset_ms
        clip.scores["sync_confidence"] = est.confidence
        return clip
