"""The training pipeline: data position, checkpoints, resume after kills, fail-fast errors.

The expensive parts share one curated corpus (``tiny_curated_corpus``) and one VAE
stage; the DiT stages run a few steps each. Resume checks compare per-step losses
of an interrupted run with an uninterrupted one: every random number is drawn
from a generator seeded by (seed, stage, step, rank) and the whole optimizer, EMA
and data position are restored, so on the CPU they agree to float32 rounding of
the same operations, i.e. exactly; the tolerance allows 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from core import storage
from model.checkpoint import CheckpointError
from model.pipeline import DuetPipeline
from pipelines.train import train
from pipelines.train.config import TrainConfig, stage_data, train_config_from
from pipelines.train.data import (
    EpochSampler,
    SamplerPosition,
    TrainDataError,
    load_clip_rows,
    sft_subset,
)
from pipelines.train.loop import TrainError, final_uri, run_stage, stage_uri
from pipelines.train.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the sampler ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    clip_id: str
    bucket: int


def _rows(n: int, buckets=(17, 33)) -> list[_Row]:
    return [_Row(f"c{i}", buckets[i % len(buckets)]) for i in range(n)]


def test_sampler_sees_each_clip_once_per_epoch_across_ranks():
    rows = _rows(37)
    sampler = EpochSampler(rows, batch_per_worker=3, world_size=2, seed=4)
    seen, pos = [], SamplerPosition()
    for _ in range(len(sampler.epoch_batches(0))):
        for rank in (0, 1):
            idx, after = sampler.next(pos, rank)
            assert {rows[i].bucket for i in idx} == {rows[idx[0]].bucket}, "a batch mixes buckets"
            seen += idx
        pos = after
    assert len(seen) == len(set(seen)), "a clip was seen twice in one epoch"
    # Per bucket, all but the remainder that cannot fill a global batch of 6 are seen.
    for bucket in (17, 33):
        members = [i for i, r in enumerate(rows) if r.bucket == bucket]
        assert len([i for i in seen if i in members]) == len(members) // 6 * 6
    # The epoch rolls over with a different order.
    nxt, _ = sampler.next(pos, 0)
    assert sampler.epoch_batches(1) != sampler.epoch_batches(0)
    assert nxt == sampler.epoch_batches(1)[0][0::2]


def test_sampler_resumes_at_a_saved_position():
    rows = _rows(40)
    run = EpochSampler(rows, 2, 1, seed=9)
    pos, straight = SamplerPosition(), []
    for _ in range(25):  # crosses an epoch boundary (20 batches per epoch)
        idx, pos = run.next(pos, 0)
        straight.append(idx)
    fresh, resumed, pos = EpochSampler(rows, 2, 1, seed=9), [], SamplerPosition()
    for _ in range(11):
        _, pos = run.next(pos, 0)
    saved = SamplerPosition(pos.epoch, pos.batch)  # what a checkpoint stores
    for _ in range(14):
        idx, saved = fresh.next(saved, 0)
        resumed.append(idx)
    assert resumed == straight[11:]


def test_sampler_rejects_a_batch_larger_than_the_data():
    with pytest.raises(TrainDataError, match="cannot fill one global batch"):
        EpochSampler(_rows(5, buckets=(17,)), batch_per_worker=4, world_size=2, seed=0)


# -- stages on a curated corpus ----------------------------------------------------------


def _config(corpus: str, run_uri: str, **overrides) -> TrainConfig:
    base = {
        "run_uri": run_uri,
        "seed": 3,
        "record_samples": True,
        "data": {"curated_uri": corpus, "latent_cache_uri": run_uri + "-latents"},
        "vae": {"steps": 6, "batch_size": 2, "checkpoint_every": 3, "log_every": 1},
        "pretrain": {"steps": 8, "batch_size": 2, "checkpoint_every": 3, "log_every": 1},
        "sft": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return train_config_from(base)


@pytest.fixture(scope="module")
def vae_run(tiny_vae_run) -> TrainConfig:
    """The config of the shared VAE run (tests/conftest.py); later stages start from it."""
    return _config(tiny_vae_run.corpus, tiny_vae_run.run,
                   data={"latent_cache_uri": tiny_vae_run.latents})  # fmt: skip


def _metrics(stage_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(stage_uri + "/metrics.jsonl").splitlines()]


def _samples(stage_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(stage_uri + "/samples.jsonl").splitlines()]


def test_vae_stage_writes_a_loadable_final_with_its_lineage(vae_run):
    final = final_uri(vae_run, "vae")
    meta = storage.read_json(final + "/config.json")
    extra = meta["extra"]
    assert extra["stage"] == "vae" and extra["steps"] == 6
    assert "clips.parquet" in extra["data_version"]
    assert extra["metrics"]["psnr_db"] > 5.0  # held-out reconstruction was measured
    pipe = DuetPipeline.from_checkpoint(final)
    assert float(pipe.video_vae.latent_std.min()) > 0  # calibrated
    stage = vae_run.run_uri + "/vae"
    losses = [r["loss"] for r in _metrics(stage)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for name in ("report.html", "loss.png"):
        assert storage.exists(f"{stage}/{name}")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(stage + "/tensorboard"))
    # keep_checkpoints=2: the oldest of three was pruned.
    assert sorted(n for n in os.listdir(stage) if n.startswith("checkpoint_")) == [
        "checkpoint_00000003",
        "checkpoint_00000006",
    ]


def test_decoders_only_vae_stage_keeps_the_latents(vae_run, tmp_path):
    """``vae.decoders_only`` from a trained checkpoint: the decoders learn, the encoders,
    their calibration and the DiT stay bit for bit, so the latent cache key is kept."""
    from pipelines.train.latents import cache_key

    # Calibrated on some other corpus (here: scaled): this one's must not replace it.
    before = DuetPipeline.from_checkpoint(final_uri(vae_run, "vae"))
    before.video_vae.latent_std.mul_(2.0)
    before.audio_vae.latent_std.mul_(2.0)
    parent = str(tmp_path / "parent")
    before.save(parent)
    settings = {"steps": 3, "checkpoint_every": 3, "decoders_only": True}
    with pytest.raises(TrainError, match="init_from"):
        train(_config(vae_run.data.curated_uri, str(tmp_path / "bare"), vae=settings), ("vae",))
    cfg = _config(vae_run.data.curated_uri, str(tmp_path / "dec"), init_from=parent, vae=settings)
    after = DuetPipeline.from_checkpoint(train(cfg, stages=("vae",), runner="local")["vae"])
    for name in ("video_vae", "audio_vae"):
        old, new = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        kept = [k for k in old if not k.startswith("decoder.")]
        assert kept and all(torch.equal(old[k], new[k]) for k in kept), name
        assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder.")), name
    assert all(
        torch.equal(v, after.dit.state_dict()[k]) for k, v in before.dit.state_dict().items()
    )
    assert cache_key(after, (17,)) == cache_key(before, (17,))


def test_the_vocoder_trained_beside_the_vaes_leaves_their_steps_as_they_were(vae_run, tmp_path):
    """Each network of the vae stage clips its own gradient: with a shared clip the
    vocoder's large gradients scaled the VAEs' steps down (the one-GPU shipped run's
    VAE lost colours it kept without the vocoder). Same seed, data and noise: the VAEs
    come out bit for bit equal with and without the vocoder beside them."""
    vaes = {}
    for vocoder_steps in (0, 4):
        settings = {"steps": 4, "checkpoint_every": 4, "vocoder_steps": vocoder_steps,
                    "video_gan_start": 2}  # fmt: skip
        run = str(tmp_path / f"voc{vocoder_steps}")
        cfg = _config(vae_run.data.curated_uri, run, vae=settings)
        pipe = DuetPipeline.from_checkpoint(train(cfg, stages=("vae",), runner="local")["vae"])
        assert pipe.use_neural_vocoder == (vocoder_steps > 0)
        vaes[vocoder_steps] = pipe
        rows = _metrics(run + "/vae")
        assert all(r["grad_norm_video_vae"] > 0 for r in rows)
    for name in ("video_vae", "audio_vae"):
        alone, beside = (getattr(vaes[k], name).state_dict() for k in (0, 4))
        assert all(torch.equal(alone[k], beside[k]) for k in alone), name


def test_clips_with_dialogue_train_the_vocoder_and_leave_the_vaes_alone(vae_run, tmp_path):
    """``vae.vocoder_speech_share``: that share of the vocoder's segments comes from
    clips whose text quotes speech (the shipped corpus has 13 such clips in 369; its
    vocoder never learned speech). Two clips of the corpus are given a quoted line:
    with the share at 1 every step logs 4 speech segments and the vocoder comes out
    different from the share-0 run, while the VAEs, whose windows and noise do not
    depend on the speech draw, come out bit for bit equal."""
    import pyarrow.parquet as pq

    from pipelines.train.data import clips_table_uri

    table = pq.read_table(clips_table_uri(vae_run.data.curated_uri))
    captions = table.column("caption").to_pylist()
    captions[:2] = [c + ' "hello there"' for c in captions[:2]]
    table = table.set_column(table.schema.get_field_index("caption"), "caption", [captions])
    corpus = str(tmp_path / "dialogue.parquet")
    pq.write_table(table, corpus)
    pipes, logged = {}, {}
    for share in (0.0, 1.0):
        settings = {"steps": 3, "checkpoint_every": 3, "vocoder_steps": 3,
                    "vocoder_speech_share": share}  # fmt: skip
        run = str(tmp_path / f"share{share:g}")
        cfg = _config(corpus, run, vae=settings)
        pipes[share] = DuetPipeline.from_checkpoint(
            train(cfg, stages=("vae",), runner="local")["vae"]
        )
        logged[share] = [r.get("vocoder_speech_segments") for r in _metrics(run + "/vae")]
    assert logged == {0.0: [None] * 3, 1.0: [4] * 3}, logged
    for name in ("video_vae", "audio_vae"):
        without, with_speech = (getattr(pipes[k], name).state_dict() for k in (0.0, 1.0))
        assert all(torch.equal(without[k], with_speech[k]) for k in without), name
    without, with_speech = (pipes[k].vocoder.state_dict() for k in (0.0, 1.0))
    assert not all(torch.equal(without[k], with_speech[k]) for k in without)


def _duet_train(stage: str, cfg: TrainConfig, tmp_path, extra=()) -> subprocess.CompletedProcess:
    cfg_path = tmp_path / f"cfg-{os.urandom(3).hex()}.json"
    from core.config import config_to_dict

    cfg_path.write_text(json.dumps(config_to_dict(cfg)))
    cmd = [sys.executable, "-m", "cli.main", "train", stage, "--config", str(cfg_path), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_killed_driver_resumes_with_the_same_losses_and_data(vae_run, tmp_path):
    """SIGKILL the whole training process mid-stage; rerunning the command resumes exactly."""
    parent = final_uri(vae_run, "vae")
    # The shared VAE run's latent cache (tests/conftest.py): what this test checks
    # starts after the clips are encoded.
    latents = {"latent_cache_uri": vae_run.data.latent_cache_uri}
    straight = _config(
        vae_run.data.curated_uri, str(tmp_path / "straight"), init_from=parent, data=latents
    )
    killed = _config(
        vae_run.data.curated_uri,
        str(tmp_path / "killed"),
        init_from=parent,
        data=latents,
        debug_kill_at_step=5,
        debug_kill_stage="pretrain",
    )
    done = _duet_train("pretrain", straight, tmp_path, ["--runner", "local"])
    assert done.returncode == 0, done.stderr[-3000:]
    first = _duet_train("pretrain", killed, tmp_path, ["--runner", "local"])
    assert first.returncode == -9, (first.returncode, first.stderr[-3000:])
    assert storage.exists(killed.run_uri + "/pretrain/checkpoint_00000003")
    assert not storage.exists(final_uri(killed, "pretrain"))
    again = _duet_train("pretrain", killed, tmp_path, ["--runner", "local"])
    assert again.returncode == 0, again.stderr[-3000:]

    a, b = _metrics(straight.run_uri + "/pretrain"), _metrics(killed.run_uri + "/pretrain")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), (ra, rb)
    sa, sb = _samples(straight.run_uri + "/pretrain"), _samples(killed.run_uri + "/pretrain")
    assert sa == sb
    epoch0 = [c for r in sb if r["epoch"] == 0 for c in r["clips"]]
    assert len(epoch0) == len(set(epoch0)), "a clip was trained twice in one epoch"
    # The final weights agree too.
    wa = DuetPipeline.from_checkpoint(final_uri(straight, "pretrain")).dit.state_dict()
    wb = DuetPipeline.from_checkpoint(final_uri(killed, "pretrain")).dit.state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7)


def test_progress_is_told_of_a_step_after_its_checkpoint_is_written(vae_run, tmp_path):
    """A wall-clock deadline stops a stage from its progress callback
    (pipelines.shipped.gpu_job.TimedStages) and finishes from the newest checkpoint:
    stopped at a checkpoint's step, that step's checkpoint must already be there."""
    from pipelines.train.state import latest_checkpoint, read_train_state

    class Stop(Exception):
        pass

    cfg = _config(vae_run.data.curated_uri, str(tmp_path / "run"),
                  init_from=final_uri(vae_run, "vae"),
                  data={"latent_cache_uri": vae_run.data.latent_cache_uri})  # fmt: skip
    told = []

    def progress(stage, step, total, row):
        newest = latest_checkpoint(stage_uri(cfg, stage))
        told.append((step, newest and read_train_state(newest).step))
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        run_stage(cfg, "pretrain", Runtime(), progress)
    # Logged every step, checkpointed every third.
    assert told == [(1, None), (2, None), (3, 3), (4, 3), (5, 3), (6, 6)]


def test_sft_runs_on_the_quality_subset_from_its_parent(vae_run, tmp_path):
    # SFT trains on longer clips (49 frames) than pretraining (33): its own buckets.
    cfg = _config(
        vae_run.data.curated_uri,
        str(tmp_path / "chain"),
        init_from="",
        data={"sft_top_fraction": 0.5},
        sft={"frame_buckets": [49]},
    )
    # Reuse the finished VAE by pointing this run's vae stage at it.
    storage.makedirs(cfg.run_uri + "/vae")
    for name in ("config.json", "model.safetensors"):
        storage.write_bytes(
            f"{cfg.run_uri}/vae/final/{name}",
            storage.read_bytes(f"{final_uri(vae_run, 'vae')}/{name}"),
        )
    finals = train(cfg, stages=("vae", "pretrain", "sft"), runner="local")
    meta = storage.read_json(finals["sft"] + "/config.json")["extra"]
    assert meta["parent"] == finals["pretrain"]
    rows = load_clip_rows(stage_data(cfg, "sft"), 16.0)
    assert {r.bucket for r in rows} == {49}
    subset = {r.clip_id for r in sft_subset(rows, 0.5)}
    assert 0 < len(subset) < len(rows)
    sft = {c for r in _samples(cfg.run_uri + "/sft") for c in r["clips"]}
    assert sft and sft <= subset, "SFT trained on clips outside the quality subset"
    best = max(rows, key=lambda r: r.quality)
    assert best.clip_id in subset
    # Pretraining used every 33-frame clip; each bucket set has its own latent cache.
    pretrain = {c for r in _samples(cfg.run_uri + "/pretrain") for c in r["clips"]}
    assert pretrain - subset, "pretraining saw only the SFT clips"
    assert len(storage.filesystem(cfg.data.latent_cache_uri).ls(cfg.data.latent_cache_uri)) == 2


@pytest.fixture
def compute_calls(monkeypatch) -> list[str]:
    """Names of the compute entry points called: decoding a clip (every path to
    pixels goes through ``core.media.read_clip``), encoding latents, a backward
    pass, an optimizer step. Each still runs; the test asserts the list is empty."""
    import core.media
    import pipelines.train.latents

    calls: list[str] = []

    def watch(owner, name):
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    watch(core.media, "read_clip")
    watch(pipelines.train.latents, "encode_rows")
    watch(torch.autograd, "backward")
    watch(torch.optim.AdamW, "step")
    return calls


def _nothing_computed(cfg: TrainConfig, calls: list[str], keep: tuple[str, ...] = ()) -> None:
    """No compute entry point ran, and the run left nothing behind but ``keep``."""
    assert calls == [], f"compute ran before the error: {calls}"
    written = []
    for base in (cfg.run_uri, cfg.data.latent_cache_uri):
        if storage.exists(base):
            written += storage.filesystem(base).find(base)
    left = [w for w in written if not any(w.endswith(k) for k in keep)]
    assert left == [], f"files written before the error: {left}"


def test_bad_inputs_fail_before_any_compute(vae_run, tmp_path, compute_calls):
    rt = Runtime()
    parent = final_uri(vae_run, "vae")
    # A checkpoint of another preset.
    cfg = _config(vae_run.data.curated_uri, str(tmp_path / "p"), init_from=parent, preset="small")
    with pytest.raises(CheckpointError, match="holds preset 'tiny'"):
        run_stage(cfg, "pretrain", rt)
    _nothing_computed(cfg, compute_calls)
    # A parent stage that never finished.
    cfg = _config(vae_run.data.curated_uri, str(tmp_path / "q"))
    with pytest.raises(TrainError, match="needs 'vae' first"):
        run_stage(cfg, "pretrain", rt)
    _nothing_computed(cfg, compute_calls)
    # A frame bucket the VAE cannot encode (not 1 + 4k).
    cfg = _config(
        vae_run.data.curated_uri,
        str(tmp_path / "r"),
        init_from=parent,
        data={"frame_buckets": [30]},
    )
    with pytest.raises(TrainError, match="frame_buckets"):
        run_stage(cfg, "pretrain", rt)
    _nothing_computed(cfg, compute_calls)
    # A manifest without usable clips: every clip is shorter than the bucket.
    cfg = _config(
        vae_run.data.curated_uri,
        str(tmp_path / "s"),
        init_from=parent,
        data={"frame_buckets": [401]},
    )
    with pytest.raises(TrainDataError, match="no kept clips"):
        run_stage(cfg, "pretrain", rt)
    _nothing_computed(cfg, compute_calls)
    # Crops picked among no candidates.
    cfg = _config(
        vae_run.data.curated_uri, str(tmp_path / "u"), vae={"crop_px": 32, "crop_candidates": 0}
    )
    with pytest.raises(TrainError, match="crop_candidates"):
        run_stage(cfg, "vae", rt)
    _nothing_computed(cfg, compute_calls)
    # A corrupt checkpoint to resume from.
    cfg = _config(vae_run.data.curated_uri, str(tmp_path / "t"), init_from=parent)
    bad = storage.join(cfg.run_uri, "pretrain", "checkpoint_00000003")
    storage.write_json(
        storage.join(bad, "train_state.json"), {"schema_version": 1, "stage": "pretrain", "step": 3}
    )
    storage.write_bytes(storage.join(bad, "model.safetensors"), b"not a safetensors file")
    storage.write_json(storage.join(bad, "config.json"), storage.read_json(parent + "/config.json"))
    with pytest.raises(CheckpointError):
        run_stage(cfg, "pretrain", rt)
    _nothing_computed(
        cfg, compute_calls, keep=("train_state.json", "model.safetensors", "config.json")
    )
    # The bad checkpoint is left as it was, for a person to look at.
    assert storage.read_bytes(storage.join(bad, "model.safetensors")) == b"not a safetensors file"


def test_a_checkpoint_ray_restored_is_read_then_released(vae_run, tmp_path):
    """Under Ray Train the loop resumes from a local copy of the newest checkpoint and
    hands it back once the state is in memory (kept, every restart's copy stayed on
    the worker's disk). A Runtime standing in for Ray's hands out a copy of the shared
    VAE run's last checkpoint."""
    from pipelines.train.state import latest_checkpoint

    newest = latest_checkpoint(stage_uri(vae_run, "vae"))
    copy = str(tmp_path / "restored")
    fs = storage.filesystem(newest)
    fs.get(storage.strip_scheme(newest), copy, recursive=True)
    released = []

    class RayLike(Runtime):
        def restored_checkpoint(self):
            return copy

        def release_restored(self, local_dir):
            released.append((local_dir, os.path.exists(local_dir)))

    cfg = _config(vae_run.data.curated_uri, str(tmp_path / "run"),
                  data={"latent_cache_uri": vae_run.data.latent_cache_uri})  # fmt: skip
    result = run_stage(cfg, "vae", RayLike())
    assert result.resumed_from == copy and result.steps == 6
    assert released == [(copy, True)]
