"""Advantage estimators and policy losses against slow loop references; accumulation invariance."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.core import aggregate_loss, compute_advantages, ppo_clip_loss
from flowrl.core.losses import reinforce_loss


def _loop_grpo(r, g, eps, global_std=False, no_std=False):
    out = []
    all_std = math.sqrt(sum((x - sum(r) / len(r)) ** 2 for x in r) / len(r))
    for i, ri in enumerate(r):
        grp = [r[j] for j in range(len(r)) if g[j] == g[i]]
        mu = sum(grp) / len(grp)
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / len(grp))
        if no_std:
            out.append(ri - mu)
        else:
            out.append((ri - mu) / ((all_std if global_std else sd) + eps))
    return out


@pytest.mark.parametrize("name,kw", [("grpo", {}), ("global_std", {"global_std": True}), ("dr_grpo", {"no_std": True})])
def test_advantages_match_loop(name, kw):
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(24, generator=gen)
    g = torch.tensor([i // 4 for i in range(24)])[torch.randperm(24, generator=gen)]
    got = compute_advantages(r, g, name, eps=1e-4, clip=None)
    ref = torch.tensor(_loop_grpo(r.tolist(), g.tolist(), 1e-4, **kw))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_advantage_clip_constant_groups_and_errors():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    a = compute_advantages(r, g, "grpo", clip=0.5)
    assert a[0] == 0 and a[1] == 0 and a[4] == 0 and a[5] == 0  # identical rewards carry no signal
    assert a[2] == -0.5 and a[3] == 0.5
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(KeyError, match="choose from"):
        compute_advantages(r, g, "nope")


def test_ppo_clip_matches_loop_and_clip_fraction():
    gen = torch.Generator().manual_seed(1)
    lp_old = torch.randn(5, 3, generator=gen)
    lp = lp_old + 0.3 * torch.randn(5, 3, generator=gen)
    adv = torch.randn(5, generator=gen)
    mask = torch.rand(5, 3, generator=gen) > 0.3
    out = ppo_clip_loss(lp, lp_old, adv, mask, 0.1, 0.2)
    for i in range(5):
        for t in range(3):
            rho = math.exp(lp[i, t] - lp_old[i, t])
            ref = max(-adv[i] * rho, -adv[i] * min(max(rho, 0.9), 1.2)) if mask[i, t] else 0.0
            assert out.loss[i, t].item() == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
            clipped = mask[i, t] and (-adv[i] * min(max(rho, 0.9), 1.2) > -adv[i] * rho)
            assert bool(out.clipped[i, t]) == bool(clipped)


def test_on_policy_gradient_is_the_policy_gradient():
    lp = torch.randn(4, 2, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = torch.ones(4, 2, dtype=torch.bool)
    aggregate_loss(ppo_clip_loss(lp, lp.detach(), adv, mask, 1e-4).loss, mask).backward()
    torch.testing.assert_close(lp.grad, -adv[:, None].expand(4, 2) / 8)
    lp2 = lp.detach().clone().requires_grad_(True)
    aggregate_loss(reinforce_loss(lp2, lp2.detach(), adv, mask).loss, mask).backward()
    torch.testing.assert_close(lp2.grad, lp.grad)


def test_accumulation_with_global_normaliser_equals_full_batch():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, requires_grad=True)
    feats = torch.randn(8, 4, 3, generator=gen)
    lp_old = (feats @ w).detach()
    adv = torch.randn(8, generator=gen)
    mask = torch.rand(8, 4, generator=gen) > 0.4

    def loss_of(idx, norm):
        lp = feats[idx] @ w
        return aggregate_loss(ppo_clip_loss(lp, lp_old[idx], adv[idx], mask[idx], 0.2).loss, mask[idx], normaliser=norm)

    loss_of(torch.arange(8), None).backward()
    full = w.grad.clone()
    w.grad = None
    total = mask.sum().item()
    for idx in (torch.arange(0, 3), torch.arange(3, 8)):  # uneven micro-batches
        loss_of(idx, total).backward()
    torch.testing.assert_close(w.grad, full)
    # a per-micro-batch normaliser (the classic bug) gives a different update
    w.grad = None
    for idx in (torch.arange(0, 3), torch.arange(3, 8)):
        (loss_of(idx, None) / 2).backward()
    assert not torch.allclose(w.grad, full)


def test_seq_mean_step_mean_and_errors():
    loss = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert aggregate_loss(loss, mask, "seq_mean_step_mean").item() == pytest.approx((2.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "nope")


def test_dynamic_sampling_selection_matches_loop():
    from flowrl.core import informative_groups, select_groups

    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 5, 5, 5, 3, 3, 3])
    r = torch.tensor([1., 1, 1, 0, 1, 0, .5, .5, .5, 0, 0, .25, .3, .3, .3])
    keep = informative_groups(r, g)
    ref = torch.tensor([len(set(r[g == gi].tolist())) > 1 for gi in g.tolist()])
    assert torch.equal(keep, ref) and keep.tolist().count(True) == 6
    assert torch.equal(informative_groups(r, g, tol=0.2), torch.tensor([False] * 3 + [True] * 3 + [False] * 9))
    one = select_groups(keep, g, 1)
    assert set(g[one].tolist()) == {1}  # the first informative group in order of appearance
    assert torch.equal(select_groups(keep, g, None), keep) and torch.equal(select_groups(keep, g, 9), keep)
    with pytest.raises(ValueError, match="must both be"):
        informative_groups(r, g[:-1])


# ---------------------------------------------------------------------------------------------------------------------
# Advantage estimators: RLOO, REINFORCE++, REINFORCE++-baseline; CPPO pruning
# ---------------------------------------------------------------------------------------------------------------------

def _pop_std(xs):
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


def _loop_new_adv(name, r, g, eps):
    out = []
    if name == "rloo":
        for i, ri in enumerate(r):
            others = [r[j] for j in range(len(r)) if j != i and g[j] == g[i]]
            out.append(ri - sum(others) / len(others) if others else 0.0)
    elif name == "reinforce_pp":
        mu, sd = sum(r) / len(r), _pop_std(r)
        out = [(ri - mu) / (sd + eps) for ri in r]
    else:  # reinforce_pp_baseline
        c = []
        for i, ri in enumerate(r):
            grp = [r[j] for j in range(len(r)) if g[j] == g[i]]
            c.append(ri - sum(grp) / len(grp))
        mu, sd = sum(c) / len(c), _pop_std(c)
        out = [(ci - mu) / (sd + eps) for ci in c]
    return out


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("seed", [3, 4])
def test_new_advantages_match_loop(name, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [4, 3, 1, 5, 2]  # uneven groups, one singleton
    g = torch.tensor([k for k, s in enumerate(sizes) for _ in range(s)])[torch.randperm(sum(sizes), generator=gen)]
    r = 3 * torch.randn(len(g), generator=gen)
    got = compute_advantages(r, g, name, eps=1e-4, clip=None)
    ref = torch.tensor(_loop_new_adv(name, r.double().tolist(), g.tolist(), 1e-4), dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == r.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rloo_singleton_and_constant_groups_get_zero():
    from flowrl.core.advantages import rloo_advantages

    r = torch.tensor([5.0, 1.0, 1.0, 0.0, 2.0])
    g = torch.tensor([7, 1, 1, 2, 2])
    a = rloo_advantages(r, g, 1e-4)
    assert a[0] == 0 and a[1] == 0 and a[2] == 0
    assert a[3].item() == pytest.approx(-2.0) and a[4].item() == pytest.approx(2.0)


def test_unknown_estimator_lists_new_names():
    with pytest.raises(KeyError, match="reinforce_pp_baseline"):
        compute_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), "rloo2")


def _loop_cppo(a, g, p):
    keep = [False] * len(a)
    for gid in dict.fromkeys(g):
        idx = [i for i in range(len(a)) if g[i] == gid]
        k = math.ceil(round((1 - p) * len(idx), 9))
        for i in sorted(idx, key=lambda i: (-abs(a[i]), i))[:k]:
            keep[i] = True
    return keep


def test_cppo_hand_made_cases():
    from flowrl.core import cppo_keep_mask

    # group 0 (positions 0,2,4,6): |A| = .5, 2, .1, 1 -> keep ceil(.5*4)=2 largest: positions 2 and 6
    # group 1 (positions 1,3,5): |A| = 1, 1, 1 (ties) -> keep ceil(1.5)=2, the earliest: positions 1 and 3
    # group 9 (position 7): singleton, always kept
    a = torch.tensor([0.5, 1.0, -2.0, -1.0, 0.1, 1.0, 1.0, -0.3])
    g = torch.tensor([0, 1, 0, 1, 0, 1, 0, 9])
    keep = cppo_keep_mask(a, g, 0.5)
    assert keep.tolist() == [False, True, True, True, False, False, True, True]
    assert cppo_keep_mask(a, g, 0.0).all()
    # P = 0.75: each group keeps ceil(0.25 G): 1, 1, 1
    assert cppo_keep_mask(a, g, 0.75).tolist() == [False, True, True, False, False, False, False, True]
    # floating-point trap: (1 - 0.7) * 10 = 3.0000000000000004 must keep 3, not 4
    a10 = torch.arange(10, dtype=torch.float32)
    kept = cppo_keep_mask(a10, torch.zeros(10, dtype=torch.long), 0.7)
    assert kept.sum() == 3 and kept[7:].all()


def test_cppo_matches_loop_and_errors():
    from flowrl.core import cppo_keep_mask

    gen = torch.Generator().manual_seed(5)
    g = torch.randint(0, 5, (40,), generator=gen)
    a = torch.round(torch.randn(40, generator=gen) * 2) / 2  # coarse values -> many ties
    for p in (0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99):
        ref = _loop_cppo(a.tolist(), g.tolist(), p)
        assert cppo_keep_mask(a, g, p).tolist() == ref
    with pytest.raises(ValueError, match="prune_rate"):
        cppo_keep_mask(a, g, 1.0)
    with pytest.raises(ValueError, match="prune_rate"):
        cppo_keep_mask(a, g, -0.1)
    with pytest.raises(ValueError, match="must both be"):
        cppo_keep_mask(a, g[:-1], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        cppo_keep_mask(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]), 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Policy losses: dual-clip, GSPO, GMPO, GRPO-Guard against scalar loops (values and autograd gradients)
# ---------------------------------------------------------------------------------------------------------------------

def _rand_batch(seed, b=6, t=5, spread=1.0, adv_2d=False):
    gen = torch.Generator().manual_seed(seed)
    lp_old = torch.randn(b, t, generator=gen, dtype=torch.float64)
    lp = (lp_old + spread * torch.randn(b, t, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(b, t, generator=gen, dtype=torch.float64) if adv_2d else torch.randn(b, generator=gen,
                                                                                            dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[:, 0] = True  # every row has at least one step
    return lp, lp_old, adv, mask


def _adv_at(adv, i, t):
    return float(adv[i, t]) if adv.ndim == 2 else float(adv[i])


@pytest.mark.parametrize("adv_2d", [False, True])
def test_dual_clip_matches_loop(adv_2d):
    from flowrl.core import dual_clip_loss

    lp, lp_old, adv, mask = _rand_batch(10, b=8, t=6, spread=1.0, adv_2d=adv_2d)
    lo, hi, c = 0.2, 0.28, 3.0
    out = dual_clip_loss(lp, lp_old, adv, mask, lo, hi, dual_clip_c=c)
    total, n_dual, n_ppo = 0.0, 0, 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                assert out.loss[i, t].item() == 0.0 and not out.clipped[i, t]
                continue
            a = _adv_at(adv, i, t)
            rho = torch.exp(lp[i, t] - lp_old[i, t])
            unc, clp = -a * rho, -a * torch.clamp(rho, 1 - lo, 1 + hi)
            ref = torch.maximum(unc, clp)
            is_dual = a < 0 and ref.item() > -c * a
            if is_dual:
                ref = torch.minimum(ref, torch.tensor(-c * a, dtype=ref.dtype))
            n_dual += is_dual
            n_ppo += clp.item() > unc.item()
            assert out.loss[i, t].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
            assert bool(out.extra["dual_clipped"][i, t]) == is_dual
            assert bool(out.clipped[i, t]) == (is_dual or clp.item() > unc.item())
            total = total + ref
    assert n_dual > 0 and n_ppo > 0  # both mechanisms exercised by this data
    (g_ref,) = torch.autograd.grad(total, lp)
    (g_got,) = torch.autograd.grad(out.loss.sum(), lp)
    torch.testing.assert_close(g_got, g_ref)


def test_dual_clip_equals_ppo_clip_for_positive_advantages_and_errors():
    from flowrl.core import dual_clip_loss

    lp, lp_old, adv, mask = _rand_batch(11)
    adv = adv.abs()
    a = dual_clip_loss(lp, lp_old, adv, mask, 0.2)
    b = ppo_clip_loss(lp, lp_old, adv, mask, 0.2)
    torch.testing.assert_close(a.loss, b.loss)
    assert not a.extra["dual_clipped"].any()
    with pytest.raises(ValueError, match="dual_clip_c"):
        dual_clip_loss(lp, lp_old, adv, mask, 0.2, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        dual_clip_loss(lp, lp_old, adv, mask, -0.2)
    with pytest.raises(ValueError, match="same"):
        dual_clip_loss(lp, lp_old[:, :-1], adv, mask, 0.2)
    with pytest.raises(ValueError, match="advantages"):
        dual_clip_loss(lp, lp_old, adv[:-1], mask, 0.2)


def _loop_gspo(lp, lp_old, adv, mask, lo, hi):
    """Sequence-level GSPO: (1/B) Σ_i max(-A_i s_i, -A_i clip(s_i)); also returns the per-row values."""
    total, rows, clipped = 0.0, [], []
    for i in range(lp.shape[0]):
        steps = [t for t in range(lp.shape[1]) if mask[i, t]]
        s = torch.exp(sum(lp[i, t] - lp_old[i, t] for t in steps) / len(steps))
        a = float(adv[i])
        unc, clp = -a * s, -a * torch.clamp(s, 1 - lo, 1 + hi)
        li = torch.maximum(unc, clp)
        rows.append(li.item())
        clipped.append(clp.item() > unc.item())
        total = total + li / lp.shape[0]
    return total, rows, clipped


def test_gspo_matches_sequence_level_loop():
    from flowrl.core import gspo_loss

    lp, lp_old, adv, mask = _rand_batch(12, b=16, t=7, spread=0.1)
    lo, hi = 0.01, 0.012
    out = gspo_loss(lp, lp_old, adv, mask, lo, hi)
    total, rows, clipped = _loop_gspo(lp, lp_old, adv, mask, lo, hi)
    assert 0 < sum(clipped) < len(clipped)  # both clipped and unclipped sequences present
    for i, li in enumerate(rows):
        for t in range(lp.shape[1]):
            assert out.loss[i, t].item() == pytest.approx(li if mask[i, t] else 0.0, rel=1e-9, abs=1e-12)
            assert bool(out.clipped[i, t]) == (clipped[i] and bool(mask[i, t]))
    agg = aggregate_loss(out.loss, mask, "seq_mean_step_mean")
    assert agg.item() == pytest.approx(total.item(), rel=1e-9)
    (g_ref,) = torch.autograd.grad(total, lp)
    (g_got,) = torch.autograd.grad(agg, lp)
    torch.testing.assert_close(g_got, g_ref)
    # gradient reaches every masked step of every unclipped sequence, and nothing off the mask
    for i in range(lp.shape[0]):
        if not clipped[i] and adv[i] != 0:
            assert (g_got[i][mask[i]] != 0).all()
    assert (g_got[~mask] == 0).all()


def test_gspo_token_form_with_step_advantages():
    from flowrl.core import gspo_loss

    lp, lp_old, adv, mask = _rand_batch(13, b=6, t=5, spread=0.05)
    # constant rows of a [B, T] advantage reproduce the [B] result exactly (value and gradient)
    a1 = gspo_loss(lp, lp_old, adv, mask, 0.01)
    a2 = gspo_loss(lp, lp_old, adv[:, None].expand(6, 5).clone(), mask, 0.01)
    torch.testing.assert_close(a1.loss, a2.loss)
    g1 = torch.autograd.grad(aggregate_loss(a1.loss, mask, "seq_mean_step_mean"), lp)[0]
    g2 = torch.autograd.grad(aggregate_loss(a2.loss, mask, "seq_mean_step_mean"), lp)[0]
    torch.testing.assert_close(g1, g2)
    # per-step advantages: GSPO-token, ℓ_it = max(-A_it s_it, -A_it clip(s_it)) with s_it = sg(s_i)·π_t/sg(π_t)
    adv2 = torch.randn(6, 5, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    out = gspo_loss(lp, lp_old, adv2, mask, 0.01, 0.02)
    total = 0.0
    for i in range(6):
        steps = [t for t in range(5) if mask[i, t]]
        s_i = torch.exp(sum(lp[i, t] - lp_old[i, t] for t in steps) / len(steps)).detach()
        for t in steps:
            s_it = s_i * torch.exp(lp[i, t] - lp[i, t].detach())
            a = float(adv2[i, t])
            li = torch.maximum(-a * s_it, -a * torch.clamp(s_it, 0.99, 1.02))
            assert out.loss[i, t].item() == pytest.approx(li.item(), rel=1e-9, abs=1e-12)
            total = total + li
    torch.testing.assert_close(torch.autograd.grad(out.loss.sum(), lp)[0], torch.autograd.grad(total, lp)[0])


def _loop_gmpo(lp, lp_old, adv, mask, lo, hi):
    total, n_clipped = 0.0, 0
    for i in range(lp.shape[0]):
        a = float(adv[i])
        sgn = (a > 0) - (a < 0)
        cs = []
        for t in range(lp.shape[1]):
            if mask[i, t]:
                x = lp[i, t] - lp_old[i, t]
                xc = torch.clamp(x, -lo, hi)
                cs.append(sgn * torch.minimum(sgn * x, sgn * xc))
                n_clipped += (sgn * xc).item() < (sgn * x).item()
        total = total + (-a * torch.exp(sum(cs) / len(cs))) / lp.shape[0]
    return total, n_clipped


def test_gmpo_matches_loop():
    from flowrl.core import gmpo_loss

    lp, lp_old, adv, mask = _rand_batch(15, b=10, t=6, spread=0.5)
    out = gmpo_loss(lp, lp_old, adv, mask, 0.4, 0.3)
    total, n_clipped = _loop_gmpo(lp, lp_old, adv, mask, 0.4, 0.3)
    assert 0 < n_clipped == int(out.clipped.sum()) < int(mask.sum())
    agg = aggregate_loss(out.loss, mask, "seq_mean_step_mean")
    assert agg.item() == pytest.approx(total.item(), rel=1e-9)
    torch.testing.assert_close(torch.autograd.grad(agg, lp, retain_graph=True)[0], torch.autograd.grad(total, lp)[0])
    # the per-step value is the sequence loss on every masked step; clipped steps get no gradient
    seq = out.extra["seq_ratio"][:, 0]
    torch.testing.assert_close(out.loss, torch.where(mask, (-adv * seq)[:, None].expand(10, 6), torch.zeros(())))
    g = torch.autograd.grad(out.loss.sum(), lp)[0]
    assert (g[out.clipped] == 0).all() and (g[mask & ~out.clipped] != 0).all()
    # constant [B, T] advantages reduce to the same thing
    out2 = gmpo_loss(lp, lp_old, adv[:, None].expand(10, 6).clone(), mask, 0.4, 0.3)
    torch.testing.assert_close(out2.loss, out.loss)


def _guard_inputs(seed, b=6, t=5):
    gen = torch.Generator().manual_seed(seed)
    msd = (0.02 * torch.rand(b, t, generator=gen, dtype=torch.float64)).requires_grad_(True)
    std_t = 0.5 + torch.rand(b, t, generator=gen, dtype=torch.float64)
    dt = -(0.02 + 0.1 * torch.rand(b, t, generator=gen, dtype=torch.float64))
    return msd, std_t, dt


def test_grpo_guard_matches_loop():
    from flowrl.core import grpo_guard_loss

    lp, lp_old, adv, mask = _rand_batch(16, b=8, t=5, spread=1.0)
    msd, std_t, dt = _guard_inputs(17, 8, 5)
    lo, hi = 0.05, 0.08
    out = grpo_guard_loss(lp, lp_old, adv, mask, lo, hi, mean_sq_diff=msd, std_t=std_t, dt=dt)
    total, n_clip = 0.0, 0
    for i in range(8):
        for t in range(5):
            if not mask[i, t]:
                assert out.loss[i, t].item() == 0.0
                continue
            s = std_t[i, t].item() * math.sqrt(-dt[i, t].item())
            rho = torch.exp((lp[i, t] - lp_old[i, t] + msd[i, t] / (2 * s * s)) * s)
            a = float(adv[i])
            unc, clp = -a * rho, -a * torch.clamp(rho, 1 - lo, 1 + hi)
            li = torch.maximum(unc, clp) / (-dt[i, t].item())
            n_clip += clp.item() > unc.item()
            assert bool(out.clipped[i, t]) == (clp.item() > unc.item())
            assert out.loss[i, t].item() == pytest.approx(li.item(), rel=1e-9, abs=1e-12)
            total = total + li
    assert 0 < n_clip < int(mask.sum())
    g_got = torch.autograd.grad(out.loss.sum(), (lp, msd))
    g_ref = torch.autograd.grad(total, (lp, msd))
    torch.testing.assert_close(g_got[0], g_ref[0])
    torch.testing.assert_close(g_got[1], g_ref[1])


def test_grpo_guard_ratio_is_recentred_for_gaussian_steps():
    """For a dimension-averaged Gaussian log-prob, (logp - logp_old + b)·s = mean_dims(ε·(μ_θ - μ_old)) exactly,
    where x = μ_old + s·ε: the guard log-ratio is centred at 0, the raw one at -b."""
    from flowrl.core import grpo_guard_loss
    from flowrl.flow.sde import gaussian_log_prob

    gen = torch.Generator().manual_seed(18)
    b, d = 64, 32
    std_t, dt = 0.7, -0.05
    s = std_t * math.sqrt(-dt)
    mu_old = torch.randn(b, d, generator=gen, dtype=torch.float64)
    delta = 0.3 * s * torch.randn(b, d, generator=gen, dtype=torch.float64)
    eps = torch.randn(b, d, generator=gen, dtype=torch.float64)
    x = mu_old + s * eps
    std = torch.full((b,), s, dtype=torch.float64)
    lp = gaussian_log_prob(x, mu_old + delta, std)[:, None]
    lp_old = gaussian_log_prob(x, mu_old, std)[:, None]
    msd = (delta**2).mean(1, keepdim=True)
    out = grpo_guard_loss(lp, lp_old, torch.ones(b), torch.ones(b, 1, dtype=torch.bool), 0.2,
                          mean_sq_diff=msd, std_t=std_t, dt=dt)
    centred = (eps * delta).mean(1, keepdim=True)  # ~1e-2; the log-probs cancel to ~1e-10 in float64
    torch.testing.assert_close(out.ratio.log(), centred, rtol=0, atol=1e-8)
    torch.testing.assert_close(out.extra["raw_ratio"].log(), centred / s - out.extra["bias"], rtol=0, atol=1e-7)
    assert out.extra["bias"].min() > 0 and centred.abs().max() > 1e-3


def test_grpo_guard_errors():
    from flowrl.core import POLICY_LOSSES, grpo_guard_loss

    lp, lp_old, adv, mask = _rand_batch(19)
    msd, std_t, dt = _guard_inputs(20)
    with pytest.raises(TypeError, match="mean_sq_diff"):
        POLICY_LOSSES["grpo_guard"](lp, lp_old, adv, mask, 0.1, 0.1)  # the plain PPO call signature
    with pytest.raises(TypeError, match="dt"):
        grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=msd, std_t=std_t)
    with pytest.raises(ValueError, match="dt must be"):
        grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=msd, std_t=std_t, dt=-dt)
    with pytest.raises(ValueError, match="std_t must be"):
        grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=msd, std_t=0.0, dt=dt)
    with pytest.raises(ValueError, match="mean_sq_diff must be"):
        grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=-msd.detach() - 1, std_t=std_t, dt=dt)
    with pytest.raises(ValueError, match="broadcast"):
        grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=msd, std_t=std_t[:, :2], dt=dt)
    # off-mask steps may be ODE steps (std 0, dt 0): ignored
    std0, dt0 = std_t.clone(), dt.clone()
    std0[~mask], dt0[~mask] = 0.0, 0.0
    a = grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=msd, std_t=std0, dt=dt0)
    b = grpo_guard_loss(lp, lp_old, adv, mask, 0.1, mean_sq_diff=msd, std_t=std_t, dt=dt)
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.isfinite(torch.autograd.grad(a.loss.sum(), lp)[0]).all()


@pytest.mark.parametrize("name", ["ppo_clip", "dual_clip", "gspo", "gmpo", "grpo_guard"])
@pytest.mark.parametrize("mode", ["step_mean", "seq_mean_step_mean", "seq_mean_step_sum"])
def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient(name, mode):
    """On-policy (logp == logp_old) every PPO-family loss has ratio exactly 1 and the gradient of plain REINFORCE
    -A·∇logp under the same aggregation (GRPO-Guard: times its per-step weight s/(-Δ))."""
    from flowrl.core import POLICY_LOSSES

    gen = torch.Generator().manual_seed(21)
    lp = torch.randn(5, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    adv = torch.randn(5, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 6, generator=gen) > 0.3
    mask[:, 0] = True
    kw, weight = {}, torch.ones(5, 6, dtype=torch.float64)
    if name == "grpo_guard":
        _, std_t, dt = _guard_inputs(22, 5, 6)
        kw = {"mean_sq_diff": torch.zeros(5, 6, dtype=torch.float64, requires_grad=True), "std_t": std_t, "dt": dt}
        weight = std_t * torch.sqrt(-dt) / (-dt)
    out = POLICY_LOSSES[name](lp, lp.detach().clone(), adv, mask, 1e-4, **kw)
    assert (out.ratio[mask] == 1).all()
    assert not out.clipped.any()
    g = torch.autograd.grad(aggregate_loss(out.loss, mask, mode), lp)[0]
    pg = torch.autograd.grad(aggregate_loss(reinforce_loss(lp, lp.detach(), adv, mask).loss * weight, mask, mode), lp)[0]
    torch.testing.assert_close(g, pg)
    assert (g[mask] != 0).all()


def test_policy_loss_registry_and_output_compat():
    from flowrl.core import POLICY_LOSSES, PolicyLossOutput, get_policy_loss

    assert {"ppo_clip", "reinforce", "dual_clip", "gspo", "gmpo", "grpo_guard"} <= set(POLICY_LOSSES)
    with pytest.raises(KeyError, match="choose from.*gspo"):
        get_policy_loss("gspo2")
    assert get_policy_loss("gmpo") is POLICY_LOSSES["gmpo"]
    o = PolicyLossOutput(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.bool))
    assert o.extra == {}
    # every loss except grpo_guard accepts the trainer's positional call
    lp, lp_old, adv, mask = _rand_batch(23)
    for name, fn in POLICY_LOSSES.items():
        if name != "grpo_guard":
            out = fn(lp, lp_old, adv, mask, 0.2, 0.28)
            assert out.loss.shape == lp.shape and out.ratio.shape == lp.shape and out.clipped.dtype == torch.bool
            assert (out.loss[~mask] == 0).all()


def test_new_losses_ignore_non_finite_padding():
    from flowrl.core import dual_clip_loss, gmpo_loss, gspo_loss

    lp, lp_old, adv, mask = _rand_batch(24)
    lp_pad = lp.detach().clone()
    lp_pad[~mask] = float("-inf")
    lp_pad.requires_grad_(True)
    for fn in (dual_clip_loss, gspo_loss, gmpo_loss):
        ref = fn(lp, lp_old, adv, mask, 0.2)
        out = fn(lp_pad, lp_old, adv, mask, 0.2)
        torch.testing.assert_close(out.loss, ref.loss)
        g = torch.autograd.grad(aggregate_loss(out.loss, mask, "seq_mean_step_mean"), lp_pad)[0]
        assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------------------

def test_kl_estimators_closed_forms():
    from flowrl.core import KL_ESTIMATORS, kl_estimate

    p = [0.5, 0.1, 0.9, 0.3]
    q = [0.25, 0.3, 0.9, 0.05]  # reference
    lp = torch.tensor([p], dtype=torch.float64).log()
    lq = torch.tensor([q], dtype=torch.float64).log()
    for i, (pi, qi) in enumerate(zip(p, q)):
        r = qi / pi
        assert kl_estimate(lp, lq, "k1")[0, i].item() == pytest.approx(-math.log(r), rel=1e-12, abs=1e-15)
        assert kl_estimate(lp, lq, "k2")[0, i].item() == pytest.approx(0.5 * math.log(r) ** 2, rel=1e-12, abs=1e-15)
        assert kl_estimate(lp, lq, "k3")[0, i].item() == pytest.approx(r - 1 - math.log(r), rel=1e-12, abs=1e-15)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert kl_estimate(lp, lq).shape == (1, 4)  # default k3
    with pytest.raises(KeyError, match="choose from.*k3"):
        kl_estimate(lp, lq, "k4")
    with pytest.raises(ValueError, match="differ"):
        kl_estimate(lp, lq[:, :2], "k1")


def test_k3_nonnegative_and_k1_unbiased_on_gaussians():
    from flowrl.core import kl_estimate

    # k3 >= 0 everywhere, including far from r = 1 and in float32
    lr = torch.linspace(-30, 30, 100001)
    assert (kl_estimate(torch.zeros_like(lr)[None], lr[None], "k3") >= 0).all()
    # π_θ = N(0.3, 1.2²), π_ref = N(-0.2, 0.8²); KL(π_θ‖π_ref) in closed form
    mp, sp, mq, sq = 0.3, 1.2, -0.2, 0.8
    true_kl = math.log(sq / sp) + (sp**2 + (mp - mq) ** 2) / (2 * sq**2) - 0.5
    n = 200_000
    x = mp + sp * torch.randn(n, generator=torch.Generator().manual_seed(25), dtype=torch.float64)

    def logn(x, m, s):
        return -((x - m) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)

    lp, lq = logn(x, mp, sp)[None], logn(x, mq, sq)[None]
    for kind in ("k1", "k3"):  # both unbiased for KL(π_θ‖π_ref)
        k = kl_estimate(lp, lq, kind)
        tol = 6 * k.std().item() / math.sqrt(n)  # 6 standard errors
        assert abs(k.mean().item() - true_kl) < tol, (kind, k.mean().item(), true_kl, tol)
    assert (kl_estimate(lp, lq, "k3") >= 0).all()


def test_kl_estimator_expected_gradients_on_a_categorical():
    """Exact expectations over a categorical π_θ (Σ_x sg(π(x))·∇k(x)): k1 → 0, k2 → ∇KL(π_θ‖π_ref),
    k3 → ∇KL(π_ref‖π_θ)."""
    from flowrl.core import kl_estimate

    gen = torch.Generator().manual_seed(26)
    theta = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_(True)
    lq = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)

    def expected_grad(kind):
        lp = torch.log_softmax(theta, 0)
        return torch.autograd.grad((lp.exp().detach() * kl_estimate(lp[None], lq[None], kind)[0]).sum(), theta)[0]

    lp = torch.log_softmax(theta, 0)
    rev = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), theta)[0]
    lp = torch.log_softmax(theta, 0)
    fwd = torch.autograd.grad((lq.exp() * (lq - lp)).sum(), theta)[0]
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(expected_grad("k2"), rev)
    torch.testing.assert_close(expected_grad("k3"), fwd)
    assert not torch.allclose(rev, fwd)  # the two KL directions really differ here


# ---------------------------------------------------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------------------------------------------------

def _loop_aggregate(loss, mask, mode, normaliser):
    b, t = len(loss), len(loss[0])
    if mode in ("step_mean", "constant", "seq_mean_step_sum_norm"):
        s = sum(loss[i][j] for i in range(b) for j in range(t) if mask[i][j])
        n = sum(mask[i][j] for i in range(b) for j in range(t)) if normaliser is None else normaliser
        return s / n
    total = 0.0
    for i in range(b):
        row = [loss[i][j] for j in range(t) if mask[i][j]]
        if row:
            total += sum(row) / (len(row) if mode == "seq_mean_step_mean" else 1)
    return total / (b if normaliser is None else normaliser)


@pytest.mark.parametrize("mode,normaliser", [("step_mean", None), ("step_mean", 37.0), ("seq_mean_step_mean", None),
                                             ("seq_mean_step_mean", 11.0), ("seq_mean_step_sum", None),
                                             ("seq_mean_step_sum", 11.0), ("constant", 64.0),
                                             ("seq_mean_step_sum_norm", 8.0)])
def test_aggregation_modes_match_loop(mode, normaliser):
    gen = torch.Generator().manual_seed(27)
    loss = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 8, generator=gen) > 0.4
    mask[2] = False  # a row without steps
    loss[~mask] = float("nan")  # ignored off the mask
    got = aggregate_loss(loss, mask, mode, normaliser)
    ref = _loop_aggregate(loss.tolist(), mask.tolist(), mode, normaliser)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_aggregation_errors():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown loss aggregation.*seq_mean_step_sum_norm"):
        aggregate_loss(loss, mask, "token_mean")
    for mode in ("constant", "seq_mean_step_sum_norm"):
        with pytest.raises(ValueError, match="explicit constant normaliser"):
            aggregate_loss(loss, mask, mode)
        with pytest.raises(ValueError, match="positive"):
            aggregate_loss(loss, mask, mode, 0.0)
    with pytest.raises(ValueError, match="positive"):
        aggregate_loss(loss, mask, "seq_mean_step_sum", -1.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate_loss(loss, mask[:, :2])


@pytest.mark.parametrize("loss_name", ["ppo_clip", "gspo", "gmpo"])
@pytest.mark.parametrize("mode", ["seq_mean_step_sum", "constant", "seq_mean_step_sum_norm", "seq_mean_step_mean"])
def test_accumulation_invariance_new_modes(loss_name, mode):
    from flowrl.core import POLICY_LOSSES

    gen = torch.Generator().manual_seed(28)
    b, t = 9, 5
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(b, t, 3, generator=gen, dtype=torch.float64)
    lp_old = (feats @ w).detach() + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) > 0.4
    mask[:, 0] = True
    global_norm = {"seq_mean_step_sum": b, "seq_mean_step_mean": b, "constant": t * b, "seq_mean_step_sum_norm": t}[mode]

    def loss_of(idx, norm):
        out = POLICY_LOSSES[loss_name](feats[idx] @ w, lp_old[idx], adv[idx], mask[idx], 0.2)
        return aggregate_loss(out.loss, mask[idx], mode, normaliser=norm)

    full = torch.autograd.grad(loss_of(torch.arange(b), global_norm), w)[0]
    parts = (torch.arange(0, 2), torch.arange(2, 7), torch.arange(7, 9))  # uneven micro-batches
    acc = sum(torch.autograd.grad(loss_of(idx, global_norm), w)[0] for idx in parts)
    torch.testing.assert_close(acc, full)
    if mode in ("seq_mean_step_sum", "seq_mean_step_mean"):  # per-micro-batch default normaliser: the classic bug
        bad = sum(torch.autograd.grad(loss_of(idx, None), w)[0] / len(parts) for idx in parts)
        assert not torch.allclose(bad, full)
