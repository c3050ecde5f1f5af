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


@dataclass
class PromptSplit:
    """Which prompts the stage trains on and which it holds out for evaluation.

    Prompts are the distinct captions of the manifest's clips that name a coloured
    shape (dialogue removed). Every ``holdout_every``-th prompt (sorted, so the split
    does not depend on file order) is held out: neither the preference data nor
    DanceGRPO sees it, and evaluation uses only those.
    """

    holdout_every: int = 3
    max_prompts: int = 64


@dataclass
class PreferenceConfig:
    """Preference data drawn from the parent model and ranked by the programmatic rater."""

    candidates_per_prompt: int = 6  # G candidates from one shared initial noise each
    rounds: int = 4  # groups per training prompt (different initial noise each)
    steps: int = 10  # SDE sampler steps (the same sampler DanceGRPO explores with)
    eta: float = 0.3
    text_scale: float = 4.0
    duration_s: float = 17 / 16
    write_mp4: bool = True  # candidate clips as MP4 beside the table (the schema's URIs)
    rater_id: str = "probe-rater-v1"


@dataclass
class RewardConfig:
    """The learned multi-head reward model (per-head Bradley-Terry on latents + text)."""

    width: int = 32
    steps: int = 300
    batch_pairs: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # Pairs whose rater scores differ by less than this carry no preference.
    min_margin: float = 0.05
    # Fraction of prompt groups held out to measure agreement with the rater.
    holdout_fraction: float = 0.25
    seed: int = 0


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
    group_size: int = 8  # G candidates per prompt, from one shared initial noise
    sample_steps: int = 10  # SDE sampler steps per rollout
    eta: float = 0.3  # SDE noise level
    text_scale: float = 4.0  # the policy samples with the guidance it is used with
    timestep_fraction: float = 0.6  # fraction of sampling steps trained on, drawn per step
    clip_range: float = 1e-3  # PPO ratio clip (log-probs are per-element means)
    adv_clip_max: float = 5.0
    # Candidates trained on per group: the best and worst k by total reward (0 = all G).
    best_worst_k: int = 0
    # KL to the frozen parent (SFT) policy, per trained step; 0 = off (as in DanceGRPO).
    kl_weight: float = 0.0
    # Per-head advantage weights, in HEADS order.
    head_weights: tuple[float, ...] = (1.0, 1.0, 0.25, 0.25, 0.25)
    # Reward the policy optimises: "model" (the learned reward) or "rater" (the probes;
    # for ablations only: then the probes are no longer an independent check).
    reward_source: str = "model"
    prompts: PromptSplit = field(default_factory=PromptSplit)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> None:
        if self.reward_source not in ("model", "rater"):
            raise ValueError(
                f"reward_source must be 'model' or 'rater', got {self.reward_source!r}"
            )
        if len(self.head_weights) != len(HEADS):
            raise ValueError(f"head_weights needs {len(HEADS)} entries ({', '.join(HEADS)})")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative within a group)")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError("timestep_fraction must be in (0, 1]")
        if self.best_worst_k and 2 * self.best_worst_k > self.group_size:
            raise ValueError("best_worst_k must be at most group_size / 2")


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
    # Prompts distilled besides the alignment training prompts. The student keeps its
    # teacher's scores on the prompts it was distilled on and drifts on others (a
    # student of 8 prompts kept 69% of its teacher's held-out adherence, one with a
    # ninth prompt near a held-out one 100%: BENCHMARKS.md), so a user's own prompt
    # list belongs here; no data is needed, the teacher draws the targets. Held-out
    # prompts are refused.
    extra_prompts: tuple[str, ...] = ()
    duration_s: float = 17 / 16
    # Step counts the student is trained for (its time grid is the union of theirs;
    # the shifted schedule of 8 steps contains that of 4).
    student_steps: tuple[int, ...] = (4, 8)
    default_steps: int = 4

    def validate(self) -> None:
        if self.default_steps not in self.student_steps:
            raise ValueError(f"default_steps {self.default_steps} not in {self.student_steps}")
        if any(s < 1 for s in self.student_steps):
            raise ValueError("student_steps must be >= 1")
