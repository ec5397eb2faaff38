"""The app under `python -m paddle.distributed.launch --nproc_per_node 2` on CPU: one output
directory, one results table, figures over the whole validation set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import paddle
import pytest

from prune_callbacks import load_pruned
from prune_callbacks.app import evaluate_net
from prune_callbacks.datasets.bundled import digits_dataset, subset
from app_helpers import ROOT, SMALL

# several processes bind ports: under pytest-xdist they run on one worker, one at a time
pytestmark = pytest.mark.xdist_group("distributed")


def test_launch_two_processes_writes_one_run_dir_and_one_table(tmp_path: Path) -> None:
    run_dir, log_dir = tmp_path / "run", tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
         str(ROOT / "train.py"), *SMALL, "callbacks=[none,checkpoint]", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    logs = {n: (log_dir / f"workerlog.{n}").read_text() for n in (0, 1)}
    assert proc.returncode == 0, proc.stdout[-3000:] + logs[1][-3000:]
    # one table (rank 0's, echoed by the launcher), none from rank 1
    assert proc.stdout.count("Results: mobilenet_v1 on digits") == 1
    assert logs[0].count("Results: mobilenet_v1") == 1 and "Results:" not in logs[1]
    # one run dir: rank 1 made none in the cwd (Hydra's default outputs/) nor left its scratch dir
    assert not (tmp_path / "outputs").exists()
    results = json.loads((run_dir / "results.json").read_text())
    # the analysis file is the one the run used: top-1's, or the loss's after a fallback
    sens = os.path.basename(results["paths"]["sensitivity"])
    assert sens in ("sensitivity.json", "sensitivity.loss.json")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoint", "results.json",
                                                         sens, "train.log"]
    assert "Traceback" not in logs[0] + logs[1]
    assert results["flops_after"] < results["flops_before"] and results["val_samples"] == 48
    # both ranks pruned identically and saw the same evaluation right after pruning
    pruned = [[line for line in logs[n].splitlines() if "] - pruned: {" in line or line.startswith("pruned: {")]
              for n in (0, 1)]
    assert pruned[0] and [l.split("pruned: ")[1] for l in pruned[0]] == [l.split("pruned: ")[1] for l in pruned[1]]
    # the table's figures are over the whole validation set, as one process evaluates the saved net
    net = load_pruned(paddle.vision.models.mobilenet_v1(num_classes=10, scale=0.25),
                      str(run_dir / "checkpoint" / "final"))
    val = subset(digits_dataset("test"), 48, seed=0)
    again = evaluate_net(net, val, batch_size=48)
    assert again["top1"] == pytest.approx(results["top1_finetuned"])
    assert again["loss"] == pytest.approx(results["loss_finetuned"], rel=1e-4)
