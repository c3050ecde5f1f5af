"""What a new user sees from ``duet``: readable help at 80 columns, parseable probe
JSON, the clip's duration, a refusal instead of noise, a quiet install."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def _command_paths(group=None, prefix=()) -> list[list[str]]:
    """Every leaf command of ``duet`` (subcommands added later are covered too)."""
    group = group or get_command(app)
    paths = []
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            paths += _command_paths(command, (*prefix, name))
        else:
            paths.append([*prefix, name])
    return paths


COMMANDS = _command_paths()


def _invoke(args, **kwargs):
    return CliRunner().invoke(app, args, terminal_width=80, env={"COLUMNS": "80"}, **kwargs)


def test_every_known_command_is_covered():
    assert {"synth", "probe", "generate", "curate", "demo", "model info"} <= {
        " ".join(p) for p in COMMANDS
    }


def _option_names(path: list[str]) -> list[str]:
    command = get_command(app)
    for name in path:
        command = command.commands[name]
    return [opt for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("-")]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_at_80_columns_shows_every_option_name_whole(path):
    result = _invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    words = set(result.output.replace(",", " ").replace("/", " ").split())
    missing = [name for name in _option_names(path) if name not in words]
    assert not missing, f"cut or missing in --help: {missing}\n{result.output}"


def test_probe_prints_only_json_on_stdout(tmp_path):
    from core.synth import SynthConfig, generate_corpus

    config = SynthConfig(
        width=96, height=64, min_shots=1, max_shots=1, min_shot_s=2.5, max_shot_s=2.5,
        kinds=("bouncing_balls",),
    )  # fmt: skip
    (uri,) = generate_corpus(str(tmp_path), 1, seed=3, config=config)
    result = _invoke(["probe", uri])
    assert result.exit_code == 0, result.output
    probed = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert "av_offset_ms" in probed and "frames" not in probed
    assert "errors against ground truth" in result.stderr


@pytest.fixture
def no_default_checkpoint(monkeypatch, tmp_path):
    from model import checkpoint

    monkeypatch.delenv(checkpoint.DEFAULT_CHECKPOINT_ENV, raising=False)
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT_DIR", tmp_path / "no-default")


def test_generate_refuses_without_a_checkpoint(no_default_checkpoint, tmp_path):
    out = tmp_path / "clip.mp4"
    result = _invoke(["generate", "--prompt", "a red ball", "--out", str(out)])
    assert result.exit_code == 2
    assert "no checkpoint" in result.stderr and "--checkpoint" in result.stderr
    assert not out.exists()
    both = _invoke(["generate", "--out", str(out), "--checkpoint", "x", "--random-weights"])
    assert both.exit_code == 2 and "exclude" in both.stderr


def test_default_checkpoint_lookup(monkeypatch, tmp_path):
    from model import checkpoint

    monkeypatch.delenv(checkpoint.DEFAULT_CHECKPOINT_ENV, raising=False)
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT_DIR", tmp_path)
    assert checkpoint.default_checkpoint() is None  # a directory without a checkpoint
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint.default_checkpoint() == str(tmp_path)
    monkeypatch.setenv(checkpoint.DEFAULT_CHECKPOINT_ENV, "s3://bucket/ckpt")
    assert checkpoint.default_checkpoint() == "s3://bucket/ckpt"


def test_generate_from_the_default_checkpoint_reports_the_clip_duration(
    no_default_checkpoint, monkeypatch, tmp_path
):
    from core.media import probe_media
    from model.pipeline import DuetPipeline

    ckpt = tmp_path / "ckpt"
    DuetPipeline.from_preset("tiny").save(str(ckpt))
    monkeypatch.setenv("DUET_CHECKPOINT", str(ckpt))
    out = tmp_path / "clip.mp4"
    result = _invoke(
        ["generate", "-p", "a ball", "-o", str(out), "--steps", "1", "--duration", "1"]
    )
    assert result.exit_code == 0, result.output
    info = probe_media(str(out))
    # 17 frames at 16 fps: the printed duration is the clip's, the elapsed time is named.
    assert info.frame_count == 17
    assert "1.06 s (17 frames @ 16 fps)" in result.stdout
    assert "generated in" in result.stdout
    assert json.loads((tmp_path / "clip.json").read_text())["checkpoint"] == str(ckpt)


def test_license_is_an_spdx_string_setuptools_applies_without_a_warning():
    import tomllib

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "setuptools>=77" in data["build-system"]["requires"]  # first with SPDX strings
    # Applying the table as the build does: the TOML-table form warns here.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


# -- a newcomer's chains and mistakes: one line, no traceback (issue 27) ---------------


def _one_line_error(result, code: int, *words: str) -> str:
    """The single ``error: ...`` line a failed command printed, checked."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # Progress lines may come first; the error is the one last line, no traceback.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_missing_paths_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(_invoke(["probe", "missing.mp4"]), 2, "missing.mp4", "no such file")
    _one_line_error(
        _invoke(["train", "vae", "--data", "missing", "--run", "run", "--runner", "local"]),
        2,
        "no manifest at",
        "duet curate",
    )
    _one_line_error(_invoke(["train", "vae", "--run", "run", "--runner", "local"]), 2, "--data")
    _one_line_error(_invoke(["serve", "--config", "missing.toml"]), 2, "missing.toml")
    _one_line_error(
        _invoke(["generate", "-p", "a ball", "-o", "c.mp4", "--checkpoint", "missing"]),
        2,
        "no such checkpoint",
    )
    _one_line_error(
        _invoke(["curate", "raw/*.mp4", "--out", "curated", "--no-speech"]), 2, "no file matches"
    )
    assert not (tmp_path / "curated").exists() and not (tmp_path / "run").exists()


def _save_tiny(uri: Path, extra: dict) -> str:
    from model.pipeline import DuetPipeline

    DuetPipeline.from_preset("tiny", seed=0).save(str(uri), extra=extra)
    return str(uri)


def test_generate_refuses_a_checkpoint_of_the_wrong_kind(tmp_path):
    run = tmp_path / "run"
    _save_tiny(run / "sft" / "final", {"stage": "sft"})
    vae = _save_tiny(run / "vae" / "final", {"stage": "vae"})
    out = tmp_path / "clip.mp4"
    line = _one_line_error(
        _invoke(["generate", "-p", "a ball", "-o", str(out), "--checkpoint", str(run)]),
        2,
        "is not a checkpoint",
    )
    assert str(run / "sft" / "final") in line  # the run's checkpoints are named
    _one_line_error(
        _invoke(["generate", "-p", "a ball", "-o", str(out), "--checkpoint", vae]),
        2,
        "vae-stage checkpoint",
    )
    assert not out.exists()


def test_train_refuses_a_manifest_of_another_schema_version(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"clip_id": ["c0"], "keep": [True]})
    manifest = tmp_path / "curated" / "manifest"
    manifest.mkdir(parents=True)
    pq.write_table(
        table.replace_schema_metadata({b"duet.schema_version": b"1"}),
        manifest / "clips.parquet",
    )
    args = ["train", "vae", "--data", str(tmp_path / "curated"), "--run",
            str(tmp_path / "run"), "--runner", "local", "--steps", "1"]  # fmt: skip
    _one_line_error(_invoke(args), 2, "schema_version 1", "curate the footage again")
    assert not (tmp_path / "run").exists()
    # A hand-built manifest records no version (the conditioning corpus): training
    # reads it as before, and here finds what it lacks.
    pq.write_table(table, manifest / "clips.parquet")
    line = _one_line_error(_invoke(args), 2, "lacks columns")
    assert "schema_version" not in line


def test_generate_warns_about_prompt_words_outside_the_checkpoints_captions(tmp_path):
    vocabulary = ["a", "bounces", "circle", "floor", "gray", "on", "red", "square"]
    ckpt = _save_tiny(tmp_path / "ckpt", {"stage": "sft", "caption_vocabulary": vocabulary})
    args = ["generate", "-o", str(tmp_path / "c.mp4"), "--checkpoint", ckpt, "--steps", "1",
            "--duration", "1"]  # fmt: skip
    result = _invoke([*args, "-p", "a red ball bounces on a wooden flor"])
    assert result.exit_code == 0, result.output
    warnings_ = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1, result.stderr
    assert "'ball'" in warnings_[0] and "'wooden'" in warnings_[0]
    assert "'flor' (nearest known: floor" in warnings_[0]
    assert "'red'" not in warnings_[0]
    known = _invoke([*args, "-p", "a red circle bounces on a gray floor"])
    assert known.exit_code == 0 and "warning:" not in known.stderr, known.stderr


def test_caption_vocabulary_joins_the_parents():
    from pipelines.train.vocabulary import unknown_words, vocabulary_of

    words = vocabulary_of(['A red circle "Hello, world!"', "a BLUE square"], ["slide"])
    assert words == ["a", "blue", "circle", "hello", "red", "slide", "square", "world"]
    assert unknown_words("a red squares", words) == {"squares": ["square"]}


def test_generate_then_probe_tells_metadata_from_ground_truth(tmp_path):
    clip = tmp_path / "clip.mp4"
    made = _invoke(["generate", "--random-weights", "-p", "a red circle bounces on a gray floor",
                    "-o", str(clip), "--steps", "1", "--duration", "1"])  # fmt: skip
    assert made.exit_code == 0, made.output
    sidecar = tmp_path / "clip.json"
    metadata = json.loads(sidecar.read_text())
    for written in (metadata, {k: v for k, v in metadata.items() if k != "kind"}):  # old files
        sidecar.write_text(json.dumps(written))
        probed = _invoke(["probe", str(clip)])
        assert probed.exit_code == 0, (probed.output, probed.exception)
        assert json.loads(probed.stdout)["num_frames"] == metadata["num_frames"]
        assert "generation metadata, not ground truth" in probed.stderr
        assert "caption adherence" in probed.stderr
        assert "errors against ground truth" not in probed.stderr
    sidecar.write_text(json.dumps({"note": "mine"}))
    probed = _invoke(["probe", str(clip)])
    assert probed.exit_code == 0 and "neither ground truth nor generation" in probed.stderr


def test_serve_refuses_an_occupied_port_in_one_line(tmp_path):
    import socket
    import subprocess
    import sys

    duet = Path(sys.executable).with_name("duet")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [str(duet), "serve", "--local", "--port", str(port)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: "), done.stderr
    assert f"port {port}" in lines[0] and "in use" in lines[0]


def test_paths_are_made_absolute_against_the_callers_folder(tmp_path, monkeypatch):
    from core.storage import absolute_uri
    from pipelines.train.config import train_config_from, with_absolute_uris

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("demo_out") == str(tmp_path / "demo_out")
    assert absolute_uri("raw/*.mp4") == str(tmp_path / "raw") + "/*.mp4"
    assert absolute_uri("file://demo_out") == f"file://{tmp_path}/demo_out"
    assert absolute_uri("file:///data/x") == "file:///data/x"
    assert absolute_uri("s3://bucket/demo_out") == "s3://bucket/demo_out"
    assert absolute_uri("") == ""
    # What library callers of pipelines.train.train hand to the Ray Train workers.
    cfg = with_absolute_uris(
        train_config_from({"run_uri": "run", "data": {"curated_uri": "s3://b/curated"}})
    )
    assert cfg.run_uri == str(tmp_path / "run") and cfg.data.curated_uri == "s3://b/curated"
    assert cfg.data.latent_cache_uri == "" and cfg.init_from == ""


def test_an_unreachable_ray_cluster_is_one_line_in_seconds(tmp_path):
    """Ray retries an absent head for minutes; the driver checks the address first."""
    import socket
    import subprocess
    import sys

    duet = Path(sys.executable).with_name("duet")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed when the block ends: nothing listens there
    done = subprocess.run(
        [str(duet), "serve", "--ray-address", f"127.0.0.1:{port}", "--port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: "), done.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0]
    assert "make up" in lines[0]
