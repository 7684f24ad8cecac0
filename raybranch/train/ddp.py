"""Data-parallel training of one branch (``torch.nn.parallel.DistributedDataParallel``), in plain
PyTorch: what :func:`raybranch.train.loop.train_slice` does differently when its model is wrapped,
and a process group of one for running a branch's worker without Ray.

W ranks step in lockstep on a replicated state. Global batch b (the same seeded permutation on
every rank) is cut into W contiguous shards b_0 … b_{W−1} (``torch.tensor_split``); rank r runs
the forward and backward pass of

    loss_r = (W / |b|) · Σ_{i ∈ b_r} CE(f(x_i), y_i)

and DDP averages the gradients: (1/W) Σ_r ∇loss_r = ∇ (1/|b|) Σ_{i ∈ b} CE — the gradient one
process takes on the whole batch, up to the order of the float sums. A batch with fewer entries
than W (a slice's last, rarely) is skipped by every rank. Decisions taken on values a rank
computes itself are taken on rank 0's (:func:`agree`): the validation metric early stopping
reads. The loss is not checked on each rank (a NaN on one shard reaches every rank through the
averaged gradient): the parameters are, after the step, on every rank alike.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module of a DDP wrapper (its state dict has no ``module.`` prefixes)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def data_parallel(net: nn.Module) -> tuple[int, int] | None:
    """(rank, world size) when ``net`` is DDP-wrapped, else None."""
    if not isinstance(net, DistributedDataParallel):
        return None
    return dist.get_rank(), dist.get_world_size()


def shard(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
    """Rank ``rank``'s contiguous share of batch ``idx``; None when the batch has fewer than ``world`` entries."""
    if idx.numel() < world:
        return None
    return torch.tensor_split(idx, world)[rank]


def agree(value: float, net: nn.Module) -> float:
    """Rank 0's ``value`` on every rank (``value`` itself without DDP)."""
    if data_parallel(net) is None:
        return value
    dev = next(net.parameters()).device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.broadcast(t, src=0)
    return float(t.item())


def single_process_group(device: torch.device, port: int | None = None) -> str:
    """A process group of one (NCCL on CUDA, gloo on CPU) on loopback, for running a branch's
    worker without Ray; returns the backend. Already initialised: left as it is."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port or 29511))
        dist.init_process_group(backend, rank=0, world_size=1)
    return dist.get_backend()


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` moved to ``device`` and wrapped as Ray Train's ``prepare_model`` does."""
    model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


__all__ = ["agree", "data_parallel", "shard", "single_process_group", "unwrap", "wrap"]
