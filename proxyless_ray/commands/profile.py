"""``proxyless-ray profile``, ``latency`` and ``import-profile``: build hardware profiles and price networks.

* ``profile`` measures every candidate op of one or more search spaces (presets or experiment files) at every
  shape it occurs at, on this machine or inside a Ray actor placed by custom resources.
* ``latency`` prints an architecture's predicted latency layer by layer (``--json`` for machines); ``--arch``
  takes our architecture JSON or a published ProxylessNAS network config.
* ``import-profile`` converts a published ProxylessNAS or Once-for-All latency table into a profile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from proxyless_ray.arch import Arch
from proxyless_ray.latency.profile import PARQUET_THRESHOLD, Profile, check_space, load_profile
from proxyless_ray.space import PRESETS, SearchSpace, space_from_preset


def resolve_space(text: str) -> tuple[SearchSpace, Any]:
    """A preset name or an experiment YAML -> ``(space, experiment or None)``."""
    if text in PRESETS:
        return space_from_preset(text), None
    if os.path.isfile(text):
        from proxyless_ray.config import load_experiment

        exp = load_experiment(text)
        return exp.space, exp
    raise ValueError(f"--space {text!r} is neither a preset ({sorted(PRESETS)}) nor an experiment file")


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"output {text!r} must be a .yaml file")
    if not path.parent.resolve().is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    return path


def _json_mapping(text: str | None, option: str) -> dict[str, float] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{option} {text!r} is not valid JSON ({err.msg}); "
                         f"expected e.g. '{{\"hw_xyz\": 1}}'") from None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{option} {text!r} must be a non-empty JSON object of resource -> amount")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{option}: resource {k!r} has amount {v!r}; expected a positive number")
    return value


def run_profile(args: argparse.Namespace) -> int:
    from proxyless_ray.latency.profiler import ProfilerSettings, check_device, profile_spaces

    # [1] validate everything before minutes of measuring
    check_device(args.device)
    out = _output_path(args.output)
    resources = _json_mapping(args.ray_resources, "--ray-resources")
    settings = ProfilerSettings(args.device, args.threads, args.batch_size, args.warmup, args.repeats, args.min_time,
                                rounds=args.rounds, context=args.context, clock=args.clock,
                                statistic=args.statistic)
    if args.device.startswith("cuda") and resources is None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {args.device!r} requested but torch.cuda.is_available() is False here; "
                             f"profile on a GPU node, e.g. with --ray-resources '{{\"GPU\": 1}}'")
    spaces = [resolve_space(s)[0] for s in (args.space or ["small"])]
    # [2] measure, fit the predictor, write atomically
    profile = profile_spaces(spaces, settings, args.name or out.stem, resources, args.ray_address,
                             args.ray_num_cpus, progress=not args.no_progress)
    profile.save(out, args.parquet_threshold)
    fit = profile.predictor.stats.get("mb") if profile.predictor else None
    print(f"wrote {out}: {len(profile.entries)} entries on {profile.metadata['device_name']}"
          + (f"; predictor fit MAPE {fit.mape:.1f} % (leave-one-out {fit.loo_mape or float('nan'):.1f} %) on "
             f"{fit.n} MBConv entries" if fit else ""))
    return 0


def latency_report(profile: Profile, arch: Arch) -> dict[str, Any]:
    """Per-layer and total latency of ``arch`` on ``profile`` as plain data."""
    layers, counts, total = [], {"exact": 0, "predicted": 0, "zero": 0}, 0.0
    for i, layer in enumerate(arch.layers()):
        ms, source = profile.lookup(layer.block, layer.in_chs, layer.resolution)
        counts[source] += 1
        total += ms
        layers.append({"index": i, "key": layer.key, "block": layer.block, "in_chs": layer.in_chs,
                       "resolution": layer.resolution, "stage": layer.stage, "ms": round(ms, 5), "source": source})
    md = profile.metadata
    return {"profile": profile.name, "device": md["device"], "device_name": md["device_name"],
            "batch_size": md["batch_size"], "threads": md["threads"], "arch": arch.name, "resolution": arch.resolution,
            "total_ms": round(total, 4), "counts": counts, "layers": layers}


def run_latency(args: argparse.Namespace) -> int:
    space, exp = resolve_space(args.space) if args.space else (None, None)
    spec = args.profile or (exp.latency.profile if exp is not None else None)
    if spec is None:
        raise ValueError("give --profile, or --space with an experiment file that names latency.profile")
    strict = args.strict or bool(exp is not None and exp.latency.strict)
    profile = load_profile(spec, strict=strict)
    if space is not None:
        check_space(profile, space)
    arch = Arch.load(args.arch)
    report = latency_report(profile, arch)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    md = profile.metadata
    print(f"profile {profile.name}: {md['device_name']} ({md['device']}, {md['runtime']} {md['runtime_version']}, "
          f"batch {md['batch_size']}, {md['threads']} thread(s), {md['dtype']})")
    print(f"arch {arch.name or Path(args.arch).stem}: {arch.resolution} px input")
    print(f"{'#':>3}  {'layer':<38} {'ms':>9}  source")
    for row in report["layers"]:
        print(f"{row['index']:>3}  {row['key']:<38} {row['ms']:>9.4f}  {row['source']}")
    c = report["counts"]
    print(f"total {report['total_ms']:.3f} ms ({c['exact']} exact, {c['predicted']} predicted, {c['zero']} zero)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from proxyless_ray.latency.importers import import_table
    from proxyless_ray.latency.predictor import calibrate

    out = _output_path(args.output)
    if (args.calibrate_arch is None) != (args.calibrate_ms is None):
        raise ValueError("--calibrate-arch and --calibrate-ms go together")
    md: dict[str, Any] = {"device": args.device, "device_name": args.device_name, "runtime": args.runtime,
                          "runtime_version": args.runtime_version, "batch_size": args.batch_size,
                          "threads": args.threads}
    if args.source:
        md["source"] = args.source
    profile, result = import_table(args.table, args.format, args.name or out.stem, md,
                                   keep_entries=not args.constants_only)
    if args.calibrate_arch is not None:
        arch = Arch.load(args.calibrate_arch)
        pred = calibrate(profile.predictor, arch, args.calibrate_ms, args.calibrate_source or "not given")
        profile = Profile(profile.name, profile.metadata, profile.entries, pred)
    profile.save(out, args.parquet_threshold)
    print(f"wrote {out}: {result.fmt} table, {len(result.entries)} of {result.total} entries imported"
          + ("" if not args.constants_only else " (fitted constants only, entries not kept)")
          + f", {len(result.skipped)} skipped")
    for key, why in result.skipped.items():
        print(f"  skipped {key}: {why}", file=sys.stderr)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="measure a hardware profile on this device (or a Ray node)",
                              description="Measure every candidate op of the search space(s) at every shape it "
                                          "occurs at, plus stem and head, and fit the profile's predictor.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--space", action="append", help="search-space preset or experiment YAML; repeat for a union "
                                                    "(default: small)")
    p.add_argument("-o", "--output", required=True, help="profile to write, e.g. hardware_profiles/cpu_1thread.yaml")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per layer (default 10)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per layer at least (default 30)")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds of timed runs per layer at least")
    p.add_argument("--rounds", type=int, default=1, help="passes over all layers, each timing a share of the "
                                                          "repeats (evens out a drifting, shared machine)")
    p.add_argument("--context", default="network", choices=("network", "isolated"),
                   help="time layers inside cover networks of the space (default) or each layer alone")
    p.add_argument("--clock", default="wall", choices=("wall", "thread"),
                   help="wall clock (default) or the timing thread's CPU time (1 CPU thread only: ignores other "
                        "processes on a shared machine)")
    p.add_argument("--statistic", default="median", help="median (default), min or pNN, e.g. p10 (each the mean "
                                                         "of the 5 %% of runs around it); use min on a shared machine")
    p.add_argument("--ray-resources", help="measure in a Ray actor requesting these resources, e.g. "
                                           "'{\"hw_xyz\": 1}'")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--ray-num-cpus", type=float, help="CPUs the Ray actor reserves (default: --threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--parquet-threshold", type=int, default=PARQUET_THRESHOLD,
                   help=f"entries above which the table goes to a Parquet file (default {PARQUET_THRESHOLD})")
    p.set_defaults(func=run_profile)

    q = subparsers.add_parser("latency", help="predicted latency of an architecture, layer by layer",
                              description="Price an architecture (our JSON or a ProxylessNAS network config) on a "
                                          "hardware profile.")
    q.add_argument("--profile", help="profile name in hardware_profiles/ or a path (default: the experiment's)")
    q.add_argument("--arch", required=True, help="architecture JSON or ProxylessNAS net.config")
    q.add_argument("--space", help="preset or experiment YAML to check the profile against")
    q.add_argument("--strict", action="store_true", help="fail on a shape the profile does not hold")
    q.add_argument("--json", action="store_true", help="print a JSON object (total_ms and per-layer list)")
    q.set_defaults(func=run_latency)

    r = subparsers.add_parser("import-profile", help="convert a published ProxylessNAS / OFA latency table",
                              description="Import a ProxylessNAS (mobile_trim.yaml) or Once-for-All "
                                          "(*_lookup_table.yaml) latency table as a profile with a fitted predictor.")
    r.add_argument("table", help="the table YAML")
    r.add_argument("-o", "--output", required=True, help="profile to write (.yaml)")
    r.add_argument("--format", default="auto", choices=("auto", "proxylessnas", "ofa"))
    r.add_argument("--name", help="profile name (default: the output file's stem)")
    r.add_argument("--device", default="mobile", help="cpu, gpu or mobile (default mobile)")
    r.add_argument("--device-name", default="unknown", help="e.g. 'Google Pixel 1'")
    r.add_argument("--runtime", default="unknown", help="e.g. TFLite")
    r.add_argument("--runtime-version", default="unknown")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--source", help="where the table comes from (URL, paper)")
    r.add_argument("--constants-only", action="store_true", help="keep only the fitted predictor, not the entries")
    r.add_argument("--calibrate-arch", help="network whose published end-to-end latency scales the predictor")
    r.add_argument("--calibrate-ms", type=float, help="that network's published latency in ms")
    r.add_argument("--calibrate-source", help="where that number is published")
    r.add_argument("--parquet-threshold", type=int, default=PARQUET_THRESHOLD)
    r.set_defaults(func=run_import)
