"""The one-pass statistics equal those of explicit per-example gradients (``torch.func.vmap(grad)``), in float64 to
1e-9 relative: every layer rule, the broadcast parameters, the written-out attention, the fallback, whole models.
Each case also names the way the plan handles it, so the test exercises the path it claims to."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pmp_lightning.statistics import layer_rules
from pmp_lightning.models.classifiers import ResNet, TextClassifier, ViT, mlp, reported_cnn, small_cnn
from pmp_lightning.task import training_loss
from pmp_lightning.errors import UnsupportedModelError
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.statistics.plan import make_plan

RTOL = 1e-9


def reference(net, x, y, loop=False):
    """Per-example gradients of every trainable parameter from vmap(grad), float64 (``loop``: one autograd.grad per
    example, for a network vmap cannot run)."""
    params = {k: p.detach() for k, p in net.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        return training_loss(functional_call(net, p, (xi[None],)), yi[None])

    if loop:
        rows = [grad(loss)(params, xi, yi) for xi, yi in zip(x, y)]
        return {k: torch.stack([r[k] for r in rows]) for k in params}
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def check(net, x, y, ways=None, rtol=RTOL, loop=False):
    """The pass's dot and norm against vmap(grad); ``ways``: {module name: expected way} in the plan."""
    torch.manual_seed(1)
    net = net.double().eval()
    x = x.double() if x.is_floating_point() else x
    plan = make_plan(net, x, y)
    got = {p.module: p.way.name for p in plan.parts}
    for module, how in (ways or {}).items():
        assert got.get(module) == how, (module, got)
    return plan, compare(net, x, y, plan, rtol, loop)


def compare(net, x, y, plan, rtol=RTOL, loop=False):
    """Assert the pass under ``plan`` gives vmap(grad)'s dots and norms; returns the pass's statistics."""
    g = reference(net, x, y, loop)
    v = {k: torch.randn_like(t[0]) for k, t in g.items()}
    dot = sum((g[k] * v[k]).flatten(1).sum(1) for k in g)
    norm = sum(g[k].pow(2).flatten(1).sum(1) for k in g).sqrt()
    stats = per_example_stats(net, x, y, v, plan=plan)
    torch.testing.assert_close(stats["dot"], dot, rtol=rtol, atol=rtol * float(dot.abs().max()))
    torch.testing.assert_close(stats["grad_norm"], norm, rtol=rtol, atol=rtol * float(norm.max()))
    return stats


def images(n=7, c=1, size=28):
    torch.manual_seed(0)
    return torch.rand(n, c, size, size, dtype=torch.float64), torch.randint(0, 10, (n,))


def head(features):
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 10))


# ------------------------------------------------------------------ layer rules, one at a time
class Seq(nn.Module):
    """Features (B, T, d) through ``layer``, then mean over positions and a linear head."""

    def __init__(self, layer, d_out, d_in=6, positions=5):
        super().__init__()
        self.inp = nn.Linear(4, d_in * positions)
        self.layer, self.d_in, self.positions = layer, d_in, positions
        self.out = nn.Linear(d_out, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1)).reshape(len(x), self.positions, self.d_in)
        return self.out(self.layer(h).mean(1))


def vectors(n=7):
    torch.manual_seed(0)
    return torch.randn(n, 1, 2, 2, dtype=torch.float64), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("positions", [5, 40])  # ghost norm (2T² ≤ in·out) and the materialised gradient
@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_sequences(positions, bias):
    check(Seq(nn.Linear(6, 7, bias=bias), 7, positions=positions), *vectors(), {"layer": "rule"})


def test_a_frozen_weight_leaves_the_bias_alone():
    net = Seq(nn.Linear(6, 7), 7)
    net.layer.weight.requires_grad_(False)
    plan, _ = check(net, *vectors(), {"layer": "rule"})
    assert next(p for p in plan.parts if p.module == "layer").params == ("layer.bias",)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(1, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    lambda: nn.Conv2d(1, 4, 3, padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(1, 4, 3, padding=2, padding_mode="circular", bias=False),
    lambda: nn.Conv2d(1, 4, 4, stride=4),  # disjoint patches: the linear rule on the patches
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3, groups=2, padding_mode="replicate", padding=1)),
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4, stride=2)),  # depthwise
], ids=["stride-dilation", "same-reflect", "circular", "patches", "groups", "depthwise"])
@pytest.mark.parametrize("grouped", [False, True], ids=["offsets", "grouped"])  # both ways of the conv weight rule
def test_conv2d(conv, grouped, monkeypatch):
    monkeypatch.setattr(layer_rules, "GROUPED_CHANNELS", 10**9 if grouped else 0)
    layer = conv()
    net = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    x, y = images(size=12)
    net(x.float())
    plan, _ = check(net, x, y)
    assert all(p.way.name == "rule" for p in plan.parts)


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv1d(2, 5, 3, stride=2, dilation=2, padding=1, padding_mode="reflect"), (2, 17)),
    (lambda: nn.Conv3d(2, 3, 2, padding=1, groups=1), (2, 5, 5, 5)),
], ids=["conv1d", "conv3d"])
@pytest.mark.parametrize("grouped", [False, True], ids=["offsets", "grouped"])
def test_conv1d_and_3d(conv, shape, grouped, monkeypatch):
    monkeypatch.setattr(layer_rules, "GROUPED_CHANNELS", 10**9 if grouped else 0)
    net = nn.Sequential(conv(), nn.Flatten(), nn.LazyLinear(10))
    torch.manual_seed(0)
    x, y = torch.randn(7, *shape, dtype=torch.float64), torch.randint(0, 10, (7,))
    net(x.float())
    plan, _ = check(net, x, y)
    assert all(p.way.name == "rule" for p in plan.parts)


class Tokens(nn.Module):
    def __init__(self, vocab=11, dim=6, padding_idx=None, positions=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.pos = nn.Embedding(positions, dim) if positions else None
        self.out = nn.Linear(dim, 10)

    def forward(self, ids):
        h = self.emb(ids)
        if self.pos is not None:
            h = h + self.pos(torch.arange(ids.shape[1]))  # (T, dim), no batch axis: broadcast during the pass
        return self.out(h.mean(1))


@pytest.mark.parametrize("one_hot", [True, False], ids=["one-hot", "gram-or-sums"])
@pytest.mark.parametrize("length", [9, 300])  # the Gram form and the per-id sums
def test_embedding_with_repeated_ids_and_padding(length, one_hot, monkeypatch):
    monkeypatch.setattr(layer_rules, "ONE_HOT_ROWS", 10**6 if one_hot else 0)
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (7, length))  # few ids: many repeats within an example
    ids[:, :2] = 0
    check(Tokens(padding_idx=0), ids, torch.randint(0, 10, (7,)), {"emb": "rule"})


def test_position_embedding_looked_up_without_a_batch_axis():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (7, 9))
    plan, _ = check(Tokens(positions=16), ids, torch.randint(0, 10, (7,)), {"emb": "rule", "pos": "rule"})
    assert next(p for p in plan.parts if p.module == "pos").dims[0] == (None,)  # recognised as unbatched


@pytest.mark.parametrize("norm,d_out", [
    (lambda: nn.LayerNorm(6), 6),
    (lambda: nn.LayerNorm(6, bias=False), 6),
    (lambda: nn.RMSNorm(6), 6),
], ids=["layernorm", "layernorm-nobias", "rmsnorm"])
def test_norms_on_sequences(norm, d_out):
    check(Seq(norm(), d_out), *vectors(), {"layer": "rule"})


@pytest.mark.parametrize("norm", [
    lambda: nn.GroupNorm(2, 4), lambda: nn.BatchNorm2d(4), lambda: nn.InstanceNorm2d(4, affine=True),
], ids=["groupnorm", "batchnorm", "instancenorm"])
def test_norms_on_images(norm):
    layer = norm()
    net = nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    x, y = images(size=8)
    net.train()(x.float())  # BatchNorm: non-trivial running statistics
    net(x.float() * 3 + 1)
    check(net, x, y, {"1": "rule"})


def test_batchnorm1d_on_vectors():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 10))
    x, y = vectors()
    net.train()(x.float())
    check(net, x, y, {"2": "rule"})


# ------------------------------------------------------------------ attention, bare parameters, the fallback
class Attend(nn.Module):
    def __init__(self, batch_first=True, cross=False, need_weights=False, masks=False, kdim=None, zero_attn=False,
                 bias_kv=False):
        super().__init__()
        self.inp = nn.Linear(4, 30)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, add_zero_attn=zero_attn,
                                          add_bias_kv=bias_kv)
        self.kv = nn.Linear(6, kdim or 6)
        self.batch_first, self.cross, self.need_weights, self.masks = batch_first, cross, need_weights, masks
        self.out = nn.Linear(6, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1)).reshape(len(x), 5, 6)
        kv = self.kv(h) if self.cross else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        extra = {}
        if self.masks:
            extra["key_padding_mask"] = torch.zeros(len(x), 5, dtype=torch.bool).index_fill_(1, torch.tensor([4]), True)
            extra["attn_mask"] = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        out, _ = self.attn(h, kv, kv, need_weights=self.need_weights, **extra)
        return self.out((out if self.batch_first else out.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("kw", [
    {}, {"batch_first": False}, {"cross": True}, {"need_weights": True}, {"masks": True},
    {"cross": True, "kdim": 4}, {"zero_attn": True, "masks": True}, {"bias_kv": True, "need_weights": True},
    {"bias_kv": True, "zero_attn": True, "masks": True},
], ids=["self", "seq-first", "cross", "weights", "masks", "kdim", "zero-attn", "bias-kv", "bias-kv-zero-attn"])
def test_multihead_attention_written_out(kw):
    check(Attend(**kw), *vectors(), {"attn": "decompose"})


class Gated(nn.Module):
    """A custom layer: two weights used through torch.nn.functional, multiplied: nothing in the rule table."""

    def __init__(self, d=6):
        super().__init__()
        self.w, self.g = nn.Parameter(torch.randn(d, d) / d**0.5), nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, h):
        return F.linear(h, self.w) * torch.sigmoid(F.linear(h, self.g))


def test_a_custom_layer_goes_to_the_fallback():
    check(Seq(Gated(), 6), *vectors(), {"layer": "fallback"})


class Bare(nn.Module):
    """Parameters used directly in forward, as a class token, position embeddings and a custom bias are."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 30)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 6, 6))
        self.shift = nn.Parameter(torch.randn(6))  # added to (B, T, 6): broadcast as (B, 1, 6)
        self.out = nn.Linear(6, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1)).reshape(len(x), 5, 6)
        h = torch.cat([self.cls.expand(len(x), -1, -1), h], 1) + self.pos + self.shift
        return self.out(h[:, 0] * h.mean(1))


def test_bare_parameters_are_broadcast_along_the_batch():
    plan, _ = check(Bare(), *vectors(), {"": "expand"})
    assert {p.params[0]: p.view for p in plan.parts if p.way.name == "expand"} == {"cls": 0, "pos": 0, "shift": 2}


class Functional(nn.Module):
    """A custom layer using its weight through torch.nn.functional, and a weight tied between two modules."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Parameter(torch.randn(6, 6))
        self.proj = nn.Linear(6, 11, bias=False)
        self.proj.weight = self.emb.weight  # tied: the same tensor in two modules

    def forward(self, ids):
        h = torch.tanh(F.linear(self.emb(ids), self.mix))
        return self.proj(h.mean(1))[:, :10]


def test_tied_and_functional_weights_go_to_the_fallback():
    torch.manual_seed(0)
    plan, _ = check(Functional(), torch.randint(0, 11, (7, 5)), torch.randint(0, 10, (7,)))
    tied = next(p for p in plan.parts if "emb.weight" in p.params)
    assert tied.way.name in ("fallback", "loop") and tied.module == ""  # both uses enclosed only by the network itself


class Branchy(nn.Module):
    """Python control flow on the data: vmap cannot run it, one example at a time can."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.out = nn.Linear(4, 10)

    def forward(self, x):
        return self.out(self.inner(x.flatten(1)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w if float(x.sum()) > -1e9 else x  # a data-dependent branch


def test_data_dependent_control_flow_is_handled_one_example_at_a_time():
    plan, _ = check(Branchy(), *vectors(), loop=True)
    assert {p.module: p.way.name for p in plan.parts}["inner"] == "loop"


# ------------------------------------------------------------------ whole models
def odd_conv_net():
    """Padding, dilation, stride and a non-square kernel: every index path of the conv formula."""
    return nn.Sequential(
        nn.Conv2d(1, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.Flatten(), nn.LazyLinear(10),
    )


@pytest.mark.parametrize("make", [reported_cnn, small_cnn, mlp, odd_conv_net, ResNet, ViT,
                                  lambda: ViT(stem="conv", pool="mean"), TextClassifier, lambda: TextClassifier(depth=2)],
                         ids=["cnn", "small_cnn", "mlp", "odd_conv", "resnet", "vit", "vit_stem", "text", "text_encoder"])
def test_whole_models_match_vmap_grad(make):
    torch.manual_seed(0)
    net = make()
    x, y = images()
    net(x.float())  # materialise lazy layers
    if isinstance(net, ResNet):  # running statistics that are not the identity
        net.train()(x.float() * 2)
    plan, stats = check(net, x, y)
    assert all(p.way.name in ("rule", "decompose", "expand") for p in plan.parts), plan.summary()  # no fallback needed
    logits = net(x).detach()
    torch.testing.assert_close(stats["loss"], F.cross_entropy(logits, y, reduction="none"))
    p = logits.softmax(1)
    torch.testing.assert_close(stats["el2n"], (p - F.one_hot(y, 10)).norm(dim=1))
    for n in range(len(y)):
        others = torch.cat([logits[n, : y[n]], logits[n, y[n] + 1:]])
        assert stats["margin"][n] == pytest.approx(float(logits[n, y[n]] - others.max()))
        assert stats["correct"][n] == float(logits[n].argmax() == y[n])


def test_integer_token_ids_stay_integers():
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (7, 12))
    check(TextClassifier(), ids, torch.randint(0, 10, (7,)), {"tokens": "rule", "positions": "rule"})


# ------------------------------------------------------------------ guards: each check fails when what it checks is wrong
GUARDED = {  # a network per way of the plan, and the module whose part is made wrong
    "Linear": (lambda: Seq(nn.Linear(6, 7), 7, positions=5), "layer"),
    "Conv2d": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 10)), "0"),
    "Embedding": (lambda: Tokens(), "emb"),
    "LayerNorm": (lambda: Seq(nn.LayerNorm(6), 6), "layer"),
    "GroupNorm": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 36, 10)), "1"),
    "BatchNorm2d": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 10)), "1"),
    "InstanceNorm2d": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Flatten(),
                                             nn.Linear(4 * 36, 10)), "1"),
    "RMSNorm": (lambda: Seq(nn.RMSNorm(6), 6), "layer"),
    "MultiheadAttention": (lambda: Attend(), "attn"),
    "expand": (lambda: Bare(), ""),
    "fallback": (lambda: Seq(Gated(), 6), "layer"),
}


def _inputs(name):
    torch.manual_seed(0)
    if name == "Embedding":
        return torch.randint(0, 11, (7, 9)), torch.randint(0, 10, (7,))
    if name in ("Conv2d", "GroupNorm", "BatchNorm2d", "InstanceNorm2d"):
        return images(size=8)
    return vectors()


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_the_comparison_fails_when_a_part_is_wrong(name, monkeypatch):
    """Guards every case above: with one part's norm made 0.1% too large, the comparison against vmap(grad)
    fails, and the plan's own proof refuses that part (it moves on to the next way)."""
    make, module = GUARDED[name]
    net = make().double().eval()
    x, y = _inputs(name)
    x = x.double() if x.is_floating_point() else x
    if name == "BatchNorm2d":
        net.train()(x * 2)
        net.eval()
    plan = make_plan(net, x, y)
    part = next(p for p in plan.parts if p.module == module)
    assert part.way.name == {"MultiheadAttention": "decompose", "expand": "expand", "fallback": "fallback"}.get(name, "rule")
    compare(net, x, y, plan)  # right as it is
    way = type(part.way)
    reduce = way.reduce

    def wrong(self, p, *args):
        dot, sq = reduce(self, p, *args)
        return (dot, sq * 1.001) if p == part else (dot, sq)

    monkeypatch.setattr(way, "reduce", wrong)
    with pytest.raises(AssertionError):
        compare(net, x, y, plan)
    assert part not in make_plan(net, x, y).parts  # the proof does not keep a wrong part


def test_examples_that_interact_are_refused_naming_the_layer():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.LazyLinear(10))
    x, y = images(size=8)
    net(x.float())
    with pytest.raises(UnsupportedModelError, match=r"layer '1' \(BatchNorm2d\) normalises with the batch's own statistics"):
        make_plan(net.eval(), x.float(), y)


def test_the_pass_wants_the_eval_mode_network():
    net = mlp()
    with pytest.raises(UnsupportedModelError, match="call net.eval"):
        per_example_stats(net, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), None)


class TorchTransformer(nn.Module):
    """torch's own nn.TransformerEncoder (two layers), sequence-first or batch-first, on tokens from a linear map."""

    def __init__(self, batch_first=True, norm_first=False):
        super().__init__()
        self.inp = nn.Linear(4, 30)
        layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=12, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.batch_first = batch_first
        self.out = nn.Linear(6, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1)).reshape(len(x), 5, 6)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.out((h if self.batch_first else h.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_torchs_own_transformer_encoder(batch_first, norm_first):
    plan, _ = check(TorchTransformer(batch_first, norm_first), *vectors())
    assert {p.way.name for p in plan.parts} <= {"rule", "decompose"}, plan.summary()
