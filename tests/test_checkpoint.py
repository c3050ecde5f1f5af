"""Checkpoints: one file or shards + index at any URI, meta-device loads, and a clear
CheckpointError before any tensor is read for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from core import storage
from model import checkpoint as ck
from model.checkpoint import (
    CheckpointError,
    inspect_state,
    load_full_state_dict,
    load_state,
    plan_shards,
    save_state,
)
from model.dit import DualBranchDiT
from model.pipeline import DuetPipeline, load_pipeline

SHARD = 400_000  # bytes: the tiny pipeline (~18 MB) becomes dozens of shards


@pytest.fixture(scope="module")
def pipeline() -> DuetPipeline:
    pipe = DuetPipeline.from_preset("tiny", seed=0).eval()
    with torch.no_grad():  # latent statistics away from their init, to see them load
        pipe.video_vae.latent_std.fill_(0.5)
        pipe.audio_vae.latent_mean.fill_(0.25)
    return pipe


@pytest.fixture(scope="module")
def sharded(pipeline, tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("ckpt") / "sharded")
    pipeline.save(uri, max_shard_bytes=SHARD)
    return uri


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(100, generator=g),  # 400 bytes
        "b": torch.randn(10, 10, generator=g).to(torch.bfloat16),  # 200 bytes
        "c": torch.arange(300, dtype=torch.int64),  # 2400 bytes
        "d": torch.ones(3, dtype=torch.bool),
    }


def _no_reads(monkeypatch):
    """Fail the test if tensor data is read or a network is built with weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data read before the checkpoint was validated")

    monkeypatch.setattr(ck, "read_tensors", refuse)


# -- layout ------------------------------------------------------------------------


def test_plan_shards_is_greedy_in_order_and_isolates_oversized_tensors():
    t = _tensors()
    assert plan_shards(t, 10_000) == [["a", "b", "c", "d"]]
    assert plan_shards(t, 600) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(t, 100) == [["a"], ["b"], ["c"], ["d"]]
    with pytest.raises(ValueError):
        plan_shards(t, 0)


def test_small_state_is_one_file_and_round_trips(tmp_path):
    uri = str(tmp_path / "one")
    save_state(uri, _tensors(), {"step": 3})
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    tensors, meta = load_state(uri)
    assert meta["step"] == 3 and meta["schema_version"] == ck.SCHEMA_VERSION
    for key, value in _tensors().items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value)


def test_sharded_state_has_named_shards_and_an_index(tmp_path):
    uri = str(tmp_path / "many")
    save_state(uri, _tensors(), {}, max_shard_bytes=600)
    names = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert names == [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "b": "model-00001-of-00003.safetensors",
        "c": "model-00002-of-00003.safetensors",
        "d": "model-00003-of-00003.safetensors",
    }
    assert index["metadata"]["total_size"] == 400 + 200 + 2400 + 3
    tensors, _ = load_state(uri)
    assert all(torch.equal(tensors[k], v) for k, v in _tensors().items())

    # Saving over it with another layout leaves only the new layout's weight files
    # (and what is not a weight file, such as an optimizer state, alone).
    (tmp_path / "many" / "optimizer.safetensors").write_bytes(b"kept")
    save_state(uri, _tensors(), {}, max_shard_bytes=3000)
    assert list(load_state(uri)[0]) == ["a", "b", "c", "d"]
    save_state(uri, {"z": torch.zeros(2)}, {})
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    assert list(load_state(uri)[0]) == ["z"]


def test_a_save_that_dies_half_way_reads_as_missing(tmp_path, monkeypatch):
    uri = str(tmp_path / "c")
    save_state(uri, _tensors(), {"step": 1}, max_shard_bytes=600)
    written = []
    real_write = storage.write_bytes

    def dies_on_second_shard(target, data):
        written.append(target)
        if len(written) == 2:
            raise OSError("disk full")
        real_write(target, data)

    monkeypatch.setattr(storage, "write_bytes", dies_on_second_shard)
    with pytest.raises(OSError):
        save_state(uri, {k: v + 1 if v.is_floating_point() else v for k, v in _tensors().items()}, {"step": 2}, max_shard_bytes=600)  # fmt: skip
    with pytest.raises(CheckpointError, match="missing.*config.json"):
        load_state(uri)


def test_sharded_pipeline_round_trips_through_s3(pipeline, s3_bucket):
    uri = f"{s3_bucket}/runs/a/step-1"
    pipeline.save(uri, max_shard_bytes=4 * 2**20)
    shards = storage.list_files(uri, suffixes=(".safetensors",))
    assert len(shards) > 2 and all("-of-" in s for s in shards)
    loaded = load_pipeline(uri)
    for key, value in pipeline.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_state_reads_only_the_shards_of_a_prefix(pipeline, sharded, monkeypatch):
    read = []
    original = ck.read_tensors

    def spy(uri, meta, names):
        read.extend(names)
        return original(uri, meta, names)

    monkeypatch.setattr(ck, "read_tensors", spy)
    tensors, _ = load_state(sharded, prefix="dit.")
    expected = {f"dit.{k}": v for k, v in pipeline.dit.state_dict().items()}
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    specs, _ = inspect_state(sharded)
    assert set(read) == {s.file for k, s in specs.items() if k.startswith("dit.")}
    assert len(read) < len({s.file for s in specs.values()})


# -- meta-device loads ---------------------------------------------------------------


def test_load_pipeline_builds_on_meta_and_casts_the_dit(pipeline, sharded, monkeypatch):
    seen = []
    original = DualBranchDiT._init_weights

    def spy(self):
        seen.append(self.null_text.device.type)
        original(self)

    monkeypatch.setattr(DualBranchDiT, "_init_weights", spy)
    loaded = load_pipeline(sharded, dtype=torch.bfloat16)
    assert seen == ["meta"]
    assert all(p.dtype == torch.bfloat16 for p in loaded.dit.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.video_vae.parameters())
    for key, value in pipeline.dit.state_dict().items():
        assert torch.equal(loaded.dit.state_dict()[key], value.to(torch.bfloat16)), key
    # Buffers not stored in the checkpoint (the mel analysis) are computed again.
    for name, buf in pipeline.audio_vae.mel.named_buffers():
        assert torch.equal(dict(loaded.audio_vae.mel.named_buffers())[name], buf), name
    assert not any(t.is_meta for t in loaded.parameters())
    assert loaded.use_neural_vocoder == pipeline.use_neural_vocoder


def test_load_full_state_dict_assigns_onto_meta_and_checks_shapes(pipeline):
    state = {k: v.clone() for k, v in pipeline.dit.state_dict().items()}
    with torch.device("meta"):
        dit = DualBranchDiT(pipeline.config)
    load_full_state_dict(dit, state)
    assert not any(p.is_meta for p in dit.parameters())
    assert torch.equal(dit.null_text, pipeline.dit.null_text)

    state["video_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*video_in.weight"):
        load_full_state_dict(DualBranchDiT(pipeline.config), state)


def test_schema_1_checkpoint_with_a_retired_config_field_still_loads(pipeline, tmp_path):
    """The layout before sharding: one model.safetensors, no file table, and a config
    that still had dit.gradient_checkpointing."""
    from safetensors.torch import save_file

    uri = tmp_path / "v1"
    uri.mkdir()
    tensors = {f"{n}.{k}": v for n in ck.COMPONENTS for k, v in getattr(pipeline, n).state_dict().items()}  # fmt: skip
    save_file(tensors, str(uri / "model.safetensors"))
    config = pipeline.config.to_dict()
    config["dit"]["gradient_checkpointing"] = False
    meta = {"schema_version": 1, "config": config, "components": list(ck.COMPONENTS)}
    (uri / "config.json").write_text(json.dumps(meta))
    loaded = load_pipeline(str(uri))
    assert torch.equal(loaded.dit.null_text, pipeline.dit.null_text)


# -- errors before any compute --------------------------------------------------------


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _shard(directory, i: int):
    """The i-th shard file (1-based) of a sharded checkpoint directory."""
    (path,) = directory.glob(f"model-{i:05d}-of-*.safetensors")
    return path


def test_missing_config_or_shard_or_index(sharded, tmp_path, monkeypatch):
    _no_reads(monkeypatch)
    with pytest.raises(CheckpointError, match="missing.*config.json"):
        load_pipeline(str(tmp_path / "nowhere"))
    uri = _copy(sharded, tmp_path / "c")
    _shard(tmp_path / "c", 2).unlink()
    with pytest.raises(CheckpointError, match="missing.*model-00002-of-"):
        load_pipeline(uri)
    uri = _copy(sharded, tmp_path / "d")
    (tmp_path / "d" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="missing.*index.json"):
        load_state(uri)


def test_truncated_shard(sharded, tmp_path, monkeypatch):
    _no_reads(monkeypatch)
    uri = _copy(sharded, tmp_path / "c")
    shard = _shard(tmp_path / "c", 3)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00003-of-.*truncated"):
        load_pipeline(uri)
    # Even without the recorded size (a schema 1 checkpoint), the header gives it away.
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    del meta["weight_files"][shard.name]["size"]
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model-00003-of-.*truncated"):
        load_pipeline(uri)


def test_corrupt_header_and_corrupt_data(sharded, tmp_path, monkeypatch):
    uri = _copy(sharded, tmp_path / "c")
    shard = _shard(tmp_path / "c", 4)
    good = shard.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    shard.write_bytes(good[:8] + b"#" * n + good[8 + n :])  # same size, header garbage
    with monkeypatch.context() as m:
        _no_reads(m)
        with pytest.raises(CheckpointError, match="model-00004-of-.*corrupt"):
            load_pipeline(uri)
    # One flipped byte in the tensor data: the header is fine, the hash is not.
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="model-00004-of-.*sha256"):
        load_pipeline(uri)


def test_config_of_another_preset(sharded, tmp_path, monkeypatch):
    from model.configs import get_config

    _no_reads(monkeypatch)
    uri = _copy(sharded, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    meta["config"] = get_config("small").to_dict()
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the model.*shape mismatch"):
        load_pipeline(uri)


@pytest.mark.parametrize("version", [None, 0, 3, "2"])
def test_unknown_schema_version(sharded, tmp_path, monkeypatch, version):
    _no_reads(monkeypatch)
    uri = _copy(sharded, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    if version is None:
        del meta["schema_version"]
    else:
        meta["schema_version"] = version
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown schema_version"):
        load_pipeline(uri)
    with pytest.raises(CheckpointError, match="unknown schema_version"):
        inspect_state(uri)
