"""Gradient signal-to-noise ratio of an update rule on the embedded model: how many groups make one update useful?

For each configuration (Hydra overrides of ``configs/train.yaml``), rolls out ``--groups`` groups of one epoch with
the configured sampler and reward, then computes the update's LoRA gradient **per group** ``g_k`` (exactly the
gradient :meth:`flowrl.trainer.Trainer.update` / ``update_nft`` / ``update_dpo`` would apply for a batch of that one
group, captured before the optimizer step; nothing is stepped). With ``ḡ`` their mean and
``Σ̂`` their sample covariance over the ``K`` groups:

- noise per group ``tr Σ̂ = Σ_k ‖g_k − ḡ‖² / (K − 1)``;
- signal ``‖E g‖²``, estimated without bias as ``‖ḡ‖² − tr Σ̂ / K`` (clamped at 0);
- ``SNR(B) = B · ‖E g‖² / tr Σ̂`` for an update over ``B`` groups, so ``B* = tr Σ̂ / ‖E g‖²`` groups give SNR 1;
- the split-half cosine ``cos(ḡ_A, ḡ_B)`` of two disjoint halves of the groups (0 for pure noise);
- seconds per group (rollout + gradient) and so seconds of compute per unit-SNR update;
- the same figures after Adam-like diagonal whitening (each coordinate divided by its RMS over the groups), since
  Adam steps in that metric: signal concentrated in a few quiet coordinates shows up there first.

A higher-SNR estimator of the same objective moves the policy with fewer samples; ``B*`` far above the groups an
epoch trains says the update is mostly noise (the session-2/3 runs in ``docs/runs.md``). Directions of different
objectives (e.g. GRPO vs DiffusionNFT) differ, so compare ``B*`` and the cosine, not the raw norms.

    python scripts/benchmark_gradient_snr.py --groups 32 \\
        --config default= \\
        --config guard=algorithm.policy_loss=grpo_guard \\
        --config nft=algorithm=nft,sampler=ode
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def group_gradients(overrides: list[str], groups: int, threads: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Per-group LoRA gradients ``[K, P]`` (float64) of one epoch's rollouts, and timing/reward facts.

    Raises:
        ValueError: the configuration selects dynamic sampling (groups would not line up with one rollout).
    """
    from flowrl.benchmark import compose_train_config
    from flowrl.trainer import Trainer

    cfg = compose_train_config([*overrides, f"trainer.groups_per_epoch={groups}", f"trainer.threads={threads}",
                                f"trainer.seed={seed}", "trainer.output_dir=runs/benchmark_gradient_snr",
                                "trainer.optimizer_steps_per_epoch=1"])
    if cfg.algorithm.dynamic_sampling:
        raise ValueError("benchmark_gradient_snr: set algorithm.dynamic_sampling=false")
    tr = Trainer(cfg)
    captured: list[torch.Tensor] = []

    def capture() -> None:  # replaces the optimizer step: keep the gradient, step nothing
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in tr.params]
        captured.append(torch.cat(flat).double().clone())
        for p in tr.params:
            p.grad = None

    tr._optimizer_step = capture
    t0 = time.time()
    batch = tr.collect(0)
    t_roll = time.time() - t0
    gids = batch["group_ids_all"]
    grads = []
    t0 = time.time()
    for g in torch.unique(gids).tolist():
        keep = gids == g
        idx = torch.nonzero(keep).flatten()
        traj, cond, adv = batch["traj"].select(keep), batch["cond"][keep], batch["adv"][keep]
        sids = [batch["sample_ids"][i] for i in idx.tolist()]
        captured.clear()
        if cfg.algorithm.name in ("nft", "raft"):
            tr.update_nft(traj, cond, adv, sids, 0)
        else:
            tr.update(traj, cond, adv)
        if captured:
            grads.append(torch.stack(captured).sum(0))
    t_grad = time.time() - t0
    facts = {"group_size": cfg.trainer.group_size, "rollout_s_per_group": t_roll / groups, "grad_s_per_group": t_grad / groups,
             "reward_mean": float(batch["rewards_all"].mean()), "groups_with_gradient": len(grads),
             "informative_frac": batch["informative_frac"]}
    return torch.stack(grads), facts


def snr_stats(grads: torch.Tensor, seed: int = 0) -> dict:
    """Signal/noise figures of per-group gradients ``[K, P]`` (K ≥ 4) as defined in the module docstring.

    Raises:
        ValueError: fewer than 4 groups.
    """
    k = grads.shape[0]
    if k < 4:
        raise ValueError(f"need at least 4 groups with a gradient, got {k}")
    mean = grads.mean(0)
    noise = float(((grads - mean) ** 2).sum(1).sum() / (k - 1))
    signal = max(float(mean.pow(2).sum()) - noise / k, 0.0)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    a, b = grads[perm[: k // 2]].mean(0), grads[perm[k // 2:]].mean(0)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    # Adam-like diagonal preconditioning: each coordinate divided by its RMS over groups (Adam's √v at steady state)
    w = grads / grads.pow(2).mean(0).sqrt().clamp_min(1e-30)
    wa, wb = w[perm[: k // 2]].mean(0), w[perm[k // 2:]].mean(0)
    w_mean = w.mean(0)
    w_noise = float(((w - w_mean) ** 2).sum(1).sum() / (k - 1))
    w_signal = max(float(w_mean.pow(2).sum()) - w_noise / k, 0.0)
    return {"groups": k, "signal": signal, "noise_per_group": noise,
            "whitened_split_half_cosine": float(torch.nn.functional.cosine_similarity(wa, wb, dim=0)),
            "whitened_groups_for_snr1": w_noise / w_signal if w_signal > 0 else math.inf,
            "snr_per_group": signal / noise if noise > 0 else math.inf,
            "groups_for_snr1": noise / signal if signal > 0 else math.inf, "split_half_cosine": cos}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="NAME=override1,override2 (Hydra overrides of configs/train.yaml; empty for the default)")
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/benchmark_gradient_snr/snr.jsonl")
    p.add_argument("--save-grads", action="store_true", help="also save the [K, P] float32 gradients next to --out")
    args = p.parse_args()
    configs = args.config or ["default="]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in configs:
        name, _, ov = spec.partition("=")
        overrides = [o for o in ov.split(",") if o]
        grads, facts = group_gradients(overrides, args.groups, args.threads)
        if args.save_grads:
            torch.save(grads.float(), out.parent / f"{name}_grads.pt")
        row = {"name": name, "overrides": overrides, **facts, **snr_stats(grads)}
        row["samples_for_snr1"] = row["groups_for_snr1"] * row["group_size"]
        row["seconds_for_snr1"] = row["groups_for_snr1"] * (row["rollout_s_per_group"] + row["grad_s_per_group"])
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("\n| config | groups × size | reward | split-half cos | samples for SNR 1 | s per group | s for SNR 1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['groups']} × {r['group_size']} | {r['reward_mean']:.3f} | "
              f"{r['split_half_cosine']:.3f} | {r['samples_for_snr1']:.0f} | {r['rollout_s_per_group'] + r['grad_s_per_group']:.2f} | "
              f"{r['seconds_for_snr1']:.0f} |")


if __name__ == "__main__":
    main()
