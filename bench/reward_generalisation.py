"""Does the learned reward model generalise? Per-head agreement with the rater on
preference pairs of prompts it never trained on, on a CPU corpus.

    python -m bench.reward_generalisation --shots 160 --steps 300

The corpus: ``--shots`` shots of the synthetic world (``--scenes``; the checkpoint's
geometry, 17 frames), each the group of one prompt (its caption) with five
candidates: the shot itself; its picture under noise (visual); its sound shifted by
a quarter second (sync); its first frame held (motion); and another shot with another
caption (adherence, count, colour). The programmatic rater
(:func:`pipelines.align.rater.rate_clip`) scores every candidate for the group's
prompt, the pairs are those of :func:`pipelines.align.preferences.preference_pairs`,
the candidates are encoded with the checkpoint's VAEs (``--checkpoint``), and the
split is by prompt (:func:`pipelines.align.reward.split_by_prompt`, every
``1 / --holdout``-th caption held out). Each ``--variants`` entry trains a reward
model on the training prompts (``--variants ""``: none, the table only) and prints its
per-head agreement on the held-out
prompts' pairs (with the number of pairs and the binomial standard error), and
"match": on held-out groups, how often adherence ranks the shot above the other
shot when the rater does (the pairs only the prompt can order: both are clean);
``noprompt`` is the ``tiny`` preset with every prompt replaced by one constant token
(what the prompt contributes).

**A checkpoint's own candidates** (``--manifest``): the preference table the ``rlhf``
stage draws (:func:`pipelines.align.stages.build_preferences`: a group of
``--candidates`` SDE samples of the checkpoint per prompt, the rater's labels), the
prompts the manifest's captions less every third (the stage's held-out prompts), up
to ``--max-prompts``, clips of ``--duration`` seconds; written once under ``--cache``
(a directory then) and reused. ``--train-prompts 30,70,0`` trains each variant on the
first K training prompts (0: all), the held-out prompts the same: how agreement grows
with the number of prompts. ``--grammar-prompts N`` adds N training prompts drawn from
the captions' grammar (``rlhf.prompts.grammar_prompts``), the held-out ones never.

On a GPU host without the text encoder's weights: ``--texts TABLE`` (a carry's
``texts.safetensors`` holding every prompt, :mod:`pipelines.shipped.carry`; only the
manifest's captions are read, not its clips), ``--device cuda`` (sampling and the
reward model's training), ``--rater-workers 12`` (the rater in processes) and
``--groups-per-batch 16`` (groups sampled together).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def candidates(clip, other, rng):
    """(name, clip) variants of one shot."""
    from core.media import AVClip

    def like(frames=None, audio=None):
        return AVClip(frames=clip.frames if frames is None else frames, fps=clip.fps,
                      audio=clip.audio if audio is None else audio,
                      sample_rate=clip.sample_rate)  # fmt: skip

    noisy = np.clip(clip.frames + rng.normal(0, 40, clip.frames.shape), 0, 255).astype(np.uint8)
    shift = clip.sample_rate // 4
    late = np.concatenate([np.zeros_like(clip.audio[:, :shift]), clip.audio[:, :-shift]], axis=1)
    held = np.repeat(clip.frames[:1], clip.frames.shape[0], axis=0)
    return [("clean", clip), ("noisy", like(frames=noisy)), ("late-sound", like(audio=late)),
            ("held-frame", like(frames=held)), ("other-shot", other)]  # fmt: skip


def build(pipe, shots: int, scenes: list[str], seed: int):
    from core.synth import render_shot
    from core.synth.scenes import SceneError
    from pipelines.align.config import HEADS
    from pipelines.align.rater import rate_clip

    mcfg = pipe.config
    frames = 17
    duration = frames / mcfg.fps
    rendered, s = [], seed * 1_000_003
    while len(rendered) < shots:
        s += 1
        try:
            clip, truth = render_shot(scenes[s % len(scenes)], s, duration, mcfg.width,
                                      mcfg.height, mcfg.fps, mcfg.sample_rate,
                                      guard_start_s=0.1, guard_end_s=0.1)  # fmt: skip
        except SceneError:
            continue
        rendered.append((truth["caption"].split('"')[0].strip(), clip))
    rng = np.random.default_rng(seed)
    rows, videos, audios = [], [], []
    for i, (prompt, clip) in enumerate(rendered):
        j = (i + 1 + int(rng.integers(len(rendered) - 1))) % len(rendered)
        while rendered[j][0] == prompt:
            j = (j + 1) % len(rendered)
        for c, (name, cand) in enumerate(candidates(clip, rendered[j][1], rng)):
            scores = rate_clip(prompt, cand)
            with torch.no_grad():
                zv, za = pipe.encode_clip(cand, frames)
            row = {"group_id": f"s{i:04d}", "candidate": c, "prompt": prompt, "kind": name,
                   "split": "train", "rater_id": "probe-rater-v1"}  # fmt: skip
            for h in HEADS:
                row[f"score_{h}"] = scores.get(h)
                row[f"rank_{h}"] = None
            rows.append(row)
            videos.append(zv[0])
            audios.append(za[0])
        if (i + 1) % 20 == 0:
            print(f"corpus: {i + 1}/{len(rendered)} shots", flush=True)
    prompts = sorted({r["prompt"] for r in rows})
    tokens, mask = pipe.text_encoder.encode(prompts)
    index = torch.tensor([prompts.index(r["prompt"]) for r in rows])
    inputs = {"video": torch.stack(videos), "audio": torch.stack(audios),
              "tokens": tokens[index], "mask": mask[index]}  # fmt: skip
    return rows, inputs


def stage_config(preset: str, run_uri: str, args):
    """The training config the rlhf stage would draw this table with."""
    from pipelines.train.config import train_config_from

    return train_config_from({
        "preset": preset, "run_uri": run_uri, "seed": args.seed,
        "data": {"curated_uri": os.path.abspath(args.manifest)},
        "rlhf": {"rater_workers": args.rater_workers,
                 "prompts": {"max_prompts": args.max_prompts, "holdout_every": 3,
                             "grammar_prompts": args.grammar_prompts},
                 "preferences": {"candidates_per_prompt": args.candidates, "rounds": 1,
                                 "groups_per_batch": args.groups_per_batch,
                                 "shared_noise": not args.independent_noise,
                                 "write_mp4": False, "duration_s": args.duration}},
    })  # fmt: skip


def stage_table(pipe, args):
    """Rows and inputs of the rlhf stage's preference table for the manifest's prompts,
    drawn with ``args.checkpoint`` into ``args.cache`` (reused when there)."""
    from core import storage
    from pipelines.align.preferences import TABLE_NAME, read_preferences
    from pipelines.align.stages import build_preferences, prompt_sets, reward_inputs, skipped_heads

    if not args.cache:
        raise SystemExit("--manifest needs --cache DIR (the preference table goes there)")
    cache = os.path.abspath(args.cache)
    cfg = stage_config(pipe.config.name, cache, args)
    table = storage.join(cache, "preferences", TABLE_NAME)
    if not storage.exists(table):
        train, held = prompt_sets(cfg)
        skip, _ = skipped_heads(train + held)
        build_preferences(cfg, pipe, train, storage.join(cache, "preferences"), print, skip)
    rows = read_preferences(table)
    inputs_file = os.path.join(cache, "inputs.safetensors")
    if os.path.exists(inputs_file):
        return rows, load_file(inputs_file)
    inputs = reward_inputs(pipe, rows)
    save_file({k: v.contiguous() for k, v in inputs.items()}, inputs_file)
    return rows, inputs


def first_prompts(rows: list[dict], k: int) -> list[dict]:
    """``rows`` with the training rows cut to the first ``k`` training prompts (0: all)."""
    keep = sorted({r["prompt"] for r in rows if r["split"] == "train"})[: k or None]
    return [r for r in rows if r["split"] == "val" or r["prompt"] in keep]


def prompt_match(model, rows, inputs) -> tuple[float, int]:
    """Held-out groups where the rater puts the clean shot above the other shot on
    adherence: the fraction where the model does too, and how many."""
    from pipelines.align.config import HEADS
    from pipelines.align.reward import score_rows

    k = HEADS.index("adherence")
    by_group = {}
    for i, r in enumerate(rows):
        if r["split"] == "val" and r.get("kind") in ("clean", "other-shot"):
            by_group.setdefault(r["group_id"], {})[r["kind"]] = i
    pairs = [
        (g["clean"], g["other-shot"]) for g in by_group.values()
        if len(g) == 2 and (rows[g["clean"]]["score_adherence"] or 0)
        >= (rows[g["other-shot"]]["score_adherence"] or 0) + 0.05
    ]  # fmt: skip
    if not pairs:
        return float("nan"), 0
    with torch.no_grad():
        s = score_rows(model, inputs, [i for p in pairs for i in p])[:, k]
    right = sum(bool(s[2 * j] > s[2 * j + 1]) for j in range(len(pairs)))
    return right / len(pairs), len(pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--shots", type=int, default=160)
    ap.add_argument("--scenes", default="bouncing_balls")
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default="tiny,small,noprompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the results here too")
    ap.add_argument("--cache", default="", help="corpus file (.safetensors + .json): reuse")
    ap.add_argument("--manifest", default="", help="clips.parquet: the checkpoint's candidates")
    ap.add_argument("--max-prompts", type=int, default=270)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--duration", type=float, default=33 / 16)
    ap.add_argument("--train-prompts", default="0", help="K,K,...: first K training prompts")
    ap.add_argument("--grammar-prompts", type=int, default=0)
    ap.add_argument("--texts", default="", help="text table (safetensors) for the encoder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rater-workers", type=int, default=0)
    ap.add_argument("--groups-per-batch", type=int, default=1)
    ap.add_argument(
        "--independent-noise", action="store_true", help="rlhf.preferences.shared_noise = false"
    )
    ap.add_argument("--list-texts", default="", help="write the prompts the table needs; exit")
    args = ap.parse_args(argv)
    if args.texts:
        from pipelines.shipped.carry import use_text_table_file

        use_text_table_file(args.texts)

    from model.pipeline import DuetPipeline
    from pipelines.align.config import HEADS, RewardConfig
    from pipelines.align.preferences import preference_pairs
    from pipelines.align.reward import split_by_prompt, train_reward_model
    from pipelines.align.stages import reward_dims

    torch.manual_seed(args.seed)
    pipe = DuetPipeline.from_checkpoint(args.checkpoint).to(args.device).eval()
    if args.list_texts:
        from pipelines.align.stages import prompt_sets

        train, held = prompt_sets(stage_config(pipe.config.name, args.cache or ".", args))
        with open(args.list_texts, "w", encoding="utf-8") as f:
            f.writelines(p + "\n" for p in sorted({*train, *held}))
        print(f"{len(train)} training and {len(held)} held-out prompts -> {args.list_texts}")
        return 0
    t0 = time.perf_counter()
    if args.manifest:
        rows, inputs = stage_table(pipe, args)
    elif args.cache and os.path.exists(args.cache + ".json"):
        rows = json.loads(open(args.cache + ".json").read())
        inputs = load_file(args.cache + ".safetensors")
    else:
        rows, inputs = build(pipe, args.shots, args.scenes.split(","), args.seed)
        if args.cache:
            save_file({k: v.contiguous() for k, v in inputs.items()}, args.cache + ".safetensors")
            with open(args.cache + ".json", "w") as f:
                json.dump(rows, f)
    split_by_prompt(rows, args.holdout)
    prompts = {s: sorted({r["prompt"] for r in rows if r["split"] == s}) for s in ("train", "val")}
    pairs = {h: len(preference_pairs(rows, h, 0.05)) for h in HEADS}
    print(f"corpus: {len(rows)} candidates, {len(prompts['train'])} training and "
          f"{len(prompts['val'])} held-out prompts, pairs per head {pairs}, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    results = {"shots": args.shots, "candidates": len(rows), "prompts": {
        k: len(v) for k, v in prompts.items()}, "pairs": pairs, "variants": {}}  # fmt: skip
    runs = [(v, int(k)) for v in args.variants.split(",") if v  # "": draw the table only
            for k in args.train_prompts.split(",")]  # fmt: skip
    all_rows = rows
    for variant, k in runs:
        rows = first_prompts(all_rows, k)
        kept = {id(r) for r in rows}
        index = [i for i, r in enumerate(all_rows) if id(r) in kept] if k else None
        preset = "tiny" if variant == "noprompt" else variant
        data = dict(inputs) if index is None else {n: v[index] for n, v in inputs.items()}
        if variant == "noprompt":
            data["tokens"] = torch.ones_like(inputs["tokens"][:, :1])
            data["mask"] = torch.ones_like(inputs["mask"][:, :1])
        cfg = RewardConfig(preset=preset, steps=args.steps, seed=args.seed)
        t1 = time.perf_counter()
        model, report = train_reward_model(rows, data, cfg, reward_dims(pipe), device=args.device)
        took = time.perf_counter() - t1
        match = prompt_match(model, rows, data)
        val = report["val_agreement"]
        print(f"\n{variant}, {report['train_prompt_count']} training prompts: "
              f"{report['parameters']} parameters, {took:.0f} s, "
              f"final loss {report['final_loss']:.3f}")  # fmt: skip
        print(f"  {'head':10s} {'held-out':>9s} {'+-se':>6s} {'pairs':>6s} {'train':>7s}")
        for h in HEADS:
            v, tr = val[h], report["train_agreement"][h]
            if v["agreement"] is None:
                print(f"  {h:10s} {'-':>9s}")
                continue
            seen = "-" if tr["agreement"] is None else f"{tr['agreement']:.3f}"
            print(f"  {h:10s} {v['agreement']:9.3f} {v['stderr']:6.3f} {v['pairs']:6d} "
                  f"{seen:>7s}")  # fmt: skip
        if match[1]:
            print(f"  match (adherence, shot vs other shot, held-out): {match[0]:.3f} on "
                  f"{match[1]}")  # fmt: skip
        name = f"{variant}/{report['train_prompt_count']}"  # preset / training prompts
        results["variants"][name] = {"seconds": round(took, 1), "val": val, "match": match,
                                     "parameters": report["parameters"]}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
