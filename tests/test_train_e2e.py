"""The whole chain on Ray Train: vae -> pretrain -> sft, 2 workers, S3, a worker killed.

The tiny model trains on the curated synthetic corpus with checkpoints on the
loopback S3 server; rank 1 is SIGKILLed during pretraining and Ray Train restarts
the group from the newest checkpoint. Then both DiT stages generate clips for the
held-out (validation split) captions and the world's probes measure how well each
clip matches its prompt: SFT, which continues pretraining on the high-quality
subset, must adhere better than the pretrained model it started from.
"""

from __future__ import annotations

import pytest

from core import storage
from model.pipeline import DuetPipeline
from pipelines.train import train
from pipelines.train.config import train_config_from
from pipelines.train.data import TrainDataError, load_clip_rows
from pipelines.train.evaluate import EvalSettings, evaluate_adherence, held_out_prompts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_chain_on_ray_with_a_kill_and_sft_beats_pretrain(tiny_curated_corpus, s3_bucket, fresh_ray):
    cfg = train_config_from(
        {
            "run_uri": f"{s3_bucket}/e2e",
            "seed": 0,
            "data": {"curated_uri": tiny_curated_corpus, "sft_top_fraction": 0.6},
            "vae": {"steps": 240, "batch_size": 4, "checkpoint_every": 120, "log_every": 20,
                    "crop_px": 32},
            "pretrain": {"steps": 120, "batch_size": 4, "checkpoint_every": 40, "log_every": 10},
            "sft": {"steps": 240, "batch_size": 4, "checkpoint_every": 120, "log_every": 20,
                    "lr": 2e-3, "warmup_steps": 10},
            "debug_kill_at_step": 50,
            "debug_kill_rank": 1,
            "debug_kill_stage": "pretrain",
        }
    )  # fmt: skip
    finals = train(cfg, runner="ray", num_workers=2)
    assert storage.exists(f"{cfg.run_uri}/pretrain/killed_at_50")
    for stage in ("vae", "pretrain", "sft"):
        assert storage.exists(finals[stage] + "/model.safetensors"), stage

    try:
        rows = load_clip_rows(cfg.data, 16.0, split="val")
    except TrainDataError:
        pytest.fail("the corpus has no validation clips to hold out")
    prompts = held_out_prompts(rows)
    assert prompts, "no held-out caption names a coloured shape"
    settings = EvalSettings(seeds=(0, 1), steps=12)
    scores = {}
    for stage in ("pretrain", "sft"):
        result = evaluate_adherence(DuetPipeline.from_checkpoint(finals[stage]), prompts, settings)
        scores[stage] = result
        print(
            stage,
            {k: round(result[k], 3) for k in ("adherence", "colour_recall", "colour_precision")},
        )
    assert scores["sft"]["adherence"] > scores["pretrain"]["adherence"], scores
    assert scores["sft"]["colour_recall"] >= scores["pretrain"]["colour_recall"], scores
