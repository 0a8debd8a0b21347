"""Print the per-step marginal error table of the ODE, Flow-GRPO SDE (a=0.7) and CPS (a=0.8) samplers on the Gaussian
toy of :mod:`flowrl.flow.toy` (data N(m, s0²), exact velocity), at 10 and 40 steps of the SD3 (shift 3) schedule.

    python scripts/benchmark_marginals.py [--n 20000] [--dim 16] [--s0 0.3] [--m 0.5]

Columns: σ→σ_next, the exact marginal variance at σ_next, the empirical mean and variance errors of the particles,
and the variance error from exact moment propagation (no Monte-Carlo noise). Pass ``--s0 0`` for a point mass
(x̂0 exact; the case where CPS and the ODE are exact and the SDE's late-step variance inflation is largest).
"""

from __future__ import annotations

import argparse
import time

import torch

from flowrl.flow.toy import format_table, marginal_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="particles")
    p.add_argument("--dim", type=int, default=16, help="coordinates per particle")
    p.add_argument("--m", type=float, default=0.5, help="data mean")
    p.add_argument("--s0", type=float, default=0.3, help="data std (0 = point mass)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    for steps in args.steps:
        for kind, a in (("ode", 0.0), ("sde", 0.7), ("cps", 0.8)):
            rows = marginal_errors(kind, a, steps, n=args.n, dim=args.dim, m=args.m, s0=args.s0, seed=args.seed)
            label = "ODE (Euler)" if kind == "ode" else f"{kind.upper()} a={a}"
            print(format_table(rows, f"\n== {label}, {steps} steps, data N({args.m}, {args.s0}²), "
                                     f"{args.n}×{args.dim} samples =="))
    print(f"\n({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
