"""Ray Train's overhead on the CPU: the same DiT training loop with and without Ray.

For each preset, the ``pretrain`` stage runs twice on the same curated corpus, both
with 2 workers on gloo and the same global batches:

- ``torchrun``: ``python -m torch.distributed.run --nproc_per_node 2 -m cli.main
  train pretrain --runner local`` (no Ray at all);
- ``ray``: ``TorchTrainer`` with ``ScalingConfig(num_workers=2)``.

Throughput is the loop's own ``tokens_per_s`` (latent tokens of video and audio,
both workers together) averaged over the logged windows after the first (which
holds start-up and compilation). Both runs share one latent cache and start from
the same untrained VAE, so only the step loop is compared.

    .venv/bin/python bench/train_cpu.py [--data CURATED_URI] [--presets tiny,small] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import storage  # noqa: E402
from core.config import config_to_dict  # noqa: E402
from core.ports import free_port  # noqa: E402
from pipelines.train.config import train_config_from  # noqa: E402

# Per-preset settings that fit this machine: batch per worker and clip length.
PRESET_SETTINGS = {"tiny": (4, 33), "small": (1, 25)}


def make_corpus(root: str) -> str:
    from core.synth import SynthConfig, generate_corpus
    from flows.curate import curate

    synth = SynthConfig(width=256, height=256, fps=24, sample_rate=48000,
                        kinds=("bouncing_balls", "collision"), min_shots=2, max_shots=3,
                        min_shot_s=2.5, max_shot_s=4.0)  # fmt: skip
    generate_corpus(f"{root}/raw", 6, seed=1, config=synth)
    curate(f"{root}/raw/*.mp4", f"{root}/curated", speech=False)
    return f"{root}/curated"


def throughput(stage_uri: str) -> float:
    rows = [json.loads(x) for x in storage.read_text(f"{stage_uri}/metrics.jsonl").splitlines()]
    rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    return statistics.median(rates)


def run_pair(preset: str, data: str, work: str, steps: int) -> dict:
    from model.pipeline import DuetPipeline
    from pipelines.train import train

    batch, frames = PRESET_SETTINGS[preset]
    vae = f"{work}/{preset}-vae"
    if not storage.exists(f"{vae}/config.json"):
        DuetPipeline.from_preset(preset).save(vae)
    base = {
        "preset": preset,
        "init_from": vae,
        "data": {"curated_uri": data, "frame_buckets": [frames], "latent_cache_uri": f"{work}/latents"},
        "pretrain": {"steps": steps, "batch_size": batch, "checkpoint_every": 10**6,
                     "log_every": max(1, steps // 6), "references": {"multishot_probability": 0.0}},
    }  # fmt: skip
    results = {}
    cfg = train_config_from({**base, "run_uri": f"{work}/{preset}-torchrun"})
    path = f"{work}/{preset}.json"
    with open(path, "w") as f:
        json.dump(config_to_dict(cfg), f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "cli.main", "train", "pretrain", "--runner", "local", "--config", path]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    results["torchrun_wall_s"] = time.perf_counter() - started
    results["torchrun"] = throughput(f"{cfg.run_uri}/pretrain")
    cfg = train_config_from({**base, "run_uri": f"{work}/{preset}-ray"})
    started = time.perf_counter()
    train(cfg, stages=("pretrain",), runner="ray", num_workers=2)
    results["ray_wall_s"] = time.perf_counter() - started
    results["ray"] = throughput(f"{cfg.run_uri}/pretrain")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="", help="curated dataset (built when empty)")
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="duet-bench-train-")
    data = args.data or make_corpus(work)
    print("| preset | torchrun tokens/s | Ray Train tokens/s | Ray / torchrun | overhead |")
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets.split(","):
        r = run_pair(preset, data, work, args.steps)
        ratio = r["ray"] / r["torchrun"]
        print(f"| {preset} | {r['torchrun']:.0f} | {r['ray']:.0f} | {ratio:.3f} | "
              f"{100 * (1 - ratio):.1f}% |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
