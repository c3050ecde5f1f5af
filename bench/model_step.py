"""Per-step forward time of the dual-branch DiT for each preset, side by side.

One "step" is one DiT forward (one sampler evaluation without guidance) at batch 1
on a short clip. Prints a table; nothing is written. Examples::

    python bench/model_step.py                       # all presets, CPU, fp32
    python bench/model_step.py --presets tiny small --frames 9
    python bench/model_step.py --device cuda --dtype bf16 --compile

Sizes: ``--size WxH`` overrides the preset's frame size (base and xl at full size
need far more memory and time than a CPU has; the default shrinks them to 128x128
on CPU and says so). A preset whose weights do not fit in memory is reported
instead of run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.configs import PRESETS, get_config  # noqa: E402
from model.dit import DualBranchDiT, TextConditioning  # noqa: E402
from model.pipeline import parameter_breakdown  # noqa: E402


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def bench_preset(name: str, args) -> dict:
    cfg = get_config(name)
    if args.size:
        w, h = (int(x) for x in args.size.lower().split("x"))
        cfg.width, cfg.height = w, h
    elif args.device == "cpu" and name in ("base", "xl"):
        cfg.width = cfg.height = 128
    cfg.validate()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dit_params = sum(n for comp, n in parameter_breakdown(cfg) if comp.startswith("dit."))
    weight_bytes = dit_params * (2 if args.dtype == "bf16" else 4)
    row = {"preset": name, "size": f"{cfg.width}x{cfg.height}", "dit_params": dit_params}
    if weight_bytes * 1.3 > _available_bytes(args.device):
        row["result"] = f"does not fit: {weight_bytes / 2**30:.1f} GiB of weights"
        return row
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DualBranchDiT(cfg).to(dtype).eval()
    num_frames = args.frames
    n_lat = cfg.num_latent_frames(num_frames)
    sf = cfg.video_vae.spatial_factor
    dev = args.device
    video = torch.randn(
        args.batch,
        cfg.video_vae.latent_channels,
        n_lat,
        cfg.height // sf,
        cfg.width // sf,
        device=dev,
        dtype=dtype,
    )
    audio = torch.randn(
        args.batch,
        cfg.audio_vae.latent_channels,
        n_lat * cfg.audio_latents_per_video_latent,
        device=dev,
        dtype=dtype,
    )
    t = torch.full((args.batch,), 0.5, device=dev)
    text = TextConditioning(
        torch.randn(args.batch, 16, cfg.text.embed_dim, device=dev, dtype=dtype),
        torch.ones(args.batch, 16, dtype=torch.bool, device=dev),
    )
    fn = model
    if args.compile:
        for block in model.blocks:
            block.compile(fullgraph=True)
    p = cfg.dit.video_patch
    row["tokens"] = f"{n_lat * (cfg.height // sf // p) * (cfg.width // sf // p)}v+{audio.shape[2]}a"

    def step():
        with torch.no_grad():
            out = fn(video, audio, t, text)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    row["ms_per_step"] = round(1000 * statistics.median(times), 2)
    row["result"] = "ok"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=9, help="video frames (1 + 4k)")
    parser.add_argument("--size", default="", help="WxH override, e.g. 128x128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each block (fullgraph)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {args.threads}, "
          f"batch {args.batch}, frames {args.frames}")  # fmt: skip
    print(f"{'preset':<7}{'size':>11}{'DiT params':>16}{'tokens':>14}{'ms/step':>11}  result")
    for name in args.presets:
        row = bench_preset(name, args)
        gc.collect()  # free one preset's weights before building the next
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(
            f"{row['preset']:<7}{row['size']:>11}{row['dit_params']:>16,}{row.get('tokens', '-'):>14}"
            f"{row.get('ms_per_step', float('nan')):>11.1f}  {row['result']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
