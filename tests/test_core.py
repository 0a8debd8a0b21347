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
