"""Accuracy on a (sharded) split, BatchNorm recalibration, and the derived network with inherited weights."""

from __future__ import annotations

import torch
from torch import nn

from proxyless_ray.data import BatchSource, iterate
from proxyless_ray.data.sharding import shard_batches
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.nn.supernet import SuperNet
from proxyless_ray.search.comm import Comm


def to_device(x: torch.Tensor, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """Move a batch of images to the device, NHWC when asked (faster depthwise convs and BN on CPU)."""
    return x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.no_grad()
def accuracy(model: nn.Module, source: BatchSource, comm: Comm, batch_size: int, max_batches: int = 0,
             device: torch.device | str = "cpu", channels_last: bool = False) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy over this rank's shard, summed across ranks.

    Returns:
        ``(accuracy, ce)`` over the whole split (or its first ``max_batches`` global batches).
    """
    was_training = model.training
    model.eval()
    batches = shard_batches(len(source), batch_size, comm.rank, comm.world, 0, 0, shuffle=False, drop_last=False,
                            max_steps=max_batches)
    correct = total = loss = 0.0
    for x, y in iterate(source, batches, train=False):
        if len(y) == 0:
            continue
        x, y = to_device(x, device, channels_last), y.to(device)
        logits = model(x)
        correct += float((logits.argmax(1) == y).sum())
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        total += len(y)
    correct, total, loss = comm.sum([correct, total, loss])
    model.train(was_training)
    return correct / max(total, 1.0), loss / max(total, 1.0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, source: BatchSource, comm: Comm, batch_size: int, batches: int,
                   seed: int = 0, device: torch.device | str = "cpu", channels_last: bool = False) -> None:
    """Re-estimate BatchNorm running statistics of a sub-network on training batches.

    Supernet BN statistics mix many sampled paths; the derived network's own statistics (cumulative average over
    ``batches`` batches) give a fair reading of its inherited weights, as one-shot NAS evaluation usually does.
    Statistics are averaged across ranks so every rank ends with the same network.
    """
    if batches <= 0:
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    plan = shard_batches(len(source), batch_size, comm.rank, comm.world, 0, seed + 1, max_steps=batches)
    for x, _ in iterate(source, plan, train=False):
        model(to_device(x, device, channels_last))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    comm.mean_([t for m in bns for t in (m.running_mean, m.running_var)])
    model.eval()


def derived_network(net: SuperNet, choices: list[int] | None = None, channels_last: bool = False) -> ProxylessNet:
    """The argmax (or given) sub-network as a standalone :class:`ProxylessNet` with the supernet's weights."""
    arch = net.derive(choices).without_zeros()
    child = ProxylessNet(arch)
    child.load_state_dict(net.derived_state_dict(choices))
    child = child.to(next(net.parameters()).device)
    return child.to(memory_format=torch.channels_last) if channels_last else child


def freeze_batchnorm(net: nn.Module) -> None:
    """BatchNorm layers of ``net`` in eval mode (running statistics used and kept; ``train.freeze_bn``)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
