"""Training on several processes with torchrun: the process group, sums across ranks, BatchNorm.

Under `torchrun --nproc_per_node N main.py ...` each process trains on its share of every
global batch (--batch-size is the global batch). The loss and the BatchNorm statistics are
computed over the whole global batch from partial sums added up across ranks, so N
processes take the same optimiser steps as one process with the same --batch-size.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Rank 0 writes files, shows progress bars and evaluates."""
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1


def init_distributed(use_cuda):
    """Join the process group torchrun set up (nccl on GPUs, gloo on CPUs); one process: a plain context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", ctx.local_rank))
        else:
            dist.init_process_group("gloo")
    return ctx


def close_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def max_across_ranks(value, device):
    """The largest of an integer over all ranks, on every rank: keeps decisions such as stopping in step."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is also all_reduce(SUM).

    Every rank computes its loss from the summed value. The gradient reaching rank r's
    partial sum must then be the sum over ranks of each rank's upstream gradient, which is
    what an all-reduce of the gradients gives. Every rank thereby holds N times its share of
    the global gradient, and DDP's averaging over N ranks leaves exactly the global gradient.
    """

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


# Run eagerly under --compile: a collective inside a custom autograd function is no graph to capture.
@torch.compiler.disable
def sum_across_ranks(t):
    """Differentiable sum of `t` over all ranks; `t` itself when running as one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _SumAcrossRanks.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch, on CPU (gloo) and GPU (nccl).

    torch.nn.SyncBatchNorm refuses CPU tensors and synchronises the host in every layer;
    this one adds per-rank sums with one all-reduce per layer and no host synchronisation.
    Its state dict is BatchNorm2d's, so checkpoints do not depend on how many processes
    wrote them.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least, under autocast too
        # Sums of deviations from the running mean rather than of raw values: the variance
        # E[d²] − E[d]² then loses no precision to cancellation.
        # (A copy: the running mean is updated in place below, which torch.compile cannot trace through a view.)
        shift = self.running_mean.detach().clone().view(1, c, 1, 1)
        d = xf - shift
        count = torch.full((1,), x.numel() // c, dtype=xf.dtype, device=x.device)
        sums = sum_across_ranks(torch.cat([d.sum(dim=(0, 2, 3)), (d * d).sum(dim=(0, 2, 3)), count]))
        n = sums[-1]
        mean_d = sums[:c] / n
        var = (sums[c:2 * c] / n - mean_d * mean_d).clamp_min(0)
        mean = shift.view(c) + mean_d
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).detach(), momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        y = (xf - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1)
        if self.affine:
            y = y + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_batchnorm(module):
    """Replace every BatchNorm2d under `module` by a GlobalBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats,
                                    device=child.running_mean.device, dtype=child.running_mean.dtype)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def wrap_for_processes(model, dist_state, device):
    """The module a training loop calls: `model` itself on one process, inside DDP under torchrun."""
    if not dist_state.active:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Buffers need no syncing per step: GlobalBatchNorm2d updates them identically on every rank.
    # Newer PyTorch calls the option forward_sync_buffers, older broadcast_buffers.
    options = inspect.signature(DistributedDataParallel).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{name: False})
