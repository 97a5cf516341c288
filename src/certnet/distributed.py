"""Multi-process training with PyTorch's own distributed engine, launched by ``torchrun``.

``torchrun --nproc-per-node N -m certnet.cli train ...`` (or ``--nnodes``/``--rdzv-*`` for
several machines) starts N processes that describe themselves in the environment (WORLD_SIZE,
RANK, LOCAL_RANK); :func:`setup` joins them (NCCL on CUDA, gloo on the CPU) and picks the GPU
from LOCAL_RANK. Every rank computes the same global batch order and takes its shard of each
batch; gradients are averaged by DistributedDataParallel through the method's own ``loss`` (a
:class:`LossModule`, so DDP sees a real forward), weighted so the step equals the
single-process step on the whole batch. Only rank 0 (``World.main``) logs, evaluates and writes
checkpoints; epoch statistics are summed over ranks once per epoch. ``certnet certify``
under torchrun splits the test set across ranks and gathers one report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from certnet.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process logs, evaluates and writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, batch: torch.Tensor) -> slice:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        n, size = len(batch), self.size
        start = self.rank * (n // size) + min(self.rank, n % size)
        return slice(start, start + n // size + (self.rank < n % size))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all ranks (a no-op for one process)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values


def distributed_run() -> bool:
    """Whether this process is one of several (an initialised process group of size > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def batch_mean(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """The mean of ``x`` over ``dims`` and, in a distributed run, over every rank's shard of
    the batch (an all-reduce with autograd: gradients reach every rank's inputs), so layers
    that normalise by batch statistics see the whole batch, as in one process."""
    if not distributed_run():
        return x.mean(dims)
    from torch.distributed.nn.functional import all_reduce

    count = x.new_tensor(float(x.numel() // x.shape[1]))
    total = all_reduce(x.sum(dims))
    dist.all_reduce(count)
    return total / count


def batch_variance(x: torch.Tensor, mean: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """The biased variance of ``x`` over ``dims`` around ``mean`` (of the global batch in a
    distributed run, like :func:`batch_mean`)."""
    shape = [1, -1, *([1] * (x.dim() - 2))]
    return batch_mean((x - mean.view(shape)).square(), dims)


def setup(device: torch.device) -> tuple[World, torch.device]:
    """The world torchrun describes in the environment, its process group initialised, and
    the device: ``cuda:LOCAL_RANK`` where the requested device is CUDA. One process without
    WORLD_SIZE > 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"WORLD_SIZE={size} but RANK / LOCAL_RANK are missing or not "
                          "integers: launch distributed runs with torchrun") from err
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local), device


def _synced_forward(m: nn.modules.batchnorm._BatchNorm):
    """BatchNorm's training forward with the global batch's statistics (the running
    statistics updated as torch does, with the unbiased variance of the global batch)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        mean = batch_mean(x, dims)
        var = batch_variance(x, mean, dims)
        if m.track_running_stats and m.running_mean is not None:
            with torch.no_grad():
                m.num_batches_tracked += 1
                factor = m.momentum if m.momentum is not None else \
                    1.0 / float(m.num_batches_tracked)
                count = float(x.numel() // x.shape[1]) * dist.get_world_size()
                m.running_mean.lerp_(mean.detach(), factor)
                m.running_var.lerp_(var.detach() * count / max(count - 1, 1), factor)
        shape = [1, -1, *([1] * (x.dim() - 2))]
        out = (x - mean.view(shape)) * torch.rsqrt(var + m.eps).view(shape)
        if m.weight is not None:
            out = out * m.weight.view(shape) + m.bias.view(shape)
        return out
    return forward


@contextmanager
def synced_batch_norm(model: nn.Module) -> Iterator[None]:
    """While active, in a distributed run, every BatchNorm of ``model`` in training mode
    normalises by the global batch (an autograd all-reduce, on any device: torch's
    SyncBatchNorm is GPU-only); nothing changes for one process."""
    patched = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not (patched and distributed_run()):
        yield
        return
    for m in patched:
        m.forward = _synced_forward(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def shutdown() -> None:
    """Leave the process group, if one was joined (a rank that exits with gloo's threads
    still running is aborted at interpreter shutdown)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """A method's ``loss`` as a module's forward, so DistributedDataParallel wraps a real
    forward pass (not a call on ``.module``) and averages the gradients it produces;
    BatchNorm layers use the global batch's statistics meanwhile."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: float, **extra: Any):
        with synced_batch_norm(self.model):
            return self.model.loss(x, y, eps, **extra)


def loss_function(model: nn.Module, world: World, device: torch.device):
    """``model.loss`` for one process, its DDP-wrapped :class:`LossModule` for several."""
    if not world.active:
        return model.loss
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        LossModule(model), device_ids=ids, find_unused_parameters=model.skips_parameters)
