"""What ``pipelines.shipped.align_job`` and the alignment stages it drives rely on: the
rater in worker processes, reward inputs joined across prompt lengths, the carry's text
table grown in place, and issue 23's targets checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.media import AVClip
from pipelines.align.evaluate import summarize
from pipelines.align.rater import rate_clips, rater_pool
from pipelines.align.stages import concat_inputs
from pipelines.shipped.align_job import target_rows


def _clips(count: int) -> list[AVClip]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        frames = np.full((9, 64, 64, 3), 120, np.uint8)
        frames[:, 20:40, 10 + 3 * i : 30 + 3 * i] = (230, 40, 40)  # a red square
        audio = (rng.standard_normal((2, 9000)) * 0.05 * (i + 1)).astype(np.float32)
        out.append(AVClip(frames=frames, fps=16.0, audio=audio, sample_rate=16000))
    return out


def test_the_rater_scores_the_same_in_worker_processes_as_in_process():
    clips = _clips(3)
    prompts = ["a red square bounces on a gray floor"] * 3
    here = rate_clips(prompts, clips, ("sync",))
    pool = rater_pool(2)
    try:
        there = rate_clips(prompts, clips, ("sync",), pool)
    finally:
        pool.shutdown()
    assert there == here
    assert all(s["sync"] is None and s["adherence"] is not None for s in there)
    assert rater_pool(0) is None
    with pytest.raises(ValueError, match="2 prompts for 3 clips"):
        rate_clips(prompts[:2], clips)


def test_bad_rater_workers_are_refused():
    from pipelines.train.config import train_config_from

    with pytest.raises(ValueError, match="rater_workers"):
        train_config_from({"rlhf": {"rater_workers": -1}}).rlhf.validate()


def test_reward_inputs_of_two_row_sets_join_with_prompt_tokens_padded_to_the_longer():
    a = {"video": torch.zeros(2, 4, 3, 2, 2), "audio": torch.zeros(2, 4, 6),
         "tokens": torch.ones(2, 3, 5), "mask": torch.ones(2, 3, dtype=torch.bool)}  # fmt: skip
    b = {"video": torch.ones(1, 4, 3, 2, 2), "audio": torch.ones(1, 4, 6),
         "tokens": torch.full((1, 7, 5), 2.0), "mask": torch.ones(1, 7, dtype=torch.bool)}  # fmt: skip
    out = concat_inputs(a, b)
    assert out["tokens"].shape == (3, 7, 5) and out["mask"].shape == (3, 7)
    assert out["mask"][:2, :3].all() and not out["mask"][:2, 3:].any() and out["mask"][2].all()
    assert torch.equal(out["tokens"][:2, :3], a["tokens"]) and not out["tokens"][:2, 3:].any()
    assert torch.equal(out["tokens"][2], b["tokens"][0])
    assert torch.equal(out["video"], torch.cat([a["video"], b["video"]]))
    # Either order, and equal lengths left as they are.
    assert concat_inputs(b, a)["tokens"].shape == (3, 7, 5)
    assert torch.equal(concat_inputs(a, a)["tokens"], torch.cat([a["tokens"], a["tokens"]]))


def _result(values: dict[str, list[float]]) -> dict:
    rows = []
    for i in range(4):
        row = {"prompt": f"p{i // 2}", "seed": i % 2, "wall_s": 1.0, "network_evals": 4,
               "sync_recall": 0.0, "sync_precision": 0.0}  # fmt: skip
        row.update({h: v[i] for h, v in values.items()})
        rows.append(row)
    return {"rows": rows, "summary": summarize(rows)}


def test_fast_against_its_teacher_by_how_many_objects_the_prompt_names(capsys):
    from pipelines.shipped.align_job import fast_by_objects

    prompts = ["a red circle bounces", "a red circle bounces",
               "a blue square and two green circles bounce", "a face talks"]  # fmt: skip

    def result(adherence: list[float]) -> dict:
        rows = [{"prompt": p, "seed": i, "adherence": a, "adherence_colour_frames": a,
                 "sync": 0.0, "motion": 0.0}
                for i, (p, a) in enumerate(zip(prompts, adherence, strict=True))]  # fmt: skip
        return {"rows": rows}

    # One object: differences 0 and -0.2 (mean -0.1, se 0.1); several: -0.5 (one clip,
    # se 0); the prompt naming no coloured object is in neither group.
    split = fast_by_objects({"rlhf": result([0.5, 0.6, 0.9, 0.1]),
                             "fast": result([0.5, 0.4, 0.4, 0.9])})  # fmt: skip
    assert split["adherence"] == {
        "one object": {"mean": -0.1, "se": 0.1, "clips": 2},
        "several objects": {"mean": -0.5, "se": 0.0, "clips": 1},
    }
    assert split["sync"]["several objects"]["mean"] == 0.0
    assert "adherence: one object -0.100 +- 0.100 (2 clips)" in capsys.readouterr().out


def test_issue_23_targets_against_hand_computed_values():
    flat = {"motion": [0.5] * 4, "visual": [0.5] * 4, "audio": [0.9] * 4}
    parent = _result({"sync": [0.0] * 4, "adherence": [0.0] * 4, **flat})
    # Adherence +0.15, paired differences 0.1, 0.2, 0.1, 0.2: se = 0.0577 / 2 = 0.0289,
    # 5.2 standard errors. Sync unchanged (se 0: no gain). Visual falls 0.1 for every
    # pair (se 0: a fall of 0.1 > 1 se).
    rlhf = _result({"sync": [0.0] * 4, "adherence": [0.1, 0.2, 0.1, 0.2],
                    "motion": [0.5] * 4, "visual": [0.4] * 4, "audio": [0.9] * 4})  # fmt: skip
    fast = _result({"sync": [0.0] * 4, "adherence": [0.1, 0.1, 0.1, 0.2], **flat})
    agreement = {"sync": {"agreement": 0.85, "pairs": 40},
                 "adherence": {"agreement": 0.79, "pairs": 300}, "motion": {"pairs": 0}}  # fmt: skip
    rows = {r["target"]: r for r in target_rows({"parent": parent, "rlhf": rlhf, "fast": fast},
                                                agreement)}  # fmt: skip
    assert rows["reward model held-out agreement, sync"]["met"]
    assert not rows["reward model held-out agreement, adherence"]["met"]
    assert rows["reward model held-out agreement, motion"]["measured"] == "no held-out pairs"
    assert not rows["reward model held-out agreement, motion"]["met"]
    adherence = rows["RLHF - parent, adherence"]
    assert adherence["met"] and adherence["measured"] == "+0.1500 +- 0.0289"
    assert not rows["RLHF - parent, sync"]["met"]
    assert rows["RLHF - parent, motion"]["met"] and rows["RLHF - parent, audio"]["met"]
    assert not rows["RLHF - parent, visual"]["met"]
    # Fast keeps 0.125 / 0.15 = 0.833 of its teacher's adherence: under 0.9.
    fast_row = rows["Fast (4 steps) / teacher, adherence"]
    assert not fast_row["met"] and fast_row["measured"].startswith("0.833 ")
    assert not rows["Fast (4 steps) / teacher, sync"]["met"]  # a teacher at 0 is no bar met
    # The student at the other step count it learnt: a row of its own, the same bar.
    fast_8 = _result({"sync": [0.0] * 4, "adherence": [0.1, 0.2, 0.1, 0.2], **flat})
    rows = {r["target"]: r for r in target_rows({"rlhf": rlhf, "fast": fast, "fast_8": fast_8},
                                                None)}  # fmt: skip
    assert not rows["Fast (4 steps) / teacher, adherence"]["met"]
    assert rows["Fast (8 steps) / teacher, adherence"]["met"]
    assert rows["Fast (8 steps) / teacher, adherence"]["measured"].startswith("1.000 ")
    # Without RLHF (refused) only the agreement rows; without a reward model, none of them.
    assert len(target_rows({"rlhf": parent}, agreement)) == 3
    assert not [r for r in target_rows({"parent": parent, "rlhf": rlhf}, None)
                if r["target"].startswith("reward")]  # fmt: skip


def test_texts_added_to_a_carry_are_embedded_once_and_the_table_keeps_the_rest(tmp_path):
    from model.text_encoder import FrozenTextEncoder
    from pipelines.shipped.carry import TEXTS_NAME, add_texts

    kept = torch.randn(4, 384).to(torch.float16)
    save_file({"a red circle": kept}, str(tmp_path / TEXTS_NAME))
    assert (
        add_texts(str(tmp_path), ["a red circle", "two blue squares", "", "two blue squares"]) == 1
    )
    table = load_file(str(tmp_path / TEXTS_NAME))
    assert set(table) == {"a red circle", "two blue squares"}
    assert torch.equal(table["a red circle"], kept)  # not re-embedded
    tokens, mask = FrozenTextEncoder().encode(["two blue squares"])
    assert torch.equal(table["two blue squares"], tokens[0][mask[0]].to(torch.float16))
    assert add_texts(str(tmp_path), ["two blue squares"]) == 0


def test_preferences_rated_in_processes_while_the_next_groups_sample_match_in_process(
    tiny_checkpoint, tmp_path
):
    """The table the rlhf stage writes is the same, row for row and latent for latent,
    whether the rater runs in the stage's process or in worker processes that rate a
    group while later groups are sampled (groups finish out of step with sampling)."""
    from core import storage
    from model.pipeline import DuetPipeline
    from pipelines.align.preferences import read_preferences
    from pipelines.align.stages import build_preferences
    from pipelines.train.config import train_config_from

    pipe = DuetPipeline.from_checkpoint(tiny_checkpoint).eval()
    prompts = ["a red circle bounces on a gray floor", "two blue squares collide",
               "a green face and a red circle bounce on a floor at night"]  # fmt: skip
    tables = {}
    for workers, batch in ((0, 1), (3, 1), (0, 4)):
        cfg = train_config_from({
            "preset": "tiny", "rlhf": {"rater_workers": workers, "preferences": {
                "candidates_per_prompt": 2, "rounds": 2, "steps": 2, "write_mp4": False,
                "groups_per_batch": batch}},
        })  # fmt: skip
        out = str(tmp_path / f"w{workers}-b{batch}")
        table = build_preferences(cfg, pipe, prompts, out, None)
        tables[workers, batch] = read_preferences(table)
    here, there = tables[0, 1], tables[3, 1]
    assert len(here) == 3 * 2 * 2
    assert [r["group_id"] for r in here] == [r["group_id"] for r in there]
    for a, b in zip(here, there, strict=True):
        assert {k: v for k, v in a.items() if k != "latent_uri"} == {
            k: v for k, v in b.items() if k != "latent_uri"
        }
        la, lb = (load_file(r["latent_uri"]) for r in (a, b))
        assert all(torch.equal(la[k], lb[k]) for k in ("video", "audio"))
        # The probes' frame-by-frame observations beside the latents, the same too.
        observed = ("observed_colour_counts", "observed_impact", "observed_onset")
        assert all(torch.equal(la[k], lb[k]) for k in observed)
        frames = la["observed_impact"].shape[0]
        assert la["observed_colour_counts"].shape == (frames, 8) and frames > 1
    assert len({r["noise_seed"] for r in here}) == 6
    assert storage.exists(here[-1]["latent_uri"])
    # Four groups a batch (the last batch short): each group from its own seeds, so
    # the same candidates up to the batched forward's floating-point order.
    batched = tables[0, 4]
    keys = ("group_id", "candidate", "prompt", "seed", "noise_seed")
    assert [[r[k] for k in keys] for r in batched] == [[r[k] for k in keys] for r in here]
    for a, b in zip(here, batched, strict=True):
        la, lb = (load_file(r["latent_uri"]) for r in (a, b))
        assert all(torch.allclose(la[k], lb[k], atol=1e-4) for k in ("video", "audio"))
    with pytest.raises(ValueError, match="groups_per_batch"):
        train_config_from({"rlhf": {"preferences": {"groups_per_batch": 0}}})


def test_a_groups_candidates_share_their_initial_noise_unless_told_not_to(
    tiny_checkpoint, tmp_path
):
    """With the sampler's own noise off (eta 0), a group's candidates are the same clip
    when they share their initial noise (rlhf.preferences.shared_noise, DanceGRPO's
    groups) and different clips when each draws its own. On the synthetic world the
    candidates carry the probes' observations, which the reward model's inputs gather
    beside the decoded frames."""
    from model.pipeline import DuetPipeline
    from pipelines.align.preferences import read_preferences
    from pipelines.align.rater import WORLD_HEADS
    from pipelines.align.stages import build_preferences, observer_inputs, reward_inputs
    from pipelines.train.config import train_config_from

    pipe = DuetPipeline.from_checkpoint(tiny_checkpoint).eval()
    latents = {}
    for shared in (True, False):
        cfg = train_config_from({"preset": "tiny", "rlhf": {"preferences": {
            "candidates_per_prompt": 3, "rounds": 1, "steps": 2, "eta": 0.0,
            "write_mp4": False, "shared_noise": shared, "groups_per_batch": 2}}})  # fmt: skip
        # Own noise drawn as for footage (the world heads skipped): no observations then.
        skip = () if shared else WORLD_HEADS
        table = build_preferences(cfg, pipe, ["a red circle", "two blue squares"],
                                  str(tmp_path / str(shared)), None, skip)  # fmt: skip
        rows = read_preferences(table)
        files = [load_file(r["latent_uri"]) for r in rows]
        assert all(("observed_colour_counts" in f) == shared for f in files)
        latents[shared] = [f["video"] for f in files]
        # What the reward model's observer learns from: decoded frames beside the
        # probes' observations, only where the candidates carry them. (A red ball in
        # every frame of one candidate: the tiny model may draw nothing to detect.)
        if shared:
            frames = files[4]["observed_impact"].shape[0]
            counts = torch.zeros(frames, 8, dtype=torch.int16)
            counts[:, 0] = 1
            ball = torch.tensor([[[0.0, 0.25, 0.75]]]).expand(frames, 1, 3).contiguous()
            files[4] |= {"observed_colour_counts": counts, "observed_objects": ball}
            save_file(files[4], rows[4]["latent_uri"])
        inputs = reward_inputs(pipe, rows)
        seen = observer_inputs(pipe, rows, inputs, 16)
        if not shared:
            assert seen is inputs
            continue
        frames = files[0]["observed_impact"].shape[0]
        assert seen["frames"].shape == (6, frames, 3, 16, 16)
        assert seen["frames"].dtype == torch.uint8 and bool(seen["observed"].all())
        assert torch.equal(seen["observed_counts"][4], files[4]["observed_colour_counts"].float())
        assert seen["observed_objects"][4, :, 0].tolist() == [[0.0, 0.25, 0.75]] * frames
        # The objects' colours add up to the counts, frame by frame.
        colours = seen["observed_objects"][..., 0].long()
        per_colour = torch.stack([(colours == c).sum(-1) for c in range(8)], -1).float()
        assert torch.equal(per_colour, seen["observed_counts"])
        # Given the files already read (as the stage does), neither reads them again.
        gone = [{**r, "latent_uri": str(tmp_path / "gone" / f"{i}.safetensors")}
                for i, r in enumerate(rows)]  # fmt: skip
        again = observer_inputs(pipe, gone, reward_inputs(pipe, gone, files), 16, files)
        assert all(torch.equal(again[k], seen[k]) for k in seen)
    same, own = latents[True], latents[False]
    assert all(torch.equal(same[0], v) for v in same[1:3])
    assert all(torch.equal(same[3], v) for v in same[4:6])
    assert not torch.allclose(same[0], same[3])  # groups still differ
    assert not torch.allclose(own[0], own[1]) and not torch.allclose(own[1], own[2])


def test_align_job_hands_its_settings_to_the_rlhf_and_distill_stages():
    from pipelines.shipped.align_job import build_config, parse_args

    def cfg(*extra):
        return build_config(parse_args(["--carry", "c", "--out", "o", *extra]), "/m/clips.parquet")

    rater = cfg("--reward-source", "rater").rlhf
    assert rater.reward_source == "rater" and rater.kl_coefficient() == 0.0
    learned = cfg().rlhf
    assert learned.reward_source == "model" and learned.kl_coefficient() > 0
    assert learned.reward.observe and learned.reward.observer_steps == 4000
    watched = cfg("--observer-steps", "300").rlhf.reward
    assert watched.observe and watched.observer_steps == 300
    latents_only = cfg("--observer-steps", "0").rlhf.reward
    assert not latents_only.observe and latents_only.observer_steps == 0
    # DanceGRPO's own settings: shared noise and group std by default, KL unset.
    assert learned.shared_noise and learned.advantage_norm == "group"
    tuned = cfg("--rlhf-own-noise", "--advantage-norm", "batch", "--kl-weight", "0.01").rlhf
    assert not tuned.shared_noise and tuned.advantage_norm == "batch"
    assert tuned.kl_coefficient() == 0.01
    assert learned.eta == 0.3 and cfg("--eta", "0.7").rlhf.eta == 0.7
    assert learned.loss_rows_per_chunk == 128
    assert learned.reward.min_val_pairs == 50
    assert cfg("--min-val-pairs", "10").rlhf.reward.min_val_pairs == 10
    with pytest.raises(ValueError, match="min_val_pairs"):
        cfg("--min-val-pairs", "-1")
    assert tuple(cfg("--head-weights", "1,1,0.25,0,0.25").rlhf.head_weights) == (
        1,
        1,
        0.25,
        0,
        0.25,
    )
    assert learned.head_weights == (1.0, 1.0, 0.25, 0.25, 0.25)
    for bad in ("1,1", "1,1,1,1,x", "1,1,1,1,-1", "1,nan,1,1,1", "1,1,inf,1,1"):
        with pytest.raises(SystemExit, match="head-weights"):
            cfg("--head-weights", bad)
    assert cfg("--loss-rows-per-chunk", "0").rlhf.loss_rows_per_chunk == 0
    dmd = cfg("--fake-updates", "2", "--regression-weight", "0.5").distill.dmd
    assert (dmd.fake_updates, dmd.regression_weight) == (2, 0.5)
    assert cfg().distill.dmd.fake_updates == 4 and cfg().distill.dmd.regression_weight == 0.0
    assert cfg("--real-guidance", "6").distill.dmd.real_guidance == 6.0
    assert (cfg("--distill-ema", "0.99").distill.ema_decay, cfg().distill.ema_decay) == (0.99, 0)
    with pytest.raises(ValueError, match="ema_decay"):
        cfg("--distill-ema", "1")
    assert cfg().distill.student_steps == (4, 8)
    assert cfg("--student-steps", "4").distill.student_steps == (4,)
    for bad in ("0", "4,x", ""):
        with pytest.raises(SystemExit, match="student-steps"):
            cfg("--student-steps", bad)
    with pytest.raises(ValueError, match="default_steps 4"):  # Fast samples at 4
        cfg("--student-steps", "8")
    gan = cfg("--gan-weight", "0.01", "--classifier-weight", "0.1").distill.dmd
    assert (gan.gan_weight, gan.classifier_weight) == (0.01, 0.1)
    assert (cfg().distill.dmd.gan_weight, cfg().distill.dmd.classifier_weight) == (0, 0)
    assert cfg().distill.dmd.sampler == "euler"
    assert cfg("--compile").parallel.compile and not cfg().parallel.compile
    assert cfg("--autocast").parallel.autocast and not cfg().parallel.autocast
    assert cfg("--student-sampler", "renoise").distill.dmd.sampler == "renoise"
    assert cfg("--student-shift", "3").distill.dmd.time_shift == 3.0
    assert cfg().distill.dmd.time_shift == 0.0
    with pytest.raises(ValueError, match="time_shift"):
        cfg("--student-shift", "-1")
    with pytest.raises(SystemExit):
        cfg("--student-sampler", "heun")
    with pytest.raises(ValueError, match="gan_weight"):
        cfg("--gan-weight", "0.01")
    assert cfg("--sde-window", "2").rlhf.sde_window == 2 and cfg().rlhf.sde_window == 0
    fixed = cfg("--sde-window", "1", "--sde-window-start", "0").rlhf
    assert (fixed.sde_window_start, cfg().rlhf.sde_window_start) == (0, -1)
    assert cfg().distill.dmd.real_guidance == 0.0
    with pytest.raises(ValueError, match="real_guidance"):
        cfg("--real-guidance", "-1")
    paired = cfg("--regression-weight", "0.25", "--regression-pairs", "512").distill.dmd
    assert paired.regression_pairs == 512 and paired.regression_pairs_batch == 16
    assert cfg("--regression-pairs-batch", "64").distill.dmd.regression_pairs_batch == 64
    with pytest.raises(ValueError, match="regression_pairs_batch"):
        cfg("--regression-pairs-batch", "0")
    with pytest.raises(ValueError, match="regression_weight"):
        cfg("--regression-pairs", "512")  # pairs without the regression would go unused
    with pytest.raises(SystemExit):
        parse_args(["--carry", "c", "--out", "o", "--skip-rlhf", "--skip-distill"])
    with pytest.raises(SystemExit):
        parse_args(
            ["--carry", "c", "--out", "o", "--rlhf-until-s", "900", "--distill-until-s", "700"]
        )
    # One stage alone has one deadline: the other's does not have to come before it.
    alone = parse_args(["--carry", "c", "--out", "o", "--skip-rlhf", "--distill-until-s", "700"])
    assert alone.distill_until_s == 700


def test_the_rater_reports_what_it_saw_frame_by_frame_when_asked():
    from pipelines.align.rater import rate_clip

    clip = _clips(1)[0]
    clip.frames[4:, 44:58, 40:54] = (40, 60, 230)  # a blue square from frame 4 on
    seen = rate_clip("a red square and a blue square", clip, observe=True)["observations"]
    counts = np.array(seen["colour_counts"])  # (frames, colours): red 0, blue 2
    assert counts.shape == (9, 8)
    assert counts[:, 0].tolist() == [1] * 9
    assert counts[:, 2].tolist() == [0] * 4 + [1] * 5
    assert counts.sum() == 9 + 5 and len(seen["impact"]) == len(seen["onset"]) == 9
    assert "observations" not in rate_clip("a red square", clip)


def test_a_reward_model_from_an_earlier_job_is_reused_only_if_it_never_saw_a_held_out_prompt(
    tmp_path,
):
    from pipelines.align.reward import RewardModel, load_reward_model, save_reward_model
    from pipelines.shipped.align_job import copy_reward_model, install_reward_model

    def saved(name: str, train_prompts: list[str]) -> str:
        torch.manual_seed(0)
        model = RewardModel(4, 2, 8, 2)
        uri = str(tmp_path / name / "rlhf" / "reward")
        save_reward_model(uri, model, {"report": {"train_prompts": train_prompts}})
        return uri

    held_out = ["a red ball bounces", "two blue squares slide"]
    earlier = saved("earlier", ["three green balls bounce", "a yellow ball falls"])
    out = str(tmp_path / "out" / "reward")
    copy_reward_model(earlier, out)  # what the job leaves in OUT/reward
    run = str(tmp_path / "run" / "rlhf")
    install_reward_model(out, run, held_out)
    model, meta = load_reward_model(f"{run}/reward")
    assert meta == load_reward_model(earlier)[1]
    original = load_reward_model(earlier)[0].state_dict()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    install_reward_model(out, run, held_out)  # the same one again (a resumed job): kept
    # One that trained on a held-out prompt would score what it saw: refused.
    leaky = saved("leaky", ["three green balls bounce", held_out[1]])
    with pytest.raises(SystemExit, match=r"trained on 1 of this run's held-out.*two blue"):
        install_reward_model(leaky, str(tmp_path / "run2" / "rlhf"), held_out)
    with pytest.raises(SystemExit, match="no training prompts"):
        install_reward_model(saved("silent", []), str(tmp_path / "run3" / "rlhf"), held_out)
    # The run already has another reward model: not replaced behind its back.
    other = saved("other", ["a purple triangle spins"])
    with pytest.raises(SystemExit, match="already has another reward model"):
        install_reward_model(other, run, held_out)
    with pytest.raises(FileNotFoundError, match="no trained reward model"):
        install_reward_model(str(tmp_path / "nothing"), str(tmp_path / "run4" / "rlhf"), held_out)


def test_the_contact_sheet_puts_each_models_frames_of_a_prompt_in_one_block(capsys):
    import numpy as np

    from pipelines.align.evaluate import contact_sheet
    from pipelines.shipped.align_job import parse_args, sheet_keys

    def clip(value: int) -> np.ndarray:  # 9 frames of 2x3 pixels, frame i at value + i
        return np.stack([np.full((2, 3, 3), value + i, np.uint8) for i in range(9)])

    a, b = ("two red circles bounce", 0), ("a red circle bounces", 0)
    clips = {"rlhf": {a: clip(0), b: clip(100)}, "fast": {a: clip(50)}}
    sheet = contact_sheet(clips, [a, b], every=4)
    # Block a: the teacher's frames 0, 4, 8 then Fast's, side by side; a white rule;
    # block b: the teacher alone (Fast did not keep it); no rule after the last block.
    assert sheet.shape == (2 + 2 + 4 + 2, 3 * 3, 3)
    assert [int(sheet[0, 3 * j, 0]) for j in range(3)] == [0, 4, 8]
    assert [int(sheet[2, 3 * j, 0]) for j in range(3)] == [50, 54, 58]
    assert (sheet[4:8] == 255).all()
    assert [int(sheet[8, 3 * j, 0]) for j in range(3)] == [100, 104, 108]
    with pytest.raises(ValueError, match="no frames"):
        contact_sheet(clips, [("a blue square", 0)])
    # Prompts naming several objects come first.
    prompts = ["a red circle bounces", "two red circles bounce", "a cyan face", "a red circle "
               "and a blue square slide and collide"]  # fmt: skip
    assert sheet_keys(prompts, 3) == [(prompts[1], 0), (prompts[3], 0), (prompts[0], 0)]
    with pytest.raises(SystemExit):
        parse_args(["--carry", "c", "--out", "o", "--sheet", "-1"])
    assert "--sheet must be >= 0" in capsys.readouterr().err
