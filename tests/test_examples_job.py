"""The page's example prompts recorded in a checkpoint (pipelines.shipped.examples_job):
only captions the checkpoint knows every word of are tried, in the page's varied order;
only those recognised on every seed are kept; the record changes config.json and
nothing else, and the page then offers exactly those."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from model.pipeline import DuetPipeline
from pipelines.shipped import examples_job
from serve.examples import model_examples

VOCABULARY = ["a", "and", "blue", "bounce", "circle", "circles", "red", "square", "two"]
CAPTIONS = [
    "a red circle",
    "two blue circles bounce",
    "a red ball bounces on a wooden floor",  # unknown words: never tried
    "a blue square and a red circle",
    "a blue circle",
]


def test_only_known_captions_recognised_on_every_seed_are_kept(monkeypatch):
    asked = []

    def verdict(pipeline, prompt, seeds, settings):
        asked.append((prompt, list(seeds)))
        # None: the probes cannot read it (neither kept nor counted as tried).
        verdicts = {"a red circle": True, "two blue circles bounce": False, "a blue circle": None}
        return verdicts.get(prompt, True)

    monkeypatch.setattr(examples_job, "recognised", verdict)
    chosen, tried = examples_job.choose_examples(
        None, CAPTIONS, VOCABULARY, count=2, seeds=range(3, 5), settings=None, log=lambda _: None
    )
    # The page's order: the shortest first, then the most new words; the one not
    # recognised is passed over and the next taken, up to the count.
    assert [p for p, _ in asked] == [
        "a red circle", "two blue circles bounce", "a blue square and a red circle"
    ]  # fmt: skip
    assert chosen == ["a red circle", "a blue square and a red circle"] and tried == 3
    assert all(seeds == [3, 4] for _, seeds in asked)
    assert "a red ball bounces on a wooden floor" not in [p for p, _ in asked]

    asked.clear()
    chosen, tried = examples_job.choose_examples(
        None, CAPTIONS, VOCABULARY, count=9, seeds=range(1), settings=None, log=lambda _: None
    )
    assert chosen == ["a red circle", "a blue square and a red circle"] and tried == 3
    assert "a blue circle" in [p for p, _ in asked]


def test_the_record_touches_config_json_only_and_the_page_offers_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    DuetPipeline.from_preset("tiny", seed=0).save(
        str(ckpt), extra={"caption_vocabulary": VOCABULARY, "caption_examples": ["a blue circle"]}
    )
    weights = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.glob("*.safetensors")
    }
    check = {"seeds": [0, 1], "recognised": 2, "tried": 3}
    examples_job.record(str(ckpt), ["a red circle", "a blue square and a red circle"], check)

    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.glob("*.safetensors")}
    assert after == weights
    DuetPipeline.from_checkpoint(str(ckpt))  # still loads: its weight hashes still match
    page = model_examples(str(ckpt))
    assert sorted(page["prompts"]) == ["a blue square and a red circle", "a red circle"]
    meta = (Path(ckpt) / "config.json").read_text()
    assert '"caption_examples_check"' in meta and '"tried": 3' in meta


def test_a_checkpoint_without_a_vocabulary_is_refused(tmp_path):
    ckpt = tmp_path / "bare"
    DuetPipeline.from_preset("tiny", seed=0).save(str(ckpt))
    with pytest.raises(SystemExit) as err:
        examples_job.main(["--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.parquet")])
    assert err.value.code == 2
