"""End to end through Hydra's compose API on small data (the embedded MNIST images, offline)."""
import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from pmp_lightning.config import register_configs
from pmp_lightning.report.evaluate import METRICS
from pmp_lightning.pipeline import run
from pmp_lightning.scores.registry import SCORES

pytestmark = pytest.mark.slow  # every test here runs the pipeline or several processes

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "+experiment=noisy_mnist",
    "model=mlp",
    "data.pool_size=600",
    "data.downstream_size=100",
    "data.test_size=300",
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "replay.hvp_samples=128",
    "logger=none",
]


def make_cfg(tmp_path, *overrides, cache=None):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*SMALL, f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                            f"paths.cache_dir={cache or tmp_path / 'cache'}", *overrides])


@pytest.fixture(scope="module")
def train_pool_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_pool")
    return out, run(make_cfg(out))


def test_metrics_json_has_every_field(train_pool_run):
    out, returned = train_pool_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    # auto: the policy's choice (policy.choose); block_fit: fitted on the canaries it chooses on
    assert set(metrics["detection"]) == set(SCORES) | {"auto", "block_fit"}
    for row in metrics["detection"].values():
        assert set(row) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for m, v in row.items() if m != "hits_in_lowest_1pct")
        assert row["hits_in_lowest_1pct"] in range(0, 7)  # a count among the lowest ⌈1% of 600⌉ = 6
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    assert metrics["costate"]["mode"] == "expm" and len(metrics["costate"]["lambda_norms"]) == 4
    assert {"data", "train", "replay", "score"} <= set(metrics["timings"])


def test_scores_csv_has_one_row_per_pool_example(train_pool_run):
    out, _ = train_pool_run
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 600
    assert list(rows[0])[:4] == ["index", "true_label", "observed_label", "is_mislabeled"]
    assert len({r["index"] for r in rows}) == 600
    truth = np.load(out / "ground_truth.npz")
    assert [int(r["is_mislabeled"]) for r in rows] == truth["is_mislabeled"].astype(int).tolist()
    assert sum(int(r["is_mislabeled"]) for r in rows) == 120  # exactly 20% of the pool
    assert all((r["true_label"] != r["observed_label"]) == (r["is_mislabeled"] == "1") for r in rows)


def test_the_loss_baseline_finds_mislabels_on_an_easy_problem(train_pool_run):
    _, metrics = train_pool_run
    assert metrics["detection"]["loss"]["auroc"] > 0.9
    assert abs(metrics["detection"]["random"]["auroc"] - 0.5) < 0.1


def test_artefacts_live_in_the_run_directory(train_pool_run):
    out, _ = train_pool_run
    assert (out / "snapshots" / "manifest.json").is_file() and (out / "replay" / "stats.npz").is_file()
    stats = np.load(out / "replay" / "stats.npz")
    assert stats["dot"].shape == (4, 680) and stats["eta"].shape == (4,)  # the pool, then 40 canaries and 40 controls


def test_holdout_pool_scores_examples_the_trajectory_never_saw(tmp_path):
    metrics = run(make_cfg(tmp_path, "pool=holdout", "data.pool_size=300", "replay.curvature=coarse",
                           "scoring.scores=[raw,cosine,loss]"))
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 300 and set(metrics["detection"]) == {"raw", "cosine", "loss", "auto", "block_fit"}
    assert metrics["costate"]["mode"] == "coarse"
    assert metrics["detection"]["loss"]["auroc"] > 0.9


def test_selection_retrains_without_the_lowest_scored_examples(tmp_path):
    """The loss baseline and the default (``auto``, the policy's choice: here without canaries, its fallback among the
    two PMP variants computed) each retrain without their lowest-scored 20%."""
    metrics = run(make_cfg(tmp_path, "select.fractions=[0.2]", "select.scores=[loss,auto]", "scoring.scores=[raw,cosine,loss]",
                           "scoring.canaries=0"))
    sel = metrics["selection"]
    assert set(sel) == {"measure", "full", "oracle", "0.2"} and sel["measure"] == "test accuracy"
    assert set(sel["0.2"]) == {"loss", "auto", "random"}
    assert all(0.0 < v <= 1.0 for v in (sel["full"], sel["oracle"], *sel["0.2"].values()))
    # the loss baseline finds most mislabels (AUROC > 0.9 above), so dropping its lowest 20% beats a random 20%
    assert sel["0.2"]["loss"] > sel["0.2"]["random"]
    assert json.loads((tmp_path / "metrics.json").read_text())["selection"] == sel


def test_selection_by_auto_needs_a_choice_to_make(tmp_path):
    """``select.scores=[auto]`` exists only where the run computes two PMP variants or more (the guard: with two, the
    same setting passes)."""
    from pmp_lightning.config import check_settings
    from pmp_lightning.errors import DataConfigError

    with pytest.raises(DataConfigError, match=r"select.scores \['auto'\] are not computed by this run"):
        check_settings(make_cfg(tmp_path, "select.fractions=[0.2]", "select.scores=[auto]", "scoring.scores=[raw,loss]"))
    check_settings(make_cfg(tmp_path, "select.fractions=[0.2]", "select.scores=[auto]", "scoring.scores=[raw,cosine,loss]"))


def test_selection_needs_a_pool_that_is_the_training_set(tmp_path):
    from pmp_lightning.errors import DataConfigError

    with pytest.raises(DataConfigError, match="needs pool=train"):
        run(make_cfg(tmp_path, "pool=holdout", "data.pool_size=300", "select.fractions=[0.1]", "scoring.scores=[raw,cosine,loss]"))


def test_a_handful_of_mislabeled_examples_gets_a_caveat(tmp_path):
    metrics = run(make_cfg(tmp_path, "data.pool_size=40", "noise.rate=0.1", "trainer.max_epochs=2", "scoring=raw"))
    assert "the pool has 4 mislabeled and 36 clean examples" in metrics["detection_caveat"]
    assert json.loads((tmp_path / "metrics.json").read_text())["detection_caveat"] == metrics["detection_caveat"]
    assert "raw" in metrics["detection"]  # still computed, but flagged


def _cli(tmp_path, *overrides):
    """Start run.py with stdout and stderr going to a file, as under CI, SLURM or nohup."""
    log = open(tmp_path / "run.out", "w")
    cmd = [sys.executable, "run.py", *SMALL, "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    # Ctrl-C acts as on a terminal even when pytest itself was started in the background, where the shell
    # sets SIGINT to "ignore" and the child inherits it (Python then installs no KeyboardInterrupt handler)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)), tmp_path / "run.out"


def test_a_log_going_to_a_file_has_a_line_per_epoch_and_snapshot_and_no_bars(tmp_path):
    proc, out = _cli(tmp_path)
    assert proc.wait(timeout=600) == 0, out.read_text()[-3000:]
    text = out.read_text()
    assert "\r" not in text  # no carriage-return progress bars
    assert [f"train epoch ({e}/4)" in text for e in range(1, 5)] == [True] * 4
    assert [f"replay θ_{t} ({5 - t}/5)" in text for t in range(4, -1, -1)] == [True] * 5
    assert "replay θ_4 (1/5): " in text and "the trained model, for the baselines" in text
    assert "‖λ_4‖ = " in text and "examples/s" in text
    assert len(text.encode()) < 20_000 and len(text.splitlines()) < 80, len(text.splitlines())


def test_ctrl_c_during_training_says_what_the_rerun_does(tmp_path):
    import signal
    import time

    proc, out = _cli(tmp_path, "trainer.max_epochs=200")
    deadline = time.time() + 300
    while "train epoch (1/200)" not in out.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    text = out.read_text()
    assert "interrupted during train after" in text and "resumes training from its last finished epoch" in text, text[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_killed_training_resumes_from_its_last_epoch_bit_identical(tmp_path):
    """SIGKILL in the middle of training (no clean-up at all), then the same command: training continues from its last
    finished epoch, and every snapshot, the test accuracy and the scores equal those of a run never interrupted."""
    import signal
    import time

    import torch

    args = ("model=cnn", "trainer.max_epochs=6", "scoring.scores=[loss,cosine]")
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight, out = _cli(tmp_path / "straight", *args)
    assert straight.wait(timeout=600) == 0, out.read_text()[-3000:]

    killed_dir = tmp_path / "killed"
    proc, out = _cli(killed_dir, *args)
    deadline = time.time() + 300
    while not list((killed_dir / "cache" / "train").glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    entry = next((killed_dir / "cache" / "train").glob("*/snapshots"))
    written = len(json.loads((entry / "manifest.json").read_text())["snapshots"])
    assert 1 < written < 7 and not json.loads((entry / "manifest.json").read_text())["complete"], written

    again, out = _cli(killed_dir, *args)
    assert again.wait(timeout=600) == 0, out.read_text()[-3000:]
    assert "resuming from its last finished epoch" in (killed_dir / "run" / "run.log").read_text()
    a, b = (json.loads((d / "run" / "metrics.json").read_text()) for d in (tmp_path / "straight", killed_dir))
    assert a["test_accuracy"] == b["test_accuracy"]
    for t in range(7):
        theta = f"theta_{t:04d}.pt"
        left = torch.load(tmp_path / "straight" / "run" / "snapshots" / theta)
        right = torch.load(killed_dir / "run" / "snapshots" / theta)
        assert all(torch.equal(left[k], right[k]) for k in left), theta
    assert (tmp_path / "straight" / "run" / "scores.csv").read_bytes() == (killed_dir / "run" / "scores.csv").read_bytes()


def test_messages_do_not_land_inside_a_progress_bar(tmp_path):
    """On a terminal (a pseudo-terminal here) a warning raised mid-replay is a log record on its own line."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    cmd = [sys.executable, "run.py", *SMALL, "trainer.enable_progress_bar=true", "pool=holdout", "data.pool_size=300",
           "replay.curvature=coarse", "scoring=raw", f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'c'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=child, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "replay θ_" in text  # bars were drawn
    grew = [m.start() for m in re.finditer("costate norm grew", text)]
    assert grew  # curvature=coarse on this pool warns mid-replay
    for at in grew:
        line_start = max(text.rfind("\n", 0, at), text.rfind("\r", 0, at)) + 1
        assert text[line_start:].startswith("[20"), repr(text[line_start - 80: at])  # a log record, not a bar's tail


def test_outputs_and_cache_stay_in_the_project_from_any_directory(tmp_path):
    """Started from another directory, the run and its cache still go under the project, and the log says where."""
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "+experiment=noisy_mnist", "--cfg", "job", "--resolve",
                           "--package", "paths"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"cache_dir: {ROOT}/outputs/cache" in done.stdout and f"root_dir: {ROOT}" in done.stdout


def test_two_jobs_started_together_keep_their_own_results(tmp_path):
    """Two runs started in the same second (scoring=raw and scoring=loss) each get a run directory and a metrics.json."""
    cmd = [sys.executable, str(ROOT / "run.py"), *SMALL, "trainer.max_epochs=2", f"paths.root_dir={tmp_path}"]
    procs = [subprocess.Popen([*cmd, f"scoring={s}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in ("raw", "loss")]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2
    assert sorted(next(iter(json.loads((r / "metrics.json").read_text())["detection"])) for r in runs) == ["loss", "raw"]
    assert sum("cache:" in log and str(tmp_path / "outputs" / "cache") in log for log in logs) == 2
