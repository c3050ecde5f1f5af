"""Inference latency on one GPU: per DiT evaluation, per clip and per stage.

One command on the GPU machine::

    python3 bench/infer_gpu.py --presets base --size 832x480 --duration 5 \\
        --out $OUT/infer_gpu.json

(``core.media`` imports PyAV, which the GPU image lacks: carry its wheel and put it
on PYTHONPATH first, as the device README says for any missing package.)

For each preset (``compact`` from ``checkpoints/default`` when present, else random
weights; ``base`` random weights), at ``--size`` (default: the preset's) and a
``--duration`` clip with audio, it times one DiT evaluation at batch 1 and at batch
2 (a text-guided step: prompt and null prompt in one batch), then whole clips
through :func:`model.generate.generate` (noise -> sampler -> VAE decode -> vocoder or
Griffin-Lim), split by stage (text encoder, DiT, video VAE decode, audio VAE
decode to mel, Griffin-Lim / neural vocoder, the rest):

- ``full``: the default request (``--full-steps`` Heun steps with text guidance);
- ``fast``: what a distilled Fast student runs (``--fast-steps`` Euler steps, no
  guidance pass: the pipeline is marked as a student with random weights, so the
  speed is the student's, not its quality), with Griffin-Lim and with the neural
  vocoder (random weights).

The text encoder's weights do not travel to the GPU machine: random token
embeddings stand in for it, so the text stage here is near zero (the encoder is a
MiniLM, milliseconds on a GPU). Real-time factor = seconds of output per second.

The video VAE decodes on a GPU as :class:`model.video_vae.FastDecode` says (planned
chunks and tiles, bf16); ``--no-fast-decode`` times the CPU path's float32 decode
with the config's chunks and tiles instead, and ``--compare-decode`` times the Fast
clip both ways. ``--decode-sweep`` first times the decode alone for each option
(``--sweep-preset`` at ``--size``), each against the float32 config decode: max and
mean difference of the frames in 8-bit levels; the decoder's zero-initialised
residual convolutions get random weights there, so the check sees every layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.checkpoint import default_checkpoint  # noqa: E402
from model.configs import get_config  # noqa: E402
from model.dit import TextConditioning  # noqa: E402
from model.pipeline import DuetPipeline  # noqa: E402

T0 = time.perf_counter()


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


class StageTimer:
    """Wall time per stage, the device synchronised around every timed call."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, attr: str, stage: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1
            return out

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def frame_levels(x: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] -> 8-bit levels (as :func:`model.video_vae.tensor_to_frames`)."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round()


def decode_sweep(args) -> list[dict]:
    """Video VAE decode alone, option by option, against the float32 config decode."""
    from model.video_vae import FastDecode, VideoVAE

    cfg = get_config(args.sweep_preset)
    if args.size:
        cfg.width, cfg.height = (int(x) for x in args.size.split("x"))
    vcfg = cfg.video_vae
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):  # CPU: a smoke run of the sweep
        vae = VideoVAE(vcfg).eval()
        for m in vae.decoder.modules():
            if hasattr(m, "conv2"):  # zero-initialised: the check would skip these layers
                m.conv2.conv.reset_parameters()
        n = cfg.num_latent_frames(cfg.frames_for_duration(args.duration))
        sf = vcfg.spatial_factor
        z = torch.randn(1, vcfg.latent_channels, n, cfg.height // sf, cfg.width // sf)
    plan = vae.decode_plan(*z.shape[2:])
    print(f"decode sweep: z {tuple(z.shape)}, plan (chunk, tile) = {plan}", flush=True)
    config_tiles = (vcfg.decode_chunk_latent_frames, vcfg.decode_tile_latent_px)
    variants = [
        ("fp32_config", None, None),  # today's decode: the reference
        ("fp32_plan", FastDecode(bf16=False, compile=False), None),
        ("bf16_config", FastDecode(plan=False, compile=False), None),
        ("bf16_plan", FastDecode(compile=False), None),
        ("bf16_plan_channels_last", FastDecode(channels_last=True, compile=False), None),
        ("bf16_plan_cudnn_benchmark", FastDecode(cudnn_benchmark=True, compile=False), None),
        (
            "bf16_plan_cl_benchmark",
            FastDecode(channels_last=True, cudnn_benchmark=True, compile=False),
            None,
        ),
        ("bf16_square32_whole_clip", FastDecode(plan=False, compile=False), (0, 32)),
        ("bf16_square48_whole_clip", FastDecode(plan=False, compile=False), (0, 48)),
    ]
    if args.sweep_risky:
        variants += [
            ("bf16_untiled", FastDecode(plan=False, compile=False), (0, 0)),
            ("bf16_plan_compile", FastDecode(compile=True), None),  # the default
        ]
    if args.sweep_variants:  # the reference always runs first
        keep = set(args.sweep_variants.split(","))
        variants = variants[:1] + [v for v in variants[1:] if v[0] in keep]
    rows, ref = [], None
    for name, opts, tiles in variants:
        if time.perf_counter() - T0 > args.sweep_budget_s:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        vcfg.decode_chunk_latent_frames, vcfg.decode_tile_latent_px = tiles or config_tiles
        if opts is not None:
            vae.__dict__["_fast_decode"] = opts
        row = {"variant": name}
        try:
            times = []
            for _ in range(1 + args.sweep_iters):  # first call warms (cuDNN, compile)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                start = time.perf_counter()
                with torch.no_grad():
                    out = vae.decode(z, fast=opts is not None)
                sync()
                times.append(time.perf_counter() - start)
            row |= {"warm_s": round(times[0], 3), "decode_s": round(min(times[1:]), 3),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}  # fmt: skip
            if ref is None:
                ref = out
            diff = (frame_levels(out) - frame_levels(ref)).abs()
            rel = float((out - ref).norm() / ref.norm())
            row |= {"max_diff_levels": int(diff.max()), "mean_diff_levels": round(float(diff.mean()), 4),
                    "frac_over_2_levels": float((diff > 2).float().mean()), "rel_l2": rel}  # fmt: skip
            del out, diff
        except Exception as e:  # noqa: BLE001 - a failing option is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        vcfg.decode_chunk_latent_frames, vcfg.decode_tile_latent_px = config_tiles
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def time_clip(pipe: DuetPipeline, timer: StageTimer, request, quality: str) -> dict:
    from model.generate import generate

    timer.reset()
    sync()
    start = time.perf_counter()
    result = generate(request, pipeline=pipe, quality=quality)
    sync()
    sec = time.perf_counter() - start
    stages = {k: round(v, 3) for k, v in timer.seconds.items()}
    stages["other"] = round(sec - sum(timer.seconds.values()), 3)
    return {
        "clip_s": round(sec, 3), "real_time_factor": round(result.clip.duration_s / sec, 3),
        "network_evals": result.metadata["network_evals"], "steps": result.metadata["steps"],
        "sampler": result.metadata["sampler"], "vocoder": result.metadata["vocoder"],
        "stages_s": stages, "dit_calls": timer.calls.get("dit", 0),
    }  # fmt: skip


def bench(pipe: DuetPipeline, args) -> dict:
    from model.generate import GenerationRequest

    cfg = pipe.config
    device = pipe.device
    n_lat = cfg.num_latent_frames(cfg.frames_for_duration(args.duration))
    sf = cfg.video_vae.spatial_factor
    p = cfg.dit.video_patch
    tokens = n_lat * (cfg.height // sf // p) * (cfg.width // sf // p)
    tokens += n_lat * cfg.audio_latents_per_video_latent
    out = {"preset": cfg.name, "size": f"{cfg.width}x{cfg.height}", "tokens": tokens,
           "duration_s": args.duration}  # fmt: skip

    for batch in (1, 2):
        video = torch.randn(batch, cfg.video_vae.latent_channels, n_lat, cfg.height // sf,
                            cfg.width // sf, device=device)  # fmt: skip
        audio = torch.randn(batch, cfg.audio_vae.latent_channels,
                            n_lat * cfg.audio_latents_per_video_latent, device=device)  # fmt: skip
        tokens_, mask = pipe.text_encoder.encode(["a red ball bounces"] * batch)
        text = TextConditioning(tokens_.to(device), mask.to(device))
        t = torch.full((batch,), 0.5, device=device)
        with torch.no_grad():
            for _ in range(2):
                pipe.dit(video, audio, t, text)
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                pipe.dit(video, audio, t, text)
            sync()
        out[f"dit_eval_batch{batch}_s"] = round((time.perf_counter() - start) / args.iters, 4)

    pipe.video_vae.fast_decode.compile = args.decode_compile
    # --no-fast-decode / --compare-decode: the float32 config decode (the CPU path).
    legacy = {"on": not args.fast_decode}
    decode = pipe.video_vae.decode
    pipe.video_vae.decode = lambda z, fast=None: decode(z, fast=False if legacy["on"] else fast)

    timer = StageTimer()
    timer.wrap(pipe, "encode_text", "text")
    timer.wrap(pipe.dit, "forward", "dit")
    timer.wrap(pipe.video_vae, "decode", "video_vae_decode")
    timer.wrap(pipe.audio_vae, "decode_mel", "audio_vae_decode")
    timer.wrap(pipe.audio_vae, "mel_to_waveform", "vocoder")

    prompt = "a red ball bounces"
    fast_req = GenerationRequest(prompt=prompt, duration_s=args.duration, steps=args.fast_steps)
    pipe.fast = {"steps": [args.fast_steps], "default_steps": args.fast_steps,
                 "sampler": "euler"}  # fmt: skip
    time_clip(pipe, timer, fast_req, "fast")  # warm: VAE, Griffin-Lim, kernels
    out["fast"] = time_clip(pipe, timer, fast_req, "fast")
    out["fast"]["fast_decode"] = not legacy["on"]
    if args.compare_decode:
        legacy["on"] = not legacy["on"]
        out["fast_other_decode"] = time_clip(pipe, timer, fast_req, "fast")
        out["fast_other_decode"]["fast_decode"] = not legacy["on"]
        legacy["on"] = not legacy["on"]
    pipe.use_neural_vocoder = True
    out["fast_neural_vocoder"] = time_clip(pipe, timer, fast_req, "fast")
    pipe.use_neural_vocoder = False
    if args.full_steps:
        full_req = GenerationRequest(prompt=prompt, duration_s=args.duration,
                                     steps=args.full_steps, sampler="heun")  # fmt: skip
        out["full"] = time_clip(pipe, timer, full_req, "full")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="compact,base")
    parser.add_argument("--size", default="", help="WxH (default: each preset's)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--full-steps", type=int, default=20, help="0: skip the Full clip")
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="video VAE decode as FastDecode says (off: the fp32 CPU path)")  # fmt: skip
    parser.add_argument("--decode-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the video decoder (FastDecode.compile)")  # fmt: skip
    parser.add_argument("--compare-decode", action="store_true",
                        help="time the Fast clip with the other decode too")  # fmt: skip
    parser.add_argument("--decode-sweep", action="store_true")
    parser.add_argument("--sweep-preset", default="base")
    parser.add_argument("--sweep-iters", type=int, default=1)
    parser.add_argument("--sweep-risky", action="store_true",
                        help="also untiled (> 2^31 elements) and torch.compile")  # fmt: skip
    parser.add_argument("--sweep-budget-s", type=float, default=1e9,
                        help="skip sweep variants once the run is this old")  # fmt: skip
    parser.add_argument("--sweep-variants", default="", help="comma list (default: all)")
    parser.add_argument("--sweep-only", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "argv": sys.argv[1:], "runs": []}  # fmt: skip

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    if args.decode_sweep:
        results["decode_sweep"] = decode_sweep(args)
        save()
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.sweep_only:
        return
    for name in args.presets.split(","):
        cfg = get_config(name)
        if args.size:
            cfg.width, cfg.height = (int(x) for x in args.size.split("x"))
            cfg.validate()
        text = RandomText(cfg.text.embed_dim, cfg.text.max_tokens)
        shipped = default_checkpoint()
        if name == "compact" and shipped and not args.size:
            pipe = DuetPipeline.from_checkpoint(shipped, text_encoder=text, device=device)
        else:
            with torch.device(device):  # initialised on the device: seconds, not minutes
                pipe = DuetPipeline(cfg, text)
            pipe = pipe.to(device).eval()
        if args.bf16 and device == "cuda":
            bf16_dit(pipe)
        row = bench(pipe, args)
        results["runs"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        save()
        del pipe


if __name__ == "__main__":
    main()
