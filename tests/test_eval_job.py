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


def test_two_runs_compare_clip_by_clip_with_standard_errors(tmp_path, capsys):
    from pipelines.shipped import eval_job

    def text_row(prompt, colour, offset):
        return {"prompt": prompt, "colour": colour, "shape": 1.0, "pair": 0.0, "count": 0.0,
                "iou": 0.5, "av_offset_ms": offset}  # fmt: skip

    old = {"text": {"rows": [text_row("a", 1.0, -40.0), text_row("b", 0.0, None),
                             text_row("c", 0.5, 10.0), text_row("only old", 0.0, 5.0)]},
           "reference": {"rows": [{"reference_colour": "red", "followed": False},
                                  {"reference_colour": "blue", "followed": False}]}}  # fmt: skip
    # Rows in another order, one prompt the old run never made: pairs are by prompt.
    new = {"text": {"rows": [text_row("c", 1.0, -20.0), text_row("a", 1.0, 30.0),
                             text_row("b", 1.0, 70.0), text_row("only new", 1.0, 0.0)]},
           "reference": {"rows": [{"reference_colour": "red", "followed": True},
                                  {"reference_colour": "green", "followed": True}]}}  # fmt: skip
    paths = []
    for name, run in (("old", old), ("new", new)):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    rows = {r["measure"]: r for r in eval_job.main(["--compare", *paths])["comparison"]}
    colour = rows["colour adherence"]
    # diffs a: 0, b: +1, c: +0.5 -> mean 0.5, sample sd 0.5, se 0.5 / sqrt(3)
    assert colour["pairs"] == 3 and colour["diff"] == pytest.approx(0.5)
    assert colour["se"] == pytest.approx(0.5 / 3**0.5)
    assert (colour["old"], colour["new"]) == (pytest.approx(0.5), pytest.approx(1.0))
    offset = rows["absolute AV offset, ms (clips both measured)"]
    # b has no old offset; a: 40 -> 30, c: 10 -> 20 (absolute values)
    assert offset["pairs"] == 2 and offset["diff"] == pytest.approx(0.0)
    assert offset["se"] == pytest.approx(10.0)
    assert rows["shape adherence"]["diff"] == 0.0 and rows["shape adherence"]["se"] == 0.0
    reference = rows["image reference colour followed"]  # the second reference differs
    assert reference["pairs"] == 1 and reference["diff"] == 1.0
    assert (
        "| text | colour adherence | 3 | 0.500 | 1.000 | +0.500 +- 0.289 |"
        in capsys.readouterr().out
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"text": {"rows": [text_row("z", 1.0, None)]}}))
    with pytest.raises(SystemExit):  # no prompt in common: said, not an empty table
        eval_job.main(["--compare", paths[0], str(other)])
    with pytest.raises(SystemExit) as err:  # a missing run: one line, not a traceback
        eval_job.main(["--compare", paths[0], str(tmp_path / "missing.json")])
    assert err.value.code == 2 and "cannot read the eval run" in capsys.readouterr().err
