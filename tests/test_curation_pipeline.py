"""The source pipeline without Ray: one stage interface, every failure recorded,
captions that never fail a source, config-fingerprinted resume, a streaming
manifest writer whose driver memory does not grow with the number of sources."""

from __future__ import annotations

import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import polars as pl
import pytest

from core import media
from core.manifest_layout import latest_version, manifest_table_uri
from curation.captions import CaptionStage
from curation.manifest import ManifestWriter
from curation.pipeline import (
    CurateConfig,
    SourcePipeline,
    load_committed,
    process_source,
    source_fingerprint,
)
from curation.quality import HASH_BITS, DuplicateIndex, hamming
from curation.records import ClipRecord, SourceResult
from curation.stage import Resources, Stage

FPS = 24.0


def _source(path: str, seconds: float = 4.0, audio: bool = True) -> str:
    """A moving-bar clip with a tone: one shot, enough motion and sound to keep."""
    t = int(seconds * FPS)
    frames = np.full((t, 144, 256, 3), 90, np.uint8)
    for i in range(t):
        frames[i, :, (i * 5) % 240 : (i * 5) % 240 + 12] = 220
    n = int(seconds * 48000)
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000)).astype(np.float32)
    sound = np.stack([tone, tone]) if audio else np.zeros((0, n), np.float32)
    media.write_mp4(path, media.AVClip(frames, FPS, sound, 48000), preset="ultrafast")
    return path


def test_every_stage_has_the_one_interface():
    pipeline = SourcePipeline(CurateConfig())
    names = [s.name for s in pipeline.stages]
    assert names == ["validate", "segment", "quality", "sync", "captions", "write"]
    for stage in pipeline.stages:
        assert isinstance(stage, Stage) and stage.kind in ("source", "clip")
        assert isinstance(stage.resources, Resources) and stage.resources.cpus >= 1
        assert stage.version
    assert [s.kind for s in pipeline.stages] == ["source"] * 2 + ["clip"] * 4


class _Explodes(Stage):
    name = "explodes"
    kind = "clip"

    def process(self, ctx):
        raise ZeroDivisionError("a bug in a stage")


def test_any_exception_in_any_stage_is_quarantined_with_stage_and_type(tmp_path):
    path = _source(str(tmp_path / "ok.mp4"))
    pipeline = SourcePipeline(CurateConfig())
    write = pipeline.clip_stages[-1]
    pipeline.clip_stages.insert(len(pipeline.clip_stages), _Explodes())  # after the write
    result = pipeline(path, str(tmp_path / "out"))
    q = result.quarantine
    assert q["stage"] == "explodes" and q["error_type"] == "ZeroDivisionError"
    assert "a bug in a stage" in q["reason"] and result.status == "quarantined"
    assert result.clips == []
    # The clip the write stage had already written is removed with the source.
    assert write.name == "write"
    assert not any(f.endswith(".mp4") for _, _, fs in os.walk(tmp_path / "out") for f in fs)


def test_media_errors_mid_stream_are_quarantined(tmp_path):
    path = _source(str(tmp_path / "cut.mp4"), seconds=6.0)
    data = open(path, "rb").read()
    truncated = str(tmp_path / "truncated_tail.mp4")
    with open(truncated, "wb") as fh:
        fh.write(data[: int(len(data) * 0.6)])
    result = SourcePipeline(CurateConfig())(truncated, str(tmp_path / "out"))
    assert result.status == "quarantined"
    assert result.quarantine["stage"] in ("validate", "segment")
    assert result.quarantine["error_type"] in ("rejected", "MediaError")


class _DownServer(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).calls += 1
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"overloaded")

    def log_message(self, *args):
        pass


@pytest.fixture
def down_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DownServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _DownServer.calls = 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_caption_backend_down_is_retried_then_recorded_never_fatal(tmp_path, down_server):
    path = _source(str(tmp_path / "long.mp4"), seconds=9.0)
    config = CurateConfig.from_dict(
        {
            "clips": {"max_clip_s": 2.5},
            "captions": {
                "model": "vlm",
                "base_url": down_server,
                "retries": 1,
                "retry_backoff_s": 0.0,
                "max_consecutive_failures": 2,
            },
        }
    )
    result = SourcePipeline(config)(path, str(tmp_path / "out"))
    assert result.status == "curated"
    clips = result.clip_records()
    assert len(clips) >= 3
    assert all(c.caption_verdict == "caption_failed" and c.caption == "" for c in clips)
    assert "HTTP 503" in clips[0].caption_error
    assert "backend down" in clips[-1].caption_error
    # Two clips tried twice each (one retry), then the backend is taken as down.
    assert _DownServer.calls == 4


def test_auto_captions_without_a_sidecar_or_model_keep_the_clip(tmp_path):
    path = _source(str(tmp_path / "plain.mp4"))
    result = SourcePipeline(CurateConfig())(path, str(tmp_path / "out"))
    (clip,) = result.clip_records()
    assert clip.caption == "" and clip.caption_verdict == "caption_missing" and clip.keep


def test_auto_captions_use_the_sidecar_when_present(tmp_path, down_server):
    path = _source(str(tmp_path / "side.mp4"))
    with open(str(tmp_path / "side.json"), "w") as fh:
        fh.write('{"shots": [{"start_s": 0, "end_s": 4, "caption": "a white bar moves"}]}')
    # A model backend is configured too: the source's own sidecar wins, and the
    # model is never asked.
    config = CurateConfig.from_dict({"captions": {"model": "vlm", "base_url": down_server}})
    assert CaptionStage(config.captions).model_backend == "openai"
    (clip,) = SourcePipeline(config)(path, str(tmp_path / "out")).clip_records()
    assert (clip.caption, clip.caption_backend, clip.caption_verdict) == (
        "a white bar moves",
        "sidecar",
        "captioned",
    )
    assert _DownServer.calls == 0
    # A sidecar that is present but broken fails that clip's caption, not the source.
    with open(str(tmp_path / "side.json"), "w") as fh:
        fh.write('{"shots": [{"start_s": 0, "end_s": 4, "caption": ')
    result = SourcePipeline(config)(path, str(tmp_path / "out2"))
    (clip,) = result.clip_records()
    assert result.status == "curated" and clip.keep
    assert (clip.caption, clip.caption_verdict) == ("", "caption_failed") and clip.caption_error
    assert _DownServer.calls == 0


def test_resume_key_follows_config_and_stage_versions(tmp_path):
    path = _source(str(tmp_path / "r.mp4"))
    out = str(tmp_path / "out")
    base = CurateConfig()
    first, skipped = process_source(path, out, base)
    assert not skipped
    again, skipped = process_source(path, out, base)
    assert skipped and again.to_dict() == first.to_dict()
    # A split fraction does not change a source's result; a clip length does.
    assert source_fingerprint(CurateConfig(val_fraction=0.5)) == source_fingerprint(base)
    other = CurateConfig.from_dict({"clips": {"max_clip_s": 3.0}})
    assert source_fingerprint(other) != source_fingerprint(base)
    assert load_committed(out, path, source_fingerprint(other)) is None
    redone, skipped = process_source(path, out, other)
    assert not skipped and redone.clip_records()[0].duration_s <= 3.0 + 1e-6
    # A stage whose code version changes invalidates too.
    pipeline = SourcePipeline(base)
    pipeline.stages[2].version = "999"
    assert source_fingerprint(base, pipeline.stages) != source_fingerprint(base)


def test_duplicate_index_finds_exactly_the_pairs_brute_force_finds():
    rng = random.Random(0)
    hashes = []
    for i in range(400):
        if i % 4 == 3:  # a near copy of an earlier hash
            base = int(rng.choice(hashes), 16)
            for _ in range(rng.randint(0, 12)):
                base ^= 1 << rng.randrange(HASH_BITS)
            hashes.append(f"{base:048x}")
        else:
            hashes.append(f"{rng.getrandbits(HASH_BITS):048x}")
    index = DuplicateIndex(max_bits=8)
    kept: list[tuple[int, str]] = []
    for i, h in enumerate(hashes):
        found, bits = index.nearest(h, f"s{i}", 0)
        brute = [(hamming(h, k), j) for j, k in kept]
        best = min(brute) if brute else (HASH_BITS, -1)
        if best[0] <= 8:
            assert bits == best[0] and found == f"c{best[1]}"
        else:
            assert bits > 8
            index.add(h, f"s{i}", 0, f"c{i}")
            kept.append((i, h))
    assert 50 < len(hashes) - len(kept) < 150


def _result(uri: str, n_clips: int) -> dict:
    res = SourceResult(source_uri=uri, source_id=uri[-8:], fingerprint="f")
    res.source = {"container": "mov", "fps": 24.0, "has_audio": True}
    res.media_seconds = 3.0
    for k in range(n_clips):
        clip = ClipRecord(
            clip_id=f"{uri[-8:]}-{k}",
            source_uri=uri,
            source_id=uri[-8:],
            shot_index=k,
            clip_index=0,
            start_frame=k * 72,
            end_frame=(k + 1) * 72,
            start_s=k * 3.0,
            end_s=(k + 1) * 3.0,
            fps=24.0,
            width=64,
            height=48,
            sample_rate=48000,
            phash=f"{random.Random(uri + str(k)).getrandbits(HASH_BITS):048x}",
            verdicts={"not_black": True},
        )
        res.clips.append(clip.to_dict())
    return res.to_dict()


def test_manifest_writer_streams_in_order_with_bounded_pending(tmp_path):
    out = str(tmp_path / "out")
    uris = [f"s3://raw/video-{i:05d}.mp4" for i in range(1000)]
    writer = ManifestWriter(out, uris, run_config={"x": 1}, group_size=64)
    # The first 200 finish out of order, as parallel work does; the rest in order.
    window = uris[:200]
    random.Random(2).shuffle(window)
    order = window + uris[200:]
    assert order[:200] != uris[:200] and sorted(order) == uris
    parts = tmp_path / "out" / "manifest" / "v=000001" / "_parts"
    for i, uri in enumerate(order):
        writer.add(uri, _result(uri, 2 if uri[-5] != "7" else 0))
        # Finished results wait only until their group is complete.
        assert writer.max_pending <= 200 + 64
        if i == 499:  # groups 0-6 are complete: already on disk, long before finish
            assert len(list(parts.glob("clips-*.parquet"))) == 7
    assert writer.max_pending > 64, "no result ever waited: the order was never shuffled"
    uris_out = writer.finish({"inputs": 1000})
    assert latest_version(out) == 1 and uris_out["clips"] == manifest_table_uri(out, "clips")
    clips = pl.read_parquet(uris_out["clips"])
    sources = pl.read_parquet(uris_out["sources"])
    assert sources.height == 1000 and sources["uri"].to_list() == sorted(uris)
    assert writer.counts == {"curated": 900, "no_clips": 100, "quarantined": 0}
    assert clips.height == 1800
    assert clips.sort(["source_uri", "start_s"])["clip_id"].equals(clips["clip_id"])
    assert not (tmp_path / "out" / "manifest" / "v=000001" / "_parts").exists()


def test_manifest_writer_refuses_an_incomplete_run(tmp_path):
    writer = ManifestWriter(str(tmp_path), ["a.mp4", "b.mp4"], run_config={})
    writer.add("a.mp4", _result("a.mp4", 1))
    with pytest.raises(ValueError, match="never reported"):
        writer.finish()
    assert latest_version(str(tmp_path)) is None


def test_nightly_deployment_passes_a_real_footage_config():
    """The Prefect deployment names a config that loads, and its inputs and captions
    suit footage without sidecars (the old one passed none and curated nothing)."""
    import yaml

    from core.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = yaml.safe_load(open(os.path.join(root, "infra/prefect/prefect.yaml")).read())
    (nightly,) = [d for d in spec["deployments"] if d["entrypoint"] == "flows/curate.py:curate"]
    params = nightly["parameters"]
    # The config path is relative to the project root (the flow's working directory).
    config = load_config(CurateConfig, os.path.join(root, params["config_uri"]))
    assert config.captions.backend == "auto" and config.captions.model
    assert not config.validate.require_audio and config.validate.allow_variable_frame_rate
    assert params["input_glob"].endswith("/*") and params["speech"] is True
