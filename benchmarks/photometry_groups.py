"""Which calibration groups make the photometry's intervals hold in and out of the plane?

The shipped `~astrotrunc.detection.FluxEstimator` is calibrated per group of detections
(split-conformal, `FluxEstimator.calibrate`). This script compares groupings offline: it takes
the network's raw quantiles of the matched detections of the calibration maps (600, seed 1, as
the shipped calibration) and of two sets of held-out maps (the seeds of
``benchmarks/photometry.py``), recalibrates with each grouping -- predicted flux (3 bins) x one
or two statistics of each detection, in bins of equal counts -- and prints, per held-out set,
the number of the benchmark's 36 cells (flux decade x latitude range x true / catalog flux)
outside the targets (68 +- 3 % and 95 +- 2 %), the in-plane (|b| < 2 deg) coverages by true flux
decade, and the 68 % coverage of all in-plane and all |b| > 10 deg detections.

Statistics: ``crowd`` (the median of the cutout: the shipped crowding), ``iqr`` (its
interquartile range), ``ring`` (its median outside the central 7 x 7 pixels), ``n8``/``n16``
(detections within 8/16 pixels), ``ndet`` (detections in the map) and ``abs_b`` (|Galactic
latitude| of the detection, from the map's WCS: the shipped latitude groups).

Run: ``OMP_NUM_THREADS=1 python benchmarks/photometry_groups.py`` (about a minute).
"""

import argparse
import warnings

import numpy as np
import torch
from scipy.spatial import cKDTree

from astrotrunc import NeuralSourceFinder, PointSourceModel
from astrotrunc.completeness import match_sources
from astrotrunc.detection import photometry as phot

GROUPINGS = ((("crowd", 8),), (("iqr", 8),), (("ring", 8),), (("n16", 8),), (("ndet", 8),),
             (("crowd", 4), ("n8", 2)), (("crowd", 4), ("iqr", 2)), (("crowd", 8), ("ndet", 2)),
             (("abs_b", 8),), (("crowd", 4), ("abs_b", 4)))


def collect(est, finder, model, n_maps, seed):
    """Raw quantiles, true ln F, |b| of the source and the statistics of matched detections."""
    sims = model.simulate(n_maps, seed=seed)
    half = est.half_size
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    outer = (np.maximum(abs(yy), abs(xx)) > 3).ravel()
    rows = {k: [] for k in ("q", "log_flux", "b", "crowd", "iqr", "ring", "n8", "n16", "ndet",
                            "abs_b")}
    for i in range(n_maps):
        data = sims.maps[i].numpy().astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # maps without detections
            cat, segm = finder(data, wcs=model.wcs, return_segmentation=True)
        if cat is None:
            continue
        flux, x, y, valid = (a[i].numpy() for a in (sims.flux, sims.x, sims.y, sims.in_map))
        detected = match_sources(segm.data[None], flux[None], x[None], y[None], valid[None])[0]
        row, src = phot._rows_of_sources(segm, detected, x, y)
        px, py = cat["x_centroid"].value, cat["y_centroid"].value
        matched = finder.detector.estimate_flux(data, px, py)[0]
        cut, offset = phot._cutouts(data, None, px, py, half, est.background)
        values = cut[:, 0].reshape(len(cut), -1)
        tree = cKDTree(np.c_[px, py])
        stats = {"q": est._raw_log_quantiles(cut, offset, matched.astype(np.float32)),
                 "crowd": phot._crowding(cut),
                 "iqr": np.subtract(*np.percentile(values, [75, 25], axis=1)),
                 "ring": np.median(values[:, outer], axis=1),
                 "n8": tree.query_ball_point(np.c_[px, py], 8.0, return_length=True),
                 "n16": tree.query_ball_point(np.c_[px, py], 16.0, return_length=True),
                 "ndet": np.full(len(px), len(px)),
                 "abs_b": np.abs(cat["b"].to_value("deg"))}
        for k, v in stats.items():
            rows[k].append(np.asarray(v, float)[row])
        rows["log_flux"].append(np.log(flux[src]))
        rows["b"].append(sims.b[i].numpy()[src])
    return {k: np.concatenate(v) for k, v in rows.items()}


def _groups(rows, grouping, edges, flux_edges):
    g = np.digitize(rows["q"][:, 3], np.log(flux_edges))
    for name, n_bins in grouping:
        g = g * n_bins + np.digitize(rows[name], edges[name])
    return g


def evaluate(cal, tests, grouping, levels, flux_edges=(10.0, 100.0), min_group=200):
    """Calibrate on ``cal`` with ``grouping``; the coverage summary of each of ``tests``."""
    k = levels.index(0.5)
    edges = {name: np.quantile(cal[name], np.linspace(0, 1, n + 1)[1:-1]) for name, n in grouping}
    n_inner = int(np.prod([n for _, n in grouping]))
    scale = phot._calibration_table(cal["q"], cal["log_flux"], levels,
                                    _groups(cal, grouping, edges, flux_edges),
                                    (len(flux_edges) + 1) * n_inner, n_inner, min_group)
    out = []
    for rows in tests:
        factors = scale[_groups(rows, grouping, edges, flux_edges)]
        calibrated = phot._scaled(rows["q"], factors[:, :-1], k)
        flux, err, lo, hi = phot.flux_summary(calibrated, levels)
        err = err * factors[:, -1]
        true, abs_b = np.exp(rows["log_flux"]), np.abs(rows["b"])
        inside = (lo <= true) & (true <= hi)
        two_sigma = np.abs(flux - true) <= 2 * err
        misses, plane = 0, []
        for lat, on in (("all", abs_b >= 0), ("|b|<2", abs_b < 2), ("|b|>10", abs_b > 10)):
            for by, value in (("true", true), ("catalog", flux)):
                for a, b in ((1, 10), (10, 100), (100, np.inf)):
                    sel = on & (value >= a) & (value < b)
                    c68, c95 = inside[sel].mean(), two_sigma[sel].mean()
                    misses += int(abs(c68 - 0.68) > 0.03) + int(abs(c95 - 0.95) > 0.02)
                    if lat == "|b|<2" and by == "true":
                        plane.append(f"{100 * c68:.1f}/{100 * c95:.1f}")
        out.append(f"{misses:2d} cells out; |b|<2 by true flux {' '.join(plane)}; 68 %: "
                   f"|b|<2 {100 * inside[abs_b < 2].mean():.1f}, "
                   f"|b|>10 {100 * inside[abs_b > 10].mean():.1f}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-maps", type=int, default=400, help="held-out maps per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[20261125, 20261126])
    p.add_argument("--photometry", default=None, help="estimator file (default: the shipped)")
    args = p.parse_args()
    torch.set_num_threads(1)
    est = (phot.FluxEstimator.load(args.photometry) if args.photometry
           else phot.FluxEstimator.load_default())
    model = PointSourceModel.paper()
    finder = NeuralSourceFinder(flux_method="matched")
    cal = collect(est, finder, model, 600, 1)
    tests = [collect(est, finder, model, args.n_maps, seed) for seed in args.seeds]
    print(f"calibration: 600 maps (seed 1), {len(cal['q'])} matched detections; held out: "
          + ", ".join(f"{len(t['q'])} (seed {s})" for t, s in zip(tests, args.seeds)))
    for grouping in GROUPINGS:
        name = " x ".join(f"{n} {k}" for k, n in grouping)
        for seed, line in zip(args.seeds, evaluate(cal, tests, grouping, list(est.levels))):
            print(f"{name:22s} seed {seed}: {line}")


if __name__ == "__main__":
    main()
