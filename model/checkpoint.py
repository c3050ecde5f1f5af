"""Checkpoints: safetensors weights plus ``config.json`` beside them, at any URI.

Never pickle: tensors go through safetensors, everything else is JSON. Layout of a
checkpoint directory (schema 2)::

    config.json                           schema_version, the caller's metadata, and
                                          "weight_files": {name: {size, sha256}}
    model.safetensors                     one file when the weights fit in one shard
    model-00001-of-0000N.safetensors      ... or N shards of at most max_shard_bytes
    model.safetensors.index.json          {"metadata": {"total_size"}, "weight_map"}

``config.json`` is written last, so it doubles as the commit marker. Schema 1 (one
``model.safetensors``, no file table) is still read.

Everything that can be checked is checked before a tensor is read or a network is
built: the schema version, that every weight file exists with its recorded size
(truncation), that every safetensors header parses and covers its file, and, for
:func:`model.pipeline.load_pipeline`, that every key and shape matches the
config's networks (a checkpoint of another preset). File hashes are verified while the data is read.
Failures raise :class:`CheckpointError` naming the file.

This module knows state dicts and files, not networks: the pipeline's own save and
load (:mod:`model.pipeline`) build on it. Pipelines load torchtitan style: built on
the meta device (no memory, no init), then ``load_state_dict(..., assign=True)``
puts the stored tensors in place.
:func:`gather_full_state_dict` and :func:`load_full_state_dict` convert between a
full state dict and an FSDP2-sharded module, so a checkpoint written at N workers
loads at M.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core import storage
from model.configs import ModelConfig
from model.dit import fill_new_keys

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
COMPONENTS = ("video_vae", "audio_vae", "dit", "vocoder")
DEFAULT_SHARD_BYTES = 2 * 1024**3
# Where `duet generate` looks when no checkpoint is named: $DUET_CHECKPOINT, else this
# directory of the source tree (the shipped default, once there is one).
DEFAULT_CHECKPOINT_ENV = "DUET_CHECKPOINT"
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
# Config fields that existed in older checkpoints and are dropped on load.
RETIRED_CONFIG_FIELDS = {"dit": ("gradient_checkpointing",)}

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt, from an unknown schema, or does not fit its config."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    file: str  # weight file name inside the checkpoint directory


def default_checkpoint() -> str | None:
    """The checkpoint to use when none is named: ``$DUET_CHECKPOINT`` if set (any URI),
    else ``checkpoints/default/`` of the source tree if it holds a checkpoint; None if
    neither exists. The caller decides what no checkpoint means (``duet generate``
    refuses)."""
    env = os.environ.get(DEFAULT_CHECKPOINT_ENV, "").strip()
    if env:
        return env
    if (DEFAULT_CHECKPOINT_DIR / CONFIG_NAME).is_file():
        return str(DEFAULT_CHECKPOINT_DIR)
    return None


# -- writing -----------------------------------------------------------------------


_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped greedily, in order, into shards of at most max_shard_bytes each
    (a single tensor larger than that gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def save_state(
    uri: str,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write tensors (one file, or shards with an index) and JSON metadata at uri.

    config.json goes first out and last in: a save that dies half way leaves a
    directory that reads as missing, never old and new weights mixed. Weight files of
    an earlier save at uri that the new one does not use are removed; other files
    (an optimizer state beside the weights) are left alone.
    """
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards = plan_shards(flat, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [shard_name(i + 1, len(shards)) for i in range(len(shards))]  # fmt: skip
    storage.makedirs(uri)
    storage.remove(storage.join(uri, CONFIG_NAME))
    files, weight_map = {}, {}
    for name, keys in zip(names, shards, strict=True):
        data = save_safetensors({k: flat[k] for k in keys}, metadata={"format": "pt"})
        storage.write_bytes(storage.join(uri, name), data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        weight_map.update(dict.fromkeys(keys, name))
    for stale in _weight_files_at(uri) - set(names):
        storage.remove(storage.join(uri, stale))
    if len(shards) == 1:
        storage.remove(storage.join(uri, INDEX_NAME))
    else:
        total = sum(v.numel() * v.element_size() for v in flat.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        storage.write_json(storage.join(uri, INDEX_NAME), index)
    storage.write_json(
        storage.join(uri, CONFIG_NAME),
        {**meta, "schema_version": SCHEMA_VERSION, "weight_files": files},
    )


def _weight_files_at(uri: str) -> set[str]:
    """Names of the model weight files directly in uri (single file or shards)."""
    root = storage.strip_scheme(uri).rstrip("/")
    names = set()
    for found in storage.list_files(uri, suffixes=(".safetensors",)):
        parent, _, name = storage.strip_scheme(found).rpartition("/")
        if parent == root and (name == WEIGHTS_NAME or _SHARD_RE.fullmatch(name)):
            names.add(name)
    return names


# -- checking (no tensor data read) --------------------------------------------------


def read_meta(uri: str) -> dict:
    """config.json of a checkpoint, after its schema version is checked."""
    config = storage.join(uri, CONFIG_NAME)
    if not storage.exists(config):
        raise CheckpointError(f"checkpoint file missing: {config}")
    try:
        meta = storage.read_json(config)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config}: not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("schema_version") not in READABLE_SCHEMAS:
        version = meta.get("schema_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{config}: unknown schema_version {version!r}; this Duet reads {READABLE_SCHEMAS}"
        )
    return meta


def inspect_state(uri: str) -> tuple[dict[str, TensorSpec], dict]:
    """Key -> dtype/shape/file of every stored tensor, and the metadata.

    Reads config.json, the index and the safetensors headers only.
    """
    meta = read_meta(uri)
    files = meta.get("weight_files")
    if files is None:  # schema 1
        files = {WEIGHTS_NAME: {}}
    specs: dict[str, TensorSpec] = {}
    fs = storage.filesystem(uri)  # one client for every file (an S3 client is costly)
    for name, info in files.items():
        path = storage.join(uri, name)
        try:
            actual = int(fs.size(storage.strip_scheme(path)))
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint file missing: {path}") from err
        if "size" in info and actual != info["size"]:
            raise CheckpointError(
                f"{path}: {actual} bytes, the checkpoint recorded {info['size']} (truncated "
                f"or overwritten)"
            )
        for key, spec in _read_header(fs, path, name, actual).items():
            if key in specs:
                raise CheckpointError(f"{path}: tensor {key!r} also stored in {specs[key].file}")
            specs[key] = spec
    index_path = storage.join(uri, INDEX_NAME)
    if len(files) > 1 or storage.exists(index_path):
        _check_index(index_path, specs)
    return specs, meta


def _read_header(fs, path: str, name: str, file_size: int) -> dict[str, TensorSpec]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check that
    the data offsets tile the rest of the file exactly."""
    # Two ranged reads: a stream would fetch a whole read-ahead block (50 MB on S3).
    key = storage.strip_scheme(path)
    if file_size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {file_size} bytes)")
    (n,) = struct.unpack("<Q", fs.cat_file(key, start=0, end=8))
    if n > min(file_size - 8, 100 * 1024**2):
        raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
    try:
        header = json.loads(fs.cat_file(key, start=8, end=8 + n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    specs, end = {}, 0
    for key, entry in header.items():
        try:
            dtype, (lo, hi) = entry["dtype"], entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            lo, hi = int(lo), int(hi)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors entry {key!r}") from err
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        nbytes = _DTYPES[dtype].itemsize * _numel(shape)
        if hi - lo != nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} spans {hi - lo} bytes, needs {nbytes}")
        specs[key] = TensorSpec(dtype, shape, name)
        end = max(end, hi)
    if 8 + n + end != file_size:
        raise CheckpointError(
            f"{path}: header describes {8 + n + end} bytes, the file has {file_size} (truncated)"
        )
    return specs


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _check_index(index_path: str, specs: dict[str, TensorSpec]) -> None:
    if not storage.exists(index_path):
        raise CheckpointError(f"checkpoint file missing: {index_path}")
    try:
        weight_map = storage.read_json(index_path)["weight_map"]
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index_path}: not a safetensors index: {err}") from err
    stored = {k: s.file for k, s in specs.items()}
    if weight_map != stored:
        diff = sorted(set(weight_map.items()) ^ set(stored.items()))[:5]
        raise CheckpointError(f"{index_path}: weight_map disagrees with the shards: {diff}")


def check_matches(
    specs: dict[str, TensorSpec], expected: dict[str, torch.Tensor], where: str
) -> None:
    """Stored keys and shapes must equal the expected state dict's (shapes only:
    a dtype cast on load is allowed)."""
    missing = sorted(set(expected) - set(specs))
    unexpected = sorted(set(specs) - set(expected))
    wrong = [
        f"{k}: stored {list(specs[k].shape)}, model {list(expected[k].shape)}"
        for k in expected
        if k in specs and tuple(specs[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{where} does not match the model (another preset or config?): " + "; ".join(parts)
        )


# -- reading -------------------------------------------------------------------------


def load_state(uri: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (CPU) whose key starts with ``prefix`` (all by default), and the metadata.

    Every file is checked before any is read; only the shards that hold matching keys
    are read (``prefix="dit."`` skips the VAE shards of a large checkpoint).
    """
    specs, meta = inspect_state(uri)
    files = sorted({s.file for k, s in specs.items() if k.startswith(prefix)})
    tensors = read_tensors(uri, meta, files)
    if prefix:
        tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors, meta


def read_tensors(uri: str, meta: dict, names: list[str]) -> dict[str, torch.Tensor]:
    recorded = meta.get("weight_files", {})
    tensors: dict[str, torch.Tensor] = {}
    fs = storage.filesystem(uri)
    for name in names:
        path = storage.join(uri, name)
        try:
            data = fs.cat_file(storage.strip_scheme(path))
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint file missing: {path}") from err
        want = recorded.get(name, {}).get("sha256")
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{path}: sha256 differs from the checkpoint's record (corrupt)")
        try:
            tensors.update(load_safetensors(data))
        except SafetensorError as err:
            raise CheckpointError(f"{path}: corrupt safetensors: {err}") from err
    # safetensors returns keys in an order that varies between processes; callers that
    # run collectives per key (set_model_state_dict) need the same order on every rank.
    return dict(sorted(tensors.items()))


def model_config(meta: dict, where: str) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's metadata (retired fields dropped)."""
    try:
        data = json.loads(json.dumps(meta["config"]))
        for section, names in RETIRED_CONFIG_FIELDS.items():
            for name in names:
                data.get(section, {}).pop(name, None)
        return ModelConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: bad config: {err}") from err


def named_tensors(module: nn.Module):
    """(name, tensor) of a module's parameters, then its buffers."""
    yield from module.named_parameters()
    yield from module.named_buffers()


# -- FSDP2: full <-> sharded state dicts -------------------------------------------------


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU, under the plain module's keys.

    For an FSDP2-sharded module this is a collective: every rank must call it, and
    only rank 0 receives the tensors (the others get ``{}``), so a large model is
    never materialised on every rank at once.
    """
    if not _is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def load_full_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], broadcast_from_rank0: bool = False
) -> None:
    """Load a full state dict into ``module``, plain or FSDP2-sharded (each rank keeps
    its slice). Parameters on the meta device are replaced (``assign``).

    With ``broadcast_from_rank0`` only rank 0 needs ``state``; the others pass ``{}``.
    Keys and shapes are checked first (on every rank that holds ``state``).
    """
    if state:
        state = fill_new_keys(state, module.state_dict())  # keys newer than the checkpoint
    if state or not broadcast_from_rank0:
        specs = {k: TensorSpec("", tuple(v.shape), "state") for k, v in state.items()}
        check_matches(specs, module.state_dict(), "state dict")
    if not _is_sharded(module):
        assign = any(t.is_meta for _, t in named_tensors(module))
        module.load_state_dict(state, strict=True, assign=assign)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0)
    # Every key is scattered from rank 0 (distribute_tensor), a collective per key: the
    # order must be the same on every rank, so follow the module's. The call also pops
    # entries from the dict it is given: hand it a new one.
    ordered = {k: state[k] for k in module.state_dict() if k in state}
    set_model_state_dict(module, ordered, options=options)
