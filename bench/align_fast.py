"""Wall time per clip, Full against Fast, measured side by side in one run.

    python bench/align_fast.py --student RUN/distill/final [--teacher RUN/rlhf/final]

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", default="")
    parser.add_argument("--prompts", default="a red circle bounces on a gray floor")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=17 / 16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()

    import torch

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
