"""Checkpoints: ``model.safetensors`` plus ``config.json`` beside it, at any URI.

Never pickle: tensors go through safetensors, everything else is JSON. The JSON
carries a ``schema_version``, the full :class:`ModelConfig` and which components
the tensor file holds, so a checkpoint loads without knowing its preset.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from core import storage
from model.configs import ModelConfig

SCHEMA_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
COMPONENTS = ("video_vae", "audio_vae", "dit", "vocoder")


class CheckpointError(Exception):
    """A checkpoint is missing, from an unknown schema, or does not fit its config."""


def save_state(uri: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors and JSON metadata as a checkpoint directory at uri."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    storage.makedirs(uri)
    storage.write_bytes(
        storage.join(uri, WEIGHTS_NAME), save_safetensors(flat, metadata={"format": "pt"})
    )
    storage.write_json(storage.join(uri, CONFIG_NAME), {"schema_version": SCHEMA_VERSION, **meta})


def load_state(uri: str) -> tuple[dict[str, torch.Tensor], dict]:
    weights, config = storage.join(uri, WEIGHTS_NAME), storage.join(uri, CONFIG_NAME)
    for path in (weights, config):
        if not storage.exists(path):
            raise CheckpointError(f"checkpoint file missing: {path}")
    meta = storage.read_json(config)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{config}: schema_version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    return load_safetensors(storage.read_bytes(weights)), meta


def save_pipeline(uri: str, pipeline, extra: dict | None = None) -> None:
    tensors = {}
    for name in COMPONENTS:
        for key, value in getattr(pipeline, name).state_dict().items():
            tensors[f"{name}.{key}"] = value
    meta = {
        "config": pipeline.config.to_dict(),
        "components": list(COMPONENTS),
        "use_neural_vocoder": bool(pipeline.use_neural_vocoder),
        "extra": extra or {},
    }
    save_state(uri, tensors, meta)


def load_pipeline(uri: str, text_encoder=None):
    from model.pipeline import DuetPipeline

    tensors, meta = load_state(uri)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{uri}: bad config: {err}") from err
    pipeline = DuetPipeline(cfg, text_encoder)
    for name in meta.get("components", COMPONENTS):
        if name not in COMPONENTS:
            raise CheckpointError(f"{uri}: unknown component {name!r}")
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            getattr(pipeline, name).load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{uri}: {name} does not match its config: {err}") from err
    pipeline.use_neural_vocoder = bool(meta.get("use_neural_vocoder", False))
    pipeline.eval()
    return pipeline
