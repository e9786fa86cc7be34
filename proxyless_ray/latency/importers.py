"""Importers for the two public per-layer latency-table formats: ProxylessNAS and Once-for-All.

* ProxylessNAS (``mobile_trim.yaml``, https://arxiv.org/abs/1812.00332): keys such as
  ``expanded_conv-input:56x56x24-output:28x28x40-expand:6-kernel:5-stride:2-idskip:0`` (``expand`` is the
  expansion *ratio*), plus ``Conv-...`` (stem), ``Conv_1-...`` (1x1 feature mix) and ``Logits-...`` (pool +
  classifier); values ``{count, mean, var}``.
* Once-for-All (``*_lookup_table.yaml``, https://arxiv.org/abs/1908.09791): the same style with ``-se:`` and
  ``-hs:`` fields, ``expand`` the *expanded channel count* (ratio = expand / in_chs), values ``{count, mean, std}``,
  plus ``AvgPool2D`` and ``Conv_2`` (a 1x1 conv after pooling).

Keys become :func:`proxyless_ray.nn.arch.layer_key` keys. Entries our search space cannot express (squeeze-excite,
h-swish, a non-integer expansion, a conv after pooling) are skipped and reported with the reason; keys that do not
parse at all are an error that lists them.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxyless_ray.latency.predictor import fit_linear
from proxyless_ray.latency.profile import Entry, Profile
from proxyless_ray.nn.arch import BlockSpec, format_block, layer_key, out_resolution

FORMATS = ("proxylessnas", "ofa")

_SHAPE = r"(\d+)x(\d+)x(\d+)"
_MB_RE = re.compile(rf"^expanded_conv-input:{_SHAPE}-output:{_SHAPE}-expand:(\d+)-kernel:(\d+)-stride:(\d+)"
                    r"-idskip:([01])(?:-se:([01])-hs:([01]))?$")
_CONV_RE = re.compile(rf"^(Conv|Conv_1|Conv_2)-input:{_SHAPE}-output:{_SHAPE}$")
_LOGITS_RE = re.compile(rf"^Logits-input:{_SHAPE}-output:(\d+)$")
_POOL_RE = re.compile(rf"^AvgPool2D-input:{_SHAPE}-output:{_SHAPE}$")

STEM_KERNEL = 3  # both published tables' first conv is 3x3 (the key does not say)


class UnparsedKeysError(ValueError):
    """Raised when a table holds keys of no known form; ``keys`` lists them all."""

    def __init__(self, source: str, keys: list[str], total: int):
        self.keys = keys
        shown = keys[:20]
        more = f" (and {len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
        super().__init__(f"{source}: {len(keys)} of {total} keys do not parse as a ProxylessNAS/OFA latency-table "
                         f"key: {shown}{more}")


@dataclass
class ImportResult:
    """Converted entries, the skipped source keys with the reason, and the detected format."""

    fmt: str
    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    total: int = 0


class NotRepresentable(ValueError):
    """A well-formed table key our search space cannot express."""


def detect_format(table: Mapping[str, Any]) -> str:
    """``ofa`` when any key carries ``-se:``, else ``proxylessnas``."""
    return "ofa" if any("-se:" in str(k) for k in table) else "proxylessnas"


def convert_key(key: str, fmt: str) -> str | None:
    """Translate one source key to a layer key; ``None`` for a key of no known form.

    Raises:
        NotRepresentable: for a well-formed key our search space cannot express (the message says why).
    """
    if m := _MB_RE.match(key):
        hi, wi, ci, ho, wo, co, expand, k, s, idskip = (int(g) for g in m.groups()[:10])
        se, hs = (int(g) if g is not None else 0 for g in m.groups()[10:])
        _check_shape(key, hi, wi, ho, wo, s)
        if se or hs:
            raise NotRepresentable(f"uses {'squeeze-excite' if se else ''}{' and ' if se and hs else ''}"
                                   f"{'h-swish' if hs else ''}, which our MBConv does not have")
        if fmt == "ofa":
            if expand % ci:
                raise NotRepresentable(f"expanded channels {expand} are not a multiple of in_chs {ci}")
            expand //= ci
        if idskip != int(s == 1 and ci == co):
            raise NotRepresentable(f"idskip:{idskip} disagrees with stride {s} and {ci}->{co} channels (our blocks "
                                   f"add the shortcut exactly when stride is 1 and channels match)")
        return layer_key(format_block(BlockSpec("mb", k, expand, co, s)), ci, hi)
    if m := _CONV_RE.match(key):
        kind = m.group(1)
        hi, wi, ci, ho, wo, co = (int(g) for g in m.groups()[1:])
        if kind == "Conv_2":
            raise NotRepresentable("is a 1x1 conv after global pooling; our networks pool inside the classifier")
        stride = hi // ho if ho else 0
        if stride not in (1, 2):
            raise NotRepresentable(f"has a {hi}->{ho} size change, not stride 1 or 2")
        _check_shape(key, hi, wi, ho, wo, stride)
        kernel = STEM_KERNEL if kind == "Conv" else 1
        return layer_key(format_block(BlockSpec("conv", kernel, 0, co, stride)), ci, hi)
    if m := _LOGITS_RE.match(key):
        hi, wi, ci, n = (int(g) for g in m.groups())
        if hi != wi:
            raise NotRepresentable(f"has a non-square {hi}x{wi} input")
        return layer_key(f"fc_c{n}", ci, hi)
    if _POOL_RE.match(key):
        raise NotRepresentable("is a separate pooling layer; our classifier key covers pooling plus the linear layer")
    return None


def _check_shape(key: str, hi: int, wi: int, ho: int, wo: int, stride: int) -> None:
    if hi != wi or ho != wo:
        raise NotRepresentable(f"has a non-square input {hi}x{wi} or output {ho}x{wo}")
    if ho != out_resolution(hi, stride):
        raise NotRepresentable(f"maps {hi}x{wi} to {ho}x{wo}, which stride {stride} does not give")


def convert_table(table: Any, fmt: str = "auto", source: str = "<table>") -> ImportResult:
    """Convert a loaded latency table (``{key: {count, mean, var|std}}``) into profile entries.

    Raises:
        UnparsedKeysError: if any key has no known form (all of them are listed).
        ValueError: on an unknown format, or an entry whose mean is missing, negative or NaN (naming the key).
    """
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{source}: a latency table must be a non-empty mapping of key -> {{count, mean, var}}")
    fmt = detect_format(table) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; expected 'auto' or one of {list(FORMATS)}")
    result = ImportResult(fmt, total=len(table))
    unparsed: list[str] = []
    for raw_key, value in table.items():
        key = str(raw_key)
        try:
            new_key = convert_key(key, fmt)
        except NotRepresentable as why:
            result.skipped[key] = str(why)
            continue
        if new_key is None:
            unparsed.append(key)
            continue
        entry = _entry(key, value, source)
        if new_key in result.entries:
            raise ValueError(f"{source}: keys map to the same layer {new_key!r}; {key!r} is a duplicate")
        result.entries[new_key] = entry
    if unparsed:
        raise UnparsedKeysError(source, unparsed, len(table))
    if not result.entries:
        raise ValueError(f"{source}: none of the {len(table)} entries is representable in our search space "
                         f"(skipped: {dict(list(result.skipped.items())[:3])} ...)")
    return result


def _entry(key: str, value: Any, source: str) -> Entry:
    if not isinstance(value, Mapping) or "mean" not in value:
        raise ValueError(f"{source}: entry {key!r} must be a mapping with 'mean' (and count, var or std), "
                         f"got {value!r}")
    mean = value["mean"]
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean <= 0:
        raise ValueError(f"{source}: entry {key!r} has latency mean {mean!r}; expected a positive number of ms")
    if "std" in value:
        spread = float(value["std"])
    else:
        var = float(value.get("var", 0.0))
        if not math.isfinite(var) or var < 0:
            raise ValueError(f"{source}: entry {key!r} has variance {var!r}; expected a number >= 0")
        spread = math.sqrt(var)
    count = value.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{source}: entry {key!r} has count {count!r}; expected an integer >= 1")
    e = Entry(float(mean), spread, count)
    e.validate(key, source)
    return e


def load_table(path: str | os.PathLike) -> Any:
    """Read a published table with ``yaml.safe_load`` (the original code's bare ``yaml.load`` fails on PyYAML 6)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latency table {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; expected a YAML latency table") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None


def import_table(path: str | os.PathLike, fmt: str = "auto", name: str | None = None,
                 metadata: Mapping[str, Any] | None = None, keep_entries: bool = True) -> tuple[Profile, ImportResult]:
    """Import a published table as a :class:`Profile` with a linear predictor fitted on its entries.

    Args:
        path: The table file.
        fmt: ``auto``, ``proxylessnas`` or ``ofa``.
        name: Profile name (default: the file stem).
        metadata: Fields overriding the defaults (device ``mobile``, batch 1, threads 1, float32, ...).
        keep_entries: ``False`` keeps only the fitted predictor (for shipping constants fitted to a table whose
            entries must not be redistributed).

    Returns:
        The profile and the import report (entries, skipped keys with reasons).
    """
    path = Path(path)
    result = convert_table(load_table(path), fmt, str(path))
    predictor = fit_linear({k: e.ms for k, e in result.entries.items()})
    md: dict[str, Any] = {
        "device": "mobile", "device_name": "unknown", "runtime": "unknown", "runtime_version": "unknown",
        "batch_size": 1, "threads": 1, "dtype": "float32", "date": _dt.date.today().isoformat(),
        "method": "imported" if keep_entries else "fitted",
        "source": f"{result.fmt} latency table {path.name}",
        "import": {"format": result.fmt, "table_keys": result.total, "imported": len(result.entries),
                   "skipped": len(result.skipped)},
    }
    md.update(metadata or {})
    profile = Profile(name or path.stem, md, result.entries if keep_entries else {}, predictor)
    return profile, result
