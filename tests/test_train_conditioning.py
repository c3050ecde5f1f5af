"""A model trained by ``pipelines.train`` uses its reference slots and per-shot prompts.

One session fixture (``tiny_conditioning_run`` in tests/conftest.py, shared with
tests/test_align.py) trains the ``tiny`` preset once, ``vae -> pretrain`` with the local
runner, on a synthetic corpus written by :mod:`pipelines.train.conditioning` (one-colour
``bouncing_balls`` shots on random day backdrops, consecutive shots of a source in
different colours, half the captions without their colour word). The trainer fills
the reference slots and builds the multi-shot samples from that data by itself
(:mod:`pipelines.train.batches`): image slot 0 is the clip's own first frame, slot 1
the first frame of another shot of the source; multi-shot samples are two
consecutive shots with their own captions.

What is measured, with the synthetic world's probe (:func:`core.probes.label_pixels`):

- references: the backdrop (the scene colour; every caption says "a gray floor",
  whatever the backdrop, so the text never names it) of clips generated with an
  image in slot 0, against the same prompt with the other images in slot 0. The ball's own
  colour is *not* carried over from a reference at this training budget (the
  generated ball fades out; ``bench/train_conditioning.py`` measures it), so the test
  does not claim it;
- multi-shot and slot order: measured by ``bench/train_conditioning.py``, not
  gated here (see the note above ``_r``).

Each check compares generations that differ only in the conditioning under test.
"""

from __future__ import annotations

import pytest
import torch

from model.pipeline import DuetPipeline
from pipelines.train.conditioning import (
    GenSettings,
    reference_backdrops,
    reference_frame,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

NO_COLOUR = "a circle bounces on a gray floor"
GEN = GenSettings(seeds=(0, 1, 2), steps=10)


@pytest.fixture(scope="module")
def trained(tiny_conditioning_run):
    """The session's conditioning run (tests/conftest.py): its pretrain final and run URI."""
    run = tiny_conditioning_run.run_uri
    return DuetPipeline.from_checkpoint(f"{run}/pretrain/final").eval(), run


@pytest.fixture(scope="module")
def model(trained):
    return trained[0]


@pytest.fixture(scope="module")
def backdrop_frames():
    """Reference images on three day backdrops (ball colours vary too)."""
    pairs = (("red", "beige"), ("blue", "slate"), ("yellow", "charcoal"))
    return {backdrop: reference_frame(colour, backdrop) for colour, backdrop in pairs}


def test_image_reference_backdrop_appears_though_the_text_names_none(model, backdrop_frames):
    """Slot 0's scene colour shows up in the generation; no caption ever names it.

    Each backdrop's share with its own image in slot 0 is compared with its share
    when slot 0 holds one of the other images (same prompt, same seeds): the image
    must cause it (>= 0.3 more), and it must be the generation's commonest backdrop.
    Not a fixed majority: the conditioning corpus differs a little from run to run
    (libx264 encodes the same frames differently; BENCHMARKS.md), and one run drew
    slate at 0.45 against 0.29 and 0.24 for the next backdrops, 0.06 under the
    other images."""
    alone = reference_backdrops(model, NO_COLOUR, [], GEN)
    print(f"no reference -> {_r(alone)}")
    got = {}
    for name, frame in backdrop_frames.items():
        got[name] = reference_backdrops(model, NO_COLOUR, [frame], GEN)
        print(f"slot 0 on {name} -> {_r(got[name])}")
    for name in got:
        elsewhere = max(got[other][name] for other in got if other != name)
        assert got[name][name] - elsewhere >= 0.3, (name, got)
        rivals = {k: v for k, v in got[name].items() if k != name}
        assert got[name][name] > max(rivals.values()), (name, got)


# Not tested here: slot order (swapping two images moves the output toward slot 0)
# and per-shot prompt following. At this CPU budget (1200 DiT steps) they were
# learned in 2 and 3 of 4 training runs, so as tests they could only be
# non-gating (an xfail that passes either way is not a test). They are measured
# by ``python bench/train_conditioning.py`` (numbers in BENCHMARKS.md) until a
# recipe learns them reliably.


def _r(d: dict) -> dict:
    return {k: round(v, 2) for k, v in d.items() if v >= 0.005}


def test_trainer_final_weights_are_the_ema(trained):
    """The stage's final DiT is the EMA the trainer kept (model.ema, tested in
    tests/test_ema.py), not the last step's raw weights."""
    from safetensors.torch import load_file

    from pipelines.train.state import EMA_NAME, latest_checkpoint

    _, run = trained
    last = latest_checkpoint(f"{run}/pretrain")
    ema = load_file(f"{last}/{EMA_NAME}")
    raw = load_file(f"{last}/model.safetensors")
    final = load_file(f"{run}/pretrain/final/model.safetensors")
    assert ema and all(torch.equal(final[f"dit.{k}"], v) for k, v in ema.items())
    moved = [k for k, v in ema.items() if not torch.equal(raw[f"dit.{k}"], v)]
    assert len(moved) > 0.9 * len(ema), (len(moved), len(ema))
