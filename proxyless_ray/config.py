"""Experiment configuration: one frozen dataclass per concern, loaded from YAML with ``--set`` overrides.

``experiments/*.yaml`` list only what differs from these defaults. Unknown keys are errors that name the key and
the file. Plain dicts appear only at the Ray boundary (:meth:`Experiment.to_dict` / :meth:`Experiment.from_dict`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from proxyless_ray.config_checks import _ALIASES, _OLD_KEYS, _shown, validate
from proxyless_ray.nn.space import PRESETS, SearchSpace, space_from_preset


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split."""

    name: str = "fashion_mnist"  # fashion_mnist | imagefolder | parquet
    path: str | None = None  # None: Debian's /usr/share/datasets/fashion-mnist for fashion_mnist
    heldout_size: int = 5000  # images carved from train for architecture steps (deterministic)
    train_subset: int = 0  # use only this many training images (0: all); for quick demos
    # fashion_mnist: the warm-up epochs read this many training images (a superset of the search's train_subset;
    # 0: the same split). A sweep's warm-up is paid once for every trial, so it can afford far more data.
    warmup_subset: int = 0
    test_subset: int = 0  # evaluate on this many test images (0: all)
    batch_size: int = 128  # per worker
    eval_batch_size: int = 512
    loader_workers: int = 0  # decoding threads per Ray worker for imagefolder / parquet (0: decode inline)
    augment: bool = True  # random crop + flip (Fashion-MNIST) / RandomResizedCrop (ImageNet)
    seed: int = 0  # split seed
    test_size: int = 0  # imagefolder / parquet without a val split: images carved for the test split (0: 10%)
    cache_mb: float = 1024.0  # parquet: encoded bytes each worker keeps in memory (LRU over row groups)
    verify_checksum: bool = False  # parquet: hash every shard against the manifest before training


@dataclass(frozen=True)
class TrainConfig:
    """Search loop (ProxylessNAS defaults unless noted; all tunable)."""

    epochs: int = 6  # total epochs, warm-up included
    warmup_epochs: int = 2  # weights only, alpha frozen, paths picked by warmup_method
    # nested: a layer's MBConv candidates share one elastic set of weights (kernels centred in the largest,
    # expansions as its first channels), so sampled sub-networks learn as fast as one network; separate: the
    # paper's weights per candidate, which need thousands of steps before sampled paths can be ranked.
    weight_sharing: str = "nested"
    # uniform | uniform_depth | fair | sandwich | largest_first (proxyless_ray.search.path_sampling)
    warmup_method: str = "uniform"
    # Architecture steps start only once sampled sub-networks reach this held-out accuracy (0: right after the
    # warm-up, the paper's schedule). Checked at the end of every warm-up epoch; if it is not met when the warm-up
    # ends, alpha stays frozen for up to half of the search epochs, then the search decides anyway and says so.
    ready_acc: float = 0.0
    ready_samples: int = 4  # random sub-networks whose mean held-out accuracy measures readiness (0: don't measure)
    # An architecture step whose sampled path is zero still reads the other candidates' gate gradients, so the loss
    # can argue for keeping a layer that zero would remove (the paper skips such layers; see proxyless_ray.nn.mixed_op).
    zero_gradient: bool = True
    lr: float = 0.05  # weight SGD, cosine per batch (paper: 0.025 at batch 256 on ImageNet)
    warmup_lr: float = 0.05  # paper: hard-coded lr_max 0.05 for warm-up
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-5
    label_smoothing: float = 0.1
    arch_lr: float = 1e-3  # Adam on alpha
    arch_betas: tuple[float, float] = (0.0, 0.999)
    arch_eps: float = 1e-8
    arch_weight_decay: float = 0.0
    arch_update_every: int = 5  # an arch step after every k weight steps
    arch_steps: int = 1
    gate_mode: str = "two"  # two | full_v2 | reinforce
    reinforce_baseline_decay: float = 0.99
    alpha_init_std: float = 1e-3
    grad_clip: float = 0.0  # 0: off
    seed: int = 0  # weights, gates and data order
    threads: int = 0  # torch threads per worker (0: leave torch's default)
    # How idle OpenMP threads wait between ops (proxyless_ray.runtime): spin (fast while each thread has a core),
    # passive (sleep at once: for processes that share cores), auto (spin unless the placement shares cores).
    wait_policy: str = "auto"
    # A spinning process (it owned its cores at start) that other processes crowd later runs one torch thread per
    # core they leave free until they go (proxyless_ray.runtime.ThreadGovernor); off: the thread count never changes,
    # for runs that must repeat bit for bit whatever else the machine does.
    adapt_threads: bool = True
    channels_last: bool = True  # NHWC activations: faster depthwise convs and BN on CPU
    max_steps_per_epoch: int = 0  # 0: the whole split; small values for smoke tests
    # Training batches that re-estimate the BatchNorm statistics of each network read on held-out or test data (the
    # supernet's statistics mix every sampled path). Fewer batches make noisier readings; a start-up probe whose
    # figures nobody reads may take 1.
    bn_recal_batches: int = 20
    finetune_epochs: int = 0  # after the search: fine-tune the derived network from its inherited weights
    sync_bn: bool = False  # False: per-worker BatchNorm statistics (the paper's setting); True needs GPUs
    freeze_bn: bool = False  # BN layers use running statistics while training (equivalence tests)


@dataclass(frozen=True)
class LatencyConfig:
    """Hardware target and the latency loss (formulas in :mod:`proxyless_ray.search.objective`)."""

    profile: str = "flops"  # a name in hardware_profiles/, a path to a profile, or 'flops' (placeholder model)
    loss: str = "add"  # add | mul_log | none
    lam: float = 0.1  # 'add': CE + lambda * (E[lat] - ref) / ref; YAML key 'lambda' (a Python keyword)
    ref_ms: float = 0.0  # 'add' reference latency; 0: E[lat] of the supernet at initialisation
    target_ms: float = 0.0  # 'mul_log' target latency; 0: E[lat] at initialisation
    alpha: float = 0.2  # 'mul_log': alpha * CE * (log E[lat] / log target) ** beta
    beta: float = 0.3
    strict: bool = False  # raise on a shape the profile does not hold instead of predicting


@dataclass(frozen=True)
class DistConfig:
    """Ray Train scaling, storage and fault tolerance."""

    workers: int = 1  # Ray Train workers; 0 runs the search in this process without Ray
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {hw_a100: 1}
    address: str | None = None  # None: $RAY_ADDRESS, else embedded ray.init(); 'auto', 'host:port', 'ray://host:port'
    storage_path: str | None = None  # checkpoints; a local folder or a pyarrow URI (s3://, gs://). None: <out>/ray
    checkpoint_every: int = 1  # epochs
    checkpoints_to_keep: int = 2
    max_failures: int = 1
    connect_timeout_s: float = 60.0  # bound on reaching a cluster address
    # Split each global batch by the workers' measured speed so a persistent straggler (a slower node or GPU) does
    # not hold the others up (proxyless_ray.search.balance). The gradient stays exact. Off by default: on evenly matched
    # workers it chases noise (5 % slower on the 2-vCPU VM) and costs bit-reproducibility with BatchNorm.
    balance_batches: bool = False
    # Embedded cluster only: Ray's dashboard and metrics agent. Off by default: on a 2-core laptop they take ~7 % of
    # a core that the workers need. A sweep always starts it (Tune's trial clean-up queries its State API).
    dashboard: bool = False


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune latency-trade-off sweep: hardware profiles x coefficients."""

    hardware: tuple[str, ...] = ()
    loss: str = "add"
    lambdas: tuple[float, ...] = ()  # for 'add'
    betas: tuple[float, ...] = ()  # for 'mul_log'
    targets_ms: dict[str, list[float]] = field(default_factory=dict)  # for 'mul_log', per hardware
    sampling: str = "grid"  # grid | log (num_samples draws log-uniform between min and max of each list)
    num_samples: int = 1
    scheduler: str = "pareto"  # fifo | asha | pareto
    grace_period: int = 1  # epochs of the search phase before the first rung
    reduction_factor: int = 2
    synchronous_first_rung: bool = True  # pareto: a hardware's trials all reach the first rung before any goes on
    workers_per_trial: int = 1
    max_concurrent_trials: int = 0  # 0: from cluster resources
    shared_warmup: bool = True
    retrain_epochs: int = 0  # retrain Pareto-front networks briefly after the sweep (0: skip)
    retrain_subset: int = 0  # training images of that retraining (0: the search's data.train_subset)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "proxyless-ray"
    register_models: bool = True
    max_artifact_mb: float = 200.0


@dataclass(frozen=True)
class Experiment:
    """A whole experiment: what to search, on which data, against which hardware, where to write."""

    name: str = "experiment"
    out_dir: str = "runs"  # outputs go to <out_dir>/<name>
    space: SearchSpace = field(default_factory=SearchSpace)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def output_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) for the Ray boundary and MLflow params, keyed as a YAML file is
        (``latency.lambda``, not the attribute ``lam``)."""
        d = _plain(dataclasses.asdict(self))
        for (section, key), attr in _ALIASES.items():
            d[section] = {key if k == attr else k: v for k, v in d[section].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> Experiment:
        return _build_experiment(d, source)


_SECTIONS = {"space": SearchSpace, "data": DataConfig, "train": TrainConfig, "latency": LatencyConfig,
             "dist": DistConfig, "sweep": SweepConfig, "tracking": TrackingConfig}
def load_experiment(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read an experiment YAML (safe_load) and apply ``key=value`` overrides such as ``train.lr=0.05``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed YAML, an unknown key (named with the file) or an invalid value.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; expected an experiment YAML") from None
    if raw is None:
        raise ValueError(f"{path}: the experiment file is empty; expected a mapping of sections, e.g. "
                         f"'train: {{epochs: 3}}' (an experiment lists what differs from the defaults)")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: an experiment must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for item in overrides:
        apply_override(raw, item)
    return _build_experiment(raw, path)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` (value parsed as YAML) in a raw experiment dict."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=0.05")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(err, "problem", None) or str(err)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _build_experiment(raw: dict[str, Any], source: str) -> Experiment:
    known = {f.name for f in fields(Experiment)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; expected some of {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ValueError(f"{source}: section {key!r} must be a mapping, got {value!r}")
            kwargs[key] = _build_section(key, value, source)
        else:
            kwargs[key] = value
    try:
        return Experiment(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def _build_section(section: str, values: dict[str, Any], source: str) -> Any:
    cls = _SECTIONS[section]
    for (sec, old), new in _OLD_KEYS.items():
        if sec == section and old in values:
            if new in values:
                raise ValueError(f"{source}: {section}.{new} and {section}.{old} are both given; {old} is the old "
                                 f"name of {new}: keep {section}.{new} only")
            warnings.warn(f"{source}: {section}.{old} is the old name of {section}.{new}; write {section}.{new} "
                          f"(the old name will be refused in a later release)", FutureWarning, stacklevel=2)
            values = {new if k == old else k: v for k, v in values.items()}
    values = {_ALIASES.get((section, k), k): v for k, v in values.items()}
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {[f'{section}.{k}' for k in unknown]}; expected some of "
                         f"{sorted(_shown(section, k) for k in valid)}")
    coerced = {k: _coerce(section, k, v, valid[k], cls) for k, v in values.items()}
    try:
        if section == "space":
            preset = coerced.pop("preset", "small")
            if preset not in PRESETS:
                raise ValueError(f"space.preset {preset!r} is unknown; expected one of {sorted(PRESETS)}")
            return space_from_preset(preset, **coerced)
        return cls(**coerced)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {section}: {err}") from None


def _coerce(section: str, key: str, value: Any, f: dataclasses.Field, cls: type) -> Any:
    """Light type check against the field's default: numbers, bools, strings, lists -> tuples."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return type(default)(value)
    elif isinstance(default, tuple):
        if isinstance(value, (int, float, str)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    elif isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
    elif isinstance(default, str) or str(f.type).startswith("str"):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'train': {'lr': 0.1}}`` -> ``{'train.lr': 0.1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def with_overrides(exp: Experiment, **sections: dict[str, Any]) -> Experiment:
    """A copy with some section fields replaced, keyed as in YAML, e.g. ``with_overrides(exp, latency={'lambda':
    0.3})``."""
    d = exp.to_dict()
    for section, values in sections.items():
        d[section].update(values)
    return Experiment.from_dict(d)


__all__ = ["DataConfig", "DistConfig", "Experiment", "LatencyConfig", "SweepConfig", "TrackingConfig",
           "TrainConfig", "apply_override", "flatten", "load_experiment", "with_overrides"]
