"""Does a recipe learn its job? Train it, score held-out prompts, compare with targets.

    python -m bench.quality                                  # recipes/conditioning-cpu.toml
    python -m bench.quality --device cuda --seeds 32 --cases 32 --out runs/q1
    python -m bench.quality --out runs/q1 --skip-train        # score a finished run again
    python -m bench.quality --checkpoint checkpoints/default --cases 8   # conditioning only

One command: the recipe (a TOML: ``[corpus]``, ``[train]``, ``[targets]``) builds its
corpus (:mod:`pipelines.train.conditioning`, written losslessly), trains
``vae -> pretrain -> sft -> rlhf -> distill`` with :func:`pipelines.train.train` and
scores the run's held-out alignment prompts (captions never trained on by RLHF or
distillation, :func:`pipelines.align.stages.prompt_sets`) with the programmatic rater,
every model on the same (prompt, seed) pairs through ``model.generate``:

- SFT against pretrain and RLHF against SFT: paired differences per head (mean +- se);
- the Fast student (4 Euler steps) against its teacher: ratio of means per head;
- reference usage (a diagnostic, no target): pretrain's and SFT's denoising loss
  on the run's own role-reference batches with each sample's reference, another's
  and none (:mod:`pipelines.train.reference_usage`): whether training taught the
  model to read references at all;
- image references: the backdrop of a reference image (a ball on that backdrop, not
  a frame of the generated clip) in generations whose text names none, against its
  share under the other images;
- conditioning followed, issue 21's quality items, on the RLHF model
  (:mod:`pipelines.shipped.conditioning_quality`: ``--cases`` held-out cases per kind
  rendered by ``core.synth``, scored with ``core.probes``): an image reference's
  subject (``@image1 subject``; a subject reference shows the subject in another
  shot, first-frame conditioning is its own I2V mode and is not measured here), a
  video reference's motion, an audio reference's tempo, V2A onsets against the
  video's impacts, A2V pulses against the soundtrack's beats, a four-shot plan's
  subject and cuts, and V2V trajectories.

``--checkpoint URI`` scores only the conditioning items on an existing checkpoint (no
corpus, no training). Prints a table of measured values against the recipe's targets
and exits 1 when a target is missed (the numbers go to BENCHMARKS.md). Quality is
decided here, on a GPU at scale; ``make test`` only checks that each method moves what
it optimises and that each measure scores ground truth as passing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib

HELD_OUT_BACKDROPS = (("red", "beige"), ("blue", "slate"), ("yellow", "charcoal"))
NO_COLOUR = "a circle bounces on a gray floor"


def load_recipe(path: str) -> dict:
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    for table in ("corpus", "train", "targets"):
        if table not in recipe:
            raise SystemExit(f"{path}: the recipe has no [{table}] table")
    return recipe


def train_run(recipe: dict, out: str, skip_train: bool):
    from core import storage
    from pipelines.train import train
    from pipelines.train.conditioning import CorpusSpec, build_corpus
    from pipelines.train.config import train_config_from

    manifest = storage.join(out, "corpus", "clips.parquet")
    if not storage.exists(manifest):
        if skip_train:
            raise SystemExit(f"--skip-train: no corpus at {manifest}")
        build_corpus(storage.join(out, "corpus"), CorpusSpec(**recipe["corpus"]))
    config = dict(recipe["train"])
    config["run_uri"] = storage.join(out, "run")
    config["data"] = {**config.get("data", {}), "curated_uri": manifest}
    cfg = train_config_from(config)
    stages = ("vae", "pretrain", "sft", "rlhf", "distill")
    if not skip_train:
        started = time.perf_counter()
        train(cfg, stages=stages, runner="local", progress=stage_progress(started))
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    return cfg, {s: f"{cfg.run_uri}/{s}/final" for s in stages}


def stage_progress(started: float):
    """A progress callback printing each logged step with the run's elapsed time, so
    a log shows where the time goes (finished stages are skipped silently)."""

    def show(stage: str, step: int, total: int, metrics: dict) -> None:
        loss = metrics.get("loss")
        loss = f", loss {loss:.4f}" if isinstance(loss, float) else ""
        print(f"{stage} {step}/{total} at {time.perf_counter() - started:.0f} s{loss}", flush=True)

    return show


def conditioning(pipeline, args) -> dict:
    """Issue 21's conditioning items on one model (see the module's docstring)."""
    from pipelines.shipped import conditioning_quality as cq
    from pipelines.shipped.quality import QualitySettings

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(cq.KINDS))
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; known: {', '.join(cq.KINDS)}")
    started = time.perf_counter()
    cases = cq.build_cases(pipeline.config, args.cases, kinds=kinds)
    results = cq.measure(pipeline, cases, QualitySettings(steps=args.steps))
    print(f"scored conditioning in {time.perf_counter() - started:.0f} s", flush=True)
    return results


def score(cfg, finals: dict, args) -> dict:
    from model.pipeline import DuetPipeline
    from pipelines.align.evaluate import EvalSettings, evaluate_prompts
    from pipelines.align.stages import prompt_sets
    from pipelines.train.conditioning import GenSettings, reference_backdrops, reference_frame

    seeds, device = args.seeds, args.device
    _, held_out = prompt_sets(cfg)
    full = EvalSettings(seeds=tuple(range(seeds)))
    fast = EvalSettings(seeds=full.seeds, quality="fast", steps=4, sampler="euler")
    evals = {}
    for stage in ("pretrain", "sft", "rlhf", "distill"):
        pipeline = DuetPipeline.from_checkpoint(finals[stage]).to(device)
        started = time.perf_counter()
        evals[stage] = evaluate_prompts(pipeline, held_out, fast if stage == "distill" else full)
        print(f"scored {stage} in {time.perf_counter() - started:.0f} s", flush=True)
    teacher = DuetPipeline.from_checkpoint(finals["rlhf"]).to(device).eval()
    gen = GenSettings(seeds=tuple(range(min(seeds, 4))), steps=10)
    backdrops = {
        name: reference_backdrops(teacher, NO_COLOUR, [reference_frame(colour, name)], gen)
        for colour, name in HELD_OUT_BACKDROPS
    }
    return {
        "held_out": held_out,
        "evals": evals,
        "backdrops": backdrops,
        "reference_usage": usage(cfg, args),
        "conditioning": conditioning(teacher, args),
    }


def usage(cfg, args) -> dict:
    """Whether pretrain and SFT learned to read role references at all
    (:mod:`pipelines.train.reference_usage`): a diagnostic beside the targets."""
    from pipelines.train.reference_usage import reference_usage

    started = time.perf_counter()
    out = {s: reference_usage(cfg, s, batches=8, device=args.device) for s in ("pretrain", "sft")}
    print(f"measured reference usage in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def check_targets(scores: dict, targets: dict) -> list[dict]:
    """One row per target: what was measured, the bar, and whether it was met."""
    from pipelines.align.config import HEADS
    from pipelines.align.evaluate import paired_difference
    from pipelines.shipped.conditioning_quality import target_rows

    rows = []
    if "evals" not in scores:  # --checkpoint: the conditioning items only
        return target_rows(scores["conditioning"], targets)
    ev = scores["evals"]

    def row(name: str, measured: str, bar: str, met: bool) -> None:
        rows.append({"target": name, "measured": measured, "bar": bar, "met": bool(met)})

    d, se = paired_difference(ev["pretrain"], ev["sft"], "adherence")
    fall = targets["sft_max_fall_se"]
    row("SFT - pretrain, adherence", f"{d:+.3f} +- {se:.3f}", f">= -{fall} se", d >= -fall * se)
    for h in HEADS:
        d, se = paired_difference(ev["sft"], ev["rlhf"], h)
        if h in targets["rlhf_gain_heads"]:
            k = targets["rlhf_gain_se"]
            row(f"RLHF - SFT, {h}", f"{d:+.3f} +- {se:.3f}", f">= {k} se", se > 0 and d >= k * se)
        else:
            k = targets["rlhf_max_fall_se"]
            row(f"RLHF - SFT, {h}", f"{d:+.3f} +- {se:.3f}", f">= -{k} se", d >= -k * se)
    for h in targets["fast_heads"]:
        teacher = ev["rlhf"]["summary"][h]["mean"]
        student = ev["distill"]["summary"][h]["mean"]
        ratio = student / teacher if teacher else float("nan")
        bar = targets["fast_ratio"]
        row(f"Fast / teacher, {h}", f"{ratio:.3f} ({student:.3f} / {teacher:.3f})",
            f">= {bar}", teacher > 0 and ratio >= bar)  # fmt: skip
    margin = targets["reference_backdrop_margin"]
    got = scores["backdrops"]
    for name in got:
        elsewhere = max(got[other][name] for other in got if other != name)
        commonest = got[name][name] >= max(got[name].values())
        gain = got[name][name] - elsewhere
        row(f"image reference backdrop {name}", f"{got[name][name]:.2f} (+{gain:.2f})",
            f"commonest, >= +{margin}", commonest and gain >= margin)  # fmt: skip
    return rows + target_rows(scores["conditioning"], targets)


def print_table(rows: list[dict], scores: dict) -> None:
    from pipelines.align.config import HEADS

    if scores.get("evals"):
        print("\n| model | " + " | ".join(HEADS) + " |")
        print("| --- |" + " --- |" * len(HEADS))
    for stage, result in scores.get("evals", {}).items():
        s = result["summary"]
        print(
            f"| {stage} | "
            + " | ".join(f"{s[h]['mean']:.3f} +- {s[h]['se']:.3f}" for h in HEADS)
            + " |"
        )
    if scores.get("reference_usage"):
        print("\n| model | reference | branch loss, own ref | gain vs none | gain vs another's |")
        print("| --- | --- | --- | --- | --- |")
    for stage, kinds in scores.get("reference_usage", {}).items():
        for kind, u in kinds.items():
            cells = [
                "n/a"
                if g["mean"] is None
                else f"{g['mean']:+.4f} +- {g['se']:.4f} (n={g['samples']})"
                for g in (u["gain_vs_none"], u["gain_vs_other"])
            ]
            own = "n/a" if u["loss_own"] is None else f"{u['loss_own']:.4f}"
            print(f"| {stage} | {kind} | {u['branch']} {own} | {cells[0]} | {cells[1]} |")
    print("\n| target | measured | bar | met |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['target']} | {r['measured']} | {r['bar']} | {'yes' if r['met'] else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="recipes/conditioning-cpu.toml")
    parser.add_argument("--out", default="", help="run folder (default: a new temporary one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per held-out prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--skip-train", action="store_true", help="score the run in --out")
    parser.add_argument("--json", default="", help="write the scores and targets here")
    parser.add_argument(
        "--checkpoint", default="",
        help="score only the conditioning items on this checkpoint (no corpus, no training)",
    )  # fmt: skip
    parser.add_argument("--cases", type=int, default=8, help="held-out cases per kind")
    parser.add_argument("--steps", type=int, default=12, help="sampling steps of the cases")
    parser.add_argument(
        "--kinds", default="image,video,audio,v2a,a2v,multishot,v2v",
        help="conditioning kinds to measure (comma-separated)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    import tempfile

    import torch

    from core import storage

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    if args.checkpoint:
        from model.pipeline import DuetPipeline

        uri = storage.absolute_uri(args.checkpoint)
        print(f"recipe {args.recipe}, checkpoint {uri}, device {args.device}")
        model = DuetPipeline.from_checkpoint(uri).to(args.device).eval()
        scores = {"conditioning": conditioning(model, args)}
    else:
        out = storage.absolute_uri(args.out or tempfile.mkdtemp(prefix="duet-quality-"))
        print(f"recipe {args.recipe}, run folder {out}, device {args.device}")
        cfg, finals = train_run(recipe, out, args.skip_train)
        scores = score(cfg, finals, args)
    rows = check_targets(scores, recipe["targets"])
    print_table(rows, scores)
    if args.json:
        summaries = {k: v["summary"] for k, v in scores.get("evals", {}).items()}
        storage.write_text(args.json, json.dumps(
            {"recipe": args.recipe, "seeds": args.seeds, "device": args.device,
             "checkpoint": args.checkpoint or None, "cases": args.cases,
             "held_out": scores.get("held_out"), "summaries": summaries,
             "backdrops": scores.get("backdrops"), "conditioning": scores["conditioning"],
             "reference_usage": scores.get("reference_usage"),
             "targets": rows}, indent=1, default=str))  # fmt: skip
    missed = [r["target"] for r in rows if not r["met"]]
    if missed:
        print(f"\n{len(missed)} of {len(rows)} targets missed: {', '.join(missed)}")
        return 1
    print(f"\nall {len(rows)} targets met")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
