"""Bad input gets an error that names the problem and the fix."""
import errno
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pmp_lightning.data import LabelNoise, PoolDataModule
from pmp_lightning.errors import (CostateDivergedError, DataConfigError, OutputError, ReplayConfigError, SnapshotError,
                                  UnknownScoreError)
from pmp_lightning.models import mlp
from pmp_lightning.pipeline import run
from pmp_lightning.replay import ReplayModule
from pmp_lightning.scores import compute_scores
from tests.conftest import RandomSource, fit_replay
from tests.test_pipeline import ROOT, make_cfg


def _replay(dm, snaps, net=None, **kw):
    return ReplayModule(net or mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, **kw)


def test_missing_snapshot_directory(trained, tmp_path):
    dm, _ = trained
    with pytest.raises(SnapshotError, match=r"snapshot directory .*nowhere does not exist; train first"):
        _replay(dm, tmp_path / "nowhere")


def test_snapshot_from_a_different_model(trained):
    dm, snaps = trained
    with pytest.raises(SnapshotError, match=r"different model .*net\.1\.weight is \[5, 4\] in the snapshots but \[7, 4\].*model="):
        _replay(dm, snaps, net=mlp(in_features=4, hidden=7))


def test_empty_pool(tmp_path):
    with pytest.raises(DataConfigError, match="pool .* would be empty"):
        run(make_cfg(tmp_path, "data.pool_size=0"))


def test_empty_pool_given_to_the_replay(trained):
    dm, snaps = trained
    empty = dm.pool.__class__(dm.pool.x[:0], dm.pool.y[:0])
    with pytest.raises(ValueError, match="pool to score is empty"):
        ReplayModule(mlp(in_features=4, hidden=5), snaps, empty, dm.downstream, dm.train_set)


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_noise_rate_outside_unit_interval(rate):
    with pytest.raises(DataConfigError, match=rf"noise.rate={rate} is outside \[0, 1\)"):
        LabelNoise("symmetric", rate)


def test_unknown_score_name():
    with pytest.raises(UnknownScoreError, match=r"unknown score name\(s\) \['rwa'\]; valid names: raw, cosine"):
        compute_scores(["rwa"], stats=None)


def test_exploding_costate_stops_before_any_score_is_written(trained, tmp_path):
    dm, snaps = trained
    manifest = json.loads((snaps / "manifest.json").read_text())
    for s in manifest["snapshots"][1:]:
        s["lr_sum"] = 1e38  # η·λ_max(H) far beyond 2: the coarse recursion overflows float32
    (snaps / "manifest.json").write_text(json.dumps(manifest))
    replay = _replay(dm, snaps, curvature="coarse")
    with pytest.raises(CostateDivergedError, match="became (inf|nan).*No scores were written.*curvature=expm"):
        fit_replay(replay)


def test_exact_mode_refuses_a_trajectory_it_cannot_be_exact_for(trained):
    dm, snaps = trained
    with pytest.raises(ValueError, match="curvature=exact needs a snapshot after every optimizer step.*full-batch"):
        _replay(dm, snaps, curvature="exact")


def test_the_command_line_prints_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", "+experiment=noisy_mnist", "noise.rate=1.0", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "noise.rate=1.0 is outside [0, 1)" in out and "Traceback" not in out


def test_a_misspelled_score_fails_at_composition_with_the_valid_names(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(tmp_path, "scoring.scores=[raw,rwa]")
    assert "Invalid value 'rwa', expected one of [raw, cosine, unit_grad" in str(err.value.__cause__ or err.value)


def test_a_misspelled_scoring_option_lists_the_options(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        make_cfg(tmp_path, "scoring=rwa")
    assert "Could not find 'scoring/rwa'" in str(err.value) and set(err.value.options) >= {"raw", "cosine", "zscore", "all"}


def test_a_truncated_snapshot_file(trained):
    dm, snaps = trained
    path = snaps / "theta_0001.pt"
    path.write_bytes(path.read_bytes()[:100])
    replay = _replay(dm, snaps)
    with pytest.raises(SnapshotError, match=r"theta_0001.pt cannot be read .*damaged, retrain"):
        fit_replay(replay)


def test_a_snapshot_holding_nan(trained):
    dm, snaps = trained
    state = torch.load(snaps / "theta_0001.pt")
    state["net.1.weight"][0, 0] = float("nan")
    torch.save(state, snaps / "theta_0001.pt")
    replay = _replay(dm, snaps)
    with pytest.raises(SnapshotError, match=r"snapshot 1 .* non-finite values in 1.weight; training diverged"):
        fit_replay(replay)


def test_a_gap_in_the_snapshot_steps(trained):
    dm, snaps = trained
    manifest = json.loads((snaps / "manifest.json").read_text())
    manifest["snapshots"][2]["step"] += 3  # as if a snapshot between them were lost
    (snaps / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="has a gap: snapshot theta_0002.pt is at step 9 after step 3"):
        _replay(dm, snaps)


def test_a_pool_with_a_single_class():
    source = RandomSource(n=40)
    source.y[:] = 3
    with pytest.raises(DataConfigError, match=r"the pool holds a single class \(3\)"):
        PoolDataModule(source, LabelNoise("symmetric", 0.2), pool_size=24, downstream_size=8, test_size=8).setup()


@pytest.mark.parametrize("which", ["output", "cache"])
def test_a_read_only_directory_is_named_before_any_work(tmp_path, monkeypatch, which):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits, so let the file system refuse as a read-only mount would
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(path):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        monkeypatch.setattr(os, "open", lambda path, *a, **k: refuse(path) or real_open(path, *a, **k))
        monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: refuse(path) or real_mkdir(path, *a, **k))
    out, cache = (ro / "run", tmp_path / "cache") if which == "output" else (tmp_path / "run", ro / "cache")
    setting = "paths.output_dir" if which == "output" else "paths.cache_dir"
    with pytest.raises(OutputError, match=f"cannot write to {ro}/.*(Read-only file system|Permission denied).*point {setting}.* at a writable"):
        run(make_cfg(out, cache=cache))
    assert not (tmp_path / "run" / "ground_truth.npz").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("objective.name=entropy", "unknown objective 'entropy'; choose one of ce, tempered_ce"),
    ("objective=tempered_ce objective.temperature=0", r"objective.temperature=0.*positive number"),
    ("objective=ce +objective.temperature=8", r"objective=ce takes the setting\(s\) none, got \['temperature'\]"),
])
def test_a_bad_objective_is_one_line_from_the_command_line(tmp_path, override, message):
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "+experiment=noisy_mnist", *override.split(),
                           f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert re.search(f"ReplayConfigError: .*{message}", done.stderr + done.stdout), done.stderr[-2000:]


@pytest.mark.parametrize(("override", "message"), [
    ("replay.lanczos_steps=0", r"replay.lanczos_steps=0: it must be an integer ≥ 1, e.g. replay.lanczos_steps=8"),
    ("replay.hvp_samples=-3", r"replay.hvp_samples=-3: it must be an integer ≥ 1 or null"),
    ("replay.batch_size=0.5", r"replay.batch_size=0.5: it must be an integer ≥ 1 or null"),
    ("trainer.max_epochs=0", r"trainer.max_epochs=0: it must be an integer ≥ 1"),
    ("replay.growth_warning=1", r"replay.growth_warning=1: it must be a number > 1"),
])
def test_numeric_settings_are_checked_before_any_work(tmp_path, override, message):
    with pytest.raises(ReplayConfigError, match=message):
        run(make_cfg(tmp_path, override))
    assert not (tmp_path / "ground_truth.npz").exists()  # nothing was loaded or written


def test_a_noise_rate_that_is_not_a_number_names_the_setting():
    with pytest.raises(DataConfigError, match=r"noise.rate='abc' is not a number"):
        LabelNoise("symmetric", "abc")


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    """Hydra composes before the heavy stack loads: importing the entry point loads neither torch nor Lightning,
    and a misspelt group option fails with Hydra's list of the valid ones."""
    probe = subprocess.run([sys.executable, "-c", "import sys; import run; "
                            "print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "[]", probe.stderr[-2000:]
    done = subprocess.run([sys.executable, "run.py", "+experiment=noisy_mnist", "model=cnnn", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Could not find 'model/cnnn'" in done.stderr and "small_cnn" in done.stderr
