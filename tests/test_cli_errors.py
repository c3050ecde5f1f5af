"""A newcomer's mistakes with ``duet``, each answered by one ``error:`` line and exit
code 2 (what was named cannot be used) or 1 (the work failed), never a traceback
(issue 27). The commands run in this process; no Ray or Prefect server starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, terminal_width=80, env={"COLUMNS": "80"})


def _one_line_error(result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]  # closed when the block ends: nothing listens there


@pytest.fixture
def absent_prefect(closed_port, monkeypatch):
    """PREFECT_API_URL at a port nothing listens on. Prefect reads its settings once,
    at import, so the setting is changed through Prefect as well as the environment."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{closed_port}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def test_an_absent_prefect_server_is_one_line_before_any_flow_starts(
    absent_prefect, tmp_path, monkeypatch
):
    """Prefect itself retries for 30 s and ends in a traceback from its client."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"not read: the check comes first")
    curate = _invoke(["curate", "raw/*.mp4", "--out", "curated", "--no-speech"])
    line = _one_line_error(curate, 2, f"no Prefect server answers at {absent_prefect}")
    assert "make up" in line and "unset PREFECT_API_URL" in line
    assert not (tmp_path / "curated").exists()
    batch = _invoke(["batch", str(ROOT / "serve" / "example-brief.toml"), "--out", "batch"])
    _one_line_error(batch, 2, f"no Prefect server answers at {absent_prefect}", "make up")
    demo = _invoke(["demo", "--out", "demo_out", "--quick"])
    _one_line_error(demo, 2, f"no Prefect server answers at {absent_prefect}")
    assert not (tmp_path / "demo_out").exists()  # refused before the first step
    # Registering deployments has no temporary server to fall back on.
    deploy = _invoke(["deploy", "--target", "local"])
    line = _one_line_error(deploy, 2, f"no Prefect server answers at {absent_prefect}")
    assert "unset" not in line


def test_deploy_without_a_prefect_server_named_says_where_to_get_one(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = _invoke(["deploy", "--target", "local"])
    _one_line_error(result, 2, "PREFECT_API_URL is not set", ".duet-stack/env.sh")


def test_a_bad_curation_config_is_one_line(tmp_path, monkeypatch):
    """Printed through rich before, it wrapped at the terminal's width."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("clips = = 2\n")
    args = ["curate", "raw/*.mp4", "--out", "curated", "--no-speech", "--config"]
    _one_line_error(_invoke([*args, "missing.toml"]), 2, "bad configuration:", "missing.toml")
    _one_line_error(_invoke([*args, "bad.toml"]), 2, "bad configuration:", "not valid TOML")
    assert not (tmp_path / "curated").exists()


def test_probing_a_file_that_is_not_media_is_one_line(tmp_path):
    notes = tmp_path / "a folder with a long name" / ("notes-" + "x" * 60 + ".mp4")
    notes.parent.mkdir()
    notes.write_text("meeting notes, not a video")
    result = _invoke(["probe", str(notes)])
    _one_line_error(result, 1, f"cannot probe {notes}", "not readable as media")
    assert result.stdout == ""  # stdout stays parseable: nothing, not half a JSON


def test_generate_refuses_a_reward_model_as_its_checkpoint(tmp_path):
    """The rlhf stage's reward model sits in the run folder beside the checkpoints."""
    import torch

    from pipelines.align.reward import REWARD_PRESETS, RewardModel, save_reward_model

    reward = tmp_path / "run" / "rlhf" / "reward"
    torch.manual_seed(0)
    tiny = RewardModel(4, 4, 8, 2, REWARD_PRESETS["tiny"])
    save_reward_model(str(reward), tiny, {"report": {}})
    out = tmp_path / "clip.mp4"
    args = ["generate", "-p", "a ball", "-o", str(out), "--checkpoint", str(reward)]
    _one_line_error(_invoke(args), 2, f"{reward} is a reward model", "sft/final")
    assert not out.exists()


def test_train_says_a_newer_manifest_needs_a_newer_duet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.manifest import SCHEMA_VERSION

    manifest = tmp_path / "curated" / "manifest"
    manifest.mkdir(parents=True)
    newer = str(SCHEMA_VERSION + 1).encode()
    table = pa.table({"clip_id": ["c0"], "keep": [True]})
    pq.write_table(
        table.replace_schema_metadata({b"duet.schema_version": newer}),
        manifest / "clips.parquet",
    )
    args = ["train", "vae", "--data", str(tmp_path / "curated"), "--run",
            str(tmp_path / "run"), "--runner", "local", "--steps", "1"]  # fmt: skip
    line = _one_line_error(_invoke(args), 2, f"schema_version {SCHEMA_VERSION + 1}")
    assert "written by a newer Duet" in line and "git pull" in line
    assert not (tmp_path / "run").exists()


def test_serve_refuses_a_checkpoint_that_cannot_generate_before_ray_starts(tmp_path, closed_port):
    """Found in a replica's log before, after Ray and Serve had started (or, for a
    vae-stage checkpoint, never: its untrained DiT served noise). The cluster named
    is absent, so a serve that skipped the check stops there instead of serving."""
    from model.pipeline import DuetPipeline

    vae = tmp_path / "run" / "vae" / "final"
    DuetPipeline.from_preset("tiny", seed=0).save(str(vae), extra={"stage": "vae"})
    args = ["serve", "--ray-address", f"127.0.0.1:{closed_port}", "--checkpoint"]
    _one_line_error(_invoke([*args, str(vae)]), 2, f"{vae} is a vae-stage checkpoint")
    run = tmp_path / "run"
    _one_line_error(_invoke([*args, str(run)]), 2, f"{run} is not a checkpoint", str(vae))
