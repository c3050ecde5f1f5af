"""Train the shipped checkpoint on one GPU, every stage, inside a wall-clock budget.

    python -m pipelines.shipped.gpu_job --carry CARRY --run /tmp/run --out $OUT \
        --budget-s 1000

Runs on a bare machine (no Ray, no PyAV, no text-encoder weights): the carry folder
(:mod:`pipelines.shipped.carry`) installs PyAV and a text-embedding table, then the
``vae``, ``pretrain`` and ``sft`` stages of :mod:`pipelines.train` run with the local
runner, unchanged. ``vae`` runs for its steps or its time share, whichever ends
first; the DiT step counts come from the budget: a short calibration run of
``pretrain`` (which also fills the latent cache) measures seconds per step, and the
time left (less a reserve for stage start-up and saving) is split between the stages. Each periodic trainer checkpoint is also
exported to ``OUT/ship/`` as bf16 shards under 16 MiB (EMA weights), so a run cut
off by the command's time limit still returns weights; the finished run exports its
SFT final there. A stage that overruns its share is stopped at its next log step and
finished from its newest checkpoint (resumed for one step, which writes the stage's
final: the VAE calibration, or the DiT's EMA weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time

import torch

SHARD_BYTES = 15 * 1024 * 1024


class StageDeadline(Exception):
    """A stage ran past its share of the budget."""


def save_bf16(tensors: dict, meta: dict, out_dir: str, extra: dict) -> int:
    """Write ``tensors`` as bf16 shards under 16 MiB with ``meta`` (its extra updated
    with ``extra``), replacing ``out_dir`` whole; returns the bytes of weights."""
    from model.checkpoint import save_state

    out = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if k not in ("schema_version", "weight_files")}
    meta["extra"] = {**meta.get("extra", {}), **extra, "weights_dtype": "bf16"}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_state(tmp, out, meta, max_shard_bytes=SHARD_BYTES)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return sum(v.numel() * v.element_size() for v in out.values())


def export_bf16(src_uri: str, out_dir: str, extra: dict | None = None) -> int:
    """Copy a checkpoint as bf16 shards (EMA DiT weights when the source has them)."""
    from safetensors.torch import load as load_bytes

    from core import storage
    from model.checkpoint import load_state

    tensors, meta = load_state(src_uri)
    ema_uri = storage.join(src_uri, "ema.safetensors")
    if storage.exists(ema_uri):
        for key, value in load_bytes(storage.read_bytes(ema_uri)).items():
            tensors[f"dit.{key}"] = value
    return save_bf16(tensors, meta, out_dir, extra or {})


DECODER_COMPONENTS = ("video_vae.", "audio_vae.", "vocoder.")


def export_decoders(parent_uri: str, tuned_uri: str, out_dir: str, extra: dict) -> int:
    """The parent checkpoint (its DiT, encoders, metadata) with the decoders and vocoder
    of a ``vae.decoders_only`` run on it, as bf16 shards.

    The run kept the encoders and their calibration bit for bit; a tuned checkpoint
    whose encoders differ from the parent's was not such a run and is refused (its
    latents are not the ones the parent's DiT was trained on)."""
    from model.checkpoint import load_state

    parent, meta = load_state(parent_uri)
    tuned, tuned_meta = load_state(tuned_uri)
    if tuned_meta.get("config") != meta.get("config"):
        raise ValueError(f"{tuned_uri} has another model config than {parent_uri}")
    taken = 0
    for key, value in tuned.items():
        if not key.startswith(DECODER_COMPONENTS):
            continue
        value = value.to(parent[key].dtype) if key in parent else value
        if ".encoder." in f".{key}" or key.endswith(("latent_mean", "latent_std")):
            if key not in parent or not torch.equal(parent[key], value):
                raise ValueError(
                    f"{tuned_uri} changed {key}: not a decoders-only run on {parent_uri}"
                )
            continue
        parent[key] = value
        taken += 1
    if not taken:
        raise ValueError(f"{tuned_uri} holds no decoder weights")
    meta = {**meta, "use_neural_vocoder": tuned_meta.get("use_neural_vocoder", False)}
    return save_bf16(parent, meta, out_dir, {"decoders": extra})


def build_config(args, manifest: str, steps: dict[str, int], every: int):
    from pipelines.train.config import DataConfig, DiTStageConfig, TrainConfig, VAEStageConfig

    vae_rates = {"lr": args.vae_lr, "audio_lr": args.vae_audio_lr, "warmup_steps": args.vae_warmup}
    return TrainConfig(
        preset=args.preset,
        run_uri=args.run,
        seed=args.seed,
        init_from=args.init_from,
        data=DataConfig(
            curated_uri=manifest,
            frame_buckets=(args.frames,),
            latent_cache_uri=os.path.join(args.run, "latents"),
            encode_with_ray_data=False,
            sft_top_fraction=args.sft_top_fraction,
        ),
        vae=VAEStageConfig(
            steps=args.vae_steps, batch_size=args.vae_batch, window_frames=9,
            checkpoint_every=args.vae_checkpoint_every, log_every=args.log_every, eval_clips=8,
            vocoder_steps=args.vae_steps if args.vocoder else 0,
            video_gan_start=args.video_gan_start, colour_permute=args.colour_permute,
            audio_vae_speech=args.audio_vae_speech, decoders_only=args.decoders_only,
            **{k: v for k, v in vae_rates.items() if v is not None},
        ),
        pretrain=DiTStageConfig(
            steps=steps["pretrain"], batch_size=args.batch, lr=args.lr,
            warmup_steps=min(args.warmup, max(1, steps["pretrain"] // 10)),
            ema_decay=args.ema, checkpoint_every=every, log_every=args.log_every,
        ),
        sft=DiTStageConfig(
            steps=steps["sft"], batch_size=args.batch, lr=args.sft_lr, warmup_steps=0,
            ema_decay=args.ema, checkpoint_every=every, log_every=args.log_every,
        ),
        keep_checkpoints=1,
    )  # fmt: skip


class TimedStages:
    """Runs stages of :mod:`pipelines.train` inside wall-clock shares: a stage past its
    stop time is stopped at its next logged step and finished from its newest
    checkpoint (resumed for one step, which writes its final). Each stage's steps,
    wall time, seconds per step and first/last metrics rows go to ``stages``; its
    metrics rows are appended to ``out_dir/metrics.jsonl`` (one file for every stage)."""

    def __init__(self, rt, t0: float, out_dir: str, stages: dict, show=("reward", "rater")):
        self.rt, self.t0, self.out_dir, self.stages = rt, t0, out_dir, stages
        self.show = show  # metrics printed beside the loss when a row has them
        self.times: dict[str, list[tuple[int, float]]] = {}
        self.stop_at: dict[str, float] = {}

    def progress(self, stage: str, step: int, total: int, row: dict) -> None:
        now = time.monotonic()
        self.times.setdefault(stage, []).append((step, now))
        extra = "".join(f" {k} {row[k]:.4f}" for k in self.show if k in row)
        print(
            f"[ship] {stage} {step}/{total} loss {row.get('loss', 0):.4f}{extra} "
            f"tok/s {row.get('tokens_per_s', 0):.0f} t {now - self.t0:.0f}s",
            flush=True,
        )
        if stage in self.stop_at and now > self.stop_at[stage] and step < total:
            raise StageDeadline(f"{stage} at step {step}")

    def run(self, cfg, stage: str, stop: float) -> int:
        """Run a stage, stopping at ``stop``; then finish it from its newest checkpoint."""
        from pipelines.train import loop
        from pipelines.train import state as ckpt

        begin = time.monotonic()
        if loop.stage_done(cfg, stage):  # a rerun on a warm machine goes on from here
            print(f"[ship] {stage} already final", flush=True)
            return getattr(cfg, stage).steps
        self.stop_at[stage] = stop
        stopped = None
        try:
            done = loop.run_stage(cfg, stage, self.rt, self.progress).steps
        except StageDeadline as err:
            stopped = str(err)
        if stopped is not None:
            # Finished outside the handler: the exception's traceback holds the stopped
            # run's frames, and with them its networks, optimiser and batch on the GPU,
            # which the finishing run needs (a DanceGRPO at 16 prompts a step ran out of
            # an H200's 139 GiB finishing inside it).
            self.stop_at.pop(stage)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            newest = ckpt.latest_checkpoint(loop.stage_uri(cfg, stage))
            if newest is None:
                print(f"[ship] stopped {stopped} before its first checkpoint", flush=True)
                self.stages[stage] = {"steps": 0, "stopped": stopped}
                return 0
            done = ckpt.read_train_state(newest).step
            settings = getattr(cfg, stage)
            # The cosine runs over the configured steps, not the deadline's: say where
            # it was, so the next run can set steps that anneal it in time.
            lr_fraction = loop.lr_at(
                done, settings.steps, 1.0, getattr(settings, "warmup_steps", 0)
            )
            print(
                f"[ship] stopped {stopped}; finishing from step {done} (learning rate at "
                f"{lr_fraction:.2f} of its peak; steps about {done} anneal it within this deadline)",
                flush=True,
            )
            settings.steps = done + 1
            done = loop.run_stage(cfg, stage, self.rt, self.progress).steps
        self.stop_at.pop(stage, None)
        marks = self.times.get(stage, [])
        info = {"steps": done, "wall_s": round(time.monotonic() - begin, 1)}
        if stopped is not None:
            info["lr_fraction_at_stop"] = round(lr_fraction, 4)
        if len(marks) > 2:
            # The first window holds the warm-up (compilation too); the last, the final
            # checkpoint's write: left out where enough windows are between them.
            steady = marks[1:-1] if len(marks) > 3 else marks[1:]
            (s0, a), (s1, b) = steady[0], steady[-1]
            info["s_per_step"] = (b - a) / max(1, s1 - s0)
        metrics = os.path.join(loop.stage_uri(cfg, stage), "metrics.jsonl")
        if os.path.exists(metrics):  # one file for every stage: 8 files come back at most
            rows = [json.loads(line) for line in open(metrics)]
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.writelines(json.dumps({"stage": stage, **r}) + "\n" for r in rows)
            info["first_row"], info["last_row"] = (rows[0], rows[-1]) if rows else (None, None)
        final_meta = os.path.join(loop.final_uri(cfg, stage), "config.json")
        if os.path.exists(final_meta):
            with open(final_meta) as f:
                extra = json.load(f).get("extra", {})
            info["final_metrics"] = extra.get("metrics")
        self.stages[stage] = info
        print(f"[ship] {stage} done: {json.dumps(info, default=str)}", flush=True)
        return done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--carry", required=True)
    parser.add_argument("--run", default="/tmp/duet_ship_run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=1000.0)
    parser.add_argument("--reserve-s", type=float, default=40.0)
    parser.add_argument("--preset", default="compact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=33)
    # 6000: at 2000 steps on the 369-clip corpus the VAE lost green squares entirely;
    # at 6000 it kept all 96 of the palette sweep (BENCHMARKS.md, sessions 17-18).
    parser.add_argument("--vae-steps", type=int, default=6000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-budget-s", type=float, default=500.0)
    parser.add_argument("--vae-checkpoint-every", type=int, default=200)
    parser.add_argument(
        "--vocoder", action=argparse.BooleanOptionalAction, default=True,
        help="train the neural vocoder in the vae stage (the checkpoint then decodes with it)",
    )  # fmt: skip
    parser.add_argument(
        "--video-gan-start", type=int, default=-1,
        help="vae step the video VAE's patch discriminator joins at (-1: never)",
    )  # fmt: skip
    parser.add_argument("--colour-permute", type=float, default=0.5)
    parser.add_argument(
        "--audio-vae-speech", action="store_true",
        help="the audio VAE also reconstructs the vocoder's clips with dialogue",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sft-lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--sft-fraction", type=float, default=0.25, help="of the DiT time")
    parser.add_argument("--sft-top-fraction", type=float, default=0.5)
    parser.add_argument("--calib-steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--export-every-s", type=float, default=90.0)
    parser.add_argument("--max-steps", type=int, default=0, help="cap per DiT stage (dry runs)")
    parser.add_argument(
        "--vae-only", action="store_true",
        help="stop after the vae stage and export its final (decoder experiments)",
    )  # fmt: skip
    parser.add_argument(
        "--init-from", default="",
        help="start from this trained checkpoint (with --decoders-only: the one to tune)",
    )  # fmt: skip
    parser.add_argument(
        "--decoders-only", action="store_true",
        help="tune the decoders and vocoder of --init-from (vae stage only, encoders and "
        "DiT kept) and export that checkpoint with them",
    )  # fmt: skip
    parser.add_argument("--vae-lr", type=float, default=None, help="default: the stage's")
    parser.add_argument("--vae-audio-lr", type=float, default=None)
    parser.add_argument("--vae-warmup", type=int, default=None)
    args = parser.parse_args(argv)
    if args.decoders_only and not args.init_from:
        parser.error("--decoders-only tunes the decoders of a trained checkpoint: give --init-from")
    if args.decoders_only:
        args.vae_only = True
    if args.calib_steps < 3:  # two logged steps after the first are needed for a rate
        parser.error(f"--calib-steps must be at least 3, got {args.calib_steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    ship = os.path.join(args.out, "ship")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from pipelines.shipped.carry import unpack

    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"[ship] device {device_name}, torch {torch.__version__}, {sys.version}", flush=True)
    # Unpacked first: it installs PyAV, which the training modules import (core.media).
    manifest = unpack(args.carry, os.path.join(args.run, "data"))
    print(f"[ship] unpacked in {time.monotonic() - t0:.1f} s", flush=True)
    from pipelines.train import loop
    from pipelines.train import state as ckpt
    from pipelines.train.runtime import local_runtime

    rt = local_runtime()
    # Every clip decoded once for the vae stage (the default LRU of 256 would decode
    # most of a 600-clip corpus again on every epoch).
    loop.DecodedClips.__init__.__defaults__ = (1_000_000,)

    summary: dict = {
        "device": device_name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "args": vars(args),
        "stages": {},
    }
    stages = TimedStages(rt, t0, args.out, summary["stages"])
    progress, run_timed, times = stages.progress, stages.run, stages.times

    last_export = [time.monotonic()]
    original_save = loop._save

    def save_and_export(cfg, stage, task, pipeline, optimizer, ema, state, rt_, log):
        original_save(cfg, stage, task, pipeline, optimizer, ema, state, rt_, log)
        if stage == "vae" or cfg.run_uri != args.run:
            return
        if time.monotonic() - last_export[0] < args.export_every_s:
            return
        src = ckpt.checkpoint_dir(loop.stage_uri(cfg, stage), state.step)
        export_bf16(src, ship, {"stage": stage, "step": state.step, "partial": True})
        last_export[0] = time.monotonic()
        print(f"[ship] exported {stage} step {state.step}", flush=True)

    loop._save = save_and_export

    # -- vae: its steps or its time share, whichever ends first ----------------------
    cfg = build_config(args, manifest, {"pretrain": 1, "sft": 1}, 10**9)
    if run_timed(cfg, "vae", t0 + args.vae_budget_s) == 0:
        # Every later stage starts from the VAE's final: nothing to train on.
        raise SystemExit(
            f"[ship] the vae stage wrote no checkpoint within --vae-budget-s "
            f"{args.vae_budget_s:g}: raise it or lower --vae-checkpoint-every "
            f"({args.vae_checkpoint_every})"
        )

    if args.decoders_only:
        final = loop.final_uri(cfg, "vae")
        summary["exported_from"] = final
        tuned = {
            "steps": summary["stages"]["vae"]["steps"],
            "video_gan_start": args.video_gan_start,
            "lr": cfg.vae.lr,
            "device": device_name,
            "from": args.init_from,
        }
        summary["exported_bytes"] = export_decoders(args.init_from, final, ship, tuned)
        return _finish(summary, args, t0)
    if args.vae_only:
        final = loop.final_uri(cfg, "vae")
        summary["exported_from"] = final
        summary["exported_bytes"] = export_bf16(final, ship, {"stage": "vae", "partial": False})
        return _finish(summary, args, t0)

    # -- calibration: seconds per DiT step, start-up excluded (fills the latent cache) --
    calib = build_config(args, manifest, {"pretrain": args.calib_steps, "sft": 1}, 10**9)
    calib.run_uri = args.run.rstrip("/") + "_calib"
    calib.init_from = loop.final_uri(cfg, "vae")
    calib.pretrain.log_every = max(1, args.calib_steps // 6)
    started = time.monotonic()
    loop.run_stage(calib, "pretrain", rt, progress)
    marks = times.pop("pretrain")
    (s0, a), (s1, b) = marks[1], marks[-1]
    per_step = (b - a) / max(1, s1 - s0)
    startup = max(0.0, (a - started) - per_step * s0)
    shutil.rmtree(calib.run_uri, ignore_errors=True)
    left = deadline - time.monotonic() - args.reserve_s
    dit_steps = max(2, int(left / per_step))
    steps = {
        "sft": max(1, int(dit_steps * args.sft_fraction)),
        "pretrain": max(1, dit_steps - int(dit_steps * args.sft_fraction)),
    }
    if args.max_steps:
        steps = {k: min(v, args.max_steps) for k, v in steps.items()}
    every = int(args.export_every_s / per_step) // args.log_every * args.log_every
    every = max(args.log_every, every)
    summary["calibration"] = {
        "s_per_step": per_step, "startup_s": startup, "steps": steps, "checkpoint_every": every,
    }  # fmt: skip
    print(f"[ship] {per_step * 1000:.1f} ms/step, start-up {startup:.1f} s -> {steps}", flush=True)

    cfg = build_config(args, manifest, steps, every)
    # Eight checkpoints per stage to finish from: a stage stopped by its share goes
    # back to its newest one (with thirds, session 16's SFT lost 200 of 425 steps).
    for stage in ("pretrain", "sft"):
        eighth = steps[stage] // 8 // args.log_every * args.log_every
        getattr(cfg, stage).checkpoint_every = max(args.log_every, min(every, eighth))
    share = steps["pretrain"] * per_step
    if run_timed(cfg, "pretrain", time.monotonic() + 1.1 * share + 2 * startup + 10) == 0:
        cfg.init_from = loop.final_uri(cfg, "vae")  # SFT from the untrained DiT: say so
    run_timed(cfg, "sft", deadline - 20)

    finals = [loop.final_uri(cfg, s) for s in ("sft", "pretrain")]
    final = next((f for f in finals if os.path.exists(os.path.join(f, "config.json"))), None)
    if final is None:
        raise RuntimeError("no DiT stage reached a final checkpoint")
    summary["exported_from"] = final
    summary["exported_bytes"] = export_bf16(
        final,
        ship,
        {
            "stage": final.rstrip("/").split("/")[-2],
            "steps": {s: v["steps"] for s, v in summary["stages"].items()},
            "device": device_name,
            "partial": False,
        },
    )
    return _finish(summary, args, t0)


def _finish(summary: dict, args, t0: float) -> dict:
    if torch.cuda.is_available():
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("[ship] " + json.dumps(summary, default=str), flush=True)
    return summary


if __name__ == "__main__":
    main()
