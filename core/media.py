"""Media I/O: decode and encode video with audio through PyAV (FFmpeg's libraries).

Times are seconds on the media's own clock. Frames are RGB ``uint8`` arrays
``(T, H, W, 3)``; audio is ``float32`` ``(C, N)`` in [-1, 1].

Every failure to read a file as media -- zero bytes, truncated, not media at all, a
missing stream that was asked for -- raises :class:`MediaError`, one type with a
reason, so callers (the curation flow's quarantine) need one ``except``.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from core import storage


class _PyAV:
    """``av``, imported at its first use: the clip types here are read by code that
    never touches media (the alignment stages on a carry of captions only), on hosts
    where PyAV is not installed."""

    def __getattr__(self, name: str):
        import av as module

        globals()["av"] = module
        return getattr(module, name)


av = _PyAV()

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
    # Display geometry: the coded picture is turned ``rotation`` degrees counter-
    # clockwise (a phone's display matrix) and its pixels are ``sample_aspect_ratio``
    # wide (PAL DVD 704x576 at 16:11 displays as 1024x576).
    rotation: int = 0
    sample_aspect_ratio: float = 1.0
    display_width: int = 0
    display_height: int = 0
    # The first video frame's time on the container clock: the origin of every time
    # Duet reports for this source (audio that starts later is padded with silence).
    start_s: float = 0.0
    audio_streams: int = 0
    audio_stream: int = -1  # which audio stream (index among audio streams) is used


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
    constant from a variable frame rate (containers do not say which), and the
    first frame is decoded for its display rotation and start time.
    """
    with local_path(uri) as path:
        size_bytes = os.path.getsize(path)
        with _open_input(uri, path) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = choose_audio_stream(container)
            if video is None and audio is None:
                raise MediaError(uri, "no audio or video stream")
            width = height = frame_count = 0
            fps = 0.0
            vfr = False
            rotation = 0
            sar = 1.0
            start_s = 0.0
            duration = _stream_duration(container, video or audio)
            if video is not None:
                width, height = video.codec_context.width, video.codec_context.height
                try:
                    fps = _stream_fps(video)
                except MediaError as err:
                    raise MediaError(uri, err.reason) from None
                frame_count = int(video.frames) or int(round(duration * fps))
                sar = float(video.sample_aspect_ratio or 1) or 1.0
                if video.start_time is not None:
                    start_s = float(video.start_time * video.time_base)
                if check_frame_rate:
                    try:
                        vfr = _is_variable_frame_rate(container, video)
                        rotation, first_s = _first_frame_facts(container, video)
                    except MediaError as err:
                        raise MediaError(uri, err.reason) from None
                    if first_s is not None:
                        start_s = first_s
                    # A variable-rate source is re-timed to its nominal rate (the
                    # container's base rate: a phone's 30 with dropped frames), not
                    # to the average its drops pull down; unless the base rate is a
                    # timestamp clock rather than a frame rate.
                    base = float(video.base_rate or 0)
                    if vfr and fps <= base <= 2 * fps:
                        fps = base
            dw, dh = display_size(width, height, sar, rotation) if video else (0, 0)
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
                rotation=rotation,
                sample_aspect_ratio=sar,
                display_width=dw,
                display_height=dh,
                start_s=start_s,
                audio_streams=len(container.streams.audio),
                audio_stream=list(container.streams.audio).index(audio) if audio else -1,
            )


def choose_audio_stream(
    container: av.container.InputContainer,
) -> av.audio.stream.AudioStream | None:
    """The audio stream a player would pick: the one marked default, else the first
    that carries samples (a file may hold a commentary track or an empty stream too)."""
    usable = [a for a in container.streams.audio if a.codec_context.sample_rate]
    for stream in usable:
        if stream.disposition & av.stream.Disposition.default:
            return stream
    return usable[0] if usable else None


def _first_frame_facts(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[int, float | None]:
    """(rotation in degrees counter-clockwise, time of the first frame) from a decode
    of the first frame; the display matrix reaches PyAV on decoded frames."""
    container.seek(0, stream=stream, backward=True, any_frame=False)
    try:
        for frame in container.decode(stream):
            return int(round(frame.rotation / 90.0)) * 90 % 360, (
                float(frame.time) if frame.time is not None else None
            )
    except av.error.FFmpegError as err:
        raise MediaError("", f"cannot decode the first frame ({err})") from err
    return 0, None


def display_size(width: int, height: int, sar: float, rotation: int) -> tuple[int, int]:
    """Square-pixel, upright size of a coded ``width x height`` picture (even numbers,
    as yuv420p encoders need)."""
    w = width * sar if sar > 0 else width
    w = max(2, int(round(w / 2)) * 2)
    h = max(2, int(round(height / 2)) * 2)
    return (h, w) if rotation in (90, 270) else (w, h)


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


# ---------------------------------------------------------------- limits (untrusted media)


@dataclass(frozen=True)
class MediaLimits:
    """What one untrusted media file (a served request's reference) may hold.

    A few kilobytes can declare minutes of frames or a huge canvas, so these are
    checked in three phases, each cheaper than what it guards: the header
    (:func:`check_media_header`, from :func:`probe_media`), the packets, demuxed but
    not decoded (:func:`scan_packets`: a header that understates its length is
    caught by counting what is really there), and the decoded frames themselves
    (:class:`DecodeBudget`: a stream that changes resolution mid-way, or whose
    packets decode to more than their timestamps said, stops at the limit).
    """

    max_seconds: float = 30.0
    max_frames: int = 1800  # 30 s at 60 fps
    max_pixels: int = MAX_PIXELS  # per frame
    max_side: int = 8192  # either dimension
    # Everything decoded, at the coded size: RGB24 per video frame, float32 per audio
    # sample and channel. 30 s of 1080p at 30 fps is 5.6 GB.
    max_decoded_bytes: int = 8 * 1024**3
    max_streams: int = 16
    max_channels: int = 8  # 7.1
    max_sample_rate: int = 192_000


# Counted durations may run past the header's by a codec's priming and the last
# frame's length; this much slack keeps honest media from being refused for it.
COUNT_GRACE_S = 0.5


class MediaLimitError(MediaError):
    """Media over one of :class:`MediaLimits`: ``limit`` names the field, ``detail``
    says what was found."""

    def __init__(self, uri: str, limit: str, detail: str):
        super().__init__(uri, f"{detail} (over {limit})")
        self.limit = limit
        self.detail = detail


def _decoded_video_bytes(width: int, height: int, frames: int) -> int:
    return int(width) * int(height) * 3 * int(frames)


def check_media_header(info: MediaInfo, limits: MediaLimits) -> None:
    """Refuse media whose header (as :func:`probe_media` read it) declares more than
    ``limits``; nothing has been decoded yet. A header that says nothing (a raw
    stream: duration 0) passes here and is counted by :func:`scan_packets`."""
    uri = info.uri
    if info.has_video:
        w, h = info.width, info.height
        if max(w, h) > limits.max_side:
            raise MediaLimitError(
                uri, "max_side", f"video is {w}x{h}: a side over {limits.max_side}"
            )
        if w * h > limits.max_pixels:
            raise MediaLimitError(
                uri,
                "max_pixels",
                f"video is {w}x{h} = {w * h} pixels a frame",
            )
        if info.frame_count > limits.max_frames:
            raise MediaLimitError(
                uri,
                "max_frames",
                f"header declares {info.frame_count} frames",
            )
    if info.duration_s > limits.max_seconds:
        raise MediaLimitError(
            uri,
            "max_seconds",
            f"header declares {info.duration_s:.1f} s",
        )
    if info.has_audio:
        if info.audio_channels > limits.max_channels:
            raise MediaLimitError(
                uri,
                "max_channels",
                f"audio has {info.audio_channels} channels",
            )
        if info.audio_rate > limits.max_sample_rate:
            raise MediaLimitError(
                uri,
                "max_sample_rate",
                f"audio is sampled at {info.audio_rate} Hz",
            )
    decoded = (
        _decoded_video_bytes(info.width, info.height, info.frame_count) if info.has_video else 0
    )
    decoded += int(info.duration_s * info.audio_rate) * info.audio_channels * 4
    if decoded > limits.max_decoded_bytes:
        raise MediaLimitError(
            uri,
            "max_decoded_bytes",
            f"header declares {decoded} bytes decoded",
        )


@dataclass
class PacketCount:
    """What :func:`scan_packets` counted: video packets (one per frame), the longest
    stream's seconds, and the container's streams."""

    frames: int
    seconds: float
    streams: int


def scan_packets(uri: str, limits: MediaLimits) -> PacketCount:
    """Demux (never decode) the first video stream and every audio stream, counting
    frames and seconds, and stop at the first limit passed.

    A stream's seconds are the most of: its timestamps' span, the sum of its packets'
    durations, and (video) its packet count at the stated rate, so neither a header
    nor timestamps that understate can hide what the packets hold. Costs one read of
    the file's bytes, bounded by the upload limit.
    """
    with local_path(uri) as path, _open_input(uri, path) as container:
        count = len(container.streams)
        if count > limits.max_streams:
            raise MediaLimitError(uri, "max_streams", f"{count} streams")
        video = container.streams.video[0] if container.streams.video else None
        streams = ([video] if video is not None else []) + list(container.streams.audio)
        if not streams:
            return PacketCount(0, 0.0, count)
        fps = 0.0
        width = height = 0
        if video is not None:
            width, height = video.codec_context.width, video.codec_context.height
            rate = video.average_rate or video.guessed_rate or video.base_rate
            fps = float(rate) if rate else 0.0
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        summed: dict[int, float] = {}
        frames = 0
        seconds = 0.0
        try:
            for packet in container.demux(*streams):
                if packet.size == 0:  # the demuxer's end-of-stream flush
                    continue
                key = packet.stream.index
                tb = packet.time_base or packet.stream.time_base
                length = float(packet.duration * tb) if packet.duration and tb else 0.0
                summed[key] = summed.get(key, 0.0) + length
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None and tb:
                    t = float(stamp * tb)
                    first[key] = min(first.get(key, t), t)
                    last[key] = max(last.get(key, t), t + length)
                span = last.get(key, 0.0) - first.get(key, 0.0)
                stream_s = max(span, summed[key])
                if packet.stream is video:
                    frames += 1
                    if fps:
                        stream_s = max(stream_s, frames / fps)
                    if frames > limits.max_frames:
                        raise MediaLimitError(
                            uri, "max_frames", f"holds more than {limits.max_frames} video frames"
                        )
                    if _decoded_video_bytes(width, height, frames) > limits.max_decoded_bytes:
                        raise MediaLimitError(
                            uri,
                            "max_decoded_bytes",
                            f"{frames} frames of {width}x{height} decode to more than "
                            f"{limits.max_decoded_bytes} bytes",
                        )
                seconds = max(seconds, stream_s)
                if seconds > limits.max_seconds + COUNT_GRACE_S:
                    raise MediaLimitError(
                        uri, "max_seconds", f"holds more than {limits.max_seconds:g} s of media"
                    )
        except av.error.FFmpegError as err:
            raise MediaError(uri, f"cannot read packets ({err})") from err
        return PacketCount(frames, seconds, count)


class DecodeBudget:
    """Counts what is decoded from one untrusted file and raises
    :class:`MediaLimitError` at the first frame past ``limits``, whatever the header
    and the packets said. Pass one to :func:`read_video`, :func:`read_audio` or
    :func:`read_clip` (``budget=``); :func:`decode_audio_within` uses one alone."""

    def __init__(self, limits: MediaLimits, uri: str = ""):
        self.limits = limits
        self.uri = uri
        self.frames = 0
        self.audio_seconds = 0.0
        self.decoded_bytes = 0
        self._first: dict[str, float] = {}

    def _fail(self, limit: str, reason: str) -> None:
        raise MediaLimitError(self.uri, limit, reason)

    def _span(self, kind: str, time_s: float | None, length_s: float) -> None:
        if time_s is None:
            return
        start = self._first.setdefault(kind, float(time_s))
        if float(time_s) + length_s - start > self.limits.max_seconds + COUNT_GRACE_S:
            self._fail("max_seconds", f"{kind} runs past {self.limits.max_seconds:g} s")

    def _add_bytes(self, n: int) -> None:
        self.decoded_bytes += n
        if self.decoded_bytes > self.limits.max_decoded_bytes:
            self._fail(
                "max_decoded_bytes", f"decodes to more than {self.limits.max_decoded_bytes} bytes"
            )

    def video_frame(self, frame: av.VideoFrame) -> None:
        """Account for one decoded frame (call before converting it)."""
        lim = self.limits
        w, h = frame.width, frame.height
        if max(w, h) > lim.max_side:
            self._fail("max_side", f"a frame is {w}x{h}: a side over {lim.max_side}")
        if w * h > lim.max_pixels:
            self._fail("max_pixels", f"a frame is {w}x{h} = {w * h} pixels")
        self.frames += 1
        if self.frames > lim.max_frames:
            self._fail("max_frames", f"decodes to more than {lim.max_frames} frames")
        self._span("video", frame.time, 0.0)
        self._add_bytes(_decoded_video_bytes(w, h, 1))

    def audio_frame(self, frame: av.AudioFrame) -> None:
        """Account for one decoded audio frame (before resampling)."""
        lim = self.limits
        channels, rate = frame.layout.nb_channels, frame.sample_rate
        if channels > lim.max_channels:
            self._fail("max_channels", f"audio has {channels} channels")
        if rate > lim.max_sample_rate:
            self._fail("max_sample_rate", f"audio is sampled at {rate} Hz")
        length = frame.samples / rate if rate else 0.0
        self.audio_seconds += length
        if self.audio_seconds > lim.max_seconds + COUNT_GRACE_S:
            self._fail("max_seconds", f"decodes to more than {lim.max_seconds:g} s of audio")
        self._span("audio", frame.time, length)
        self._add_bytes(frame.samples * channels * 4)


def decode_audio_within(uri: str, limits: MediaLimits) -> float:
    """Decode the audio stream a reader would use, keeping nothing, and return its
    seconds; raises :class:`MediaLimitError` at the first frame past ``limits``, so
    the cost is bounded by the limits, not by what the file claims or holds."""
    budget = DecodeBudget(limits, uri)
    with local_path(uri) as path, _open_input(uri, path) as container:
        stream = choose_audio_stream(container)
        if stream is None:
            raise MediaError(uri, "no audio stream")
        try:
            for frame in container.decode(stream):
                budget.audio_frame(frame)
        except av.error.FFmpegError as err:
            raise MediaError(uri, f"audio decode failed ({err})") from err
    return budget.audio_seconds


# ---------------------------------------------------------------- video


def iter_video_frames(
    uri: str,
    start_s: float = 0.0,
    end_s: float | None = None,
    size: tuple[int, int] | None = None,
    budget: DecodeBudget | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(time_s, frame)`` for frames with ``start_s <= time < end_s``.

    Seeks to the keyframe before ``start_s`` and discards frames before it, so
    reads are frame-accurate. ``size=(w, h)`` scales while converting to RGB,
    which is much cheaper than decoding full size and resizing afterwards.
    ``budget`` (untrusted input) counts every decoded frame and stops the read at
    the first one past its limits.
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
                if budget is not None:
                    budget.video_frame(frame)
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
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, float]:
    """All frames in ``[start_s, end_s)`` as ``(T, H, W, 3)`` uint8, and the fps."""
    info_fps = None
    frames = []
    for _, frame in iter_video_frames(uri, start_s, end_s, size, budget):
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
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, int]:
    """Audio in ``[start_s, end_s)`` as ``(C, N)`` float32 and its sample rate.

    Samples are placed by their decoded timestamps, so an encoder's priming
    delay or a stream that starts late keeps its true position relative to
    the video. ``budget`` (untrusted input) counts every decoded frame, and its
    timestamps' span, and stops the read at the first one past its limits.
    """
    with storage.local_copy(uri) as path, _open_input(uri, path) as container:
        if not container.streams.audio:
            raise MediaError(uri, "no audio stream")
        stream = choose_audio_stream(container) or container.streams.audio[0]
        src_rate = int(stream.codec_context.sample_rate)
        src_channels = int(stream.codec_context.channels) or 1
        # 5.1 and other layouts are downmixed to stereo unless asked otherwise.
        out_channels = channels or min(src_channels, 2)
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
                if budget is not None:
                    budget.audio_frame(frame)
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
    budget: DecodeBudget | None = None,
) -> AVClip:
    """Frames and audio of ``[start_s, end_s)``; silent stereo if audio is absent
    and ``require_audio`` is False. ``budget`` bounds both reads together."""
    frames, fps = read_video(uri, start_s, end_s, size, budget)
    # Audio is cut to exactly the frames' span so the two stay the same length.
    span_end = start_s + frames.shape[0] / fps
    try:
        audio, rate = read_audio(uri, start_s, span_end, sample_rate=sample_rate, budget=budget)
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
    lossless: bool = False,
) -> None:
    """Encode H.264 (yuv420p) + AAC into an MP4 at ``uri``, atomically.

    ``lossless=True`` encodes at quantiser 0: the decoded frames are exactly the
    clip's frames after the RGB -> YUV 4:2:0 conversion, whatever choices the
    encoder makes. libx264 at a CRF does not give the same bytes for the same frames
    from run to run (its rate control and threads), so a corpus that must be the
    same every time it is built (test fixtures, benchmarks) is written lossless.

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
    if layout is None and channels != 0:
        raise MediaError(uri, f"audio must have 0 (video only), 1 or 2 channels, got {channels}")
    rate = Fraction(clip.fps).limit_denominator(1001)
    with storage.local_output(uri) as path:
        with av.open(path, mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=rate)
            video.width, video.height = w, h
            video.pix_fmt = "yuv420p"
            video.options = (
                {"qp": "0", "preset": preset} if lossless else {"crf": str(crf), "preset": preset}
            )
            video.codec_context.time_base = 1 / rate
            audio = None
            if layout is not None:
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
            if audio is None:
                return
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


# ---------------------------------------------------------------- streaming, any format


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local file holding ``uri``: the file itself when local, else a download
    streamed to a temporary file (never the whole object in memory: sources run to
    hours and gigabytes)."""
    if storage.scheme_of(uri) == "file":
        path = storage.strip_scheme(uri)
        if not os.path.exists(path):
            raise MediaError(uri, "no such file")
        yield path
        return
    suffix = os.path.splitext(uri)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        try:
            storage.filesystem(uri).get_file(storage.strip_scheme(uri), tmp)
        except (OSError, ValueError) as err:
            raise MediaError(uri, f"cannot read ({err})") from err
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@dataclass
class DisplayFrame:
    index: int  # on the constant-rate grid: frame ``index`` shows at ``index / fps``
    time_s: float  # index / fps, relative to the source's first frame
    image: np.ndarray  # (H, W, C) uint8, upright, square pixels, in the asked format
    key_frame: bool  # a keyframe of the source sits on this grid point (stream-copy cut)


def iter_display_frames(
    path: str,
    fps: float,
    origin_s: float = 0.0,
    size: tuple[int, int] | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    pixel_format: str = "rgb24",
    rotation: int | None = None,
    sample_aspect_ratio: float = 1.0,
    threads: int = 0,
    analysis: bool = False,
) -> Iterator[DisplayFrame]:
    """Frames as a viewer sees them, on a constant ``fps`` grid, one at a time.

    - Rotation (display matrix) is applied and non-square pixels are resampled,
      so frames are upright with square pixels (``size`` is the upright size; by
      default the display size).
    - Grid point ``k`` (time ``k / fps`` after ``origin_s``) shows the decoded frame
      nearest to it: a variable-rate source becomes constant-rate, a timestamp gap
      repeats the frame before it and keeps later frames on time, as FFmpeg's fps
      filter does.
    - Only frames with ``start_s <= k / fps < end_s`` are yielded (seeking first).

    Memory is one decoded frame plus the decoder's own, whatever the duration.

    ``threads``: decoder threads (0: FFmpeg's choice). One thread costs the least
    CPU per frame; more only shorten the wall time of a single source.
    ``analysis``: small frames for measuring, not for showing: the decoder skips
    its deblocking filter (invisible after a tenfold downscale, a fifth of H.264's
    decode time) and 4:2:0 planes are shrunk separately before colour conversion.
    """
    eps = 0.5 / fps
    first_k = int(math.ceil(start_s * fps - 1e-6)) if start_s > 0 else 0
    stop_k = int(math.ceil(end_s * fps - 1e-6)) if end_s is not None else None
    with _open_input(path, path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        if threads == 1:
            stream.thread_type = "NONE"
            stream.codec_context.thread_count = 1
        else:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        if analysis:
            stream.codec_context.options = {"skip_loop_filter": "all"}
        cw, ch = stream.codec_context.width, stream.codec_context.height
        if cw * ch > MAX_PIXELS:
            raise MediaError(path, f"resolution {cw}x{ch} exceeds the {MAX_PIXELS}-pixel limit")
        if start_s > 0:
            target = origin_s + start_s - 1.0 / fps
            container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True)
        k = first_k
        prev: av.VideoFrame | None = None
        prev_t = 0.0
        prev_key = False
        converted: np.ndarray | None = None
        key_emitted = False

        def convert(frame: av.VideoFrame) -> np.ndarray:
            rot = frame.rotation if rotation is None else rotation
            rot = int(round(rot / 90.0)) * 90 % 360
            if size is not None:
                out_w, out_h = size
            else:
                out_w, out_h = display_size(frame.width, frame.height, sample_aspect_ratio, rot)
            # Scale in the coded orientation, then turn: swscale works on the coded frame.
            cw_, ch_ = (out_h, out_w) if rot in (90, 270) else (out_w, out_h)
            if analysis and pixel_format == "bgr24" and frame.format.name in _PLANAR_420:
                image = _small_bgr_from_planes(frame, cw_, ch_)
            else:
                image = frame.to_ndarray(
                    width=cw_, height=ch_, format=pixel_format, interpolation="AREA"
                )
            if rot:
                image = np.ascontiguousarray(np.rot90(image, k=rot // 90))
            return image

        def emit_until(limit_t: float) -> Iterator[DisplayFrame]:
            nonlocal k, converted, key_emitted
            while k / fps < limit_t and (stop_k is None or k < stop_k):
                if converted is None:
                    converted = convert(prev)
                # A keyframe counts for the first grid point that shows it, and only
                # when that point is the frame's own time (else the cut would be off).
                key = prev_key and not key_emitted and abs(k / fps - prev_t) <= eps
                key_emitted = key_emitted or key
                yield DisplayFrame(k, k / fps, converted, key)
                k += 1

        try:
            for frame in container.decode(stream):
                t = (float(frame.time) - origin_s) if frame.time is not None else k / fps
                if prev is not None:
                    yield from emit_until((prev_t + t) / 2)
                    if stop_k is not None and k >= stop_k:
                        return
                prev, prev_t, prev_key = frame, t, bool(frame.key_frame)
                converted, key_emitted = None, False
            if prev is not None:
                yield from emit_until(prev_t + eps)
        except av.error.FFmpegError as err:
            raise MediaError(path, f"video decode failed ({err})") from err


_PLANAR_420 = ("yuv420p", "yuvj420p")
# Studio-range (16-235 luma, 16-240 chroma) to full range, as swscale does for RGB.
_LUMA_LUT = np.clip((np.arange(256) - 16) * 255.0 / 219.0, 0, 255).round().astype(np.uint8)
_CHROMA_LUT = np.clip((np.arange(256) - 128) * 255.0 / 224.0 + 128, 0, 255).round().astype(np.uint8)


def _plane(frame: av.VideoFrame, i: int) -> np.ndarray:
    plane = frame.planes[i]
    data = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return data[:, : plane.width]


def _small_bgr_from_planes(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """(height, width, 3) BGR from a 4:2:0 frame: each plane area-averaged to the
    small size first (cheap, SIMD), then one small colour conversion (BT.601)."""
    y, u, v = (
        cv2.resize(_plane(frame, i), (width, height), interpolation=cv2.INTER_AREA)
        for i in range(3)
    )
    if frame.format.name == "yuv420p":  # studio range; yuvj420p is full range already
        y, u, v = _LUMA_LUT[y], _CHROMA_LUT[u], _CHROMA_LUT[v]
    # OpenCV's YCrCb conversion is the BT.601 full-range matrix (its "YUV" one is not).
    return cv2.cvtColor(np.dstack([y, v, u]), cv2.COLOR_YCrCb2BGR)


class AudioReader:
    """Sequential reads of one audio stream on the video's clock, with bounded memory.

    ``read(start_s, end_s)`` returns ``(C, N)`` float32 for that span (times
    relative to ``origin_s``, the first video frame), silence where the stream has
    none (a late start, a gap, past its end). Requests must move forward; decoded
    audio before ``release(before_s)`` is dropped, so memory stays at the span
    between the oldest unreleased time and the newest read.
    """

    def __init__(
        self,
        path: str,
        origin_s: float = 0.0,
        stream_index: int | None = None,
        sample_rate: int | None = None,
        channels: int | None = None,
    ):
        self._container = _open_input(path, path)
        audio = self._container.streams.audio
        if not audio:
            self._container.close()
            raise MediaError(path, "no audio stream")
        stream = audio[stream_index] if stream_index is not None and stream_index >= 0 else None
        stream = stream or choose_audio_stream(self._container) or audio[0]
        src_channels = int(stream.codec_context.channels) or 1
        # More than two channels (5.1, 7.1) are downmixed: clips carry mono or stereo.
        self.channels = channels or min(src_channels, 2)
        layout = {1: "mono", 2: "stereo"}.get(self.channels)
        if layout is None:
            self._container.close()
            raise MediaError(path, f"unsupported channel count {self.channels}")
        self.sample_rate = int(sample_rate or stream.codec_context.sample_rate)
        self.origin_s = origin_s
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=self.sample_rate)
        self._frames = self._container.decode(stream)
        self._chunks: list[tuple[int, np.ndarray]] = []  # (first sample, (C, n)), in order
        self._cursor: int | None = None
        self._end = 0  # sample position up to which decoding has reached
        self._done = False
        self._path = path

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pull(self) -> None:
        try:
            frame = next(self._frames)
        except StopIteration:
            outs = self._resampler.resample(None)
            self._done = True
            fallback = None
        except av.error.FFmpegError as err:
            raise MediaError(self._path, f"audio decode failed ({err})") from err
        else:
            outs = self._resampler.resample(frame)
            fallback = frame.time
        rate = self.sample_rate
        for out in outs:
            t = out.time if out.time is not None else fallback
            data = out.to_ndarray()
            if t is None:
                pos = self._cursor or 0
            else:
                pos = int(round((float(t) - self.origin_s) * rate))
            # Resampler timestamps drift by a sample; lay chunks end to end unless
            # the gap is real (> 1 ms), so a true gap stays silent.
            if self._cursor is not None and abs(pos - self._cursor) <= max(1, rate // 1000):
                pos = self._cursor
            self._cursor = pos + data.shape[1]
            self._end = max(self._end, self._cursor)
            if self._cursor > 0:
                self._chunks.append((pos, data))

    def read(self, start_s: float, end_s: float) -> np.ndarray:
        rate = self.sample_rate
        a = int(round(start_s * rate))
        b = int(round(end_s * rate))
        while not self._done and self._end < b:
            self._pull()
        out = np.zeros((self.channels, max(b - a, 0)), np.float32)
        for pos, data in self._chunks:
            lo, hi = max(pos, a), min(pos + data.shape[1], b)
            if hi > lo:
                out[:, lo - a : hi - a] = data[:, lo - pos : hi - pos]
        return out

    def release(self, before_s: float) -> None:
        cut = int(round(before_s * self.sample_rate))
        self._chunks = [(p, d) for p, d in self._chunks if p + d.shape[1] > cut]


class Mp4Writer:
    """Streaming H.264 (+ optional AAC) encoder: frames and audio go in as they come,
    so a clip of any length costs one frame of memory (plus the encoder's)."""

    def __init__(
        self,
        uri: str,
        width: int,
        height: int,
        fps: float,
        sample_rate: int = 0,
        channels: int = 0,
        crf: int = 18,
        preset: str = "veryfast",
        audio_bitrate: int = 192_000,
        aac_coder: str | None = None,
    ):
        if height % 2 or width % 2:
            raise MediaError(
                uri, f"H.264 yuv420p needs even width and height, got {width}x{height}"
            )
        self.uri = uri
        self._output = storage.local_output(uri)
        path = self._output.__enter__()
        self._container = av.open(path, mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        self._video = self._container.add_stream("libx264", rate=rate)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": preset}
        self._video.codec_context.time_base = 1 / rate
        self._audio = None
        self._layout = {1: "mono", 2: "stereo"}.get(channels)
        if channels:
            if self._layout is None:
                raise MediaError(uri, f"audio must have 1 or 2 channels, got {channels}")
            self._audio = self._container.add_stream(
                "aac", rate=int(sample_rate), layout=self._layout
            )
            self._audio.bit_rate = audio_bitrate
            if aac_coder is not None:
                self._audio.options = {"aac_coder": aac_coder}
        self.sample_rate = sample_rate
        self.frames = 0
        self._samples = 0
        self._pending = np.zeros((max(channels, 1), 0), np.float32)

    def add_frame(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        frame.time_base = self._video.codec_context.time_base
        self._container.mux(self._video.encode(frame))
        self.frames += 1

    def add_audio(self, audio: np.ndarray, final: bool = False) -> None:
        """``(C, N)`` float32; sent in 1024-sample frames (AAC's own frame size)."""
        if self._audio is None:
            return
        data = np.concatenate([self._pending, np.clip(audio, -1.0, 1.0).astype(np.float32)], 1)
        chunk = 1024
        full = data.shape[1] if final else data.shape[1] // chunk * chunk
        for start in range(0, full, chunk):
            part = np.ascontiguousarray(data[:, start : min(start + chunk, full)])
            frame = av.AudioFrame.from_ndarray(part, format="fltp", layout=self._layout)
            frame.sample_rate = self.sample_rate
            frame.pts = self._samples
            frame.time_base = Fraction(1, self.sample_rate)
            self._samples += part.shape[1]
            self._container.mux(self._audio.encode(frame))
        self._pending = data[:, full:]

    def close(self) -> None:
        """Flush and move the file to ``uri`` (atomically)."""
        if self.frames == 0:
            self.abort()
            raise MediaError(self.uri, "cannot encode a clip with no frames")
        self._container.mux(self._video.encode(None))
        if self._audio is not None:
            self.add_audio(np.zeros((self._pending.shape[0], 0), np.float32), final=True)
            self._container.mux(self._audio.encode(None))
        self._container.close()
        self._output.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()
        with contextlib.suppress(Exception):
            self._output.__exit__(RuntimeError, RuntimeError("aborted"), None)


# Codecs an MP4 clip can carry as they are (stream copy); others are re-encoded.
COPYABLE_VIDEO_CODECS = ("h264", "hevc")
COPYABLE_AUDIO_CODECS = ("aac", "mp3")
AUDIO_PREROLL_S = 0.05


@dataclass
class CopiedSpan:
    start_s: float  # relative to the source's first frame
    end_s: float
    frames: int


def copy_span(
    path: str,
    uri: str,
    start_s: float,
    end_s: float,
    fps: float,
    origin_s: float = 0.0,
    audio_stream: int | None = None,
) -> CopiedSpan:
    """Cut ``[start_s, end_s)`` into an MP4 at ``uri`` without re-encoding.

    ``start_s`` must be a keyframe's time. The end is pulled back to the last frame
    whose picture does not depend on a frame past the cut (B-frames reference the
    next anchor), so every copied frame decodes; the span really written is
    returned. Audio packets starting inside the span are copied along, their times
    kept relative to the video, so the clip stays in sync.
    """
    eps = 0.5 / fps
    with _open_input(path, path) as src:
        video = src.streams.video[0]
        audio = None
        if audio_stream is not None and audio_stream >= 0 and src.streams.audio:
            audio = src.streams.audio[audio_stream]
        tb = video.time_base
        t0 = origin_s + start_s
        t1 = origin_s + end_s
        src.seek(max(0, int((t0 - eps) / tb)), stream=video, backward=True)
        packets: list[av.Packet] = []  # video, decode order, from the start keyframe
        audio_packets: list[av.Packet] = []
        started = False
        streams = [video] + ([audio] if audio is not None else [])
        for packet in src.demux(*streams):
            if packet.pts is None:
                continue
            t = float(packet.pts * packet.time_base)
            if packet.stream is video:
                if not started:
                    if packet.is_keyframe and abs(t - t0) <= eps:
                        started = True
                    elif t > t0 + eps and packet.is_keyframe:
                        raise MediaError(uri, f"no keyframe at {start_s:.3f} s to copy from")
                    else:
                        continue
                if packet.dts is not None and float(packet.dts * tb) >= t1 + 2.0:
                    break
                packets.append(packet)
            elif t0 - AUDIO_PREROLL_S <= t < t1:
                # Packets from just before the cut too: AAC decodes a frame with the
                # previous one's overlap, and the muxer's edit list hides the extra.
                audio_packets.append(packet)
            if audio is None and packets and float(packets[-1].pts * tb) >= t1 + 2.0:
                break
        if not packets:
            raise MediaError(uri, f"no keyframe at {start_s:.3f} s to copy from")
        # The longest decode-order prefix whose pictures are exactly the frames before
        # some time: every picture in it is decodable and none is past the cut.
        times = [float(p.pts * tb) for p in packets]
        later_min = [math.inf] * (len(times) + 1)  # min presentation time after i
        for i in range(len(times) - 1, -1, -1):
            later_min[i] = min(times[i], later_min[i + 1])
        keep = 0
        seen_max = -math.inf
        for i, t in enumerate(times):
            if t >= t1 - eps:
                # Past the cut: pictures after it in decode order may reference it.
                break
            seen_max = max(seen_max, t)
            if later_min[i + 1] > seen_max:
                keep = i + 1
        kept = packets[:keep]
        if not kept:
            raise MediaError(uri, "nothing to copy between the cut points")
        last_t = max(float(p.pts * tb) for p in kept)
        real_end = last_t + 1.0 / fps
        with storage.local_output(uri) as out_path:
            with av.open(out_path, mode="w", format="mp4") as out:
                ov = out.add_stream_from_template(video)
                oa = out.add_stream_from_template(audio) if audio is not None else None
                base_v = packets[0].pts
                for packet in kept:
                    packet.pts -= base_v
                    packet.dts = (packet.dts - base_v) if packet.dts is not None else None
                    packet.stream = ov
                    out.mux(packet)
                if oa is not None:
                    atb = audio.time_base
                    base_a = int(round(t0 / atb))
                    for packet in audio_packets:
                        if float(packet.pts * atb) >= last_t + 1.0 / fps:
                            break
                        packet.pts -= base_a
                        packet.dts = (packet.dts - base_a) if packet.dts is not None else None
                        packet.stream = oa
                        out.mux(packet)
    return CopiedSpan(start_s, real_end - origin_s, len(kept))
