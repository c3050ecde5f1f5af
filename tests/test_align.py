"""Alignment and Fast on ``tiny``: the stages run, resume and skip like every stage, and
the Fast student samples with 4 network evaluations where the Full model needs 19.5x
more.

The run is the session's short chain (``tiny_chain_run``, tests/conftest.py: every
stage, ``vae -> pretrain -> sft -> rlhf -> distill``, at the fewest steps, on the
losslessly written conditioning corpus), trained through :func:`pipelines.train.train`
with the local runner. These tests check what the stages do, not what they learn:
what DanceGRPO, the reward model and the student learn on fixed data is checked
deterministically by tests/test_learning_signal.py, and how much a recipe gains on
held-out prompts is measured by ``python -m bench.quality`` (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core import storage
from core.config import config_to_dict
from model.pipeline import DuetPipeline
from pipelines.align.config import HEADS
from pipelines.align.preferences import (
    PreferenceDataError,
    preference_pairs,
    read_preferences,
    write_preferences,
)
from pipelines.align.stages import prompt_sets
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


def test_grammar_prompts_add_training_prompts_from_the_seed_and_never_a_held_out_one(
    tiny_curated_corpus,
):
    """``rlhf.prompts.grammar_prompts``: the captions' split unchanged, then that many
    grammar captions (the same for the same seed) added to the training prompts, each
    one the rater can read and none a held-out prompt."""
    from pipelines.align.dmd import normalise
    from pipelines.align.rater import parse_caption

    def sets(n: int, seed: int = 0):
        return prompt_sets(train_config_from({
            "seed": seed, "data": {"curated_uri": tiny_curated_corpus},
            "rlhf": {"prompts": {"max_prompts": 1000, "grammar_prompts": n}},
        }))  # fmt: skip

    train0, held0 = sets(0)
    # Enough draws that a grammar this small writes held-out prompts too (the test
    # fails if the held-out ones are not excluded).
    train, held = sets(300)
    assert held == held0
    assert train[: len(train0)] == train0
    extra = train[len(train0) :]
    assert 150 <= len(extra) <= 300, len(extra)  # a draw may repeat a training caption
    assert not {normalise(p) for p in extra} & {normalise(p) for p in held}
    assert all(parse_caption(p) for p in extra)
    assert sets(300) == (train, held)
    assert sets(300, seed=1)[0][len(train0) :] != extra
    with pytest.raises(ValueError, match="grammar_prompts"):
        train_config_from({"rlhf": {"prompts": {"grammar_prompts": -1}}})


# -- the stages on the session's short chain ---------------------------------------


@pytest.fixture(scope="module")
def aligned(tiny_chain_run):
    cfg = tiny_chain_run
    finals = {s: f"{cfg.run_uri}/{s}/final" for s in ("sft", "rlhf", "distill")}
    _, held_out = prompt_sets(cfg)
    return {"cfg": cfg, "finals": finals, "held_out": held_out}


def _dit_rows(pipeline, request) -> int:
    """DiT forward rows per clip, counted by a hook of this test's own."""
    from model.generate import generate

    rows = []
    hook = pipeline.dit.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        generate(request, pipeline)
    finally:
        hook.remove()
    return sum(rows)


@pytest.mark.slow
def test_fast_student_samples_with_4_network_evaluations_and_full_with_19x_more(aligned):
    """Counted on the network itself: the student's 4 Euler steps are 4 forward rows
    per clip (guidance distilled in, no unconditional pass); the Full path (Heun, 20
    steps, text guidance) of its teacher needs one conditional and one unconditional
    row per evaluation: Heun's 20 steps evaluate 2 x 20 - 1 times (the last step is
    Euler)."""
    from model.generate import GenerationRequest

    prompt = aligned["held_out"][0]
    student = DuetPipeline.from_checkpoint(aligned["finals"]["distill"])
    teacher = DuetPipeline.from_checkpoint(aligned["finals"]["rlhf"])
    fast = _dit_rows(student, GenerationRequest(prompt=prompt, quality="fast", duration_s=1.0))
    full = _dit_rows(teacher, GenerationRequest(prompt=prompt, duration_s=1.0))
    print(f"DiT rows per clip: Fast {fast}, Full {full} ({full / fast:.1f}x)")
    assert fast == 4
    assert full == 2 * (2 * 20 - 1)


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
def test_rlhf_refuses_a_head_whose_held_out_agreement_rests_on_too_few_pairs(aligned, tmp_path):
    """The stage holds the learned reward to rlhf.reward.min_val_pairs as well as to the
    floor: the run's reward model, with the floor barely on, is refused once a head it
    optimises needs more held-out pairs than it has, before DanceGRPO's first step."""
    import shutil

    from pipelines.align.reward import RewardFloorError

    run = tmp_path / "few_pairs"
    for part in ("sft/final", "rlhf/preferences", "rlhf/reward"):
        shutil.copytree(f"{aligned['cfg'].run_uri}/{part}", run / part)
    config = config_to_dict(aligned["cfg"])
    config["run_uri"] = str(run)
    config["rlhf"]["reward"].update({"min_agreement": 1e-6, "min_val_pairs": 10**6})
    with pytest.raises(RewardFloorError, match=r"on only \d+ pairs .*min_val_pairs = 1000000"):
        train(train_config_from(config), stages=("rlhf",))
    assert not storage.exists(f"{run}/rlhf/final/config.json")
    config["rlhf"]["reward"]["min_val_pairs"] = 0  # the same run with the count unchecked
    config["rlhf"]["steps"] = 1
    train(train_config_from(config), stages=("rlhf",))
    assert storage.exists(f"{run}/rlhf/final/config.json")


@pytest.mark.slow
def test_rlhf_with_the_rater_as_reward_trains_no_reward_model(aligned, tmp_path):
    """``reward_source="rater"`` (the ablation): DanceGRPO's rewards are the probes'
    scores of each rollout, weighted by ``head_weights``; the stage neither draws
    preferences nor trains a reward model, keeps KL off, and says so in its summary."""
    import shutil

    run = tmp_path / "rater_reward"
    shutil.copytree(f"{aligned['cfg'].run_uri}/sft/final", run / "sft/final")
    config = config_to_dict(aligned["cfg"])
    config["run_uri"] = str(run)
    config["rlhf"].update({"reward_source": "rater", "steps": 3, "batch_size": 1,
                           "group_size": 4, "sample_steps": 4, "log_every": 1,
                           "checkpoint_every": 10, "rater_workers": 0})  # fmt: skip
    train(train_config_from(config), stages=("rlhf",))
    final = storage.read_json(f"{run}/rlhf/final/config.json")
    summary = final["extra"]["metrics"]
    assert summary["reward_source"] == "rater" and summary["kl_weight"] == 0.0
    assert summary["reward_val_agreement"] is None and "reward_hacking" not in summary
    for part in ("reward", "preferences"):
        assert not storage.exists(f"{run}/rlhf/{part}"), part
    rows = _metrics(f"{run}/rlhf")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The rewards are the rater's own weighted scores: in [0, sum of the weights].
    top = sum(config["rlhf"]["head_weights"])
    assert all(0.0 <= r["reward"] <= top + 1e-6 for r in rows), rows
    # The gradient monitor reads the first update of each rollout (steps 1 and 3 of two
    # updates a rollout), the second rollout's against the first's.
    assert rows[0]["grad_sq"] > 0 and "grad_dot_previous" not in rows[0]
    assert "grad_sq" not in rows[1] and "grad_dot_previous" in rows[2]
    signal = summary["gradient_signal"]
    assert signal["rows"] == 1
    assert signal["signal_share"] == pytest.approx(
        rows[2]["grad_dot_previous"] / rows[2]["grad_sq"]
    )


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
