"""Training and replay in 2 CPU processes (gloo) through the CLI, against a single-process replay."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from pmp_lightning.training import shaped
from pmp_lightning.scores.registry import compute_scores
from tests.conftest import fit_replay
from tests.test_pipeline import ROOT, SMALL, make_cfg

pytestmark = pytest.mark.slow  # every test here runs the pipeline or several processes

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2", "data.pool_size=301",
       "scoring.scores=[raw,cosine,loss,grand]", "scoring.canaries=0"]


def single_process_scores(cfg, snapshot_dir, names, accelerator="cpu"):
    """The run's datamodule and the scores of replaying ``snapshot_dir`` in this one process."""
    datamodule = instantiate(cfg.data, noise=instantiate(cfg.noise))
    datamodule.setup()
    net = shaped(instantiate(cfg.model, _partial_=True), datamodule.pool.x, datamodule.num_classes)()
    replay = instantiate(cfg.replay, net=net, objective=instantiate(cfg.objective),
                         snapshot_dir=snapshot_dir, pool=datamodule.pool,
                         downstream=datamodule.downstream, train_set=datamodule.train_set)
    return datamodule, compute_scores(names, fit_replay(replay, accelerator=accelerator).results())


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_score_like_one(tmp_path, strategy):
    run_dir = tmp_path / "run"
    overrides = [*SMALL, *DDP, f"trainer.strategy={strategy}"]
    cmd = [sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # θ_2 (forward only, for the baselines), then θ_1 and θ_0 with the costates
    assert "replay: 3 snapshots, 301 pool examples, 2 process(es)" in log

    # one output directory for both ranks, each snapshot written once
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("cache", "run")] == []
    if strategy == "ddp":  # rank 1 re-ran the command line, and Lightning pointed its Hydra at the same directory
        assert (run_dir / "train_ddp_process_1.log").is_file() and (run_dir / "run.log").is_file()
    manifest = json.loads((run_dir / "snapshots" / "manifest.json").read_text())
    assert manifest["complete"] and [s["t"] for s in manifest["snapshots"]] == [0, 1, 2]
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["manifest.json", "theta_0000.pt", "theta_0001.pt", "theta_0002.pt"]

    # every pool example scored exactly once, and the scores of one process on the same snapshots
    rows = list(csv.DictReader((run_dir / "scores.csv").open()))
    cfg = make_cfg(tmp_path / "single", *DDP[2:])
    datamodule, expected = single_process_scores(cfg, run_dir / "snapshots", ["raw", "cosine", "loss", "grand"])
    assert [int(r["index"]) for r in rows] == datamodule.pool_index.tolist() and len(set(datamodule.pool_index)) == 301
    for name, want in expected.items():
        got = np.array([float(r[name]) for r in rows])
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.2 < metrics["test_accuracy"] <= 1.0  # 10 classes; 2 short epochs at twice the batch size


def test_ddp_refuses_a_multirun_with_the_fix(tmp_path):
    cmd = [sys.executable, "run.py", "-m", *SMALL, *DDP, "trainer.strategy=ddp", "seed=0,1",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "use trainer.strategy=ddp_spawn for sweeps" in out and "Traceback" not in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_replay_on_a_gpu_equals_the_cpu(tmp_path):
    from pmp_lightning.pipeline import run

    cfg = make_cfg(tmp_path, "trainer.max_epochs=2", "data.pool_size=200", "trainer.accelerator=cpu", "scoring.scores=[raw]")
    run(cfg)
    names = ["raw", "cosine", "loss"]
    _, cpu = single_process_scores(cfg, tmp_path / "snapshots", names, accelerator="cpu")
    _, gpu = single_process_scores(cfg, tmp_path / "snapshots", names, accelerator="gpu")
    for name in names:
        assert np.abs(gpu[name] - cpu[name]).max() <= 1e-4 * np.abs(cpu[name]).max(), name
