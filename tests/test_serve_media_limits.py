"""Reference media bombs: a few kilobytes that declare a huge canvas, minutes of
frames, many channels or a huge sample rate, or that lie about their length, are
refused (413 naming the limit) before they are decoded, or stopped while they are.

Every bomb is made here (PyAV, Pillow, zlib), sent through the guard itself and
through the API (upload, file URI, http URI, V2V source, an ad brief's product
references), and the test counts what was decoded: ``core.media._open_input`` is
wrapped so every frame a container yields is counted, and Pillow's ``load`` (the
decode; ``Image.open`` reads only the header) is spied on.
"""

from __future__ import annotations

import collections
import http.server
import io
import re
import struct
import threading
import time
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from core import media
from serve.api import build_api
from serve.config import LimitsConfig, serve_config_from
from serve.guards import GuardError, probe_reference

KEY = "media-limits-key"
AUTH = {"X-API-Key": KEY}
FACTS = {"fps": 16.0, "resolutions": ["64x64"], "models": ["default"]}
# Small limits keep the bombs small and quick to make; the defaults are tried too.
LIMITS = {
    "max_upload_bytes": 2_000_000,
    "max_reference_seconds": 4.0,
    "max_reference_frames": 100,
    "max_reference_pixels": 256 * 256,
    "max_reference_side": 1024,
    "max_reference_image_frames": 10,
    "max_reference_audio_channels": 2,
    "max_reference_sample_rate": 48_000,
}
SMALL = LimitsConfig(**LIMITS)


# -- bombs ---------------------------------------------------------------------------


def png_canvas(width: int, height: int) -> bytes:
    """A valid one-colour 1-bit PNG of ``width x height``: a few KB of zlib that
    decode to width * height pixels (Pillow holds a byte each, RGB three)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def animated(fmt: str, frames: int) -> bytes:
    """An animated GIF/APNG of ``frames`` 8x8 frames (a moving dot: none merged)."""
    images = []
    for i in range(frames):
        im = Image.new("L", (8, 8), 0)
        im.putpixel((i % 8, i // 8 % 8), 255)
        images.append(im)
    buf = io.BytesIO()
    images[0].save(buf, format=fmt, save_all=True, append_images=images[1:])
    return buf.getvalue()


def video(fmt: str, frames: int, side: int, fps: int = 24, audio_s: float = 0.0) -> bytes:
    """``frames`` of black ``side x side`` H.264 in container ``fmt``, and AAC
    silence of ``audio_s`` seconds if asked."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        v = out.add_stream("libx264", rate=fps)
        v.width = v.height = side
        v.pix_fmt = "yuv420p"
        v.options = {"preset": "ultrafast"}
        a = out.add_stream("aac", rate=16000, layout="mono") if audio_s else None
        black = np.zeros((side, side, 3), np.uint8)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(black, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(v.encode(frame))
        out.mux(v.encode(None))
        if a is not None:
            n = int(audio_s * 16000)
            for start in range(0, n, 1024):
                chunk = np.zeros((1, min(1024, n - start)), np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 16000, start, Fraction(1, 16000)
                out.mux(a.encode(frame))
            out.mux(a.encode(None))
    return buf.getvalue()


def growing_h264(small: int, big_side: int) -> bytes:
    """A raw H.264 stream whose first ``small`` frames are 16x16 (what a probe sees)
    and whose last 3 are ``big_side`` square: two encoder runs back to back."""
    return video("h264", small, 16) + video("h264", 3, big_side)


def lying_mkv(frames: int) -> bytes:
    """Matroska whose Duration (segment info and the stream's tag) says 1 s while it
    holds ``frames`` frames at 24 fps."""
    data = bytearray(video("matroska", frames, 16))
    info = data.index(b"\x15\x49\xa9\x66")  # the Info element
    # Its Duration (ID 0x4489, size 4 or 8; in TimestampScale units, 1 ms). The ID with
    # its size byte: the random SegmentUID before it can hold the two ID bytes alone.
    at = re.compile(rb"\x44\x89[\x84\x88]").search(data, info).start()
    if data[at + 2] == 0x88:
        data[at + 3 : at + 11] = struct.pack(">d", 1000.0)
    else:
        assert data[at + 2] == 0x84, data[at : at + 8].hex()
        data[at + 3 : at + 7] = struct.pack(">f", 1000.0)
    out = re.sub(rb"\d\d:\d\d:\d\d\.\d{9}", b"00:00:01.000000000", bytes(data))
    return out


def flac(seconds: float, lie_s: float | None = None) -> bytes:
    """FLAC stereo silence at 48 kHz (a few bytes a block); ``lie_s``: STREAMINFO's
    total-samples field rewritten to say that many seconds."""
    buf = io.BytesIO()
    rate, block = 48000, 4608
    with av.open(buf, "w", format="flac") as out:
        s = out.add_stream("flac", rate=rate, layout="stereo")
        silence = np.zeros((2, block), np.int16)
        for i in range(int(seconds * rate / block)):
            frame = av.AudioFrame.from_ndarray(silence, format="s16p", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, i * block, Fraction(1, rate)
            out.mux(s.encode(frame))
        out.mux(s.encode(None))
    data = bytearray(buf.getvalue())
    if lie_s is not None:
        assert data[:4] == b"fLaC"
        at = 8 + 10  # "fLaC", the block header, then min/max block and frame sizes
        bits = int.from_bytes(data[at : at + 8], "big")
        bits = (bits & ~((1 << 36) - 1)) | int(lie_s * rate)  # total samples: low 36 bits
        data[at : at + 8] = bits.to_bytes(8, "big")
    return bytes(data)


def wav(channels: int, rate: int, seconds: float) -> bytes:
    """PCM WAV whose header declares ``channels`` and ``rate``."""
    body = np.zeros((int(rate * seconds), channels), np.int16).tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return (
        b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
        + b"data" + struct.pack("<I", len(body)) + body
    )  # fmt: skip


# -- counting what is decoded -----------------------------------------------------------


class _CountingContainer:
    def __init__(self, container, counts):
        self._container, self._counts = container, counts

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._counts["audio" if isinstance(frame, av.AudioFrame) else "video"] += 1
            yield frame


@pytest.fixture
def decoded(monkeypatch):
    """Frames decoded through core.media (video, audio) and images decoded by Pillow."""
    counts: collections.Counter = collections.Counter()
    opener = media._open_input
    monkeypatch.setattr(
        media, "_open_input", lambda uri, path: _CountingContainer(opener(uri, path), counts)
    )
    load = ImageFile.ImageFile.load

    def counting_load(self):
        counts["image"] += 1
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return counts


def _refused(data: bytes, kind: str, limits: LimitsConfig, limit: str) -> str:
    with pytest.raises(GuardError) as err:
        probe_reference(data, kind, limits, "bomb")
    assert err.value.status == 413, err.value.message
    assert f"over the limit {limit} = {getattr(limits, limit)}" in err.value.message
    return err.value.message


# -- the guard: images -------------------------------------------------------------------


def test_a_png_canvas_bomb_is_refused_from_its_header(decoded):
    bomb = png_canvas(8000, 8000)  # 64 M pixels; under Pillow's own ceiling
    assert len(bomb) < 20_000
    _refused(bomb, "images", LimitsConfig(), "max_reference_pixels")
    assert decoded["image"] == 0


def test_a_canvas_past_pillows_own_ceiling_is_still_a_413(decoded):
    # 20000 x 20000 = 400 M pixels: Pillow itself refuses it inside Image.open.
    _refused(png_canvas(20000, 20000), "images", LimitsConfig(), "max_reference_pixels")
    assert decoded["image"] == 0


def test_a_long_thin_image_is_refused_by_its_side(decoded):
    _refused(png_canvas(4000, 2), "images", SMALL, "max_reference_side")
    assert decoded["image"] == 0


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animated_images_are_refused_by_frame_count(decoded, fmt):
    _refused(animated(fmt, 40), "images", SMALL, "max_reference_image_frames")
    assert decoded["image"] == 0
    assert probe_reference(animated(fmt, 5), "images", SMALL).shape == (8, 8, 3)


def test_an_image_within_the_limits_is_decoded(decoded):
    assert probe_reference(png((64, 48)), "images", SMALL).shape == (48, 64, 3)
    assert decoded["image"] >= 1  # the decode the header checks gate


# -- the guard: video --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_minutes_raw():
    """Ten minutes of 16x16 black at 8 fps as a raw H.264 stream: no header states a
    length."""
    return video("h264", 8 * 600, 16, fps=8)


def test_ten_minutes_with_no_stated_length_is_counted_and_refused(decoded, ten_minutes_raw):
    assert len(ten_minutes_raw) < 200_000
    t0 = time.perf_counter()
    _refused(ten_minutes_raw, "videos", LimitsConfig(), "max_reference_seconds")
    elapsed = time.perf_counter() - t0
    assert decoded["video"] == 0  # counted by packets, not decoded
    assert elapsed < 2.0, elapsed


def test_a_long_tiny_video_is_refused_from_its_header(decoded):
    message = _refused(video("mp4", 240, 16), "videos", SMALL, "max_reference_frames")
    assert "header declares 240 frames" in message
    assert decoded["video"] == 0


def test_a_header_that_understates_the_length_is_caught_by_counting(decoded, tmp_path):
    liar = lying_mkv(600)  # 25 s of frames; its header says 1 s
    (tmp_path / "liar.mkv").write_bytes(liar)
    info = media.probe_media(str(tmp_path / "liar.mkv"), check_frame_rate=False)
    assert info.duration_s == pytest.approx(1.0) and info.frame_count <= 24
    message = _refused(liar, "videos", SMALL, "max_reference_frames")
    assert "holds more than 100 video frames" in message
    assert decoded["video"] == 0


def test_too_many_pixels_or_too_long_a_side_in_the_header(decoded):
    _refused(video("mp4", 2, 512), "videos", SMALL, "max_reference_pixels")
    wide_ok = LimitsConfig(**{**LIMITS, "max_reference_pixels": 2048 * 2048})
    _refused(video("mp4", 2, 1040), "videos", wide_ok, "max_reference_side")
    assert decoded["video"] == 0


def test_a_video_within_the_limits_passes(decoded):
    info = probe_reference(video("mp4", 48, 64, audio_s=2.0), "videos", SMALL)
    assert info.has_video and info.has_audio and info.frame_count == 48
    assert decoded["video"] == 0 and decoded["audio"] > 0  # its audio was decoded, bounded


def test_decoding_stops_at_the_first_frame_past_the_limits(decoded, tmp_path):
    """What the model replica does with a stored reference: a stream that grows from
    16x16 to 1024x1024 after its probe, and a header that lies, stop mid-decode."""
    from serve.guards import read_reference_video

    path = tmp_path / "grow.h264"
    path.write_bytes(growing_h264(40, 1024))
    assert (media.probe_media(str(path), check_frame_rate=False).width) == 16
    probe_reference(path.read_bytes(), "videos", SMALL)  # header and packets look fine
    decoded.clear()
    with pytest.raises(GuardError) as err:
        read_reference_video(str(path), SMALL, (64, 64))
    assert err.value.status == 413 and "max_reference_pixels" in err.value.message
    assert decoded["video"] == 41  # the small frames and the first big one, no more

    liar = tmp_path / "liar.mkv"
    liar.write_bytes(lying_mkv(600))
    decoded.clear()
    with pytest.raises(GuardError) as err:
        read_reference_video(str(liar), SMALL, (64, 64))
    assert "max_reference_frames" in err.value.message
    assert decoded["video"] == SMALL.max_reference_frames + 1


# -- the guard: audio --------------------------------------------------------------------


def test_long_audio_is_refused_from_its_header(decoded):
    bomb = flac(120.0)  # two minutes of silence in a few KB
    assert len(bomb) < 40_000
    assert "header declares 120.0 s" in _refused(bomb, "audios", SMALL, "max_reference_seconds")
    assert decoded["audio"] == 0


def test_audio_whose_header_understates_is_counted_and_refused(decoded, tmp_path):
    liar = flac(120.0, lie_s=1.0)
    (tmp_path / "liar.flac").write_bytes(liar)
    info = media.probe_media(str(tmp_path / "liar.flac"), check_frame_rate=False)
    assert info.duration_s == pytest.approx(1.0)
    _refused(liar, "audios", SMALL, "max_reference_seconds")
    assert decoded["audio"] == 0


def test_decoding_audio_stops_at_the_limit(decoded, tmp_path):
    """The decode phase alone (what still holds if packets' durations lied too)."""
    path = tmp_path / "liar.flac"
    path.write_bytes(flac(120.0, lie_s=1.0))
    with pytest.raises(media.MediaLimitError) as err:
        media.decode_audio_within(str(path), media.MediaLimits(max_seconds=4.0))
    assert err.value.limit == "max_seconds"
    blocks = (4.0 + media.COUNT_GRACE_S) * 48000 / 4608
    assert decoded["audio"] <= int(blocks) + 1  # not the 1250 blocks it holds


@pytest.mark.parametrize(
    ("bomb", "limit"),
    [
        (lambda: wav(64, 8000, 0.05), "max_reference_audio_channels"),
        (lambda: wav(1, 5_000_000, 0.01), "max_reference_sample_rate"),
    ],
)
def test_many_channels_or_a_huge_sample_rate_are_refused(decoded, bomb, limit):
    _refused(bomb(), "audios", SMALL, limit)
    assert decoded["audio"] == 0


def test_audio_within_the_limits_passes(decoded):
    info = probe_reference(flac(2.0), "audios", SMALL)
    assert info.has_audio and info.audio_channels == 2
    assert decoded["audio"] > 0


# -- through the API ---------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        body = type(self).files.get(self.path, b"")
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _NoBackend:
    async def run(self, job_id, quality, model):
        raise AssertionError("a refused job must never be dispatched")

    async def ready(self):
        return {"fast": True, "full": True}


BOMBS = {
    "canvas.png": ("images", lambda: png_canvas(1000, 1000), "max_reference_pixels"),
    "frames.gif": ("images", lambda: animated("GIF", 40), "max_reference_image_frames"),
    "long.mp4": ("videos", lambda: video("mp4", 240, 16), "max_reference_frames"),
    "liar.mkv": ("videos", lambda: lying_mkv(600), "max_reference_frames"),
    "liar.flac": ("audios", lambda: flac(120.0, lie_s=1.0), "max_reference_seconds"),
    "channels.wav": ("audios", lambda: wav(64, 8000, 0.05), "max_reference_audio_channels"),
}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    base = tmp_path_factory.mktemp("media_limits")
    assets = base / "assets"
    assets.mkdir()
    data = {name: make() for name, (_, make, _) in BOMBS.items()}
    for name, body in data.items():
        (assets / name).write_bytes(body)
    _Files.files = {f"/{name}": body for name, body in data.items()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = serve_config_from(
        {
            "jobs_uri": str(base / "jobs"),
            "api_keys": [KEY],
            "limits": LIMITS,
            "uri_policy": {
                "allowed_schemes": ["file", "http"],
                "allowed_local_roots": [str(assets)],
                "private_hosts_allowed": ["127.0.0.1"],  # the test's file server
                "http_timeout_s": 2.0,
            },
        }
    )
    with TestClient(build_api(config, _NoBackend(), FACTS)) as client:
        yield client, assets, data, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _detail(response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " ".join(d["msg"] for d in detail)


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.parametrize("route", ["upload", "file", "http"])
def test_bombs_are_refused_through_every_route(api, decoded, name, route):
    client, assets, data, http_root = api
    kind, _, limit = BOMBS[name]
    if route == "upload":
        response = client.post(
            "/v1/jobs/upload",
            data={"request": '{"prompt": "a ball"}'},
            files=[(kind, (name, data[name], "application/octet-stream"))],
            headers=AUTH,
        )
    else:
        uri = f"file://{assets / name}" if route == "file" else f"{http_root}/{name}"
        body = {"prompt": "a ball", "references": {kind: [uri]}}
        response = client.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 413, response.text
    assert f"over the limit {limit}" in _detail(response)
    assert decoded["image"] == decoded["video"] == 0


@pytest.mark.parametrize("route", ["upload", "file"])
def test_a_v2v_source_bomb_is_refused(api, decoded, route):
    client, assets, data, _ = api
    spec = {"prompt": "a ball", "mode": "v2v"}
    if route == "upload":
        response = client.post(
            "/v1/jobs/upload",
            data={"request": '{"prompt": "a ball", "mode": "v2v"}'},
            files=[("source", ("liar.mkv", data["liar.mkv"], "video/x-matroska"))],
            headers=AUTH,
        )
    else:
        spec["source"] = f"file://{assets / 'liar.mkv'}"
        response = client.post("/v1/jobs", json=spec, headers=AUTH)
    assert response.status_code == 413, response.text
    assert "over the limit max_reference_frames" in _detail(response)
    assert decoded["video"] == 0


def test_an_ad_briefs_product_reference_bomb_is_refused(api, decoded, tmp_path):
    from pipelines.adgen import load_brief

    client, assets, _, _ = api
    brief = tmp_path / "brief.toml"
    brief.write_text(
        'prompt_templates = ["a {colour} sneaker"]\n'
        f'product_references = ["file://{assets / "canvas.png"}"]\n'
        '[slots]\ncolour = ["red"]\n'
    )
    _, variants = load_brief(str(brief))
    response = client.post("/v1/jobs", json=variants[0].job(None), headers=AUTH)
    assert response.status_code == 413, response.text
    assert "over the limit max_reference_pixels" in _detail(response)
    assert decoded["image"] == 0


# -- the model replica decodes within the same limits ------------------------------------


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tmp_path_factory):
    from serve.local import build_local_app

    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": str(tmp_path_factory.mktemp("media_limits_local") / "jobs"),
            "api_keys": [KEY],
            "fast": {"steps": 1, "sampler": "euler"},
            "full": {"steps": 1, "sampler": "euler"},
            "limits": LIMITS,
        }
    )
    app, backend = build_local_app(config)
    with TestClient(app) as client:
        yield client
    backend.close()


def _run(client, name: str, data: bytes, kind: str = "videos") -> dict:
    response = client.post(
        "/v1/jobs/upload",
        data={"request": '{"prompt": "a ball", "quality": "full", "duration_s": 0.5}'},
        files=[(kind, (name, data, "application/octet-stream"))],
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.time() + 120
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_a_stream_that_grows_after_its_probe_fails_its_job_mid_decode(local, decoded):
    job = _run(local, "grow.h264", growing_h264(40, 1024))
    assert job["status"] == "failed" and "max_reference_pixels" in job["error"], job
    assert decoded["video"] <= 41, decoded


def test_a_lie_past_the_packet_count_is_stopped_by_the_replicas_decode(local, decoded, monkeypatch):
    """With the submit-time packet count switched off, the lying header is accepted;
    the replica's decode still stops one frame past the limit."""
    monkeypatch.setattr(media, "scan_packets", lambda uri, limits: None)
    job = _run(local, "liar.mkv", lying_mkv(600))
    assert job["status"] == "failed" and "max_reference_frames" in job["error"], job
    assert decoded["video"] <= SMALL.max_reference_frames + 1, decoded


def test_references_within_the_limits_still_generate(local):
    job = _run(local, "ok.mp4", video("mp4", 24, 32, audio_s=1.0))
    assert job["status"] == "succeeded", job
    job = _run(local, "ok.flac", flac(1.0), kind="audios")
    assert job["status"] == "succeeded", job


# -- config ------------------------------------------------------------------------------


def test_limits_come_from_the_serve_config_and_are_checked():
    from core.config import ConfigError
    from serve.config import serve_config_from as load

    config = load(str(Path(__file__).resolve().parents[1] / "serve" / "example.toml"))
    assert config.limits.max_reference_frames == LimitsConfig().max_reference_frames
    assert load({"limits": {"max_reference_seconds": 2}}).limits.max_reference_seconds == 2.0
    with pytest.raises(ConfigError, match="max_reference_frames must be > 0"):
        load({"limits": {"max_reference_frames": 0}})
