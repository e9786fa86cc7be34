"""Hardware profiles: per-layer latency tables of one platform, plus a fitted or analytic predictor.

A profile is a YAML file in ``hardware_profiles/`` (format in ``hardware_profiles/README.md``): metadata saying
what was measured and how, ``entries`` keyed by :func:`proxyless_ray.nn.arch.layer_key` (``mb_k5_e6_c40_s2@24x56x56``)
with the latency in ms, its spread and the number of runs, and an optional ``predictor``
(:mod:`proxyless_ray.latency.predictor`) for shapes the table does not hold. Large tables go to a Parquet file
beside the YAML. :class:`Profile` implements the ``lat_ms`` latency-model interface: exact entry first, then the
predictor; in ``strict`` mode a missing entry is an error.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from proxyless_ray.fileio import atomic_write_text, umask_mode
from proxyless_ray.latency.predictor import Predictor, predictor_from_dict
from proxyless_ray.nn.arch import layer_key, parse_block, parse_layer_key
from proxyless_ray.nn.space import SearchSpace

PROFILE_VERSION = 1
DEVICES = ("cpu", "gpu", "mobile")
METHODS = ("measured", "imported", "fitted", "analytic")
REQUIRED_METADATA = ("device", "device_name", "runtime", "runtime_version", "batch_size", "threads", "dtype", "date",
                     "method", "source")
PARQUET_THRESHOLD = 2000  # entries; above this the table goes to a Parquet file beside the YAML
PROFILE_DIR = "hardware_profiles"


@dataclass(frozen=True)
class Entry:
    """One measured layer: central latency (median of repeats, or the source table's mean), spread, run count."""

    ms: float
    spread: float = 0.0  # standard deviation (or a robust estimate of it), ms
    count: int = 1

    def validate(self, key: str, source: str) -> None:
        for name, v in (("ms", self.ms), ("spread", self.spread)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{source}: entry {key!r} has {name} {v!r}; expected a finite number of ms")
        if self.ms <= 0:
            raise ValueError(f"{source}: entry {key!r} has latency {self.ms!r} ms; expected a positive number")
        if self.spread < 0:
            raise ValueError(f"{source}: entry {key!r} has spread {self.spread!r} ms; expected >= 0")
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"{source}: entry {key!r} has count {self.count!r}; expected an integer >= 1")


@dataclass(frozen=True)
class Profile:
    """A platform's latency model: metadata, exact entries and an optional predictor.

    Attributes:
        name: Profile name (the file stem in ``hardware_profiles/``).
        metadata: Device, runtime, batch size, threads, dtype, date, method and source (see the README).
        entries: ``layer_key`` -> :class:`Entry`.
        predictor: Model for shapes without an entry, or ``None``.
        strict: Raise on a shape without an entry instead of predicting it.
    """

    name: str
    metadata: Mapping[str, Any]
    entries: Mapping[str, Entry] = field(default_factory=dict)
    predictor: Predictor | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | None = None) -> None:
        """Check metadata and every entry; raise ValueError naming the bad field, key or value."""
        src = source or f"profile {self.name!r}"
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise ValueError(f"{src}: metadata lacks {missing}; required: {list(REQUIRED_METADATA)}")
        md = self.metadata
        if md["device"] not in DEVICES:
            raise ValueError(f"{src}: unknown device {md['device']!r} in metadata; expected one of {list(DEVICES)}")
        if md["method"] not in METHODS:
            raise ValueError(f"{src}: unknown method {md['method']!r} in metadata; expected one of {list(METHODS)}")
        for k in ("batch_size", "threads"):
            if not isinstance(md[k], int) or isinstance(md[k], bool) or md[k] < 1:
                raise ValueError(f"{src}: metadata {k} must be an integer >= 1, got {md[k]!r}")
        if "fingerprint" in md and not isinstance(md["fingerprint"], Mapping):
            raise ValueError(f"{src}: metadata fingerprint must be a mapping (see hardware_profiles/README.md), got "
                             f"{md['fingerprint']!r}")
        pred_batch = getattr(self.predictor, "batch_size", None)
        if pred_batch is not None and pred_batch != md["batch_size"]:
            raise ValueError(f"{src}: predictor batch_size {pred_batch} differs from metadata batch_size "
                             f"{md['batch_size']}")
        if not self.entries and self.predictor is None:
            raise ValueError(f"{src}: a profile needs entries, a predictor, or both; it has neither")
        for key, e in self.entries.items():
            try:
                parse_layer_key(key)
            except ValueError as err:
                raise ValueError(f"{src}: {err}") from None
            e.validate(key, src)

    # -- LatencyModel ------------------------------------------------------------------------------------------

    def lookup(self, block: str, in_chs: int, resolution: int) -> tuple[float, str]:
        """Latency in ms and where it came from: ``exact``, ``predicted`` or ``zero``.

        Raises:
            ValueError: in strict mode (or without a predictor) when the profile has no entry for the shape.
        """
        if not block.startswith("fc_c") and parse_block(block).is_zero:
            return 0.0, "zero"
        key = layer_key(block, in_chs, resolution)
        entry = self.entries.get(key)
        if entry is not None:
            return float(entry.ms), "exact"
        if self.strict or self.predictor is None:
            why = "strict mode forbids predicting it" if self.strict else "the profile has no predictor"
            raise ValueError(f"profile {self.name!r} has no entry for {key!r} and {why}; profile this shape "
                             f"(proxyless-ray profile) or drop strict mode")
        return float(self.predictor.lat_ms(block, in_chs, resolution)), "predicted"

    def lat_ms(self, block: str, in_chs: int, resolution: int) -> float:
        """Latency in ms of one layer (exact entry first, then the predictor)."""
        return self.lookup(block, in_chs, resolution)[0]

    def with_strict(self, strict: bool = True) -> Profile:
        return replace(self, strict=strict)

    # -- files -------------------------------------------------------------------------------------------------

    def to_yaml(self, entries_file: str | None = None) -> str:
        """The profile as YAML text; entries one per line (diffable), or a pointer to ``entries_file``."""
        head: dict[str, Any] = {"version": PROFILE_VERSION, "name": self.name, "metadata": dict(self.metadata),
                                "predictor": None if self.predictor is None else self.predictor.to_dict()}
        head = json.loads(json.dumps(head, default=str))  # plain types only (e.g. torch's version string class)
        text = yaml.safe_dump(head, sort_keys=False, default_flow_style=False, width=118, allow_unicode=True)
        if entries_file is not None:
            return text + f"entries_file: {entries_file}\n"
        if not self.entries:
            return text + "entries: {}\n"
        lines = ["entries:"]
        for key in sorted(self.entries, key=_key_order):
            e = self.entries[key]
            lines.append(f'  "{key}": {{ms: {e.ms:.6g}, spread: {e.spread:.4g}, count: {e.count}}}')
        return text + "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike, parquet_threshold: int = PARQUET_THRESHOLD) -> Path:
        """Write the profile atomically; more than ``parquet_threshold`` entries go to ``<stem>.entries.parquet``.

        Returns:
            The YAML path.
        """
        path = Path(path)
        entries_file = None
        if len(self.entries) > parquet_threshold:
            entries_file = f"{path.stem}.entries.parquet"
            _write_parquet(path.parent / entries_file, self.entries)
        atomic_write_text(path, self.to_yaml(entries_file))
        return path


def _key_order(key: str) -> tuple[int, int, str]:
    block, in_chs, res = parse_layer_key(key)
    return -res, in_chs, block


def _write_parquet(path: Path, entries: Mapping[str, Entry]) -> None:
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted(entries, key=_key_order)
    table = pa.table({"key": keys, "ms": [entries[k].ms for k in keys], "spread": [entries[k].spread for k in keys],
                      "count": pa.array([entries[k].count for k in keys], type=pa.int64())})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    os.fchmod(fd, umask_mode())  # mkstemp's 0600 would survive the rename
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_parquet(path: Path, source: str) -> dict[str, Entry]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{source}: entries_file {str(path)!r} does not exist")
    cols = pq.read_table(path).to_pydict()
    missing = [c for c in ("key", "ms", "spread", "count") if c not in cols]
    if missing:
        raise ValueError(f"{source}: entries_file {str(path)!r} lacks column(s) {missing}")
    return {k: Entry(float(m), float(s), int(c)) for k, m, s, c in zip(cols["key"], cols["ms"], cols["spread"],
                                                                           cols["count"])}


def profile_from_dict(d: Any, source: str = "<profile>", base_dir: Path | None = None, strict: bool = False) -> Profile:
    """Build a :class:`Profile` from its YAML mapping; raises ValueError naming the bad field, key or value."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a profile must be a mapping, got {type(d).__name__}")
    known = {"version", "name", "metadata", "predictor", "entries", "entries_file"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown profile field(s) {unknown}; expected some of {sorted(known)}")
    if d.get("version") != PROFILE_VERSION:
        raise ValueError(f"{source}: profile version {d.get('version')!r} is not supported; expected {PROFILE_VERSION}")
    md = d.get("metadata")
    if not isinstance(md, dict):
        raise ValueError(f"{source}: metadata must be a mapping, got {md!r}")
    predictor = None if d.get("predictor") is None else predictor_from_dict(d["predictor"], f"{source}: predictor")
    if d.get("entries_file"):
        entries = _read_parquet((base_dir or Path(".")) / str(d["entries_file"]), source)
    else:
        raw = d.get("entries") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: entries must be a mapping of layer key to {{ms, spread, count}}")
        entries = {}
        for key, v in raw.items():
            if not isinstance(v, dict) or "ms" not in v:
                raise ValueError(f"{source}: entry {key!r} must be a mapping with 'ms' (and 'spread', 'count'), "
                                 f"got {v!r}")
            bad = sorted(set(v) - {"ms", "spread", "count"})
            if bad:
                raise ValueError(f"{source}: entry {key!r} has unknown field(s) {bad}; expected ms, spread, count")
            entries[str(key)] = Entry(v["ms"], v.get("spread", 0.0), v.get("count", 1))
    return Profile(str(d.get("name") or Path(source).stem), md, entries, predictor, strict)


def profile_from_text(text: str, source: str = "<profile>", strict: bool = False) -> Profile:
    """A profile from its YAML text (:meth:`Profile.to_yaml` with the entries inline): how a profile resolved on
    the driver (``cpu_local``) travels to Ray workers, which may not share its disk."""
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML ({err})") from None
    return profile_from_dict(d, source, None, strict)


def read_profile(path: str | os.PathLike, strict: bool = False) -> Profile:
    """Load a profile file (YAML with ``yaml.safe_load``; a Parquet side table if it names one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile file {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    try:
        return profile_from_dict(d, str(path), path.parent, strict)
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def profile_dirs() -> list[Path]:
    """Folders searched for profile names: the repository's ``hardware_profiles/`` and the CWD's."""
    repo = Path(__file__).resolve().parents[2] / PROFILE_DIR
    cwd = Path.cwd() / PROFILE_DIR
    return [repo] if cwd.resolve() == repo else [repo, cwd]


def list_profiles() -> dict[str, Path]:
    """Profile name -> path for every ``*.yaml`` in :func:`profile_dirs` (the repository's win on clashes)."""
    out: dict[str, Path] = {}
    for folder in profile_dirs():
        if folder.is_dir():
            for p in sorted(folder.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return out


def load_profile(spec: str | os.PathLike, strict: bool = False) -> Profile:
    """Resolve a profile by name (``cpu_1thread``) in ``hardware_profiles/`` or by path.

    Raises:
        FileNotFoundError: naming the spec and the available profiles when nothing matches.
        ValueError: when the file is malformed (naming the bad field, key or value).
    """
    text = os.fspath(spec)
    if os.path.isfile(text):
        return read_profile(text, strict)
    known = list_profiles()
    if text in known:
        return read_profile(known[text], strict)
    raise FileNotFoundError(f"hardware profile {text!r} is neither a file nor a profile name; available profiles: "
                            f"{sorted(known)} (in {[str(p) for p in profile_dirs()]})")


# -- coverage ------------------------------------------------------------------------------------------------------


def shipped_models(exclude: str | None = None) -> dict[str, Profile]:
    """Every profile in ``hardware_profiles/`` but ``exclude`` (for per-epoch latency on all platforms)."""
    return {name: load_profile(name) for name in list_profiles() if name != exclude}


def space_layers(spaces: SearchSpace | Iterable[SearchSpace]) -> list[tuple[str, int, int]]:
    """Every distinct ``(block, in_chs, resolution)`` a space can place: all non-zero candidates of every mixed
    layer, plus the fixed layers (stem, first block, feature mix, classifier). Order: first occurrence."""
    spaces = [spaces] if isinstance(spaces, SearchSpace) else list(spaces)
    seen: dict[str, tuple[str, int, int]] = {}
    for space in spaces:
        triples = [(layer.block, layer.in_chs, layer.resolution) for layer in space.fixed_layers()]
        for slot in space.slots():
            triples += [(c, slot.in_chs, slot.resolution) for c in slot.candidates if not parse_block(c).is_zero]
        for t in triples:
            seen.setdefault(layer_key(*t), t)
    return list(seen.values())


def space_record(space: SearchSpace) -> dict[str, Any]:
    """What a profile's metadata records about a space it was measured for."""
    return {"fingerprint": space.fingerprint(), "preset": space.preset, "resolution": space.resolution,
            "in_chs": space.in_chs}


def check_space(profile: Profile, space: SearchSpace, strict: bool | None = None) -> dict[str, Any]:
    """Check that ``profile`` can price every layer of ``space``, and report how many shapes are exact.

    A profile measured for other spaces still prices this one through its predictor, unless ``strict`` (default:
    the profile's own flag) is on or it has no predictor: then every missing shape is an error.

    Returns:
        ``{"fingerprint", "n_shapes", "n_exact", "missing"}`` (``missing``: keys the predictor will price).

    Raises:
        ValueError: naming the profile, the space's fingerprint, the spaces the profile was measured for and
            the first missing keys.
    """
    strict = profile.strict if strict is None else strict
    keys = [layer_key(*t) for t in space_layers(space)]
    missing = [k for k in keys if k not in profile.entries]
    fp = space.fingerprint()
    if missing and (strict or profile.predictor is None):
        measured = [s.get("fingerprint") for s in profile.metadata.get("spaces", []) if isinstance(s, Mapping)]
        why = "strict mode is on" if strict else "it has no predictor"
        raise ValueError(
            f"profile {profile.name!r} does not match search space {fp} (preset {space.preset!r}, "
            f"{space.resolution} px): {len(missing)} of {len(keys)} layer shapes have no entry (e.g. "
            f"{missing[:3]}) and {why}; the profile was measured for space(s) {measured or 'none recorded'}. "
            f"Profile this space: proxyless-ray profile --space <preset or experiment> -o <profile>.yaml")
    return {"fingerprint": fp, "n_shapes": len(keys), "n_exact": len(keys) - len(missing), "missing": missing}


__all__ = ["DEVICES", "Entry", "Profile", "check_space", "list_profiles", "load_profile", "profile_dirs",
           "profile_from_dict", "profile_from_text", "read_profile", "space_layers", "space_record"]
