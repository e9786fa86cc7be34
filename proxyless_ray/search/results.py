"""What a finished search leaves in its output folder.

``<out>/``: ``arch.json`` (derived network, zero layers dropped), ``searched_arch.json`` (the argmax with zero
layers kept in place, for pictures), ``result.json`` (final metrics, latency on the target profile layer by layer),
``metrics.jsonl`` (one line per epoch), ``alphas.json`` (op probabilities per epoch) and ``network/`` (the
exported network: ``state_dict.pt``, ``arch.json`` and, unless the caller leaves it out, the ``torch.export`` program
``model.pt2``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from proxyless_ray.config import Experiment
from proxyless_ray.fileio import atomic_write_text
from proxyless_ray.latency.model import LatencyModel, arch_latency
from proxyless_ray.nn.network import export_network, load_network
from proxyless_ray.search.state import DERIVED_DIR, read_meta

INCOMPLETE = "INCOMPLETE"  # present while a search stopped early; written outputs would then be stale or absent


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT); its message says where the last checkpoint is. The CLI exits with 130."""


def interrupted(out_dir: str, checkpoint: str | None, where: str | None = None) -> Interrupted:
    """Mark ``out_dir`` incomplete (an ``INCOMPLETE`` file saying why) and return the error to raise.

    ``where`` replaces the sentence about the last checkpoint (a sweep's state is Tune's folder).
    """
    where = where or (f"the last checkpoint is {checkpoint}" if checkpoint else
                      "it stopped before its first checkpoint, so --resume starts from scratch")
    try:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, INCOMPLETE), f"interrupted (SIGINT); {where}\n")
    except OSError:
        pass  # the message below still says what happened
    return Interrupted(f"stopped by SIGINT (Ctrl-C); {where}; {out_dir} is marked {INCOMPLETE}")


def check_writable(folder: str) -> None:
    """Fail before any training when the output folder cannot be created or written."""
    parent = folder
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or "."
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"output path {folder!r} is blocked by the file {parent!r}")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder {folder!r} is not writable")


def write_search_outputs(exp: Experiment, checkpoint_dir: str, out_dir: str, model: LatencyModel,
                         other_models: dict[str, LatencyModel] | None = None, program: bool = True) -> dict[str, Any]:
    """Export the derived network of a final checkpoint and write the result files.

    Args:
        exp: The search's experiment.
        checkpoint_dir: Its final checkpoint.
        out_dir: The output folder.
        model: The target's latency model.
        other_models: More latency models to price the derived network with.
        program: Trace the ``torch.export`` program into ``network/`` (see
            :func:`proxyless_ray.nn.network.export_network`); ``result.json``'s ``files`` name it only when written.

    Returns:
        The ``result.json`` content.
    """
    meta = read_meta(checkpoint_dir)
    history = meta["history"]
    if not history or not history[-1].get("finished"):
        raise ValueError(f"checkpoint {checkpoint_dir!r} is not from a finished search (epoch {meta.get('epoch')})")
    last = history[-1]
    derived_dir = os.path.join(checkpoint_dir, DERIVED_DIR)
    net = load_network(derived_dir)
    arch = net.arch
    searched = exp.space.arch_from_choices(last["choices"], name=exp.name)
    total, per_layer = arch_latency(model, arch)
    os.makedirs(out_dir, exist_ok=True)
    paths = export_network(net, os.path.join(out_dir, "network"), program=program)
    accuracies = {"test_acc": last.get("test_acc"),
                  "inherited_test_acc": last.get("inherited_test_acc"),  # before the optional fine-tune
                  "finetune_epochs": exp.train.finetune_epochs, "heldout_acc": last.get("heldout_acc"),
                  # how trained the supernet was when alpha started to learn (train.ready_acc)
                  "ready_subnet_acc": last.get("ready_subnet_acc"), "supernet_ready": last.get("supernet_ready")}
    arch_meta = {"space": exp.space.fingerprint(), "profile": model.name, "latency_ms": total, **accuracies}
    derived = dataclasses.replace(arch, name=exp.name, meta={**arch.meta, **arch_meta})
    derived.save(os.path.join(out_dir, "arch.json"))
    searched.save(os.path.join(out_dir, "searched_arch.json"))
    atomic_write_text(os.path.join(out_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history))
    atomic_write_text(os.path.join(out_dir, "alphas.json"), json.dumps({
        "candidates": [list(s.candidates) for s in exp.space.slots()], "history": meta["alpha_history"]}) + "\n")
    result = {
        "name": exp.name,
        "arch": derived.arch_string(),
        "searched_arch": searched.arch_string(),
        "profile": model.name,
        "latency_ms": total,
        "expected_latency_ms": last.get("expected_latency_ms"),
        **accuracies,
        "epochs": len(history),
        "alpha_digest": last.get("alpha_digest"),
        "per_layer_ms": [{"block": layer.block, "input": f"{layer.in_chs}x{layer.resolution}x{layer.resolution}",
                          "ms": ms} for layer, ms in per_layer],
        "latency_on_profiles": {name: arch_latency(m, arch)[0] for name, m in (other_models or {}).items()},
        "space_fingerprint": exp.space.fingerprint(),
        "files": {"arch": os.path.join(out_dir, "arch.json"), **paths},
    }
    atomic_write_text(os.path.join(out_dir, "result.json"), json.dumps(result, indent=2) + "\n")
    if os.path.exists(os.path.join(out_dir, INCOMPLETE)):
        os.unlink(os.path.join(out_dir, INCOMPLETE))  # a resumed run that finished
    return result
