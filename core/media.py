"""Media I/O: decode and encode video with audio through PyAV (FFmpeg's libraries).

Times are seconds on the media's own clock. Frames are RGB ``uint8`` arrays
``(T, H, W, 3)``; audio is ``float32`` ``(C, N)`` in [-1, 1].

Every failure to read a file as media -- zero bytes, truncated, not media at all, a
missing stream that was asked for -- raises :class:`MediaError`, one type with a
reason, so callers (the curation flow's quarantine) need one ``except``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from core import storage

# Inputs larger than this many pixels per frame are refused before decoding: an
# 8K frame is 100 MB of RGB, and a corpus of them would exhaust a worker's memory.
MAX_PIXELS = 4096 * 4096


class MediaError(Exception):
    """A file could not be read or written as media."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass
class AVClip:
    """Decoded (or generated) video with its audio."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float
    audio: np.ndarray  # (C, N) float32 in [-1, 1]
    sample_rate: int

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3), got {self.frames.shape}")
        if self.audio.ndim == 1:
            self.audio = self.audio[None, :]
        if self.audio.ndim != 2:
            raise ValueError(f"audio must be (C, N), got {self.audio.shape}")

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


@dataclass(frozen=True)
class MediaInfo:
    uri: str
    container: str
    duration_s: float
    width: int
    height: int
    fps: float
    frame_count: int
    has_video: bool
    has_audio: bool
    audio_rate: int
    audio_channels: int
    video_codec: str
    audio_codec: str
    variable_frame_rate: bool
    size_bytes: int


# ---------------------------------------------------------------- opening


def _open_input(uri: str, path: str) -> av.container.InputContainer:
    if os.path.getsize(path) == 0:
        raise MediaError(uri, "file is empty (0 bytes)")
    try:
        # A timeout keeps a pathological file from hanging the demuxer's probing.
        return av.open(path, mode="r", timeout=30.0)
    except av.error.FFmpegError as err:
        raise MediaError(uri, f"not readable as media ({err.__class__.__name__}: {err})") from err


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError("", "video stream has no frame rate")
    return float(rate)


def _stream_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _frame_time(frame: av.frame.Frame, fallback: float) -> float:
    return float(frame.time) if frame.time is not None else fallback


# ---------------------------------------------------------------- probing


def probe_media(uri: str, check_frame_rate: bool = True) -> MediaInfo:
    """Container-level facts about ``uri``.

    With ``check_frame_rate`` the first packets' timestamps are read to tell a
    constant from a variable frame rate (containers do not say which).
    """
    with storage.local_copy(uri) as path:
        size_bytes = os.path.getsize(path)
        with _open_input(uri, path) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            if video is None and audio is None:
                raise MediaError(uri, "no audio or video stream")
            width = height = frame_count = 0
            fps = 0.0
            vfr = False
            duration = _stream_duration(container, video or audio)
            if video is not None:
                width, height = video.codec_context.width, video.codec_context.height
                try:
                    fps = _stream_fps(video)
                except MediaError as err:
                    raise MediaError(uri, err.reason) from None
                frame_count = int(video.frames) or int(round(duration * fps))
                if check_frame_rate:
                    try:
                        vfr = _is_variable_frame_rate(container, video)
                    except MediaError as err:
                        raise MediaError(uri, err.reason) from None
            return MediaInfo(
                uri=uri,
                container=container.format.name,
                duration_s=float(duration),
                width=int(width),
                height=int(height),
                fps=fps,
                frame_count=frame_count,
                has_video=video is not None,
                has_audio=audio is not None,
                audio_rate=int(audio.codec_context.sample_rate) if audio else 0,
                audio_channels=int(audio.codec_context.channels) if audio else 0,
                video_codec=video.codec_context.name if video else "",
                audio_codec=audio.codec_context.name if audio else "",
                variable_frame_rate=vfr,
                size_bytes=size_bytes,
            )


def _is_variable_frame_rate(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    packets: int = 240,
    tolerance: float = 0.1,
) -> bool:
    """True when frame durations in the first ``packets`` differ by more than ``tolerance``.

    Packets arrive in decode order; with B-frames the last presentation times of a
    prefix belong to frames still to come, so the tail of the sorted prefix is not
    judged (it would look like a gap in every B-frame stream).
    """
    stamps = []
    try:
        for packet in container.demux(stream):
            if packet.pts is not None:
                stamps.append(float(packet.pts * packet.time_base))
            if len(stamps) >= packets:
                break
    except av.error.FFmpegError as err:
        raise MediaError("", f"cannot read packets ({err})") from err
    reorder_slack = 16 if len(stamps) >= packets else 0
    ordered = np.sort(np.asarray(stamps))[: len(stamps) - reorder_slack]
    gaps = np.diff(ordered)
    gaps = gaps[gaps > 0]
    if gaps.size < 2:
        return False
    median = float(np.median(gaps))
    return bool(gaps.max() > (1 + tolerance) * median or gaps.min() < (1 - tolerance) * median)


# ---------------------------------------------------------------- video


def iter_video_frames(
    uri: str,
    start_s: float = 0.0,
    end_s: float | None = None,
    size: tuple[int, int] | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(time_s, frame)`` for frames with ``start_s <= time < end_s``.

    Seeks to the keyframe before ``start_s`` and discards frames before it, so
    reads are frame-accurate. ``size=(w, h)`` scales while converting to RGB,
    which is much cheaper than decoding full size and resizing afterwards.
    """
    with storage.local_copy(uri) as path, _open_input(uri, path) as container:
        if not container.streams.video:
            raise MediaError(uri, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > MAX_PIXELS:
            raise MediaError(uri, f"resolution {w}x{h} exceeds the {MAX_PIXELS}-pixel limit")
        fps = _stream_fps(stream)
        # Half a frame of slack: timestamps are rounded to the stream's time base.
        eps = 0.5 / fps
        if start_s > 0:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        index = 0
        try:
            for frame in container.decode(stream):
                t = _frame_time(frame, index / fps)
                index += 1
                if t < start_s - eps:
                    continue
                if end_s is not None and t >= end_s - eps:
                    break
                if size is not None:
                    rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                yield t, rgb
        except av.error.FFmpegError as err:
            raise MediaError(uri, f"video decode failed ({err})") from err


def read_video(
    uri: str,
    start_s: float = 0.0,
    end_s: float | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, float]:
    """All frames in ``[start_s, end_s)`` as ``(T, H, W, 3)`` uint8, and the fps."""
    info_fps = None
    frames = []
    for _, frame in iter_video_frames(uri, start_s, end_s, size):
        frames.append(frame)
    with storage.local_copy(uri) as path, _open_input(uri, path) as container:
        if container.streams.video:
            info_fps = _stream_fps(container.streams.video[0])
    if not frames:
        raise MediaError(uri, f"no video frames in [{start_s}, {end_s})")
    return np.stack(frames), float(info_fps)


# ---------------------------------------------------------------- audio


def read_audio(
    uri: str,
    start_s: float = 0.0,
    end_s: float | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
) -> tuple[np.ndarray, int]:
    """Audio in ``[start_s, end_s)`` as ``(C, N)`` float32 and its sample rate.

    Samples are placed by their decoded timestamps, so an encoder's priming
    delay or a stream that starts late keeps its true position relative to
    the video.
    """
    with storage.local_copy(uri) as path, _open_input(uri, path) as container:
        if not container.streams.audio:
            raise MediaError(uri, "no audio stream")
        stream = container.streams.audio[0]
        src_rate = int(stream.codec_context.sample_rate)
        src_channels = int(stream.codec_context.channels) or 1
        out_channels = channels or src_channels
        layout = {1: "mono", 2: "stereo"}.get(out_channels)
        if layout is None:
            raise MediaError(uri, f"unsupported channel count {out_channels}")
        out_rate = sample_rate or src_rate
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        chunks: list[tuple[float, np.ndarray]] = []
        if start_s > 0:
            container.seek(int(start_s * av.time_base), backward=True)
        try:
            for frame in container.decode(stream):
                t0 = _frame_time(frame, 0.0)
                if end_s is not None and t0 >= end_s:
                    break
                for out in resampler.resample(frame):
                    chunks.append((_frame_time(out, t0), out.to_ndarray()))
            for out in resampler.resample(None):
                chunks.append(
                    (_frame_time(out, chunks[-1][0] if chunks else 0.0), out.to_ndarray())
                )
        except av.error.FFmpegError as err:
            raise MediaError(uri, f"audio decode failed ({err})") from err
    if not chunks:
        raise MediaError(uri, "audio stream holds no samples")
    audio = _place_chunks(chunks, out_rate, out_channels, start_s, end_s)
    return audio, out_rate


def _place_chunks(
    chunks: list[tuple[float, np.ndarray]],
    rate: int,
    channels: int,
    start_s: float,
    end_s: float | None,
) -> np.ndarray:
    """Lay decoded chunks on one timeline starting at ``start_s`` (zeros in gaps)."""
    # The resampler's output timestamps can drift by a sample against the input;
    # consecutive chunks are laid end to end unless the gap is real (> 1 ms).
    positions = []
    cursor = None
    for t, data in chunks:
        pos = int(round((t - start_s) * rate))
        if cursor is not None and abs(pos - cursor) <= max(1, rate // 1000):
            pos = cursor
        positions.append(pos)
        cursor = pos + data.shape[1]
    last = positions[-1] + chunks[-1][1].shape[1]
    total = last if end_s is None else int(round((end_s - start_s) * rate))
    out = np.zeros((channels, max(total, 0)), dtype=np.float32)
    for pos, (_, data) in zip(positions, chunks, strict=True):
        lo, hi = max(pos, 0), min(pos + data.shape[1], out.shape[1])
        if hi > lo:
            out[:, lo:hi] = data[:, lo - pos : hi - pos]
    return out


def resample_audio(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling of ``(C, N)`` or ``(N,)`` audio."""
    if src_rate == dst_rate:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(int(src_rate), int(dst_rate))
    out = resample_poly(audio, dst_rate // g, src_rate // g, axis=-1)
    return out.astype(np.float32)


# ---------------------------------------------------------------- both


def read_clip(
    uri: str,
    start_s: float = 0.0,
    end_s: float | None = None,
    sample_rate: int | None = None,
    size: tuple[int, int] | None = None,
    require_audio: bool = True,
) -> AVClip:
    """Frames and audio of ``[start_s, end_s)``; silent stereo if audio is absent
    and ``require_audio`` is False."""
    frames, fps = read_video(uri, start_s, end_s, size)
    # Audio is cut to exactly the frames' span so the two stay the same length.
    span_end = start_s + frames.shape[0] / fps
    try:
        audio, rate = read_audio(uri, start_s, span_end, sample_rate=sample_rate)
    except MediaError as err:
        if require_audio or err.reason != "no audio stream":
            raise
        rate = sample_rate or 48000
        audio = np.zeros((2, int(round((span_end - start_s) * rate))), dtype=np.float32)
    return AVClip(frames=frames, fps=fps, audio=audio, sample_rate=rate)


def write_mp4(
    uri: str,
    clip: AVClip,
    crf: int = 18,
    preset: str = "veryfast",
    audio_bitrate: int = 192_000,
    aac_coder: str | None = None,
) -> None:
    """Encode H.264 (yuv420p) + AAC into an MP4 at ``uri``, atomically.

    ``aac_coder="fast"`` selects FFmpeg's fast AAC coder: about 3x cheaper than the
    default two-loop search, at slightly lower quality -- right for training clips
    whose audio is re-encoded by a VAE anyway.

    Video frame ``i`` is stamped ``i / fps`` and audio sample ``n`` at
    ``n / sample_rate``, so what was in sync in ``clip`` is in sync in the file.
    """
    t, h, w, _ = clip.frames.shape
    if t == 0:
        raise MediaError(uri, "cannot encode a clip with no frames")
    if h % 2 or w % 2:
        raise MediaError(uri, f"H.264 yuv420p needs even width and height, got {w}x{h}")
    if clip.frames.dtype != np.uint8:
        raise MediaError(uri, f"frames must be uint8, got {clip.frames.dtype}")
    channels = clip.audio.shape[0]
    layout = {1: "mono", 2: "stereo"}.get(channels)
    if layout is None:
        raise MediaError(uri, f"audio must have 1 or 2 channels, got {channels}")
    rate = Fraction(clip.fps).limit_denominator(1001)
    with storage.local_output(uri) as path:
        with av.open(path, mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=rate)
            video.width, video.height = w, h
            video.pix_fmt = "yuv420p"
            video.options = {"crf": str(crf), "preset": preset}
            video.codec_context.time_base = 1 / rate
            audio = container.add_stream("aac", rate=int(clip.sample_rate), layout=layout)
            audio.bit_rate = audio_bitrate
            if aac_coder is not None:
                audio.options = {"aac_coder": aac_coder}
            for i in range(t):
                frame = av.VideoFrame.from_ndarray(clip.frames[i], format="rgb24")
                frame.pts = i
                frame.time_base = video.codec_context.time_base
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
            _encode_audio(
                container, audio, np.clip(clip.audio, -1.0, 1.0), clip.sample_rate, layout
            )


def _encode_audio(container, stream, audio: np.ndarray, rate: int, layout: str) -> None:
    samples = np.ascontiguousarray(audio.astype(np.float32))
    chunk = 1024
    for start in range(0, samples.shape[1], chunk):
        part = np.ascontiguousarray(samples[:, start : start + chunk])
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
