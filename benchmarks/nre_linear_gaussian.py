"""NRE engine quality on a linear-Gaussian problem with an analytic posterior (issue 3).

theta ~ U(-3, 3)^3, x = A theta + N(0, 0.6^2 I). The exact posterior is N(mu, Sigma) restricted
to the box (moments by rejection sampling of 400k draws).

Prints:
* marginal posterior means and standard deviations of a `MarginalRatioEstimator` against the
  analytic ones on a few observations (target: means within 0.1 sigma, stds within 10 %);
* the expected-coverage table on held-out simulations (target: |empirical - nominal| <= 0.05
  at 0.68 and 0.95 on >= 200 simulations), and a plot ``benchmarks/output/nre_coverage.png``.

Run: ``python benchmarks/nre_linear_gaussian.py [--n-train 40000] [--n-test 300] [--threads 1]``
"""

import argparse
import os
import time

import numpy as np
import torch

from astrotrunc._toys import LG_PRIOR, linear_gaussian_moments, linear_gaussian_simulate
from astrotrunc.diagnostics import coverage, plot_coverage
from astrotrunc.nre import MarginalRatioEstimator, Trainer

PRIOR = LG_PRIOR
simulate, analytic = linear_gaussian_simulate, linear_gaussian_moments


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    theta = PRIOR.sample(args.n_train, generator=args.seed)
    data = {"theta": theta, "x": simulate(theta, args.seed + 1)}
    torch.manual_seed(args.seed)
    est = MarginalRatioEstimator(3, PRIOR.names, pairs=[("a", "b")], hidden=64)
    t0 = time.perf_counter()
    hist = Trainer(max_epochs=args.epochs, batch_size=128, learning_rate=3e-3, patience=8,
                   progress=False, seed=args.seed).fit(est, data)
    print(f"trained on {args.n_train} simulations: {len(hist)} epochs in "
          f"{time.perf_counter() - t0:.1f} s, best val loss {min(hist['val_loss']):.4f}")

    print("\nposterior moments vs analytic (5 observations)")
    print(
        f"{'obs':>3} {'param':>5} {'mean':>8} {'exact':>8} {'dmean/sd':>9} {'std':>7} "
        f"{'exact':>7} {'std ratio':>9}"
    )
    worst_m, worst_s = 0.0, 0.0
    for k in range(5):
        t_true = PRIOR.sample(1, generator=1000 + k) * 0.6  # away from the box edges
        x_obs = simulate(t_true, 2000 + k)
        post = est.sample(x_obs, PRIOR, 100_000, generator=k)
        mean, std = analytic(x_obs)
        for i, name in enumerate(PRIOR.names):
            dm = (post.mean()[i] - mean[i]) / std[i]
            rs = post.std()[i] / std[i]
            worst_m, worst_s = max(worst_m, abs(dm)), max(worst_s, abs(rs - 1))
            print(f"{k:>3} {name:>5} {post.mean()[i]:8.3f} {mean[i]:8.3f} {dm:9.3f} "
                  f"{post.std()[i]:7.3f} {std[i]:7.3f} {rs:9.3f}")
    print(f"worst |dmean|/sd = {worst_m:.3f} (target < 0.1), worst |std ratio - 1| = {worst_s:.3f} "
          "(target < 0.1)")

    theta_test = PRIOR.sample(args.n_test, generator=args.seed + 77)
    held_out = {"theta": theta_test, "x": simulate(theta_test, args.seed + 78)}
    t0 = time.perf_counter()
    table = coverage(est, held_out, PRIOR, levels=[0.5, 0.68, 0.8, 0.9, 0.95, 0.99],
                     n_samples=20_000, n_test=args.n_test, seed=args.seed)
    print(f"\nexpected coverage on {args.n_test} held-out simulations "
          f"({time.perf_counter() - t0:.1f} s; 68 % Jeffreys intervals)")
    for col in ("empirical", "lower", "upper"):
        table[col].info.format = ".3f"
    table.pprint(max_lines=-1, max_width=-1)
    sel = np.isin(np.round(table["nominal"], 2), [0.68, 0.95])
    dev = np.abs(table["empirical"][sel] - table["nominal"][sel])
    print(f"max |empirical - nominal| at 0.68 and 0.95: {dev.max():.3f} (target <= 0.05): "
          f"{'PASS' if dev.max() <= 0.05 else 'FAIL'}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "output"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "output", "nre_coverage.png")
    plot_coverage(table).figure.savefig(out, dpi=120, bbox_inches="tight")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
