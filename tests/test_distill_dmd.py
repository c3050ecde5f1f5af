"""DMD2 distillation of the Fast student (``distill.method = "dmd2"``), small and
deterministic:

- the distribution-matching gradient against hand-built cases: zero when the fake
  score equals the real one (through the whole student step on a tiny DiT), and on
  Gaussians with closed-form denoisers it moves the student's mean to the real mean;
- the prompt stream covers training captions and new grammar captions but never a
  held-out prompt, though the grammar can write them;
- a run resumed from a checkpoint ends bit for bit where an uninterrupted one does
  (student, fake score and both optimiser states restored).
"""

from __future__ import annotations

import copy
import hashlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core import storage
from model.configs import get_config
from model.dit import DualBranchDiT
from pipelines.align.config import DistillStageConfig
from pipelines.align.dmd import (
    DMD2,
    CaptionGrammar,
    DMDPair,
    PromptStream,
    denoised,
    dmd_gradient,
    dmd_loss,
    noised,
)

CAPTIONS = [
    "a red circle bounces on a gray floor",
    "two blue circles bounce on a gray floor",
    "three green circles bounce on a gray floor",
    "a circle bounces on a gray floor",
    "a yellow circle and a red square slide and collide on a gray floor",
]
HELD_OUT = ["a blue circle bounces on a gray floor", "two red circles bounce on a gray floor"]


# -- the distribution-matching gradient -------------------------------------------


def test_dmd_gradient_is_zero_when_the_fake_score_is_the_real_one():
    x0 = torch.randn(3, 4, 5, requires_grad=True)
    real = torch.randn(3, 4, 5)
    dmd_loss(x0, real, real.clone()).backward()
    assert torch.count_nonzero(x0.grad) == 0
    # Not zero otherwise: the direction is (fake - real), per-sample normalised.
    fake = real + 0.5
    grad = dmd_gradient(x0.detach(), real, fake)
    scale = (x0.detach() - real).abs().mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(grad, 0.5 / scale.expand_as(grad))


class _HashText:
    """Fixed per-word embeddings (the test's prompts are inputs, not what is tested)."""

    def __init__(self, dim: int):
        self.dim = dim

    def embed_tokens(self, prompt: str) -> torch.Tensor:  # (L, D)
        seeds = [int(hashlib.sha256(w.encode()).hexdigest()[:8], 16) for w in prompt.split()]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([torch.randn(self.dim, generator=g) for g in gens])


def _tiny_step(text_scale: float, fake_updates: int = 1, real_guidance: float = 0.0):
    mcfg = get_config("tiny")
    torch.manual_seed(0)
    teacher = DualBranchDiT(mcfg)
    with torch.no_grad():  # off AdaLN-zero, so every prediction depends on its input
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher.eval().requires_grad_(False)
    pair = DMDPair(*(copy.deepcopy(teacher).requires_grad_(True) for _ in range(2)))
    s = DistillStageConfig(method="dmd2", text_scale=text_scale, student_steps=(2,),
                           default_steps=2)  # fmt: skip
    s.dmd.fake_updates = fake_updates
    s.dmd.real_guidance = real_guidance
    stream = PromptStream(CAPTIONS, HELD_OUT, 0.5)
    step = DMD2(s, pair, pair, teacher, _HashText(mcfg.text.embed_dim), mcfg, (9,), stream, "cpu")
    return step, pair


def test_student_gets_no_gradient_when_fake_equals_real_and_one_otherwise():
    """Teacher without guidance = fake score (both the teacher's copy): the whole
    student step (backward simulation, noising, both denoisers) gives zero gradient;
    with guidance 4 the real score differs and the gradient does not vanish.
    ``dmd.real_guidance`` sets the real score's guidance apart from the sampling one."""
    cases = ((1.0, 0.0, True), (4.0, 0.0, False), (4.0, 1.0, True), (1.0, 4.0, False))
    for scale, real, zero in cases:
        step, pair = _tiny_step(scale, real_guidance=real)
        assert step.phase(1) == "generator" and step.phase(0) == "fake"
        for seed in range(3):  # step 1: a generator step (fake_updates = 1)
            loss, metrics, _ = step([0, 1], torch.Generator().manual_seed(seed), 1)
            pair.zero_grad(set_to_none=True)
            loss.backward()
            norm = sum(
                float(p.grad.abs().sum()) for p in pair.dit.parameters() if p.grad is not None
            )
            assert all(p.grad is None for p in pair.fake_score.parameters())
            assert (norm == 0.0) == zero, (scale, real, norm, metrics)


def test_the_regression_term_pulls_the_student_toward_the_teachers_endpoint():
    """``dmd.regression_weight``: with the fake score equal to the real one the DMD
    term gives no gradient, so what moves the student is the regression alone; one
    gradient step on it lowers the same draw's regression loss."""
    step, pair = _tiny_step(1.0)
    step.s.dmd.regression_weight = 1.0
    _assert_a_gradient_step_lowers_the_regression(step, pair)


def _regression_loss(step) -> tuple[torch.Tensor, dict]:
    """A generator step's loss and metrics, the same draw every call."""
    loss, metrics, _ = step([0, 1], torch.Generator().manual_seed(3), 1)
    return loss, metrics


def _assert_a_gradient_step_lowers_the_regression(step, pair) -> None:
    loss, metrics = _regression_loss(step)
    assert metrics["regression_loss"] > 0 and metrics["dmd_loss"] == 0.0
    pair.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p for p in pair.dit.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in grads))
    with torch.no_grad():
        for p in grads:  # a small step down the whole gradient
            p.sub_(1e-3 * p.grad / norm)
    _, after = _regression_loss(step)
    assert after["regression_loss"] < 0.95 * metrics["regression_loss"], (metrics, after)


def test_regression_pairs_are_the_teachers_endpoints_and_pull_the_student_to_them():
    """``dmd.regression_pairs``: (noise, endpoint) pairs drawn once; a student update
    regresses a batch of them in the same forward as its own samples. The endpoints
    are the guided teacher's Heun samples of their noise; one gradient step lowers the
    same draw's regression loss; the pairs survive their file."""
    from model.flow_matching import resolution_shift, schedule
    from model.samplers import Conditioning, Guidance, sample
    from pipelines.align.dmd import (
        frame_shapes,
        pairs_from_bytes,
        pairs_to_bytes,
        teacher_pairs,
        token_count,
    )

    step, pair = _tiny_step(1.0)
    step.s.teacher_steps = 3
    step.s.dmd.regression_weight = 1.0
    pairs = teacher_pairs(step, 5, seed=0, batch=2)
    got = pairs[9]
    assert len(got["prompts"]) == 5 and got["video"].shape[0] == 5
    assert not set(got["prompts"]) & set(HELD_OUT)
    v_shape, a_shape = frame_shapes(step.mcfg, 9)
    ts = schedule(3, resolution_shift(token_count(step.mcfg, v_shape, a_shape), step.mcfg.flow))
    v, a = sample(step.teacher, got["noise_v"][4:], got["noise_a"][4:],
                  Conditioning(text=step.text(got["prompts"][4:])), ts, "heun",
                  Guidance(1.0, 1.0))  # fmt: skip
    torch.testing.assert_close(v, got["video"][4:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, got["audio"][4:], rtol=1e-4, atol=1e-5)
    back = pairs_from_bytes(pairs_to_bytes(pairs))
    assert back[9]["prompts"] == got["prompts"]
    assert all(torch.equal(back[9][k], got[k]) for k in ("noise_v", "noise_a", "video", "audio"))
    with pytest.raises(ValueError, match="regression pairs"):
        from safetensors.torch import save

        pairs_from_bytes(save({"x": torch.zeros(1)}, {"format": "other"}))
    with pytest.raises(ValueError, match="regression pairs"):
        pairs_from_bytes(b"\x03")

    # The fake score equals the real one (no guidance): only the regression moves it.
    step.pairs = pairs
    _assert_a_gradient_step_lowers_the_regression(step, pair)
    # Its targets are the pairs' (not the teacher run on the step's own noise).
    step.pairs = {9: {**got, "video": torch.full_like(got["video"], 10.0)}}
    assert _regression_loss(step)[1]["regression_loss"] > 50


def _gaussian_x0(x_t, t, mean, var):
    """E[x0 | x_t] for x0 ~ N(mean, var), x_t = (1 - t) x0 + t eps (closed form)."""
    a = 1 - t
    return mean + a * var / (a * a * var + t * t) * (x_t - a * mean)


def test_dmd_on_gaussians_moves_the_student_mean_to_the_real_mean():
    """Student x0 = theta + z; real data N(2, 1); the fake score is the exact denoiser of
    the student's current distribution N(theta, 1). SGD on the DMD loss takes theta
    from -1 to 2."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor([-1.0, -1.0], requires_grad=True)
    real_mean = torch.tensor([2.0, 2.0])
    opt = torch.optim.SGD([theta], lr=0.5)
    for _ in range(300):
        z = torch.randn(256, 2, generator=gen)
        x0 = theta + z
        t = 0.02 + 0.96 * torch.rand(256, generator=gen)
        x_t = noised(x0.detach(), torch.randn(256, 2, generator=gen), t)
        tt = t[:, None]
        real = _gaussian_x0(x_t, tt, real_mean, 1.0)
        fake = _gaussian_x0(x_t, tt, theta.detach(), 1.0)
        opt.zero_grad()
        (dmd_loss(x0, real, fake) * x0.shape[1]).backward()  # d/dtheta: the mean direction
        opt.step()
    torch.testing.assert_close(theta.detach(), real_mean, atol=0.1, rtol=0)
    # x0 = x_t - t v inverts x_t for the flow's velocity v = noise - x0.
    x0, eps, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    torch.testing.assert_close(denoised(noised(x0, eps, t), eps - x0, t), x0)


# -- the prompt stream -------------------------------------------------------------


def test_prompt_stream_covers_the_grammar_and_never_yields_a_held_out_prompt():
    grammar = CaptionGrammar(CAPTIONS)
    gen = torch.Generator().manual_seed(0)
    free = {grammar.sample(gen) for _ in range(3000)}
    # The grammar alone writes the held-out prompts (so excluding them does work) and
    # keeps number agreement ("two ... circles bounce", "a ... circle bounces").
    assert set(HELD_OUT) <= free
    assert all(("bounces" in p) == p.startswith(("a ", "an ")) for p in free if "collide" not in p)
    stream = PromptStream([*CAPTIONS, HELD_OUT[0]], HELD_OUT, grammar_fraction=0.5)
    drawn = stream.draw(3000, torch.Generator().manual_seed(1))
    assert not set(drawn) & set(HELD_OUT)
    assert set(CAPTIONS) <= set(drawn)  # every caption, and new ones of the grammar
    assert len(set(drawn) - set(CAPTIONS)) >= 20
    # Spelling does not smuggle one in.
    stream = PromptStream(["A Blue  circle bounces on a gray floor", *CAPTIONS], HELD_OUT, 1.0)
    assert not {p.lower() for p in stream.draw(2000, torch.Generator().manual_seed(2))} & {
        " ".join(h.split()) for h in HELD_OUT
    }


# -- resume ------------------------------------------------------------------------


def _manifest(root) -> str:
    rows = [
        {"clip_id": f"c{i}", "source_id": f"s{i}", "clip_uri": f"{root}/c{i}.mp4", "start_s": 0.0,
         "end_s": 2.0, "keep": True, "caption": c, "split": "train"}
        for i, c in enumerate(CAPTIONS + HELD_OUT)
    ]  # fmt: skip
    uri = f"{root}/clips.parquet"
    pq.write_table(pa.Table.from_pylist(rows), uri)
    return uri


@pytest.mark.parametrize("pairs", [0, 4])
def test_dmd2_resumed_from_a_checkpoint_ends_bit_for_bit_like_an_uninterrupted_run(tmp_path, pairs):
    from model.pipeline import DuetPipeline
    from pipelines.train.config import train_config_from
    from pipelines.train.loop import run_stage
    from pipelines.train.runtime import Runtime
    from pipelines.train.state import TRAINING_ONLY_NAME, checkpoint_dir

    parent = str(tmp_path / "parent")
    DuetPipeline.from_preset("tiny", seed=0).save(parent)

    def config(run: str):
        return train_config_from({
            "preset": "tiny", "run_uri": run, "seed": 0, "init_from": parent,
            "keep_checkpoints": 10, "data": {"curated_uri": _manifest(tmp_path), "frame_buckets": [9]},
            "distill": {"method": "dmd2", "steps": 4, "batch_size": 2,
                        "checkpoint_every": 2, "log_every": 1, "student_steps": [2],
                        "default_steps": 2, "dmd": {"fake_updates": 2, "lr": 1e-3,
                                                    "regression_weight": 0.5 if pairs else 0.0,
                                                    "regression_pairs": pairs}},
        })  # fmt: skip

    straight = config(str(tmp_path / "straight"))
    run_stage(straight, "distill", Runtime())
    # What a run killed after its step-2 checkpoint leaves behind: that checkpoint
    # (in which the student has not been updated yet: steps 0 and 1 train the fake score).
    resumed = config(str(tmp_path / "resumed"))
    shutil.copytree(checkpoint_dir(f"{straight.run_uri}/distill", 2),
                    checkpoint_dir(f"{resumed.run_uri}/distill", 2))  # fmt: skip
    if pairs:  # drawn once at the start of the killed run, beside its checkpoints
        shutil.copy(f"{straight.run_uri}/distill/regression_pairs.safetensors",
                    f"{resumed.run_uri}/distill/regression_pairs.safetensors")  # fmt: skip
    result = run_stage(resumed, "distill", Runtime())
    assert result.resumed_from.endswith("checkpoint_00000002")

    a = DuetPipeline.from_checkpoint(f"{straight.run_uri}/distill/final").dit.state_dict()
    b = DuetPipeline.from_checkpoint(f"{resumed.run_uri}/distill/final").dit.state_dict()
    first = DuetPipeline.from_checkpoint(parent).dit.state_dict()
    assert any(not torch.equal(a[k], first[k]) for k in a), "the student never moved"
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from safetensors.torch import load as load_safetensors

    fa, fb = (
        load_safetensors(
            storage.read_bytes(f"{checkpoint_dir(r + '/distill', 4)}/{TRAINING_ONLY_NAME}")
        )
        for r in (straight.run_uri, resumed.run_uri)
    )
    assert fa.keys() == fb.keys() and all(k.startswith("fake_score.") for k in fa)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    meta = storage.read_json(f"{resumed.run_uri}/distill/final/config.json")["extra"]["fast"]
    assert meta["method"] == "dmd2" and meta["modes"] == ["t2av"] and meta["frame_buckets"] == [9]
    assert meta["regression_pairs"] == pairs
    if pairs:  # a kept file that no longer matches the settings is refused, not reused
        other = config(str(tmp_path / "other"))
        other.distill.dmd.regression_pairs = 6
        storage.makedirs(f"{other.run_uri}/distill")
        shutil.copy(f"{straight.run_uri}/distill/regression_pairs.safetensors",
                    f"{other.run_uri}/distill/regression_pairs.safetensors")  # fmt: skip
        with pytest.raises(ValueError, match="delete it"):
            run_stage(other, "distill", Runtime())


def test_a_grammar_pool_is_fixed_by_the_seed_and_every_grammar_draw_comes_from_it():
    def pool(seed: int) -> list[str]:
        return PromptStream(CAPTIONS, HELD_OUT, 0.5, pool_size=12, seed=seed).pool

    first = pool(0)
    # The same on every host that reads the same captions (its texts can be embedded
    # ahead of time); another seed draws another pool.
    assert first == pool(0) and len(first) == 12 and len(set(first)) == 12
    assert first != pool(1)
    assert not set(first) & set(HELD_OUT)
    stream = PromptStream(CAPTIONS, HELD_OUT, 0.5, pool_size=12, seed=0)
    drawn = stream.draw(2000, torch.Generator().manual_seed(3))
    assert set(drawn) <= set(first) | set(CAPTIONS)
    assert set(drawn) - set(CAPTIONS)  # the grammar half is still drawn, from the pool
    # No pool without the grammar, and none by default.
    assert PromptStream(CAPTIONS, HELD_OUT, 0.0, pool_size=12).pool == []
    assert PromptStream(CAPTIONS, HELD_OUT, 0.5).pool == []


@pytest.mark.parametrize(
    "bad", [{"method": "lcm"}, {"dmd": {"fake_updates": 0}}, {"dmd": {"grammar_pool": -1}}]
)
def test_bad_distill_settings_are_refused(bad):
    from pipelines.train.config import train_config_from

    with pytest.raises(ValueError, match="distill"):
        train_config_from({"distill": bad})
