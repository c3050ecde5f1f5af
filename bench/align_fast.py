"""Wall time per clip, Full against Fast, measured side by side in one run; and
distillation methods compared on prompts unseen in distillation.

    python bench/align_fast.py --student RUN/distill/final [--teacher RUN/rlhf/final]
    python bench/align_fast.py --compare RUN --out DIR [--methods reflow,dmd2]
        [--steps 300] [--seeds 8]

``--compare``: RUN is a training run with ``rlhf/final`` (the teacher) whose
manifest is readable. Each method distils a student from that teacher with the same
loop steps and batch (``distill.method``; the run's distill settings otherwise),
under DIR/<method>, timed; then the teacher (Full: Heun, 20 steps, guidance 4) and
every student (Fast, 4 Euler steps) generate the run's held-out alignment prompts
(which neither method distils on: reflow uses the training prompts, dmd2 excludes
them by construction) for the same seeds, rated by the programmatic rater. Printed:
adherence and sync (mean +- se), student / teacher ratios, and a distribution
distance per prompt between each student's and the teacher's sampled latents
(squared differences of their per-element means and standard deviations over the
seeds; 0 = the same first two moments).

Full = the teacher (the student's parent by default) with Heun, 20 steps and text
guidance 4; Fast = the distilled student, 4 Euler steps, guidance distilled in. Clips
alternate Full / Fast over the same prompts and seeds, so load on a shared machine
hits both alike. Prints per-clip wall time (generation including VAE decode and
vocoder) and network evaluations, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _moment_distance(a: list, b: list) -> float:
    """Mean squared difference of per-element mean and std of two latent sample sets."""
    import torch

    x, y = torch.stack(a), torch.stack(b)
    return float(((x.mean(0) - y.mean(0)) ** 2).mean() + ((x.std(0) - y.std(0)) ** 2).mean())


def compare(args) -> dict:
    """Distil with each method from one teacher; score teacher and students on the
    held-out prompts."""
    import torch

    from core import storage
    from core.config import config_to_dict
    from model.generate import GenerationRequest, generate
    from model.pipeline import DuetPipeline
    from pipelines.align.evaluate import mean_se
    from pipelines.align.rater import rate_clip
    from pipelines.align.stages import prompt_sets
    from pipelines.train.config import train_config_from
    from pipelines.train.loop import run_stage
    from pipelines.train.runtime import Runtime

    teacher_uri = f"{args.compare}/rlhf/final"
    base = storage.read_json(f"{teacher_uri}/config.json")["extra"]["train_config"]
    base_cfg = train_config_from(base)
    _, held = prompt_sets(base_cfg)
    out = {"held_out_prompts": held, "steps": args.steps, "seeds": args.seeds, "methods": {}}
    students = {}
    for method in args.methods.split(","):
        config = config_to_dict(base_cfg)
        config.update(run_uri=f"{args.out}/{method}", init_from=teacher_uri)
        student = [int(n) for n in args.student_steps.split(",")]
        config["distill"].update(student_steps=student, default_steps=min(student))
        config["distill"].update(method=method, steps=args.steps, batch_size=args.batch,
                                 checkpoint_every=args.steps, log_every=max(1, args.steps // 10))  # fmt: skip
        for key, value in (("lr", args.lr), ("teacher_steps", args.teacher_steps),
                           ("trajectories_per_prompt", args.trajectories)):  # fmt: skip
            if value:
                config["distill"][key] = value
        if method == "dmd2":
            config["distill"]["dmd"] = {
                **config["distill"].get("dmd", {}),
                "fake_updates": args.fake_updates,
            }
            dmd_opts = (("lr", args.dmd_lr), ("fake_lr", args.fake_lr),
                        ("regression_weight", args.regression))  # fmt: skip
            for key, value in dmd_opts:
                if value:
                    config["distill"]["dmd"][key] = value
        started = time.perf_counter()
        result = run_stage(train_config_from(config), "distill", Runtime())
        out["methods"][method] = {"train_s": round(time.perf_counter() - started, 1)}
        students[method] = DuetPipeline.from_checkpoint(result.final_uri)
    models = {"teacher": (DuetPipeline.from_checkpoint(teacher_uri), "full")}
    # The starting point of every student: the teacher's weights on the Fast path.
    undistilled = DuetPipeline.from_checkpoint(teacher_uri)
    undistilled.fast = {"steps": [4], "default_steps": 4, "sampler": "euler"}
    models["undistilled"] = (undistilled, "fast")
    models |= {m: (p, "fast") for m, p in students.items()}
    scores = {name: {"adherence": [], "sync": []} for name in models}
    latents = {name: {p: [] for p in held} for name in models}
    for prompt in held:
        for seed in range(args.seeds):
            for name, (model, quality) in models.items():
                request = GenerationRequest(prompt=prompt, duration_s=args.duration, seed=seed,
                                            quality=quality)  # fmt: skip
                result = generate(request, pipeline=model)
                rated = rate_clip(prompt, result.clip)
                for head in ("adherence", "sync"):
                    if rated.get(head) is not None:
                        scores[name][head].append(float(rated[head]))
                v, a = result.latents
                latents[name][prompt].append(torch.cat([v.flatten(), a.flatten()]).float())
    teacher = scores["teacher"]
    for name, heads in scores.items():
        row = out["methods"].setdefault(name, {})
        for head, values in heads.items():
            m, se = mean_se(values)
            row[head] = {"mean": round(m, 4), "se": round(se, 4), "n": len(values)}
            t = statistics.fmean(teacher[head]) if teacher[head] else float("nan")
            if name != "teacher":
                row[f"{head}_over_teacher"] = round(m / t, 3) if t > 0 else None
        if name != "teacher":
            row["moment_distance_to_teacher"] = round(statistics.fmean(
                _moment_distance(latents[name][p], latents["teacher"][p]) for p in held), 5)  # fmt: skip
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default="")
    parser.add_argument("--compare", default="", help="a run with rlhf/final: compare methods")
    parser.add_argument("--out", default="out/align_fast")
    parser.add_argument("--methods", default="reflow,dmd2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--fake-updates", type=int, default=4)
    parser.add_argument("--student-steps", default="4,8", help="distill.student_steps")
    parser.add_argument("--lr", type=float, default=0.0, help="reflow: distill.lr (0: default)")
    parser.add_argument("--dmd-lr", type=float, default=0.0, help="distill.dmd.lr (0: default)")
    parser.add_argument("--fake-lr", type=float, default=0.0, help="distill.dmd.fake_lr")
    parser.add_argument(
        "--regression", type=float, default=0.0, help="distill.dmd.regression_weight"
    )
    parser.add_argument("--teacher-steps", type=int, default=0, help="reflow couplings (0: run's)")
    parser.add_argument("--trajectories", type=int, default=0, help="reflow couplings per prompt")
    parser.add_argument("--teacher", default="")
    parser.add_argument("--prompts", default="a red circle bounces on a gray floor")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=17 / 16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        print(json.dumps(compare(args), indent=1))
        return
    if not args.student:
        parser.error("--student or --compare is needed")

    from core import storage
    from model.generate import GenerationRequest, generate
    from model.pipeline import DuetPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_uri = (
        args.teacher or storage.read_json(f"{args.student}/config.json")["extra"]["parent"]
    )
    full_model = DuetPipeline.from_checkpoint(teacher_uri)
    fast_model = DuetPipeline.from_checkpoint(args.student)
    prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
    runs = {"full": [], "fast": []}
    evals = {}
    warm = GenerationRequest(prompt=prompts[0], duration_s=args.duration, steps=2)
    generate(warm, pipeline=full_model)
    generate(warm, pipeline=fast_model, quality="fast")
    for seed in range(args.seeds):
        for prompt in prompts:
            for name, model in (("full", full_model), ("fast", fast_model)):
                request = GenerationRequest(prompt=prompt, duration_s=args.duration, seed=seed,
                                            quality=name)  # fmt: skip
                started = time.perf_counter()
                result = generate(request, pipeline=model)
                runs[name].append(time.perf_counter() - started)
                evals[name] = result.metadata["network_evals"]
    out = {
        name: {"clips": len(t), "median_s": round(statistics.median(t), 4),
               "mean_s": round(statistics.fmean(t), 4), "network_evals": evals[name]}
        for name, t in runs.items()
    }  # fmt: skip
    out["wall_ratio_full_over_fast"] = round(out["full"]["median_s"] / out["fast"]["median_s"], 2)
    out["eval_ratio_full_over_fast"] = round(evals["full"] / evals["fast"], 2)
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
