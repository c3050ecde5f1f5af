"""The main job behind ``make demo``: each step skips work whose output is already there."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core import storage
from core.ports import free_port

console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


# ``--quick``: the smallest corpus the chain runs on (the curation minimum of
# 128x128 px; shots long enough for one 33-frame training clip each).
QUICK_VIDEOS = 3
QUICK_SYNTH = {
    "width": 128, "height": 128, "fps": 16.0, "sample_rate": 16000, "min_shots": 2,
    "max_shots": 2, "min_shot_s": 2.5, "max_shot_s": 3.5,
    "kinds": ("bouncing_balls", "collision"),
}  # fmt: skip


def synth_step(raw_uri: str, num_videos: int, seed: int, quick: bool = False) -> list[str]:
    """Generate the raw corpus unless the same one (commit marker) is already there."""
    import json
    from dataclasses import asdict

    from core.synth import SynthConfig, generate_corpus

    config = SynthConfig(**QUICK_SYNTH) if quick else SynthConfig()
    # JSON's view of the settings, to compare with the marker a previous run wrote.
    wanted = json.loads(
        json.dumps({"num_videos": num_videos, "seed": seed, "config": asdict(config)})
    )
    if storage.is_committed(raw_uri):
        uris = storage.list_files(raw_uri, suffixes=(".mp4",))
        marker = storage.read_json(storage.join(raw_uri, storage.MARKER_NAME))
        same = marker == wanted or (not quick and "config" not in marker)  # older markers
        if same and len(uris) == num_videos:
            console.print(f"raw corpus already at {raw_uri} ({len(uris)} videos)")
            return uris
    with _progress() as bar:
        task = bar.add_task("synthesising raw footage", total=num_videos)
        uris = generate_corpus(
            raw_uri, num_videos, seed=seed, config=config,
            progress=lambda i, uri: bar.advance(task),
        )  # fmt: skip
    storage.write_marker(raw_uri, wanted)
    return uris


def probe_step(video_uris: list[str], summary_uri: str) -> dict:
    """Probe every raw video and score the probes against the ground-truth sidecars."""
    from core.probes import compare_to_truth, probe_video

    rows = []
    with _progress() as bar:
        task = bar.add_task("probing against ground truth", total=len(video_uris))
        for uri in video_uris:
            sidecar = storage.read_json(uri[: -len(".mp4")] + ".json")
            measured = compare_to_truth(probe_video(uri), sidecar)
            measured["video"] = uri
            rows.append(measured)
            bar.advance(task)
    summary = _summarise(rows)
    storage.write_json(summary_uri, {"summary": summary, "videos": rows})
    _print_probe_table(summary)
    return summary


def _summarise(rows: list[dict]) -> dict:
    def collect(key: str, stat: str) -> list[float]:
        return [r[key][stat] for r in rows if stat in r[key]]

    def matched(key: str) -> tuple[int, int]:
        return sum(r[key]["matched"] for r in rows), sum(r[key]["count"] for r in rows)

    out = {}
    for key in (
        "visual_event_error_frames",
        "audio_onset_error_ms",
        "cut_error_frames",
        "fade_error_frames",
    ):
        hits, total = matched(key)
        maxes = collect(key, "max_abs")
        means = collect(key, "mean_abs")
        out[key] = {
            "matched": hits,
            "total": total,
            "mean_abs": round(float(np.mean(means)), 3) if means else None,
            "max_abs": round(float(np.max(maxes)), 3) if maxes else None,
        }
    attrs = [r["attribute_accuracy"] for r in rows if r.get("attribute_accuracy") is not None]
    out["attribute_accuracy"] = round(float(np.mean(attrs)), 4) if attrs else None
    offsets = [r["av_offset_ms"] for r in rows if r.get("av_offset_ms") is not None]
    out["av_offset_ms_max_abs"] = round(float(np.max(np.abs(offsets))), 2) if offsets else None
    return out


def _print_probe_table(summary: dict) -> None:
    table = Table(title="probes vs ground truth (raw corpus)")
    for col in ("measure", "matched / total", "mean |error|", "max |error|"):
        table.add_column(col)
    units = {
        "visual_event_error_frames": "impact time (frames)",
        "audio_onset_error_ms": "audio onset (ms)",
        "cut_error_frames": "hard cut (frames)",
        "fade_error_frames": "fade (frames)",
    }
    for key, label in units.items():
        s = summary[key]
        table.add_row(
            label, f"{s['matched']} / {s['total']}", str(s["mean_abs"]), str(s["max_abs"])
        )
    table.add_row("attribute accuracy", "", str(summary["attribute_accuracy"]), "")
    table.add_row("|AV offset| (ms)", "", "", str(summary["av_offset_ms_max_abs"]))
    console.print(table)


def curate_step(raw_uri: str, curated_uri: str, speech: bool) -> dict:
    """Run the curation flow (Prefect on a local Ray) over the raw corpus."""
    from flows.curate import curate

    if speech:
        from curation import speech_env

        # First use on a machine builds WhisperX's isolated environment (minutes);
        # later runs find it in the cache.
        speech_env.ensure()
    console.print("[bold]curating[/bold] (Prefect flow on local Ray)")
    summary = curate(storage.join(raw_uri, "*.mp4"), curated_uri, speech=speech)
    table = Table(title="curation")
    table.add_column("what")
    table.add_column("value")
    for key in ("inputs", "sources_run", "sources_skipped", "media_seconds", "sources_wall_s"):
        value = summary.get(key)
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    table.add_row("failed", str(len(summary.get("failed") or [])))
    for key in ("clips", "quarantine", "sources", "report"):
        if key in summary:
            table.add_row(key, str(summary[key]))
    console.print(table)
    return summary


def demo_train_config(curated_uri: str, run_uri: str, scale: float = 1.0, quick: bool = False):
    """A short ``tiny`` run: minutes on a laptop CPU; ``scale`` multiplies every stage's steps.
    ``quick``: a few steps per stage, batches of 2, a log line per step."""
    from pipelines.train.config import train_config_from

    if quick:

        def stage(n: int) -> dict:
            return {"steps": n, "batch_size": 2, "checkpoint_every": n, "log_every": 1}

        return train_config_from(
            {
                "preset": "tiny",
                "run_uri": run_uri,
                "data": {"curated_uri": curated_uri},
                "vae": {**stage(4), "eval_clips": 1},
                "pretrain": stage(4),
                "sft": stage(2),
            }
        )

    def steps(n: int) -> int:
        return max(1, int(round(n * scale)))

    return train_config_from(
        {
            "preset": "tiny",
            "run_uri": run_uri,
            "data": {"curated_uri": curated_uri},
            "vae": {"steps": steps(300), "batch_size": 4, "checkpoint_every": 100, "log_every": 10},
            "pretrain": {
                "steps": steps(300),
                "batch_size": 4,
                "checkpoint_every": 100,
                "log_every": 10,
            },
            "sft": {"steps": steps(100), "batch_size": 4, "checkpoint_every": 50, "log_every": 10},
        }
    )


def train_step(
    curated_uri: str, run_uri: str, scale: float, num_workers: int, quick: bool = False
) -> dict[str, str]:
    """vae -> pretrain -> sft on the curated corpus with Ray Train; finished stages are kept."""
    from cli.progress import TrainProgress
    from pipelines.train import train

    cfg = demo_train_config(curated_uri, run_uri, scale, quick)
    console.print(f"[bold]training[/bold] tiny: vae -> pretrain -> sft on Ray Train x{num_workers}")
    with TrainProgress(console) as progress:
        finals = train(cfg, runner="ray", num_workers=num_workers, progress=progress)
    for stage, uri in finals.items():
        console.print(f"  {stage}: {uri}")
    return finals


def generate_step(checkpoint_uri: str, curated_uri: str, out_uri: str, steps: int = 20) -> str:
    """One clip from the trained checkpoint, for a caption of a held-out clip."""
    from core.media import write_mp4
    from model.generate import GenerationRequest, generate
    from model.pipeline import DuetPipeline
    from pipelines.train.config import DataConfig
    from pipelines.train.data import TrainDataError, load_clip_rows
    from pipelines.train.evaluate import held_out_prompts

    pipeline = DuetPipeline.from_checkpoint(checkpoint_uri)
    data = DataConfig(curated_uri=curated_uri)
    try:
        rows = load_clip_rows(data, pipeline.config.fps, split="val")
    except TrainDataError:
        rows = load_clip_rows(data, pipeline.config.fps)
    prompts = held_out_prompts(rows) or ["a red ball bounces on a floor"]
    request = GenerationRequest(prompt=prompts[0], duration_s=2.0, seed=0, steps=steps)
    result = generate(request, pipeline=pipeline)
    video_uri = storage.join(out_uri, "generated.mp4")
    write_mp4(video_uri, result.clip)
    storage.write_json(
        storage.join(out_uri, "generated.json"),
        {"kind": "generation", **result.metadata, "checkpoint": checkpoint_uri},
    )
    console.print(f"[bold]generated[/bold] {video_uri} for {prompts[0]!r}")
    return video_uri


SHIPPED_DEMO_PROMPT = "a red circle and a blue square bounce on a gray floor"


def shipped_step(out_uri: str) -> str | None:
    """One clip from the shipped default checkpoint (the watchable one), probed."""
    from core.media import write_mp4
    from core.probes.captions import caption_adherence
    from core.probes.probe import probe_clip
    from model.checkpoint import default_checkpoint
    from model.generate import GenerationRequest, generate
    from model.pipeline import DuetPipeline

    checkpoint = default_checkpoint()
    if checkpoint is None:
        console.print("no shipped checkpoint (checkpoints/default/): skipping its clip")
        return None
    pipeline = DuetPipeline.from_checkpoint(checkpoint)
    request = GenerationRequest(prompt=SHIPPED_DEMO_PROMPT, duration_s=2.0, seed=0, steps=20)
    result = generate(request, pipeline=pipeline)
    video_uri = storage.join(out_uri, "shipped.mp4")
    write_mp4(video_uri, result.clip)
    probe = probe_clip(result.clip, include_frames=True)
    adherence = caption_adherence(SHIPPED_DEMO_PROMPT, probe["frames"])
    storage.write_json(
        storage.join(out_uri, "shipped.json"),
        {"kind": "generation", **result.metadata, "checkpoint": checkpoint, "adherence": adherence,
         "av_offset_ms": probe["av_offset_ms"]},
    )  # fmt: skip
    console.print(
        f"[bold]generated[/bold] {video_uri} from the shipped checkpoint for "
        f"{SHIPPED_DEMO_PROMPT!r}: adherence {adherence:.2f}, AV offset {probe['av_offset_ms']} ms"
    )
    return video_uri


DEMO_BRIEF = """
name = "demo-ad"
prompt_templates = ["a {colour} circle bounces on a gray floor"]
seeds = [0]
durations = [2.0]
aspect_ratios = ["1:1", "9:16"]
quality = "fast"
[slots]
colour = ["red", "blue"]
"""


def serve_step(out_uri: str, checkpoint: str | None) -> dict:
    """Start the Serve app on a local Ray, run a small ad-variant batch through it
    (the adgen flow), and print where the videos, results table and page are."""
    import secrets

    import pyarrow.parquet as pq

    from core.config import config_to_dict
    from core.ray_setup import init_ray
    from flows.adgen import adgen
    from serve.app import run
    from serve.config import serve_config_from

    serve_uri = storage.join(out_uri, "serve")
    key = secrets.token_urlsafe(16)
    config = serve_config_from(
        {
            "checkpoint": checkpoint,
            "random_weights_preset": None if checkpoint else "tiny",
            "jobs_uri": storage.join(serve_uri, "jobs"),
            "api_keys": [key],
            "port": free_port(),
            "fast": {"steps": 4, "sampler": "euler", "num_cpus": 0.5, "max_replicas": 2},
            "full": {"num_cpus": 0.5, "max_replicas": 1},
        }
    )
    # The config the app ran with (keys left out), to serve it again with `duet serve`.
    plain = config_to_dict(config)
    plain["api_keys"] = []
    storage.write_json(storage.join(serve_uri, "serve.json"), plain)
    brief_uri = storage.join(serve_uri, "brief.toml")
    storage.write_text(brief_uri, DEMO_BRIEF)
    import ray
    from ray import serve

    started_ray = init_ray(None)
    console.print("[bold]serving[/bold]: Ray Serve app (ingress + fast + full) on local Ray")
    try:
        url = run(config)
        console.print(f"  web page: {url}  (API key for this run: {key})")
        summary = adgen(brief_uri, storage.join(serve_uri, "batch"), serve_url=url, api_key=key)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    table = Table(title=f"ad variants ({summary['brief']}) through the Serve app")
    for col in ("variant", "prompt", "size", "status", "latency s", "compute s"):
        table.add_column(col)
    with storage.local_copy(summary["results"]) as path:
        for row in pq.read_table(path).to_pylist():
            size = f"{row['probe_width']}x{row['probe_height']}" if row["probe_width"] else ""
            table.add_row(row["variant_id"], row["prompt"], size, row["status"],
                          str(row["latency_s"]), str(row["compute_s"]))  # fmt: skip
    console.print(table)
    console.print(f"[bold]ad-variant MP4s:[/bold] {summary['videos']}")
    console.print(f"[bold]results table:[/bold] {summary['results']}")
    console.print(
        f"[bold]web page:[/bold] was at {url} while the demo ran; serve it again with "
        f"`duet serve --config {storage.join(serve_uri, 'serve.json')}`"
    )
    return summary


def run_demo(
    out_uri: str,
    num_videos: int = 20,
    seed: int = 0,
    speech: bool = True,
    train_scale: float = 1.0,
    train_workers: int = 2,
    quick: bool = False,
) -> None:
    """The demo into ``out_uri`` (made absolute by the caller: Ray Train workers and
    Serve replicas run in working directories of their own). ``quick``: the smallest
    corpus and a few training steps, through curate -> Ray Train -> generate only."""
    from flows import prefect_api

    # Curation and the ad batch are Prefect flows: an absent server is one line now,
    # not a traceback after synthesis and probing.
    prefect_api.check_reachable()
    import ray

    from core.ray_setup import init_ray

    if quick:
        num_videos, speech, train_scale, train_workers = QUICK_VIDEOS, False, 1.0, 1
    # One local Ray for every step: curation, training and serving join it instead
    # of each starting and stopping its own (seconds each on a small machine).
    started_ray = init_ray(None)
    try:
        _run_steps(out_uri, num_videos, seed, speech, train_scale, train_workers, quick)
    finally:
        if started_ray:
            ray.shutdown()


def _run_steps(
    out_uri: str,
    num_videos: int,
    seed: int,
    speech: bool,
    train_scale: float,
    train_workers: int,
    quick: bool,
) -> None:
    started = time.perf_counter()
    raw_uri = storage.join(out_uri, "raw")
    videos = synth_step(raw_uri, num_videos, seed, quick)
    probe_step(videos, storage.join(out_uri, "probe_summary.json"))
    curated_uri = storage.join(out_uri, "curated")
    curated = curate_step(raw_uri, curated_uri, speech)
    if "report" in curated:
        console.print(f"[bold]curation report:[/bold] {curated['report']}")
    finals = {}
    if train_scale > 0:
        # A quick run has its own run folder: a full demo into the same folder must
        # not skip its stages as finished.
        run_uri = storage.join(out_uri, "train-quick" if quick else "train")
        finals = train_step(curated_uri, run_uri, train_scale, train_workers, quick)
        generate_step(finals["sft"], curated_uri, out_uri, steps=4 if quick else 20)
    if quick:
        console.print(
            f"[green]quick demo finished in {time.perf_counter() - started:.0f} s[/green]; "
            f"outputs under {out_uri}"
        )
        return
    shipped_step(out_uri)
    from model.checkpoint import default_checkpoint

    # The shipped checkpoint when there is one, else the one the demo trained.
    serve_step(out_uri, default_checkpoint() or finals.get("sft"))
    console.print(
        f"[green]demo finished in {time.perf_counter() - started:.0f} s[/green]; outputs under {out_uri}"
    )
