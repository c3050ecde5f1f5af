"""Training-step speed of the ``base`` DiT on one GPU, against diffusers' Wan 2.1 DiT.

One command on the GPU machine (bf16 autocast, random weights, synthetic latents)::

    python3 bench/train_gpu.py --shapes 480p81 --batch 1 --ac selective --profile
    python3 bench/train_gpu.py --sweep issue25 --out $OUT/train_gpu.json
    # an earlier model/dit.py side by side (cases with src=old):
    #   git show REV:model/dit.py > .bench_old/dit_old.py   (ignored; carry it)
    # Wan column: carry diffusers' wheel (device README) and put it on PYTHONPATH.

A case is one model, shape, batch and set of switches (``--case "shape=480p81
batch=1 ac=none"``, repeatable, or a named ``--sweep``; without either, the plain
flags make one Duet case per shape). For each it times the train step (forward +
backward + fused AdamW) and a no-grad forward and reports:

- tokens/s: video + audio latent tokens (Wan: video) per second of train step;
- MFU = 3 x forward FLOPs / step time / peak, against two peaks: the card's dense
  bf16 spec (989.5 TFLOP/s, H100 SXM and H200) and a bf16 8192^3 matmul measured in
  the same run (``matmul_tflops``); forward FLOPs by ``torch.utils.flop_counter``
  (matmuls 2mnk, attention 4 N^2 d per head pair); checkpointing's recomputation
  is not counted, as MFU conventions go;
- peak memory (``torch.cuda.max_memory_allocated``), and with ``profile=1`` the
  top CUDA kernels of one step plus their time by kind (attention, GEMM, fused
  Triton, other elementwise).

Switches of a Duet case: ``ac`` none | full | selective (model.parallelize),
``hd`` head width (0: the preset's; the parameter count does not change),
``compile`` (torch.compile of each block), ``fuse`` (model.dit.FUSED_REGIONS),
``sdpa`` (cudnn | flash | efficient first), ``src=old`` (the DiT class from
``--old-dit``). A case that runs out of memory is recorded as such.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model.dit as dit_module  # noqa: E402
from model.configs import get_config  # noqa: E402
from model.parallelize import ParallelConfig, parallelize_dit  # noqa: E402

SPEC_PEAK_BF16 = 989.5e12  # dense bf16, H100 SXM and H200 (datasheet)
SHAPES = {"480p81": (832, 480, 81), "256p49": (256, 256, 49)}


@dataclass
class Case:
    model: str = "duet"  # duet | wan
    shape: str = "480p81"  # a SHAPES name or WxHxF
    batch: int = 1
    ac: str = "full"  # none | full | selective
    hd: int = 0  # head width; 0: the preset's
    compile: bool = False
    fuse: bool = True
    sdpa: str = ""  # "" (PyTorch's order) | cudnn | flash | efficient
    src: str = ""  # "" | old
    profile: bool = False
    label: str = ""

    @classmethod
    def parse(cls, text: str, defaults: Case) -> Case:
        values = asdict(defaults)
        types = {f.name: type(getattr(defaults, f.name)) for f in fields(cls)}
        for item in text.split():
            key, _, value = item.partition("=")
            if key not in types:
                raise ValueError(f"unknown case key {key!r} in {text!r}")
            kind = types[key]
            values[key] = value in ("1", "true", "yes") if kind is bool else kind(value)
        case = cls(**values)
        if not case.label:
            case.label = text.replace(" ", ",")
        return case


# The issue-25 sweep: old code (64- and 128-wide heads) against the new, each AC mode,
# compile and the SDPA backends, then the Wan layout; at both shapes.
SWEEPS = {
    "issue25-480": [
        "src=old hd=64 ac=full label=old-hd64-full",
        "src=old ac=full label=old-hd128-full",
        "fuse=0 ac=full label=new-eager-full",
        "ac=full label=new-full",
        "ac=selective label=new-selective",
        "ac=none profile=1 label=new-none",
        "ac=none sdpa=cudnn label=new-none-cudnn",
        "ac=none sdpa=flash label=new-none-flash",
        "model=wan ac=full label=wan-full",
        "model=wan ac=none label=wan-none",
        "ac=none compile=1 label=new-none-compile",
    ],
    "issue25-256": [
        "src=old hd=64 ac=full label=old-hd64-full",
        "ac=full label=new-full",
        "ac=selective label=new-selective",
        "ac=none profile=1 label=new-none",
        "ac=none sdpa=flash label=new-none-flash",
        "model=wan ac=full label=wan-full",
        "model=wan ac=none label=wan-none",
    ],
    # CPU check of every code path (tiny preset, a few tokens; --device cpu --preset tiny).
    "smoke": [
        "src=old ac=full label=old",
        "ac=full label=full",
        "ac=selective label=selective",
        "ac=none profile=1 label=none",
        "model=wan ac=full label=wan-full",
    ],
}
SWEEP_SHAPES = {"issue25-480": ("480p81", 1), "issue25-256": ("256p49", 8)}


def parse_shape(name: str) -> tuple[int, int, int]:
    if name in SHAPES:
        return SHAPES[name]
    w, h, f = (int(x) for x in name.split("x"))
    return w, h, f


# -- measurement ---------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds of one call after warm-up (each call synchronised)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(device: torch.device, n: int = 8192) -> float | None:
    """Measured bf16 matmul rate (FLOP/s) on random data: median of 20 after warm-up."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


def forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_")),
    ("triton (fused)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other (eager elementwise, norms, copies, optimizer)"


def profile_step(step, rows: int = 18) -> dict:
    """One step under the profiler: the top kernels and the CUDA time by kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = {}
    total = 0.0
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        us = evt.time_range.elapsed_us()
        per_kind[kernel_kind(evt.name)] = per_kind.get(kernel_kind(evt.name), 0.0) + us
        total += us
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)
    shares = {k: round(v / total, 4) for k, v in sorted(per_kind.items(), key=lambda x: -x[1])}
    return {"kernel_ms": round(total / 1e3, 1), "share_by_kind": shares, "table": table}


def sdpa_context(name: str):
    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    first = order[name]
    rest = [b for b in order.values() if b != first] + [SDPBackend.MATH]
    return sdpa_kernel([first, *rest], set_priority=True)


# -- models --------------------------------------------------------------------------
def load_dit_class(case: Case, args):
    if case.src == "old":
        spec = importlib.util.spec_from_file_location("dit_old", args.old_dit)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return dit_module


def set_head_dim(cfg, hd: int) -> None:
    """Same widths, heads of hd channels (the parameter count does not change)."""
    d = cfg.dit
    inner = d.cross_modal_heads * d.cross_modal_head_dim
    for branch in (d.video, d.audio):
        branch.heads = branch.dim // hd
    d.cross_modal_heads, d.cross_modal_head_dim = inner // hd, hd
    cfg.validate()


def build_duet(case: Case, args, device: torch.device):
    module = load_dit_class(case, args)
    cfg = get_config(args.preset)
    if case.hd:
        set_head_dim(cfg, case.hd)
    width, height, frames = parse_shape(case.shape)
    cfg.width, cfg.height = width, height
    with torch.device(device):  # initialised on the GPU: seconds, not a CPU minute
        model = module.DualBranchDiT(cfg)
    b = case.batch
    n_lat = cfg.num_latent_frames(frames)
    sf = cfg.video_vae.spatial_factor
    video = torch.randn(
        b, cfg.video_vae.latent_channels, n_lat, height // sf, width // sf, device=device
    )
    audio = torch.randn(
        b, cfg.audio_vae.latent_channels, n_lat * cfg.audio_latents_per_video_latent, device=device
    )
    text = module.TextConditioning(
        torch.randn(b, cfg.text.max_tokens, cfg.text.embed_dim, device=device),
        torch.ones(b, cfg.text.max_tokens, dtype=torch.bool, device=device),
    )
    t = torch.rand(b, device=device)
    p = cfg.dit.video_patch
    tokens = b * (n_lat * (height // sf // p) * (width // sf // p) + audio.shape[-1])

    def forward(m=model):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pv, pa = m(video, audio, t, text)
        return pv.float().square().mean() + pa.float().square().mean()

    def prepare():
        parallelize_dit(model, ParallelConfig(activation_checkpointing=case.ac,
                                              compile=case.compile))  # fmt: skip
        return model

    info = {"heads": [cfg.dit.video.heads, cfg.dit.audio.heads, cfg.dit.cross_modal_heads]}
    return model, forward, prepare, tokens, info


def build_wan(case: Case, args, device: torch.device, match_params: int):
    from diffusers import WanTransformer3DModel

    heads, head_dim, layers = args.wan_heads, args.wan_head_dim, args.wan_layers
    kw = dict(num_attention_heads=heads, attention_head_dim=head_dim, text_dim=4096)
    # ffn width chosen so the parameter count matches Duet's (Wan 2.1 1.3B: 8960).
    probe = WanTransformer3DModel(ffn_dim=8960, num_layers=1, **kw)
    per_layer_attn = sum(p.numel() for n, p in probe.blocks[0].named_parameters() if "ffn" not in n)
    rest = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("blocks."))
    dim = heads * head_dim
    ffn = max(256, int((match_params - rest) / layers - per_layer_attn) // (2 * dim) // 256 * 256)
    with torch.device(device):
        model = WanTransformer3DModel(ffn_dim=ffn, num_layers=layers, **kw)
    width, height, frames = parse_shape(case.shape)
    b = case.batch
    n_lat = 1 + (frames - 1) // 4
    x = torch.randn(b, 16, n_lat, height // 8, width // 8, device=device)
    ctx = torch.randn(b, 512, 4096, device=device)
    t = torch.full((b,), 500, device=device)
    tokens = b * n_lat * (height // 16) * (width // 16)

    def forward(m=model):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = m(x, t, ctx, return_dict=False)[0]
        return out.float().square().mean()

    def prepare():
        if case.ac == "full":
            model.enable_gradient_checkpointing()
        elif case.ac != "none":
            raise ValueError(f"Wan case: ac must be none or full, got {case.ac!r}")
        return model

    return model, forward, prepare, tokens, {"ffn_dim": ffn}


# -- one case ------------------------------------------------------------------------
def run_case(case: Case, args, device, ceiling, flop_cache: dict, duet_params: dict) -> dict:
    row = {"case": asdict(case)}
    dit_module.FUSED_REGIONS = case.fuse
    try:
        if case.model == "duet":
            model, forward, prepare, tokens, info = build_duet(case, args, device)
        else:
            match = duet_params.get(args.preset) or args.wan_match_params
            model, forward, prepare, tokens, info = build_wan(case, args, device, match)
        params = sum(p.numel() for p in model.parameters())
        if case.model == "duet":
            duet_params.setdefault(args.preset, params)
        key = (case.model, case.shape, case.batch)
        if key not in flop_cache:  # FLOPs do not depend on the switches: count once
            fused, dit_module.FUSED_REGIONS = dit_module.FUSED_REGIONS, False
            flop_cache[key] = forward_flops(forward)
            dit_module.FUSED_REGIONS = fused
        flops = flop_cache[key]
        model = prepare()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with sdpa_context(case.sdpa):
                forward().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def forward_only():
            with torch.no_grad(), sdpa_context(case.sdpa):
                forward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        sec = time_steps(step, args.warmup, args.iters, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        # A compiled model would compile its no-grad graphs again: minutes, skipped.
        fwd = None if case.compile else time_steps(forward_only, 1, args.iters, device)
        spec = args.spec_peak
        row.update({
            "params": params, "tokens": tokens, "step_s": sec, "tokens_per_s": tokens / sec,
            "forward_flops": flops, "mfu_spec": 3 * flops / sec / spec,
            "mfu_ceiling": 3 * flops / sec / ceiling if ceiling else None,
            "forward_s": fwd, "forward_mfu_spec": flops / fwd / spec if fwd else None,
            "peak_memory_gib": peak, "wall_s": time.perf_counter() - start, **info,
        })  # fmt: skip
        if case.profile and device.type == "cuda":
            row["profile"] = profile_step(step)
            print(row["profile"]["table"], flush=True)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0][:160]}"
    except Exception as err:  # one broken case must not lose the sweep's other rows
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    finally:
        model = forward = prepare = opt = step = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def summary(rows: list[dict]) -> str:
    best_wan: dict = {}
    for r in rows:
        c = r["case"]
        if c["model"] == "wan" and "tokens_per_s" in r:
            k = (c["shape"], c["batch"])
            best_wan[k] = max(best_wan.get(k, 0.0), r["tokens_per_s"])
    head = (f"{'case':22} {'shape':8} {'b':>2} {'s/step':>7} {'tok/s':>8} {'MFU':>6} "
            f"{'MFU/ceil':>8} {'fwdMFU':>6} {'GiB':>6} {'/Wan':>5}")  # fmt: skip
    lines = [head]
    for r in rows:
        c = r["case"]
        if "error" in r:
            lines.append(f"{c['label'][:22]:22} {c['shape']:8} {c['batch']:>2} {r['error'][:60]}")
            continue
        wan = best_wan.get((c["shape"], c["batch"]))
        ratio = f"{r['tokens_per_s'] / wan:5.2f}" if wan and c["model"] == "duet" else "    -"
        ceil = f"{r['mfu_ceiling']:8.1%}" if r["mfu_ceiling"] else "       -"
        fwd_mfu = f"{r['forward_mfu_spec']:6.1%}" if r["forward_mfu_spec"] else "     -"
        lines.append(
            f"{c['label'][:22]:22} {c['shape']:8} {c['batch']:>2} {r['step_s']:7.3f} "
            f"{r['tokens_per_s']:8.0f} {r['mfu_spec']:6.1%} {ceil} "
            f"{fwd_mfu} {r['peak_memory_gib']:6.1f} {ratio}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="480p81,256p49", help="names or WxHxF")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ac", default="full", help="none | full | selective")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--wan", action="store_true", help="also the Wan layout per shape")
    parser.add_argument("--case", action="append", default=[], help='e.g. "ac=none batch=8"')
    parser.add_argument("--sweep", default="", help=f"one of {sorted(SWEEPS)}, or a,b")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--old-dit", default=".bench_old/dit_old.py")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--spec-peak", type=float, default=SPEC_PEAK_BF16)
    parser.add_argument("--wan-heads", type=int, default=12)
    parser.add_argument("--wan-head-dim", type=int, default=128)
    parser.add_argument("--wan-layers", type=int, default=30)
    parser.add_argument("--wan-match-params", type=int, default=1_790_000_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    # Fused regions and compiled blocks meet several shapes and grad modes: no fallback.
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64

    defaults = Case(ac=args.ac, compile=args.compile, profile=args.profile, batch=args.batch)
    cases = [Case.parse(text, defaults) for text in args.case]
    for sweep in filter(None, args.sweep.split(",")):
        shape, batch = SWEEP_SHAPES.get(sweep, (args.shapes.split(",")[0], args.batch))
        base = Case(shape=shape, batch=batch)
        cases += [Case.parse(text, base) for text in SWEEPS[sweep]]
    if not cases:
        for shape in args.shapes.split(","):
            cases.append(Case.parse(f"shape={shape} label=duet", defaults))
            if args.wan:
                cases.append(Case.parse(f"shape={shape} model=wan label=wan", defaults))
    if any(c.src == "old" for c in cases) and not os.path.exists(args.old_dit):
        print(f"no {args.old_dit}: skipping src=old cases", flush=True)
        cases = [c for c in cases if c.src != "old"]

    ceiling = matmul_ceiling(device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "spec_peak_flops": args.spec_peak, "matmul_tflops": ceiling / 1e12 if ceiling else None,
        "argv": sys.argv[1:], "runs": [],
    }  # fmt: skip
    print(f"{results['device']}, torch {torch.__version__}, bf16 matmul ceiling "
          f"{results['matmul_tflops'] or 0:.0f} TFLOP/s", flush=True)  # fmt: skip
    flop_cache: dict = {}
    duet_params: dict = {}
    for case in cases:
        row = run_case(case, args, device, ceiling, flop_cache, duet_params)
        results["runs"].append(row)
        brief = {k: v for k, v in row.items() if k != "profile"}
        print(json.dumps(brief, default=str), flush=True)
        if args.out:  # after every case: a run cut short still leaves its rows
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)
    print(summary(results["runs"]), flush=True)


if __name__ == "__main__":
    main()
