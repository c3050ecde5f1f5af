"""Multi-shot sequences reach a user and an offline GPU host.

``duet sequences`` cuts sequences from a curated folder (its shots table) into one
file each plus ``sequences.parquet`` beside the clips table; bad input is one error
line and exit 2; ``duet train --sequences`` cuts them first only when none exist.
A carry packs the sequences and their multi-shot plans' joint embeddings, and on
the far side the table serves ``embed_segments`` as the frozen encoder did.
The tiny curated folder is built by hand (one source of four solid-colour shots),
not rendered and curated.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from core.media import AVClip, read_clip, write_mp4
from model.configs import get_config
from model.multishot import plan_segments
from pipelines.train.conditioning import join_shots
from pipelines.train.sequences import load_sequences, read_records, table_uri

FPS, SR = 16.0, 16000
LENGTHS = [12, 14, 12, 14]  # frames per shot
TRANSITIONS = ["start", "cut", "fade", "cut"]  # into each shot, as curation detects them
CAPTIONS = ["a red circle bounces", "a blue square slides", "a green ball rolls", "a gray box"]
COLOURS = [(200, 40, 40), (40, 40, 200), (40, 200, 40), (120, 120, 120)]


def _shot(n: int, colour, hz: float) -> AVClip:
    frames = np.empty((n, 64, 64, 3), np.uint8)
    frames[:] = colour
    t = np.arange(int(round(n / FPS * SR))) / SR
    tone = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return AVClip(frames=frames, fps=FPS, audio=np.stack([tone, tone]), sample_rate=SR)


def _curated(root) -> str:
    """A curated folder as ``duet curate`` lays it out (unversioned manifest): the
    source, one kept captioned clip file per shot, the clips and shots tables."""
    shots = [
        _shot(n, c, 330 + 110 * i) for i, (n, c) in enumerate(zip(LENGTHS, COLOURS, strict=True))
    ]
    source = str(root / "raw" / "src.mp4")
    write_mp4(source, join_shots(shots, TRANSITIONS[1:], fade_frames=6), lossless=True)
    starts = np.cumsum([0] + LENGTHS[:-1]).tolist()
    clips, shot_rows = [], []
    for i, (n, start) in enumerate(zip(LENGTHS, starts, strict=True)):
        clip_uri = str(root / "curated" / "clips" / f"src-{i}.mp4")
        write_mp4(clip_uri, shots[i])
        span = {"start_s": start / FPS, "end_s": (start + n) / FPS}
        clips.append(
            {"clip_id": f"src-{i}", "source_uri": source, "source_id": "src", "shot_index": i,
             "clip_uri": clip_uri, "keep": True, "caption": CAPTIONS[i], "transcript": "",
             "has_audio": True, "split": "train", "fps": float(FPS), **span}
        )  # fmt: skip
        shot_rows.append(
            {"source_id": "src", "index": i, "start_frame": start, "end_frame": start + n,
             "transition_in": TRANSITIONS[i], **span}
        )  # fmt: skip
    manifest = root / "curated" / "manifest"
    manifest.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(clips), str(manifest / "clips.parquet"))
    pq.write_table(pa.Table.from_pylist(shot_rows), str(manifest / "shots.parquet"))
    return str(root / "curated")


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, terminal_width=80, env={"COLUMNS": "80"})


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return _curated(tmp_path_factory.mktemp("wiring"))


@pytest.fixture(scope="module")
def cut(curated, tmp_path_factory):
    """``duet sequences`` run from another folder with a relative --curated."""
    here = os.getcwd()
    os.chdir(os.path.dirname(curated))
    try:
        result = _invoke(["sequences", "--curated", "curated"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_the_command_cuts_one_file_per_sequence_beside_the_clips_table(curated, cut):
    table = table_uri(curated)
    assert f"sequences: 1 (4 shots) in {table}" in cut.stdout
    (rec,) = read_records(table)
    assert rec["shot_start_frames"] == np.cumsum([0] + LENGTHS[:-1]).tolist()
    assert rec["transitions"] == TRANSITIONS[1:] and rec["shot_captions"] == CAPTIONS
    # An absolute file (a Ray worker elsewhere reads it) holding every shot.
    assert os.path.isabs(rec["sequence_uri"]) and rec["sequence_uri"].startswith(curated)
    clip = read_clip(rec["sequence_uri"])
    assert clip.num_frames == rec["num_frames"] == sum(LENGTHS)
    # What training reads: one row of 4 shots (52 frames at 16 fps -> bucket 1 + 4 * 12).
    (row,) = load_sequences(curated, get_config("tiny"))
    assert row.bucket == 49 and len(row.captions) == 4


@pytest.mark.parametrize(
    "args,words",
    [
        (["--max-shots", "1"], ["--max-shots must be >= 2"]),
        (["--max-duration-s", "0"], ["--max-duration-s must be > 0"]),
        (["--curated", "nowhere"], ["no manifest under", "nowhere"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(curated, args, words):
    if "--curated" not in args:
        args = ["--curated", curated, *args]
    _one_line_error(_invoke(["sequences", *args]), *words)


def test_a_folder_without_shots_is_one_line(curated, tmp_path):
    other = tmp_path / "curated"
    (other / "manifest").mkdir(parents=True)
    clips = os.path.join(curated, "manifest", "clips.parquet")
    pq.write_table(pq.read_table(clips), str(other / "manifest" / "clips.parquet"))
    _one_line_error(_invoke(["sequences", "--curated", str(other)]), "no shots table")


def test_train_sequences_cuts_them_only_when_none_exist(tmp_path):
    from rich.console import Console

    from cli.train import _sequences_first

    curated = _curated(tmp_path)
    console = Console(stderr=True)
    _sequences_first(console, curated)
    table = table_uri(curated)
    assert [r["sequence_id"] for r in read_records(table)] == ["src-seq0000"]
    before = os.stat(table).st_mtime_ns
    _sequences_first(console, curated)  # the table is there: left as it is
    assert os.stat(table).st_mtime_ns == before


def test_a_carry_serves_the_plans_embed_segments_as_the_encoder_made_them(
    curated, cut, tmp_path, monkeypatch
):
    import model.pipeline
    from model.text_encoder import FrozenTextEncoder
    from pipelines.shipped import carry

    # unpack swaps the pipeline's encoder for the table: put both back afterwards.
    monkeypatch.setattr(model.pipeline, "FrozenTextEncoder", model.pipeline.FrozenTextEncoder)
    monkeypatch.setattr(carry.TableTextEncoder, "table", {})
    wheel = tmp_path / "av-0-cp311-abi3-any.whl"
    wheel.write_bytes(b"not installed: PyAV is already importable here")
    manifest = os.path.join(curated, "manifest", "clips.parquet")
    info = carry.pack([manifest], str(tmp_path / "carry"), str(wheel), frames=9)
    assert info["sequences"] == 1 and info["plans"] == 3  # 4, 3 and 2 shots at 77 tokens

    train_manifest = carry.unpack(str(tmp_path / "carry"), str(tmp_path / "work"))
    cfg = get_config("tiny")
    (row,) = load_sequences(train_manifest, cfg)
    assert row.uri.startswith(str(tmp_path / "carry")) and os.path.isfile(row.uri)
    table = model.pipeline.FrozenTextEncoder()  # what a pipeline built there gets
    assert isinstance(table, carry.TableTextEncoder)
    frozen = FrozenTextEncoder()
    # The plan training encodes (encode_sequence_rows), then every plan a frame
    # bucket can trim the sequence to.
    plans = [row.segments()] + [
        plan_segments("", CAPTIONS[:k], TRANSITIONS[1:k]) for k in (4, 3, 2)
    ]
    for segments in plans:
        tok, shots = table.embed_segments(segments, cfg.text.max_tokens)
        want_tok, want_shots = frozen.embed_segments(segments, cfg.text.max_tokens)
        assert torch.equal(shots, want_shots)
        torch.testing.assert_close(tok, want_tok, atol=2e-3, rtol=2e-3)  # fp16 in the table
    # A plain text still comes from the texts' rows.
    torch.testing.assert_close(
        table.embed_tokens(CAPTIONS[0]), frozen.embed_tokens(CAPTIONS[0]), atol=2e-3, rtol=2e-3
    )
    with pytest.raises(carry.CarryError, match="at 32 tokens"):
        table.embed_segments(segments, 32)
    # So does every binding phrase training's binder appends to a caption when a
    # sample has role references (the carried job failed on the first one).
    for phrase in ("@video3 motion", "@image9", "@audio1 voice"):
        torch.testing.assert_close(
            table.embed_tokens(phrase), frozen.embed_tokens(phrase), atol=2e-3, rtol=2e-3
        )


def test_a_carry_of_a_newer_format_is_refused_and_version_1_still_unpacks(tmp_path):
    from pipelines.shipped import carry

    info = tmp_path / carry.INFO_NAME
    info.write_text(json.dumps({"schema_version": carry.CARRY_SCHEMA_VERSION + 1}))
    with pytest.raises(carry.CarryError, match="update Duet"):
        carry.check_version(str(tmp_path))
    info.write_text(json.dumps({"schema_version": 1}))
    assert carry.check_version(str(tmp_path)) == 1


def test_a_captions_only_carry_keeps_a_full_carrys_rows_and_texts_without_clips(
    curated, tmp_path, monkeypatch
):
    import model.pipeline
    from pipelines.shipped import align_job, carry

    monkeypatch.setattr(model.pipeline, "FrozenTextEncoder", model.pipeline.FrozenTextEncoder)
    monkeypatch.setattr(carry.TableTextEncoder, "table", {})
    wheel = tmp_path / "av-0-cp311-abi3-any.whl"
    wheel.write_bytes(b"not installed: PyAV is already importable here")
    manifest = os.path.join(curated, "manifest", "clips.parquet")
    full, slim = str(tmp_path / "full"), str(tmp_path / "slim")
    carry.pack([manifest], full, str(wheel), frames=9)
    info = carry.pack([manifest], slim, "", frames=9, captions_only=True)
    # The same rows in the same order (so the same alignment prompt sets), no files.
    rows = {
        d: pq.read_table(os.path.join(d, carry.MANIFEST_NAME)).to_pylist() for d in (full, slim)
    }
    assert [r["clip_id"] for r in rows[slim]] == [r["clip_id"] for r in rows[full]]
    assert [r["end_s"] for r in rows[slim]] == [r["end_s"] for r in rows[full]]
    assert {r["clip_uri"] for r in rows[slim]} == {""} and info["has_clips"] is False
    assert sorted(os.listdir(slim)) == [carry.INFO_NAME, carry.MANIFEST_NAME, carry.TEXTS_NAME]
    texts = {d: set(safe_open_keys(os.path.join(d, carry.TEXTS_NAME))) for d in (full, slim)}
    assert texts[slim] == {k for k in texts[full] if not carry.is_plan_key(k)}
    # Unpacking it installs no PyAV and names no clip.
    monkeypatch.setattr(carry, "install_pyav", lambda d: pytest.fail("PyAV installed"))
    unpacked = pq.read_table(carry.unpack(slim, str(tmp_path / "work"))).to_pylist()
    assert [r["clip_id"] for r in unpacked] == [r["clip_id"] for r in rows[slim]]
    assert {r["clip_uri"] for r in unpacked} == {""}
    # A job whose reward model would encode corpus clips is refused before any work.
    with pytest.raises(SystemExit, match="carries captions only.*--corpus-contrasts 0"):
        align_job.main(["--carry", slim, "--out", str(tmp_path / "out"), "--run",
                        str(tmp_path / "run"), "--reward-only"])  # fmt: skip
    # So is a Fast student trained against real clips.
    with pytest.raises(SystemExit, match="carries captions only.*--gan-weight 0"):
        align_job.main(["--carry", slim, "--out", str(tmp_path / "out"), "--run",
                        str(tmp_path / "run"), "--skip-rlhf", "--gan-weight", "0.01",
                        "--classifier-weight", "0.1"])  # fmt: skip


def safe_open_keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())
