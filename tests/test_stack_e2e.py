"""``make up``, the pipeline through the stack's Prefect deployments, ``make down``.

One slow test, as a new user would run it: ``make up`` (on free ports, state in a
temp dir), raw footage into the stack's S3 server, the ``curate`` deployment and then
the ``train`` deployment (tiny: vae, found finished, and two steps of pretrain) run by
the stack's worker against the stack's Ray head, joined by address with the stack's own token (passed
only through the deployments' Secret blocks); then ``duet serve`` on the stack's Ray
with the trained checkpoint and the ``adgen`` deployment sending a brief's variant to
it. Every artifact lands in the S3 server, flow results too; the flow runs are checked
through the Prefect server's API; then ``make down`` and nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


TRAIN_CONFIG = {
    "preset": "tiny",
    "run_uri": "s3://duet-runs/e2e",
    "data": {"curated_uri": "s3://duet-curated/e2e", "encode_with_ray_data": False},
    "vae": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "eval_clips": 1},
    "pretrain": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
}
# One Ray Train stage on the stack's Ray and S3 is what this test adds (each costs ~1
# min of the suite's two shared cores): the vae stage's final is put in S3 beforehand,
# so the flow skips it and trains pretrain on it. The vae stage on Ray Train with S3
# checkpoints and a kill: tests/test_train_e2e.py.
STAGES = ["vae", "pretrain"]
BRIEF = """
name = "e2e"
prompt_templates = ["a {colour} ball bounces"]
seeds = [0]
durations = [1.0]
aspect_ratios = ["1:1"]
quality = "fast"
[slots]
colour = ["red"]
"""
API_KEY = "e2e-stack-key"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_make_up_pipeline_through_deployments_make_down(tmp_path, monkeypatch, listen_port):
    from infra.config import load_deploy_config
    from infra.stack import ENV_FILE, STATE_FILE, read_state

    state = tmp_path / "state"
    ports = {name: listen_port() for name in ("gcs", "dash", "client", "s3", "prefect")}
    config = tmp_path / "stack.toml"
    config.write_text(
        f'state_dir = "{state}"\n'
        f"[ray]\ngcs_port = {ports['gcs']}\ndashboard_port = {ports['dash']}\n"
        f"client_port = {ports['client']}\nnum_cpus = 2\n"
        f"[s3]\nport = {ports['s3']}\n[prefect]\nport = {ports['prefect']}\n"
    )
    cfg = load_deploy_config(str(config))
    make = ["make", "--no-print-directory", f"STACK_CONFIG={config}"]
    serving = None
    t0 = time.monotonic()
    # The stack's worker inherits this environment: it looks for scheduled runs every
    # second instead of Prefect's 10 (up to 10 s idle before each of three runs).
    up = subprocess.run(
        [*make, "up"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"},
    )  # fmt: skip
    up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for url in (cfg.dashboard_url(), cfg.prefect_api_url(), cfg.s3_endpoint()):
            assert url in up.stdout
        started = read_state(state)["processes"]
        assert set(started) == {"s3", "ray", "prefect", "worker"}
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (state / ENV_FILE).read_text().splitlines()
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # The stack's token is its own: ~/.ray/auth_token (if any) would not do.
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
        default = Path.home() / ".ray" / "auth_token"
        assert not default.exists() or default.read_text().strip() != token

        # Joining by address, as `duet curate --ray-address HOST:PORT` does.
        probe = subprocess.run(
            [sys.executable, "-c",
             "from core.ray_setup import init_ray; import ray; "
             f"init_ray('{cfg.ray_address()}'); print(int(ray.cluster_resources()['CPU']))"],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
            env={**os.environ, "RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"]},
        )  # fmt: skip
        assert probe.returncode == 0 and probe.stdout.strip() == "2", probe.stderr[-2000:]

        from core.synth import SynthConfig, generate_corpus

        synth = SynthConfig(
            width=128, height=128, fps=16, sample_rate=16000,
            kinds=("bouncing_balls", "collision"), min_shots=2, max_shots=3,
            min_shot_s=2.5, max_shot_s=3.5,
        )  # fmt: skip
        generate_corpus(f"s3://{cfg.s3.raw_bucket}/e2e", 3, seed=5, config=synth)
        from model.pipeline import DuetPipeline

        DuetPipeline.from_preset("tiny", seed=0).save(f"s3://{cfg.s3.runs_bucket}/e2e/vae/final")

        timings = asyncio.run(_run_pipeline(cfg, _curate_and_train(cfg)))

        # Serving on the stack's Ray, the trained checkpoint from S3, jobs in S3.
        serve_port = listen_port()
        serve_config = tmp_path / "serve.json"
        serve_config.write_text(json.dumps({
            "checkpoint": f"s3://{cfg.s3.runs_bucket}/e2e/pretrain/final",
            "jobs_uri": f"s3://{cfg.s3.runs_bucket}/e2e-serve-jobs",
            "api_keys": [API_KEY], "port": serve_port, "ingress_num_cpus": 0.1,
            "fast": {"steps": 1, "sampler": "euler", "min_replicas": 1, "max_replicas": 1,
                     "num_cpus": 0.5},
            "full": {"min_replicas": 0, "max_replicas": 1, "num_cpus": 0.5},
        }))  # fmt: skip
        t0 = time.monotonic()
        serving = subprocess.Popen(
            [str(ROOT / ".venv/bin/duet"), "serve", "--config", str(serve_config),
             "--ray-address", cfg.ray_address()],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{serve_port}/"
        _wait_ready(url + "readyz", serving, timeout_s=600)
        timings["duet serve (ready)"] = time.monotonic() - t0
        from core import storage

        storage.write_text(f"s3://{cfg.s3.raw_bucket}/briefs/e2e.toml", BRIEF)
        adgen = {
            "adgen/daily": {
                "brief_uri": f"s3://{cfg.s3.raw_bucket}/briefs/e2e.toml",
                "out_uri": f"s3://{cfg.s3.runs_bucket}/e2e-adgen",
                "serve_url": url, "api_key": API_KEY, "concurrency": 1,
            }
        }  # fmt: skip
        timings.update(asyncio.run(_run_pipeline(cfg, adgen)))

        from core import storage

        curated = f"s3://{cfg.s3.curated_bucket}/e2e"
        assert storage.exists(f"{curated}/manifest/_latest.json")
        assert storage.exists(f"{curated}/report/index.html")
        for stage in STAGES:
            assert storage.exists(f"s3://{cfg.s3.runs_bucket}/e2e/{stage}/final/model.safetensors")
        videos = storage.list_files(f"s3://{cfg.s3.runs_bucket}/e2e-adgen/videos")
        assert len(videos) == 1 and storage.size(videos[0]) > 1000, videos
        assert storage.exists(f"s3://{cfg.s3.runs_bucket}/e2e-adgen/results.parquet")
        results = storage.list_files(f"s3://{cfg.s3.results_bucket}/results")
        assert len(results) >= 3, results
        print(f"make up {up_s:.0f} s; " + "; ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    finally:
        if serving is not None:
            serving.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                serving.communicate(timeout=60)
            serving.kill()
        t0 = time.monotonic()
        down = subprocess.run(
            [*make, "down"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        print(f"make down {time.monotonic() - t0:.0f} s: {down.stdout.strip()}")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state / STATE_FILE).exists()
    assert not any(_alive(p["pid"]) for p in started.values())
    for port in ports.values():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def _curate_and_train(cfg) -> dict[str, dict]:
    return {
        "curate/nightly": {
            "input_glob": f"s3://{cfg.s3.raw_bucket}/e2e/*.mp4",
            "out_uri": f"s3://{cfg.s3.curated_bucket}/e2e",
            "speech": False,
        },
        "train/weekly": {
            "config": TRAIN_CONFIG, "config_uri": None,
            "stages": STAGES, "num_workers": 1, "use_gpu": False,
        },
    }  # fmt: skip


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"duet serve exited: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout_s} s")


async def _run_pipeline(cfg, deployments: dict[str, dict]) -> dict[str, float]:
    """Run deployments in order, each to completion; check them through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    timings = {}
    runs = {}
    with temporary_settings({PREFECT_API_URL: cfg.prefect_api_url()}):
        for name, parameters in deployments.items():
            t0 = time.monotonic()
            # Polled every second (Prefect's default is 5 s).
            run = await run_deployment(name, parameters=parameters, timeout=600, poll_interval=1)
            timings[name] = time.monotonic() - t0
            assert run.state.is_completed(), (name, run.state)
            runs[name] = run
        async with get_client() as client:
            for name, run in runs.items():
                flow_name, deployment = name.split("/")
                seen = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
                )
                assert run.id in {r.id for r in seen}, name
                stored = await client.read_flow_run(run.id)
                assert stored.state.is_completed()
                # The result lives in S3 (the results block), as JSON: read it back.
                result = await stored.state.aresult()
                if flow_name == "curate":
                    assert result["inputs"] == 3 and result["counts"]["curated"] == 3
                elif flow_name == "train":
                    assert list(result) == STAGES
                else:
                    assert (result["succeeded"], result["failed"]) == (1, 0), result
    return timings
