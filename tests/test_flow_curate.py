"""The ``curate`` flow end to end: Prefect (ephemeral) + Ray (local, 2 CPUs).

One synthetic-world corpus plus one file of every bad kind is curated once
(``full_run``); the other tests compare against it: a run killed part way and
resumed must give the same manifest, and the same flow must run on S3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from core import storage
from core.manifest_layout import latest_version, manifest_table_uri
from core.sample_media import ACCEPTED_BY_DEFAULT, EXPECTED_REASON, make_bad_inputs
from curation.manifest import SCHEMA_VERSION, list_versions, manifest_uris, read_clips

# Every test here runs the flow (Prefect server + Ray start, ~35 s before the first).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VIDEOS = 3


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    """Prefect's ephemeral mode, with its database in a temp dir."""
    home = tmp_path_factory.mktemp("prefect_home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    yield str(home)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray with 2 CPUs for the module; yields its address for subprocess drivers."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    from core.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("raw")
    config = SynthConfig(min_shots=2, max_shots=3, min_shot_s=2.5, max_shot_s=3.5)
    generate_corpus(str(root), NUM_VIDEOS, seed=11, config=config)
    make_bad_inputs(str(root))
    return str(root)


@pytest.fixture(scope="module")
def full_run(prefect_home, ray_cluster, raw_dir, tmp_path_factory):
    from flows.curate import curate

    out = str(tmp_path_factory.mktemp("out_full"))
    t0 = time.perf_counter()
    summary = curate(os.path.join(raw_dir, "*"), out)
    summary["elapsed_s"] = time.perf_counter() - t0
    return out, summary


def _comparable(out_uri: str) -> pl.DataFrame:
    """The clips table minus the one column that names the output location."""
    with storage.local_copy(manifest_uris(out_uri)["clips"]) as path:
        return pl.read_parquet(path).drop("clip_uri")


NUM_INPUTS = NUM_VIDEOS + len(EXPECTED_REASON) + len(ACCEPTED_BY_DEFAULT)


def test_flow_writes_manifest_report_and_quarantine(full_run, raw_dir):
    out, summary = full_run
    assert summary["failed"] == {}
    assert summary["inputs"] == NUM_INPUTS
    # Every input is accounted for, in sources.parquet and in the summary.
    counts = summary["counts"]
    assert counts["curated"] + counts["no_clips"] + counts["quarantined"] == NUM_INPUTS
    assert counts["quarantined"] == len(EXPECTED_REASON)
    sources = pl.read_parquet(summary["sources"])
    assert sources.height == NUM_INPUTS and sources["source_id"].n_unique() == NUM_INPUTS
    assert dict(zip(*sources["status"].value_counts().to_dict().values(), strict=True)) == {
        k: v for k, v in counts.items() if v
    }
    clips = pl.read_parquet(summary["clips"])
    assert clips.height > 0
    assert summary["clips"] == manifest_table_uri(out, "clips")  # what training reads
    assert (clips["schema_version"] == SCHEMA_VERSION).all()
    assert clips["clip_id"].n_unique() == clips.height
    # The video-only and the variable-frame-rate inputs became clips too.
    by_name = clips.with_columns(
        name=pl.col("source_uri").map_elements(os.path.basename, return_dtype=pl.String)
    )
    video_only = by_name.filter(pl.col("name") == "no_audio.mp4")
    assert video_only.height >= 1 and not video_only["has_audio"].any()
    assert by_name.filter(pl.col("name") == "vfr.mp4").height >= 1
    # Every clip's MP4 exists and every synthetic clip's caption is its shot's truth;
    # the other inputs have no sidecar and no model: kept, with the caption missing.
    for row in clips.iter_rows(named=True):
        assert storage.exists(row["clip_uri"])
        if not os.path.basename(row["source_uri"]).startswith("synth_"):
            assert row["caption"] == "" and row["caption_verdict"] == "caption_missing"
            continue
        assert row["caption_verdict"] == "captioned"
        sidecar = json.load(open(os.path.splitext(row["source_uri"])[0] + ".json"))
        mid = (row["start_s"] + row["end_s"]) / 2
        (shot,) = [s for s in sidecar["shots"] if s["start_s"] <= mid < s["end_s"]]
        assert row["caption"] == shot["caption"]
        assert shot["start_s"] - 1e-6 <= row["start_s"] and row["end_s"] <= shot["end_s"] + 1e-6
        assert 2.0 - 1e-6 <= row["duration_s"] <= 15.0 + 1e-6
    assert set(clips["split"]) <= {"train", "val", "test"}
    quarantine = pl.read_parquet(summary["quarantine"])
    reasons = dict(zip(quarantine["uri"], quarantine["reason"], strict=True))
    assert len(reasons) == len(EXPECTED_REASON)
    assert set(quarantine["stage"]) <= {"validate", "segment"}
    assert set(quarantine["error_type"]) == {"rejected"}
    for fragment in EXPECTED_REASON.values():
        assert any(fragment in r for r in reasons.values()), fragment
    assert storage.exists(summary["report"])
    html = storage.read_text(summary["report"])
    assert "scores.png" in html and "filters.png" in html
    assert storage.exists(storage.join(out, "report", "scores.png"))
    assert read_clips(out).num_rows == clips.height


def test_rerun_of_a_finished_run_does_no_work(full_run, raw_dir):
    """Same settings: every source is reused, and the run writes a new manifest
    version equal to the first; the first stays readable."""
    from flows.curate import curate

    out, first = full_run
    before = _comparable(out)
    again = curate(os.path.join(raw_dir, "*"), out)
    assert again["sources_run"] == 0
    assert again["sources_skipped"] == first["inputs"]
    # Read back, not recomputed (a recomputation differs in the milliseconds); the
    # sum's order differs, so equal to float rounding.
    assert again["cpu_seconds"] == pytest.approx(first["cpu_seconds"], rel=1e-9)
    assert int(again["version"]) == int(first["version"]) + 1 == latest_version(out)
    assert _comparable(out).equals(before)
    assert pl.read_parquet(first["clips"]).drop("clip_uri").equals(before)


def test_changed_config_recomputes_and_old_versions_stay_readable(full_run, raw_dir, tmp_path):
    """The resume key includes the config: other clip lengths recompute every source
    (instead of reusing results the new config would not produce) into a new
    version; every version stays readable by path with polars and duckdb."""
    from flows.curate import curate

    out = str(tmp_path / "out_versions")
    shutil.copytree(full_run[0], out)
    first = pl.read_parquet(manifest_table_uri(out, "clips"))
    changed = curate(
        os.path.join(raw_dir, "synth_*.mp4"), out, config={"clips": {"max_clip_s": 2.5}}
    )
    assert changed["sources_run"] == NUM_VIDEOS and changed["sources_skipped"] == 0
    new = pl.read_parquet(changed["clips"])
    assert new["duration_s"].max() <= 2.5 + 1e-6 < first["duration_s"].max()
    versions = list_versions(out)
    assert versions[-1] == latest_version(out) == int(changed["version"]) and len(versions) >= 2
    for version in versions:
        table = pl.read_parquet(manifest_table_uri(out, "clips", version))
        assert table.height > 0
    all_versions = pl.read_parquet(
        os.path.join(out, "manifest", "v=*", "clips.parquet"), hive_partitioning=True
    )
    assert set(all_versions["v"].to_list()) == set(versions)
    # DuckDB reads a version by path too (a dev dependency: not the platform's, but
    # always installed where the tests run, so its absence fails here).
    import duckdb

    old = manifest_table_uri(out, "clips", versions[0])
    query = f"select count(*) from read_parquet('{old}')"
    assert duckdb.sql(query).fetchall()[0][0] == first.height


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_manifest(full_run, raw_dir, ray_cluster, tmp_path):
    from flows.curate import curate

    reference, _ = full_run
    out = str(tmp_path / "out_killed")
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "flows.curate", os.path.join(raw_dir, "*"), out]
    cmd += ["--ray-address", ray_cluster]
    # Its own process group, killed whole: the driver and the Prefect temporary API
    # server it started die together, as on a lost machine (killing the driver alone
    # left that server running after the tests).
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    sources = os.path.join(out, "work", "sources")
    deadline = time.time() + 240
    # Kill the driver as soon as the first real (non-quarantined) source has committed
    # clips: part of the work is done, part is not.
    killed_with = None
    while time.time() < deadline and proc.poll() is None:
        committed = []
        if os.path.isdir(sources):
            for sid in os.listdir(sources):
                for key in os.listdir(os.path.join(sources, sid)):
                    if os.path.exists(os.path.join(sources, sid, key, "_COMMITTED.json")):
                        committed.append(sid)
        clips_dir = os.path.join(out, "clips")
        if committed and os.path.isdir(clips_dir) and os.listdir(clips_dir):
            os.killpg(proc.pid, signal.SIGKILL)
            killed_with = len(committed)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_with is not None, proc.stderr.read().decode()[-2000:]
    assert latest_version(out) is None  # no version was committed

    resumed = curate(os.path.join(raw_dir, "*"), out)
    total = NUM_INPUTS
    assert resumed["sources_skipped"] >= killed_with
    assert resumed["sources_run"] == total - resumed["sources_skipped"] < total
    a, b = _comparable(reference), _comparable(out)
    assert a.columns == b.columns
    assert a.equals(b), "resumed manifest differs from the uninterrupted one"
    assert b["clip_id"].n_unique() == b.height


@pytest.mark.slow
def test_flow_runs_unchanged_on_s3(full_run, raw_dir, s3_bucket):
    from flows.curate import curate

    fs = storage.filesystem(s3_bucket)
    for name in sorted(os.listdir(raw_dir)):
        if name.startswith("synth_"):
            fs.put_file(os.path.join(raw_dir, name), f"{s3_bucket[5:]}/raw/{name}")
    out = f"{s3_bucket}/curated"
    summary = curate(f"{s3_bucket}/raw/*.mp4", out)
    assert summary["failed"] == {}
    s3_clips = pl.from_arrow(read_clips(out))
    assert all(u.startswith(f"{s3_bucket}/curated/clips/") for u in s3_clips["clip_uri"])
    assert all(storage.exists(u) for u in s3_clips["clip_uri"])
    local = _comparable(full_run[0])
    key = ["start_frame", "end_frame", "caption", "score_motion", "sync_offset_ms"]

    def by_video(df: pl.DataFrame) -> pl.DataFrame:
        name = df["source_uri"].map_elements(os.path.basename, return_dtype=pl.String)
        return df.with_columns(video=name).select(["video", *key]).sort(["video", "start_frame"])

    synth_only = by_video(local).filter(pl.col("video").str.starts_with("synth_"))
    assert by_video(s3_clips).equals(synth_only)


def test_cli_prints_manifest_and_report_paths(full_run, raw_dir, tmp_path):
    """The CLI in-process (same Ray, same Prefect server): paths printed, exit code 0."""
    from typer.testing import CliRunner

    from cli.main import app

    out, _ = full_run
    copy = str(tmp_path / "out_cli")
    shutil.copytree(out, copy)
    result = CliRunner().invoke(
        app, ["curate", os.path.join(raw_dir, "synth_*.mp4"), "--out", copy, "--no-speech"]
    )
    assert result.exit_code == 0, result.output
    assert "clips.parquet" in result.output and "index.html" in result.output


def _speech_env_ready() -> bool:
    from curation import speech_env

    return speech_env.is_ready(speech_env.env_dir())


@pytest.mark.slow
def test_flow_with_speech_on_talking_avatar(prefect_home, ray_cluster, tmp_path):
    """WhisperX through the flow: transcripts, word times and the alignment method land
    in the manifest; the words match the espeak-ng ground truth."""
    if not _speech_env_ready():  # make test builds it first; without it this fails
        pytest.fail("the WhisperX env is not built: run make whisperx-env")
    from core.synth import SynthConfig, generate_corpus
    from curation.speech import word_error_rate
    from flows.curate import curate

    raw = str(tmp_path / "raw")
    config = SynthConfig(
        min_shots=2, max_shots=2, min_shot_s=4.0, max_shot_s=5.0, kinds=("talking_avatar",)
    )
    (video,) = generate_corpus(raw, 1, seed=4, config=config)
    summary = curate(os.path.join(raw, "*.mp4"), str(tmp_path / "out"), speech=True)
    assert summary["failed"] == {}
    clips = pl.read_parquet(summary["clips"])
    sidecar = json.load(open(video[:-4] + ".json"))
    references, hypotheses = [], []
    for row in clips.iter_rows(named=True):
        assert row["alignment_method"] in ("wav2vec2", "whisper_word_timestamps")
        assert row["transcript"] and row["words"]
        for word in row["words"]:
            assert 0.0 <= word["start_s"] <= word["end_s"] <= row["duration_s"] + 0.5
        mid = (row["start_s"] + row["end_s"]) / 2
        (shot,) = [s for s in sidecar["shots"] if s["start_s"] <= mid < s["end_s"]]
        # Reference: the ground-truth words spoken inside the clip's time range.
        words = [
            w["word"]
            for w in shot["speech"]["words"]
            if w["start_s"] >= row["start_s"] - 0.05 and w["end_s"] <= row["end_s"] + 0.05
        ]
        references.append(" ".join(words))
        hypotheses.append(row["transcript"])
    assert len(references) >= 2
    own = [word_error_rate(r, h) for r, h in zip(references, hypotheses, strict=True)]
    wer = float(np.mean(own))
    print(f"flow speech WER over {len(own)} clips: {wer:.3f}")
    # Whisper tiny.en's own accuracy is the speech stage's business (its tests hold it
    # to 15 %). Here: each clip's transcript is the speech of that clip's time range,
    # closer to its own reference than to any other clip's.
    for i, hyp in enumerate(hypotheses):
        for j, ref in enumerate(references):
            if i != j:
                assert own[i] < word_error_rate(ref, hyp), (i, j, hyp)
    assert wer <= 0.5
    # Resume covers speech too: a rerun transcribes nothing again.
    again = curate(os.path.join(raw, "*.mp4"), str(tmp_path / "out"), speech=True)
    assert again["speech_compute_seconds"] == summary["speech_compute_seconds"]


def test_speech_failures_are_recorded_and_not_fatal(full_run, raw_dir, tmp_path):
    """A speech worker that cannot start: every clip with audio gets ``speech_failed``
    and the error, the actors are cleaned up, the run completes."""
    from flows.curate import curate

    out = str(tmp_path / "out_speech_down")
    shutil.copytree(full_run[0], out)
    summary = curate(
        os.path.join(raw_dir, "synth_*.mp4"),
        out,
        speech=True,
        speech_config={"python": str(tmp_path / "no_such_python")},
    )
    assert summary["counts"]["curated"] == NUM_VIDEOS
    clips = pl.read_parquet(summary["clips"])
    assert clips.height > 0
    assert set(clips["speech_verdict"]) == {"speech_failed"}
    assert all("no_such_python" in e for e in clips["speech_error"])
