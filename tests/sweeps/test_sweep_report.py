"""The sweep report's rows: Tune's last results, or a trial's own final metrics when Tune missed them."""

from __future__ import annotations

import json
from types import SimpleNamespace

from proxyless_ray.sweeps.plan import TRIALS_DIR
from proxyless_ray.sweeps.report import front_table, trial_rows


def tune_result(key: str, epoch: int, finished: bool, acc: float, coefficient_key: str = "lambda"):
    spec = {"key": key, "hardware": "pixel1", "loss": "add", coefficient_key: 0.5, "beta": None, "target_ms": None}
    metrics = {"epoch": epoch, "search_epoch": epoch - 1, "finished": finished, "heldout_acc": acc,
               "expected_latency_ms": 1.0, "arch": "mb_k3_e3_c8_s1", "latency_pixel1_ms": 0.5}
    return SimpleNamespace(config={"trial": spec}, metrics=metrics, error=None)


def write_outputs(sweep_dir, key: str, epochs: int, acc: float, result: bool = True) -> None:
    folder = sweep_dir / TRIALS_DIR / key
    folder.mkdir(parents=True)
    history = [{"epoch": e, "search_epoch": e - 1, "finished": e == epochs, "heldout_acc": acc,
                "expected_latency_ms": 0.9, "arch": "zero", "test_acc": 0.8 if e == epochs else None}
               for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    if result:
        (folder / "result.json").write_text("{}\n")


def test_a_trial_that_wrote_its_outputs_before_a_kill_is_reported_finished(tmp_path):
    # Tune saved epoch 3 of 4; the trial then finished and wrote its outputs, and the sweep was killed
    write_outputs(tmp_path, "done", 4, 0.7)
    rows = trial_rows(None, [tune_result("done", 3, False, 0.5)], str(tmp_path))
    assert rows[0]["finished"] and rows[0]["epoch"] == 4 and rows[0]["heldout_acc"] == 0.7
    assert rows[0]["test_acc"] == 0.8 and rows[0]["arch"] == "zero"
    table = front_table(rows)
    assert table.loc[0, "status"] == "finished" and bool(table.loc[0, "on_front"])


def test_tune_results_stand_when_the_trial_wrote_no_final_outputs(tmp_path):
    write_outputs(tmp_path, "stopped", 3, 0.7, result=False)  # a stopped trial never writes result.json
    write_outputs(tmp_path, "same", 4, 0.7)  # Tune already holds the last epoch: it stays the source
    # "lam": the coefficient's key in a trial config saved by an earlier release (a restored sweep)
    rows = trial_rows(None, [tune_result("stopped", 3, False, 0.5, "lam"), tune_result("same", 4, True, 0.6)],
                      str(tmp_path))
    assert [r["heldout_acc"] for r in rows] == [0.5, 0.6] and [r["lambda"] for r in rows] == [0.5, 0.5]
    assert [r["finished"] for r in rows] == [False, True]
    table = front_table(rows)
    assert dict(zip(table["trial_id"], table["status"])) == {"stopped": "stopped", "same": "finished"}
