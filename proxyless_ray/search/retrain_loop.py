"""The per-worker loop of retraining: plain supervised training of one network, sharded like the search.

The retraining drivers (:mod:`proxyless_ray.distributed.retrain`) run it in-process or on Ray Train workers; the
search loop runs it on its derived child for the held-out fine-tune.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from proxyless_ray.config import Experiment
from proxyless_ray.data import check_shapes, iterate, load_splits
from proxyless_ray.data.sharding import shard_batches
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.progress import Progress
from proxyless_ray.runtime import ThreadGovernor, tune_allocator
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.evaluate import accuracy, to_device
from proxyless_ray.search.state import check_finite_loss, cosine_lr


class RetrainLoop:
    """Plain supervised training of one network, sharded like the search (the per-worker function's body)."""

    def __init__(self, exp: Experiment, arch: Arch, comm: Comm, report, state_dict=None, epochs: int | None = None,
                 lr: float | None = None, device: torch.device | str = "cpu", progress: bool = True, splits=None):
        tune_allocator()
        self.exp, self.comm, self.report, self.device = exp, comm, report, torch.device(device)
        if exp.train.threads > 0:
            torch.set_num_threads(exp.train.threads)
        self.governor = ThreadGovernor(exp.train.adapt_threads)
        self.splits = splits or build_splits_for(exp, arch)
        torch.manual_seed(exp.train.seed)
        self.net = ProxylessNet(arch).to(self.device)
        if state_dict is not None:
            try:
                self.net.load_state_dict(state_dict)
            except RuntimeError as err:
                reason = str(err).splitlines()[0].rstrip(":. \t")
                raise ValueError(f"the weights that come with {arch.name or 'the architecture'} do not fit it "
                                 f"({reason})") from None
        comm.broadcast_([p.data for p in self.net.parameters()])
        self.cl = exp.train.channels_last
        if self.cl:
            self.net.to(memory_format=torch.channels_last)
        self.epochs = epochs or exp.train.epochs
        self.lr = lr or exp.train.lr
        t = exp.train
        decay = [p for p in self.net.parameters() if p.dim() > 1]
        no_decay = [p for p in self.net.parameters() if p.dim() <= 1]
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": t.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, momentum=t.momentum,
                                   nesterov=t.nesterov)
        self.epoch = 0
        self.progress = progress and comm.rank == 0

    def run(self) -> dict[str, Any]:
        exp, t = self.exp, self.exp.train
        plan_len = len(shard_batches(len(self.splits.train), exp.data.batch_size, self.comm.rank, self.comm.world,
                                     0, t.seed, max_steps=t.max_steps_per_epoch))
        metrics: dict[str, Any] = {}
        while self.epoch < self.epochs:
            e = self.epoch
            plan = shard_batches(len(self.splits.train), exp.data.batch_size, self.comm.rank, self.comm.world, e,
                                 t.seed, max_steps=t.max_steps_per_epoch)
            self.net.train()
            bar = Progress(len(plan), f"retrain epoch {e + 1}/{self.epochs}", enabled=self.progress)
            seen = correct = loss_sum = 0.0
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(iterate(self.splits.train, plan, train=True, seed=t.seed * 10_007 + e)):
                x, y = to_device(x, self.device, self.cl), y.to(self.device)
                for g in self.opt.param_groups:
                    g["lr"] = cosine_lr(self.lr, e * plan_len + i, self.epochs * plan_len)
                self.opt.zero_grad(set_to_none=True)
                logits = self.net(x)
                loss = nn.functional.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
                loss.backward()
                self.comm.mean_([p.grad for p in self.net.parameters() if p.grad is not None])
                self.opt.step()
                self.governor.tick()
                seen += len(y)
                correct += float((logits.argmax(1) == y).sum())
                loss_sum += loss.item() * len(y)
                bar.update(1, loss=loss.item())
            bar.close()
            seen, correct, loss_sum = self.comm.sum([seen, correct, loss_sum])
            check_finite_loss(loss_sum, e + 1, exp, "retraining")  # NaN weights: stop before anything is exported
            test_acc, test_ce = accuracy(self.net, self.splits.test, self.comm, exp.data.eval_batch_size,
                                         device=self.device, channels_last=self.cl)
            self.epoch = e + 1
            metrics = {"epoch": self.epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                       "test_acc": test_acc, "test_ce": test_ce,
                       "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                       "finished": self.epoch == self.epochs}
            self.report(metrics, self)
        self.governor.restore()
        return metrics


def build_splits_for(exp: Experiment, arch: Arch):
    """Data splits for a network: its input shape must match the data set (checked before training starts)."""
    splits = load_splits(exp.data, arch.resolution, arch.in_chs)
    check_shapes(splits, arch.resolution, arch.in_chs, arch.num_classes)
    return splits
