"""The tiny overfit, recipe against recipe: train from scratch, generate, probe.

Every recipe trains all networks of a ``tiny`` pipeline (both VAEs and the DiT) on
the same three one-ball ``bouncing_balls`` shots, generates each caption with a few
seeds and measures the clips with the synthetic world's probes. The printed table
has, per recipe: fit seconds, final losses, how many generated clips show exactly
the prompted colour, how many impacts seen in the generated video have an audio
onset within 2 frames, the median of those errors, and the mean squared error of
the re-encoded generated video latent against the training clip's latent.

``tests/test_model_overfit.py`` runs the ``current`` recipe; both use the harness in
``pipelines/train/overfit.py``.

    python bench/overfit.py                          # current vs previous, CPU
    python bench/overfit.py --recipes current --seeds 1 2 3 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.train.overfit import RECIPES, run_recipe, summarise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["current", "previous"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {sorted(RECIPES)}")
    rows = []
    for name in args.recipes:
        report, results, timing = run_recipe(RECIPES[name], tuple(args.seeds), args.device, print)
        rows.append((name, report, timing, summarise(results)))
    print(
        "\n| recipe | fit s | video VAE loss | DiT loss | colour exact | clips with impacts "
        "| onsets within 2 frames of visual impacts | median error (frames) | video latent MSE |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, report, timing, s in rows:
        print(
            f"| {name} | {timing['fit_s']:.0f} | {report.first_last('video_vae')[1]:.4f} "
            f"| {report.first_last('dit')[1]:.4f} | {s['colour_exact']}/{s['clips']} "
            f"| {s['clips_with_impacts']}/{s['clips']} "
            f"| {s['onsets_within_2_frames']}/{s['visual_impacts']} "
            f"| {s['median_error_frames']:.2f} | {s['video_latent_mse']:.4f} |"
        )


if __name__ == "__main__":
    main()
