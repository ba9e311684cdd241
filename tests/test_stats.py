"""The one-pass statistics equal those from explicit per-example gradients (torch.func.vmap(grad))."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from pmp_lightning.models import mlp, reported_cnn, small_cnn
from pmp_lightning.stats import UnsupportedLayerError, per_example_stats


def odd_conv_net():
    """Padding, dilation, stride and a non-square kernel: every index path of the conv formula."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, padding=1, bias=False), torch.nn.Flatten(), torch.nn.LazyLinear(10),
    )


@pytest.mark.parametrize("make", [reported_cnn, small_cnn, mlp, odd_conv_net])
def test_dots_and_norms_match_vmap_grad(make):
    torch.manual_seed(0)
    net = make().double().eval()
    net(torch.zeros(1, 1, 28, 28, dtype=torch.float64))  # materialise lazy layers
    x, y = torch.randn(12, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (12,))
    params = {k: p.detach() for k, p in net.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    dot = sum((g[k] * v[k]).flatten(1).sum(1) for k in g)
    norm = sum(g[k].pow(2).flatten(1).sum(1) for k in g).sqrt()
    stats = per_example_stats(net, x, y, v)
    torch.testing.assert_close(stats["dot"], dot, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["grad_norm"], norm, rtol=1e-10, atol=1e-12)

    logits = net(x).detach()
    torch.testing.assert_close(stats["loss"], F.cross_entropy(logits, y, reduction="none"))
    p = logits.softmax(1)
    torch.testing.assert_close(stats["el2n"], (p - F.one_hot(y, 10)).norm(dim=1))
    for n in range(len(y)):
        others = torch.cat([logits[n, : y[n]], logits[n, y[n] + 1 :]])
        assert stats["margin"][n] == pytest.approx(float(logits[n, y[n]] - others.max()))
        assert stats["correct"][n] == float(logits[n].argmax() == y[n])


def test_layers_without_an_exact_formula_are_refused():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10))
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        per_example_stats(net, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), {})
