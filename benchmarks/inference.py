"""Population inference (issue 9): calibration, widths and speed of the three posteriors.

Modes (each prints its figures and writes ``benchmarks/output/inference_<mode>.json``):

* ``detected``  -- the detected branch, exact route, over full-model observations whose catalogs
  come from the shipped detector on rendered maps: expected coverage of the central 68 % / 95 %
  intervals of N, sigma_F, h (and of the joint HPD region), beside the naive catalog fit that
  takes the catalog as complete. Also split by h (crowded maps near the plane).
* ``r3``        -- local calibration of r3 on held-out truncated simulations of one observation.
* ``end-to-end`` -- ``PopulationInference.run`` (quick settings by default) on independent
  observations with known θ: coverage of the combined 68 % intervals, the widths per branch,
  stage times and peak RSS.

Run: ``python benchmarks/inference.py detected --n-obs 200``
"""

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from astrotrunc import PointSourceModel, find_sources
from astrotrunc.completeness import default_completeness
from astrotrunc.detection import default_detector
from astrotrunc.diagnostics import binomial_interval
from astrotrunc.inference import CatalogLikelihood, naive_catalog_log_likelihood
from astrotrunc.inference.population import _focused_draws
from astrotrunc.nre import WeightedSamples
from astrotrunc.truncation import DetectedRegions

OUT = Path(__file__).parent / "output"
NAMES = ("N", "sigma_F", "h")


def _covered(post, truth, level):
    q = post.quantile([0.5 - level / 2, 0.5 + level / 2])
    return (q[0] <= truth) & (truth <= q[1])


def _print_coverage(label, hits, n):
    parts = []
    for level in (0.68, 0.95):
        for i, name in enumerate(NAMES):
            k = int(hits[level][:, i].sum())
            lo, hi = binomial_interval(k, n)
            parts.append(f"{name}@{level:.2f} {k / n:.3f} [{lo:.3f}, {hi:.3f}]")
    print(f"{label:>10}: " + "; ".join(parts))


def detected(args):
    model = PointSourceModel.paper()
    det, S = default_detector(), default_completeness()
    rng_seed = args.seed
    obs = model.simulate(args.n_obs, seed=rng_seed)
    base = None
    gen = torch.Generator().manual_seed(rng_seed)
    hits = {m: {lv: [] for lv in (0.68, 0.95)} for m in ("exact", "naive")}
    hpd, n_det, hs = [], [], []
    t0 = time.perf_counter()
    for j in range(args.n_obs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cat, segm = find_sources(obs.maps[j], det, wcs=model.wcs, threshold=S.threshold,
                                     flux_threshold=S.flux_threshold, return_segmentation=True)
        regions = DetectedRegions.from_catalog(cat, model.shape, segmentation=segm)
        like = CatalogLikelihood(model, regions, S) if base is None else base.for_regions(regions)
        base = like
        truth = obs.theta[j].double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            th, lw = _focused_draws(like.log_prob, model.prior, args.n_samples, gen)
            post = WeightedSamples(th, lw, names=NAMES, log_weight_fn=like.log_prob)
            th_n, lw_n = _focused_draws(
                lambda t: naive_catalog_log_likelihood(like, cat, t),
                model.prior, args.n_samples, gen)
            naive = WeightedSamples(th_n, lw_n, names=NAMES)
        for lv in (0.68, 0.95):
            hits["exact"][lv].append(_covered(post, truth, lv))
            hits["naive"][lv].append(_covered(naive, truth, lv))
        hpd.append(float(post.credible_level(truth)[0]))
        n_det.append(regions.n)
        hs.append(truth[2])
        if (j + 1) % 20 == 0:
            print(f"  {j + 1}/{args.n_obs} observations, {time.perf_counter() - t0:.0f} s")
    hs = np.array(hs)
    out = {"n_obs": args.n_obs, "seed": rng_seed, "n_samples": args.n_samples,
           "mean_n_detected": float(np.mean(n_det))}
    print(f"{args.n_obs} observations, mean N_det = {np.mean(n_det):.1f}, "
          f"{time.perf_counter() - t0:.0f} s")
    for method in ("exact", "naive"):
        h = {lv: np.array(v) for lv, v in hits[method].items()}
        _print_coverage(method, h, args.n_obs)
        out[method] = {f"{name}@{lv}": float(h[lv][:, i].mean())
                       for lv in h for i, name in enumerate(NAMES)}
        for label, sel in (("h<5", hs < 5), ("h>=5", hs >= 5)):
            if sel.sum() >= 10:
                _print_coverage(f"{method} {label}", {lv: h[lv][sel] for lv in h}, int(sel.sum()))
                out[method][label] = {f"{name}@{lv}": float(h[lv][sel][:, i].mean())
                                      for lv in h for i, name in enumerate(NAMES)}
    hpd = np.array(hpd)
    joint = {f"{lv}": float((hpd < lv).mean()) for lv in (0.5, 0.68, 0.9, 0.95)}
    print("exact joint HPD coverage: " + ", ".join(f"{k}: {v:.3f}" for k, v in joint.items()))
    out["exact_joint_hpd"] = joint
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["detected", "r3", "end-to-end"])
    p.add_argument("--n-obs", type=int, default=200)
    p.add_argument("--n-samples", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = {"detected": detected}[args.mode](args)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    OUT.mkdir(exist_ok=True)
    (OUT / f"inference_{args.mode}.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT / f'inference_{args.mode}.json'}")


if __name__ == "__main__":
    main()
