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
import math
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core import storage
from model.configs import get_config
from model.discriminators import (
    TokenCriticHead,
    logistic_discriminator_loss,
    logistic_generator_loss,
)
from model.dit import DualBranchDiT
from pipelines.align.config import DistillStageConfig
from pipelines.align.dmd import (
    DMD2,
    CaptionGrammar,
    DMDPair,
    PromptStream,
    RealClips,
    critic_head,
    denoised,
    dmd_gradient,
    dmd_loss,
    frame_shapes,
    noised,
    token_count,
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


def test_renoise_backward_simulation_noises_each_x0_afresh_and_regresses_first_steps_only():
    """``dmd.sampler = "renoise"``: the student's input at ``t_k`` is its previous x0
    noised with the given fresh noise (Euler carries the implied noise instead); in
    the loop, the regression (initial noise -> teacher endpoint) is a term of the draws
    that start at the first step only, and an Euler student's of every draw."""
    step, pair = _tiny_step(1.0)
    gen = torch.Generator().manual_seed(0)
    v_shape, a_shape = frame_shapes(step.mcfg, 9)
    noise = (torch.randn((2, *v_shape[1:]), generator=gen),
             torch.randn((2, *a_shape[1:]), generator=gen))  # fmt: skip
    fresh = [(torch.randn((2, *v_shape[1:]), generator=gen),
              torch.randn((2, *a_shape[1:]), generator=gen))]  # fmt: skip
    text = step.text(CAPTIONS[:2])
    times = [1.0, 0.6, 0.0]
    with torch.no_grad():
        t0, t1 = torch.full((2,), 1.0), torch.full((2,), 0.6)
        v, a = pair.dit(*noise, t0, text)
        x1 = (noised(denoised(noise[0], v, t0), fresh[0][0], t1),
              noised(denoised(noise[1], a, t0), fresh[0][1], t1))  # fmt: skip
        v1, a1 = pair.dit(*x1, t1, text)
        want = denoised(x1[0], v1, t1), denoised(x1[1], a1, t1)
        got = step.student_x0(noise, times, 1, text, grad=False, fresh=fresh)
        euler = step.student_x0(noise, times, 1, text, grad=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(euler[0], want[0], atol=1e-3)

    calls = []
    hook = pair.dit.register_forward_pre_hook(lambda m, args: calls.append(1))
    step.s.dmd.regression_weight = 1.0
    seen = {"euler": set(), "renoise": set()}
    for sampler in seen:
        step.s.dmd.sampler = sampler
        for seed in range(8):
            calls.clear()
            _, metrics, _ = step([0, 1], torch.Generator().manual_seed(seed), 1)
            k = len(calls) - 1  # backward simulation's steps, then the prediction
            seen[sampler].add((k, "regression_loss" in metrics))
    hook.remove()
    assert seen["euler"] == {(0, True), (1, True)}
    assert seen["renoise"] == {(0, True), (1, False)}


def test_the_students_step_times_follow_dmd_time_shift():
    """``dmd.time_shift``: the backward simulation and the student's prediction run at
    ``schedule(n, time_shift)``; 0 keeps the resolution shift the teacher samples with."""
    from model.flow_matching import resolution_shift, schedule

    step, pair = _tiny_step(4.0)
    v_shape, a_shape = frame_shapes(step.mcfg, 9)
    resolution = resolution_shift(token_count(step.mcfg, v_shape, a_shape), step.mcfg.flow)
    seen = []
    hook = pair.dit.register_forward_pre_hook(lambda m, args: seen.append(float(args[2][0])))
    for time_shift in (0.0, 3.0):
        step.s.dmd.time_shift = time_shift
        seen.clear()
        for seed in range(8):
            step([0, 1], torch.Generator().manual_seed(seed), 1)
        want = [float(t) for t in schedule(2, time_shift or resolution)[:-1]]
        assert sorted(set(seen)) == pytest.approx(sorted(want)), (time_shift, seen)
    hook.remove()
    assert abs(resolution - 3.0) > 0.5  # the two cases are different grids


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
    # The teacher's batch sets the speed, not the pairs.
    at_once = teacher_pairs(step, 5, seed=0, batch=5)[9]
    assert at_once["prompts"] == got["prompts"]
    assert torch.equal(at_once["noise_v"], got["noise_v"])
    torch.testing.assert_close(at_once["video"], got["video"], rtol=1e-4, atol=1e-5)
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


def _manifest(root, uncaptioned: int = 0) -> str:
    rows = [
        {"clip_id": f"c{i}", "source_id": f"s{i}", "clip_uri": f"{root}/c{i}.mp4", "start_s": 0.0,
         "end_s": 2.0, "keep": True, "caption": c, "split": "train"}
        for i, c in enumerate(CAPTIONS + HELD_OUT + [""] * uncaptioned)
    ]  # fmt: skip
    uri = f"{root}/clips.parquet"
    pq.write_table(pa.Table.from_pylist(rows), uri)
    return uri


def _clip_files(root) -> None:
    """Real footage at every ``_manifest`` row's clip path (one synthetic video copied),
    one uncaptioned row's included."""
    from core.synth import SynthConfig, generate_corpus

    synth = SynthConfig(width=128, height=128, fps=16, sample_rate=16000, min_shots=1,
                        max_shots=1, min_shot_s=2.5, max_shot_s=2.5, kinds=("bouncing_balls",))  # fmt: skip
    (video,) = generate_corpus(f"{root}/raw", 1, seed=3, config=synth)
    for i in range(len(CAPTIONS + HELD_OUT) + 1):
        shutil.copy(video, f"{root}/c{i}.mp4")


@pytest.mark.parametrize(
    "pairs,gan,sampler,shift",
    [(0, False, "euler", 0.0), (4, False, "euler", 0.0), (0, True, "euler", 0.0),
     (4, False, "renoise", 3.0)],
)  # fmt: skip
def test_dmd2_resumed_from_a_checkpoint_ends_bit_for_bit_like_an_uninterrupted_run(
    tmp_path, pairs, gan, sampler, shift
):
    from model.pipeline import DuetPipeline
    from pipelines.train.config import train_config_from
    from pipelines.train.loop import TrainError, run_stage
    from pipelines.train.runtime import Runtime
    from pipelines.train.state import TRAINING_ONLY_NAME, checkpoint_dir

    parent = str(tmp_path / "parent")
    DuetPipeline.from_preset("tiny", seed=0).save(parent)

    def config(run: str):
        return train_config_from({
            "preset": "tiny", "run_uri": run, "seed": 0, "init_from": parent,
            "keep_checkpoints": 10, "data": {"curated_uri": _manifest(tmp_path, int(gan)),
                                             "frame_buckets": [9]},
            "distill": {"method": "dmd2", "steps": 4, "batch_size": 2,
                        "checkpoint_every": 2, "log_every": 1, "student_steps": [2],
                        "default_steps": 2, "dmd": {"fake_updates": 2, "lr": 1e-3,
                                                    "regression_weight": 0.5 if pairs else 0.0,
                                                    "regression_pairs": pairs,
                                                    "gan_weight": 0.5 if gan else 0.0,
                                                    "classifier_weight": 0.5 if gan else 0.0,
                                                    "classifier_hidden": 8,
                                                    "sampler": sampler,
                                                    "time_shift": shift}},
        })  # fmt: skip

    if gan:  # real clips for the classifier, their latents cached by the stage
        _clip_files(tmp_path)

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
    prefixes = ("fake_score.", "critic.") if gan else ("fake_score.",)
    assert fa.keys() == fb.keys() and all(k.startswith(prefixes) for k in fa)
    assert any(k.startswith("critic.") for k in fa) == gan
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    meta = storage.read_json(f"{resumed.run_uri}/distill/final/config.json")["extra"]["fast"]
    assert meta["method"] == "dmd2" and meta["modes"] == ["t2av"] and meta["frame_buckets"] == [9]
    assert meta["regression_pairs"] == pairs and meta["sampler"] == sampler
    assert meta["time_shift"] == shift
    # The held-out prompts' clips and a clip without a caption are not real data for
    # the classifier.
    assert meta["real_clips"] == (len(CAPTIONS) if gan else 0)
    if gan:  # a clip length no real clip reaches is refused, naming it; so is FSDP
        sharded = config(str(tmp_path / "sharded"))
        sharded.parallel.fsdp = True
        with pytest.raises(TrainError, match="parallel.fsdp = false"):
            run_stage(sharded, "distill", Runtime())
        other = config(str(tmp_path / "longer"))
        other.data.frame_buckets, other.distill.dmd.frame_buckets = (9, 33), (33,)
        with pytest.raises(ValueError, match=r"at least \[33\] frames"):
            run_stage(other, "distill", Runtime())
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
    "bad",
    [
        {"method": "lcm"},
        {"dmd": {"fake_updates": 0}},
        {"dmd": {"grammar_pool": -1}},
        {"dmd": {"gan_weight": 0.1}},  # a student term with no classifier trained
        {"dmd": {"classifier_weight": 0.1}},  # a classifier nothing uses
        {"dmd": {"gan_weight": -0.1, "classifier_weight": 0.1}},
        {"ema_decay": 1.0},
        {"method": "dmd2", "dmd": {"sampler": "ddim"}},
        {"method": "reflow", "dmd": {"sampler": "renoise"}},  # reflow follows the ODE
        {"method": "dmd2", "dmd": {"time_shift": -1.0}},
        {"method": "dmd2", "dmd": {"time_shift": float("nan")}},
        {"method": "reflow", "dmd": {"time_shift": 3.0}},  # reflow's grid is its own
    ],
)
def test_bad_distill_settings_are_refused(bad):
    from pipelines.train.config import train_config_from

    with pytest.raises(ValueError, match="distill"):
        train_config_from({"distill": bad})


# -- the GAN on real clips ---------------------------------------------------------


def test_the_gan_losses_and_a_new_classifier_head_against_hand_computed_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    want = (softplus(-2.0) + softplus(1.0)) / 2 + softplus(0.5)
    assert logistic_discriminator_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert logistic_generator_loss(fake).item() == pytest.approx(softplus(-0.5), rel=1e-6)
    # A new head is undecided (its last layers start at zero); a trained one gives a
    # clip the mean of its video tokens' votes plus the mean of its audio tokens'.
    head = TokenCriticHead(8, 4, hidden=16)
    video, audio = torch.randn(3, 10, 8), torch.randn(3, 6, 4)
    assert torch.equal(head(video, audio), torch.zeros(3))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    votes_v = head.video(video).squeeze(-1).mean(1)
    votes_a = head.audio(audio).squeeze(-1).mean(1)
    torch.testing.assert_close(head(video, audio), votes_v + votes_a)


def _real_clips(mcfg, count: int = 4, value: float = 1.5) -> RealClips:
    """Real clips unlike anything the tiny student draws: every video latent ``value``."""
    v_shape, a_shape = frame_shapes(mcfg, 9)
    embed = _HashText(mcfg.text.embed_dim)
    samples = [
        SimpleNamespace(video=torch.full(v_shape[1:], value), audio=torch.zeros(a_shape[1:]),
                        text=embed.embed_tokens(CAPTIONS[i % len(CAPTIONS)]))
        for i in range(count)
    ]  # fmt: skip
    return RealClips([9] * count, samples.__getitem__, mcfg.audio_latents_per_video_latent)


def _gan_step(trained_head: bool):
    """A tiny DMD2 step with the GAN on; the teacher unguided, so the fake score equals
    the real one and the distribution-matching term gives the student nothing."""
    step, pair = _tiny_step(1.0)
    step.s.dmd.gan_weight = step.s.dmd.classifier_weight = 1.0
    pair.critic = critic_head(pair.dit, 16)
    if trained_head:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in pair.critic.parameters():
                p.add_(0.3 * torch.randn_like(p))
    step.real = _real_clips(step.mcfg)
    return step, pair


def _grad_norm(module) -> float | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else None


def test_the_gan_term_moves_the_student_and_the_classifier_term_the_fake_score_and_head():
    """One backward per step: a student update's gradient reaches the student only
    (through the classifier with its and the fake score's weights detached); a fake-score
    update's reaches the fake score and the head only. With the fake score equal to the
    real one, the student's whole gradient is the GAN term's."""
    step, pair = _gan_step(trained_head=True)
    loss, metrics, _ = step([0, 1], torch.Generator().manual_seed(0), 1)  # generator
    pair.zero_grad(set_to_none=True)
    loss.backward()
    assert metrics["dmd_loss"] == 0.0 and metrics["gan_loss"] > 0
    assert _grad_norm(pair.dit) > 0
    assert _grad_norm(pair.fake_score) is None and _grad_norm(pair.critic) is None
    loss, metrics, _ = step([0, 1], torch.Generator().manual_seed(0), 0)  # fake score
    pair.zero_grad(set_to_none=True)
    loss.backward()
    assert {"classifier_loss", "real_logit", "fake_logit"} <= metrics.keys()
    assert _grad_norm(pair.dit) is None
    assert _grad_norm(pair.fake_score) > 0 and _grad_norm(pair.critic) > 0
    # Without real clips (the GAN off) the same student step gives no gradient at all.
    step.real = None
    loss, _, _ = step([0, 1], torch.Generator().manual_seed(0), 1)
    pair.zero_grad(set_to_none=True)
    loss.backward()
    assert not _grad_norm(pair.dit)


def test_the_classifier_learns_real_from_student_and_the_gan_term_moves_samples_toward_real():
    """Fake-score updates (fixed student) teach the head to score the real clips above
    the student's samples; a student step down the GAN term's gradient then raises the
    classifier's logit of the same draw's samples (the teacher set to the trained fake
    score, so that the distribution-matching term adds nothing)."""
    step, pair = _gan_step(trained_head=False)
    trained = [*pair.fake_score.parameters(), *pair.critic.parameters()]
    opt = torch.optim.Adam(trained, lr=2e-3)
    first = None
    for i in range(25):
        loss, metrics, _ = step([0, 1], torch.Generator().manual_seed(100 + i), 0)
        first = first or metrics
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first["real_logit"] == first["fake_logit"] == 0.0  # the new head: undecided
    _, held = step([0, 1], torch.Generator().manual_seed(7), 0)[:2]
    assert held["real_logit"] - held["fake_logit"] > 1.0, held
    assert held["classifier_loss"] < 0.7 * first["classifier_loss"], (first, held)

    def generator_step():
        return step([0, 1], torch.Generator().manual_seed(11), 1)[:2]

    step.teacher = copy.deepcopy(pair.fake_score).requires_grad_(False)
    loss, before = generator_step()
    assert before["dmd_loss"] == 0.0
    pair.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p for p in pair.dit.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in grads))
    with torch.no_grad():
        for p in grads:
            p.sub_(p.grad / norm)  # a step of length 1 over all the student's weights
    _, after = generator_step()
    assert after["fake_logit"] > before["fake_logit"] + 0.02, (before, after)
    assert after["gan_loss"] < before["gan_loss"] - 0.02, (before, after)


def test_parallel_autocast_runs_a_stage_in_bf16_with_fp32_weights(tmp_path):
    """``parallel.autocast``: the step's forward runs in bf16 (a DiT linear's output),
    the trained weights stay fp32 and move; with FSDP it is refused (FSDP2 computes in
    its param_dtype already)."""
    from model.pipeline import DuetPipeline
    from pipelines.train.config import train_config_from
    from pipelines.train.loop import run_stage
    from pipelines.train.runtime import Runtime

    parent = str(tmp_path / "parent")
    DuetPipeline.from_preset("tiny", seed=0).save(parent)
    seen = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        out = original(self, x)
        seen.append(out.dtype)
        return out

    def run(autocast: bool) -> dict:
        cfg = train_config_from({
            "preset": "tiny", "run_uri": str(tmp_path / f"run{int(autocast)}"), "seed": 0,
            "init_from": parent, "parallel": {"autocast": autocast},
            "data": {"curated_uri": _manifest(tmp_path), "frame_buckets": [9]},
            "distill": {"method": "dmd2", "steps": 2, "batch_size": 2, "student_steps": [2],
                        "default_steps": 2, "dmd": {"fake_updates": 1, "lr": 1e-3}},
        })  # fmt: skip
        seen.clear()
        torch.nn.Linear.forward = spy
        try:
            result = run_stage(cfg, "distill", Runtime())
        finally:
            torch.nn.Linear.forward = original
        assert set(seen) == ({torch.bfloat16} if autocast else {torch.float32}), set(seen)
        return DuetPipeline.from_checkpoint(result.final_uri).dit.state_dict()

    first = DuetPipeline.from_checkpoint(parent).dit.state_dict()
    after = run(True)
    assert all(v.dtype == first[k].dtype for k, v in after.items())
    assert any(not torch.equal(after[k], first[k]) for k in after), "the student never moved"
    run(False)
    with pytest.raises(ValueError, match="parallel.autocast"):
        train_config_from({"parallel": {"autocast": True, "fsdp": True}})
