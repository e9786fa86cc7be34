"""Bad input and hostile artifacts through the real CLI: each case exits with status 2, prints one line naming the
value or file, and leaves nothing written or executed (malicious pickles would create a marker file)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import yaml

from proxyless_ray.cli import build_parser, main
from proxyless_ray.cli.search import experiment_from_args
from proxyless_ray.config import load_experiment
from proxyless_ray.nn.arch import Arch
from proxyless_ray.nn.network import ProxylessNet
from proxyless_ray.search.state import new_state, save_checkpoint

from conftest import requires_fmnist, tiny_experiment

ARCH = Arch("conv_k3_c8_s2", (("mb_k3_e1_c8_s1",), ("mb_k3_e3_c16_s2",)), "conv_k1_c32_s1", 10, 28, 1)


class Payload:
    """What a hostile pickle holds: loading it runs ``touch <marker>``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path, marker) -> None:
    """Write a ``torch.save`` file that would run code if it were unpickled (checked: plain pickle.load runs it)."""
    torch.save({"weight": torch.zeros(1), "payload": Payload(str(marker))}, path)


@pytest.fixture
def case(tmp_path, monkeypatch):
    """A tiny experiment file (256 images, no Ray, no tracking) in an empty folder that is also the working one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tiny_experiment(tmp_path).to_dict()
    path = tmp_path / "e.yaml"
    path.write_text("# tiny\n" + yaml.safe_dump(d))
    return tmp_path, path


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit status and the single error line (asserting there is exactly one)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return code, lines[0]


def files_under(folder) -> set[str]:
    return {os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files}


# -- config and command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override,named", [
    ("train.lr=[1,", "train.lr=[1,"),  # YAML syntax error in an override
    ("train.epochs=0", "train.epochs"),
    ("train.lr=.nan", "train.lr"),
    ("train.threads=-3", "train.threads"),
    ("data.train_subset=-5", "data.train_subset"),
    ("train.momentum=1.5", "train.momentum"),
    ("dist.cpus_per_worker=0", "dist.cpus_per_worker"),
    ("sweep.lambdas=[0.1, -1]", "sweep.lambdas"),
    ("space.num_classes=1", "space.num_classes"),
    ("name=../../escape", "../../escape"),
    ("name=a/b", "a/b"),
    ("data.path=5", "data.path"),
])
def test_bad_override_is_one_line_and_writes_nothing(case, capsys, override, named):
    tmp, exp = case
    code, line = run_cli(capsys, "search", exp, "--set", override)
    assert code == 2 and named in line
    assert files_under(tmp) == {"e.yaml"} and not os.path.exists(tmp.parent / "escape")


def test_python_tag_in_an_override_runs_nothing(case, capsys):
    tmp, exp = case
    code, line = run_cli(capsys, "search", exp, "--set", f"train.lr=!!python/object/apply:os.system ['touch {tmp}/x']")
    assert code == 2 and "train.lr" in line
    assert files_under(tmp) == {"e.yaml"}


def test_cases_that_already_held(case, capsys):
    """A python tag in the file, an unreachable tracking server, a closed Ray port: still one line, nothing written."""
    tmp, exp = case
    (tmp / "tag.yaml").write_text(f"train: !!python/object/apply:os.system ['touch {tmp}/x']\n")
    code, line = run_cli(capsys, "search", tmp / "tag.yaml")
    assert code == 2 and "tag.yaml" in line
    code, line = run_cli(capsys, "search", exp, "--set", "tracking.enabled=true", "--tracking-uri",
                         "http://127.0.0.1:9")
    assert code == 2 and "http://127.0.0.1:9" in line
    code, line = run_cli(capsys, "search", exp, "--workers", "1", "--address", "127.0.0.1:9")
    assert code == 2 and "127.0.0.1:9" in line
    assert files_under(tmp) == {"e.yaml", "tag.yaml"}


@requires_fmnist
def test_foreign_checkpoint_is_refused(case, capsys):
    tmp, exp_path = case
    exp = load_experiment(exp_path)
    other = load_experiment(exp_path, ["space.kernel_sizes=[3]"])
    save_checkpoint(new_state(other), str(tmp / "runs" / exp.name / "checkpoints" / "epoch-0001"), other)
    code, line = run_cli(capsys, "search", exp_path, "--resume")
    assert code == 2 and "epoch-0001" in line and "search space" in line
    assert not (tmp / "runs" / exp.name / "arch.json").exists()


def test_path_flags_stay_strings(case):
    _, exp = case
    args = build_parser().parse_args(["search", str(exp), "--out", "123", "--data", "7"])
    loaded = experiment_from_args(args)
    assert loaded.out_dir == "123" and loaded.data.path == "7"


def test_empty_experiment_file(case, capsys):
    tmp, _ = case
    (tmp / "empty.yaml").write_text("# nothing here\n")
    code, line = run_cli(capsys, "search", tmp / "empty.yaml")
    assert code == 2 and "empty.yaml" in line and "empty" in line
    with pytest.raises(ValueError, match="binary.yaml: not a text file"):
        (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81" * 8)
        load_experiment(tmp / "binary.yaml")


@pytest.mark.parametrize("arch,named", [
    ({"stages": 3}, "'stages' must be a list of lists"),
    ({"stages": ["mb_k3_e1_c8_s1"]}, "'stages' must be a list of lists"),
    ({"input": "28"}, "wrong type"),
    ({"stem": None}, "must be a string"),
    ({"feature_mix": 32}, "must be a string"),
])
def test_mistyped_arch_fields(case, capsys, arch, named):
    tmp, _ = case
    path = tmp / "bad.json"
    path.write_text(json.dumps({**ARCH.to_dict(), **arch}))
    code, line = run_cli(capsys, "latency", "--profile", "cpu_1thread", "--arch", path)
    assert code == 2 and "bad.json" in line and named in line


@pytest.mark.parametrize("patch", [{"classifier": None}, {"first_conv": None}, {"blocks": [{"mobile_inverted_conv":
                                                                                              None}]}])
def test_mistyped_net_config_fields(case, capsys, patch):
    tmp, _ = case
    cfg = {"name": "ProxylessNASNets", "first_conv": {"in_channels": 3, "out_channels": 32, "kernel_size": 3,
                                                      "stride": 2},
           "blocks": [{"mobile_inverted_conv": {"name": "MBInvertedConvLayer", "in_channels": 32, "out_channels": 16,
                                                "kernel_size": 3, "stride": 1, "expand_ratio": 1}}],
           "feature_mix_layer": None, "classifier": {"in_features": 16, "out_features": 1000}}
    (tmp / "net.config").write_text(json.dumps({**cfg, **patch}))
    code, line = run_cli(capsys, "latency", "--profile", "cpu_1thread", "--arch", tmp / "net.config")
    assert code == 2 and "net.config" in line


def test_latency_arch_folder_and_binary_table(case, capsys):
    tmp, _ = case
    (tmp / "folder").mkdir()
    code, line = run_cli(capsys, "latency", "--profile", "cpu_1thread", "--arch", tmp / "folder")
    assert code == 2 and "folder" in line and "arch.json" in line
    (tmp / "table.bin").write_bytes(bytes(range(256)) * 4)
    code, line = run_cli(capsys, "import-profile", tmp / "table.bin", "-o", tmp / "p.yaml")
    assert code == 2 and "table.bin" in line and "not a text file" in line
    assert not (tmp / "p.yaml").exists()


# -- artifacts that would run code -------------------------------------------------------------------------------


@requires_fmnist
def test_network_folder_with_a_pickle_is_refused(case, capsys):
    tmp, exp = case
    net = tmp / "net"
    net.mkdir()
    ARCH.save(net / "arch.json")
    plant_pickle(net / "state_dict.pt", tmp / "pwned")
    code, line = run_cli(capsys, "train", "--arch", net, exp, "--finetune", "--epochs", "1")
    assert code == 2 and str(net / "state_dict.pt") in line and "pickled Python objects" in line
    assert not (tmp / "pwned").exists() and not (tmp / "runs").exists()
    # a truncated file is named too
    (net / "state_dict.pt").write_bytes(b"PK\x03\x04 truncated")
    code, line = run_cli(capsys, "train", "--arch", net, exp, "--finetune", "--epochs", "1")
    assert code == 2 and "state_dict.pt" in line and "truncated" in line
    # weights of another network
    other = Arch("conv_k3_c16_s2", (("mb_k3_e1_c16_s1",),), None, 10, 28, 1)
    torch.save(ProxylessNet(other).state_dict(), net / "state_dict.pt")
    code, line = run_cli(capsys, "train", "--arch", net, exp, "--finetune", "--epochs", "1")
    assert code == 2 and "do not fit" in line
    assert not (tmp / "runs").exists()


@requires_fmnist
def test_bad_retrain_flags(case, capsys):
    tmp, exp = case
    ARCH.save(tmp / "arch.json")
    for flags, named in ((["--epochs", "-1"], "--epochs"), (["--epochs", "0"], "--epochs"), (["--lr", "nan"], "--lr")):
        code, line = run_cli(capsys, "train", "--arch", tmp / "arch.json", exp, *flags)
        assert code == 2 and named in line
    assert not (tmp / "runs").exists()


@requires_fmnist
def test_resume_refuses_a_pickled_checkpoint(case, capsys):
    tmp, exp_path = case
    exp = load_experiment(exp_path)
    ckpts = tmp / "runs" / exp.name / "checkpoints"
    state = new_state(exp)
    save_checkpoint(state, str(ckpts / "epoch-0001"), exp)
    plant_pickle(ckpts / "epoch-0001" / "state.pt", tmp / "pwned")
    before = files_under(tmp)
    code, line = run_cli(capsys, "search", exp_path, "--resume")
    assert code == 2 and "epoch-0001" in line and "state.pt" in line
    assert not (tmp / "pwned").exists() and files_under(tmp) == before  # no arch.json, no result.json



def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def snapshot(folder) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in files_under(folder)}


@requires_fmnist
def test_resume_passes_over_damaged_checkpoints_of_a_real_search(case, capsys):
    """A finished in-process search, its newest state.pt truncated and the next one's meta.json too: --resume says
    so for each, continues from the oldest and ends where the uninterrupted search ended; all damaged: exit 2."""
    tmp, exp = case
    flags = ["--set", "train.epochs=3", "--set", "dist.checkpoints_to_keep=3"]
    assert main(["search", str(exp), *flags]) == 0
    out = tmp / "runs" / "tiny"
    first = json.loads((out / "result.json").read_text())
    ckpts = out / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    truncate(ckpts / "epoch-0003" / "state.pt")
    truncate(ckpts / "epoch-0002" / "meta.json")
    capsys.readouterr()
    assert main(["search", str(exp), *flags, "--resume"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "damaged checkpoint" in line]
    assert len(skipped) == 2, err
    assert str(ckpts / "epoch-0003" / "state.pt") in skipped[0]
    assert str(ckpts / "epoch-0002" / "meta.json") in skipped[1]
    assert f"resuming from {ckpts / 'epoch-0001'} (epoch 1)" in err
    again = json.loads((out / "result.json").read_text())
    assert again["alpha_digest"] == first["alpha_digest"] and again["arch"] == first["arch"]
    # every checkpoint damaged: one line naming the newest one's file, nothing written or renamed
    for name in os.listdir(ckpts):
        truncate(ckpts / name / "state.pt")
    before = snapshot(tmp)
    code, line = run_cli(capsys, "search", exp, *flags, "--resume")
    assert code == 2 and str(ckpts / "epoch-0003" / "state.pt") in line and "truncated" in line
    assert snapshot(tmp) == before


def test_the_payload_is_real(tmp_path):
    """Loaded without weights_only, the planted file runs its command: the markers' absence above means something."""
    plant_pickle(tmp_path / "evil.pt", tmp_path / "ran")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.slow
def test_registered_model_with_a_pickle_runs_nothing(case, capsys):
    """models:/ is rebuilt from arch.json + a weights-only state dict: a planted pickle is refused, never run."""
    from mlflow import MlflowClient

    from proxyless_ray.tracking.registry import load_registered, register_network

    tmp, exp = case
    uri = f"sqlite:///{tmp}/store/mlflow.db"
    os.makedirs(tmp / "store")
    client = MlflowClient(uri)
    eid = client.create_experiment("bad-input", artifact_location=(tmp / "store" / "mlruns").as_uri())
    run_id = client.create_run(eid).info.run_id
    net = ProxylessNet(ARCH)
    version = register_network(uri, run_id, net, "flops", 0.5, 1.0)
    model_uri = f"models:/proxyless-flops/{version}"
    loaded = load_registered(uri, model_uri)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    # the model's files went beside the store, not into ./mlruns of the working folder
    stored = files_under(tmp / "store" / "mlruns")
    assert any(f.endswith("/state_dict.pt") for f in stored) and not (tmp / "mlruns").exists()
    # plant pickles where the weights and the exported program are
    for rel in stored:
        if rel.endswith(("/state_dict.pt", "/model.pt2")):
            plant_pickle(tmp / "store" / "mlruns" / rel, tmp / "pwned")
    code, line = run_cli(capsys, "train", "--arch", model_uri, exp, "--set", "tracking.enabled=true",
                         "--tracking-uri", uri, "--epochs", "1", "--finetune")
    assert code == 2 and "state_dict.pt" in line and "pickled Python objects" in line
    assert not (tmp / "pwned").exists() and not (tmp / "runs").exists()
    # the reproduction: a version logged in MLflow's pickle format, its data/model.pth replaced
    import mlflow.pytorch

    from proxyless_ray.tracking.registry import _fluent_uri

    with _fluent_uri(uri):
        info = mlflow.pytorch.log_model(net, name="model", run_id=run_id, serialization_format="pickle",
                                        pip_requirements=["torch"], registered_model_name="proxyless-old")
    planted = [rel for rel in files_under(tmp) if rel.endswith("data/model.pth")]
    assert planted
    for rel in planted:
        plant_pickle(tmp / rel, tmp / "pwned")
    code, line = run_cli(capsys, "train", "--arch", f"models:/proxyless-old/{info.registered_model_version}", exp,
                         "--set", "tracking.enabled=true", "--tracking-uri", uri, "--epochs", "1")
    assert code == 2 and "proxyless-old" in line and "pickle format" in line
    assert not (tmp / "pwned").exists() and not (tmp / "runs").exists()


def test_resume_refuses_a_tune_folder_others_can_write(tmp_path):
    from proxyless_ray.sweeps.sweep import check_trusted

    tune = tmp_path / "sweep" / "tune"
    tune.mkdir(parents=True)
    (tune / "tuner.pkl").write_bytes(b"x")
    os.chmod(tmp_path / "sweep", 0o755)
    os.chmod(tune, 0o755)
    os.chmod(tune / "tuner.pkl", 0o644)
    check_trusted(str(tune))
    os.chmod(tune / "tuner.pkl", 0o666)
    with pytest.raises(PermissionError, match="tuner.pkl.*unpickling"):
        check_trusted(str(tune))


def test_sweep_resume_refuses_a_folder_others_can_write_and_unpickles_nothing(case, capsys):
    """The CLI side of the check above: exit 2 naming the file, before Tune unpickles the planted tuner.pkl."""
    import pickle

    from proxyless_ray.sweeps.plan import SweepPlan, save_plan, sweep_grid

    tmp, _ = case
    exp = tiny_experiment(tmp, sweep={"hardware": ["flops"], "lambdas": [0.1]})
    (tmp / "s.yaml").write_text("# sweep\n" + yaml.safe_dump(exp.to_dict()))
    sweep_dir = tmp / "runs" / "tiny"
    (sweep_dir / "tune").mkdir(parents=True)
    save_plan(SweepPlan(sweep_grid(exp)), str(sweep_dir))
    (sweep_dir / "tune" / "tuner.pkl").write_bytes(pickle.dumps(Payload(str(tmp / "pwned"))))
    for folder in (sweep_dir, sweep_dir / "tune"):
        os.chmod(folder, 0o755)
    os.chmod(sweep_dir / "tune" / "tuner.pkl", 0o666)
    before = snapshot(tmp)
    code, line = run_cli(capsys, "sweep", tmp / "s.yaml", "--resume")
    assert code == 2 and str(sweep_dir / "tune" / "tuner.pkl") in line and "unpickling" in line
    assert not (tmp / "pwned").exists() and snapshot(tmp) == before


def test_outputs_follow_the_umask(tmp_path):
    from proxyless_ray.fileio import atomic_write_text
    from proxyless_ray.nn.network import export_network

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        export_network(ProxylessNet(ARCH), tmp_path / "network")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "network").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "network" / "arch.json").st_mode) == 0o644


@requires_fmnist
def test_damaged_parquet_shard_stops_the_search_naming_it(case, capsys):
    """A bit-flipped row group in an unverified shard (verify_checksum: false): one line naming shard and row group
    when it is read, exit 2, no architecture written."""
    import pyarrow.parquet as pq
    from data_helpers import CLASSES, make_imagenet

    tmp, _ = case
    inet = make_imagenet(tmp / "inet")
    assert main(["prepare-data", "--imagefolder", str(inet), "--out", str(tmp / "shards"), "--shard-rows", "16",
                 "--row-group-rows", "4", "--quiet"]) == 0
    path = tmp / "shards" / "train-00002.parquet"
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 10] = bytes(b ^ 0xFF for b in data[offset:offset + 10])  # the page header of row group 1
    path.write_bytes(bytes(data))
    exp = tiny_experiment(tmp, space={"resolution": 32, "in_chs": 3, "num_classes": len(CLASSES)},
                          data={"name": "parquet", "path": str(tmp / "shards"), "heldout_size": 10, "train_subset": 0,
                                "test_subset": 0, "verify_checksum": False})
    (tmp / "p.yaml").write_text("# damaged shard\n" + yaml.safe_dump(exp.to_dict()))
    code, line = run_cli(capsys, "search", tmp / "p.yaml")
    assert code == 2 and "train-00002.parquet row group 1" in line
    assert not (tmp / "runs" / "tiny" / "arch.json").exists() and not (tmp / "runs" / "tiny" / "result.json").exists()


# -- the NaN loss ------------------------------------------------------------------------------------------------


@requires_fmnist
def test_nan_loss_stops_the_search_and_writes_no_architecture(case, capsys):
    tmp, exp = case
    code, line = run_cli(capsys, "search", exp, "--set", "train.lr=1.0e+30", "--set", "train.warmup_lr=1.0e+30")
    assert code == 2 and "diverged" in line and "nan" in line and "train.lr" in line
    out = tmp / "runs" / "tiny"
    assert not (out / "arch.json").exists() and not (out / "result.json").exists()


@requires_fmnist
def test_nan_loss_stops_the_retraining_and_exports_nothing(case, capsys):
    tmp, exp = case
    ARCH.save(tmp / "arch.json")
    code, line = run_cli(capsys, "train", "--arch", tmp / "arch.json", exp, "--lr", "1e30", "--epochs", "2")
    assert code == 2 and "retraining diverged" in line and "nan" in line
    assert not [f for f in files_under(tmp) if f.endswith(("result.json", "state_dict.pt", "model.pt2"))]


# -- tracking store faults ---------------------------------------------------------------------------------------


@requires_fmnist
def test_train_checks_the_tracking_store_before_training(case, capsys):
    tmp, exp = case
    ARCH.save(tmp / "arch.json")
    (tmp / "dbdir").mkdir()
    for uri, named in (("http://127.0.0.1:9", "127.0.0.1:9"), (f"sqlite:///{tmp}/dbdir", "dbdir")):
        code, line = run_cli(capsys, "train", "--arch", tmp / "arch.json", exp, "--set", "tracking.enabled=true",
                             "--tracking-uri", uri)
        assert code == 2 and named in line
    assert not (tmp / "runs").exists()


@requires_fmnist
def test_read_only_sqlite_file_is_refused_before_training(case, capsys):
    """Read-only for this user: mode 0444, and for root (who writes those anyway) the immutable attribute."""
    import shutil
    import subprocess

    tmp, exp = case
    ARCH.save(tmp / "arch.json")
    db = tmp / "ro.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(100))
    os.chmod(db, 0o444)
    root = os.geteuid() == 0
    if root:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(db)]).returncode != 0:
            pytest.skip("root, and no immutable attribute on this file system")
    try:
        code, line = run_cli(capsys, "train", "--arch", tmp / "arch.json", exp, "--set", "tracking.enabled=true",
                             "--tracking-uri", f"sqlite:///{db}")
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(db)])
    assert code == 2 and "ro.db" in line and "read-only" in line
    assert not (tmp / "runs").exists()


def test_read_only_commands_never_create_a_store(case, capsys):
    tmp, exp = case
    missing = tmp / "nowhere.db"
    code, line = run_cli(capsys, "results", "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and "nowhere.db" in line and not missing.exists()
    (tmp / "empty.db").write_bytes(b"")
    code, line = run_cli(capsys, "results", "--tracking-uri", f"sqlite:///{tmp}/empty.db")
    assert code == 2 and "empty.db" in line and (tmp / "empty.db").stat().st_size == 0
    code, line = run_cli(capsys, "train", "--arch", "models:/proxyless-flops/1", exp, "--set",
                         "tracking.enabled=true", "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and "nowhere.db" in line and not missing.exists()

# -- interrupts --------------------------------------------------------------------------------------------------


@requires_fmnist
@pytest.mark.parametrize("after_checkpoint", [True, False])
def test_ctrl_c_says_where_to_resume_from(case, capsys, monkeypatch, after_checkpoint):
    """A real SIGINT to this process during the in-process search, after or before the first checkpoint."""
    import signal

    from proxyless_ray.distributed.trainer import LocalReporter

    tmp, exp = case
    original = LocalReporter.__call__

    def report_then_sigint(self, metrics, checkpoint_dir):
        if after_checkpoint:
            original(self, metrics, checkpoint_dir)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(LocalReporter, "__call__", report_then_sigint)
    code, line = main(["search", str(exp)]), capsys.readouterr().err
    out = tmp / "runs" / "tiny"
    assert code == 130
    lines = [x for x in line.splitlines() if "interrupted" in x]
    assert len(lines) == 1 and "SIGINT" in lines[0] and f"proxyless-ray search {exp} --resume" in lines[0]
    if after_checkpoint:
        assert str(out / "checkpoints" / "epoch-0001") in lines[0]
    else:
        assert "starts from scratch" in lines[0]
    assert (out / "INCOMPLETE").exists() and not (out / "arch.json").exists()
    monkeypatch.setattr(LocalReporter, "__call__", original)
    assert main(["search", str(exp), "--resume"]) == 0
    err = capsys.readouterr().err
    assert ("resuming from" if after_checkpoint else "starting from scratch") in err
    assert (out / "arch.json").exists() and not (out / "INCOMPLETE").exists()


@requires_fmnist
@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_to_a_ray_search_process_group(tmp_path):
    """Ctrl-C at a terminal reaches the whole process group; Ray Train's own handler would exit 1 saying nothing."""
    d = tiny_experiment(tmp_path, train={"epochs": 6}, dist={"workers": 1}).to_dict()
    exp = tmp_path / "e.yaml"
    exp.write_text("# t\n" + yaml.safe_dump(d))
    # the controller's line for epoch 1: its checkpoint is committed
    code, last = interrupt_cli(tmp_path, ["search", exp], "epoch   1 ", group=True)
    assert code == 130
    assert "checkpoint_" in last[0] and "--resume" in last[0] and "SIGINT" in last[0]
    assert (tmp_path / "runs" / "tiny" / "INCOMPLETE").exists()
    assert not (tmp_path / "runs" / "tiny" / "arch.json").exists()


def interrupt_cli(tmp_path, argv, wait_for: str, group: bool) -> tuple[int, list[str]]:
    """Run the CLI in a child process, send SIGINT (to its process group: a terminal's Ctrl-C) once a stderr line
    holds ``wait_for``; returns the exit status and the lines that say 'interrupted'."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "proxyless_ray.cli", *map(str, argv)], stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=tmp_path)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if wait_for in line:
                break
        (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [x for x in rest.splitlines() if "interrupted" in x]
    assert len(lines) == 1, "".join(seen)[-2000:] + rest[-3000:]
    return code, lines


@requires_fmnist
def test_ctrl_c_during_train_says_nothing_was_written(case):
    tmp, exp = case
    ARCH.save(tmp / "arch.json")
    code, lines = interrupt_cli(tmp, ["train", "--arch", tmp / "arch.json", exp, "--epochs", "500"],
                                "[train] epoch 1:", group=False)
    assert code == 130 and "SIGINT" in lines[0] and "nothing was written" in lines[0] and "--resume" not in lines[0]
    assert not [f for f in files_under(tmp) if f.endswith(("result.json", "state_dict.pt"))]


@requires_fmnist
@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_during_train_on_ray_workers(tmp_path):
    """Ray Train's own handler would exit 1 saying nothing; the retraining says what happened, exit 130."""
    d = tiny_experiment(tmp_path, dist={"workers": 1}).to_dict()
    exp = tmp_path / "e.yaml"
    exp.write_text("# t\n" + yaml.safe_dump(d))
    ARCH.save(tmp_path / "arch.json")
    code, lines = interrupt_cli(tmp_path, ["train", "--arch", tmp_path / "arch.json", exp, "--epochs", "500"],
                                "epoch   1 ", group=True)
    assert code == 130 and "SIGINT" in lines[0] and "nothing was written" in lines[0]
    assert not (tmp_path / "runs" / "tiny" / "retrained").exists()
