"""The Prefect ``train`` flow orders the stages and skips those already finished."""

from __future__ import annotations

import os

from core import storage
from flows.train import train_flow


def test_train_flow_skips_finished_stages_and_runs_the_rest(tiny_vae_run, tmp_path):
    vae = tiny_vae_run
    run = str(tmp_path / "run")
    for name in ("config.json", "model.safetensors"):
        storage.write_bytes(f"{run}/vae/final/{name}", storage.read_bytes(f"{vae.final}/{name}"))
    weights = f"{run}/vae/final/model.safetensors"
    before = os.stat(weights).st_mtime_ns
    config = {
        "run_uri": run,
        # The shared VAE run's latent cache: the copied final keeps its weights.
        "data": {"curated_uri": vae.corpus, "latent_cache_uri": vae.latents},
        "pretrain": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
        "sft": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
    }
    # The supervised chain; rlhf and distill after it: tests/test_align.py.
    finals = train_flow(config=config, stages=["vae", "pretrain", "sft"], runner="local")
    assert list(finals) == ["vae", "pretrain", "sft"]
    assert os.stat(weights).st_mtime_ns == before, "the finished vae stage was retrained"
    assert (
        storage.read_json(finals["sft"] + "/config.json")["extra"]["parent"] == finals["pretrain"]
    )
    # A second run does nothing: every final exists.
    stamp = os.stat(finals["sft"] + "/model.safetensors").st_mtime_ns
    assert train_flow(config=config, stages=["vae", "pretrain", "sft"], runner="local") == finals
    assert os.stat(finals["sft"] + "/model.safetensors").st_mtime_ns == stamp
