"""Training-step speed of the ``base`` DiT on one GPU, against diffusers' Wan 2.1 DiT.

One command on the GPU machine (bf16 autocast, random weights, synthetic latents)::

    python3 bench/train_gpu.py --out $OUT/train_gpu.json
    # Wan column: carry diffusers' wheel and put it on the path first, e.g.
    #   pip install --no-deps --no-index wheels/diffusers-*.whl

For each shape (default: 480p x 81 frames and 256 px x 49 frames) it times the
train step (forward + backward + AdamW) of Duet's ``base`` DiT with activation
checkpointing, and -- when ``diffusers`` imports -- ``WanTransformer3DModel`` in the
Wan 2.1 1.3B layout with its width chosen so its parameter count matches ``base``'s,
at the same number of video tokens. Printed and written per run:

- tokens/s: video + audio latent tokens per second of train step;
- MFU: model FLOPs / step time / the card's dense bf16 peak (989.5 TFLOP/s for H100
  SXM and H200). Model FLOPs = 3 x the forward's FLOPs (backward = 2 x forward;
  the recomputation that checkpointing adds is not counted, as MFU conventions
  go), the forward's FLOPs counted by ``torch.utils.flop_counter`` (matmuls and
  attention: 2 m n k per matmul, 4 T^2 d per attention head pair);
- peak memory (``torch.cuda.max_memory_allocated``), and a profiler table of the top
  CUDA kernels with ``--profile``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.configs import get_config  # noqa: E402
from model.dit import DualBranchDiT, TextConditioning  # noqa: E402
from model.parallelize import ParallelConfig, parallelize_dit  # noqa: E402

PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12}
SHAPES = {"480p81": (832, 480, 81), "256p49": (256, 256, 49)}


def peak_flops() -> float:
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return 989.5e12


def forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(step, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def duet_case(width: int, height: int, frames: int, args) -> dict:
    cfg = get_config("base")
    cfg.width, cfg.height = width, height
    device = torch.device("cuda")
    with torch.device(device):  # initialised on the GPU: seconds, not a CPU minute
        dit = DualBranchDiT(cfg)
    params = sum(p.numel() for p in dit.parameters())
    parallelize_dit(
        dit, ParallelConfig(activation_checkpointing="full" if args.checkpointing else "none",
                            compile=args.compile)
    )  # fmt: skip
    n_lat = cfg.num_latent_frames(frames)
    sf = cfg.video_vae.spatial_factor
    video = torch.randn(
        1, cfg.video_vae.latent_channels, n_lat, height // sf, width // sf, device=device
    )
    audio = torch.randn(
        1, cfg.audio_vae.latent_channels, n_lat * cfg.audio_latents_per_video_latent, device=device
    )
    text = TextConditioning(
        torch.randn(1, cfg.text.max_tokens, cfg.text.embed_dim, device=device),
        torch.ones(1, cfg.text.max_tokens, dtype=torch.bool, device=device),
    )
    t = torch.rand(1, device=device)
    tokens = (
        n_lat * (height // sf // cfg.dit.video_patch) * (width // sf // cfg.dit.video_patch)
        + audio.shape[-1]
    )
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=True)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pv, pa = dit(video, audio, t, text)
        return pv.float().square().mean() + pa.float().square().mean()

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = forward_flops(forward)
    torch.cuda.reset_peak_memory_stats()
    sec = time_steps(step, args.warmup, args.iters)
    with torch.no_grad():
        fwd = time_steps(forward, 2, args.iters)
    out = {
        "model": "duet-base", "params": params, "tokens": tokens, "step_s": sec,
        "tokens_per_s": tokens / sec, "mfu": 3 * flops / sec / peak_flops(),
        "forward_mfu": flops / fwd / peak_flops(), "forward_flops": flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip
    if args.profile:
        out["profile"] = profile_table(step)
    torch.cuda.empty_cache()
    return out


def wan_case(width: int, height: int, frames: int, match_params: int, args) -> dict:
    from diffusers import WanTransformer3DModel

    device = torch.device("cuda")
    heads, head_dim, layers = 12, 128, 30  # Wan 2.1 1.3B
    # ffn width scaled so the parameter count matches Duet base's.
    probe = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                  ffn_dim=8960, num_layers=1, text_dim=4096)  # fmt: skip
    per_layer_attn = sum(p.numel() for n, p in probe.blocks[0].named_parameters() if "ffn" not in n)
    rest = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("blocks."))
    dim = heads * head_dim
    ffn = max(256, int((match_params - rest) / layers - per_layer_attn) // (2 * dim) // 256 * 256)
    model = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                  ffn_dim=ffn, num_layers=layers, text_dim=4096).to(device)  # fmt: skip
    model.enable_gradient_checkpointing() if args.checkpointing else None
    params = sum(p.numel() for p in model.parameters())
    n_lat = 1 + (frames - 1) // 4
    x = torch.randn(1, 16, n_lat, height // 8, width // 8, device=device)
    ctx = torch.randn(1, 512, 4096, device=device)
    t = torch.tensor([500], device=device)
    tokens = n_lat * (height // 16) * (width // 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, ctx, return_dict=False)[0]
        return out.float().square().mean()

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = forward_flops(forward)
    torch.cuda.reset_peak_memory_stats()
    sec = time_steps(step, args.warmup, args.iters)
    with torch.no_grad():
        fwd = time_steps(forward, 2, args.iters)
    out = {
        "model": f"wan2.1-layout ffn={ffn}", "params": params, "tokens": tokens, "step_s": sec,
        "tokens_per_s": tokens / sec, "mfu": 3 * flops / sec / peak_flops(),
        "forward_mfu": flops / fwd / peak_flops(), "forward_flops": flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip
    torch.cuda.empty_cache()
    return out


def profile_table(step, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p81,256p49")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    for name in args.shapes.split(","):
        w, h, f = SHAPES[name]
        duet = duet_case(w, h, f, args)
        row = {"shape": name, "duet": duet}
        try:
            row["wan"] = wan_case(w, h, f, duet["params"], args)
            row["duet_over_wan_tokens_per_s"] = duet["tokens_per_s"] / row["wan"]["tokens_per_s"]
        except ImportError as err:
            row["wan"] = f"not run: {err}"
        results["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str, indent=1), flush=True)
        if args.out:  # after every shape: a run cut short still leaves its rows
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
