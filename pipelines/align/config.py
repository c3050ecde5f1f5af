"""Configs of the alignment stages ``rlhf`` (DanceGRPO) and ``distill`` (the Fast student).

They are fields of :class:`pipelines.train.config.TrainConfig` (``cfg.rlhf``,
``cfg.distill``) and load through :mod:`core.config` like every other config. The
first nine fields of each stage config are the ones the training loop reads from
any stage (``pipelines.train.config.StageConfig``); they are repeated here rather
than inherited so that ``pipelines.train.config`` can import this module without an
import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Reward heads, in the order the reward model outputs them.
HEADS = ("sync", "adherence", "motion", "visual", "audio")
DISTILL_METHODS = ("reflow", "dmd2")
STUDENT_SAMPLERS = ("euler", "renoise")  # distill.dmd.sampler (model.samplers)
# What can rank a preference group on adherence (pipelines.align.rater.preference_scores).
ADHERENCE_SCORES = ("colour_frames", "objects")
# Flow-GRPO's KL coefficient (the same per-element-mean Gaussian KL as grpo.py's).
DEFAULT_KL_WEIGHT = 0.04
ADVANTAGE_NORMS = ("group", "batch")  # rlhf.advantage_norm


@dataclass
class PromptSplit:
    """Which prompts the stage trains on and which it holds out for evaluation.

    Prompts are the distinct captions of the manifest's clips (dialogue removed), of
    any corpus: synthetic or real footage. Every ``holdout_every``-th prompt (sorted, so the split
    does not depend on file order) is held out: neither the preference data nor
    DanceGRPO sees it, and evaluation uses only those.

    ``grammar_prompts`` adds that many training prompts drawn from the captions'
    grammar (:class:`pipelines.align.dmd.CaptionGrammar`: new count, colour and shape
    words in the captions' sentence frames), never a held-out prompt: a corpus has a few
    hundred captions, and a reward model trained on that few memorises them
    (BENCHMARKS.md, session 21). Captions with no ``count [colour] shape`` phrase
    (real footage) give no grammar, so no extra prompts.
    """

    holdout_every: int = 3
    max_prompts: int = 64
    grammar_prompts: int = 0


@dataclass
class PreferenceConfig:
    """Preference data drawn from the parent model and ranked by the programmatic rater."""

    candidates_per_prompt: int = 6  # G candidates a group
    # One initial noise shared by a group's candidates (as DanceGRPO's groups are), so
    # they differ only by the sampler's noise; False: each candidate its own.
    shared_noise: bool = True
    rounds: int = 4  # groups per training prompt (different initial noise each)
    steps: int = 10  # SDE sampler steps (the same sampler DanceGRPO explores with)
    eta: float = 0.3
    text_scale: float = 4.0
    # Seconds a candidate (and a DanceGRPO rollout). On 1 s candidates of the shipped
    # checkpoint the rater's sync pairs keep their order under an invisible re-encode
    # 42-53% of the time, on 2 s (33 / 16) ones 75-91%, motion's 72-80% -> 79-87%
    # (BENCHMARKS.md, session 20); 2 s costs twice the sampling.
    duration_s: float = 17 / 16
    write_mp4: bool = True  # candidate clips as MP4 beside the table (the schema's URIs)
    # Groups sampled in one batched rollout (each from its own seeds, so the same
    # candidates as one at a time up to floating-point order).
    groups_per_batch: int = 1
    rater_id: str = "probe-rater-v1"
    # Which rater score ranks candidates on adherence: "colour_frames" (the named colours
    # with their counts, frame by frame, averaged) or "objects" (the whole clip's
    # (colour, shape) multiset, the held-out measure). A group's candidates share their
    # initial noise; on them "objects" orders pairs no better than a coin under an
    # invisible re-encode, "colour_frames" keeps 87-96% (bench/rater_reliability.py).
    adherence_score: str = "colour_frames"


@dataclass
class RewardConfig:
    """The learned multi-head reward model (per-head Bradley-Terry on latents + prompt,
    and on what an observer sees in the decoded frames where it can be taught).

    The network is :class:`pipelines.align.reward.RewardNetConfig` preset ``preset``
    (``tiny`` for CPU, ``small``, ``base`` for a GPU); ``width`` and ``depth`` override
    the preset's when set."""

    preset: str = "tiny"
    width: int | None = None
    depth: int | None = None
    steps: int = 300
    batch_pairs: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # Pairs whose rater scores differ by less than this carry no preference.
    min_margin: float = 0.05
    # Fraction of the preference prompts held out (every round(1 / fraction)-th of the
    # sorted prompts): their pairs never reach training and measure agreement with the
    # rater on prompts the reward model never saw.
    holdout_fraction: float = 0.25
    seed: int = 0
    # The floor: ``reward_source="model"`` refuses to start DanceGRPO when the held-out
    # agreement with the rater of a head it optimises (weight > 0) is below this, or
    # unknown (no held-out pairs). 0 turns the floor off. (Optimising a reward that
    # orders held-out pairs no better than chance moves nothing the rater measures.)
    min_agreement: float = 0.6
    # ...and when a head it optimises has fewer held-out pairs than this: at 17 pairs an
    # agreement of 0.82 has a standard error of 0.09, and such a head (audio, weight
    # 0.25) drove the policy where the rater's visual score fell by 6 standard errors
    # (BENCHMARKS.md, session 29). Checked only while the floor is on.
    min_val_pairs: int = 50
    # Weight in the loss of each preference pair by where it came from: people (the
    # /rank page, `duet prefs import`, human ranks in the table) or the programmatic
    # rater. 0 leaves that source out.
    human_weight: float = 1.0
    rater_weight: float = 1.0
    # Known-order pairs from the training corpus (pipelines.align.contrast_pairs): this
    # many clips, each under its own caption against another's (adherence) and with its
    # sound rotated by contrast_shift_steps video latent steps (sync), at contrast_weight
    # per pair. Clips of held-out prompts are never used. 0 = none.
    corpus_contrasts: int = 0
    contrast_weight: float = 1.0
    contrast_shift_steps: int = 2
    # The observer (pipelines.align.observer): where the preference table's candidates
    # carry the probes' frame-by-frame observations (the synthetic world), a network
    # learns to see them in the decoded frames (observer_size pixels a side) first,
    # observer_steps steps of observer_batch candidates (a random observer_window
    # frames each), and sync, adherence and motion are then scored from what it sees
    # and the prompt. False: every head from the latents, as on footage.
    observe: bool = True
    # Held-out count error on decoded candidates (BENCHMARKS.md, session 25): 0.077 after
    # 1000 steps, 0.035 after 2000 (against 0.24 seeing nothing); about 0.3 s a step
    # on two CPU cores, a fraction of that on a GPU.
    observer_steps: int = 2000
    observer_batch: int = 8
    observer_window: int = 16
    observer_width: int = 32
    # Frames are decoded at observer_size pixels a side (the world's candidates' own
    # 128) and the heatmaps read them pooled to observer_heat_size (64: at 128 the
    # peaks were not learned, session 42).
    observer_size: int = 128
    observer_heat_size: int = 64
    observer_lr: float = 2e-3
    # A full-resolution pixel-class mask of observer_mask_width channels (0: none) gives
    # each colour's centre to about a quarter pixel (median, held out; the peaks: 1.3),
    # and with observer_rule_impacts the impacts are read from its objects by the
    # rater's own tracker and kink rule instead of a learned head (session 43). 64
    # channels: the colour mask's (below) measured width.
    observer_mask_width: int = 64
    observer_rule_impacts: bool = True
    # The mask reads each pixel's own colour as the probes' colour table does
    # ("palette": the table's cell and the distances to its prototype colours, 1 x 1
    # layers learning the table), the colour alone ("colour") or its 5 x 5
    # neighbourhood and change ("neighbourhood", learning the table only where the
    # probes found the colour, which no local network can know). On 64 held-out
    # candidates' frames, pixel recall / precision 0.995 / 0.990 (palette) against
    # 0.975 / 0.970 (colour), and the rater's rule finds impacts in the mask's objects
    # at 0.85 / 0.83 against 0.65 / 0.69 (session 46); neighbourhood: pixel precision
    # 0.92 on an H100 table (session 45).
    observer_mask_reads: str = "palette"
    # The colour mask learns first, on its own, for this many steps of 8192 pixels
    # drawn from 64 random frames, then stays as it is (0: with the observer, on its
    # windows). Measured on 200 held-out candidates' frames: 8000 such steps give pixel
    # recall 0.97 and precision 0.96 and objects counted wrong on 0.7% of the
    # colour-frames; the observer's 2000 windows gave 0.79, 0.92 and 2.7% (session 45).
    observer_colour_steps: int = 8000
    # Sync and motion are scored by a learned linear read of the rater's own rules
    # computed over what the observer sees (pipelines.align.observer.rule_features)
    # instead of a mean of per-frame features; adherence keeps the latter (session 44).
    observer_rule_features: bool = True
    # Objects are counted and placed from the mask's cleaned objects, as the probes
    # count theirs, instead of the heatmap's peaks (needs observer_mask_width). Off:
    # on an H100 table the same observer's mask counts split objects (pixel recall
    # 0.78) and held-out adherence fell to 0.53 from the peaks' 0.71 (session 45).
    observer_mask_counts: bool = False


@dataclass
class JudgeConfig:
    """A vision-language judge behind an OpenAI-compatible chat-completions endpoint
    (``reward_source="judge"``, :mod:`pipelines.align.judge`): P("yes") per head."""

    base_url: str = ""  # e.g. "http://127.0.0.1:8000/v1" (http or https, no credentials)
    model: str = ""
    api_key_env: str = ""  # the NAME of the environment variable holding the key ("": none)
    timeout_s: float = 60.0  # per request, connection to last byte
    max_frames: int = 4  # decoded frames sent per clip, evenly spaced
    max_response_bytes: int = 1 << 20
    top_logprobs: int = 20
    # Heads it is asked about (it sees frames, not sound: sync and audio are not asked).
    heads: tuple[str, ...] = ("adherence", "motion", "visual")


@dataclass
class RLHFStageConfig:
    steps: int = 60
    batch_size: int = 2  # prompts per worker per step; each gets a group of G candidates
    lr: float = 2e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    checkpoint_every: int = 20
    log_every: int = 5
    # DanceGRPO.
    group_size: int = 8  # G candidates per prompt
    # One initial noise shared by a group's candidates (DanceGRPO); false: each its own
    # (Flow-GRPO). Own noise makes candidates differ more, but by a noise the policy does
    # not choose: on a toy policy it learned far less (BENCHMARKS.md, session 26).
    shared_noise: bool = True
    sample_steps: int = 10  # SDE sampler steps per rollout
    eta: float = 0.3  # SDE noise level
    text_scale: float = 4.0  # the policy samples with the guidance it is used with
    timestep_fraction: float = 0.6  # fraction of sampling steps trained on, drawn per step
    # 0: every sampling step draws noise (DanceGRPO). k > 0: k consecutive steps do, their
    # start drawn per rollout batch, the others are the ODE (MixGRPO's window), and only
    # the window's steps are trained on (timestep_fraction unused): a candidate's
    # advantage then comes from the noise of the steps it trains on, not from every
    # step's (a rollout batch's gradient was under 1% signal; BENCHMARKS.md, session 34).
    sde_window: int = 0
    # -1: the window's start drawn per rollout batch; j >= 0: always sampling step j. On
    # the H100 the first step (t = 1, where a shared-noise group's candidates first part)
    # was the only one whose own gradient showed any signal (BENCHMARKS.md, session 35).
    sde_window_start: int = -1
    clip_range: float = 1e-3  # PPO ratio clip (log-probs are per-element means)
    adv_clip_max: float = 5.0  # per head, on its group-normalised advantage
    # "group": each head's rewards divided by the group's std (DanceGRPO); "batch":
    # centred in the group, divided by the head's spread over the rollout batch (a group
    # whose candidates differ only by the rater's noise then pulls little).
    advantage_norm: str = "group"
    # Optimiser steps per rollout batch: the batch's (candidate, step) rows are split
    # over this many updates (as DanceGRPO's gradient-accumulation chunks), so from the
    # second on the policy has moved, the ratio differs from 1 and the clip acts.
    updates_per_rollout: int = 2
    # Groups sampled in one batch of the network (0: all of a worker's rollout batch).
    # Each group draws from its own generator, so this changes memory, not the samples.
    rollout_groups_per_batch: int = 0
    # Rows of an update run forward together (0: all of them). Fewer: the update's
    # loss is accumulated chunk by chunk (grpo.ChunkedLoss), the same gradient with one
    # chunk's activations. 16 groups of 8 at 60% of 10 steps over 2 updates are 384
    # guided rows of 2 s clips: more than 139 GiB on one H200 (BENCHMARKS.md, session 28).
    loss_rows_per_chunk: int = 0
    # Candidates trained on per group: the best and worst k by total reward (0 = all G).
    best_worst_k: int = 0
    # KL to the frozen parent (SFT) policy, per trained step; 0 = off (as in DanceGRPO).
    # None: on (Flow-GRPO's 0.04) when the reward is learned, which a policy can exploit;
    # off with the rater.
    kl_weight: float | None = None
    # Per-head advantage weights, in HEADS order.
    head_weights: tuple[float, ...] = (1.0, 1.0, 0.25, 0.25, 0.25)
    # Reward the policy optimises: "model" (the learned reward), "judge" (a
    # vision-language endpoint, ``judge``) or "rater" (the probes; for ablations only:
    # then the probes are no longer an independent check).
    reward_source: str = "model"
    # Rate every rollout with the programmatic rater too (reward_source="model"), log
    # both, and flag a reward model score that rises while the rater's falls.
    monitor_rater: bool = True
    # The gradient-noise monitor: the first update of each rollout keeps its gradient
    # (one fp32 copy of the trained weights) and logs its dot product with the previous
    # rollout's; the report gives the share of a batch's gradient that is signal.
    monitor_gradient: bool = True
    # Processes that run the rater beside the sampler (preference data and the monitor's
    # ratings; pipelines.align.rater.rater_pool). 0 rates in the stage's process; on a
    # GPU host the CPU-bound probes otherwise take most of each group's time.
    rater_workers: int = 0
    prompts: PromptSplit = field(default_factory=PromptSplit)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self) -> None:
        if self.reward_source not in ("model", "judge", "rater"):
            raise ValueError(
                f"reward_source must be 'model', 'judge' or 'rater', got {self.reward_source!r}"
            )
        if self.reward_source == "judge" and not (self.judge.base_url and self.judge.model):
            raise ValueError("reward_source 'judge' needs judge.base_url and judge.model")
        unknown = sorted(set(self.judge.heads) - set(HEADS))
        if unknown:
            raise ValueError(f"judge.heads {unknown} are not reward heads ({', '.join(HEADS)})")
        if len(self.head_weights) != len(HEADS):
            raise ValueError(f"head_weights needs {len(HEADS)} entries ({', '.join(HEADS)})")
        if self.advantage_norm not in ADVANTAGE_NORMS:
            raise ValueError(
                f"advantage_norm must be one of {', '.join(ADVANTAGE_NORMS)}, "
                f"got {self.advantage_norm!r}"
            )
        if self.rollout_groups_per_batch < 0:
            raise ValueError(
                "rlhf.rollout_groups_per_batch must be >= 0 (0: a whole rollout batch)"
            )
        if self.loss_rows_per_chunk < 0:
            raise ValueError("rlhf.loss_rows_per_chunk must be >= 0 (0: an update's rows at once)")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative within a group)")
        if not 0 <= self.sde_window <= self.sample_steps:
            raise ValueError(
                f"sde_window must be in [0, sample_steps = {self.sample_steps}] (0: all steps)"
            )
        if self.sde_window_start != -1 and not (
            self.sde_window > 0
            and 0 <= self.sde_window_start <= self.sample_steps - self.sde_window
        ):
            raise ValueError(
                f"sde_window_start must be -1 (drawn) or a step in [0, sample_steps - "
                f"sde_window = {self.sample_steps - self.sde_window}] with sde_window > 0, "
                f"got {self.sde_window_start}"
            )
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError("timestep_fraction must be in (0, 1]")
        if self.best_worst_k and 2 * self.best_worst_k > self.group_size:
            raise ValueError("best_worst_k must be at most group_size / 2")
        if self.preferences.adherence_score not in ADHERENCE_SCORES:
            raise ValueError(
                f"rlhf.preferences.adherence_score must be one of {sorted(ADHERENCE_SCORES)}"
            )
        if self.rater_workers < 0:
            raise ValueError("rater_workers must be >= 0 (0 rates in the stage's process)")
        if self.preferences.groups_per_batch < 1:
            raise ValueError("rlhf.preferences.groups_per_batch must be >= 1")
        if self.prompts.grammar_prompts < 0:
            raise ValueError("rlhf.prompts.grammar_prompts must be >= 0 (0: the captions only)")
        if self.updates_per_rollout < 1:
            raise ValueError("updates_per_rollout must be >= 1")
        if self.kl_weight is not None and self.kl_weight < 0:
            raise ValueError("kl_weight must be >= 0 (or unset: on with a learned reward)")
        r = self.reward
        if r.min_val_pairs < 0:
            raise ValueError("rlhf.reward.min_val_pairs must be >= 0")
        small = [name for name in ("observer_batch", "observer_window", "observer_width",
                                   "observer_size", "observer_heat_size")
                 if getattr(r, name) < 1]  # fmt: skip
        negative = min(r.observer_steps, r.observer_mask_width, r.observer_colour_steps) < 0
        if small or negative or r.observer_lr <= 0:
            raise ValueError(
                "rlhf.reward needs observer_batch, observer_window, observer_width, "
                "observer_size and observer_heat_size >= 1, observer_steps, "
                "observer_mask_width and observer_colour_steps >= 0 and observer_lr > 0"
                + (f" ({', '.join(small)} below 1)" if small else "")
            )
        if r.observer_mask_reads not in ("palette", "colour", "neighbourhood"):
            raise ValueError(
                f"rlhf.reward.observer_mask_reads {r.observer_mask_reads!r}: palette, colour "
                "or neighbourhood"
            )

    def kl_coefficient(self) -> float:
        """The KL weight in force: ``kl_weight``, or by default 0.04 with a learned reward
        or a judge (both can be exploited; the rater is the ablation)."""
        if self.kl_weight is not None:
            return self.kl_weight
        return DEFAULT_KL_WEIGHT if self.reward_source != "rater" else 0.0


@dataclass
class DMDConfig:
    """DMD2 (``distill.method = "dmd2"``, :mod:`pipelines.align.dmd`).

    The loop's steps alternate: ``fake_updates`` updates of the fake score, then one
    of the student (DMD2's two time-scale rule: the fake score has to follow the
    student's distribution, so it is updated more often). ``distill.steps`` counts
    both kinds."""

    fake_updates: int = 4
    # Learning rates of the student and the fake score (distill.lr is reflow's). The
    # student's is lower: at reflow's 5e-4 the tiny student drifted away from its
    # teacher (bench/align_fast.py --compare), at 1e-4 it moved toward it.
    lr: float = 1e-4
    fake_lr: float = 5e-4
    # Noise levels of the distribution-matching and fake-score terms (before the
    # resolution shift): away from the ends, where the scores carry no signal.
    time_min: float = 0.02
    time_max: float = 0.98
    # Share of each batch's prompts drawn from the caption grammar (the rest are
    # captions: the training prompts, the manifest's other captions, extra_prompts).
    grammar_fraction: float = 0.5
    # 0: a new grammar caption at every draw. N > 0: N distinct grammar captions drawn
    # once at the stage's start (seeded by the run's seed, written to the stage's
    # grammar_prompts.txt), the draws picking among them: the captions a student was
    # distilled on are then on record, and their text embeddings can be made ahead of
    # time for a host without the text encoder (pipelines.shipped.align_job).
    grammar_pool: int = 0
    # Clip lengths (frames, each 1 + 4k) drawn per step; empty: every bucket the
    # parent's stages trained on (data, pretrain and sft frame_buckets).
    frame_buckets: tuple[int, ...] = ()
    # Optional regression on the guided teacher's ODE endpoint of the same initial
    # noise (DMD's regression loss; DMD2 drops it): 0 = off. On the H200 a student of
    # 100 updates with weight 0.25 kept 0.816 of its teacher's held-out adherence, one
    # of 350 updates without it 0.728 (BENCHMARKS.md, session 28).
    regression_weight: float = 0.0
    # Where the regression's targets come from. 0: the teacher's Heun endpoint of the
    # step's own noise, sampled at every student update (teacher_steps guided
    # evaluations of the batch: with fake_updates 1 the run's steps took 3.7 times as
    # long on an H200). N > 0: N (noise, endpoint) pairs drawn once at the stage's
    # start over the caption distribution and clip lengths, kept beside the
    # checkpoints (DMD's paired dataset); a student update regresses a batch of them
    # in the same forward as its distribution-matching samples.
    regression_pairs: int = 0
    # How many of them the teacher samples at once (the speed of the draw, not which
    # pairs are drawn).
    regression_pairs_batch: int = 16
    # Guidance of the real score (the teacher) in the distribution-matching term; 0:
    # distill.text_scale, the guidance the teacher samples with. Above it the student
    # is pulled toward a more prompt-bound distribution than the teacher's samples
    # (DMD2 picks its real-score guidance apart from sampling's): what the Fast
    # student loses is its teacher's adherence, not its sync (BENCHMARKS.md, session 34).
    real_guidance: float = 0.0
    # DMD2's GAN on real clips (0 and 0: off). A classifier head on the fake score's
    # last hidden tokens tells the corpus's clips (the manifest's kept, captioned clips,
    # their latents from the training cache, held-out prompts' clips left out) from the
    # student's samples, both noised to the same levels; ``classifier_weight`` weighs
    # its loss in the fake-score updates, ``gan_weight`` the student's non-saturating
    # term through it. Real data is what the distribution-matching term never sees:
    # it lets the student correct what its teacher gets wrong (DMD2's reason). On the
    # H100 neither 0.005 nor 0.02 (classifier 0.01) moved the student's held-out
    # adherence (BENCHMARKS.md, session 37).
    gan_weight: float = 0.0
    classifier_weight: float = 0.0
    classifier_hidden: int = 128
    # How the student goes from one of its times to the next, in training (the
    # backward simulation) and when served (recorded in the Fast model): "euler" (the
    # ODE step, the step's own implied noise carried forward) or "renoise" (DMD2's
    # and consistency models' multi-step sampling: predict x0, noise it afresh to the
    # next time). Under renoise a later step's input depends on fresh noise, so the
    # regression (initial noise -> the teacher's endpoint) applies to first-step draws
    # only.
    sampler: str = "euler"
    # The shift of the student's step times (model.flow_matching.schedule), recorded
    # in the Fast model and served with it; 0: the resolution shift the teacher samples
    # with (1.59 for a 2 s clip of the shipped model). A larger shift spends the steps
    # nearer noise, where a clip's objects are laid out: the shipped teacher at 4 guided
    # Euler steps kept more of its colour score at shift 3 than at its own 1.59
    # (+0.020 +- 0.007; BENCHMARKS.md, session 38); a student trained on shift 3 did
    # not keep more (adherence 0.78 of its teacher on the GPU, session 39), so the
    # default stays the resolution shift.
    time_shift: float = 0.0


@dataclass
class DistillStageConfig:
    steps: int = 400
    batch_size: int = 16  # trajectory points per worker per step
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 20
    # Teacher: the parent checkpoint, sampled with Heun and classifier-free guidance.
    teacher_steps: int = 16
    text_scale: float = 4.0
    trajectories_per_prompt: int = 16
    # Prompts distilled besides the alignment training prompts. A reflow student keeps
    # its teacher's scores on the prompts it was distilled on and drifts on others (a
    # student of 8 prompts kept 69% of its teacher's held-out adherence, one with a
    # ninth prompt near a held-out one 100%: BENCHMARKS.md). method="dmd2" draws from
    # the whole caption distribution (manifest captions and the caption grammar), so
    # it needs none; these are added to its pool all the same. Held-out prompts are
    # refused.
    extra_prompts: tuple[str, ...] = ()
    duration_s: float = 17 / 16
    # Step counts the student is trained for (its time grid is the union of theirs;
    # the shifted schedule of 8 steps contains that of 4).
    student_steps: tuple[int, ...] = (4, 8)
    default_steps: int = 4
    # "reflow" (teacher couplings of the training prompts, :mod:`pipelines.align.distill`)
    # or "dmd2" (distribution matching over the whole caption distribution, every
    # clip length, :mod:`pipelines.align.dmd`; ``extra_prompts`` is not needed).
    method: str = "reflow"
    dmd: DMDConfig = field(default_factory=DMDConfig)

    def validate(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"distill.ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.method not in DISTILL_METHODS:
            raise ValueError(
                f"distill.method must be one of {DISTILL_METHODS}, got {self.method!r}"
            )
        d = self.dmd
        if d.fake_updates < 1:
            raise ValueError("distill.dmd.fake_updates must be >= 1")
        if not 0.0 <= d.time_min < d.time_max <= 1.0:
            raise ValueError("distill.dmd needs 0 <= time_min < time_max <= 1")
        if d.grammar_pool < 0:
            raise ValueError("distill.dmd.grammar_pool must be >= 0 (0: no fixed pool)")
        if not 0.0 <= d.grammar_fraction <= 1.0:
            raise ValueError("distill.dmd.grammar_fraction must be in [0, 1]")
        if d.regression_weight < 0 or d.fake_lr <= 0 or d.lr <= 0:
            raise ValueError("distill.dmd needs lr > 0, fake_lr > 0, regression_weight >= 0")
        if not d.real_guidance >= 0:  # NaN too
            raise ValueError("distill.dmd.real_guidance must be >= 0 (0: distill.text_scale)")
        if not 0 <= d.time_shift <= 100:  # NaN too
            raise ValueError("distill.dmd.time_shift must be in [0, 100] (0: the resolution shift)")
        if d.regression_pairs_batch < 1:
            raise ValueError("distill.dmd.regression_pairs_batch must be >= 1")
        if d.regression_pairs < 0:
            raise ValueError("distill.dmd.regression_pairs must be >= 0 (0: sampled per step)")
        if d.regression_pairs and not d.regression_weight:
            raise ValueError(
                "distill.dmd.regression_pairs is for the regression: set "
                "distill.dmd.regression_weight > 0 too, or regression_pairs to 0"
            )
        if not (d.gan_weight >= 0 and d.classifier_weight >= 0 and d.classifier_hidden >= 1):
            raise ValueError(
                "distill.dmd needs gan_weight >= 0, classifier_weight >= 0, classifier_hidden >= 1"
            )
        if (d.gan_weight > 0) != (d.classifier_weight > 0):
            raise ValueError(
                "distill.dmd.gan_weight and classifier_weight are the two sides of one GAN: "
                f"set both > 0 or both 0, got {d.gan_weight} and {d.classifier_weight}"
            )
        if d.sampler not in STUDENT_SAMPLERS:
            raise ValueError(
                f"distill.dmd.sampler must be one of {STUDENT_SAMPLERS}, got {d.sampler!r}"
            )
        if d.sampler != "euler" and self.method != "dmd2":
            raise ValueError(
                f"distill.dmd.sampler {d.sampler!r} is for method 'dmd2': reflow's student "
                "follows its teacher's ODE couplings (euler)"
            )
        if d.time_shift and self.method != "dmd2":
            raise ValueError(
                "distill.dmd.time_shift is for method 'dmd2': reflow's student learns its "
                "teacher's couplings on the resolution shift's grid"
            )
        if self.default_steps not in self.student_steps:
            raise ValueError(f"default_steps {self.default_steps} not in {self.student_steps}")
        if any(s < 1 for s in self.student_steps):
            raise ValueError("student_steps must be >= 1")
