"""The web page suggests what the served model was trained on and offers the API's
modes. The page once suggested "a red ball bounces on a wooden floor" to a model that
had never seen one of those words; here its examples come from the checkpoint
(recorded captions, else its data's captions, filtered by its recorded vocabulary),
checked in headless Chromium (Debian's ``chromium``, driven by Playwright) against
the shipped checkpoint, and the multi-shot and V2V forms send what the API takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipelines.train.vocabulary import caption_words
from serve.config import serve_config_from
from serve.examples import model_examples, pick_examples

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "default"
KEY = "web-examples-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_examples_are_known_words_and_varied():
    vocabulary = ["a", "and", "blue", "bounce", "circle", "circles", "collide", "red", "two"]
    captions = [
        "two red circles bounce",
        "two blue circles bounce",
        "a red circle and a blue circle collide",
        "a red ball bounces on a wooden floor",  # words it never saw: never suggested
        "two red circles bounce",  # duplicates count once
    ]
    picked = pick_examples(captions, vocabulary, limit=2)
    # The second example brings new words (collide), not another colour of the first.
    assert picked == ["two red circles bounce", "a red circle and a blue circle collide"]
    assert "a red ball bounces on a wooden floor" not in pick_examples(captions, vocabulary, 9)
    # A checkpoint that records no vocabulary: its captions are all it has.
    assert len(pick_examples(captions, None, 9)) == 4


def test_examples_come_from_the_checkpoint_else_its_data(tmp_path):
    """Recorded captions first; a checkpoint recording none falls back to its training
    data's captions; with neither, only the vocabulary (random weights: nothing)."""
    from model.pipeline import DuetPipeline
    from pipelines.train.conditioning import CorpusSpec, build_corpus

    pipe = DuetPipeline.from_preset("tiny", seed=0)
    vocab = ["a", "blue", "circle", "red", "square"]
    recorded = str(tmp_path / "recorded")
    pipe.save(recorded, extra={"caption_vocabulary": vocab,
                               "caption_examples": ["a red square", "a green square"]})  # fmt: skip
    assert model_examples(recorded) == {"prompts": ["a red square"], "vocabulary": vocab}

    manifest = build_corpus(str(tmp_path / "corpus"), CorpusSpec(sources=2, shots_per_source=2))
    from_data = str(tmp_path / "from-data")
    pipe.save(
        from_data,
        extra={"train_config": {"data": {"curated_uri": manifest, "frame_buckets": [17]}}},
    )
    prompts = model_examples(from_data)["prompts"]
    assert prompts and all(p.endswith("on a gray floor") for p in prompts), prompts

    gone = str(tmp_path / "data-gone")
    pipe.save(gone, extra={"caption_vocabulary": vocab,
                           "train_config": {"data": {"curated_uri": str(tmp_path / "nope")}}})  # fmt: skip
    assert model_examples(gone) == {"prompts": [], "vocabulary": vocab}
    assert model_examples(None) == {"prompts": [], "vocabulary": []}


def test_the_shipped_checkpoint_records_examples_of_known_words():
    meta = json.loads((SHIPPED / "config.json").read_text())
    examples = model_examples(str(SHIPPED))
    assert examples["vocabulary"] == meta["extra"]["caption_vocabulary"]
    assert len(examples["prompts"]) >= 4
    for prompt in examples["prompts"]:
        assert set(caption_words(prompt)) <= set(examples["vocabulary"]), prompt


def _source_video(path: Path) -> None:
    from core.media import AVClip, write_mp4

    frames = np.zeros((9, 128, 128, 3), np.uint8)
    frames[:, 40:80, 40:80] = (200, 30, 30)
    audio = np.zeros((2, 16000 * 9 // 16), np.float32)
    write_mp4(str(path), AVClip(frames=frames, fps=16.0, audio=audio, sample_rate=16000))


@pytest.mark.skipif(CHROMIUM is None, reason="system chromium missing (make installs it)")
def test_the_page_suggests_what_the_shipped_model_knows_and_offers_every_mode(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from serve.jobs import JobStore
    from serve.local import ServerThread, build_local_app

    config = serve_config_from(
        {
            "checkpoint": str(SHIPPED),
            "jobs_uri": str(tmp_path / "jobs"),
            "api_keys": [KEY],
            "fast": {"steps": 1, "sampler": "euler"},
            "full": {"steps": 1, "sampler": "euler"},
        }
    )
    vocabulary = set(
        json.loads((SHIPPED / "config.json").read_text())["extra"]["caption_vocabulary"]
    )
    source = tmp_path / "source.mp4"
    _source_video(source)
    app, backend = build_local_app(config)
    store = JobStore(config.jobs_uri)
    with ServerThread(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            # The example prompts and the placeholder: the shipped model's own words.
            placeholder = page.get_attribute("#prompt", "placeholder")
            examples = page.locator("#examples button").all_text_contents()
            assert len(examples) >= 4 and placeholder == examples[0], (placeholder, examples)
            for text in examples:
                assert set(caption_words(text)) <= vocabulary, text
            assert "wooden" not in page.content()
            page.locator("#examples button").nth(1).click()
            expect(page.locator("#prompt")).to_have_value(examples[1])
            # Every mode of the API is offered.
            offered = page.eval_on_selector_all(
                "#mode option", "os => os.filter(o => !o.hidden).map(o => o.value)"
            )
            info = httpx.get(server.url + "v1/info", headers={"X-API-Key": KEY}).json()
            assert sorted(offered) == sorted(info["modes"]), (offered, info["modes"])
            page.fill("#api-key", KEY)

            # A multi-shot plan from two examples: the API gets the shots.
            page.select_option("#mode", "multishot")
            expect(page.locator("#prompt")).to_be_hidden()
            page.locator("#examples button").nth(0).click()
            page.locator("#examples button").nth(2).click()
            page.select_option("#transition", "fade")
            with page.expect_response("**/v1/jobs/upload") as answer:
                page.click("#submit")
            assert answer.value.status == 202, answer.value.text()
            sent = store.load(answer.value.json()["id"]).spec  # as the API took it
            assert sent["mode"] == "multishot"
            assert [s["prompt"] for s in sent["shots"]] == [examples[0], examples[2]]
            assert {s["transition"] for s in sent["shots"]} == {"fade"}
            expect(page.locator("#job-id")).not_to_be_empty()
            page.click("#cancel")

            # V2V: a source video uploaded with the request, its audio kept.
            page.select_option("#mode", "v2v")
            page.fill("#prompt", examples[0])
            page.set_input_files("#source", str(source))
            page.select_option("#keep", "audio")
            with page.expect_response("**/v1/jobs/upload") as answer:
                page.click("#submit")
            assert answer.value.status == 202, answer.value.text()
            record = store.load(answer.value.json()["id"])
            sent = record.spec
            assert sent["mode"] == "v2v" and sent["keep_audio"] and not sent["keep_video"]
            assert sent["prompt"] == examples[0] and len(record.inputs["source"]) == 1
            page.click("#cancel")

            # A2V: a picture for an audio track (the clip's sound as the source).
            page.select_option("#mode", "a2v")
            expect(page.locator("#strength")).to_be_hidden()
            page.set_input_files("#source", str(source))
            with page.expect_response("**/v1/jobs/upload") as answer:
                page.click("#submit")
            assert answer.value.status == 202, answer.value.text()
            record = store.load(answer.value.json()["id"])
            assert record.spec["mode"] == "a2v" and len(record.inputs["source"]) == 1
            page.click("#cancel")
        finally:
            browser.close()
    backend.close()
