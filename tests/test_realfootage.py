"""Curation on real-format footage made here with ffmpeg and espeak-ng, not by ``duet synth``.

A corpus of the kinds of files a new user brings (speech over test patterns with hard
cuts and fades, a rotated variable-frame-rate phone clip in .mov, PAL 704x576
anamorphic in .mkv, video-only .webm, two audio tracks, 5.1 audio, a delayed start
with a timestamp gap) is curated with the default settings. Every file must give
clips, each kind handled as real footage needs (upright, square pixels, constant
rate, the right audio track, in sync), and nothing may go unaccounted for.

Footage is small and short (low resolutions, ultrafast encodes) and built once per
session; the long 1080p source for the memory bound is built only by the slow test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from core import media
from core.synth import render_shot
from curation.pipeline import CurateConfig, SourcePipeline

FPS = 25
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="session")  # before the session corpora are made
def _system_tools():
    """ffmpeg and espeak-ng are installed by make (infra/local/install_system_deps.sh):
    a missing one fails these tests, it does not skip them."""
    missing = [tool for tool in ("ffmpeg", "espeak-ng") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: run infra/local/install_system_deps.sh"
        )


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-nostdin", *args], check=True)


def speech_wav(path: str, text: str) -> str:
    subprocess.run(["espeak-ng", "-s", "150", "-w", path, text], check=True)
    return path


SENTENCES = (
    "The camera follows the red car down the empty street at dawn.",
    "A woman opens the door and calls her brother inside for dinner.",
    "Rain falls on the river while the boats wait by the bridge.",
)


def shots_with_cuts(path: str, work: str, size: str = "640x360", seconds: float = 3.0) -> str:
    """Three shots (test patterns) cut hard at 3 s and 6 s, espeak speech under them,
    H.264 veryfast (the encoder puts keyframes at the cuts, as real encoders do)."""
    wav = speech_wav(os.path.join(work, "talk.wav"), " ".join(SENTENCES))
    sources = [
        f"testsrc2=s={size}:r={FPS}",
        f"smptehdbars=s={size}:r={FPS}",
        f"rgbtestsrc=s={size}:r={FPS}",
    ]
    inputs = []
    for src in sources:
        inputs += ["-f", "lavfi", "-t", str(seconds), "-i", src]
    total = 3 * seconds
    ffmpeg(
        *inputs,
        "-i", wav,
        "-filter_complex",
        # Motion on every shot: a moving box, so no shot is "frozen".
        "[0][1][2]concat=n=3:v=1:a=0,drawbox=x='mod(t*120,500)':y=40:w=60:h=60:c=yellow:t=fill[v];"
        f"[3]apad,atrim=0:{total}[a]",
        "-map", "[v]", "-map", "[a]",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "30", "-c:a", "aac", "-b:a", "64k",
        path,
    )  # fmt: skip
    return path


def fades_and_cuts(path: str) -> str:
    """Four 3 s shots: cut at 3 s, fade out/in through black (0.5 s + 0.5 s) centred
    at 6 s, cut at 9 s; in .mkv with a tone. Truth: cuts at frames 75 and 225, a
    fade whose dark middle is at frame 150."""
    parts = []
    filters = []
    srcs = ["testsrc2", "smptebars", "testsrc", "rgbtestsrc"]
    for i, src in enumerate(srcs):
        parts += ["-f", "lavfi", "-t", "3", "-i", f"{src}=s=320x180:r={FPS}"]
        chain = f"[{i}]drawbox=x='mod(t*90,260)':y=20:w=40:h=40:c=white:t=fill"
        if i == 1:
            chain += ",fade=t=out:st=2.5:d=0.5"
        if i == 2:
            chain += ",fade=t=in:st=0:d=0.5"
        filters.append(chain + f"[v{i}]")
    graph = ";".join(filters) + ";[v0][v1][v2][v3]concat=n=4:v=1:a=0[v]"
    ffmpeg(
        *parts,
        "-f", "lavfi", "-t", "12", "-i", "sine=f=330:r=48000",
        "-filter_complex", graph, "-map", "[v]", "-map", "4:a",
        "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", path,
    )  # fmt: skip
    return path


def synth_av(path: str, kind: str = "collision", seed: int = 3, seconds: float = 4.0) -> str:
    """A synthetic-world shot whose picture and sound are in sync by construction,
    as an MP4 to be turned into the real formats below."""
    clip, _ = render_shot(kind, seed=seed, duration_s=seconds, fps=float(FPS))
    media.write_mp4(path, clip, crf=16, preset="ultrafast")
    return path


def rotated_vfr_phone(path: str, work: str) -> str:
    """A phone clip: landscape-coded 320x192 frames shown portrait (display matrix 90),
    variable frame rate (every 7th frame dropped, gaps kept), AAC, in .mov."""
    base = synth_av(os.path.join(work, "phone_src.mp4"))
    vfr = os.path.join(work, "phone_vfr.mov")
    ffmpeg(
        "-i", base, "-vf", "select='not(eq(mod(n,7),3))'", "-fps_mode", "vfr",
        "-c:v", "libx264", "-preset", "ultrafast", "-bf", "0", "-c:a", "copy", vfr,
    )  # fmt: skip
    with av.open(vfr) as src, av.open(path, "w", format="mov") as out:
        v_in, a_in = src.streams.video[0], src.streams.audio[0]
        v_out = out.add_stream_from_template(v_in)
        a_out = out.add_stream_from_template(a_in)
        v_out.set_display_rotation(90)
        for packet in src.demux():
            if packet.dts is None:
                continue
            packet.stream = v_out if packet.stream.type == "video" else a_out
            out.mux(packet)
    return path


def pal_anamorphic(path: str) -> str:
    """PAL DVD geometry: 704x576 coded, 16:11 pixels (1024x576 shown), .mkv."""
    ffmpeg(
        "-f", "lavfi", "-t", "4", "-i", f"testsrc2=s=704x576:r={FPS}",
        "-f", "lavfi", "-t", "4", "-i", "anoisesrc=a=0.1:r=48000",
        "-vf", "setsar=16/11", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "32",
        "-c:a", "aac", path,
    )  # fmt: skip
    return path


def video_only_webm(path: str) -> str:
    ffmpeg(
        "-f", "lavfi", "-t", "4", "-i", f"testsrc2=s=320x240:r={FPS}",
        "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k", path,
    )  # fmt: skip
    return path


def two_audio_tracks(path: str, work: str) -> str:
    """Track 1 is near-silent commentary, track 2 (the default) the programme sound."""
    wav = speech_wav(os.path.join(work, "second.wav"), SENTENCES[1])
    ffmpeg(
        "-f", "lavfi", "-t", "4", "-i", f"testsrc=s=320x180:r={FPS}",
        "-f", "lavfi", "-t", "4", "-i", "anoisesrc=a=0.0005:r=22050",
        "-i", wav,
        "-map", "0:v", "-map", "1:a", "-map", "2:a",
        "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
        "-disposition:a:0", "0", "-disposition:a:1", "default", "-t", "4", path,
    )  # fmt: skip
    return path


def surround(path: str) -> str:
    ffmpeg(
        "-f", "lavfi", "-t", "4", "-i", f"testsrc2=s=320x180:r={FPS}",
        "-f", "lavfi", "-t", "4", "-i", "sine=f=440:r=48000",
        "-filter_complex", "[1]pan=5.1|FL=c0|FR=c0|FC=c0|LFE=c0|BL=c0|BR=c0[a]",
        "-map", "0:v", "-map", "[a]", "-c:v", "libx264", "-preset", "ultrafast",
        "-c:a", "aac", path,
    )  # fmt: skip
    return path


def delayed_with_gap(path: str, work: str) -> str:
    """Video starts 2 s into the container clock and the audio 0.5 s after it (the
    audio's content still lines up with the picture); 1 s of timestamps missing in
    both at 2 s (a recorder paused)."""
    base = synth_av(os.path.join(work, "delay_src.mp4"), seed=5, seconds=5.0)
    gapped = os.path.join(work, "gapped.mkv")
    ffmpeg(
        "-i", base,
        "-vf", "setpts='PTS+gte(T,2)/TB'", "-af", "asetpts='PTS+gte(T,2)*SR'",
        "-c:v", "libx264", "-preset", "ultrafast", "-bf", "0", "-fps_mode", "passthrough",
        "-c:a", "aac", gapped,
    )  # fmt: skip
    late_audio = os.path.join(work, "late_audio.mka")
    ffmpeg("-ss", "0.5", "-i", gapped, "-vn", "-c:a", "aac", late_audio)
    ffmpeg(
        "-itsoffset", "2.0", "-i", gapped, "-itsoffset", "2.5", "-i", late_audio,
        "-map", "0:v", "-map", "1:a", "-c", "copy", path,
    )  # fmt: skip
    return path


def broken(path: str) -> str:
    with open(path, "wb") as fh:
        fh.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    return path


@pytest.fixture(scope="session")
def real_corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("real_raw")
    work = str(tmp_path_factory.mktemp("real_work"))
    r = str(root)
    return {
        "speech_cuts": shots_with_cuts(os.path.join(r, "speech_cuts.mp4"), work),
        "fades": fades_and_cuts(os.path.join(r, "fades.mkv")),
        "phone": rotated_vfr_phone(os.path.join(r, "phone.mov"), work),
        "pal": pal_anamorphic(os.path.join(r, "pal.mkv")),
        "video_only": video_only_webm(os.path.join(r, "video_only.webm")),
        "two_audio": two_audio_tracks(os.path.join(r, "two_audio.mkv"), work),
        "surround": surround(os.path.join(r, "surround.mov")),
        "delayed_gap": delayed_with_gap(os.path.join(r, "delayed_gap.mkv"), work),
    }


@pytest.fixture(scope="session")
def curated(real_corpus, tmp_path_factory) -> dict[str, object]:
    out = str(tmp_path_factory.mktemp("real_out"))
    pipeline = SourcePipeline(CurateConfig())
    return {kind: pipeline(path, out) for kind, path in real_corpus.items()}


def test_every_real_format_curates_with_default_settings(curated):
    for kind, result in curated.items():
        assert result.quarantine is None, (kind, result.quarantine)
        assert result.clips, kind
        for clip in result.clip_records():
            assert os.path.exists(clip.uri), kind
            assert clip.caption_verdict == "caption_missing", kind  # no sidecar, no model
            info = media.probe_media(clip.uri)
            assert (info.width, info.height) == (clip.width, clip.height), kind
            assert abs(info.duration_s - clip.duration_s) < 0.1, (kind, info.duration_s)


def test_speech_cuts_are_stream_copied_at_the_encoders_keyframes(curated, real_corpus):
    result = curated["speech_cuts"]
    clips = result.clip_records()
    assert [s["start_frame"] for s in result.shots] == [0, 75, 150]
    assert len(clips) == 3 and all(c.copy_mode == "stream_copy" for c in clips)
    source, _ = media.read_video(real_corpus["speech_cuts"])
    for clip in clips:
        back = media.read_clip(clip.uri)
        assert back.num_frames == clip.end_frame - clip.start_frame
        # Copied packets decode to the source's own pictures, bit for bit.
        assert np.array_equal(back.frames, source[clip.start_frame : clip.end_frame])
        assert clip.has_audio and clip.verdicts["loud_enough"]


def test_shots_within_one_frame_of_cuts_and_inside_fades(curated):
    starts = [(s["start_frame"], s["transition_in"]) for s in curated["fades"].shots]
    assert len(starts) == 4, starts
    (c1, k1), (f, k2), (c2, k3) = starts[1:]
    assert abs(c1 - 75) <= 1 and k1 == "cut"
    assert 150 - 13 <= f <= 150 + 13 and k2 == "fade"  # inside the 1 s fade
    assert abs(c2 - 225) <= 1 and k3 == "cut"
    # No clip holds a dark fade frame.
    for clip in curated["fades"].clip_records():
        assert not (clip.start_frame < 150 < clip.end_frame)


def test_rotated_vfr_phone_clip_is_upright_constant_rate_and_in_sync(curated, real_corpus):
    result = curated["phone"]
    src = result.source
    assert src["rotation"] == 90 and src["variable_frame_rate"]
    assert (src["display_width"], src["display_height"]) == (192, 320)
    for clip in result.clip_records():
        assert (clip.width, clip.height) == (192, 320) and clip.copy_mode == "reencode"
        back = media.read_clip(clip.uri)
        assert back.frames.shape[1:3] == (320, 192)
        with av.open(clip.uri) as c:
            stamps = [
                float(p.pts * p.time_base) for p in c.demux(c.streams.video[0]) if p.pts is not None
            ]
        steps = np.diff(np.sort(stamps))
        # Constant, at the phone's nominal rate (not the average its drops make).
        assert np.allclose(steps, 1 / FPS, atol=1e-3) and clip.fps == FPS
    # The same upright picture FFmpeg's own autorotation shows.
    shown = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", real_corpus["phone"], "-frames:v", "1",
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    reference = np.frombuffer(shown, np.uint8).reshape(320, 192, 3).astype(int)
    first = next(media.iter_display_frames(real_corpus["phone"], FPS, src["start_s"]))
    assert np.abs(first.image.astype(int) - reference).mean() < 2.0
    original, _ = render_shot("collision", seed=3, duration_s=4.0, fps=float(FPS))
    _assert_follows_original(result, original, rotate=90)


def test_pal_anamorphic_clip_has_square_pixels(curated):
    result = curated["pal"]
    assert abs(result.source["sample_aspect_ratio"] - 16 / 11) < 1e-6
    for clip in result.clip_records():
        assert (clip.width, clip.height) == (1024, 576)
        assert media.read_clip(clip.uri).frames.shape[1:3] == (576, 1024)


def test_video_only_source_gives_video_only_clips(curated):
    result = curated["video_only"]
    assert result.status == "curated"
    for clip in result.clip_records():
        assert not clip.has_audio
        assert clip.verdicts["loud_enough"] is None and clip.verdicts["av_sync_ok"] is None
        assert clip.sync_verdict == "no_audio"
        assert not media.probe_media(clip.uri).has_audio
    assert any(c.keep for c in result.clip_records())


def test_default_audio_track_and_downmix(curated):
    (clip, *_) = curated["two_audio"].clip_records()
    assert curated["two_audio"].source["audio_streams"] == 2
    assert curated["two_audio"].source["audio_stream"] == 1  # the default, not the first
    assert clip.scores["loudness_dbfs"] > -40  # the speech, not the near-silent track
    for clip in curated["surround"].clip_records():
        assert media.probe_media(clip.uri).audio_channels == 2  # the file, not just the reader
        assert media.read_clip(clip.uri).audio.shape[0] == 2


def test_delayed_start_and_gap_keep_sync(curated):
    result = curated["delayed_gap"]
    assert abs(result.source["start_s"] - 2.0) < 0.05
    # 5 s of content plus the 1 s pause, on a constant grid from the first frame.
    assert abs(result.media_seconds - 6.0) < 0.1
    original, _ = render_shot("collision", seed=5, duration_s=5.0, fps=float(FPS))
    _assert_follows_original(result, original, lambda t: t if t < 2 else (None if t < 3 else t - 1))


def _assert_follows_original(result, original, time_map=lambda t: t, rotate: int = 0) -> None:
    """Each written clip shows, at every frame, the original picture of that moment
    (within one frame), and plays the original sound of that moment (within one
    frame): the format handling kept picture and sound where they belong.

    ``time_map``: clip-source time -> time in ``original`` (None inside a gap).
    """
    fps = original.fps
    rate = original.sample_rate
    ref_luma = original.frames.mean(axis=3)
    if rotate:
        ref_luma = np.rot90(ref_luma, k=rotate // 90, axes=(1, 2))
    ref_audio = original.audio.mean(axis=0)
    checked = 0
    for clip in result.clip_records():
        back = media.read_clip(clip.uri)
        luma = back.frames.mean(axis=3)
        for j in range(0, back.num_frames, 5):
            t = time_map((clip.start_frame + j) / clip.fps)
            if t is None:
                continue
            k = int(round(t * fps))
            near = range(max(0, k - 3), min(len(ref_luma), k + 4))
            err = [np.abs(ref_luma[i] - luma[j]).mean() for i in near]
            best = list(near)[int(np.argmin(err))]
            assert abs(best - k) <= 1, (clip.clip_id, j, best, k)  # a dropped frame repeats
        # The clip's sound against the original's, over the clip's middle second.
        mid = clip.duration_s / 2
        t = time_map(clip.start_s + mid)
        if t is None:
            continue
        a = int(mid * back.sample_rate)
        x = back.audio.mean(axis=0)[a : a + rate // 2]
        r0 = int(round(t * rate))
        lags = range(-rate // 10, rate // 10, 8)
        errs = [np.abs(x - ref_audio[r0 + lag : r0 + lag + x.size]).mean() for lag in lags]
        lag = list(lags)[int(np.argmin(errs))]
        assert abs(lag) < rate / fps, (clip.clip_id, lag)
        checked += 1
    assert checked


# Peak resident memory of a process curating one source, whatever its duration: the
# libraries (PyAV, OpenCV, PySceneDetect, NumPy) plus one analysis window. Whole-source
# decoding needed 7.5 GB for the 2-minute source below (1200 frames x 6 MB).
MEMORY_BOUND_MB = 600


def long_1080p(path: str, seconds: int) -> str:
    """1080p at 10 fps (cheap to make and decode, same frame size as real 1080p),
    a new shot every 20 s (longer than a clip: split while streaming), low bitrate."""
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=s=320x180:r=10", "-f", "lavfi", "-i", "sine=f=300:r=22050",
        "-filter_complex", "[0]hue=h='floor(t/20)*70',scale=1920:1080:flags=neighbor[v]",
        "-map", "[v]", "-map", "1:a", "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast",
        "-crf", "40", "-g", "50", "-c:a", "aac", "-b:a", "32k", path,
    )  # fmt: skip
    return path


def _curate_in_a_fresh_process(path: str, out: str) -> dict:
    code = (
        "import json, sys\n"
        "from curation.pipeline import CurateConfig, SourcePipeline\n"
        "r = SourcePipeline(CurateConfig())(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'rss': r.peak_rss_mb, 'clips': len(r.clips), 'q': r.quarantine,"
        " 'media': r.media_seconds}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, path, out],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_per_source_is_bounded_independent_of_duration(tmp_path):
    short = _curate_in_a_fresh_process(long_1080p(str(tmp_path / "s.mp4"), 20), str(tmp_path / "o"))
    long = _curate_in_a_fresh_process(long_1080p(str(tmp_path / "l.mp4"), 120), str(tmp_path / "o"))
    print(f"peak RSS: 20 s 1080p {short['rss']:.0f} MB, 120 s 1080p {long['rss']:.0f} MB")
    assert short["q"] is None and long["q"] is None
    assert abs(long["media"] - 120) < 0.5 and long["clips"] >= 8
    assert long["rss"] < MEMORY_BOUND_MB
    # Six times the footage, (almost) the same memory.
    assert long["rss"] - short["rss"] < 60


PATTERNS = ("testsrc2", "smptehdbars", "rgbtestsrc", "testsrc", "yuvtestsrc", "pal100bars")


def cut_and_fade_footage(path: str, seed: int) -> list[tuple[int, str]]:
    """Six shots of 2-5 s (test patterns under one moving box, so the box does not
    change at a boundary: only the scene does), hard cuts and one fade through
    black; returns the true boundaries (frame, kind), a fade at its dark middle."""
    import random

    rng = random.Random(seed)
    lengths = [round(rng.uniform(2.0, 5.0) * FPS) for _ in range(6)]
    fade_at = rng.randrange(1, 6)  # the boundary before shot ``fade_at`` is a fade
    inputs, chains, truth, start = [], [], [], 0
    for i, n in enumerate(lengths):
        pattern = PATTERNS[(seed + i) % len(PATTERNS)]
        inputs += ["-f", "lavfi", "-i", f"{pattern}=s=320x180:r={FPS}:d={n / FPS}"]
        chain = f"[{i}]setpts=PTS-STARTPTS"
        if i == fade_at - 1:
            chain += f",fade=t=out:st={n / FPS - 0.4}:d=0.4"
        if i == fade_at:
            chain += ",fade=t=in:st=0:d=0.4"
        chains.append(chain + f"[s{i}]")
        if i:
            truth.append((start, "fade" if i == fade_at else "cut"))
        start += n
    graph = (
        ";".join(chains)
        + ";"
        + "".join(f"[s{i}]" for i in range(6))
        + "concat=n=6:v=1:a=0,drawbox=x='mod(t*100,260)':y=60:w=40:h=40:c=white:t=fill[v]"
    )
    ffmpeg(*inputs, "-filter_complex", graph, "-map", "[v]", "-c:v", "libx264",
           "-preset", "veryfast", "-crf", "28", path)  # fmt: skip
    return truth


@pytest.mark.slow
def test_shot_detection_precision_and_recall_on_real_footage(tmp_path):
    """Cuts count when found within 1 frame, fades when found inside the fade."""
    tp = fp = fn = 0
    for seed in range(4):
        path = str(tmp_path / f"shots_{seed}.mp4")
        truth = cut_and_fade_footage(path, seed)
        result = SourcePipeline(CurateConfig())(path, str(tmp_path / "out"))
        assert result.quarantine is None
        found = [(s["start_frame"], s["transition_in"]) for s in result.shots[1:]]
        unmatched = list(truth)
        for frame, kind in found:
            tolerance = {"cut": 1, "fade": int(0.4 * FPS) + 1}
            match = [t for t in unmatched if t[1] == kind and abs(t[0] - frame) <= tolerance[kind]]
            if match:
                unmatched.remove(match[0])
                tp += 1
            else:
                fp += 1
        fn += len(unmatched)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    print(
        f"shots on real footage: precision {precision:.3f} recall {recall:.3f} (tp {tp}, fp {fp}, fn {fn})"
    )
    assert tp + fn == 20
    assert precision >= 0.95 and recall >= 0.95
