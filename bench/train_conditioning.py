"""Recipes for the trained-conditioning test: train with pipelines.train, measure, time.

Builds the synthetic corpus of ``pipelines.train.conditioning`` once, trains the
``tiny`` preset through ``vae -> pretrain`` with the local runner, and prints what
``tests/test_train_conditioning.py`` checks: the colour share of the generated ball
with an image reference in slot 0 (a first frame of a held-out shot of that colour,
not a frame of the clip being generated; the text names no colour), with two image
slots and then swapped, the backdrop shares with image references (what the test
checks), and per shot of a two-shot plan.

References are taught by role (:mod:`pipelines.train.reference_pairs`: an image
reference shows the subject in another shot); the clip's own first frame is
image-to-video, its own mode with its own slot (the model's last image slot,
``ReferenceSet.first_frame``), not a reference. ``--own-p`` sets how often training
gives a clip its own first frame in that I2V slot.

    python bench/train_conditioning.py --out /tmp/cond --vae-steps 300 --dit-steps 800
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.pipeline import DuetPipeline  # noqa: E402
from pipelines.train import train  # noqa: E402
from pipelines.train.conditioning import (  # noqa: E402
    CorpusSpec,
    GenSettings,
    build_corpus,
    first_frame_of,
    multishot_counts,
    reference_backdrops,
    reference_counts,
    reference_frame,
    shares,
)
from pipelines.train.config import (  # noqa: E402
    DataConfig,
    DiTStageConfig,
    ReferenceSampling,
    TrainConfig,
    VAEStageConfig,
)

PROMPTS = (
    "a circle bounces on a gray floor",
    "a red circle bounces on a gray floor",
    "a blue circle bounces on a gray floor",
    "a green circle bounces on a gray floor",
    "a yellow circle bounces on a gray floor",
)


def use_text_table(path: str) -> None:
    """Replace the text encoder by a table of precomputed embeddings (``--text-table``).

    For machines without the offline MiniLM package (an offline GPU host): the table
    is written here with ``--make-text-table`` and holds every corpus caption and
    every prompt this script generates.
    """
    from pipelines.shipped.carry import use_text_table_file

    use_text_table_file(path)


def make_text_table(path: str, manifest: str) -> None:
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from model.text_encoder import FrozenTextEncoder
    from pipelines.train.data import conditioning_text

    rows = pq.read_table(manifest).to_pylist()
    texts = {conditioning_text(r["caption"], r["transcript"]) for r in rows} | set(PROMPTS)
    encoder = FrozenTextEncoder()
    save_file({t: encoder.embed_tokens(t).contiguous() for t in sorted(texts) if t}, path)


@torch.no_grad()
def reference_diagnostic(pipe, manifest: str, clips: int = 16) -> dict:
    """Flow-matching error of latent frame 0 on training clips with the clip's own first
    frame put in image slot 0, against no reference (same noise, same t): does the DiT
    read an image slot at all? A probe of reading only: training gives a clip its own
    first frame in the I2V slot (the last image slot), and fills slot 0 by role."""
    import pyarrow.parquet as pq

    from core.media import read_clip
    from model.flow_matching import add_noise, velocity_target
    from model.references import ReferenceLatents, RefSlot

    rows = pq.read_table(manifest).to_pylist()[:clips]
    out = {}
    gen = torch.Generator().manual_seed(0)
    dev = pipe.device
    for t_val in (0.5, 0.8, 0.95):
        errs = {"with": [], "without": []}
        for r in rows:
            zv, za = pipe.encode_clip(read_clip(r["clip_uri"]), 17)
            text = pipe.encode_text([r["caption"]])
            nv = torch.randn(zv.shape, generator=gen).to(dev)
            na = torch.randn(za.shape, generator=gen).to(dev)
            t = torch.full((1,), t_val, device=dev)
            for key, refs in (
                ("with", ReferenceLatents(images=[RefSlot(zv[:, :, :1])])),
                ("without", None),
            ):
                pv, _ = pipe.dit(add_noise(zv, nv, t), add_noise(za, na, t), t, text, refs)
                target = velocity_target(zv, nv)
                errs[key].append(float(((pv - target)[:, :, :1] ** 2).mean()))
        out[f"t{t_val}"] = {k: round(sum(v) / len(v), 4) for k, v in errs.items()}
    return out


def recipe(args, manifest: str, run_uri: str) -> TrainConfig:
    return TrainConfig(
        preset="tiny",
        run_uri=run_uri,
        seed=args.seed,
        data=DataConfig(curated_uri=manifest, frame_buckets=(17,)),
        vae=VAEStageConfig(
            steps=args.vae_steps, batch_size=args.vae_batch, window_frames=9,
            crop_px=args.crop, checkpoint_every=10**6, log_every=50, eval_clips=1,
        ),
        pretrain=DiTStageConfig(
            steps=args.dit_steps, batch_size=args.dit_batch, lr=args.lr, warmup_steps=20,
            ema_decay=args.ema, checkpoint_every=10**6, log_every=50,
            references=ReferenceSampling(
                reference_probability=args.ref_p, max_images=args.max_images,
                max_videos=args.max_videos, max_audios=args.max_audios,
                own_frame_probability=args.own_p,
                max_reference_latent_frames=2, multishot_probability=args.ms_p,
            ),
        ),
        keep_checkpoints=1,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/duet_cond")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=0)
    parser.add_argument("--dit-steps", type=int, default=800)
    parser.add_argument("--dit-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--ref-p", type=float, default=0.7)
    parser.add_argument("--own-p", type=float, default=0.8)
    parser.add_argument("--max-images", type=int, default=3)
    parser.add_argument("--ms-p", type=float, default=0.3)
    parser.add_argument("--sources", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="run")
    parser.add_argument("--max-videos", type=int, default=0)
    parser.add_argument("--max-audios", type=int, default=0)
    parser.add_argument("--colourless", type=float, default=0.5)
    parser.add_argument("--stages", default="vae,pretrain")
    parser.add_argument("--vae-from", default="", help="copy this run's vae stage first")
    parser.add_argument("--ref-scales", default="1.5")
    parser.add_argument("--text-table", default="")
    parser.add_argument("--make-text-table", default="")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("DUET_THREADS", "2")))
    started = time.perf_counter()
    spec = CorpusSpec(sources=args.sources, colourless_fraction=args.colourless)
    corpus = os.path.join(args.out, f"corpus{args.colourless:g}")
    manifest = os.path.join(corpus, "clips.parquet")
    if not os.path.exists(manifest):
        manifest = build_corpus(corpus, spec)
    if args.make_text_table:
        make_text_table(args.make_text_table, manifest)
        return
    if args.text_table:
        use_text_table(args.text_table)
    built = time.perf_counter()
    cfg = recipe(args, manifest, os.path.join(args.out, args.tag))

    def progress(stage, step, total, row):
        elapsed = time.perf_counter() - started
        print(
            f"{stage} {step}/{total} loss {row.get('loss', 0):.4f} at {elapsed:.0f} s", flush=True
        )

    if args.vae_from:
        import shutil

        shutil.copytree(
            os.path.join(args.out, args.vae_from, "vae"), os.path.join(cfg.run_uri, "vae")
        )
    stages = tuple(args.stages.split(","))
    finals = train(cfg, stages=stages, runner="local", progress=progress)
    trained = time.perf_counter()
    if "pretrain" not in stages:
        return
    pipe = DuetPipeline.from_checkpoint(finals["pretrain"]).eval()
    out0 = {"diagnostic": reference_diagnostic(pipe, manifest)}
    print(json.dumps(out0), flush=True)
    gen = GenSettings()
    red, blue = first_frame_of("red", spec), first_frame_of("blue", spec)
    cols = ("red", "blue", "green", "yellow")
    plain = PROMPTS[0]
    out = {"no_ref": shares(reference_counts(pipe, plain, [], gen), cols)}
    for scale in [float(x) for x in args.ref_scales.split(",")]:
        g = GenSettings(ref_scale=scale)
        for name, images in (
            ("red", [red]),
            ("blue", [blue]),
            ("red_blue", [red, blue]),
            ("blue_red", [blue, red]),
        ):
            out[f"ref_{name}@{scale:g}"] = shares(reference_counts(pipe, plain, images, g), cols)
    frames = {b: reference_frame(c, b) for c, b in (("red", "beige"), ("blue", "slate"))}
    for name, images in (
        ("none", []),
        ("beige", [frames["beige"]]),
        ("slate", [frames["slate"]]),
        ("beige_slate", [frames["beige"], frames["slate"]]),
        ("slate_beige", [frames["slate"], frames["beige"]]),
    ):
        out[f"backdrop_{name}"] = reference_backdrops(pipe, plain, images, gen)
    ms = multishot_counts(pipe, (PROMPTS[1], PROMPTS[2]), gen)
    out["ms_red_blue"] = [shares(c, cols) for c in ms]
    ms = multishot_counts(pipe, (PROMPTS[2], PROMPTS[1]), gen)
    out["ms_blue_red"] = [shares(c, cols) for c in ms]
    out["text_red"] = shares(reference_counts(pipe, PROMPTS[1], [], gen), cols)
    out["pixels_no_ref"] = sum(reference_counts(pipe, plain, [], gen).values())
    done = time.perf_counter()
    out["timing_s"] = {
        "corpus": round(built - started, 1),
        "train": round(trained - built, 1),
        "measure": round(done - trained, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
