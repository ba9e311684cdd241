"""Training recipes: optimizer and schedule groups, each shipped model naming the recipe its users train it with."""
import functools
import math

import pytest
import pytorch_lightning as pl
import torch

from callbacks.theta_snapshot import ThetaSnapshot
from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.trajectory import load_manifest
from pmp_lightning.training import Classifier, WarmupCosine
from tests.conftest import RandomSource
from tests.test_pipeline import make_cfg


@pytest.mark.parametrize(("model", "optimizer", "schedule"), [
    ("cnn", "SGD", None), ("logreg", "SGD", None), ("resnet", "SGD", "WarmupCosine"), ("vit", "AdamW", "WarmupCosine"),
])
def test_each_model_names_its_recipe(tmp_path, model, optimizer, schedule):
    cfg = make_cfg(tmp_path, f"model={model}")
    assert cfg.optimizer._target_.endswith(optimizer)
    assert (cfg.lr_schedule.get("_target_", "").rsplit(".", 1)[-1] or None) == schedule
    if model == "cnn":  # the reported CNN keeps the report's plain SGD at a constant rate
        assert cfg.optimizer.momentum == 0.0 and not cfg.optimizer.get("weight_decay")


def test_the_command_line_and_a_model_of_ones_own(tmp_path):
    assert make_cfg(tmp_path, "model=resnet", "optimizer=adamw").optimizer._target_ == "torch.optim.AdamW"
    assert make_cfg(tmp_path, "model=vit", "lr_schedule=constant").lr_schedule in ({}, None)
    own = make_cfg(tmp_path, "~model", "+model._target_=my_model.Net")  # no recipe of its own: the default one
    assert own.optimizer.momentum == 0.9 and own.optimizer.weight_decay > 0
    assert own.lr_schedule._target_ == "pmp_lightning.training.WarmupCosine"


def test_warm_up_then_cosine_as_recorded_in_the_snapshots(tmp_path):
    """The schedule steps every optimizer step: linear warm-up over one epoch, then a cosine to final_ratio × lr;
    the snapshots record each step's rate, which is what the replay reads."""
    pl.seed_everything(0)
    dm = PoolDataModule(RandomSource(n=60), LabelNoise("none", 0.0), pool_size=40, downstream_size=8, test_size=8, batch_size=10)
    schedule = functools.partial(WarmupCosine, warmup_epochs=1, final_ratio=0.1)  # as Hydra builds it (_partial_)
    classifier = Classifier(mlp(in_features=4, hidden=5), optimizer=lambda params: torch.optim.SGD(params, lr=0.2),
                            lr_schedule=schedule)
    pl.Trainer(max_epochs=3, callbacks=[ThetaSnapshot(tmp_path / "snaps")], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(classifier, datamodule=dm)
    lrs = [lr for s in load_manifest(tmp_path / "snaps")["snapshots"][1:] for lr in s["lrs"]]
    assert len(lrs) == 12  # 4 steps per epoch
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])  # warm-up over the first epoch
    decay = [0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8))) for k in range(8)]
    assert lrs[4:] == pytest.approx(decay)  # cosine from lr towards 0.1 × lr


def test_a_model_takes_what_the_config_leaves_null_from_the_data():
    """shaped(): null shape settings come from the inputs and the class count; a value written in the config stays."""
    import functools

    from pmp_lightning.models.classifiers import ViT, mlp
    from pmp_lightning.training import shaped

    x = torch.rand(4, 3, 32, 32)
    net = shaped(functools.partial(mlp, num_classes=None, in_features=None), x, 7)()
    assert net[1].in_features == 3 * 32 * 32 and net[-1].out_features == 7
    vit = shaped(functools.partial(ViT, num_classes=None, image_size=None, in_channels=None), x, 10)()
    assert vit.patch_embed.in_channels == 3 and vit.pos_embed.shape[1] == (32 // 7) ** 2 + 1
    stem = shaped(functools.partial(ViT, num_classes=None, image_size=None, in_channels=None, stem="conv", pool="mean"),
                  x, 10)()
    assert stem.patch_embed[0].in_channels == 3 and stem.pos_embed.shape[1] == 4 ** 2 + 1  # 32 → 16 → 8 → 4
    assert stem(x).shape == (4, 10)
    with pytest.raises(ValueError, match="stem is 'patch' or 'conv'"):
        ViT(stem="convolution")
    kept = shaped(functools.partial(mlp, num_classes=10, in_features=None), x, 7)()
    assert kept[-1].out_features == 10  # written in the config: kept (a wrong value is named before training)
    from pmp_lightning.models.classifiers import small_cnn
    gray = torch.rand(4, 1, 28, 28)  # a null setting the model does not take is dropped, not passed on
    assert shaped(functools.partial(small_cnn, num_classes=None, in_channels=None), gray, 3)()[-1].out_features == 3
    tokens = torch.randint(0, 16, (4, 12))
    assert shaped(functools.partial(mlp, num_classes=None, in_features=None), tokens, 3)()[1].in_features == 12
    from pmp_lightning.models.classifiers import TextClassifier
    text = shaped(functools.partial(TextClassifier, num_classes=None, vocab_size=None, max_len=12), tokens, 3, 300)()
    assert text.tokens.num_embeddings == 300 and text.mlp[-1].out_features == 3  # the tokenizer's vocabulary, not K
