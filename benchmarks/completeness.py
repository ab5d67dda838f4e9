"""Learned completeness (r2) against brute-force injection-recovery (issue: r2).

Prints, for the shipped detector + completeness (or given files):

* a table of injection-recovery completeness (with 68 % Clopper-Pearson errors; maps drawn from
  p(θ | a source at (F, l, b)), the population S is defined on, or from p(θ) with --classical)
  and the learned
  S(F, l, b) over >= 10 flux bins x 3 latitudes, with the pull (S - IR) / sigma_IR, and the
  fraction of bins within 2 sigma;
* the reliability of S on held-out labelled sources: predicted probability vs observed detection
  frequency in 10 bins, and the expected calibration error;
* a plot ``benchmarks/output/completeness.png`` and the figures in
  ``benchmarks/output/completeness.json``.

Run: ``python benchmarks/completeness.py [--n-maps 200] [--detector F --completeness F]``
"""

import argparse
import json
import os
import warnings

import numpy as np
import torch

from astrotrunc import CompletenessFunction, PointSourceModel, SourceDetector
from astrotrunc.completeness import injection_recovery
from astrotrunc.detection import default_detector


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-maps", type=int, default=200, help="maps per (flux, position) injection")
    p.add_argument("--n-label-maps", type=int, default=300, help="held-out maps for reliability")
    p.add_argument("--detector")
    p.add_argument("--completeness")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--classical",
        action="store_true",
        help="inject into maps with theta ~ p(theta) instead of p(theta | source at F, s)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = PointSourceModel.paper()
    det = SourceDetector.load(args.detector) if args.detector else default_detector()
    S = (CompletenessFunction.load(args.completeness) if args.completeness
         else CompletenessFunction.load_default())
    finder = S.finder(det)  # the finder whose detections S describes (checks the pairing)
    print(f"{finder!r} ({det.identity})")

    fluxes = np.geomspace(S.flux_threshold * 0.3, S.flux_threshold * 30, 10)
    positions = [(5.0, 1.0), (5.0, 5.0), (5.0, 15.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ir = injection_recovery(model, finder, fluxes, positions, n_maps=args.n_maps,
                                seed=args.seed, population_weighted=not args.classical)
    print("injection-recovery maps drawn from "
          + ("p(theta) (classical)" if args.classical else "p(theta | a source at (F, l, b))"))
    learned = S(ir["flux"].value, ir["l"].value, ir["b"].value)
    k, n = ir["n_recovered"], ir["n_injected"]
    # binomial sigma of the injection-recovery fraction (Jeffreys-smoothed: 0/n, n/n have width)
    p_hat = (k + 0.5) / (n + 1)
    sigma = np.sqrt(p_hat * (1 - p_hat) / n)
    pull = (learned - ir["completeness"]) / sigma
    ok = np.abs(pull) <= 2
    print(f"\n{'flux':>9s} {'l':>5s} {'b':>5s} {'IR':>7s} {'-':>6s} {'+':>6s} {'learned':>8s} "
          f"{'pull':>6s}")
    for row, s, pl in zip(ir, learned, pull):
        print(f"{row['flux'].value:9.3g} {row['l'].value:5.1f} {row['b'].value:5.1f} "
              f"{row['completeness']:7.3f} {row['completeness_low']:6.3f} "
              f"{row['completeness_high']:6.3f} {s:8.3f} {pl:6.2f}")
    print(f"\nbins within 2 sigma: {ok.sum()}/{len(ok)} = {ok.mean():.1%} (target >= 90 %)")

    labels = CompletenessFunction.simulate_labels(model, finder, args.n_label_maps,
                                                  seed=args.seed + 1)
    pred = S(labels["flux"].numpy(), labels["l"].numpy(), labels["b"].numpy())
    d = labels["d"].numpy()
    edges = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(pred, edges) - 1, 0, 9)
    ece = 0.0
    reliability = []
    print(f"\nreliability on {len(d)} held-out sources from {args.n_label_maps} maps")
    print(f"{'predicted':>14s} {'mean S':>8s} {'observed':>9s} {'n':>8s}")
    for b in range(10):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(pred[sel].mean() - d[sel].mean())
            reliability.append([float(pred[sel].mean()), float(d[sel].mean()), int(sel.sum())])
            print(f"[{edges[b]:.1f}, {edges[b + 1]:.1f}) {pred[sel].mean():8.3f} "
                  f"{d[sel].mean():9.3f} {sel.sum():8d}")
    print(f"expected calibration error: {ece:.4f} (target <= 0.03)")

    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
    os.makedirs(out_dir, exist_ok=True)
    figures = {"n_maps": args.n_maps, "n_label_maps": args.n_label_maps, "seed": args.seed,
               "classical": bool(args.classical), "finder_settings": finder.settings,
               "bins": [{"flux": float(r["flux"].value), "l": float(r["l"].value),
                         "b": float(r["b"].value), "injection_recovery": float(r["completeness"]),
                         "low": float(r["completeness_low"]),
                         "high": float(r["completeness_high"]), "learned": float(s),
                         "pull": float(pl)} for r, s, pl in zip(ir, learned, pull)],
               "fraction_within_2_sigma": float(ok.mean()), "n_within_2_sigma": int(ok.sum()),
               "reliability": reliability, "expected_calibration_error": float(ece)}
    with open(os.path.join(out_dir, "completeness.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print(f"figures: {os.path.join(out_dir, 'completeness.json')}")

    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(os.path.dirname(__file__), "output"), exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    fl = np.geomspace(fluxes[0], fluxes[-1], 200)
    for (lon, lat), c in zip(positions, ("C0", "C1", "C2")):
        sel = (ir["b"].value == lat)
        ax[0].errorbar(ir["flux"].value[sel], ir["completeness"][sel],
                       yerr=[ir["completeness"][sel] - ir["completeness_low"][sel],
                             ir["completeness_high"][sel] - ir["completeness"][sel]],
                       fmt="o", color=c, label=f"injection-recovery b={lat:g}°")
        ax[0].plot(fl, S(fl, lon, lat), color=c, label=f"learned S, b={lat:g}°")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("flux")
    ax[0].set_ylabel("completeness")
    ax[0].legend(fontsize=7)
    ax[1].plot([0, 1], [0, 1], "k:")
    centers = [pred[idx == b].mean() for b in range(10) if (idx == b).any()]
    observed = [d[idx == b].mean() for b in range(10) if (idx == b).any()]
    ax[1].plot(centers, observed, "o-")
    ax[1].set_xlabel("predicted S")
    ax[1].set_ylabel("observed detection frequency")
    out = os.path.join(os.path.dirname(__file__), "output", "completeness.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
