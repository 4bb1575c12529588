"""How the Trainer spreads a model over ``torchrun`` processes: DDP (a full copy each) or FSDP2 (each process holds
a shard of every parameter, for models that do not fit one process).

Both average gradients over ranks, so the Trainer's loss weighting is the same for either.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from laformer.errors import TrainingError

STRATEGIES = ("ddp", "fsdp")


def wrap_model(model: nn.Module, strategy: str, world_size: int) -> nn.Module:
    """DDP around ``model``, or FSDP2 sharding of each decoder layer and then the rest (in place)."""
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (world_size,))
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of micro-batches before the last of an optimiser step."""
    if sync or not hasattr(wrapped, "no_sync") and not hasattr(wrapped, "set_requires_gradient_sync"):
        yield
    elif hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def reshard(model: nn.Module) -> None:
    """Back to the sharded parameters (FSDP2 keeps the root's gathered after a forward; those copies are dropped
    at the next reshard, so reads and writes must go to the shards)."""
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):
            module.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter; a collective, so every rank must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a whole tensor into a parameter, sharding it first when the parameter is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(full)


def check_strategy(strategy: str, fgm_epsilon: float) -> None:
    if strategy not in STRATEGIES:
        raise TrainingError(f"distributed strategy {strategy!r} is unknown; use one of {STRATEGIES}")
    if strategy == "fsdp" and fgm_epsilon > 0:
        raise TrainingError("FGM reads the input embeddings outside the forward, which FSDP keeps sharded; "
                            "use distributed='ddp' with fgm_epsilon, or turn FGM off")
