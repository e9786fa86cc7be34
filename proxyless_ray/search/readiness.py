"""When the architecture steps may start: the supernet's readiness, read from the search's per-epoch history.

Architecture steps on untrained weights rank candidates by noise, and the shallowest network looks best there
(every search collapsed to it before the supernet learned). Each frozen-alpha epoch reports the mean held-out
accuracy of sampled sub-networks (``subnet_heldout_acc``); alpha starts to learn once it reaches
``train.ready_acc``, and a threshold that is never met ends the wait after half of the search epochs, with a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxyless_ray.config import TrainConfig


def searching(history: list[dict[str, Any]], epoch: int, t: TrainConfig, say: Callable[[str], None]) -> bool:
    """Whether ``epoch`` runs architecture steps, given the metrics of the epochs before it."""
    if epoch < t.warmup_epochs:
        return False
    prev = history[-1] if history else {}
    if t.ready_acc <= 0 or prev.get("searching") or prev.get("supernet_ready", True):
        return True
    acc = prev.get("subnet_heldout_acc", float("nan"))
    limit = t.warmup_epochs + (t.epochs - t.warmup_epochs) // 2
    if epoch >= limit:
        say(f"the supernet is still not ready after {epoch} epochs (sampled sub-networks reach {acc:.3f} held-out "
            f"accuracy, train.ready_acc {t.ready_acc}): the architecture steps start now, on weights that may not "
            f"rank candidates yet; raise train.warmup_epochs or data.warmup_subset, or lower train.ready_acc")
        return True
    say(f"the supernet is not ready (sampled sub-networks reach {acc:.3f} held-out accuracy, train.ready_acc "
        f"{t.ready_acc}): epoch {epoch + 1} keeps alpha frozen and trains the weights")
    return False


def readiness_summary(history: list[dict[str, Any]], ready_acc: float) -> dict[str, Any]:
    """How trained the supernet was when alpha started to learn (the last frozen epoch's measurement)."""
    frozen = [h for h in history if not h.get("searching", True) and "subnet_heldout_acc" in h]
    if not frozen:
        return {}
    out: dict[str, Any] = {"ready_subnet_acc": frozen[-1]["subnet_heldout_acc"]}
    if ready_acc > 0:
        out["supernet_ready"] = frozen[-1]["subnet_heldout_acc"] >= ready_acc
    return out
