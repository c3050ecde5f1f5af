"""The Fast student by distribution matching: DMD2 (Yin et al., 2024) on the flow DiT.

**Networks.** The *real score* is the teacher (the ``rlhf`` model, frozen) with
classifier-free guidance; the *fake score* is a copy of the teacher trained online,
by the flow-matching loss, on the student's own samples, so it tracks the student's
distribution; the *student* (initialised from the teacher) is the generator.

**Student.** It is sampled as users sample it: on the shifted schedule of ``n`` steps
(``distill.student_steps``), Euler or renoise (``dmd.sampler``: x0 predicted, then
noised afresh to the next time, as DMD2's multi-step generator), guidance distilled in
(one evaluation a step). A training step draws ``n`` and a step index ``k < n`` and
runs the student without gradient from noise through the first ``k`` steps (DMD2's
backward simulation, so its inputs at ``t_k`` are what inference feeds it), then
predicts with gradient ``x0 = x_tk - t_k v`` at ``t_k``.

**Distribution matching.** ``x0`` is noised again to a time ``t`` (uniform in
``[time_min, time_max]``, resolution-shifted like the teacher's training), both
scores denoise it, and ``x0`` moves along ``x0_real - x0_fake``, normalised per
sample by ``mean |x0 - x0_real|`` (DMD's weighting), through the surrogate
``0.5 ||x0 - sg(x0 - grad)||^2``. Video and audio are normalised separately. The
fake score is updated ``dmd.fake_updates`` times per student update (the two
time-scale rule), on the same kind of samples, at the same noise levels.

**GAN on real clips** (``dmd.gan_weight``, ``dmd.classifier_weight``; off by
default). DMD2's second term: a classifier head on the fake score's last hidden
tokens (:class:`model.discriminators.TokenCriticHead`) learns, in the fake-score
updates, to tell real clips' latents from the student's samples at the same noise
levels (both conditioned on their own captions); the student descends the
non-saturating loss through it, the fake score's and the head's parameters detached.

**Coverage.** Prompts are drawn per sample from the whole caption distribution
(:class:`PromptStream`): the training prompts, every other manifest caption and
``distill.extra_prompts``, and new captions from the caption grammar
(:class:`CaptionGrammar`); held-out alignment prompts are removed from the pool and
from every grammar draw, by construction. The clip length is drawn per step from
every frame bucket the parent trained on, at the preset's resolution; no teacher
couplings are needed, so nothing limits the prompts to a precomputed set.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.discriminators import (
    TokenCriticHead,
    detached,
    logistic_discriminator_loss,
    logistic_generator_loss,
)
from model.dit import TextConditioning
from model.flow_matching import resolution_shift, schedule, shift_timesteps
from model.samplers import Conditioning, Guidance, sample
from pipelines.train.batches import pad_text

PHASES = ("fake", "generator")

# ---------------------------------------------------------------------------------
# Prompts: the caption distribution, held-out prompts excluded by construction.

_SINGULAR_COUNTS = ("a", "an", "one", "single")
_COUNT_WORDS = (*_SINGULAR_COUNTS, "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten")  # fmt: skip


def normalise(prompt: str) -> str:
    """The form prompts are compared in (case and spacing do not make a new prompt)."""
    return " ".join(prompt.lower().split())


def _phrase_pattern() -> re.Pattern:
    from core.probes.captions import SHAPE_WORDS
    from core.synth.palette import COLOR_NAMES

    counts = "|".join(_COUNT_WORDS)
    colours = "|".join(sorted(COLOR_NAMES, key=len, reverse=True))
    shapes = "|".join(sorted(SHAPE_WORDS, key=len, reverse=True))
    return re.compile(rf"\b({counts})\s+(?:({colours})\s+)?({shapes})\b", re.IGNORECASE)


class CaptionGrammar:
    """New captions from the noun phrases and sentence frames of given captions.

    A caption is read as frames around noun phrases ``count [colour] shape`` (the
    phrases the rater's caption parser reads). A draw takes a frame and fills each of
    its phrases anew: a count of the phrase's number (singular frames keep singular
    verbs), a colour or none, a shape word of that number, each from the words the
    captions use, so a draw stays inside the checkpoint's vocabulary.
    """

    def __init__(self, captions: list[str]):
        pattern = _phrase_pattern()
        self.frames: list[list[str | bool]] = []  # text pieces; a bool slot = plural?
        self.counts: set[str] = set()
        self.colours: set[str | None] = set()
        self.shapes: dict[bool, set[str]] = {False: set(), True: set()}
        for caption in captions:
            pieces: list[str | bool] = []
            last = 0
            for m in pattern.finditer(caption):
                count, colour, shape = m.group(1), m.group(2), m.group(3)
                plural = count.lower() not in _SINGULAR_COUNTS
                pieces += [caption[last : m.start()], plural]
                last = m.end()
                if plural:
                    self.counts.add(count.lower())
                self.colours.add(colour.lower() if colour else None)
                self.shapes[plural].add(shape.lower())
            if len(pieces) > 0:
                self.frames.append([*pieces, caption[last:]])

    def __bool__(self) -> bool:
        return bool(self.frames)

    def sample(self, gen: torch.Generator) -> str:
        def pick(options):
            options = sorted(options, key=lambda o: o or "")
            return options[int(torch.randint(0, len(options), (1,), generator=gen))]

        frame = self.frames[int(torch.randint(0, len(self.frames), (1,), generator=gen))]
        out = []
        for piece in frame:
            if isinstance(piece, str):
                out.append(piece)
                continue
            colour, shape = pick(self.colours), pick(self.shapes[piece])
            words = [colour, shape] if colour else [shape]
            count = pick(self.counts) if piece else ("an" if words[0][0] in "aeiou" else "a")
            out.append(" ".join([count, *words]))
        return "".join(out)


class PromptStream:
    """Per-sample prompts over the caption distribution, never a held-out one."""

    def __init__(
        self,
        captions: list[str],
        held_out: list[str],
        grammar_fraction: float,
        pool_size: int = 0,
        seed: int = 0,
    ):
        self.held_out = frozenset(normalise(p) for p in held_out)
        self.captions = [c for c in dict.fromkeys(captions) if normalise(c) not in self.held_out]
        if not self.captions:
            raise ValueError("distillation has no prompts left once the held-out ones are removed")
        # The grammar reads every caption, held-out ones too: their words are the
        # checkpoint's vocabulary (it trained on them); what is held out is the prompts,
        # which no draw returns.
        self.grammar = CaptionGrammar([*self.captions, *held_out])
        self.grammar_fraction = grammar_fraction if self.grammar else 0.0
        # A fixed pool of grammar captions (distill.dmd.grammar_pool), drawn once.
        self.pool: list[str] = []
        if pool_size > 0 and self.grammar_fraction > 0:
            self.pool = self._draw_pool(pool_size, torch.Generator().manual_seed(seed))

    def _grammar_caption(self, gen: torch.Generator, attempts: int = 32) -> str | None:
        for _ in range(attempts):
            candidate = self.grammar.sample(gen)
            if normalise(candidate) not in self.held_out:
                return candidate
        return None

    def _draw_pool(self, size: int, gen: torch.Generator) -> list[str]:
        found: dict[str, None] = {}
        for _ in range(size * 4):  # a small grammar may hold fewer than `size` captions
            caption = self._grammar_caption(gen)
            if caption is not None:
                found[caption] = None
            if len(found) == size:
                break
        return list(found)

    def draw(self, n: int, gen: torch.Generator, attempts: int = 32) -> list[str]:
        out = []
        for _ in range(n):
            prompt = None
            if float(torch.rand((), generator=gen)) < self.grammar_fraction:
                if self.pool:
                    prompt = self.pool[int(torch.randint(0, len(self.pool), (1,), generator=gen))]
                else:
                    prompt = self._grammar_caption(gen, attempts)
            if prompt is None:
                prompt = self.captions[
                    int(torch.randint(0, len(self.captions), (1,), generator=gen))
                ]
            out.append(prompt)
        return out


# ---------------------------------------------------------------------------------
# The distribution-matching gradient.


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normalised direction ``(x0_fake - x0_real) / mean|x0 - x0_real|``.

    Descending it moves ``x0`` toward what the real score denoises to and away from the
    fake's: the KL gradient between the noised real and student distributions."""
    dims = tuple(range(1, x0.dim()))
    scale = (x0 - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / scale)


def dmd_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x0 - sg(x0 - grad))^2)``: its gradient in ``x0`` is grad / numel."""
    grad = dmd_gradient(x0.detach().float(), x0_real.float(), x0_fake.float())
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad))


def denoised(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0 = x_t - t v`` for per-sample times (B,)."""
    return x - t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * v


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def guided_denoise(net, video, audio, t, text: TextConditioning, scale: float):
    """Denoised (video, audio) of ``net`` at per-sample times, with text guidance."""
    if scale == 1.0:
        v, a = net(video, audio, t, text)
    else:
        b = video.shape[0]
        both = TextConditioning(torch.cat([text.tokens] * 2), torch.cat([text.mask] * 2))
        drop = torch.cat([torch.zeros(b), torch.ones(b)]).bool().to(video.device)
        v2, a2 = net(torch.cat([video] * 2), torch.cat([audio] * 2), torch.cat([t] * 2), both,
                     text_drop=drop)  # fmt: skip
        (vc, vu), (ac, au) = v2.chunk(2), a2.chunk(2)
        v, a = vu + scale * (vc - vu), au + scale * (ac - au)
    return denoised(video, v.float(), t), denoised(audio, a.float(), t)


# ---------------------------------------------------------------------------------
# The student and its fake score as one trained module.


class DMDPair(nn.Module):
    """The student (``dit``, a pipeline component), the fake score (``fake_score``) and,
    with the GAN on, its classifier head (``critic``); the last two training-only:
    checkpointed for resume, never in the final pipeline.

    One forward per step runs with gradient, through the (possibly DDP-wrapped) pair,
    so that gradients are synchronised; ``net`` names which network it is, and
    ``"critic"`` is the fake score returning its head's logits (B,) too."""

    def __init__(self, student: nn.Module, fake_score: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.dit = student
        self.fake_score = fake_score
        self.critic = critic

    def forward(self, net: str, video, audio, t, text):
        if net == "critic":
            return self.judge(video, audio, t, text)
        return getattr(self, net)(video, audio, t, text)

    def judge(self, video, audio, t, text):
        """The fake score's velocities and the head's logits from its last hidden
        tokens (what enters its output layers, read by hooks for this call only)."""
        tokens: dict[str, torch.Tensor] = {}
        hooks = [
            getattr(self.fake_score, f"{branch}_out").register_forward_pre_hook(
                lambda _module, args, branch=branch: tokens.__setitem__(branch, args[0])
            )
            for branch in ("video", "audio")
        ]
        try:
            v, a = self.fake_score(video, audio, t, text)
        finally:
            for hook in hooks:
                hook.remove()
        return v, a, self.critic(tokens["video"], tokens["audio"])


def critic_head(dit, hidden: int) -> TokenCriticHead:
    d = dit.cfg.dit
    return TokenCriticHead(d.video.dim, d.audio.dim, hidden)


class RealClips:
    """The corpus's clips for the GAN term: latents (from the training cache) and
    caption tokens, drawn per step among the clips at least the step's length and
    cut to it, as the DiT's batches are."""

    def __init__(
        self, lengths: list[int], fetch: Callable[[int], object], audio_per_video_latent: int
    ):
        """``lengths``: each clip's frames; ``fetch(i)``: its
        :class:`pipelines.train.latents.LatentSample` (video (Cv, T', h, w), audio
        (Ca, Na), text (L, D)), read when drawn (the cache keeps a few shards)."""
        if not lengths:
            raise ValueError("the GAN term needs real clips: none were given")
        self.lengths = list(lengths)
        self.fetch = fetch
        self.m = audio_per_video_latent

    def usable(self, frames: int) -> list[int]:
        return [i for i, n in enumerate(self.lengths) if n >= frames]

    def draw(self, frames: int, latent_frames: int, b: int, gen: torch.Generator):
        """(video (b, Cv, T', h, w), audio (b, Ca, T' m), [text (L, D)] * b)."""
        pool = self.usable(frames)
        if not pool:
            raise ValueError(f"no real clip of at least {frames} frames for the GAN term")
        picks = [pool[int(i)] for i in torch.randint(0, len(pool), (b,), generator=gen)]
        rows = [self.fetch(i) for i in picks]
        video = torch.stack([r.video[:, :latent_frames] for r in rows]).float()
        audio = torch.stack([r.audio[:, : latent_frames * self.m] for r in rows]).float()
        return video, audio, [r.text for r in rows]


def frame_shapes(mcfg, frames: int) -> tuple[tuple, tuple]:
    """Video and audio latent shapes (batch 1) of a clip of ``frames`` frames."""
    n_lat = mcfg.num_latent_frames(frames)
    sf = mcfg.video_vae.spatial_factor
    v = (1, mcfg.video_vae.latent_channels, n_lat, mcfg.height // sf, mcfg.width // sf)
    a = (1, mcfg.audio_vae.latent_channels, n_lat * mcfg.audio_latents_per_video_latent)
    return v, a


def token_count(mcfg, v_shape, a_shape) -> int:
    p = mcfg.dit.video_patch
    return v_shape[2] * (v_shape[3] // p) * (v_shape[4] // p) + a_shape[2]


class DMD2:
    """One loop step of DMD2: a fake-score update or a student update, by step number.

    ``step % (fake_updates + 1) < fake_updates`` updates the fake score, the rest the
    student; every draw comes from the step's generator, so a resumed run repeats an
    uninterrupted one exactly."""

    def __init__(self, settings, module, pair: DMDPair, teacher, text_encoder, mcfg, buckets,
                 stream: PromptStream, device):  # fmt: skip
        self.s = settings
        self.module = module
        self.pair = pair
        self.teacher = teacher
        self.text_encoder = text_encoder
        self.mcfg = mcfg
        self.buckets = tuple(buckets)
        self.stream = stream
        self.device = device
        self._rows: dict[str, torch.Tensor] = {}
        # Regression pairs by clip length (distill.dmd.regression_pairs), set by the
        # stage: {frames: {"noise_v", "noise_a", "video", "audio": (N, ...), "prompts"}}.
        self.pairs: dict[int, dict] = {}
        # The corpus's clips for the GAN term (distill.dmd.gan_weight), set by the stage.
        self.real: RealClips | None = None

    def phase(self, step: int) -> str:
        period = self.s.dmd.fake_updates + 1
        return "generator" if step % period == period - 1 else "fake"

    def text(self, prompts: list[str]) -> TextConditioning:
        for p in dict.fromkeys(prompts):
            if p not in self._rows:
                # One prompt at a time: a batched encoding depends (in the last bits) on
                # its batch's padding, which a resumed run would not repeat.
                self._rows[p] = self.text_encoder.embed_tokens(p)
        return self.text_of_rows([self._rows[p] for p in prompts])

    def text_of_rows(self, rows: list[torch.Tensor]) -> TextConditioning:
        tk, m, _ = pad_text(rows, None, self.mcfg.text.max_tokens)
        return TextConditioning(tk.to(self.device), m.to(self.device))

    def noise_times(self, b: int, shift: float, gen) -> torch.Tensor:
        d = self.s.dmd
        u = d.time_min + (d.time_max - d.time_min) * torch.rand(b, generator=gen)
        return shift_timesteps(u, shift).to(self.device)

    def student_x0(self, noise, times: list[float], k: int, text, grad: bool, fresh=None):
        """Backward simulation: the student's sampler through the first ``k`` steps
        without gradient (Euler; or, given ``fresh``, k (video, audio) noises, renoise),
        then the prediction ``x0`` at ``t_k`` (with gradient when ``grad``)."""
        video, audio = noise
        b = video.shape[0]
        with torch.no_grad():
            for i in range(k):
                t = torch.full((b,), times[i], device=self.device)
                v, a = self.pair.dit(video, audio, t, text)
                if fresh is None:
                    dt = times[i + 1] - times[i]
                    video, audio = video + dt * v.float(), audio + dt * a.float()
                else:
                    t_next = torch.full((b,), times[i + 1], device=self.device)
                    video = noised(denoised(video, v.float(), t), fresh[i][0], t_next)
                    audio = noised(denoised(audio, a.float(), t), fresh[i][1], t_next)
        t = torch.full((b,), times[k], device=self.device)
        if grad:
            v, a = self.module("dit", video, audio, t, text)
        else:
            with torch.no_grad():
                v, a = self.pair.dit(video, audio, t, text)
        return denoised(video, v.float(), t), denoised(audio, a.float(), t)

    def __call__(self, indices, gen: torch.Generator, step: int):
        s, mcfg = self.s, self.mcfg
        b = len(indices)
        frames = self.buckets[int(torch.randint(0, len(self.buckets), (1,), generator=gen))]
        v_shape, a_shape = frame_shapes(mcfg, frames)
        shift = resolution_shift(token_count(mcfg, v_shape, a_shape), mcfg.flow)
        n = s.student_steps[int(torch.randint(0, len(s.student_steps), (1,), generator=gen))]
        times = [float(x) for x in schedule(n, s.dmd.time_shift or shift)]
        k = int(torch.randint(0, n, (1,), generator=gen))
        text_prompts = self.stream.draw(b, gen)
        text = self.text(text_prompts)
        noise = (
            torch.randn((b, *v_shape[1:]), generator=gen).to(self.device),
            torch.randn((b, *a_shape[1:]), generator=gen).to(self.device),
        )
        t = self.noise_times(b, shift, gen)
        eps_v = torch.randn((b, *v_shape[1:]), generator=gen).to(self.device)
        eps_a = torch.randn((b, *a_shape[1:]), generator=gen).to(self.device)
        # Renoise's fresh noise of the backward simulation's k steps (drawn only then,
        # so an Euler student draws as before).
        fresh = None
        if s.dmd.sampler == "renoise":
            fresh = [(torch.randn((b, *v_shape[1:]), generator=gen).to(self.device),
                      torch.randn((b, *a_shape[1:]), generator=gen).to(self.device))
                     for _ in range(k)]  # fmt: skip
        phase = self.phase(step)
        # Under renoise, x at a later time depends on fresh noise, so the teacher's
        # endpoint of the initial noise is a regression target of first-step draws only.
        regress = phase == "generator" and s.dmd.regression_weight > 0
        regress = regress and (fresh is None or k == 0)
        paired = self.pairs.get(frames) if regress and self.pairs else None
        start, text_all = noise, text
        if paired is not None:
            # The pairs go through the student in the same forward as the step's own
            # samples (one forward per backward, as DDP wants), after them in the batch.
            pick = torch.randint(0, len(paired["prompts"]), (b,), generator=gen)
            start = (torch.cat([noise[0], paired["noise_v"][pick].to(self.device)]),
                     torch.cat([noise[1], paired["noise_a"][pick].to(self.device)]))  # fmt: skip
            text_all = self.text(self.prompts_of(text_prompts, paired, pick))
        x0v, x0a = self.student_x0(start, times, k, text_all, phase == "generator", fresh)
        x0v, x0a, pv0, pa0 = x0v[:b], x0a[:b], x0v[b:], x0a[b:]
        xv, xa = noised(x0v.detach(), eps_v, t), noised(x0a.detach(), eps_a, t)
        if phase == "fake":
            # The fake score learns the student's samples by flow matching.
            if self.real is None:
                pv, pa = self.module("fake_score", xv, xa, t, text)
            else:
                # Real clips go through in the same forward, after the student's.
                real_v, real_a, real_text, real_t = self.real_batch(frames, v_shape, b, shift, gen)
                both = self.text_of_rows([*(self._rows[p] for p in text_prompts), *real_text])
                pv, pa, logits = self.module(
                    "critic", torch.cat([xv, real_v]), torch.cat([xa, real_a]),
                    torch.cat([t, real_t]), both,
                )  # fmt: skip
                pv, pa = pv[:b], pa[:b]
            loss_v = torch.mean((pv.float() - (eps_v - x0v)) ** 2)
            loss_a = torch.mean((pa.float() - (eps_a - x0a)) ** 2)
            loss = loss_v + loss_a
            metrics = {"fake_loss": float(loss.detach())}
            if self.real is not None:
                classifier = logistic_discriminator_loss(logits[b:], logits[:b])
                loss = loss + s.dmd.classifier_weight * classifier
                metrics |= {
                    "classifier_loss": float(classifier.detach()),
                    "real_logit": float(logits[b:].detach().mean()),
                    "fake_logit": float(logits[:b].detach().mean()),
                }
        else:
            with torch.no_grad():
                scale = s.dmd.real_guidance or s.text_scale
                real_v, real_a = guided_denoise(self.teacher, xv, xa, t, text, scale)
                fake_v, fake_a = guided_denoise(self.pair.fake_score, xv, xa, t, text, 1.0)
            loss = dmd_loss(x0v, real_v, fake_v) + dmd_loss(x0a, real_a, fake_a)
            metrics = {
                "dmd_loss": float(loss.detach()),
                "real_fake_gap": float(
                    (real_v - fake_v).abs().mean() + (real_a - fake_a).abs().mean()
                ),
            }
            if regress:
                if paired is not None:
                    target_v = paired["video"][pick].to(self.device)
                    target_a = paired["audio"][pick].to(self.device)
                    reg = torch.mean((pv0 - target_v.float()) ** 2)
                    reg = reg + torch.mean((pa0 - target_a.float()) ** 2)
                else:
                    reg = self.regression(noise, times, k, x0v, x0a, text, shift)
                loss = loss + s.dmd.regression_weight * reg
                metrics["regression_loss"] = float(reg.detach())
            if self.real is not None:
                # Through the classifier with its and the fake score's weights cut
                # from the graph: the gradient moves the student only.
                gv, ga = noised(x0v, eps_v, t), noised(x0a, eps_a, t)
                _, _, logits = detached(self.pair, "critic", gv, ga, t, text)
                gan = logistic_generator_loss(logits)
                loss = loss + s.dmd.gan_weight * gan
                metrics |= {
                    "gan_loss": float(gan.detach()),
                    "fake_logit": float(logits.detach().mean()),
                }
        return loss, metrics, token_count(mcfg, v_shape, a_shape)

    def real_batch(self, frames: int, v_shape, b: int, shift: float, gen):
        """``b`` real clips of the step's length, noised to levels drawn as the
        student's are: (video, audio, caption token rows, times)."""
        video, audio, texts = self.real.draw(frames, v_shape[2], b, gen)
        t = self.noise_times(b, shift, gen)
        eps_v = torch.randn(video.shape, generator=gen).to(self.device)
        eps_a = torch.randn(audio.shape, generator=gen).to(self.device)
        video, audio = video.to(self.device), audio.to(self.device)
        return noised(video, eps_v, t), noised(audio, eps_a, t), texts, t

    @staticmethod
    def prompts_of(prompts: list[str], paired: dict, pick: torch.Tensor) -> list[str]:
        return [*prompts, *(paired["prompts"][i] for i in pick.tolist())]

    def regression(self, noise, times, k, x0v, x0a, text, shift):
        """MSE to the guided teacher's Heun endpoint of the same initial noise."""
        tv, ta = self.teacher_endpoint(noise[0], noise[1], text, shift)
        return torch.mean((x0v - tv.float()) ** 2) + torch.mean((x0a - ta.float()) ** 2)

    def teacher_endpoint(self, noise_v, noise_a, text: TextConditioning, shift: float):
        """The guided teacher's Heun sample (``teacher_steps``) of the given noise."""
        ts = schedule(self.s.teacher_steps, shift)
        return sample(self.teacher, noise_v, noise_a, Conditioning(text=text), ts, "heun",
                      Guidance(self.s.text_scale, 1.0))  # fmt: skip


def pairs_per_bucket(count: int, buckets) -> int:
    return -(-count // len(buckets))


@torch.no_grad()
def teacher_pairs(step: DMD2, count: int, seed: int, batch: int = 16) -> dict[int, dict]:
    """``count`` (noise, guided teacher endpoint) pairs, split over ``step``'s clip
    lengths, their prompts drawn from its prompt stream: DMD's paired dataset for
    ``distill.dmd.regression_pairs``. Seeded, so every rank and every resume draws the
    same ones. Each clip length's prompts and noise are drawn before the teacher runs,
    so ``batch`` (how many the teacher samples at once) changes the speed, not the
    pairs."""
    mcfg = step.mcfg
    gen = torch.Generator().manual_seed(seed * 7919 + 29)
    per_bucket = pairs_per_bucket(count, step.buckets)
    out: dict[int, dict] = {}
    for frames in step.buckets:
        v_shape, a_shape = frame_shapes(mcfg, frames)
        shift = resolution_shift(token_count(mcfg, v_shape, a_shape), mcfg.flow)
        prompts = step.stream.draw(per_bucket, gen)
        noise_v = torch.randn((per_bucket, *v_shape[1:]), generator=gen)
        noise_a = torch.randn((per_bucket, *a_shape[1:]), generator=gen)
        video, audio = [], []
        for start in range(0, per_bucket, batch):
            part = slice(start, start + batch)
            v, a = step.teacher_endpoint(noise_v[part].to(step.device),
                                         noise_a[part].to(step.device),
                                         step.text(prompts[part]), shift)  # fmt: skip
            video.append(v.float().cpu())
            audio.append(a.float().cpu())
        out[frames] = {"noise_v": noise_v, "noise_a": noise_a, "video": torch.cat(video),
                       "audio": torch.cat(audio), "prompts": prompts}  # fmt: skip
    return out


def pairs_to_bytes(pairs: dict[int, dict]) -> bytes:
    """Regression pairs as safetensors (float32), their prompts as JSON metadata."""
    import json

    from safetensors.torch import save

    tensors = {f"{frames}.{k}": v.contiguous() for frames, p in pairs.items()
               for k, v in p.items() if k != "prompts"}  # fmt: skip
    prompts = {str(frames): p["prompts"] for frames, p in pairs.items()}
    return save(tensors, {"format": "duet.dmd_pairs", "version": "1",
                          "prompts": json.dumps(prompts)})  # fmt: skip


def pairs_from_bytes(data: bytes) -> dict[int, dict]:
    """Regression pairs written by :func:`pairs_to_bytes`; anything else is refused."""
    import json
    import struct

    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (struct.error, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise ValueError(f"not DMD regression pairs (no safetensors header): {err}") from err
    if meta.get("format") != "duet.dmd_pairs" or meta.get("version") != "1":
        raise ValueError(f"not DMD regression pairs of version 1: {meta.get('format')!r}")
    out: dict[int, dict] = {
        int(f): {"prompts": list(p)} for f, p in json.loads(meta["prompts"]).items()
    }
    for key, value in load(data).items():
        frames, name = key.split(".", 1)
        out[int(frames)][name] = value
    return out


class PromptSlot:
    """A sample slot as the epoch sampler sees it: prompts and lengths are drawn per
    step, so the rows only set the batch size."""

    def __init__(self, index: int):
        self.clip_id = f"slot{index:05d}"
        self.bucket = 0
