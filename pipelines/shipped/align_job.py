"""Align a trained checkpoint on one GPU and score it: DanceGRPO with the learned reward,
a Fast student by DMD2, both against their parents on held-out prompts.

    python -m pipelines.shipped.align_job --carry CARRY --checkpoint checkpoints/default \
        --out OUT --rlhf-until-s 700 --distill-until-s 1000

    # where the text encoder is (the host may have only the carry's table):
    python -m pipelines.shipped.align_job --carry CARRY --list-texts texts.txt
    python -m pipelines.shipped.carry --out CARRY --add-texts texts.txt

Runs the ``rlhf`` and ``distill`` stages of :mod:`pipelines.train` (local runner) from
``--checkpoint`` on the carried corpus (:mod:`pipelines.shipped.carry`):

1. ``rlhf``: candidates of the checkpoint for the training prompts (the manifest's
   captions less every third, the held-out prompts, and ``--grammar-prompts`` captions
   drawn from the caption grammar), ``--groups-per-batch`` groups sampled together and
   rated by the programmatic rater in ``--rater-workers`` processes; the reward model trained on them and on
   known-order pairs of corpus clips, its agreement with the rater reported per head
   on preference prompts it never saw; then DanceGRPO with that reward model (KL to
   the checkpoint on), until ``--rlhf-until-s``.
2. ``distill``: DMD2 from the RLHF model over the caption distribution (the training
   captions and a pool of captions from the caption grammar; the held-out prompts
   never), until ``--distill-until-s``.
3. Held-out prompts (never in preference data, rollouts or distillation), ``--seeds``
   seeds each, generated through ``model.generate`` in ``--eval-workers`` processes on
   the same GPU and rated: the checkpoint and the RLHF model with the full sampler,
   the Fast student at 4 Euler steps. Paired differences and ratios are checked
   against issue 23's targets (:func:`target_rows`).

``OUT`` gets ``summary.json`` (settings, stage reports, reward agreement, targets),
the reward model (``reward/``: weights and its report; ``--reward-from OUT/reward``
reuses it in a later run on the same carry instead of drawing preferences again),
``eval.json`` (every rated clip), ``metrics.jsonl`` (every logged step) and the RLHF and
Fast weights as bf16 shards (``ship_rlhf/``, ``ship_fast/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from pipelines.align.config import STUDENT_SAMPLERS
from pipelines.shipped.gpu_job import TimedStages, export_bf16

TARGETS = {
    "agreement": 0.8,  # reward model vs rater on held-out preference prompts...
    "agreement_heads": ("sync", "adherence", "motion"),  # ...on these heads
    "rlhf_gain_se": 3.0,  # RLHF - parent, paired, on these heads...
    "rlhf_gain_heads": ("adherence", "sync"),
    "rlhf_max_fall_se": 1.0,  # ...and no other head falling by more
    "fast_ratio": 0.9,  # Fast / its teacher (the RLHF model)
    "fast_heads": ("adherence", "sync"),
}


# DMD2's settings that are a number, 0 (off) by default: flag, help.
DMD_SETTINGS = (
    ("--distill-ema", "EMA decay of the student's weights, written as the Fast model (0: none)"),
    ("--regression-weight",
     "weight of the regression on the guided teacher's endpoint (0: DMD2 alone)"),
    ("--real-guidance",
     "the teacher's guidance in DMD2's real score (0: the guidance it samples with)"),
    ("--gan-weight", "DMD2's GAN on the carried clips: the student's term (0: off; needs a "
                     "carry with clips and --classifier-weight)"),
    ("--classifier-weight",
     "DMD2's GAN: the fake score's classifier loss (real clips against the student's)"),
)  # fmt: skip


# How the trained networks run (model.parallelize.ParallelConfig): flag, help.
PARALLEL_FLAGS = (
    ("--compile", "torch.compile each DiT block of the trained networks (parallel.compile)"),
    ("--autocast", "bf16 autocast around each training step, weights fp32 (parallel.autocast)"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--carry", required=True)
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--run", default="/tmp/duet_align_run")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--list-texts",
        default="",
        metavar="FILE",
        help="write the texts the job will encode (one a line) and stop",
    )
    parser.add_argument("--preset", default="compact")
    parser.add_argument("--frames", type=int, default=33, help="the carry's clip length")
    parser.add_argument("--seed", type=int, default=0)
    for flag, text in PARALLEL_FLAGS:
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--max-prompts", type=int, default=1000)
    # Preference data and the reward model.
    # 2 s candidates: on 1 s ones the rater's sync pairs keep their order under a
    # re-encode 42-53% of the time, on 2 s ones 75-91% (bench/rater_reliability.py).
    parser.add_argument(
        "--duration",
        type=float,
        default=33 / 16,
        help="seconds a candidate, a rollout and a held-out clip",
    )
    parser.add_argument(
        "--grammar-prompts", type=int, default=0,
        help="training prompts drawn from the caption grammar, beside the captions",
    )  # fmt: skip
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--groups-per-batch", type=int, default=16)  # BENCHMARKS, session 22
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reward-preset", default="small")
    parser.add_argument("--reward-steps", type=int, default=2000)
    parser.add_argument(
        "--observer-steps", type=int, default=4000,
        help="steps of the reward model's frame observer (0: latents only)",
    )  # fmt: skip
    parser.add_argument("--corpus-contrasts", type=int, default=256)
    parser.add_argument("--min-agreement", type=float, default=0.6)
    parser.add_argument(
        "--min-val-pairs",
        type=int,
        default=50,
        help="held-out pairs a head DanceGRPO optimises needs for the floor to judge it",
    )
    parser.add_argument(
        "--reward-source", choices=("model", "rater"), default="model",
        help="what DanceGRPO optimises: the learned reward model, or the rater itself "
        "(an ablation: tells the RL method's gain from the reward model's)",
    )  # fmt: skip
    parser.add_argument("--rater-workers", type=int, default=12)
    parser.add_argument(
        "--reward-from",
        default="",
        help="a reward model folder (an earlier job's OUT/reward) used instead of drawing "
        "preferences and training one; refused if it trained on a held-out prompt",
    )
    parser.add_argument(
        "--reward-only",
        action="store_true",
        help="stop after the preference data and the reward model's report",
    )
    parser.add_argument(
        "--skip-rlhf",
        action="store_true",
        help="distil the Fast student from --checkpoint itself (its teacher)",
    )
    # DanceGRPO.
    parser.add_argument("--rlhf-steps", type=int, default=400)
    parser.add_argument("--rlhf-batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--rlhf-lr", type=float, default=2e-5)
    parser.add_argument("--rlhf-until-s", type=float, default=700.0)
    parser.add_argument(
        "--rlhf-own-noise", action="store_true",
        help="each rollout candidate from its own initial noise (rlhf.shared_noise false)",
    )  # fmt: skip
    parser.add_argument("--advantage-norm", choices=("group", "batch"), default="group")
    parser.add_argument(
        "--eta", type=float, default=0.3,
        help="the rollouts' SDE noise level (a group's candidates differ more as it rises)",
    )  # fmt: skip
    parser.add_argument(
        "--sde-window", type=int, default=0,
        help="noisy sampling steps a rollout (consecutive, the rest the ODE; the only "
             "steps trained on); 0: every step",
    )  # fmt: skip
    parser.add_argument(
        "--sde-window-start", type=int, default=-1,
        help="the window's first sampling step (0: the first, t = 1); -1: drawn per batch",
    )  # fmt: skip
    parser.add_argument(
        "--head-weights", default="",
        help="DanceGRPO's per-head weights, comma-separated in the order "
             "sync,adherence,motion,visual,audio (default: the stage's 1,1,0.25,0.25,0.25); "
             "a head at 0 is neither optimised nor held to the agreement floor",
    )  # fmt: skip
    parser.add_argument(
        "--loss-rows-per-chunk", type=int, default=128,
        help="rows of an update run forward together; the loss is accumulated over "
             "chunks of this many (0: all at once; 384 rows of --rlhf-batch 16 need more "
             "than 139 GiB)",
    )  # fmt: skip
    parser.add_argument(
        "--kl-weight", type=float, default=None,
        help="KL to the parent (default: on with the learned reward, off with the rater)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-distill", action="store_true",
        help="no Fast student: score the parent and the RLHF model only",
    )  # fmt: skip
    # DMD2.
    parser.add_argument("--distill-steps", type=int, default=3000)
    parser.add_argument("--distill-batch", type=int, default=16)
    parser.add_argument("--distill-until-s", type=float, default=1000.0)
    parser.add_argument(
        "--student-steps", default="4,8",
        help="step counts the student is trained for, comma-separated (Fast samples at 4)",
    )  # fmt: skip
    parser.add_argument(
        "--student-sampler", choices=STUDENT_SAMPLERS, default="euler",
        help="how the student steps (renoise: x0, then fresh noise, as DMD2's multi-step "
             "generator); the Fast model is served with it",
    )  # fmt: skip
    parser.add_argument(
        "--student-shift", type=float, default=0.0,
        help="shift of the student's step times (0: the resolution shift); the Fast model "
             "is served with it",
    )  # fmt: skip
    parser.add_argument(
        "--fake-updates", type=int, default=4,
        help="fake-score updates per student update (DMD2's two time-scale rule)",
    )  # fmt: skip
    parser.add_argument(
        "--regression-pairs", type=int, default=0,
        help="(noise, teacher endpoint) pairs drawn once for the regression (0: the teacher "
             "samples each student update's own noise: 3.7 times slower with --fake-updates 1)",
    )  # fmt: skip
    parser.add_argument(
        "--regression-pairs-batch", type=int, default=16,
        help="how many regression pairs the teacher samples at once (speed, not the pairs)",
    )  # fmt: skip
    for flag, text in DMD_SETTINGS:
        parser.add_argument(flag, type=float, default=0.0, help=text)
    # Each pooled caption costs its embedding in the carry's table (about 12 KB).
    parser.add_argument("--grammar-pool", type=int, default=150)
    # Held-out scoring.
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=12, help="Heun steps, full models")
    parser.add_argument("--eval-workers", type=int, default=8)
    parser.add_argument("--max-eval-prompts", type=int, default=0, help="0: every held-out one")
    parser.add_argument(
        "--sheet", type=int, default=6,
        help="held-out prompts (seed 0) drawn by every model into OUT/sheet.png (0: none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.list_texts and not args.out:
        parser.error("--out is required (or --list-texts FILE)")
    if args.skip_rlhf and args.skip_distill:
        parser.error("--skip-rlhf and --skip-distill leave nothing to train")
    # Both are deadlines from the job's start; distillation starts where RL stopped.
    both_stages = not (args.skip_rlhf or args.skip_distill)
    if both_stages and args.distill_until_s <= args.rlhf_until_s:
        parser.error("--distill-until-s must come after --rlhf-until-s")
    if args.sheet < 0:
        parser.error("--sheet must be >= 0 (0: no contact sheet)")
    return args


def head_weights(text: str) -> list[float]:
    """``--head-weights`` as the stage's ``head_weights`` (one number a head)."""
    from pipelines.align.config import HEADS

    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(HEADS) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise SystemExit(
            f"--head-weights needs {len(HEADS)} numbers >= 0 ({','.join(HEADS)}), got {text!r}"
        )
    return weights


def student_steps(text: str) -> list[int]:
    """``--student-steps`` as ``distill.student_steps``."""
    try:
        steps = [int(n) for n in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise SystemExit(f"--student-steps needs step counts >= 1, e.g. 4 or 4,8; got {text!r}")
    return steps


def build_config(args, manifest: str):
    """The run's TrainConfig through the one config loader (``train_config_from``)."""
    from pipelines.train.config import train_config_from

    return train_config_from(
        {
            "preset": args.preset,
            "run_uri": args.run,
            "seed": args.seed,
            "init_from": os.path.abspath(args.checkpoint),
            "keep_checkpoints": 1,
            "data": {"curated_uri": manifest, "frame_buckets": [args.frames],
                     "encode_with_ray_data": False},
            "parallel": {"compile": args.compile, "autocast": args.autocast},
            "rlhf": {
                "steps": args.rlhf_steps, "batch_size": args.rlhf_batch, "lr": args.rlhf_lr,
                "checkpoint_every": 20, "log_every": 10,
                "rater_workers": args.rater_workers, "reward_source": args.reward_source,
                "shared_noise": not args.rlhf_own_noise, "kl_weight": args.kl_weight,
                "advantage_norm": args.advantage_norm, "eta": args.eta,
                "sde_window": args.sde_window, "sde_window_start": args.sde_window_start,
                "loss_rows_per_chunk": args.loss_rows_per_chunk,
                **({"head_weights": head_weights(args.head_weights)} if args.head_weights else {}),
                "prompts": {"max_prompts": args.max_prompts, "holdout_every": 3,
                            "grammar_prompts": args.grammar_prompts},
                "preferences": {"candidates_per_prompt": args.candidates,
                                "groups_per_batch": args.groups_per_batch,
                                "rounds": args.rounds, "write_mp4": False,
                                "duration_s": args.duration},
                "reward": {"preset": args.reward_preset, "steps": args.reward_steps,
                           "observe": args.observer_steps > 0,
                           "observer_steps": args.observer_steps,
                           "corpus_contrasts": args.corpus_contrasts,
                           "min_agreement": args.min_agreement,
                           "min_val_pairs": args.min_val_pairs},
            },
            "distill": {
                "method": "dmd2", "steps": args.distill_steps, "ema_decay": args.distill_ema,
                "student_steps": student_steps(args.student_steps),
                "batch_size": args.distill_batch, "checkpoint_every": 100, "log_every": 25,
                "dmd": {"grammar_pool": args.grammar_pool, "frame_buckets": [17, args.frames],
                        "fake_updates": args.fake_updates,
                        "regression_weight": args.regression_weight,
                        "real_guidance": args.real_guidance,
                        "gan_weight": args.gan_weight,
                        "classifier_weight": args.classifier_weight,
                        "regression_pairs": args.regression_pairs,
                        "regression_pairs_batch": args.regression_pairs_batch,
                        "sampler": args.student_sampler,
                        "time_shift": args.student_shift},
            },
        }
    )  # fmt: skip


def needed_texts(cfg) -> list[str]:
    """Every text the job encodes: the manifest's prompts (dialogue removed), the
    preference prompts drawn from the caption grammar and the DMD2 stage's grammar pool."""
    from model.configs import get_config
    from pipelines.align.prompts import manifest_prompts
    from pipelines.align.stages import distill_prompt_stream, prompt_sets

    prompts = manifest_prompts(cfg.data, get_config(cfg.preset).fps)
    train, _ = prompt_sets(cfg)
    return sorted({*prompts, *train, *distill_prompt_stream(cfg).pool})


# ---------------------------------------------------------------------------------
# Held-out scoring in worker processes.

_WORKER: dict = {}


def _init_worker(texts_path: str, threads: int) -> None:
    from pipelines.shipped.carry import use_text_table_file

    torch.set_num_threads(threads)
    if texts_path:
        use_text_table_file(texts_path)


def _evaluate(job: tuple) -> dict:
    """Rows of one (model, prompts) shard: ``job`` = (name, checkpoint, reward_uri,
    prompts, settings as a dict)."""
    from model.pipeline import DuetPipeline
    from pipelines.align.evaluate import EvalSettings, evaluate_prompts
    from pipelines.align.reward import load_reward_model

    name, uri, reward_uri, prompts, settings, keep = job
    key = (name, uri)
    if key not in _WORKER:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _WORKER[key] = DuetPipeline.from_checkpoint(uri).to(device).eval()
    reward = load_reward_model(reward_uri)[0].eval() if reward_uri else None
    return evaluate_prompts(_WORKER[key], prompts, EvalSettings(**settings), reward, keep)


def evaluate_models(
    models: dict, prompts: list[str], args, texts_path: str, reward_uri: str, keep=frozenset()
):
    """{name: evaluate_prompts result} for ``models`` = {name: (checkpoint, settings)},
    the prompts split over ``--eval-workers`` spawned processes; ``keep``: (prompt,
    seed) pairs whose frames come back (``frames``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipelines.align.evaluate import summarize

    workers = max(1, args.eval_workers)
    shards = [prompts[i::workers] for i in range(workers)]
    jobs = [(name, uri, reward_uri, shard, settings, keep)
            for name, (uri, settings) in models.items() for shard in shards if shard]  # fmt: skip
    threads = max(1, (os.cpu_count() or 2) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, _init_worker, (texts_path, threads)) as pool:
        results = list(pool.map(_evaluate, jobs))
    rows, frames = {}, {}
    for (name, *_), result in zip(jobs, results, strict=True):
        rows.setdefault(name, []).extend(result["rows"])
        frames.setdefault(name, {}).update(result["frames"])
    return {name: {"rows": r, "summary": summarize(r), "frames": frames[name]}
            for name, r in rows.items()}  # fmt: skip


def sheet_keys(prompts: list[str], count: int) -> list[tuple[str, int]]:
    """The contact sheet's (prompt, seed 0) pairs: prompts naming several objects first
    (where a few-step student loses most), then the rest, ``count`` in all."""
    from core.probes.captions import parse_caption

    several = [p for p in prompts if sum(parse_caption(p).values()) > 1]
    rest = [p for p in prompts if p not in several]
    return [(p, 0) for p in (several + rest)[:count]]


def write_sheet(path: str, evals: dict, keys: list) -> None:
    """``path`` (PNG): the kept clips' frames, a row per model (in ``evals``' order), a
    block per key; the models and prompts named in a text file beside it."""
    from PIL import Image

    from pipelines.align.evaluate import contact_sheet

    clips = {name: e["frames"] for name, e in evals.items() if e.get("frames")}
    Image.fromarray(contact_sheet(clips, keys)).save(path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write(f"rows per block: {', '.join(clips)}; every 4th frame\n")
        f.writelines(f"block {i}: {p!r} seed {s}\n" for i, (p, s) in enumerate(keys))


# ---------------------------------------------------------------------------------
# Targets.


def target_rows(evals: dict, agreement: dict, targets: dict = TARGETS) -> list[dict]:
    """One row per target of issue 23: measured, bar, met.

    ``evals``: {"parent", "rlhf", "fast"} results of ``evaluate_prompts`` on the same
    (prompt, seed) pairs; ``agreement``: the reward model's held-out ``val_agreement``."""
    from pipelines.align.config import HEADS
    from pipelines.align.evaluate import paired_difference

    rows = []

    def row(name: str, measured: str, bar: str, met: bool) -> None:
        rows.append({"target": name, "measured": measured, "bar": bar, "met": bool(met)})

    for h in targets["agreement_heads"] if agreement is not None else ():
        found = (agreement or {}).get(h) or {}
        value, pairs = found.get("agreement"), found.get("pairs", 0)
        shown = "no held-out pairs" if value is None else f"{value:.3f} ({pairs} pairs)"
        bar = targets["agreement"]
        row(f"reward model held-out agreement, {h}", shown, f">= {bar}",
            value is not None and value >= bar)  # fmt: skip
    if "rlhf" in evals and "parent" in evals:
        for h in HEADS:
            d, se = paired_difference(evals["parent"], evals["rlhf"], h)
            if h in targets["rlhf_gain_heads"]:
                k = targets["rlhf_gain_se"]
                row(f"RLHF - parent, {h}", f"{d:+.4f} +- {se:.4f}", f">= {k} se",
                    se > 0 and d >= k * se)  # fmt: skip
            else:
                k = targets["rlhf_max_fall_se"]
                row(f"RLHF - parent, {h}", f"{d:+.4f} +- {se:.4f}", f">= -{k} se",
                    d == d and d >= -k * se)  # fmt: skip
    # The target is Fast at 4 steps ("fast"); "fast_N" (the student sampled with the
    # other step counts it was trained for) say what more steps buy.
    students = [n for n in evals if n == "fast" or n.startswith("fast_")] if "rlhf" in evals else []
    for name in students:
        steps = 4 if name == "fast" else int(name.split("_")[1])
        for h in targets["fast_heads"]:
            teacher = evals["rlhf"]["summary"][h]["mean"]
            student = evals[name]["summary"][h]["mean"]
            ratio = student / teacher if teacher else float("nan")
            bar = targets["fast_ratio"]
            row(f"Fast ({steps} steps) / teacher, {h}",
                f"{ratio:.3f} ({student:.4f} / {teacher:.4f})", f">= {bar}",
                teacher > 0 and ratio >= bar)  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.monotonic()
    if args.list_texts:
        from pipelines.shipped.carry import MANIFEST_NAME

        cfg = build_config(args, os.path.join(os.path.abspath(args.carry), MANIFEST_NAME))
        texts = needed_texts(cfg)
        with open(args.list_texts, "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in texts)
        print(f"{len(texts)} texts written to {args.list_texts}")
        return {"texts": len(texts)}
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from pipelines.shipped.carry import TEXTS_NAME, TableTextEncoder, has_clips, unpack

    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"[align] device {device_name}, torch {torch.__version__}", flush=True)
    manifest = unpack(args.carry, os.path.join(args.run, "data"))  # installs PyAV first
    trains_reward = not args.reward_from and (
        args.reward_only or (not args.skip_rlhf and args.reward_source == "model")
    )
    if trains_reward and args.corpus_contrasts > 0 and not has_clips(args.carry):
        raise SystemExit(
            f"[align] {args.carry} carries captions only, and the reward model's "
            "--corpus-contrasts encode corpus clips: pass --corpus-contrasts 0, or "
            "--reward-from an earlier job's reward model, or carry the clips"
        )
    if not args.skip_distill and args.gan_weight > 0 and not has_clips(args.carry):
        raise SystemExit(
            f"[align] {args.carry} carries captions only, and --gan-weight trains the "
            "Fast student against real clips: carry the clips, or pass --gan-weight 0"
        )
    from pipelines.align.stages import prompt_sets
    from pipelines.train import loop
    from pipelines.train.runtime import local_runtime

    cfg = build_config(args, manifest)
    missing = [t for t in needed_texts(cfg) if t not in TableTextEncoder.table]
    if missing:
        raise SystemExit(
            f"[align] {len(missing)} text(s) the job encodes are not in the carry's table "
            f"(first: {missing[0]!r}): run --list-texts and carry --add-texts where the "
            "text encoder is"
        )
    train_prompts, held_out = prompt_sets(cfg)
    print(f"[align] {len(train_prompts)} training prompts, {len(held_out)} held out", flush=True)
    summary: dict = {"device": device_name, "torch": torch.__version__, "args": vars(args),
                     "train_prompts": len(train_prompts), "held_out_prompts": held_out,
                     "stages": {}}  # fmt: skip
    stages = TimedStages(local_runtime(), t0, args.out, summary["stages"])

    from pipelines.align.reward import RewardFloorError, load_reward_model

    rlhf_final, reward_uri = loop.final_uri(cfg, "rlhf"), ""
    if args.reward_from:
        install_reward_model(args.reward_from, loop.stage_uri(cfg, "rlhf"), held_out)
    if args.reward_only:  # preference data and the reward model, then its report
        from pipelines.align.stages import ensure_reward_model

        pipeline, _ = loop.build_pipeline(cfg, "rlhf")
        ensure_reward_model(cfg, pipeline.to(stages.rt.device), stages.rt)
        rlhf_final = ""
    elif args.skip_rlhf:
        rlhf_final = ""
    else:
        try:
            if stages.run(cfg, "rlhf", t0 + args.rlhf_until_s) == 0:
                summary["rlhf_refused"] = "stopped by --rlhf-until-s before its first checkpoint"
                rlhf_final = ""
        except RewardFloorError as err:  # measured and said; the Fast student still comes
            print(f"[align] DanceGRPO refused: {err}", flush=True)
            summary["rlhf_refused"] = str(err)
            rlhf_final = ""
    # The rater ablation trains no reward model (unless asked for one alone).
    if args.reward_only or (not args.skip_rlhf and args.reward_source == "model"):
        reward_uri = os.path.join(loop.stage_uri(cfg, "rlhf"), "reward")
        summary["reward"] = reward_summary(load_reward_model(reward_uri)[1].get("report", {}))
        copy_reward_model(reward_uri, os.path.join(args.out, "reward"))
    _save(summary, args)
    if args.reward_only:
        summary["targets"] = target_rows({}, summary["reward"]["val_agreement"])
        return _finish(summary, args, t0)

    cfg.init_from = rlhf_final or os.path.abspath(args.checkpoint)
    fast_final = ""
    if not args.skip_distill:
        if stages.run(cfg, "distill", t0 + args.distill_until_s) == 0:
            summary["distill_refused"] = "stopped by --distill-until-s before its first checkpoint"
        else:
            fast_final = loop.final_uri(cfg, "distill")
    # Weights first: a host lost during scoring still gives them back.
    for name, src in (("ship_rlhf", rlhf_final), ("ship_fast", fast_final)):
        if src:
            export_bf16(
                src, os.path.join(args.out, name), {"stage": name[5:], "device": device_name}
            )
    _save(summary, args)

    prompts = held_out[: args.max_eval_prompts or None]
    seeds = list(range(args.seeds))
    full = {"seeds": seeds, "steps": args.eval_steps, "sampler": "heun",
            "duration_s": args.duration}  # fmt: skip
    fast = {**full, "steps": 4, "sampler": "euler", "quality": "fast"}
    models = {"parent": (os.path.abspath(args.checkpoint), full), "rlhf": (rlhf_final, full)}
    if fast_final:
        models["fast"] = (fast_final, fast)
        for n in student_steps(args.student_steps):
            if n != 4:  # Fast samples at 4; the other counts it learnt, beside it
                models[f"fast_{n}"] = (fast_final, {**fast, "steps": n})
    if not rlhf_final:  # the Fast student's teacher is then the parent
        models["rlhf"] = models.pop("parent")
    started = time.monotonic()
    texts_path = os.path.join(os.path.abspath(args.carry), TEXTS_NAME)
    keys = sheet_keys(prompts, args.sheet) if args.seeds else []
    evals = evaluate_models(models, prompts, args, texts_path, reward_uri, frozenset(keys))
    summary["eval_s"] = round(time.monotonic() - started, 1)
    summary["evals"] = {k: v["summary"] for k, v in evals.items()}
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({k: v["rows"] for k, v in evals.items()}, f)
    if keys:  # after the rows: a picture that fails to draw loses no figures
        write_sheet(os.path.join(args.out, "sheet.png"), evals, keys)
    agreement = summary["reward"]["val_agreement"] if "reward" in summary else None
    summary["targets"] = target_rows(evals, agreement)
    if "fast" in evals:
        summary["fast_by_objects"] = fast_by_objects(evals)
    return _finish(summary, args, t0)


def fast_by_objects(evals: dict) -> dict:
    """Fast - teacher on the held-out clips, paired, for prompts naming one object and
    several (:func:`pipelines.align.evaluate.paired_by_objects`), printed as it goes."""
    from pipelines.align.evaluate import paired_by_objects
    from pipelines.align.rater import FRAME_PART_KEYS

    out = {}
    for key in ("adherence", "adherence_colour_frames", *FRAME_PART_KEYS, "sync", "motion"):
        out[key] = paired_by_objects(evals["rlhf"], evals["fast"], key)
        shown = "; ".join(f"{name} {g['mean']:+.3f} +- {g['se']:.3f} ({g['clips']} clips)"
                          for name, g in out[key].items())  # fmt: skip
        print(f"[align] Fast - teacher, {key}: {shown}", flush=True)
    return out


def copy_reward_model(src: str, dst: str) -> None:
    """The reward model's weights and its JSON (settings, report, prompts) from ``src``
    to ``dst``, a folder ``--reward-from`` reads."""
    from core import storage
    from pipelines.align.reward import META_NAME, MODEL_NAME

    for name in (MODEL_NAME, META_NAME):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))


def install_reward_model(src: str, rlhf_uri: str, held_out: list[str]) -> None:
    """Put the reward model of ``src`` (``--reward-from``) where the rlhf stage looks
    for it, so the stage draws no preferences and trains none. Refused when it trained
    on one of this run's held-out prompts (its scores would have seen what the job
    scores), when it is not a reward model, or when the run already has another."""
    from pipelines.align.reward import load_reward_model, reward_exists

    _, meta = load_reward_model(src)  # a clear error for a folder that is not one
    seen = set((meta.get("report") or {}).get("train_prompts") or ())
    if not seen:
        raise SystemExit(
            f"[align] --reward-from {src}: its report lists no training prompts, so it "
            "cannot be shown to have never seen this run's held-out prompts"
        )
    overlap = sorted(seen.intersection(held_out))
    if overlap:
        raise SystemExit(
            f"[align] --reward-from {src}: it trained on {len(overlap)} of this run's "
            f"held-out prompt(s) (first: {overlap[0]!r}); use one trained on this carry "
            "with the same --max-prompts and --seed, or train one here"
        )
    dst = os.path.join(rlhf_uri, "reward")
    if reward_exists(dst):
        if load_reward_model(dst)[1] != meta:
            raise SystemExit(
                f"[align] --reward-from {src}: the run folder already has another reward "
                f"model ({dst}); use a fresh --run or delete it"
            )
        return
    copy_reward_model(src, dst)
    print(f"[align] reward model from {src} (trained on {len(seen)} prompts)", flush=True)


def reward_summary(report: dict) -> dict:
    out = {k: report.get(k) for k in (
        "val_agreement", "train_agreement", "train_pairs", "train_prompt_count",
        "candidates", "corpus_contrasts", "parameters", "final_loss", "observer")}  # fmt: skip
    out["held_out_prompt_count"] = len((report.get("held_out") or {}).get("prompts", []))
    return out


def _finish(summary: dict, args, t0: float) -> dict:
    for r in summary.get("targets", []):
        print(f"[align] {'met ' if r['met'] else 'MISS'} {r['target']}: {r['measured']} "
              f"(bar {r['bar']})", flush=True)  # fmt: skip
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    _save(summary, args)
    return summary


def _save(summary: dict, args) -> None:
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
