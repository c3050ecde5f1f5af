"""Parallelism applied to a :class:`DualBranchDiT` from outside, torchtitan style.

The model code knows nothing about activation checkpointing, compilation or
sharding. :func:`parallelize_dit` applies them in torchtitan's order:

1. activation checkpointing: every :class:`DualBlock` is wrapped so its
   activations are recomputed in backward (``checkpoint_wrapper``, non-reentrant):
   all of them ("full"), or all but the matmul and attention outputs ("selective":
   only the memory-bound norms, modulations and activations are recomputed, so the
   backward repeats none of the FLOPs and most of the memory is still saved);
2. ``torch.compile`` of every (wrapped) block, in place (``Module.compile``), so
   parameter names and state-dict keys do not change;
3. FSDP2: ``fully_shard`` on every block, then on the root, over a 1-D device mesh,
   with a mixed-precision policy (parameters gathered in ``param_dtype``, gradients
   reduced in ``reduce_dtype``, the sharded master weights stay in their dtype).

The DiT keeps its forward signature. Under FSDP2 the root's own parameters (input
embeddings, ``null_text``, heads) are unsharded only inside ``forward``: drop text
through ``dit(..., text_drop=mask)``, never by calling ``dit.drop_text`` outside it.

Without FSDP, data parallelism is plain DDP: :func:`apply_ddp` wraps the (already
checkpointed/compiled) DiT; :func:`unwrap` gives back the DiT for state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model.dit import DualBranchDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AC_MODES = ("none", "full", "selective")


@dataclass
class ParallelConfig:
    activation_checkpointing: str = "none"  # "none" | "full" | "selective" (every DualBlock)
    compile: bool = False  # torch.compile each DualBlock
    compile_backend: str = "inductor"  # "aot_eager" compiles fast, for tests
    fsdp: bool = False  # FSDP2 over the mesh (blocks, then the root)
    param_dtype: str = "bf16"  # FSDP2 compute dtype of gathered parameters
    reduce_dtype: str = "fp32"  # FSDP2 gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # False: keep gathered params until backward
    # bf16 autocast around each training step's forward and loss, weights and optimiser
    # state kept in fp32: mixed precision for a worker that does not shard (FSDP2 already
    # computes in param_dtype).
    autocast: bool = False

    def validate(self) -> ParallelConfig:
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"activation_checkpointing must be one of {AC_MODES}, "
                f"got {self.activation_checkpointing!r}"
            )
        if self.autocast and self.fsdp:
            raise ValueError(
                "parallel.autocast is mixed precision without sharding: with parallel.fsdp "
                "the gathered weights already compute in parallel.param_dtype"
            )
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}"
                )
        return self


def parallelize_dit(
    dit: DualBranchDiT, cfg: ParallelConfig, mesh: torch.distributed.DeviceMesh | None = None
) -> DualBranchDiT:
    """Apply checkpointing, compile and FSDP2 to ``dit`` in place; returns it.

    ``mesh``: 1-D device mesh for FSDP2; the default is every rank of the default
    process group on this process's device type (``cuda`` when available, else ``cpu``).
    Parameters may live on the meta device (large presets): FSDP2 shards them there
    and the caller materialises them (``to_empty`` + init, or a checkpoint load).
    """
    cfg.validate()
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(dit, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(dit, cfg.compile_backend)
    if cfg.fsdp:
        apply_fsdp(
            dit,
            mesh if mesh is not None else default_mesh(),
            param_dtype=DTYPES[cfg.param_dtype],
            reduce_dtype=DTYPES[cfg.reduce_dtype],
            reshard_after_forward=cfg.reshard_after_forward,
        )
    return dit


def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention_for_cpu")  # fmt: skip
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED = _saved_ops()


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(dit: DualBranchDiT, mode: str = "full") -> None:
    """Recompute every block's activations in backward (keys keep their names).

    "selective" keeps the outputs of matmuls and attention (op-level selective
    checkpointing, torchtitan's "op" mode) and recomputes the elementwise ops.
    """
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing mode must be full or selective, got {mode!r}")
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    wrap = partial(checkpoint_wrapper, preserve_rng_state=True, **extra)
    for i, block in enumerate(dit.blocks):
        dit.blocks[i] = wrap(block)


def apply_compile(dit: DualBranchDiT, backend: str = "inductor") -> None:
    """``torch.compile`` every block in place: the blocks repeat, so one graph serves all."""
    for block in dit.blocks:
        block.compile(backend=backend)


def apply_fsdp(
    dit: DualBranchDiT,
    mesh: torch.distributed.DeviceMesh,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2: one communication group per DualBlock, the remaining parameters at the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"FSDP2 here shards over a 1-D mesh, got {mesh.ndim}-D")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    last = len(dit.blocks) - 1
    for i, block in enumerate(dit.blocks):
        # The last block's parameters are needed again at once by backward: keep them.
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp,
            reshard_after_forward=reshard_after_forward and i < last,
        )
    fully_shard(dit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def default_mesh() -> torch.distributed.DeviceMesh:
    """A 1-D mesh over every rank of the initialised default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 needs an initialised process group (torch.distributed)")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def apply_ddp(dit: nn.Module, device_ids: list[int] | None = None) -> nn.Module:
    """DistributedDataParallel around ``dit`` (when FSDP is off); see :func:`unwrap`."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(dit, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the module itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
