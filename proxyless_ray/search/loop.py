"""The per-worker search loop: warm-up, then alternating weight and architecture steps (ProxylessNAS Alg. 1).

ProxylessNAS, https://arxiv.org/abs/1812.00332. Each batch of the training split:

1. weight step: one path per layer sampled from softmax(alpha) (the same on every rank, from a per-step seed);
   only that path runs forward and backward; gradients of the existing parameters are all-reduced; SGD (Nesterov,
   cosine per batch);
2. every ``arch_update_every`` batches, after the warm-up epochs, an architecture step on a held-out batch:
   CE (no label smoothing) plus the latency term on E[lat], gradients through the binary gates (``two`` /
   ``full_v2``) or REINFORCE; alpha gradients all-reduced; Adam.

The loop is the function a Ray Train worker runs (:mod:`.distributed.trainer`); a single process runs it with
``Comm()`` and an in-process reporter. Each epoch ends with a report (a barrier across ranks) carrying the metrics
and, on rank 0, a checkpoint folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from proxyless_ray.config import Experiment
from proxyless_ray.data import Splits, build_splits, iterate
from proxyless_ray.data.sharding import EndlessBatches, shard_batches
from proxyless_ray.latency.expected import SupernetLatency
from proxyless_ray.latency.model import LatencyModel, load_latency_model_for
from proxyless_ray.nn.mixed_op import GateMode
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.progress import Progress
from proxyless_ray.runtime import ThreadGovernor, tune_allocator
from proxyless_ray.search.balance import BatchBalancer
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.evaluate import accuracy, derived_network, freeze_batchnorm, recalibrate_bn, to_device
from proxyless_ray.search.objective import latency_objective, reward
from proxyless_ray.search.path_sampling import StepPaths, step_generator, train_paths, uniform_choices, warmup_paths
from proxyless_ray.search.readiness import readiness_summary, searching
from proxyless_ray.search.retrain_loop import RetrainLoop
from proxyless_ray.search.state import (
    DERIVED_DIR,
    SearchState,
    alpha_digest,
    check_finite_loss,
    load_checkpoint,
    new_state,
    prepare_supernet,
    save_checkpoint,
    save_derived,
    search_lr,
)

# report(metrics, checkpoint_dir or None): a barrier across ranks; rank 0 passes the checkpoint folder.
Reporter = Callable[[dict[str, Any], "str | None"], None]

READY_EVAL_IMAGES = 2000  # held-out images each readiness sub-network is read on
FINETUNE_LR_SCALE = 0.5  # the derived network's fine-tune starts below the search's peak learning rate


class SearchLoop:
    """One worker's search.

    Args:
        exp: The experiment.
        comm: Rank, world size and collectives.
        report: Called once per epoch on every rank (see :data:`Reporter`).
        splits: Data splits (built from ``exp.data`` when omitted).
        latency_model: The target's latency model (``exp.latency.profile`` when omitted).
        other_models: More latency models whose prediction of the current architecture is reported per epoch.
        device: Torch device.
    """

    def __init__(self, exp: Experiment, comm: Comm, report: Reporter, splits: Splits | None = None,
                 latency_model: LatencyModel | None = None, other_models: dict[str, LatencyModel] | None = None,
                 device: torch.device | str = "cpu", progress: bool = True):
        tune_allocator()
        self.progress = progress and comm.rank == 0
        self.exp, self.comm, self.report, self.device = exp, comm, report, torch.device(device)
        if exp.train.threads > 0:
            torch.set_num_threads(exp.train.threads)
        self.governor = ThreadGovernor(exp.train.adapt_threads)
        self.splits = splits or build_splits(exp.data, exp.space)
        self.model = latency_model or load_latency_model_for(exp.latency.profile, exp.space,
                                                             strict=exp.latency.strict)
        self.lat = SupernetLatency(self.model, exp.space)
        self.other_models = other_models or {}
        self.mode = GateMode(exp.train.gate_mode)
        self.state: SearchState = new_state(exp, self.device)
        self.cl = exp.train.channels_last
        prepare_supernet(self.state, exp, self.device, comm)
        with torch.no_grad():
            lat0 = float(self.lat.expected(self.state.net.arch_parameters()))
        # Reference / target latency default to E[lat] of the freshly initialised (near-uniform) supernet.
        self.ref_ms = exp.latency.ref_ms or lat0
        self.target_ms = exp.latency.target_ms or lat0
        b = exp.data.batch_size
        self.warmup_source = self.splits.warmup or self.splits.train
        self.steps_per_epoch = len(shard_batches(len(self.splits.train), b, comm.rank, comm.world, 0, exp.train.seed,
                                                 max_steps=exp.train.max_steps_per_epoch))
        self.warmup_steps_per_epoch = len(shard_batches(len(self.warmup_source), b, comm.rank, comm.world, 0,
                                                        exp.train.seed, max_steps=exp.train.max_steps_per_epoch))
        if self.steps_per_epoch == 0:
            raise ValueError(f"training split of {len(self.splits.train)} images gives no full batch of "
                             f"{b} x {comm.world} workers; lower data.batch_size")
        self.balancer = BatchBalancer(b * comm.world, comm.world, enabled=exp.dist.balance_batches and comm.active)
        self._heldout = EndlessBatches(len(self.splits.heldout), b, comm.rank, comm.world, exp.train.seed + 17)
        self.derived: ProxylessNet | None = None
        self._last_child: tuple[list[int], ProxylessNet] | None = None  # the final epoch's BN-recalibrated child
        self._frozen_alpha = False  # this epoch's weight steps take warm-up paths (alpha frozen)

    # -- public ------------------------------------------------------------------------------------------------

    def restore(self, folder: str, weights_only: bool = False) -> None:
        """Continue from a checkpoint folder (resume) or take its weights (shared warm-up)."""
        load_checkpoint(self.state, folder, self.exp, weights_only=weights_only)

    def run(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Run epochs from the state's counter up to ``until_epoch`` (default: all); returns the last metrics."""
        t = self.exp.train
        end = t.epochs if until_epoch is None else min(until_epoch, t.epochs)
        last: dict[str, Any] = self.state.history[-1] if self.state.history else {}
        while self.state.epoch < end:
            epoch = self.state.epoch
            metrics = self._epoch(epoch)
            self.state.epoch = epoch + 1
            if self.state.epoch == t.epochs:
                t0 = time.perf_counter()
                metrics.update(self._final_metrics())
                metrics["eval_s"] += time.perf_counter() - t0
            metrics["finished"] = self.state.epoch == t.epochs  # not "done": Tune reserves that key
            self.state.history.append(metrics)
            self.state.alpha_history.append([p.tolist() for p in self.state.net.probs()])
            self._report(metrics, force_checkpoint=self.state.epoch == end)
            last = metrics
        self.governor.restore()
        return last

    # -- one epoch ---------------------------------------------------------------------------------------------

    def _epoch(self, epoch: int) -> dict[str, Any]:
        exp, t, st = self.exp, self.exp.train, self.state
        warm = not searching(self.state.history, epoch, t, self._say)
        self._frozen_alpha = warm
        source = self.warmup_source if epoch < t.warmup_epochs else self.splits.train
        # the global batches; each rank reads its slice of each when it gets there (the balancer moves the bounds)
        plan = shard_batches(len(source), exp.data.batch_size * self.comm.world, 0, 1, epoch, t.seed,
                             max_steps=t.max_steps_per_epoch)
        rank, bal = self.comm.rank, self.balancer
        batches = iterate(source, (chunk[slice(*bal.bounds(rank))] for chunk in plan), train=True,
                          seed=t.seed * 10_007 + epoch)
        net = st.net
        net.train()
        if self.exp.train.freeze_bn:
            freeze_batchnorm(self.state.net)
        loss_sum = correct = seen = 0.0
        arch_losses: list[float] = []
        t0 = time.perf_counter()
        weight_s = 0.0
        ar0 = self.comm.allreduce_s
        bar = Progress(len(plan), f"epoch {epoch + 1}/{t.epochs} {'warm-up' if warm else 'search'}",
                       enabled=self.progress)
        for i in range(len(plan)):
            busy0 = time.perf_counter()
            x, y = next(batches)
            x, y = to_device(x, self.device, self.cl), y.to(self.device)
            # [1] weight step on one sampled path
            ws = time.perf_counter()
            loss, logits = self.weight_step(x, y, epoch, i, data_s=ws - busy0)
            weight_s += time.perf_counter() - ws
            loss_sum += loss.item() * len(y)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
            # [2] architecture step on a held-out batch
            if not warm and (i + 1) % t.arch_update_every == 0:
                for k in range(t.arch_steps):
                    arch_losses.append(self._arch_step(epoch, i, k))
            self.governor.tick()
            bar.update(1, loss=loss.item())
        bar.close()
        elapsed = time.perf_counter() - t0
        loss_sum, correct, seen = self.comm.sum([loss_sum, correct, seen])
        check_finite_loss(loss_sum, epoch + 1, exp)  # NaN weights: stop before the epoch is reported or derived
        # [3] end of epoch: the current argmax architecture, as a network with inherited weights, on held-out data
        t_eval = time.perf_counter()
        choices = net.argmax_choices()
        child = self._inherited_child(choices)
        heldout_acc, heldout_ce = accuracy(child, self.splits.heldout, self.comm, exp.data.eval_batch_size,
                                           device=self.device, channels_last=self.cl)
        # the last epoch's child is the one the final metrics test: nothing changes the supernet in between
        self._last_child = (choices, child) if epoch + 1 == t.epochs else None
        arch = net.derive(choices)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "search_epoch": max(0, epoch + 1 - t.warmup_epochs),  # schedulers' clock: rungs count search epochs
            "phase": "warmup" if warm else "search",
            "searching": not warm,  # architecture steps ran this epoch
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "heldout_acc": heldout_acc,
            "heldout_ce": heldout_ce,
            "arch_loss": sum(arch_losses) / len(arch_losses) if arch_losses else float("nan"),
            "expected_latency_ms": self._expected_ms(),
            "argmax_latency_ms": self.lat.of_choices(choices),
            "entropy": net.entropy(),
            "images_per_s": seen / max(elapsed, 1e-9),
            "weight_images_per_s": seen / max(weight_s, 1e-9),  # global images / this rank's weight-step time
            "allreduce_share": (self.comm.allreduce_s - ar0) / max(elapsed, 1e-9),
            "weight_step_s": weight_s,
            "epoch_s": elapsed,
            "lr": st.w_opt.param_groups[0]["lr"],
            "arch": arch.arch_string(),
            "choices": choices,
            "rank": self.comm.rank,
            "alpha_digest": alpha_digest(net),  # equal on every rank: the binarization is synchronized
            "batch_split": list(bal.counts),  # images per rank of the last global batch
        }
        for name, model in self.other_models.items():
            metrics[f"latency_{name}_ms"] = SupernetLatency(model, exp.space).of_choices(choices)
        if warm and t.ready_samples > 0:
            metrics["subnet_heldout_acc"] = self.subnet_accuracy(epoch)
            if t.ready_acc > 0:
                metrics["supernet_ready"] = metrics["subnet_heldout_acc"] >= t.ready_acc
        # the readings' own compute (the last epoch adds its test readings): with epoch_s, what an epoch computed
        metrics["eval_s"] = time.perf_counter() - t_eval
        return metrics

    def _say(self, text: str) -> None:
        if self.comm.rank == 0:
            print(f"[search] {text}", file=sys.stderr, flush=True)

    def subnet_accuracy(self, epoch: int, samples: int | None = None) -> float:
        """Mean held-out accuracy of uniformly sampled sub-networks (inherited weights, own BN statistics): how
        well the supernet's weights can rank candidates. The draws depend only on the seed and the epoch."""
        t, data = self.exp.train, self.exp.data
        n = t.ready_samples if samples is None else samples
        gen = torch.Generator().manual_seed(t.seed * 7_919 + epoch)
        max_batches = max(1, READY_EVAL_IMAGES // data.eval_batch_size)
        accs = [self.heldout_accuracy(uniform_choices(self.state.net.slots, gen), max_batches) for _ in range(n)]
        return sum(accs) / max(len(accs), 1)

    def heldout_accuracy(self, choices: list[int] | None = None, max_batches: int = 0) -> float:
        """Held-out accuracy of one sub-network (``choices``: a candidate index per searchable layer; ``None``: the
        argmax) with the supernet's weights and its own BN statistics, on the first ``max_batches`` batches (0: all).
        """
        acc, _ = accuracy(self._inherited_child(choices), self.splits.heldout, self.comm, self.exp.data.eval_batch_size,
                          max_batches=max_batches, device=self.device, channels_last=self.cl)
        return acc

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, i: int,
                    data_s: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One weight step on the path sampled for step ``i`` of ``epoch``, on this rank's slice of the batch.

        Args:
            x: This rank's images, on the device.
            y: Their labels.
            epoch: Epoch (with ``i``, picks the learning rate and the path, the same on every rank).
            i: Step within the epoch.
            data_s: Seconds this rank spent reading the batch (the balanced split weighs it with the compute).

        Returns:
            The loss (the mean over this rank's images) and the logits.
        """
        t, st, net, bal, rank = self.exp.train, self.state, self.state.net, self.balancer, self.comm.rank
        t0 = time.perf_counter()
        for g in self.state.w_opt.param_groups:
            g["lr"] = search_lr(self.exp.train, epoch, i, self.warmup_steps_per_epoch, self.steps_per_epoch)
        st.w_opt.zero_grad(set_to_none=True)
        if self._frozen_alpha:
            loss, logits = train_paths(net, x, y, self._warmup_paths(epoch, i), t.label_smoothing)
        else:
            net.sample_single(step_generator(t.seed, epoch, i, 0))
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
            loss.backward()
        # the optimizer's parameters are the weights: no walk over the supernet's modules on every step
        weights = [p for group in st.w_opt.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in weights]
        if bal.enabled and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step time must include the queued kernels
        # each rank's mean gradient weighted by its share of the global batch: the global batch's mean gradient
        step_s = self.comm.mean_(grads, weight=bal.weight(rank),
                                 gather=data_s + time.perf_counter() - t0 if bal.enabled else None)
        if step_s is not None:
            bal.update(step_s)
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(weights, t.grad_clip)
        st.w_opt.step()
        st.step += 1
        return loss, logits

    def _warmup_paths(self, epoch: int, i: int) -> StepPaths:
        t = self.exp.train
        total = max(t.warmup_epochs * self.warmup_steps_per_epoch, 1)
        progress = (epoch * self.warmup_steps_per_epoch + i) / total if epoch < t.warmup_epochs else 1.0
        return warmup_paths(t.warmup_method, self.state.net.slots, t.seed, epoch, i, progress)

    def _arch_step(self, epoch: int, i: int, k: int) -> float:
        t, st, net = self.exp.train, self.state, self.state.net
        x, y = self._heldout_batch(st.arch_step)
        x, y = to_device(x, self.device, self.cl), y.to(self.device)
        st.a_opt.zero_grad(set_to_none=True)
        gen = step_generator(t.seed, epoch, i * 16 + k, 1)
        if self.mode == GateMode.REINFORCE:
            loss = self._reinforce_step(x, y, gen)
        else:
            net.sample_for_arch(self.mode, gen)
            with net.weights_frozen():
                ce = nn.functional.cross_entropy(net(x), y)
                exp_lat = self.lat.expected(net.arch_parameters())
                lat_cfg = self.exp.latency
                obj = latency_objective(lat_cfg.loss, ce, exp_lat, lam=lat_cfg.lam, ref_ms=self.ref_ms,
                                        alpha=lat_cfg.alpha, beta=lat_cfg.beta, target_ms=self.target_ms)
                obj.backward()
            net.set_alpha_grads(self.mode)
            loss = float(obj.detach())
        self.comm.mean_([a.grad for a in net.arch_parameters() if a.grad is not None])
        st.a_opt.step()
        if self.mode == GateMode.TWO:
            net.rescale_pairs()
        st.arch_step += 1
        return loss

    @torch.no_grad()
    def _reinforce_step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> float:
        net, lat_cfg, st = self.state.net, self.exp.latency, self.state
        choices = net.sample_for_arch(GateMode.REINFORCE, gen)
        correct, total = self.comm.sum([float((net(x).argmax(1) == y).sum()), float(len(y))])
        r = reward(lat_cfg.loss, correct / max(total, 1.0), self.lat.of_choices(choices), lam=lat_cfg.lam,
                   ref_ms=self.ref_ms, beta=lat_cfg.beta, target_ms=self.target_ms)
        decay = self.exp.train.reinforce_baseline_decay
        st.baseline = r if st.baseline is None else decay * st.baseline + (1 - decay) * r
        for m in net.mixed_ops():
            m.set_reinforce_grad(r - st.baseline)
        return -r

    def _final_metrics(self) -> dict[str, Any]:
        """Test accuracy of the derived network with inherited weights (BN statistics recalibrated), and after
        the optional short fine-tune (``train.finetune_epochs``) that the exported network then carries."""
        choices = self.state.net.argmax_choices()
        kept, self._last_child = self._last_child, None
        child = kept[1] if kept is not None and kept[0] == choices else self._inherited_child(choices)
        data, t = self.exp.data, self.exp.train
        inherited_acc, _ = accuracy(child, self.splits.test, self.comm, data.eval_batch_size, device=self.device,
                                    channels_last=self.cl)
        out = {"inherited_test_acc": inherited_acc, **readiness_summary(self.state.history, t.ready_acc)}
        if t.finetune_epochs > 0:
            tune = RetrainLoop(self.exp, child.arch, self.comm, lambda m, loop: None, child.state_dict(),
                               epochs=t.finetune_epochs, lr=t.lr * FINETUNE_LR_SCALE, device=self.device,
                               progress=self.progress, splits=self.splits)
            tune.run()
            child = tune.net
        test_acc, test_ce = accuracy(child, self.splits.test, self.comm, data.eval_batch_size, device=self.device,
                                     channels_last=self.cl)
        self.derived = child  # goes into the final checkpoint, BN statistics and all
        out.update({"test_acc": test_acc, "test_ce": test_ce, "derived_arch": child.arch.arch_string(),
                    "derived_latency_ms": self.lat.of_choices(self.state.net.argmax_choices())})
        return out

    # -- helpers -----------------------------------------------------------------------------------------------

    def _inherited_child(self, choices: list[int] | None = None) -> nn.Module:
        """The argmax (or given) sub-network with the supernet's weights and its own BN statistics.

        The supernet's running statistics mix every sampled path, so reading the argmax path with them measures
        the mixture, not the network (near chance early in a search). The child is a copy: the supernet, its
        statistics and the global RNG stream (a resumed run replays it) are left as they were.
        """
        data, t = self.exp.data, self.exp.train
        with torch.random.fork_rng(devices=[]):
            child = derived_network(self.state.net, choices, channels_last=self.cl)
            recalibrate_bn(child, self.splits.train, self.comm, data.batch_size, t.bn_recal_batches, t.seed,
                           self.device, self.cl)
        return child

    def _heldout_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k``-th held-out batch of the run, indexed by the arch-step counter (:class:`EndlessBatches`)."""
        if self._heldout.per_pass == 0:
            raise ValueError(f"held-out split of {len(self.splits.heldout)} images is too small for "
                             f"{self.comm.world} workers; raise data.heldout_size")
        return self.splits.heldout.get_batch(self._heldout[k], False)

    @torch.no_grad()
    def _expected_ms(self) -> float:
        return float(self.lat.expected(self.state.net.arch_parameters()))

    def _report(self, metrics: dict[str, Any], force_checkpoint: bool) -> None:
        every = self.exp.dist.checkpoint_every
        want = force_checkpoint or (every > 0 and self.state.epoch % every == 0)
        folder = None
        if want and self.comm.rank == 0:
            folder = save_checkpoint(self.state, tempfile.mkdtemp(prefix="proxyless-ckpt-"), self.exp)
            if metrics.get("finished") and self.derived is not None:
                save_derived(self.derived, os.path.join(folder, DERIVED_DIR))
        try:
            self.report(metrics, folder)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
