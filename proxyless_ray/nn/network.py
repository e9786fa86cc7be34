"""The standalone network of a derived architecture, rebuilt from its JSON alone, and its export.

No supernet code is involved: a derived ``arch.json`` is enough to rebuild, load and run the network
(``torch.export`` program plus ``state_dict``).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proxyless_ray.fileio import umask_mode
from proxyless_ray.nn.arch import Arch, parse_block
from proxyless_ray.nn.ops import Classifier, ConvBNAct, ResidualBlock, init_weights, training_layout


class ProxylessNet(nn.Module):
    """stem -> MBConv blocks (zero layers dropped) -> feature mix -> pool + classifier."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        layers = arch.layers()
        self.stem = ConvBNAct(parse_block(arch.stem), arch.in_chs)
        n_stages = len(arch.stages)
        self.blocks = nn.Sequential(*[
            ResidualBlock(layer.block, layer.in_chs) for layer in layers
            if 0 <= layer.stage < n_stages and not parse_block(layer.block).is_zero
        ])
        head_in = layers[-1].in_chs
        self.feature_mix = (
            ConvBNAct(parse_block(arch.feature_mix), layers[-2].in_chs) if arch.feature_mix else nn.Identity()
        )
        self.classifier = Classifier(head_in, arch.num_classes, arch.dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = training_layout(self.stem(training_layout(x)))  # after the stem too: a 1-channel batch is both layouts
        return self.classifier(self.feature_mix(self.blocks(x)))


PROGRAM_FILE = "model.pt2"


def export_network(net: ProxylessNet, out_dir: str | os.PathLike, batch_size: int = 1,
                   program: bool = True) -> dict[str, str]:
    """Write ``arch.json``, ``state_dict.pt`` and a ``torch.export`` program (``model.pt2``) into ``out_dir``.

    Files are written into a temp folder beside ``out_dir`` and moved in place, so a failure leaves nothing
    half-written.

    Args:
        net: The network.
        out_dir: The folder to (re)write.
        batch_size: The program's example batch.
        program: Write ``model.pt2``; without it the folder holds what :func:`load_network` reads (tracing the
            program takes far longer than saving the state dict).

    Returns:
        Mapping from artifact kind to its path.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"output folder {str(out.parent)!r} is not writable")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        os.chmod(tmp, umask_mode(folder=True))  # mkdtemp's 0700 would survive the rename
        net = net.eval()
        arch = net.arch
        arch.save(tmp / "arch.json")
        torch.save(net.state_dict(), tmp / "state_dict.pt")
        if program:
            example = torch.randn(batch_size, arch.in_chs, arch.resolution, arch.resolution)
            torch.export.save(torch.export.export(net, (example,)), tmp / PROGRAM_FILE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {"arch": str(out / "arch.json"), "state_dict": str(out / "state_dict.pt")}
    return {**paths, "program": str(out / PROGRAM_FILE)} if program else paths


def load_tensors(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)``, with a one-line error naming the file when it cannot be read.

    Nothing the project loads is unpickled: a file holding Python objects other than tensors and plain containers is
    refused (it could run code), and a truncated or foreign file is reported, both as ``ValueError``.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path!r} is not a plain tensor file: it holds pickled Python objects, which are never "
                         f"loaded (they could run code); expected a state dict written by torch.save") from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        reason = str(err).split(". ")[0].strip().rstrip(".")
        raise ValueError(f"{path!r} is truncated or not a PyTorch file ({reason})") from None


def load_network(folder: str | os.PathLike) -> ProxylessNet:
    """Rebuild a network from an exported folder (``arch.json`` + ``state_dict.pt``, loaded weights-only)."""
    folder = Path(folder)
    net = ProxylessNet(Arch.load(folder / "arch.json"))
    load_weights(net, folder / "state_dict.pt")
    return net.eval()


def load_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights-only state dict into ``net``; a file for another network is a ``ValueError`` naming it."""
    state = load_tensors(path)
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)!r} is not a state dict (got {type(state).__name__})")
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        reason = str(err).splitlines()[0].rstrip(":. \t")
        raise ValueError(f"{os.fspath(path)!r} does not fit this network ({reason})") from None
