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


def _separated_stats(pool=300, k=40, seed=0):
    """Block 0 tells the errors (the pool's first tenth, and the canaries) from the rest by its cosine's sign; blocks
    1–3 are noise, block 3 with gradients 1,000× larger. The scored examples: the pool, then k canaries, then k
    controls."""
    s = _random_stats(T=3, N=pool + 2 * k, B=4, seed=seed)
    bad = np.zeros(pool + 2 * k, dtype=bool)
    bad[: pool // 10], bad[pool: pool + k] = True, True
    rng = np.random.default_rng(seed)
    norms = np.sqrt(s.block_sq) * s.block_direction_norm[:, None, :]  # the cosine's denominator, per block
    cosines = 0.4 * rng.normal(size=norms.shape)
    cosines[:, :, 0] = np.where(bad, -0.15, 0.15) + 0.1 * rng.normal(size=bad.shape)
    s.block_dot = cosines * norms
    s.block_sq[:, :, 3] *= 1e6
    s.block_dot[:, :, 3] *= 1e3
    s.dot = s.block_dot.sum(2)
    return s, bad[:pool], np.arange(2 * k) < k


def test_block_fit_weighs_the_block_that_tells_the_canaries_from_their_controls():
    """Fitted on the canaries alone, the weights find the separating block among three of noise: the pool's errors
    rank lowest, where ``block_cosine`` (one vote per block) is diluted by the noise. Written out: the pool's score is
    the blocks' cosines summed over the snapshots, weighted ≥ 0, block 0 carrying nearly all the weight, and the
    weights solve the stated problem (the optimality conditions of the penalised logistic loss with weights ≥ 0, its
    gradient computed here from the standardised features)."""
    from pmp_lightning.policy import average_precision
    from pmp_lightning.scores.registry import FIT_L2, _block_cosines, _block_weights, block_fit

    s, errors, is_canary = _separated_stats()
    fitted = block_fit(s, is_canary)
    pool = len(errors)
    ap = lambda scores: float(average_precision(errors, -scores[:pool])[0])  # noqa: E731
    assert ap(fitted) > 0.85 > ap(compute_scores(["block_cosine"], s)["block_cosine"]) + 0.5
    features = _block_cosines(s).sum(0)
    w, offset = _block_weights(features[pool:], is_canary)
    assert (w >= 0).all() and w[0] * features[:, 0].std() > 5 * (w[1:] * features[:, 1:].std(0)).max()
    np.testing.assert_allclose(fitted[:pool], features[:pool] @ w)
    marked = features[pool:]
    z = (marked - marked.mean(0)) / marked.std(0)
    w_z, b = w * marked.std(0), offset - marked.mean(0) @ w
    logit = b - z @ w_z  # the log-odds of a canary
    residual = 1 / (1 + np.exp(-logit)) - is_canary
    gradient = -z.T @ residual + FIT_L2 * w_z
    assert abs(residual.sum()) < 1e-3 and np.all(np.where(w_z > 1e-8, np.abs(gradient) < 1e-3, gradient > -1e-3))


def test_block_fit_scores_each_canary_out_of_fold():
    """A canary's or control's score comes from weights fitted without its fold: relabelling the examples of one fold
    (canary ↔ control) leaves their own scores as they were and moves the others', and the pool's. Guard: scored with
    the weights of every canary and control (in-sample), the relabelled fold's scores move. Without canaries and
    controls both, nothing is fitted: zero for every example."""
    from pmp_lightning.scores.registry import _block_cosines, _block_weights, block_fit, canary_folds

    s, errors, is_canary = _separated_stats()
    pool, m = len(errors), len(is_canary)
    fold = canary_folds(m) == 0  # block_fit's first fold
    relabelled = np.where(fold, ~is_canary, is_canary)
    before, after = block_fit(s, is_canary), block_fit(s, relabelled)
    np.testing.assert_allclose(after[pool:][fold], before[pool:][fold])
    assert not np.allclose(after[pool:][~fold], before[pool:][~fold]) and not np.allclose(after[:pool], before[:pool])
    marked = _block_cosines(s).sum(0)[pool:]
    in_sample = lambda labels: marked[fold] @ _block_weights(marked, labels)[0]  # noqa: E731
    assert not np.allclose(in_sample(relabelled), in_sample(is_canary))
    assert not block_fit(s, np.ones(m, dtype=bool)).any() and not block_fit(s, np.zeros(m, dtype=bool)).any()


def test_the_rule_best_fit_takes_block_fit_where_its_out_of_fold_ap_is_the_best():
    """``best_fit`` (the shipped rule) chooses among the family and ``block_fit``, on the latter's out-of-fold
    scores; ``best`` never takes it. Through the run's scoring stage: with canaries, ``block_fit`` is a column and
    among the recorded inputs; without them it is not computed."""
    from types import SimpleNamespace

    from pmp_lightning import pipeline, policy

    s, errors, is_canary = _separated_stats()
    names = ["cosine", "block_cosine", "late_cosine", "late_fisher", "loss", "block_fit"]  # as config.run_scores has it
    datamodule = SimpleNamespace(canary_mask=is_canary, pool=errors)
    scores, choice = pipeline.score_stage(s, names, datamodule, {})
    assert "block_fit" in scores and "block_fit" in choice["inputs"]["scores"] and choice["rule"] == policy.RULE
    full = {**compute_scores(names[:-1], s), "block_fit": pipeline.block_fit(s, is_canary)}
    _, fitted = policy.choose(full, is_canary, len(errors), rule="best_fit")
    assert fitted["combined"] == ["block_fit"] and fitted["ap"]["block_fit"] == max(fitted["ap"].values())
    _, family = policy.choose(full, is_canary, len(errors), rule="best")
    assert family["combined"] != ["block_fit"] and "block_fit" not in family["ap"]  # the family alone
    scores, _ = pipeline.score_stage(s, names, SimpleNamespace(canary_mask=None, pool=errors), {})
    assert "block_fit" not in scores
