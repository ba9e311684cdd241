"""Per-block statistics: the replay keeps each block's share of the dot product and of the squared gradient norm."""
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from pmp_lightning.models.classifiers import ResNet, ViT, mlp, reported_cnn
from pmp_lightning.replay.module import ReplayModule
from pmp_lightning.scores.registry import compute_scores
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.statistics.plan import block_matrix, block_of, plan_for
from pmp_lightning.task import training_loss
from pmp_lightning.training import trainable
from tests.conftest import fit_replay


@pytest.mark.parametrize(("net", "blocks"), [
    (ResNet(width=4), ["stem", "layers.0", "layers.1", "layers.2", "fc"]),
    (ViT(dim=8, depth=2, heads=2, mlp_dim=8), ["(root)", "patch_embed", "blocks.0", "blocks.1", "norm", "head"]),
    (ViT(dim=8, depth=2, heads=2, mlp_dim=8, stem="conv"), ["(root)", "patch_embed", "blocks.0", "blocks.1", "norm", "head"]),
    (reported_cnn(), ["0", "2", "7", "10"]),
])
def test_the_blocks_of_the_shipped_networks(net, blocks):
    """Top-level children, containers of composite modules split into them, the network's own parameters as (root)."""
    x = torch.rand(8, 1, 28, 28)
    names, matrix = block_matrix(plan_for(net.eval(), x, torch.randint(0, 10, (8,))), net)
    assert names == blocks
    assert (matrix.sum(1) == 1).all()  # every part in exactly one block
    assert block_of("layers.1.conv1.weight", ResNet(width=4), ["layers", "layers.1"]) == "layers.1"  # longest group
    assert block_of("fc.weight", ResNet(width=4), ["layers"]) == "(other)"


def test_block_statistics_match_per_example_gradients_in_float64():
    """Each block's dot and squared norm equal those of explicit per-example gradients (vmap(grad)) restricted to
    the block's parameters, on a ResNet with BatchNorm in eval mode."""
    torch.manual_seed(0)
    net = ResNet(width=4).double().eval()
    x, y = torch.rand(6, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (6,))
    params = {k: p.detach() for k, p in trainable(net).items()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    stats = per_example_stats(net, x, y, v, by_layer=True)
    names, matrix = block_matrix(plan_for(net, x, y), net)
    block_dot, block_sq = stats["layer_dot"] @ matrix, stats["layer_sq"] @ matrix

    def loss(p, xi, yi):
        return training_loss(functional_call(net, p, (xi[None],)), yi[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for b, name in enumerate(names):
        inside = [k for k in params if block_of(k, net) == name]
        dot = sum((g[k].reshape(6, -1) * v[k].reshape(-1)).sum(1) for k in inside)
        sq = sum(g[k].reshape(6, -1).pow(2).sum(1) for k in inside)
        torch.testing.assert_close(block_dot[:, b], dot, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(block_sq[:, b], sq, rtol=1e-9, atol=1e-12)


def test_the_replay_keeps_blocks_that_add_up_to_the_whole(trained):
    dm, snaps = trained
    stats = fit_replay(ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set,
                                    curvature="expm")).results()
    assert list(stats.blocks) == ["1", "3"] and stats.block_dot.shape == (2, 24, 2)
    np.testing.assert_allclose(stats.block_dot.sum(2), stats.dot, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sqrt(stats.block_sq.sum(2)), stats.grad_norm, rtol=1e-5)
    np.testing.assert_allclose(np.sqrt((stats.block_direction_norm**2).sum(1)), stats.direction_norm, rtol=1e-5)
    assert (stats.block_sq.sum(1) > 0).all() and (np.abs(stats.block_dot).sum(1) > 0).all()  # both blocks count


def test_block_scores_and_groups_of_ones_own(trained):
    dm, snaps = trained
    stats = fit_replay(ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set,
                                    curvature="none")).results()
    scores = compute_scores(["block_cosine", "late_cosine", "cosine"], stats)
    with np.errstate(invalid="ignore"):  # a dead ReLU leaves a block without gradient: its cosine counts as 0
        per_block = np.nan_to_num(stats.block_dot / (stats.block_direction_norm[:, None, :] * np.sqrt(stats.block_sq)))
    np.testing.assert_allclose(scores["block_cosine"], per_block.mean(2).sum(0))
    np.testing.assert_allclose(scores["late_cosine"], per_block[:, :, 1].sum(0))  # two blocks: the later one
    assert not np.allclose(scores["block_cosine"], scores["cosine"])
    one = fit_replay(ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set,
                                  curvature="none", blocks=["3"])).results()
    assert list(one.blocks) == ["(other)", "3"]
    np.testing.assert_allclose(one.block_dot[:, :, 1], stats.block_dot[:, :, 1])
    np.testing.assert_allclose(compute_scores(["block_cosine"], one)["block_cosine"], scores["block_cosine"])


def _random_stats(T=3, N=12, B=4, seed=0):
    from pmp_lightning.replay.store import ReplayStats

    rng = np.random.default_rng(seed)
    block_dot, block_sq = rng.normal(size=(T, N, B)), rng.uniform(0.1, 2, size=(T, N, B)) * rng.uniform(0.01, 100, size=B)
    direction = rng.uniform(0.5, 2, size=(T, B))
    zeros = np.zeros((T + 1, N))
    return ReplayStats(dot=block_dot.sum(2), grad_norm=np.sqrt(block_sq.sum(2)), loss=zeros, margin=zeros, correct=zeros,
                       el2n=zeros, eta=np.full(T, 0.1), lambda_norm=np.ones(T), direction_norm=np.sqrt((direction**2).sum(1)),
                       participation=np.ones(T), block_dot=block_dot, block_sq=block_sq, block_direction_norm=direction,
                       blocks=np.array([f"b{b}" for b in range(B)]))


def test_late_fisher_is_the_cosine_in_the_blocks_fisher_metric():
    """Written out: each later block divided by the examples' mean squared gradient norm there. Scaling a block's
    gradients and ψ alike leaves it unchanged (late_cosine moves); on one block it is the cosine."""
    s = _random_stats()
    late = slice(2, None)
    f = s.block_sq[:, :, late].mean(1, keepdims=True)
    dot = (s.block_dot[:, :, late] / f).sum(2)
    norm = np.sqrt((s.block_sq[:, :, late] / f).sum(2))
    direction = np.sqrt((s.block_direction_norm[:, None, late] ** 2 / f).sum(2))
    np.testing.assert_allclose(compute_scores(["late_fisher"], s)["late_fisher"], (dot / (direction * norm)).sum(0))
    scaled = _random_stats()
    scaled.block_dot[:, :, 3] *= 100.0
    scaled.block_sq[:, :, 3] *= 100.0
    scaled.block_direction_norm[:, 3] *= 10.0
    before, after = compute_scores(["late_fisher", "late_cosine"], s), compute_scores(["late_fisher", "late_cosine"], scaled)
    np.testing.assert_allclose(after["late_fisher"], before["late_fisher"])
    assert not np.allclose(after["late_cosine"], before["late_cosine"])
    one = _random_stats(B=1)
    np.testing.assert_allclose(compute_scores(["late_fisher"], one)["late_fisher"], compute_scores(["cosine"], one)["cosine"])
