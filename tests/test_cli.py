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
