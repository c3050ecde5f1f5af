"""Alignment and the Fast variant: stages ``rlhf`` (DanceGRPO) and ``distill``.

- :mod:`.config`: the stages' configs (fields of ``TrainConfig``);
- :mod:`.rater`: the programmatic rater (per-head scores from the probes);
- :mod:`.preferences`: the versioned preference table (rater or human rankings);
- :mod:`.reward`: the learned multi-head reward model (per-head Bradley-Terry);
- :mod:`.sde`: the flow sampler as an SDE with per-step log-probabilities;
- :mod:`.grpo`: DanceGRPO's group rollouts, per-head advantages and clipped losses;
- :mod:`.sampling`: a clip's latent shapes, the time grid and prompt tokens they share;
- :mod:`.distill`: the Fast student (reflow on guided teacher couplings);
- :mod:`.dmd`: the Fast student by distribution matching (DMD2);
- :mod:`.stages`: both stages as tasks of :func:`pipelines.train.loop.run_stage`;
- :mod:`.evaluate`: probe metrics on held-out prompts, Full against Fast.

Stages run through :func:`pipelines.train.train` like every other stage.
"""
