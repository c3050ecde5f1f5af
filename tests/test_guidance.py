"""Classifier-free guidance in model.samplers with a velocity model whose answers are known.

The fake model returns, per row, ``x + 1 + 2 p + 10 r`` for the video (``x / 2`` plus
the same for the audio), where ``p`` is the row's prompt value (0 for the null
prompt) and ``r`` is 1 when the row's image reference is present. So the three
predictions the sampler combines are known in closed form:

    unconditional (null, no refs)  1
    references only (null, refs)   1 + 10 r
    full (prompt, refs)            1 + 10 r + 2 p

and the guided velocity must be ``1 + s_ref 10 r + s_text 2 p`` (plus the state term).
"""

from __future__ import annotations

import pytest
import torch

from model.dit import TextConditioning
from model.references import ReferenceLatents, RefSlot
from model.samplers import Conditioning, Guidance, guided_velocity, sample

D = 4
PROMPTS = torch.tensor([1.0, 3.0, -0.5])  # per-row prompt values: mixing rows would show


class FakeVelocity:
    """Known conditional and unconditional outputs; records the batch of each call."""

    def __init__(self):
        self.calls: list[int] = []

    def null_text_conditioning(self, batch: int, device=None) -> TextConditioning:
        return TextConditioning(torch.zeros(batch, 1, D), torch.ones(batch, 1, dtype=torch.bool))

    def __call__(self, video, audio, t, text, references=None, shots=None):
        b = video.shape[0]
        self.calls.append(b)
        prompt = (text.tokens * text.mask[..., None]).sum(1)[:, 0]  # (B,) 0 for null
        ref = torch.zeros(b)
        if references is not None and references.images:
            slot = references.images[0]
            ref = torch.ones(b) if slot.present is None else slot.present.float()
        c = 1.0 + 2.0 * prompt + 10.0 * ref  # (B,)
        return video + c.view(-1, 1, 1, 1, 1), 0.5 * audio + c.view(-1, 1, 1)


def _inputs(present=None):
    gen = torch.Generator().manual_seed(0)
    b = len(PROMPTS)
    video = torch.randn(b, 2, 3, 2, 2, generator=gen)
    audio = torch.randn(b, 3, 8, generator=gen)
    tokens = torch.zeros(b, 2, D)
    tokens[:, 0, 0] = PROMPTS
    text = TextConditioning(tokens, torch.tensor([[True, False]] * b))
    refs = None
    if present is not None:
        latent = torch.randn(b, 2, 1, 2, 2, generator=gen)
        refs = ReferenceLatents(images=[RefSlot(latent, present)])
    return video, audio, Conditioning(text, refs)


def _expected(video, audio, s_text, s_ref, ref):
    c = 1.0 + s_ref * 10.0 * ref + s_text * 2.0 * PROMPTS
    return video + c.view(-1, 1, 1, 1, 1), 0.5 * audio + c.view(-1, 1, 1)


@pytest.mark.parametrize("s_text", [1.0, 0.0, 4.0, 7.5])
def test_text_guidance_mixes_conditional_and_unconditional(s_text):
    model = FakeVelocity()
    video, audio, cond = _inputs()
    v, a = guided_velocity(model, video, audio, 0.7, cond, Guidance(s_text, 2.0))
    ev, ea = _expected(video, audio, s_text, 0.0, torch.zeros(3))
    assert torch.allclose(v, ev, atol=1e-5) and torch.allclose(a, ea, atol=1e-5)
    # Scale 1 is the conditional prediction itself, in one forward of B rows;
    # otherwise one batched forward of 2B rows (prompt and null).
    assert model.calls == ([3] if s_text == 1.0 else [6])
    if s_text == 1.0:
        cv, ca = FakeVelocity()(video, audio, torch.full((3,), 0.7), cond.text)
        assert torch.equal(v, cv) and torch.equal(a, ca)


@pytest.mark.parametrize(("s_text", "s_ref"), [(1.0, 1.0), (4.0, 1.0), (1.0, 2.5), (4.0, 1.5)])
def test_reference_guidance_has_its_own_scale(s_text, s_ref):
    """Row 0 and 2 carry the image reference, row 1 does not: the reference term
    is scaled by s_ref where it is present and absent elsewhere."""
    model = FakeVelocity()
    present = torch.tensor([True, False, True])
    video, audio, cond = _inputs(present)
    v, a = guided_velocity(model, video, audio, 0.4, cond, Guidance(s_text, s_ref))
    ev, ea = _expected(video, audio, s_text, s_ref, present.float())
    assert torch.allclose(v, ev, atol=1e-5) and torch.allclose(a, ea, atol=1e-5)
    assert model.calls == ([3] if s_text == s_ref == 1.0 else [9])


def test_the_sampler_integrates_the_guided_velocity():
    """Euler with two steps on the fake model: each step adds dt times the guided
    velocity, so the result is known; Heun averages the two ends."""
    video, audio, cond = _inputs()
    times = torch.tensor([1.0, 0.5, 0.0])
    guidance = Guidance(3.0, 1.0)
    v_out, a_out = sample(FakeVelocity(), video, audio, cond, times, "euler", guidance)
    v, a = video, audio
    for dt in (-0.5, -0.5):
        gv, ga = _expected(v, a, 3.0, 0.0, torch.zeros(3))
        v, a = v + dt * gv, a + dt * ga
    assert torch.allclose(v_out, v, atol=1e-5) and torch.allclose(a_out, a, atol=1e-5)
    unguided, _ = sample(FakeVelocity(), video, audio, cond, times, "euler", Guidance(1.0, 1.0))
    assert not torch.allclose(unguided, v_out, atol=1e-5)
    one_step = torch.tensor([1.0, 0.5])
    v_out, a_out = sample(FakeVelocity(), video, audio, cond, one_step, "heun", guidance)
    g1 = _expected(video, audio, 3.0, 0.0, torch.zeros(3))
    g2 = _expected(video - 0.5 * g1[0], audio - 0.5 * g1[1], 3.0, 0.0, torch.zeros(3))
    assert torch.allclose(v_out, video - 0.25 * (g1[0] + g2[0]), atol=1e-5)
    assert torch.allclose(a_out, audio - 0.25 * (g1[1] + g2[1]), atol=1e-5)


def test_the_renoise_sampler_denoises_then_noises_afresh():
    """``renoise``: x0 = x - t v at each time, then (1 - t') x0 + t' e with new noise e
    from the generator (video, then audio); the last step returns x0. One generator per
    row draws each row's noise as that row alone would; none is refused."""
    video, audio, cond = _inputs()
    times = torch.tensor([1.0, 0.5, 0.0])
    guidance = Guidance(3.0, 1.0)

    def expected(noises):
        v, a = video, audio
        gv, ga = _expected(v, a, 3.0, 0.0, torch.zeros(3))
        v, a = 0.5 * (v - gv) + 0.5 * noises[0], 0.5 * (a - ga) + 0.5 * noises[1]
        gv, ga = _expected(v, a, 3.0, 0.0, torch.zeros(3))
        return v - 0.5 * gv, a - 0.5 * ga

    out = sample(FakeVelocity(), video, audio, cond, times, "renoise", guidance,
                 generator=torch.Generator().manual_seed(5))  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    noises = (torch.randn(video.shape, generator=gen), torch.randn(audio.shape, generator=gen))
    for got, want in zip(out, expected(noises), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Not Euler: the implied noise is not carried forward.
    euler = sample(FakeVelocity(), video, audio, cond, times, "euler", guidance)
    assert not torch.allclose(out[0], euler[0], atol=1e-3)

    rows = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    out = sample(FakeVelocity(), video, audio, cond, times, "renoise", guidance, generator=rows)
    replay = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    per_row = [(torch.randn((1, *video.shape[1:]), generator=g),
                torch.randn((1, *audio.shape[1:]), generator=g)) for g in replay]  # fmt: skip
    noises = (torch.cat([v for v, _ in per_row]), torch.cat([a for _, a in per_row]))
    for got, want in zip(out, expected(noises), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="generator"):
        sample(FakeVelocity(), video, audio, cond, times, "renoise", guidance)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(FakeVelocity(), video, audio, cond, times, "renoise", guidance, generator=rows[:2])
