"""Benchmark (slow, not part of CI): does hardware-aware search beat random architectures? Prints one JSON object.

On Fashion-MNIST with the small space and one fixed training budget for every network:

1. a lambda sweep per hardware profile (``cpu_1thread``, ``pixel1``, ``v100_roofline``) finds networks;
2. 10 networks sampled uniformly from the same space and a MobileNetV2-style baseline (every layer k3 e6, no zero
   layers) are the comparison;
3. every network (searched, random, baseline) is retrained from scratch with the same budget; reported: test
   accuracy, predicted latency on every profile, and latency measured on this CPU (1 thread, batch 1);
4. per hardware, the hypervolume (test accuracy up, predicted latency down) of the searched front against the
   random front, under the same reference point; target: searched above random for every hardware;
5. the cross-hardware matrix: each hardware's searched networks priced on every profile; target: the network
   searched for a platform is the fastest on that platform among networks of similar accuracy (within 1 point);
6. matched latency: for every searched network, ``--matched`` random architectures whose predicted latency on the
   same hardware lies within 5 % of it, retrained alike, each network with ``--seeds`` seeds; target per hardware:
   searched >= mean(random) + 1 std. Whether a group's networks differ at all at this budget is reported beside it
   (``separability``: a one-way analysis of variance over the seeds, its permutation p-value, and the spread between
   networks beyond seed noise); in a group that cannot be told apart, no search can beat random but by luck.
7. the supernet's ranking at matched latency (with ``--supernet-rank``, on by default with ``--reduced``): the
   searched trial's final supernet reads every network of a matched group (the searched one and its random
   matches) with inherited weights (BatchNorm statistics re-estimated, ``train.bn_recal_batches``) on the held-out
   split; reported per group: the Spearman correlation of those readings with the retrained accuracies, and what the
   network the supernet reads best scores once retrained (could choosing among latency-matched candidates by the
   supernet's reading have beaten random, where the argmax architecture did not?).

Usage: ``python benchmarks/bench_search_quality.py [--epochs 3] [--quick | --reduced] [--set train.KEY=VALUE]``
(hours on 2 cores without either; ``--reduced``: the demo's search at lambda 0.1 for each hardware, 8 matched
random networks, 2 seeds, 3 retraining epochs from scratch on 10,000 images, tested on 5,000; with ``--out runs`` it
reuses the demo's warm-up; ``--set`` changes the search, never the retraining). Networks train side by side as Ray
tasks of one thread; latencies are measured afterwards, one at a time.

``--rerun-from OUTPUT.json [--hardware pixel1,...] --epochs 2 --train-subset 58000``: the matched groups of an earlier
run (its networks, as saved in its ``archs/`` folder, and its supernet readings) trained again with another budget,
no search; does what separated the networks at 3 short epochs still separate them when they train for longer?
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import tempfile

import numpy as np
import pandas as pd

from proxyless_ray.config import Experiment, apply_override, load_experiment
from proxyless_ray.demo import fit_in_parallel
from proxyless_ray.distributed.retrain import measure_latency_ms
from proxyless_ray.latency.model import arch_latency, load_latency_model
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.network import load_network
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.pareto import hypervolume_2d, pareto_front_mask
from proxyless_ray.runtime import tune_allocator
from proxyless_ray.search.comm import Comm
from proxyless_ray.search.loop import SearchLoop
from proxyless_ray.sweeps.sweep import run_sweep

HARDWARE = ["cpu_1thread", "pixel1", "v100_roofline"]
MATCH_TOLERANCE = 0.05


def matched_random(space: SearchSpace, model, target_ms: float, n: int, rng: random.Random,
                   max_draws: int = 200_000) -> list[tuple[Arch, list[str]]]:
    """``n`` random architectures whose predicted latency on ``model`` is within 5 % of ``target_ms``, each with
    its block per searchable layer (``zero`` included: what places it in the supernet).

    Each draw first picks how likely a layer is to be zero (uniform in [0, 1]), then every layer's candidate, so
    shallow and deep networks are both reachable; uniform per-layer draws alone rarely land on a front's extremes.
    """
    out: list[tuple[Arch, list[str]]] = []
    slots = space.slots()
    for _ in range(max_draws):
        p_zero = rng.random()
        blocks = []
        for s in slots:
            real = [c for c in s.candidates if c != "zero"]
            blocks.append("zero" if s.has_zero and rng.random() < p_zero else rng.choice(real))
        arch = space.arch_from_blocks(blocks)
        if abs(arch_latency(model, arch)[0] / target_ms - 1) <= MATCH_TOLERANCE:
            out.append((arch.without_zeros(), blocks))
            if len(out) == n:
                break
    return out


def final_checkpoint(sweep_dir: str, key: str) -> str:
    """The newest checkpoint folder a sweep trial wrote (its final supernet and alphas)."""
    found = glob.glob(os.path.join(sweep_dir, "**", key, "checkpoint_*", "state.pt"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no checkpoint of trial {key!r} under {sweep_dir!r}")
    return os.path.dirname(max(found, key=lambda p: int(os.path.basename(os.path.dirname(p)).split("_")[-1])))


def supernet_readings(exp: Experiment, checkpoint: str, choices: list[list[int] | None]) -> list[float]:
    """Held-out accuracy of each sub-network (``None``: the argmax of the checkpoint's alphas) with the weights of
    the supernet in ``checkpoint``, as the search itself reads a sub-network (BN statistics re-estimated)."""
    loop = SearchLoop(exp, Comm(), lambda *_: None, progress=False)
    loop.restore(checkpoint, weights_only=True)
    return [loop.heldout_accuracy(c) for c in choices]


def rank_summary(group: pd.DataFrame) -> dict:
    """For one matched group (searched network + its random matches, each with a ``supernet_acc`` reading): how the
    supernet's readings rank the retrained accuracies, and what its favourite scores once retrained."""
    pick = group.sort_values("supernet_acc", ascending=False).iloc[0]
    others = group[group["name"] != pick["name"]]
    mean, std = float(others["test_acc"].mean()), float(others["test_acc"].std())
    return {"spearman_supernet_vs_retrained": float(group["supernet_acc"].corr(group["test_acc"], method="spearman")),
            "supernet_acc_range": [float(group["supernet_acc"].min()), float(group["supernet_acc"].max())],
            "supernet_pick": pick["name"], "pick_is_searched": pick["kind"] == "searched",
            "pick_acc": float(pick["test_acc"]), "others_mean": mean, "others_std": std,
            "pick_beats_mean_plus_std": bool(pick["test_acc"] >= mean + std)}


def base(out: str, quick: bool, epochs: int, train_subset: int = 0, threads: int = 1) -> dict:
    """The demo's search settings (warm-up, readiness, arch learning rate) with this benchmark's data and budget."""
    demo = load_experiment("experiments/demo.yaml").to_dict()
    subset = train_subset or (3000 if quick else 12000)
    return {
        "out_dir": out,
        "data": {**demo["data"], "train_subset": subset, "warmup_subset": max(demo["data"]["warmup_subset"], subset),
                 "test_subset": 3000 if quick else 0},
        "train": {**demo["train"], "epochs": epochs, "threads": threads},
        "dist": {"workers": 0},
        "tracking": {"enabled": False},
    }


def front_hypervolume(part: pd.DataFrame, col: str, ref: tuple[float, float]) -> float:
    """Hypervolume of the (test accuracy up, ``col`` latency down) front of ``part``."""
    pts = part[["test_acc", col]].to_numpy()
    return hypervolume_2d(pts[pareto_front_mask(pts)], ref) if len(pts) else 0.0


def separability(accs: list[list[float]], permutations: int = 4000, seed: int = 0) -> dict:
    """Do the networks of a group differ beyond seed-to-seed noise? ``accs``: per network, its accuracy per seed.

    Returns the one-way ANOVA F (between-network over within-network variance of the per-seed accuracies), its
    p-value from a permutation test (the same accuracies dealt to the networks at random, ``permutations`` times; no
    normality assumed), the standard deviation between networks once seed noise is taken out of it, and the
    seed-to-seed one.
    """
    a = np.asarray(accs, dtype=float)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"separability needs >= 2 networks with >= 2 seeds each, got shape {a.shape}")
    n, s = a.shape

    def f_stat(m: np.ndarray) -> float:
        within = m.var(axis=1, ddof=1).mean()
        return float(s * m.mean(axis=1).var(ddof=1) / max(within, 1e-12))

    observed = f_stat(a)
    gen = np.random.default_rng(seed)
    flat = a.ravel()
    hits = sum(f_stat(gen.permutation(flat).reshape(n, s)) >= observed for _ in range(permutations))
    within = float(a.var(axis=1, ddof=1).mean())
    between = float(a.mean(axis=1).var(ddof=1))
    return {"f": observed, "p_value": (hits + 1) / (permutations + 1),
            "network_sd": float(np.sqrt(max(between - within / s, 0.0))), "seed_sd": float(np.sqrt(within)),
            "networks": n, "seeds": s}


def matched_summary(df: pd.DataFrame) -> dict[str, list[dict]]:
    """Per hardware and searched network: its accuracy against its latency-matched random networks (mean, std over
    networks, each the mean of its seeds) and the seed-to-seed spread, which says how small a margin can be read."""
    def base_name(name: str) -> str:  # "04-matched-..." -> "matched-..."
        return name.split("-", 1)[1]

    out: dict[str, list[dict]] = {}
    names = df["name"].map(base_name)
    for hw in HARDWARE:
        for _, srow in df[(df["kind"] == "searched") & (df["searched_for"] == hw)].iterrows():
            rand = df[(df["kind"] == "matched") & names.str.startswith(f"matched-{hw}-{base_name(srow['name'])}-")]
            if len(rand) < 2:
                continue
            mean, std = float(rand["test_acc"].mean()), float(rand["test_acc"].std())
            seeds = [s for accs in df["test_acc_seeds"] if len(accs) > 1 for s in [pd.Series(accs).std()]]
            out.setdefault(hw, []).append({
                "searched": srow["name"], "searched_acc": float(srow["test_acc"]), "random_mean": mean,
                "random_std": std, "random_n": len(rand), "margin_in_std": (srow["test_acc"] - mean) / max(std, 1e-9),
                "searched_rank": int((rand["test_acc"] > srow["test_acc"]).sum()) + 1,
                "mean_seed_std": float(sum(seeds) / len(seeds)) if seeds else None,
                "searched_beats_mean_plus_std": bool(srow["test_acc"] >= mean + std)})
            seeds_of = [list(df.loc[i, "test_acc_seeds"]) for i in [srow.name, *rand.index]]
            if min(len(v) for v in seeds_of) >= 2 and len({len(v) for v in seeds_of}) == 1:
                out[hw][-1]["separability"] = separability(seeds_of)
            if "supernet_acc" in df and df.loc[rand.index, "supernet_acc"].notna().all():
                group = pd.concat([df.loc[[srow.name]], rand])
                out[hw][-1]["supernet_ranking"] = rank_summary(group)
    return out


def load_result(path: str) -> dict:
    """A run's JSON output (its last line: Tune may print tables above it)."""
    with open(path) as fh:
        lines = [line for line in fh if line.startswith("{")]
    if not lines:
        raise ValueError(f"{path!r} holds no benchmark output (a line of JSON)")
    return json.loads(lines[-1])


def retrain(nets: list[tuple[str, str, Arch]], out: str, quick: bool, epochs: int, train_subset: int,
            test_subset: int, seeds: int) -> tuple[list[Arch], dict[str, dict]]:
    """Train every network from scratch, ``seeds`` times, side by side as Ray tasks of one thread; returns the
    networks as saved under ``out/archs`` and the fits keyed ``"network/seed"``."""
    cfg = base(out, quick, epochs, train_subset, threads=1)
    cfg["train"].update(warmup_epochs=0, ready_acc=0.0)  # plain training from scratch: no warm-up to wait for
    cfg["data"].update(warmup_subset=0, **({"test_subset": test_subset} if test_subset else {}))
    jobs, saved = [], []
    for i, (kind, _hw, arch) in enumerate(nets):
        name = f"{i:02d}-{arch.name or kind}"
        path = os.path.join(out, "archs", f"{name}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dataclasses.replace(arch, name=name).save(path)
        saved.append(Arch.load(path))
        for seed in range(seeds):
            seeded = Experiment.from_dict({**cfg, "name": f"retrain-s{seed}", "train": {**cfg["train"], "seed": seed}})
            jobs.append((f"{i}/{seed}", seeded, path))
    return saved, fit_in_parallel(jobs[0][1], jobs, epochs=epochs, lr=jobs[0][1].train.lr, finetune=False)


def rerun(args, out: str) -> None:
    """``--rerun-from``: the matched groups of an earlier run, retrained with this run's budget (does a ranking hold
    when the networks train longer?)."""
    saved = load_result(args.rerun_from)
    keep = set(filter(None, args.hardware.split(","))) or set(HARDWARE)
    unknown = keep - set(HARDWARE)
    if unknown:
        raise SystemExit(f"--hardware {sorted(unknown)} unknown; expected some of {HARDWARE}")
    archs = os.path.join(saved["out"], "archs")
    nets, readings = [], []
    for row in saved["networks"]:
        if row["kind"] in ("searched", "matched") and row["searched_for"] in keep:
            arch = Arch.load(os.path.join(archs, f"{row['name']}.json"))
            # without the old run's index prefix: retrain() numbers the networks afresh
            nets.append((row["kind"], row["searched_for"], dataclasses.replace(arch, name=arch.name.split("-", 1)[1])))
            readings.append(row.get("supernet_acc"))
    archs_saved, fitted = retrain(nets, out, args.quick, args.epochs, args.train_subset, args.test_subset,
                                  args.seeds)
    rows = []
    for i, ((kind, hw, _), arch) in enumerate(zip(nets, archs_saved)):
        accs = [fitted[f"{i}/{seed}"]["test_acc"] for seed in range(args.seeds)]
        rows.append({"kind": kind, "searched_for": hw, "name": arch.name, "arch": arch.arch_string(),
                     "test_acc": sum(accs) / len(accs), "test_acc_seeds": accs, "supernet_acc": readings[i]})
    print(json.dumps({"benchmark": "search_quality", "rerun_from": args.rerun_from, "retrain_epochs": args.epochs,
                      "train_subset": args.train_subset, "networks": rows,
                      "matched_latency": matched_summary(pd.DataFrame(rows)), "out": out}, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=3, help="retraining budget per network")
    parser.add_argument("--random", type=int, default=10)
    parser.add_argument("--matched", type=int, default=8, help="random networks per searched one, latency within 5 %")
    parser.add_argument("--seeds", type=int, default=2, help="retraining seeds per network")
    parser.add_argument("--reduced", action="store_true", help="the setting that fits in 30 minutes on 2 cores")
    parser.add_argument("--out", default=None)
    parser.add_argument("--lambdas", default="", help="comma-separated lambda values (default: 5, or 2 with --quick)")
    parser.add_argument("--train-subset", type=int, default=0, help="training images (default 12000, 3000 quick)")
    parser.add_argument("--test-subset", type=int, default=0, help="test images (default: all, 3000 quick)")
    parser.add_argument("--search-epochs", type=int, default=0, help="search epochs after the 2 warm-up epochs")
    parser.add_argument("--analyse", default="", help="recompute the summaries from this benchmark's JSON output")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the search's config (repeatable; retraining is left alone), e.g. "
                             "train.warmup_method=sandwich")
    parser.add_argument("--rerun-from", default="", metavar="JSON",
                        help="retrain the networks of an earlier run (its JSON output; its archs/ folder must exist) "
                             "with this run's --epochs, --train-subset and --seeds instead of searching anew")
    parser.add_argument("--hardware", default="", help="with --rerun-from: only these hardware's matched groups "
                                                      "(comma-separated)")
    parser.add_argument("--supernet-rank", action=argparse.BooleanOptionalAction, default=None,
                        help="read every matched group on the searched trial's supernet (default: on with --reduced)")
    args = parser.parse_args()
    if args.analyse:
        saved = load_result(args.analyse)
        print(json.dumps({"matched_latency": matched_summary(pd.DataFrame(saved["networks"]))}, default=float))
        return
    out = args.out or tempfile.mkdtemp(prefix="bench-quality-")
    if args.rerun_from:
        rerun(args, out)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tune_allocator()  # measured latencies under the same allocator as the profiles and the CLI
    if args.reduced:  # 3 epochs from scratch on 10,000 images: one epoch on 6,000 left seeds further apart than nets
        args.quick, args.random = True, 0
        args.train_subset, args.test_subset = args.train_subset or 10000, args.test_subset or 5000
    lambdas = [float(v) for v in args.lambdas.split(",")] if args.lambdas else \
        [0.1] if args.reduced else [0.03, 1.0] if args.quick else [0.01, 0.1, 0.3, 1.0, 3.0]
    search_epochs = args.search_epochs or (1 if args.quick else 4)
    sweep_cfg = base(out, args.quick, 2 + search_epochs, args.train_subset)
    if args.reduced:  # the demo's search itself (its warm-up cache is reused when --out is the demo's output root)
        sweep_cfg = {**load_experiment("experiments/demo.yaml").to_dict(), "out_dir": out,
                     "tracking": {"enabled": False}}
    sweep_cfg.update(name="search", sweep={"hardware": HARDWARE, "lambdas": lambdas, "scheduler": "fifo",
                                           "shared_warmup": True})
    sweep_cfg["dist"] = {"workers": 1}
    for item in args.overrides:
        apply_override(sweep_cfg, item)
    run_sweep(Experiment.from_dict(sweep_cfg))
    table = pd.read_parquet(os.path.join(out, "search", "pareto.parquet"))
    space = SearchSpace()
    rng = random.Random(0)
    nets: list[tuple[str, str, Arch]] = []
    readings: dict[str, list[tuple[int, list[int] | None]]] = {}  # searched trial -> (network, its choices)
    for _, r in table[table["finished"]].iterrows():
        readings[r["trial_id"]] = [(len(nets), None)]
        nets.append(("searched", r["hardware"], Arch.load(os.path.join(r["out_dir"], "arch.json"))))
    for i in range(args.random):
        nets.append(("random", "-", space.sample(rng, name=f"random{i}").without_zeros()))
    mbv2 = space.arch_from_blocks([f"mb_k3_e6_c{s.out_chs}_s{s.stride}" for s in space.slots()], name="mbv2_k3e6")
    nets.append(("baseline", "-", mbv2))
    models = {hw: load_latency_model(hw) for hw in HARDWARE}
    for key, [(k, _)] in list(readings.items()):
        _kind, hw, arch = nets[k]
        target = arch_latency(models[hw], arch)[0]
        for j, (m, blocks) in enumerate(matched_random(space, models[hw], target, args.matched, rng)):
            readings[key].append((len(nets), [s.candidates.index(b) for s, b in zip(space.slots(), blocks)]))
            nets.append(("matched", hw, dataclasses.replace(m, name=f"matched-{hw}-{arch.name}-{j}")))
    supernet_acc: dict[int, float] = {}
    if args.supernet_rank if args.supernet_rank is not None else args.reduced:
        for key, plan in readings.items():
            hw = nets[plan[0][0]][1]
            exp = Experiment.from_dict({**sweep_cfg, "latency": {**sweep_cfg.get("latency", {}), "profile": hw}})
            accs = supernet_readings(exp, final_checkpoint(os.path.join(out, "search"), key), [c for _, c in plan])
            supernet_acc.update({i: acc for (i, _), acc in zip(plan, accs)})
    # every (network, seed) trains as a Ray task of one thread, side by side; latency is measured afterwards, alone
    archs_saved, fitted = retrain(nets, out, args.quick, args.epochs, args.train_subset, args.test_subset,
                                  args.seeds)
    rows = []
    for i, (kind, hw, _) in enumerate(nets):
        accs = [fitted[f"{i}/{seed}"]["test_acc"] for seed in range(args.seeds)]
        arch = archs_saved[i]
        net = load_network(os.path.join(fitted[f"{i}/0"]["out_dir"], "network"))
        row = {"kind": kind, "searched_for": hw, "name": arch.name, "arch": arch.arch_string(),
               "test_acc": sum(accs) / len(accs), "test_acc_seeds": accs, "supernet_acc": supernet_acc.get(i),
               "measured_cpu_ms": measure_latency_ms(net, arch)["median_ms"]}
        row.update({f"pred_{h}_ms": arch_latency(m, arch)[0] for h, m in models.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    hv, fastest = {}, {}
    for hw in HARDWARE:
        col = f"pred_{hw}_ms"
        searched = df[(df["kind"] == "searched") & (df["searched_for"] == hw)]
        rand = df[df["kind"] == "random"]
        ref = (0.0, 1.1 * float(df[col].max()))

        hv_s, hv_r = front_hypervolume(searched, col, ref), front_hypervolume(rand, col, ref)
        hv[hw] = {"searched": hv_s, "random": hv_r, "searched_above_random": hv_s > hv_r if len(rand) else None}
        best = searched.sort_values("test_acc", ascending=False).head(1)
        if len(best):
            acc = float(best["test_acc"].iloc[0])
            similar = df[(df["test_acc"] >= acc - 0.01)]
            fastest[hw] = {"searched_net": best["name"].iloc[0], "its_ms": float(best[col].iloc[0]),
                           "fastest_similar": similar.sort_values(col).iloc[0]["name"],
                           "is_fastest": similar.sort_values(col).iloc[0]["name"] == best["name"].iloc[0]}
    matched = matched_summary(df)
    cross = {hw: df[(df["kind"] == "searched") & (df["searched_for"] == hw)]
             [[f"pred_{h}_ms" for h in HARDWARE] + ["test_acc"]].mean().to_dict() for hw in HARDWARE}
    print(json.dumps({"benchmark": "search_quality", "retrain_epochs": args.epochs, "networks": rows,
                      "hypervolume": hv, "fastest_among_similar_accuracy": fastest, "matched_latency": matched,
                      "cross_hardware_mean_predicted_ms": cross, "out": out}, default=float))


if __name__ == "__main__":
    main()
