"""The exact adjoint of PyTorch's Adam and AdamW through the whole state (θ, m, v), bias correction, ε and weight
decay included, checked against autograd through the unrolled training; beside it, the frozen-P recursion the replay
runs today (docs/design-notes.md, "PMP through Adam, exactly"). float64, full batch, a step per snapshot, a small
nonlinear regression, and a parameter that receives its first gradient at step 5 (as a rare token's row does).

    python docs/explorations/adam_adjoint.py

Backward over step k (state t -> t+1), with λ', a', b' the costates of θ_{t+1}, m_{t+1}, v_{t+1} (a_T = b_T = 0):
    ū = −η λ',  m̄ = a' + ū c1/D,  v̄ = b' + ū ∂u/∂v' (0 where v' = 0),  ḡ = (1−β1) m̄ + 2(1−β2) g ⊙ v̄
    a_t = β1 m̄,  b_t = β2 v̄,  λ_t = a_t ∇J(θ_t) + (1 − η w_d) λ' + (H + w_c I) ḡ
    ∂J/∂γ_n = Σ_t ⟨ḡ_t, ∇l_n(θ_t)⟩ / N      (so ψ_{t+1} = −ḡ_t / η_t in the replay's c_{t,n} = η_t ⟨ψ_{t+1}, ∇l_n⟩)
with u = c1 m'/D, D = √(c2 v') + ε, c1 = 1/(1−β1^k), c2 = 1/(1−β2^k), and g recovered as (m' − β1 m)/(1 − β1).
One Hessian-vector product per step, as today; the statistics pass is unchanged."""
import torch, math
torch.manual_seed(0)
D, N, T = 7, 12, 8
X = torch.randn(N, D, dtype=torch.float64); Y = torch.randn(N, dtype=torch.float64)
Xd = torch.randn(5, D, dtype=torch.float64); Yd = torch.randn(5, dtype=torch.float64)
def per_loss(th, x, y): return (torch.tanh(x @ th[:D]) * th[D:2*D].sum() + x @ th[2*D:] - y) ** 2  # nonlinear
P = 3 * D
def J(th): return per_loss(th, Xd, Yd).mean()
lr, b1, b2, eps = [0.05 * (0.7 ** (k // 3)) for k in range(T)], 0.9, 0.99, 1e-8
def run(kind, wd, gamma, late=True):
    th = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    m = torch.zeros(P, dtype=torch.float64); v = torch.zeros(P, dtype=torch.float64)
    traj = [(th, m, v)]; Jt = []
    for k in range(1, T + 1):
        mask = torch.ones(P, dtype=torch.float64)
        if late and k < 5: mask[2*D + 1] = 0  # a parameter that first receives gradient late in training
        L = (gamma * per_loss(th, X, Y)).mean()
        g = torch.autograd.grad(L, th, create_graph=True)[0] * mask
        if kind == "Adam": g = g + wd * th
        eta = lr[k - 1]
        if kind == "AdamW": th = th * (1 - eta * wd)
        m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g
        mh = m / (1 - b1 ** k); vh = v / (1 - b2 ** k)
        th = th - eta * mh / ((vh + 1e-300).sqrt() + eps)  # the 1e-300: a finite derivative at v = 0 (the late row)
        traj.append((th, m, v)); Jt.append(J(th))
    return traj, Jt, mask
for kind, wd in (("Adam", 0.1), ("AdamW", 0.1)):
    gamma = torch.ones(N, dtype=torch.float64, requires_grad=True)
    traj, Jt, _ = run(kind, wd, gamma)
    ref = torch.autograd.grad(sum(Jt), gamma)[0]  # area horizon, J at θ_1..θ_T
    # adjoint, with detached states
    S = [(a.detach(), b.detach(), c.detach()) for a, b, c in traj]
    thT = S[T][0].clone().requires_grad_(True)
    lam = torch.autograd.grad(J(thT), thT)[0]  # λ_T = ∇J(θ_T); the costates of m and v start at 0
    am = torch.zeros(P, dtype=torch.float64); bv = torch.zeros(P, dtype=torch.float64)
    score = torch.zeros(N, dtype=torch.float64)
    for t in reversed(range(T)):  # step k = t+1 from state t to t+1
        k = t + 1; eta = lr[t]
        th, m, v = S[t]; m1, v1 = S[t + 1][1], S[t + 1][2]
        g = (m1 - b1 * m) / (1 - b1)            # the gradient step k used, recovered from the moments
        c1, c2 = 1 / (1 - b1 ** k), 1 / (1 - b2 ** k)
        root = (c2 * v1).sqrt(); Dn = root + eps
        ubar = -eta * lam
        mbar = am + ubar * c1 / Dn
        dudv = torch.where(v1 > 0, -c1 * m1 * c2 / (2 * Dn ** 2 * root.clamp_min(1e-300)), torch.zeros_like(v1))
        vbar = bv + ubar * dudv
        gbar = (1 - b1) * mbar + 2 * (1 - b2) * g * vbar
        mask = torch.ones(P, dtype=torch.float64)
        if k < 5: mask[2*D + 1] = 0
        gbar_eff = gbar * mask                   # g = mask ⊙ ∇L: the mask is part of the dynamics here
        # score: dJ/dγ_n = ⟨ḡ, ∇l_n(θ_t)⟩ / N
        thg = th.clone().requires_grad_(True)
        per = per_loss(thg, X, Y)
        grads = torch.stack([torch.autograd.grad(per[n], thg, retain_graph=True)[0] for n in range(N)])
        score += grads @ gbar_eff / N
        # λ_t = ∇J(θ_t)·[t ≥ 1] + (1 − η w_d) λ' + H̃ ḡ
        thg = th.clone().requires_grad_(True)
        L = per_loss(thg, X, Y).mean()
        gr = torch.autograd.grad(L, thg, create_graph=True)[0]
        Hg = torch.autograd.grad(gr @ gbar_eff, thg)[0]
        if kind == "Adam": Hg = Hg + wd * gbar
        new = (1 - eta * wd if kind == "AdamW" else 1.0) * lam + Hg
        if t >= 1:
            thj = th.clone().requires_grad_(True); new = new + torch.autograd.grad(J(thj), thj)[0]
        lam, am, bv = new, b1 * mbar, b2 * vbar
    rel = (score - ref).abs().max() / ref.abs().max()
    print(kind, "max rel error", float(rel), "ref scale", float(ref.abs().max()))
    # the frozen-P replay the project runs today: P_t = 1/(√v̂_{t+1}+ε), ψ = Pλ', λ_t = ∇J + λ' − η(H̃Pλ' + w_d λ')
    thT = S[T][0].clone().requires_grad_(True); lam = torch.autograd.grad(J(thT), thT)[0]
    frozen = torch.zeros(N, dtype=torch.float64)
    for t in reversed(range(T)):
        k = t + 1; eta = lr[t]; th = S[t][0]; v1 = S[t + 1][2]
        Pt = 1 / ((v1 / (1 - b2 ** k)).sqrt() + eps)
        psi = Pt * lam
        thg = th.clone().requires_grad_(True); per = per_loss(thg, X, Y)
        grads = torch.stack([torch.autograd.grad(per[n], thg, retain_graph=True)[0] for n in range(N)])
        mask = torch.ones(P, dtype=torch.float64)
        if k < 5: mask[2*D + 1] = 0
        frozen += -eta * (grads * mask) @ psi / N
        thg = th.clone().requires_grad_(True); gr = torch.autograd.grad(per_loss(thg, X, Y).mean(), thg, create_graph=True)[0]
        Hp = torch.autograd.grad(gr @ (mask * psi), thg)[0]
        if kind == "Adam": Hp = Hp + wd * psi
        new = lam - eta * (Hp + (wd * lam if kind == "AdamW" else 0))
        if t >= 1:
            thj = th.clone().requires_grad_(True); new = new + torch.autograd.grad(J(thj), thj)[0]
        lam = new
    print(kind, "frozen P: max rel error", float((frozen - ref).abs().max() / ref.abs().max()))
