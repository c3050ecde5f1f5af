"""Curation throughput, side by side in one run on the same real-format files.

The corpus is made here with ffmpeg and espeak-ng, like footage from the web: 720p
and 1080p H.264 (x264 ``veryfast``, its default GOP with keyframes at scene cuts)
plus AAC speech, shots of 3-9 s joined by hard cuts. Measured on it:

1. **decode floor**: decode every file's video to full-size RGB frames and its
   audio, nothing else (PyAV, threaded).
2. **curate flow**: the whole ``curate`` flow (validate, streaming decode at
   analysis size, shots, clips stream-copied or re-encoded, quality, sync,
   captions, versioned manifest, report) on Ray with Prefect, speech off.
3. **naive chain**: what a user would script per file:
   ``scenedetect -i FILE detect-adaptive split-video`` (PySceneDetect's CLI + ffmpeg).

Each is reported as media-seconds per CPU-second. CPU seconds are summed over
every process involved: this process, Ray's raylet/GCS/workers and Prefect's
server for the flow (read from ``/proc`` before and after the run, so their start-
up is excluded and everything the run itself costs is included), and the CLI and
its ffmpeg children for the naive chain. The flow's per-stage rates come from its
workers' own accounting.

``--scale N`` instead curates N small sources (copies of a few short files under
distinct names) and samples the driver's resident memory as sources finish, to
show that it stays flat and the manifest is complete.

    python -m bench.curation --videos 4 --seconds 30 --workers 2
    python -m bench.curation --scale 1000 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from core import media, storage

SENTENCES = (
    "The camera follows the red car down the empty street at dawn.",
    "A woman opens the door and calls her brother inside for dinner.",
    "Rain falls on the river while the boats wait by the bridge.",
    "The crowd cheers as the runner crosses the line in the last second.",
)
PATTERNS = ("testsrc2", "smptehdbars", "rgbtestsrc", "testsrc", "yuvtestsrc", "pal100bars")


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and all its descendants, per pid (Linux)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = _clock_ticks()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Fields after the parenthesised command name (which may hold spaces).
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in after.items())


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-nostdin", *args], check=True)


def make_source(path: str, size: str, seconds: float, seed: int, work: str) -> str:
    """Shots of 3-9 s (test patterns with a moving box) cut hard, espeak speech."""
    import random

    rng = random.Random(seed)
    wav = os.path.join(work, f"speech-{seed}.wav")
    text = " ".join(rng.sample(SENTENCES, len(SENTENCES)) * 4)
    subprocess.run(["espeak-ng", "-s", "150", "-w", wav, text], check=True)
    lengths = []
    while sum(lengths) < seconds:
        lengths.append(rng.uniform(3.0, 9.0))
    lengths[-1] -= sum(lengths) - seconds
    inputs, chains = [], []
    for i, length in enumerate(lengths):
        pattern = PATTERNS[(seed + i) % len(PATTERNS)]
        inputs += ["-f", "lavfi", "-t", f"{max(length, 0.5):.3f}", "-i", f"{pattern}=s={size}:r=25"]
        chains.append(f"[{i}]")
    graph = (
        "".join(chains)
        + f"concat=n={len(lengths)}:v=1:a=0,"
        + "drawbox=x='mod(t*240,iw-120)':y='ih/3':w=120:h=120:c=yellow:t=fill[v];"
        + f"[{len(lengths)}]apad,atrim=0:{seconds}[a]"
    )
    _ffmpeg(
        *inputs, "-i", wav, "-filter_complex", graph, "-map", "[v]", "-map", "[a]",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-c:a", "aac", "-b:a", "96k",
        path,
    )  # fmt: skip
    return path


def make_corpus(root: str, videos: int, seconds: float) -> list[str]:
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="speech-")
    uris = []
    for i in range(videos):
        size = "1280x720" if i % 2 == 0 else "1920x1080"
        uris.append(make_source(os.path.join(root, f"web_{i:03d}.mp4"), size, seconds, i, work))
    shutil.rmtree(work, ignore_errors=True)
    return uris


def bench_decode(uris: list[str]) -> dict[str, float]:
    me = os.getpid()
    before = process_tree_cpu(me)
    t0 = time.perf_counter()
    media_s = 0.0
    for uri in uris:
        frames = 0
        fps = media.probe_media(uri, check_frame_rate=False).fps
        for _ in media.iter_video_frames(uri):
            frames += 1
        media.read_audio(uri)
        media_s += frames / fps
    wall = time.perf_counter() - t0
    cpu = cpu_delta(before, process_tree_cpu(me))
    return {"media_s": media_s, "cpu_s": cpu, "wall_s": wall}


def _start_ray(workers: int) -> None:
    from core.ray_setup import init_ray

    init_ray(None, num_cpus=workers)


def bench_flow(raw_dir: str, out_dir: str, workers: int) -> dict[str, float]:
    _start_ray(workers)  # before anything imports ray: it reads its auth mode then
    import ray

    from flows.curate import curate

    try:
        # Warm-up on one file into another output: starts Prefect's server and Ray's
        # workers (imports done), as on a long-lived cluster. The measured run below
        # starts from nothing committed.
        name = sorted(n for n in os.listdir(raw_dir) if n.endswith(".mp4"))[0]
        warm = os.path.join(out_dir, "warmup_raw")
        os.makedirs(warm)
        shutil.copy(os.path.join(raw_dir, name), warm)
        curate(os.path.join(warm, "*.mp4"), os.path.join(out_dir, "warmup"))
        me = os.getpid()
        before = process_tree_cpu(me)
        t0 = time.perf_counter()
        summary = curate(os.path.join(raw_dir, "*.mp4"), os.path.join(out_dir, "flow"))
        wall = time.perf_counter() - t0
        cpu = cpu_delta(before, process_tree_cpu(me))
    finally:
        ray.shutdown()
    return {
        "media_s": summary["media_seconds"],
        "cpu_s": cpu,
        "wall_s": wall,
        "worker_cpu_s": summary["cpu_seconds"],
        "stage_cpu_s": summary["stage_cpu_seconds"],
        "copy_modes": summary["copy_modes"],
        "clips": _count_rows(summary["clips"]),
        "peak_worker_rss_mb": summary["peak_worker_rss_mb"],
    }


def _count_rows(uri: str) -> int:
    from curation.manifest import read_table

    return read_table(uri).num_rows


def bench_naive(uris: list[str], out_dir: str) -> dict[str, float]:
    exe = shutil.which("scenedetect") or os.path.join(
        os.path.dirname(sys.executable), "scenedetect"
    )
    before = children_cpu()
    t0 = time.perf_counter()
    media_s = 0.0
    for uri in uris:
        with storage.local_copy(uri) as path:
            media_s += media.probe_media(path, check_frame_rate=False).duration_s
            target = os.path.join(out_dir, "naive", os.path.basename(path)[:-4])
            os.makedirs(target, exist_ok=True)
            subprocess.run(
                [exe, "-q", "-i", path, "-o", target, "detect-adaptive", "split-video"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    return {
        "media_s": media_s,
        "cpu_s": children_cpu() - before,
        "wall_s": time.perf_counter() - t0,
    }


def rate(result: dict[str, float]) -> float:
    return result["media_s"] / max(result["cpu_s"], 1e-9)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def bench_scale(sources: int, workers: int, work: str) -> dict[str, object]:
    """N small sources through the flow; the driver's RSS sampled as they finish."""
    import polars as pl

    raw = os.path.join(work, "scale_raw")
    os.makedirs(raw)
    base_dir = os.path.join(work, "scale_base")
    os.makedirs(base_dir)
    bases = []
    speech_work = tempfile.mkdtemp(prefix="speech-")
    for i in range(4):
        bases.append(
            make_source(os.path.join(base_dir, f"b{i}.mp4"), "320x180", 4.0, 100 + i, speech_work)
        )
    for i in range(sources):
        shutil.copy(bases[i % len(bases)], os.path.join(raw, f"src_{i:06d}.mp4"))
    with open(os.path.join(raw, "broken_000.mp4"), "wb") as fh:
        fh.write(b"not a video")
    samples: list[tuple[int, float]] = []

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase == "sources" and (done % max(1, total // 20) == 0 or done == total):
            samples.append((done, _rss_mb()))

    _start_ray(workers)
    import ray

    from flows import curate as flow_module

    flow_module.PROGRESS_HOOKS.append(on_progress)
    try:
        t0 = time.perf_counter()
        summary = flow_module.curate(os.path.join(raw, "*"), os.path.join(work, "scale_out"))
        wall = time.perf_counter() - t0
    finally:
        flow_module.PROGRESS_HOOKS.remove(on_progress)
        ray.shutdown()
    sources_table = pl.read_parquet(summary["sources"])
    clips = pl.read_parquet(summary["clips"])
    quarter = [rss for done, rss in samples if done >= (sources + 1) // 4]
    return {
        "inputs": summary["inputs"],
        "counts": summary["counts"],
        "sources_rows": sources_table.height,
        "clips": clips.height,
        "wall_s": wall,
        "max_pending_results": summary["max_pending_results"],
        "driver_rss_mb": samples,
        "driver_rss_growth_after_first_quarter_mb": (max(quarter) - quarter[0]) if quarter else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs for the flow")
    parser.add_argument("--scale", type=int, default=0, help="curate this many small sources")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = tempfile.mkdtemp(prefix="duet-bench-curation-")
    os.environ.setdefault("PREFECT_HOME", os.path.join(work, "prefect"))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; {datetime.date.today()}")
    try:
        if args.scale:
            result = bench_scale(args.scale, args.workers, work)
            samples = result.pop("driver_rss_mb")
            print(json.dumps(result, indent=2))
            print(
                "driver RSS (MB) as sources finish: "
                + ", ".join(f"{d}:{r:.0f}" for d, r in samples)
            )
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({**result, "driver_rss_mb": samples}, fh, indent=2)
            return
        raw = os.path.join(work, "raw")
        uris = make_corpus(raw, args.videos, args.seconds)
        decode = bench_decode(uris)
        flow = bench_flow(raw, work, args.workers)
        naive = bench_naive(uris, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"corpus: {args.videos} files (720p and 1080p alternating, H.264 veryfast + AAC), "
        f"{decode['media_s']:.1f} media-seconds"
    )
    print(f"{'':28s}{'media-s/CPU-s':>15s}{'CPU s':>9s}{'wall s':>9s}")
    for name, res in (
        ("decode floor", decode),
        ("curate flow (no speech)", flow),
        ("naive scenedetect chain", naive),
    ):
        print(f"{name:28s}{rate(res):15.2f}{res['cpu_s']:9.2f}{res['wall_s']:9.2f}")
    print(f"flow / decode floor: {rate(flow) / rate(decode):.2f}x  (goal >= 0.5x)")
    print(f"flow / naive chain:  {rate(flow) / rate(naive):.2f}x  (goal >= 3x)")
    print(
        f"flow clips written: {flow['clips']} ({flow['copy_modes']}); CPU inside Ray tasks: "
        f"{flow['worker_cpu_s']:.2f} s; peak worker RSS {flow['peak_worker_rss_mb']:.0f} MB"
    )
    print(
        "flow media-s per CPU-s by stage: "
        + ", ".join(
            f"{k} {flow['media_s'] / max(v, 1e-9):.1f}" for k, v in flow["stage_cpu_s"].items()
        )
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"decode": decode, "flow": flow, "naive": naive}, fh, indent=2)


if __name__ == "__main__":
    main()
