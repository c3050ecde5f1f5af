"""Measure a checkpoint's quality on held-out prompts (:mod:`pipelines.shipped.quality`).

    python -m pipelines.shipped.eval_job --checkpoint checkpoints/default \
        --exclude-manifest CURATED/clips.parquet --text 100 --edits 10 --multishot 10 \
        --references 8 --out quality.json
    python -m pipelines.shipped.eval_job --compare old.json new.json

Runs on a CPU or a GPU. Where the text encoder's weights are missing (an offline GPU
host), ``--make-text-table FILE`` (run where they are) writes the embeddings of
every prompt the run will use, and ``--text-table FILE`` serves them. ``--compare``
prints the paired differences (new - old, with standard errors) of two runs on the
same prompts, clip by clip.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--exclude-manifest", action="append", default=[])
    parser.add_argument("--text", type=int, default=100)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--multishot", type=int, default=10)
    parser.add_argument("--references", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="")
    parser.add_argument("--text-table", default="")
    parser.add_argument("--make-text-table", default="")
    parser.add_argument("--text-from-table", action="store_true")
    parser.add_argument(
        "--families",
        default="text,edit,multishot,reference",
        help="which to run (the "
        "counts still pick the held-out prompts, so a subset run measures the same ones)",
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("OLD_JSON", "NEW_JSON"),
        help="print paired differences (new - old, standard errors) of two runs' "
        "outputs on the same prompts, and generate nothing",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare:
        from core import storage
        from pipelines.shipped.quality import compare_runs, comparison_table

        runs = []
        for uri in args.compare:
            try:
                runs.append(storage.read_json(uri))
            except (OSError, ValueError) as err:
                parser.error(f"cannot read the eval run {uri}: {err}")
        rows = compare_runs(*runs)
        if not rows:
            parser.error("the two runs share no measured clip (were they run on the same prompts?)")
        print(comparison_table(rows))
        return {"comparison": rows}
    if not args.checkpoint:
        parser.error("--checkpoint is required (except with --compare)")

    import pyarrow.parquet as pq

    from model.checkpoint import load_state
    from model.checkpoint import model_config as config_of
    from pipelines.shipped import quality as q

    started = time.perf_counter()
    _, meta = load_state(args.checkpoint, prefix="__none__")
    cfg = config_of(meta, args.checkpoint)
    exclude = set()
    for uri in args.exclude_manifest:
        exclude |= {r["caption"] for r in pq.read_table(uri).to_pylist()}
    if args.text_from_table:
        # Rendering a talking_avatar shot needs espeak-ng, which the GPU machine lacks:
        # the held-out captions are the table's texts less those the other families
        # derive (a seeded sample of them, so every scene kind is represented).
        import random

        from safetensors import safe_open

        with safe_open(args.text_table, "pt") as f:
            keys = set(f.keys())
        text_shots = None
    else:
        text_shots = q.held_out_shots(cfg, args.text, exclude)
    edit_shots = q.held_out_shots(
        cfg,
        args.edits,
        exclude,
        kinds=("bouncing_balls", "day_night"),
        seed=q.HELD_OUT_SEED + 100_000,
    )
    ms_shots = q.held_out_shots(
        cfg, args.multishot, exclude, kinds=("bouncing_balls",), seed=q.HELD_OUT_SEED + 200_000
    )
    if text_shots is None:
        derived = {q.REFERENCE_PROMPT}
        for caption, _, _ in edit_shots:
            derived |= {v for k, v in q.edit_prompts(caption).items() if k != "new_colour"}
        derived |= {q.second_shot_prompt(c) for c, _, _ in ms_shots}
        from model.reference_binding import all_binding_phrases
        from pipelines.shipped.carry import is_plan_key

        texts = {k for k in keys if not is_plan_key(k)}
        captions = sorted(texts - derived - set(all_binding_phrases()))
        random.Random(0).shuffle(captions)
        text_shots = [(c, None, None) for c in captions[: args.text]]
        print(f"held-out captions from the table: {len(captions)}, using {len(text_shots)}")
    if args.make_text_table:
        from safetensors.torch import save_file

        from model.text_encoder import FrozenTextEncoder

        encoder = FrozenTextEncoder()
        from model.reference_binding import all_binding_phrases

        prompts = q.all_prompts(text_shots, edit_shots, ms_shots) + all_binding_phrases()
        table = {}
        for i in range(0, len(prompts), 64):
            chunk = prompts[i : i + 64]
            tokens, mask = encoder.encode(chunk)
            for p, t, m in zip(chunk, tokens, mask, strict=True):
                table[p] = t[m].to(torch.float16).contiguous()
        # Multi-shot plans of checkpoints trained on whole plans are encoded in one pass
        # (model.multishot.shot_text): the table holds each plan at the model's budget.
        from pipelines.shipped.carry import plan_key, plan_shots_key

        for caption, _, _ in ms_shots:
            segments, budget = q.multishot_plan(caption).segments(), cfg.text.max_tokens
            tok, shot = encoder.embed_segments(segments, budget)
            table[plan_key(segments, budget)] = tok.to(torch.float16).contiguous()
            table[plan_shots_key(segments, budget)] = shot.contiguous()
        save_file(table, args.make_text_table)
        print(f"{len(table)} prompts -> {args.make_text_table}")
        return {}
    if args.text_table:
        from safetensors.torch import load_file

        from pipelines.shipped.carry import TableTextEncoder

        TableTextEncoder.table = load_file(args.text_table)
        text_encoder = TableTextEncoder()
    else:
        text_encoder = None

    from model.pipeline import DuetPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = DuetPipeline.from_checkpoint(args.checkpoint, text_encoder=text_encoder, device=device)
    settings = q.QualitySettings(steps=args.steps)
    out = {
        "checkpoint": args.checkpoint,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "settings": settings.__dict__,
        "held_out": {"excluded_captions": len(exclude)},
    }
    timings = {}
    for name, fn, n in (
        ("text", lambda: q.text_quality(pipe, text_shots, settings), args.text),
        ("edit", lambda: q.edit_quality(pipe, edit_shots, settings), args.edits),
        ("multishot", lambda: q.multishot_quality(pipe, ms_shots, settings), args.multishot),
        (
            "reference",
            lambda: q.reference_quality(pipe, settings, args.references),
            args.references,
        ),
    ):
        if n <= 0 or name not in args.families.split(","):
            continue
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as err:  # one family's failure must not lose the others' numbers
            out[name] = {"error": repr(err)}
        timings[name] = round(time.perf_counter() - t0, 1)
        summary = {k: v for k, v in out[name].items() if k != "rows"}
        print(name, json.dumps(summary, default=str), flush=True)
        out["timings_s"] = timings
        out["wall_s"] = round(time.perf_counter() - started, 1)
        if args.out:  # after every family: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
