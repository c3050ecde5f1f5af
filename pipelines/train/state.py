"""Training checkpoints: weights, EMA, optimizer state and the data position, at any URI.

A training checkpoint is a directory:

- ``model.safetensors`` + ``config.json``: the whole pipeline, loadable by
  ``DuetPipeline.from_checkpoint`` (so any checkpoint can be sampled from);
- ``ema.safetensors``: the EMA of the trained module's weights (when EMA is on);
- ``optimizer.safetensors``: optimizer state tensors keyed by parameter name;
- ``train_state.json``, written last, so its presence means the directory is whole:
  stage, step, sampler position, seed, optimizer param groups, parent, data version.

Random numbers are drawn from generators seeded by ``(seed, stage, step, rank)``, so
the step and the seed *are* the RNG state: a resumed run draws the same noise,
timesteps and dropouts as an uninterrupted one. Model and optimizer state go
through ``torch.distributed.checkpoint.state_dict`` with full (unsharded) state,
which works for plain, DDP and FSDP2 modules alike; this is what lets a checkpoint
written by N workers load into M.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from core import storage
from model.checkpoint import COMPONENTS, CheckpointError, load_state, save_state

STATE_NAME = "train_state.json"
EMA_NAME = "ema.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
# Weights a stage trains that are no pipeline component (the VAE stage's GAN
# discriminators): kept for resume, never in the pipeline's own weights.
TRAINING_ONLY_NAME = "training_only.safetensors"
CHECKPOINT_PREFIX = "checkpoint_"
FINAL_NAME = "final"
STATE_SCHEMA_VERSION = 1

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainState:
    stage: str
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next global batch of the epoch
    seed: int = 0
    parent: str = ""  # checkpoint the stage started from
    data_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state of a plain, DDP or FSDP2 module (collective under FSDP)."""
    return get_model_state_dict(module, options=_FULL)


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def pipeline_tensors(pipeline, trained: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Every component's tensors, taking the trained components' full states as given."""
    tensors = {}
    for name in COMPONENTS:
        state = trained.get(name)
        if state is None:
            state = getattr(pipeline, name).state_dict()
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value
    return tensors


def pipeline_meta(pipeline, extra: dict | None = None) -> dict:
    return {
        "config": pipeline.config.to_dict(),
        "components": list(COMPONENTS),
        "use_neural_vocoder": bool(pipeline.use_neural_vocoder),
        "extra": extra or {},
    }


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    # With cpu_offload, only rank 0 receives the full state; the others get {}.
    tensors = {}
    for fqn, values in osd.get("state", {}).items():
        for key, value in values.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{fqn}/{key}"] = t.detach().cpu().contiguous()
    groups = [dict(g) for g in osd.get("param_groups", [])]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = value
    return {"state": state, "param_groups": groups}


def gather_training_state(module: nn.Module, optimizer, ema: dict | None):
    """Full model, optimizer and EMA state (every rank must call it)."""
    model_state = full_model_state(module)
    opt_tensors, groups = _flatten_optimizer(
        get_optimizer_state_dict(module, optimizer, options=_FULL)
    )
    ema_state = None
    if ema is not None:
        ema_state = {name: _full(t) for name, t in ema.items()}
    return model_state, opt_tensors, groups, ema_state


def _full(t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().cpu().contiguous()


def write_checkpoint(
    uri: str,
    pipeline,
    trained: dict[str, dict[str, torch.Tensor]],
    opt_tensors: dict,
    ema_state: dict | None,
    state: TrainState,
) -> None:
    """Write one training checkpoint directory (rank 0 only)."""
    save_state(
        uri,
        pipeline_tensors(pipeline, trained),
        pipeline_meta(pipeline, {"stage": state.stage, "step": state.step}),
    )
    storage.write_bytes(storage.join(uri, OPTIMIZER_NAME), save_safetensors(opt_tensors))
    extra = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, comp in trained.items()
        if name not in COMPONENTS
        for key, value in comp.items()
    }
    if extra:
        storage.write_bytes(storage.join(uri, TRAINING_ONLY_NAME), save_safetensors(extra))
    if ema_state is not None:
        storage.write_bytes(storage.join(uri, EMA_NAME), save_safetensors(ema_state))
    storage.write_json(
        storage.join(uri, STATE_NAME), {"schema_version": STATE_SCHEMA_VERSION, **asdict(state)}
    )


def read_train_state(uri: str) -> TrainState:
    path = storage.join(uri, STATE_NAME)
    if not storage.exists(path):
        raise CheckpointError(f"{uri}: no {STATE_NAME}; the checkpoint is incomplete")
    data = storage.read_json(path)
    if data.pop("schema_version", None) != STATE_SCHEMA_VERSION:
        raise CheckpointError(f"{path}: unknown schema version")
    return TrainState(**data)


def open_checkpoint(uri: str) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Read and check a training checkpoint (cheap next to training: fail here, early)."""
    state = read_train_state(uri)
    try:
        tensors, _ = load_state(uri)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' own errors for truncated/corrupt files
        raise CheckpointError(f"{uri}: unreadable weights: {err}") from err
    for name in (OPTIMIZER_NAME,):
        if not storage.exists(storage.join(uri, name)):
            raise CheckpointError(f"{uri}: {name} missing")
    return state, tensors


def restore_checkpoint(
    uri: str,
    components: tuple[str, ...],
    module: nn.Module,
    optimizer,
    ema: dict | None,
    opened: tuple[TrainState, dict[str, torch.Tensor]] | None = None,
) -> TrainState:
    """Load a training checkpoint into the live module, optimizer and EMA.

    ``components``: the pipeline components the module holds; one component means
    the module *is* that component (its keys carry no prefix).
    """
    # ``opened``: what open_checkpoint already read, so the weights are read once.
    state, tensors = opened or open_checkpoint(uri)
    extra_uri = storage.join(uri, TRAINING_ONLY_NAME)
    if any(c not in COMPONENTS for c in components) and storage.exists(extra_uri):
        try:
            tensors = {**tensors, **load_safetensors(storage.read_bytes(extra_uri))}
        except Exception as err:  # safetensors' own errors for truncated/corrupt files
            raise CheckpointError(f"{extra_uri}: unreadable: {err}") from err
    if len(components) == 1:
        prefix = f"{components[0]}."
        model_state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        model_state = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in components}
    try:
        load_full_model_state(module, model_state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{uri}: {components} do not match the model: {err}") from err
    opt_tensors = load_safetensors(storage.read_bytes(storage.join(uri, OPTIMIZER_NAME)))
    # strict=False: a parameter no step has updated yet has no optimizer state (the
    # distill stage's unused null token; DMD2's student before its first update).
    set_optimizer_state_dict(
        module,
        optimizer,
        _unflatten_optimizer(opt_tensors, state.param_groups),
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    # Loading first gives every parameter a zero state at step 1; one that had none
    # must have none again, or its first real update is bias-corrected as a second.
    saved = {name.rsplit("/", 1)[0] for name in opt_tensors}
    for name, param in module.named_parameters():
        for wrapper in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
            name = name.replace(wrapper, "")
        if name not in saved:
            optimizer.state.pop(param, None)
    if ema is not None:
        ema_uri = storage.join(uri, EMA_NAME)
        if not storage.exists(ema_uri):
            raise CheckpointError(f"{uri}: EMA is on but the checkpoint has no {EMA_NAME}")
        saved = load_safetensors(storage.read_bytes(ema_uri))
        for name, live in ema.items():
            _copy_into(live, saved[name])
    return state


def _copy_into(live: torch.Tensor, full: torch.Tensor) -> None:
    with torch.no_grad():
        if hasattr(live, "device_mesh"):  # a DTensor shard: take our part of the full tensor
            from torch.distributed.tensor import distribute_tensor

            live.copy_(distribute_tensor(full.to(live.dtype), live.device_mesh, live.placements))
        else:
            live.copy_(full.to(live.device, live.dtype))


def checkpoint_dir(stage_uri: str, step: int) -> str:
    return storage.join(stage_uri, f"{CHECKPOINT_PREFIX}{step:08d}")


def list_checkpoints(stage_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every complete checkpoint under a stage directory, oldest first.

    Both layouts count: ours (``checkpoint_<step>``) and Ray Train's (its own
    ``checkpoint_*`` names under the same directory); the step is read from
    ``train_state.json``, which a checkpoint writes last.
    """
    fs = storage.filesystem(stage_uri)
    base = storage.strip_scheme(stage_uri)
    if not fs.exists(base):
        return []
    found = []
    for entry in fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        uri = storage.join(stage_uri, name)
        state_uri = storage.join(uri, STATE_NAME)
        if not storage.exists(state_uri):
            continue
        try:
            step = int(json.loads(storage.read_text(state_uri))["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        found.append((step, uri))
    return sorted(found)


def latest_checkpoint(stage_uri: str) -> str | None:
    found = list_checkpoints(stage_uri)
    return found[-1][1] if found else None


def prune_checkpoints(stage_uri: str, keep: int) -> None:
    for _, uri in list_checkpoints(stage_uri)[:-keep] if keep > 0 else []:
        storage.remove(uri, recursive=True)
