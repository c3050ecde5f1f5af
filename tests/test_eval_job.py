"""The held-out quality job (pipelines.shipped.eval_job) where text-encoder weights are
missing: a table made beforehand must serve every text and plan the run conditions on."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(600)


def test_a_table_made_beforehand_serves_every_family_of_the_run(tmp_path, monkeypatch):
    import model.pipeline
    from model.pipeline import DuetPipeline
    from pipelines.shipped import carry, eval_job

    # --text-table swaps the pipeline's encoder class: put it back afterwards.
    monkeypatch.setattr(model.pipeline, "FrozenTextEncoder", model.pipeline.FrozenTextEncoder)
    monkeypatch.setattr(carry.TableTextEncoder, "table", {})
    ckpt = str(tmp_path / "ckpt")
    DuetPipeline.from_preset("tiny", seed=0).save(ckpt)
    table = str(tmp_path / "texts.safetensors")
    counts = ["--text", "2", "--edits", "1", "--multishot", "1", "--references", "1"]
    eval_job.main(["--checkpoint", ckpt, *counts, "--make-text-table", table])

    from safetensors import safe_open

    with safe_open(table, "pt") as f:
        keys = set(f.keys())
    assert any(carry.is_plan_key(k) for k in keys)  # the two-shot plan, encoded whole
    assert "@image1 subject" in keys  # binding phrases

    # With the encoder's weights unreachable, only the table can answer.
    def no_weights(*_, **__):
        raise AssertionError("the frozen text encoder was built")

    monkeypatch.setattr(model.pipeline, "FrozenTextEncoder", no_weights)
    out = tmp_path / "quality.json"
    eval_job.main(
        ["--checkpoint", ckpt, *counts, "--steps", "1", "--text-table", table,
         "--text-from-table", "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    for family in ("text", "edit", "multishot", "reference"):
        assert "error" not in result[family], result[family]
    assert result["text"]["clips"] == 2
    assert result["multishot"]["plans"] == 1
