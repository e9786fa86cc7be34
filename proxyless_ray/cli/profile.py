"""``proxyless-ray profile``, ``latency`` and ``import-profile``: build hardware profiles and price networks.

* ``profile`` measures every candidate op of one or more search spaces (presets or experiment files) at every
  shape it occurs at, on this machine or inside a Ray actor placed by custom resources.
* ``latency`` prints an architecture's predicted latency layer by layer (``--json`` for machines); ``--arch``
  takes our architecture JSON or a published ProxylessNAS network config.
* ``import-profile`` converts a published ProxylessNAS or Once-for-All latency table into a profile.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from proxyless_ray.latency.profile import PARQUET_THRESHOLD, Profile
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.space import PRESETS, SearchSpace, space_from_preset


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


def _settings(args: argparse.Namespace):
    """Profiler settings from the options; ``--quick`` fills every timing option the user did not give."""
    from proxyless_ray.latency.local import quick_settings
    from proxyless_ray.latency.profiler import ProfilerSettings

    full = {"warmup": 10, "repeats": 30, "min_time_s": 0.1, "rounds": 1, "statistic": "median", "clock": "wall"}
    if args.quick:
        q = quick_settings(args.threads, args.device)
        full = {k: getattr(q, k) for k in full}
    given = {"warmup": args.warmup, "repeats": args.repeats, "min_time_s": args.min_time, "rounds": args.rounds,
             "statistic": args.statistic, "clock": args.clock}
    timing = {k: full[k] if v is None else v for k, v in given.items()}
    if args.quick:  # its many short rounds need more runs per layer than the default cap
        timing["max_repeats"] = quick_settings(args.threads, args.device).max_repeats
    return ProfilerSettings(args.device, args.threads, args.batch_size, context=args.context, **timing)


def run_profile(args: argparse.Namespace) -> int:
    from proxyless_ray.latency.profiler import profile_spaces
    from proxyless_ray.latency.timing import check_device

    # [1] validate everything before minutes of measuring
    check_device(args.device)
    if args.output is None and not args.quick:
        raise ValueError("give -o/--output (the profile to write); only --quick may leave it out (then the profile "
                         "goes to the cpu_local cache)")
    out = None if args.output is None else _output_path(args.output)
    resources = _json_mapping(args.ray_resources, "--ray-resources")
    settings = _settings(args)
    if args.device.startswith("cuda") and resources is None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {args.device!r} requested but torch.cuda.is_available() is False here; "
                             f"profile on a GPU node, e.g. with --ray-resources '{{\"GPU\": 1}}'")
    spaces = [resolve_space(s)[0] for s in (args.space or ["small"])]
    if out is None:
        return _profile_into_cache(args, spaces, settings, resources)
    # [2] measure, fit the predictor, write atomically
    profile = profile_spaces(spaces, settings, args.name or out.stem, resources, args.ray_address,
                             args.ray_num_cpus, progress=not args.no_progress)
    profile.save(out, args.parquet_threshold)
    _say_written(out, profile)
    return 0


def _say_written(out: Path, profile: Profile) -> None:
    fit = profile.predictor.stats.get("mb") if profile.predictor else None
    print(f"wrote {out}: {len(profile.entries)} entries on {profile.metadata['device_name']}"
          + (f"; predictor fit MAPE {fit.mape:.1f} % (leave-one-out {fit.loo_mape or float('nan'):.1f} %) on "
             f"{fit.n} MBConv entries" if fit else ""))


def _profile_into_cache(args: argparse.Namespace, spaces: list[SearchSpace], settings, resources) -> int:
    """``profile --quick`` without ``-o``: measure this CPU into the cache that ``cpu_local`` reads."""
    from proxyless_ray.latency.fingerprint import cpu_fingerprint
    from proxyless_ray.latency.local import cache_path
    from proxyless_ray.latency.profiler import profile_spaces

    if args.device != "cpu" or resources is not None or len(spaces) != 1:
        raise ValueError("--quick without -o fills the cpu_local cache: it needs --device cpu, no --ray-resources "
                         "and one --space")
    space = spaces[0]
    name = "cpu_local" if args.threads == 1 else f"cpu_local_{args.threads}threads"
    out = cache_path(cpu_fingerprint(args.threads), space, args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = profile_spaces([space], settings, name, progress=not args.no_progress)
    profile.save(out)
    _say_written(out, profile)
    print(f"experiments with latency.profile: {name} and this space now use it")
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


def _load(spec: str, space: SearchSpace | None, strict: bool) -> Profile:
    from proxyless_ray.latency.model import load_latency_model, load_latency_model_for

    model = load_latency_model_for(spec, space, strict) if space is not None else load_latency_model(spec, strict)
    if not isinstance(model, Profile):
        raise ValueError(f"--profile {spec!r} is the FLOPs placeholder, not a hardware profile; name a profile")
    return model


def run_latency(args: argparse.Namespace) -> int:
    from proxyless_ray.latency.fingerprint import check_machine

    space, exp = resolve_space(args.space) if args.space else (None, None)
    spec = args.profile or (exp.latency.profile if exp is not None else None)
    if spec is None:
        raise ValueError("give --profile, or --space with an experiment file that names latency.profile")
    if len(args.arch) > 1 and not args.check:
        raise ValueError(f"--arch got {len(args.arch)} networks; several are for --check, one otherwise")
    if args.calibrate and not args.check:
        raise ValueError("--calibrate goes with --check (it fits a scale to the networks --check measures)")
    if args.calibrate and args.output is None:
        raise ValueError("--calibrate needs -o/--output, the calibrated profile to write (.yaml)")
    out = _output_path(args.output) if args.output else None
    strict = args.strict or bool(exp is not None and exp.latency.strict)
    profile = _load(spec, space, strict)
    archs = [Arch.load(a) for a in args.arch]
    note = check_machine(profile, strict=strict, stream=io.StringIO() if args.json else None)
    if args.check:
        return _run_check(args, profile, archs, out)
    arch = archs[0]
    report = latency_report(profile, arch)
    if args.json:
        print(json.dumps({**report, "machine_note": note}, indent=2))
        return 0
    md = profile.metadata
    print(f"profile {profile.name}: {md['device_name']} ({md['device']}, {md['runtime']} {md['runtime_version']}, "
          f"batch {md['batch_size']}, {md['threads']} thread(s), {md['dtype']})")
    print(f"arch {arch.name or Path(args.arch[0]).stem}: {arch.resolution} px input")
    print(f"{'#':>3}  {'layer':<38} {'ms':>9}  source")
    for row in report["layers"]:
        print(f"{row['index']:>3}  {row['key']:<38} {row['ms']:>9.4f}  {row['source']}")
    c = report["counts"]
    print(f"total {report['total_ms']:.3f} ms ({c['exact']} exact, {c['predicted']} predicted, {c['zero']} zero)")
    return 0


def _run_check(args: argparse.Namespace, profile: Profile, archs: list[Arch], out: Path | None) -> int:
    """``latency --check``: predicted vs measured here, and with ``--calibrate`` the fitted scale."""
    from proxyless_ray.latency.check import calibrated, check_profile, fit_scale

    md = profile.metadata
    names = [a.name or Path(p).stem for a, p in zip(archs, args.arch)]
    if len(set(names)) < len(names):  # exported networks are all called "arch": their folders tell them apart
        names = [str(Path(p).parent) if Path(p).suffix == ".json" else str(p) for p in args.arch]
    rows = check_profile(profile, archs, args.min_time, args.repeats, names)
    fit = fit_scale(rows) if args.calibrate else None
    if args.json:
        print(json.dumps({"profile": profile.name, "statistic": md.get("statistic", "median"),
                          "threads": md["threads"], "batch_size": md["batch_size"],
                          "networks": [{"arch": r.arch, "predicted_ms": r.predicted_ms, "measured_ms": r.measured_ms,
                                        "ratio": r.ratio, "count": r.count} for r in rows],
                          "calibration": None if fit is None else vars(fit)}, indent=2))
    else:
        print(f"profile {profile.name} vs this machine: {md.get('statistic', 'median')} of end-to-end runs "
              f"({md.get('clock', 'wall')} clock), "
              f"{md['threads']} thread(s), batch {md['batch_size']}")
        width = max([28] + [len(r.arch) for r in rows])
        print(f"{'network':<{width}} {'predicted ms':>12} {'measured ms':>12} {'pred/meas':>9}")
        for r in rows:
            print(f"{r.arch:<{width}} {r.predicted_ms:>12.3f} {r.measured_ms:>12.3f} {r.ratio:>9.2f}")
        if fit is not None:
            loo = "n/a (fewer than 3 networks)" if fit.loo_mape is None else f"{fit.loo_mape:.1f} %"
            print(f"calibration: scale x{fit.scale:.4f} on {fit.n} network(s); error {fit.mape_before:.1f} % -> "
                  f"{fit.mape_after:.1f} % in sample, leave-one-out {loo}")
    if fit is not None and out is not None:
        prof = calibrated(profile, fit, rows, args.name or out.stem)
        prof.save(out)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
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
    p.add_argument("-o", "--output", help="profile to write, e.g. hardware_profiles/cpu_1thread.yaml (with --quick "
                                          "and no -o: the cpu_local cache)")
    p.add_argument("--quick", action="store_true", help="quick mode (what cpu_local uses): median of fewer, shorter "
                                                        "runs; timing options given explicitly still win")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, help="untimed runs per layer (default 10)")
    p.add_argument("--repeats", type=int, help="timed runs per layer at least (default 30)")
    p.add_argument("--min-time", type=float, help="seconds of timed runs per layer at least (default 0.1)")
    p.add_argument("--rounds", type=int, help="passes over all layers, each timing a share of the repeats (evens out "
                                              "a drifting, shared machine; default 1)")
    p.add_argument("--context", default="network", choices=("network", "isolated"),
                   help="time layers inside cover networks of the space (default) or each layer alone")
    p.add_argument("--clock", choices=("wall", "thread"),
                   help="wall clock (default; --quick on 1 CPU thread: thread) or the timing thread's CPU time (1 CPU "
                        "thread only: ignores other processes on a shared machine)")
    p.add_argument("--statistic", help="median (default), min or pNN, e.g. p10 (each the mean "
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
    q.add_argument("--profile", help="profile name in hardware_profiles/, a path, or cpu_local (default: the "
                                     "experiment's)")
    q.add_argument("--arch", required=True, nargs="+", help="architecture JSON or ProxylessNAS net.config (several "
                                                            "with --check)")
    q.add_argument("--space", help="preset or experiment YAML to check the profile against")
    q.add_argument("--strict", action="store_true", help="fail on a shape the profile does not hold")
    q.add_argument("--json", action="store_true", help="print a JSON object (total_ms and per-layer list)")
    q.add_argument("--check", action="store_true", help="measure the networks on this machine (the profile's "
                                                        "threads, batch and statistic) and print predicted vs measured")
    q.add_argument("--calibrate", action="store_true", help="with --check: fit one scale on the networks, state its "
                                                            "error and write the calibrated profile to -o")
    q.add_argument("-o", "--output", help="calibrated profile to write (.yaml)")
    q.add_argument("--name", help="calibrated profile's name (default: the output file's stem)")
    q.add_argument("--min-time", type=float, default=1.0, help="--check: seconds of timed runs per network")
    q.add_argument("--repeats", type=int, default=30, help="--check: timed runs per network at least")
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
