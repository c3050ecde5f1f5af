"""Curation throughput, side by side in one run on the same synthetic-world files.

1. **decode floor**: decode every file's video to RGB frames and its audio, nothing else.
2. **curate flow**: the whole ``curate`` flow (validate, decode once, shots, clips
   written as H.264+AAC, quality, sync, sidecar captions, manifest, report) on
   Ray with Prefect, speech off.
3. **naive chain**: what a user would script per file:
   ``scenedetect -i FILE detect-adaptive split-video`` (PySceneDetect's CLI + ffmpeg).

Each is reported as media-seconds processed per CPU-second. CPU seconds are summed
over every process involved: this process, Ray's raylet/GCS/workers and Prefect's
server for the flow (read from ``/proc`` before and after the run, so their start-up
is excluded and everything the run itself costs is included), and the CLI and its
ffmpeg children for the naive chain. The model-bound speech stage (WhisperX, if its
env is built) is reported separately as media-seconds per compute-second with its
batch size.

    python -m bench.curation --videos 8 --workers 2
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


def make_corpus(root: str, videos: int, seed: int) -> list[str]:
    from core.synth import generate_corpus

    return generate_corpus(root, videos, seed=seed)


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


def bench_flow(raw_dir: str, out_dir: str, workers: int) -> dict[str, float]:
    import ray

    from flows.curate import curate

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        # Warm-up on two files into another output: starts Prefect's server and Ray's
        # workers (imports done), as on a long-lived cluster. The measured run below
        # starts from nothing committed.
        names = sorted(n for n in os.listdir(raw_dir) if n.endswith(".mp4"))[:2]
        warm = os.path.join(out_dir, "warmup_raw")
        os.makedirs(warm)
        for name in names:
            for suffix in (".mp4", ".json"):
                shutil.copy(os.path.join(raw_dir, name[:-4] + suffix), warm)
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
        "stage_s": summary["stage_seconds"],
        "clips": _count_clips(summary["clips"]),
    }


def _count_clips(uri: str) -> int:
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


def bench_speech(raw_dir: str, out_dir: str, batch_size: int) -> dict[str, float] | None:
    """WhisperX on the talking-avatar shots' clips of the flow's output, if its env exists."""
    from curation import speech_env

    if not speech_env.is_ready(speech_env.env_dir()):
        return None
    import polars as pl

    from curation.speech import SpeechConfig, SpeechStage

    clips = pl.read_parquet(os.path.join(out_dir, "flow", "manifest", "clips.parquet"))
    talking = [
        row["clip_uri"]
        for row in clips.iter_rows(named=True)
        if "says" in row["caption"] or "speaks" in row["caption"] or "talk" in row["caption"]
    ] or clips["clip_uri"].to_list()[:4]
    audio = [media.read_audio(u, sample_rate=16000, channels=1) for u in talking]
    media_s = sum(a.shape[-1] / r for a, r in audio)
    stage = SpeechStage(SpeechConfig(batch_size=batch_size))
    with stage:
        t0 = time.perf_counter()
        stage.call_batch(audio)
        compute = time.perf_counter() - t0
    return {"media_s": media_s, "compute_s": compute, "clips": len(audio), "batch_size": batch_size}


def rate(result: dict[str, float]) -> float:
    return result["media_s"] / max(result["cpu_s"], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs for the flow")
    parser.add_argument("--speech", action="store_true", help="also time WhisperX")
    parser.add_argument("--speech-batch-size", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = tempfile.mkdtemp(prefix="duet-bench-curation-")
    os.environ.setdefault("PREFECT_HOME", os.path.join(work, "prefect"))
    try:
        raw = os.path.join(work, "raw")
        uris = make_corpus(raw, args.videos, args.seed)
        decode = bench_decode(uris)
        flow = bench_flow(raw, work, args.workers)
        naive = bench_naive(uris, work)
        speech = bench_speech(raw, work, args.speech_batch_size) if args.speech else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; {datetime.date.today()}")
    print(f"corpus: {args.videos} synthetic-world videos, {decode['media_s']:.1f} media-seconds")
    print(f"{'':28s}{'media-s/CPU-s':>15s}{'CPU s':>9s}{'wall s':>9s}")
    for name, res in (
        ("decode floor", decode),
        ("curate flow (no speech)", flow),
        ("naive scenedetect chain", naive),
    ):
        print(f"{name:28s}{rate(res):15.2f}{res['cpu_s']:9.2f}{res['wall_s']:9.2f}")
    print(f"flow / decode floor: {rate(flow) / rate(decode):.2f}x")
    print(f"flow / naive chain:  {rate(flow) / rate(naive):.2f}x")
    print(
        f"flow clips written: {flow['clips']}; CPU inside Ray tasks: {flow['worker_cpu_s']:.2f} s"
    )
    print(
        "flow stage seconds (summed over tasks): "
        + ", ".join(f"{k} {v:.2f}" for k, v in flow["stage_s"].items())
    )
    if speech is not None:
        print(
            f"speech (WhisperX, batch {speech['batch_size']}): {speech['media_s'] / speech['compute_s']:.2f} "
            f"media-s per compute-s over {speech['clips']} clips ({speech['media_s']:.1f} s audio)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"decode": decode, "flow": flow, "naive": naive, "speech": speech}, fh, indent=2
            )


if __name__ == "__main__":
    main()
