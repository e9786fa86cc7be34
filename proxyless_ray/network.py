"""The standalone network of a derived architecture, rebuilt from its JSON alone, and its export.

No supernet code is involved: a derived ``arch.json`` is enough to rebuild, load and run the network
(``torch.export`` program plus ``state_dict``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from proxyless_ray.arch import Arch, parse_block
from proxyless_ray.ops import Classifier, ConvBNAct, ResidualBlock, init_weights


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
        return self.classifier(self.feature_mix(self.blocks(self.stem(x))))


def export_network(net: ProxylessNet, out_dir: str | os.PathLike, batch_size: int = 1) -> dict[str, str]:
    """Write ``arch.json``, ``state_dict.pt`` and a ``torch.export`` program (``model.pt2``) into ``out_dir``.

    Files are written into a temp folder beside ``out_dir`` and moved in place, so a failure leaves nothing
    half-written.

    Returns:
        Mapping from artifact kind to its path.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"output folder {str(out.parent)!r} is not writable")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        net = net.eval()
        arch = net.arch
        arch.save(tmp / "arch.json")
        torch.save(net.state_dict(), tmp / "state_dict.pt")
        example = torch.randn(batch_size, arch.in_chs, arch.resolution, arch.resolution)
        program = torch.export.export(net, (example,))
        torch.export.save(program, tmp / "model.pt2")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"arch": str(out / "arch.json"), "state_dict": str(out / "state_dict.pt"), "program": str(out / "model.pt2")}


def load_network(folder: str | os.PathLike) -> ProxylessNet:
    """Rebuild a network from an exported folder (``arch.json`` + ``state_dict.pt``, loaded weights-only)."""
    folder = Path(folder)
    net = ProxylessNet(Arch.load(folder / "arch.json"))
    net.load_state_dict(torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True))
    return net.eval()
