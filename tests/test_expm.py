"""The stable curvature treatment: exp(−η H⁺) λ by Lanczos."""
import torch

from pmp_lightning.replay.costate import lanczos_expm


def _matrix(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.cat([torch.linspace(-0.5, 0, 5), torch.logspace(-3, 2, n - 5)]).double()  # a few negative directions
    return q @ torch.diag(eig) @ q.T, eig, q


def _vector(seed=1):
    return torch.randn(40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_full_krylov_space_gives_the_exact_matrix_function():
    a, eig, q = _matrix()
    v = _vector()
    eta = 0.7
    exact = q @ (torch.exp(-eta * eig.clamp(min=0)) * (q.T @ v))
    got = lanczos_expm(lambda u: a @ u, v, eta, steps=40)
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-10)


def test_never_grows_even_where_one_gradient_step_explodes():
    a, eig, q = _matrix()
    v = _vector() + 3 * q[:, -1]  # a sizeable share along the top eigenvector (eigenvalue 100)
    eta = 6.0  # eta * lambda_max = 600: the coarse step (I - eta H) multiplies some directions by ~600
    assert (v - eta * (a @ v)).norm() > 100 * v.norm()
    for steps in (3, 8, 20):
        assert lanczos_expm(lambda u: a @ u, v, eta, steps).norm() <= v.norm() * (1 + 1e-12)


def test_small_step_agrees_with_the_gradient_step_to_second_order():
    a, _, _ = _matrix()
    a = a @ a  # positive semi-definite: no clamping
    v = _vector()
    eta = 1e-7  # eta * ||H|| = 1e-3
    got = lanczos_expm(lambda u: a @ u, v, eta, steps=40)
    step = v - eta * (a @ v)
    assert (got - step).norm() < 10 * (eta * a.norm(2)) ** 2 * v.norm()
