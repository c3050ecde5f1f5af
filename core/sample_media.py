"""Small media files for tests and examples: good, video-only and VFR clips, and one file
for each kind of bad input curation must quarantine, with the reason it gives.

Shared by the validation and flow tests (tests import helpers from the package,
never from each other).
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from core import media


def _frames(t: int, h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(t, h, w, 3), dtype=np.uint8)


def _audio(seconds: float, rate: int = 48000) -> np.ndarray:
    n = int(seconds * rate)
    return (
        (0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)[None].repeat(2, 0)
    )


def write_good(path: str, seconds: float = 3.0, fps: float = 24.0, size=(128, 96)) -> str:
    t = int(seconds * fps)
    clip = media.AVClip(_frames(t, size[1], size[0]), fps, _audio(t / fps), 48000)
    media.write_mp4(path, clip, preset="ultrafast")
    return path


def write_video_only(path: str, frames: np.ndarray, fps: int = 24, pts_steps=None) -> str:
    """An MP4 with no audio stream; ``pts_steps`` gives per-frame durations (ticks of 1/(fps*2))."""
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        tick = Fraction(1, fps * 2)
        stream.codec_context.time_base = tick
        pts = 0
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = pts
            vf.time_base = tick
            pts += pts_steps[i % len(pts_steps)] if pts_steps else 2
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_vfr_with_audio(path: str, seconds: float = 3.0) -> str:
    """Video frames alternating 1/48 s and 1/16 s apart (variable frame rate), plus audio."""
    t = int(seconds * 24)
    frames = _frames(t)
    audio = _audio(seconds)
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height = 128, 96
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "bf": "0"}
        tick = Fraction(1, 48)
        stream.codec_context.time_base = tick
        astream = container.add_stream("aac", rate=48000, layout="stereo")
        pts = 0
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = pts
            vf.time_base = tick
            pts += 1 if i % 2 == 0 else 3
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        for start in range(0, audio.shape[1], 1024):
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio[:, start : start + 1024]), format="fltp", layout="stereo"
            )
            af.sample_rate = 48000
            af.pts = start
            af.time_base = Fraction(1, 48000)
            for packet in astream.encode(af):
                container.mux(packet)
        for packet in astream.encode(None):
            container.mux(packet)
    return path


def make_bad_inputs(directory: str) -> dict[str, str]:
    """One file per kind of bad input; returns {kind: path}."""
    os.makedirs(directory, exist_ok=True)
    paths: dict[str, str] = {}
    paths["zero_byte"] = os.path.join(directory, "zero_byte.mp4")
    open(paths["zero_byte"], "wb").close()

    good = write_good(os.path.join(directory, ".good_template.mp4"))
    data = open(good, "rb").read()
    os.remove(good)
    paths["truncated"] = os.path.join(directory, "truncated.mp4")
    with open(paths["truncated"], "wb") as fh:
        fh.write(data[: len(data) // 2])
    # An MP4 that calls itself Matroska.
    paths["wrong_extension"] = os.path.join(directory, "wrong_extension.mkv")
    with open(paths["wrong_extension"], "wb") as fh:
        fh.write(data)
    paths["no_audio"] = write_video_only(os.path.join(directory, "no_audio.mp4"), _frames(48))
    one = media.AVClip(_frames(1), 24.0, _audio(1 / 24), 48000)
    paths["one_frame"] = os.path.join(directory, "one_frame.mp4")
    media.write_mp4(paths["one_frame"], one, preset="ultrafast")
    paths["variable_frame_rate"] = write_vfr_with_audio(os.path.join(directory, "vfr.mp4"))
    # 4000x2400 = 9.6 Mpx, over the default 4K UHD (8.3 Mpx) limit; flat frames encode fast.
    big = media.AVClip(np.zeros((8, 2400, 4000, 3), np.uint8), 24.0, _audio(8 / 24), 48000)
    paths["huge_resolution"] = os.path.join(directory, "huge.mp4")
    media.write_mp4(paths["huge_resolution"], big, preset="ultrafast")
    raw_name = os.path.join(os.fsencode(directory), b"caf\xe9_latin1.mp4")
    with open(raw_name, "wb") as fh:
        fh.write(data)
    paths["non_utf8_name"] = os.fsdecode(raw_name)
    return paths


# Quarantined with the default config, and the reason each gets.
EXPECTED_REASON = {
    "zero_byte": "empty (0 bytes)",
    "truncated": "unreadable media",
    "wrong_extension": "does not match the container",
    "one_frame": "video frame(s)",
    "huge_resolution": "exceeds the limit",
    "non_utf8_name": "not valid UTF-8",
}
# Real footage the defaults accept (video-only clips, re-timed VFR); a config
# switch quarantines each instead, with this reason.
ACCEPTED_BY_DEFAULT = {
    "no_audio": ("require_audio", True, "no audio stream"),
    "variable_frame_rate": ("allow_variable_frame_rate", False, "variable frame rate"),
}
