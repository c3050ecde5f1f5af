"""Serving benchmark: the Ray Serve app under load, measured side by side in one run.

For the ``fast`` deployment at a fixed replica count N (autoscaling pinned to N):
clips per minute and p50/p99 latency of closed-loop clients (2 jobs in flight per
replica), for each N in ``--replicas``; scaling efficiency = throughput(N) /
(N x throughput(1)). The dynamic batching gain is the throughput at N=1 with
``max_batch_size`` 4 over the same with 1, under the same load, and also the raw
model-level gain (``pipelines.generation.generate_many`` with a batch of 4 vs one
at a time, no Serve). Fast vs Full per clip: one client, one job at a time, per
quality.

    .venv/bin/python -m bench.serving                      # tiny, random weights
    .venv/bin/python -m bench.serving --checkpoint URI     # a real checkpoint (GPU)

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np

KEY = "bench-key"


def _config(args, jobs_uri: str, replicas: int, batch: int, port: int) -> dict:
    def deployment(steps: int, sampler: str) -> dict:
        return {
            "steps": steps, "sampler": sampler, "num_cpus": args.num_cpus,
            "num_gpus": args.num_gpus,
            "min_replicas": replicas, "max_replicas": replicas, "initial_replicas": replicas,
            "max_ongoing_requests": 4, "max_queued_requests": 32,
            "max_batch_size": batch, "batch_wait_timeout_s": 0.1,
            "torch_threads": args.torch_threads,
        }  # fmt: skip

    config = {
        "jobs_uri": jobs_uri,
        "api_keys": [KEY],
        "port": port,
        "fast": deployment(args.fast_steps, "euler"),
        "full": deployment(args.full_steps, "heun") | {"min_replicas": 1, "max_replicas": 1,
                                                       "initial_replicas": 1},
        "limits": {"max_pending_jobs": 256},
    }  # fmt: skip
    if args.checkpoint:
        config["checkpoint"] = args.checkpoint
    else:
        config["random_weights_preset"] = args.preset
    return config


def _deploy(config: dict) -> str:
    from ray import serve

    from core.config import config_to_dict
    from serve.app import build_app
    from serve.client import DuetClient
    from serve.config import serve_config_from

    cfg = serve_config_from(config)
    serve.run(build_app({"config": config_to_dict(cfg)}), name=cfg.app_name, route_prefix="/")
    url = f"http://127.0.0.1:{cfg.port}/"
    with DuetClient(url, KEY) as client:
        while not client.ready():
            time.sleep(0.5)
        # Warm every replica's first call (lazy kernels) before measuring.
        warm = [client.submit({"prompt": "warm", "duration_s": 0.5, "seed": i}).id
                for i in range(2 * max(1, config["fast"]["min_replicas"]))]  # fmt: skip
        for job in warm:
            client.wait(job)
    return url


def _load(url: str, concurrency: int, seconds: float, quality: str, duration: float) -> dict:
    from serve.loadgen import run_load

    job = {"prompt": "a red ball bounces", "quality": quality, "duration_s": duration}
    summary = run_load(url, KEY, concurrency, seconds, job)
    summary.pop("jobs")
    return summary


def model_batching_gain(args) -> dict:
    """generate_many: 4 requests as one batch vs one at a time (no Serve)."""
    import torch

    from model.generate import GenerationRequest
    from model.pipeline import DuetPipeline
    from pipelines.generation import generate_many

    torch.set_num_threads(args.torch_threads)
    if args.checkpoint:
        pipeline = DuetPipeline.from_checkpoint(args.checkpoint).eval()
    else:
        pipeline = DuetPipeline.from_preset(args.preset).eval()
    pipeline = pipeline.to(args.device)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    requests = [
        GenerationRequest(prompt=f"a ball {i}", duration_s=args.duration, seed=i,
                          steps=args.fast_steps, sampler="euler")
        for i in range(max(sizes))
    ]  # fmt: skip
    generate_many(pipeline, requests[:2], max_batch=2)  # warm-up
    times = {}
    for batch in sizes:
        best = float("inf")
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            generate_many(pipeline, requests, max_batch=batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        times[batch] = best
    one = times[sizes[0]]
    return {
        "device": args.device,
        "preset": pipeline.config.name,
        "clips": len(requests),
        "seconds_by_batch": {str(b): round(t, 3) for b, t in times.items()},
        "gain_by_batch": {str(b): round(one / t, 3) for b, t in times.items()},
        "gain": round(one / times[sizes[-1]], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ray Serve throughput, latency and scaling")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--duration", type=float, default=2.0, help="clip seconds")
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--full-steps", type=int, default=20)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="per model replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="per model replica")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="model-level batching only")
    parser.add_argument("--batch-sizes", default="1,4", help="model-level batching")
    parser.add_argument(
        "--model-only", action="store_true", help="only the model-level batching (no Ray)"
    )
    parser.add_argument("--out", default=f"{tempfile.gettempdir()}/bench_serving.json")
    args = parser.parse_args(argv)

    counts = [int(x) for x in args.replicas.split(",")]
    jobs_uri = tempfile.mkdtemp(prefix="bench_serving_")
    port = 8712
    results: dict = {
        "machine": f"{platform.node()} {platform.machine()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
    }
    results["model_batching"] = model_batching_gain(args)
    print("model-level batching:", json.dumps(results["model_batching"]), flush=True)
    if args.model_only:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
        return 0

    import ray
    from ray import serve

    from core.ray_setup import init_ray

    init_ray(None, num_cpus=args.ray_cpus or max(2, int(max(counts) * args.num_cpus + 2)))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        rows = []
        for n in counts:
            for batch in (4, 1) if n == 1 else (4,):
                url = _deploy(_config(args, jobs_uri, n, batch, port))
                summary = _load(url, 2 * n, args.seconds, "fast", args.duration)
                row = {"replicas": n, "max_batch_size": batch, **summary}
                rows.append(row)
                print(json.dumps(row), flush=True)
        results["fast"] = rows
        url = _deploy(_config(args, jobs_uri, 1, 4, port))
        per_clip = {}
        for quality in ("fast", "full"):
            summary = _load(url, 1, args.seconds / 2, quality, args.duration)
            per_clip[quality] = summary
            print(quality, json.dumps(summary), flush=True)
        results["per_clip"] = per_clip
    finally:
        serve.shutdown()
        ray.shutdown()

    base = next(r for r in rows if r["replicas"] == 1 and r["max_batch_size"] == 4)
    unbatched = next(r for r in rows if r["replicas"] == 1 and r["max_batch_size"] == 1)
    results["serve_batching_gain"] = round(
        base["clips_per_min"] / max(unbatched["clips_per_min"], 1e-9), 3
    )
    print(f"\nserving benchmark ({results['machine']}, {results['date']})")
    print(
        f"{'replicas':>8} {'batch':>5} {'clips/min':>9} {'p50 s':>7} {'p99 s':>7} {'efficiency':>10}"
    )  # noqa: E501
    for r in rows:
        eff = (
            r["clips_per_min"] / (r["replicas"] * base["clips_per_min"])
            if r["max_batch_size"] == 4
            else np.nan
        )  # noqa: E501
        r["scaling_efficiency"] = None if np.isnan(eff) else round(float(eff), 3)
        print(f"{r['replicas']:>8} {r['max_batch_size']:>5} {r['clips_per_min']:>9.2f} "
              f"{r['latency_p50_s'] or 0:>7.2f} {r['latency_p99_s'] or 0:>7.2f} "
              f"{'' if np.isnan(eff) else f'{eff:.2f}':>10}")  # fmt: skip
    print(f"dynamic batching gain at 1 replica (Serve): {results['serve_batching_gain']:.2f}x")
    print(f"model-level batching gain: {results['model_batching']['gain_by_batch']}")
    for quality, s in per_clip.items():
        print(f"{quality}: p50 {s['latency_p50_s']} s per clip (one at a time)")
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
