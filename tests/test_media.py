"""Media I/O: MP4 round trips keep frames, duration and AV alignment; bad files fail clearly."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from core import media, storage

FPS = 24.0
SR = 48_000


def _flash_clip(num_frames: int = 72, flashes=(12, 30, 55), width=128, height=96) -> media.AVClip:
    """Black frames with white flashes; a click starts exactly at each flash."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, None, :]
    audio = np.zeros((2, int(round(num_frames / FPS * SR))), np.float32)
    for f in flashes:
        frames[f] = 255
        n = int(round(f / FPS * SR))
        audio[0, n : n + 240] = 0.7
        audio[1, n : n + 240] = -0.5  # distinct channels: stereo must survive
    return media.AVClip(frames=frames, fps=FPS, audio=audio, sample_rate=SR)


def _flash_frames(frames: np.ndarray) -> list[int]:
    return [int(i) for i in np.where(frames.mean(axis=(1, 2, 3)) > 200)[0]]


def _click_frames(audio: np.ndarray, rate: int) -> list[float]:
    env = np.abs(audio[0])
    above = np.where(env > 0.3)[0]
    starts = above[np.insert(np.diff(above) > rate // 100, 0, True)]
    return [s / rate * FPS for s in starts]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_mp4_round_trip_keeps_frames_duration_and_sync(tmp_path, request, where):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(root, "clip.mp4")
    clip = _flash_clip()
    media.write_mp4(uri, clip)

    info = media.probe_media(uri)
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (128, 96)
    assert info.fps == pytest.approx(FPS)
    assert info.frame_count == 72
    assert info.duration_s == pytest.approx(3.0, abs=1 / FPS)
    assert info.audio_channels == 2 and info.audio_rate == SR
    assert not info.variable_frame_rate

    back = media.read_clip(uri)
    assert back.frames.shape == clip.frames.shape
    assert back.audio.shape == clip.audio.shape
    # Lossy codecs: the picture is close, not equal.
    assert np.abs(back.frames.astype(int) - clip.frames.astype(int)).mean() < 3.0
    assert _flash_frames(back.frames) == [12, 30, 55]
    clicks = _click_frames(back.audio, back.sample_rate)
    assert len(clicks) == 3
    for visual, audio_at in zip([12, 30, 55], clicks, strict=True):
        assert abs(visual - audio_at) <= 1.0  # within one frame
    assert back.audio[1].min() < -0.3  # the second channel kept its own signal


def test_frame_accurate_range_reads(tmp_path):
    uri = str(tmp_path / "clip.mp4")
    media.write_mp4(uri, _flash_clip())
    part = media.read_clip(uri, start_s=1.0, end_s=2.5)
    assert part.num_frames == 36
    # flashes 30 and 55 are frames 6 and 31 of a read starting at frame 24
    assert _flash_frames(part.frames) == [30 - 24, 55 - 24]
    clicks = _click_frames(part.audio, part.sample_rate)
    assert len(clicks) == 2 and abs(clicks[0] - 6) <= 1.0 and abs(clicks[1] - 31) <= 1.0
    assert part.audio.shape[1] == int(1.5 * SR)

    times = [t for t, _ in media.iter_video_frames(uri, start_s=2.0)]
    assert len(times) == 24 and times[0] == pytest.approx(2.0, abs=1e-3)


def test_decode_resized_and_resampled(tmp_path):
    uri = str(tmp_path / "clip.mp4")
    media.write_mp4(uri, _flash_clip())
    small = media.read_clip(uri, size=(64, 48), sample_rate=16_000)
    assert small.frames.shape == (72, 48, 64, 3)
    assert small.sample_rate == 16_000 and small.audio.shape == (2, 48_000)
    clicks = _click_frames(small.audio, 16_000)
    assert [round(c) for c in clicks] == [12, 30, 55]


def test_resample_audio_preserves_tone():
    t = np.arange(48_000) / 48_000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = media.resample_audio(tone, 48_000, 16_000)
    assert out.shape == (16_000,)
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) - 440) <= 1
    assert media.resample_audio(tone[None], 48_000, 48_000).shape == (1, 48_000)


def test_audio_less_file(tmp_path):
    uri = str(tmp_path / "silent.mp4")
    clip = _flash_clip()
    import av

    with av.open(uri, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for i, rgb in enumerate(clip.frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert not media.probe_media(uri).has_audio
    with pytest.raises(media.MediaError, match="no audio stream"):
        media.read_clip(uri)
    silent = media.read_clip(uri, require_audio=False)
    assert silent.num_frames == 72 and not silent.audio.any()


def _bad_files(tmp_path) -> dict[str, str]:
    good = str(tmp_path / "good.mp4")
    media.write_mp4(good, _flash_clip())
    data = open(good, "rb").read()
    files = {
        "zero-byte": b"",
        "truncated": data[: len(data) // 3],
        "non-media": b"This is a text file pretending to be a video.\n" * 50,
        "corrupt": data[:48]
        + bytes(np.random.default_rng(0).integers(0, 256, len(data) - 48, dtype=np.uint8)),
    }
    out = {}
    for name, payload in files.items():
        path = str(tmp_path / f"{name}.mp4")
        with open(path, "wb") as fh:
            fh.write(payload)
        out[name] = path
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "non-media", "corrupt"])
@pytest.mark.parametrize("reader", ["probe_media", "read_clip"])
def test_bad_inputs_raise_media_error(tmp_path, kind, reader):
    """Each entry point refuses bad bytes on its own (one call per ``pytest.raises``:
    with both in one block the second never ran)."""
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(media.MediaError) as info:
        getattr(media, reader)(path)
    assert path in str(info.value) and info.value.reason
    if kind == "zero-byte":
        assert "empty" in info.value.reason


def test_write_rejects_odd_size(tmp_path):
    clip = _flash_clip(width=127)
    with pytest.raises(media.MediaError, match="even width"):
        media.write_mp4(str(tmp_path / "odd.mp4"), clip)
    assert not (tmp_path / "odd.mp4").exists()


# ---------------------------------------------------------------- real-footage helpers


def _x264_bframes(path: str, seconds: int = 4) -> str:
    """25 fps, keyframe every 25 frames, B-frames (x264 veryfast), AAC: a web video."""
    import subprocess

    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s=192x108:r=25:d={seconds}",
         "-f", "lavfi", "-i", f"sine=f=500:r=48000:d={seconds}", "-c:v", "libx264",
         "-preset", "veryfast", "-g", "25", "-bf", "3", "-c:a", "aac", path],
        check=True,
    )  # fmt: skip
    return path


def test_copy_span_is_bit_exact_and_ends_before_dangling_b_frames(tmp_path):
    src = _x264_bframes(str(tmp_path / "src.mp4"))
    frames, _ = media.read_video(src)
    out = str(tmp_path / "cut.mp4")
    # From the keyframe at 1.0 s to a cut mid-GOP: B-frames near the end reference
    # a picture past the cut, so the copy may end a few frames early, never late.
    copied = media.copy_span(src, out, 1.0, 2.3, 25.0, audio_stream=0)
    assert copied.start_s == 1.0 and 2.3 - 4 / 25 <= copied.end_s <= 2.3 + 1e-6
    back = media.read_clip(out)
    assert back.num_frames == copied.frames == round((copied.end_s - 1.0) * 25)
    assert np.array_equal(back.frames, frames[25 : 25 + copied.frames])
    assert back.audio.shape[0] == 1 and np.abs(back.audio).max() > 0.1
    with pytest.raises(media.MediaError, match="no keyframe"):
        media.copy_span(src, str(tmp_path / "bad.mp4"), 1.2, 2.0, 25.0)


def test_display_frames_retime_variable_rate_to_a_constant_grid(tmp_path):
    import av

    path = str(tmp_path / "vfr.mp4")
    # Frames 0..23 at t = 0, 1, 3, 4, 6, 7, ... (1/24 s units: every third slot empty).
    times = [t for t in range(36) if t % 3 != 2]
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), "rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    shown = list(media.iter_display_frames(path, 24.0))
    # Every grid point up to the last frame (t = 34), in order.
    assert [f.index for f in shown] == list(range(35))
    # Each grid point shows the frame nearest in time (an empty slot repeats one).
    for f in shown:
        gap = min(abs(t - f.index) for t in times)
        nearest = [i for i, t in enumerate(times) if abs(t - f.index) == gap]  # ties: either
        assert min(abs(float(f.image.mean()) - i * 10) for i in nearest) < 3, (f.index, nearest)


def test_audio_reader_places_a_late_stream_and_forgets_what_is_released(tmp_path):
    import subprocess

    path = str(tmp_path / "late.mkv")
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=s=64x48:r=25:d=6",
         "-itsoffset", "1.5", "-f", "lavfi", "-i", "sine=f=500:r=16000:d=4",
         "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast",
         "-c:a", "pcm_s16le", path],
        check=True,
    )  # fmt: skip
    with media.AudioReader(path, origin_s=0.0) as reader:
        head = reader.read(0.0, 2.0)
        assert np.abs(head[:, : int(1.45 * 16000)]).max() == 0  # silent before it starts
        assert np.abs(head[:, int(1.55 * 16000) :]).max() > 0.1
        reader.release(2.0)
        held = sum(d.shape[1] for _, d in reader._chunks)
        reader.read(2.0, 5.0)
        reader.release(5.0)
        assert sum(d.shape[1] for _, d in reader._chunks) <= held + 16000  # bounded
        tail = reader.read(5.0, 6.0)
        assert np.abs(tail[:, : int(0.45 * 16000)]).max() > 0.1  # the tone ends at 5.5 s
        assert np.abs(tail[:, int(0.55 * 16000) :]).max() == 0


def test_display_size_applies_pixel_aspect_and_rotation():
    assert media.display_size(704, 576, 16 / 11, 0) == (1024, 576)
    assert media.display_size(1920, 1080, 1.0, 90) == (1080, 1920)
    assert media.display_size(720, 480, 32 / 27, 270) == (480, 854)
