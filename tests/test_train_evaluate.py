"""Prompt adherence scoring (pipelines.train.evaluate) on clips whose content is known.

The end-to-end test only prints the adherence of CPU-trained checkpoints (they draw
nothing the probes detect yet); what is checked here is that the numbers mean what
they say: a clip showing exactly the named objects scores 1, extra or missing
objects cost, and the summary averages prompts x seeds.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from core.media import AVClip
from core.synth import palette, raster
from pipelines.align.prompts import caption_prompts
from pipelines.train import evaluate
from pipelines.train.evaluate import EvalSettings, clip_scores, evaluate_adherence

H, W, FPS, SR = 96, 128, 16, 16000


def _still(objects: list[tuple[str, str]], frames: int = 8) -> AVClip:
    """A still shot of the given (colour, shape) objects on the day backdrop, silent."""
    sky, floor = next(iter(palette.backgrounds("day").values()))
    image = raster.backdrop(H, W, sky, floor, 70)
    for i, (color, shape) in enumerate(objects):
        raster.draw_shape(image, shape, 24.0 + 40 * i, 36.0, 10.0, palette.object_rgb(color))
    frame = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    audio = np.zeros((2, frames * SR // FPS), dtype=np.float32)
    return AVClip(np.repeat(frame[None], frames, axis=0), FPS, audio, SR)


def test_clip_scores_reward_exactly_the_named_objects():
    clip = _still([("red", "circle"), ("blue", "square")])
    exact = clip_scores("a red circle and a blue square", clip)
    assert exact == {"adherence": 1.0, "colour_recall": 1.0, "colour_precision": 1.0}
    # One object too many in the picture: IoU 1/2; half the colours seen were asked for.
    extra = clip_scores("a red circle", clip)
    assert extra == {"adherence": 0.5, "colour_recall": 1.0, "colour_precision": 0.5}
    # The right colour on the wrong shape counts for colour, not for the object.
    shape = clip_scores("a red triangle and a blue square", clip)
    assert shape["adherence"] == pytest.approx(1 / 3) and shape["colour_recall"] == 1.0
    assert clip_scores("a green triangle", clip) == {
        "adherence": 0.0,
        "colour_recall": 0.0,
        "colour_precision": 0.0,
    }
    empty = clip_scores("a red circle", _still([]))
    assert empty == {"adherence": 0.0, "colour_recall": 0.0, "colour_precision": 0.0}


def test_evaluate_adherence_averages_prompts_and_seeds(monkeypatch):
    """Generation replaced by a drawer that gets seed 0 right and draws nothing for
    seed 1: the mean is 1/2; a prompt naming no shape is skipped, not scored 0."""
    from core.probes.captions import parse_caption

    def fake_generate(request, pipeline):
        assert pipeline == "the pipeline" and request.steps == 3
        wanted = list(parse_caption(request.prompt).elements()) if request.seed == 0 else []
        return SimpleNamespace(clip=_still(wanted))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    prompts = ["a red circle", "a yellow square and a blue triangle", "someone says hello"]
    result = evaluate_adherence("the pipeline", prompts, EvalSettings(seeds=(0, 1), steps=3))
    assert result["clips"] == 4 and {r["prompt"] for r in result["rows"]} == set(prompts[:2])
    assert result["adherence"] == result["colour_recall"] == 0.5
    assert [r["adherence"] for r in result["rows"]] == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="no prompt names a coloured shape"):
        evaluate_adherence("the pipeline", prompts[2:], EvalSettings(seeds=(0,), steps=3))


def test_held_out_prompts_drop_dialogue_and_put_whole_scenes_first():
    """A talking-avatar caption loses its line and the verb before it (never "a yellow
    face says"); captions that had no line come first; duplicates and captions that
    name no coloured shape are left out."""
    rows = [
        SimpleNamespace(text='a yellow face says "the red ball is here"'),
        SimpleNamespace(text="a red circle bounces on a gray floor"),
        SimpleNamespace(text='a yellow face says "another line"'),
        SimpleNamespace(text="the camera pans"),
        SimpleNamespace(text="a red circle bounces on a gray floor"),
    ]
    assert evaluate.held_out_prompts(rows) == [
        "a red circle bounces on a gray floor",
        "a yellow face",
    ]
    assert evaluate.held_out_prompts(rows, limit=1) == ["a red circle bounces on a gray floor"]
    assert caption_prompts([r.text for r in rows]) == [  # the alignment stages' prompts
        "a red circle bounces on a gray floor",
        "a yellow face",
        "the camera pans",
    ]
