"""``duet serve`` and ``duet batch`` refuse bad input with a clear message (exit 2)."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_serve_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "serve.toml"
    bad.write_text("[fast]\nmax_replicas = 0\n")
    result = runner.invoke(app, ["serve", "--config", str(bad)])
    assert result.exit_code == 2
    assert "max_replicas" in result.output
    typo = tmp_path / "typo.toml"
    typo.write_text("[fast]\nmax_replica = 3\n")
    result = runner.invoke(app, ["serve", "--config", str(typo)])
    assert result.exit_code == 2 and "unknown field" in result.output


def test_serve_refuses_without_a_checkpoint(tmp_path, monkeypatch):
    from model import checkpoint

    monkeypatch.delenv(checkpoint.DEFAULT_CHECKPOINT_ENV, raising=False)
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT_DIR", tmp_path / "none")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "no checkpoint to serve" in result.output


def test_batch_refuses_a_bad_brief(tmp_path):
    brief = tmp_path / "brief.toml"
    brief.write_text('prompt_templates = ["a {colour} ball"]\n')
    result = runner.invoke(app, ["batch", str(brief), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown slot" in result.output
    assert not (tmp_path / "out").exists()
