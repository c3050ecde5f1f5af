"""Inference latency on one GPU: per DiT step and per whole clip, side by side.

One command on the GPU machine::

    python3 bench/infer_gpu.py --out $OUT/infer_gpu.json

For the shipped preset (``compact``, from ``checkpoints/default`` when present, else
random weights) and ``base`` (random weights), at each preset's default resolution
and a 2 s clip: the time of one guided sampler step (text guidance = 2 DiT
evaluations; Heun = 2 per step) and of the whole clip through
:func:`model.generate.generate` (noise -> sampler -> VAE decode -> vocoder or
Griffin-Lim), for Full (``--full-steps``, Heun) and Fast (``--fast-steps``, Euler).
Fast here is the same weights sampled with fewer steps: the distilled Fast model
does not exist yet, so the ratio measured is the sampler's, not a distilled
model's. Real-time factor = seconds of output per second of compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.checkpoint import default_checkpoint  # noqa: E402
from model.configs import get_config  # noqa: E402
from model.dit import TextConditioning  # noqa: E402
from model.pipeline import DuetPipeline  # noqa: E402


class RandomText:
    """Stands in for the text encoder (its weights do not travel to the GPU machine)."""

    def __init__(self, dim: int, tokens: int):
        self.embed_dim, self.tokens = dim, tokens

    def encode(self, prompts):
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(len(prompts), self.tokens, self.embed_dim, generator=g)
        return emb, torch.ones(len(prompts), self.tokens, dtype=torch.bool)


def bf16_dit(pipe: DuetPipeline) -> None:
    """The DiT under bf16 autocast (VAEs, vocoder and Griffin-Lim stay fp32)."""
    forward = pipe.dit.forward

    def forward_bf16(*args, **kwargs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return tuple(o.float() for o in out)

    pipe.dit.forward = forward_bf16


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(pipe: DuetPipeline, args) -> dict:
    from model.generate import GenerationRequest, generate

    cfg = pipe.config
    device = pipe.device
    n_lat = cfg.num_latent_frames(cfg.frames_for_duration(args.duration))
    sf = cfg.video_vae.spatial_factor
    video = torch.randn(
        1, cfg.video_vae.latent_channels, n_lat, cfg.height // sf, cfg.width // sf, device=device
    )
    audio = torch.randn(
        1, cfg.audio_vae.latent_channels, n_lat * cfg.audio_latents_per_video_latent, device=device
    )
    tokens, mask = pipe.text_encoder.encode(["a red ball bounces"])
    text = TextConditioning(tokens.to(device), mask.to(device))
    t = torch.full((1,), 0.5, device=device)

    @torch.no_grad()
    def one_eval():
        pipe.dit(video, audio, t, text)

    for _ in range(3):
        one_eval()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        one_eval()
    sync()
    per_eval = (time.perf_counter() - start) / args.iters
    out = {"preset": cfg.name, "size": f"{cfg.width}x{cfg.height}", "dit_eval_s": per_eval}
    for mode, steps, sampler in (
        ("full", args.full_steps, "heun"),
        ("fast", args.fast_steps, "euler"),
    ):
        evals = steps * (2 if sampler == "heun" else 1) * 2  # x2: text guidance
        request = GenerationRequest(prompt="a red ball bounces", duration_s=args.duration,
                                    steps=steps, sampler=sampler)  # fmt: skip
        generate(request, pipeline=pipe)  # warm
        sync()
        start = time.perf_counter()
        clip = generate(request, pipeline=pipe).clip
        sync()
        sec = time.perf_counter() - start
        out[mode] = {
            "steps": steps, "sampler": sampler, "step_s": per_eval * evals / steps,
            "clip_s": sec, "real_time_factor": clip.duration_s / sec,
            "dtype": "bf16 DiT" if args.bf16 else "fp32",
        }  # fmt: skip
    out["fast_speedup_per_clip"] = out["full"]["clip_s"] / out["fast"]["clip_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="compact,base")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--full-steps", type=int, default=20)
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "runs": []}
    for name in args.presets.split(","):
        cfg = get_config(name)
        text = RandomText(cfg.text.embed_dim, cfg.text.max_tokens)
        shipped = default_checkpoint()
        if name == "compact" and shipped:
            pipe = DuetPipeline.from_checkpoint(shipped, text_encoder=text, device=device)
        else:
            pipe = DuetPipeline(cfg, text).to(device).eval()
        if args.bf16 and device == "cuda":
            bf16_dit(pipe)
        row = bench(pipe, args)
        results["runs"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        del pipe
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
