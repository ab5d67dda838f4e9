"""r1 against photutils' finders on held-out paper-model maps (issue: r1 detector).

For each finder, the threshold is tuned to reach the same purity (default 0.95) on the maps, then
completeness per flux bin, the 50 %-completeness flux and speed are printed.

Finders, each configured fairly for crowded Galactic-plane fields:

* r1: `astrotrunc.find_sources` with the shipped detector (odds threshold scanned);
* DAOStarFinder: FWHM of the model PSF, ``min_separation=1`` px, sharpness/roundness filters
  opened wide, no border exclusion (threshold scanned);
* segmentation: `photutils.segmentation.detect_sources` + `deblend_sources` + `SourceCatalog` on
  the PSF-matched-filtered map (threshold scanned).

A detection is matched to a true source within 1.5 px, one-to-one, brightest true source first.

Run: ``python benchmarks/detection.py [--n-maps 200] [--purity 0.95]``
"""

import argparse
import time
import warnings

import numpy as np
import torch
from astropy.convolution import Gaussian2DKernel, convolve_fft
from photutils.detection import DAOStarFinder
from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources
from photutils.utils import NoDetectionsWarning
from scipy.spatial import cKDTree

from astrotrunc import PointSourceModel, find_sources
from astrotrunc.detection import default_detector

PSF_SIGMA = 1.5
FWHM = PSF_SIGMA * 2 * np.sqrt(2 * np.log(2))


def match(det_xy, true_xy, true_flux, radius=1.5):
    """Boolean arrays (true source matched, detection matched); brightest true source first."""
    t_ok = np.zeros(len(true_xy), bool)
    d_ok = np.zeros(len(det_xy), bool)
    if len(det_xy) == 0 or len(true_xy) == 0:
        return t_ok, d_ok
    tree = cKDTree(det_xy)
    for i in np.argsort(-true_flux):
        for j in sorted(tree.query_ball_point(true_xy[i], radius),
                        key=lambda j: np.hypot(*(det_xy[j] - true_xy[i]))):
            if not d_ok[j]:
                d_ok[j] = t_ok[i] = True
                break
    return t_ok, d_ok


def r1_positions(data, threshold, detector):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        cat = find_sources(data, detector, threshold=threshold)
    if cat is None:
        return np.zeros((0, 2))
    return np.column_stack([cat["x_centroid"].value, cat["y_centroid"].value])


def dao_positions(data, threshold):
    finder = DAOStarFinder(threshold, FWHM, min_separation=1.0, sharpness_range=(-10, 10),
                           roundness_range=(-10, 10), exclude_border=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = finder(data)
    if tab is None:
        return np.zeros((0, 2))
    return np.column_stack([tab["x_centroid"], tab["y_centroid"]])


_KERNEL = Gaussian2DKernel(PSF_SIGMA, x_size=13, y_size=13)


def seg_positions(data, threshold):
    smoothed = convolve_fft(data, _KERNEL, normalize_kernel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segm = detect_sources(smoothed, threshold, n_pixels=3)
        if segm is None:
            return np.zeros((0, 2))
        segm = deblend_sources(smoothed, segm, n_pixels=3, nlevels=32, contrast=1e-3,
                               progress_bar=False)
    cat = SourceCatalog(data, segm, convolved_data=smoothed)
    return np.column_stack([cat.x_centroid, cat.y_centroid])


def evaluate(positions_fn, maps, truth, threshold):
    t_all, f_all, n_det, n_good = [], [], 0, 0
    for data, (txy, tf) in zip(maps, truth):
        det = positions_fn(data, threshold)
        t_ok, d_ok = match(det, txy, tf)
        t_all.append(t_ok)
        f_all.append(tf)
        n_det += len(det)
        n_good += d_ok.sum()
    purity = n_good / max(n_det, 1)
    return np.concatenate(t_all), np.concatenate(f_all), purity, n_det


def tune(positions_fn, maps, truth, grid, purity):
    """Lowest threshold on ``grid`` (ascending) reaching ``purity``."""
    best = grid[-1]
    for thr in grid:
        _, _, p, n = evaluate(positions_fn, maps, truth, thr)
        if p >= purity and n > 0:
            best = thr
            break
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-maps", type=int, default=200)
    p.add_argument("--n-tune", type=int, default=60, help="maps used to tune thresholds")
    p.add_argument("--purity", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=2024, help="held-out seed (training used others)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = PointSourceModel.paper()
    det = default_detector()
    sims = model.simulate(args.n_maps + args.n_tune, seed=args.seed)
    maps = sims.maps.numpy().astype(np.float64)
    truth = []
    for i in range(len(maps)):
        keep = sims.in_map[i].numpy()
        truth.append((np.column_stack([sims.x[i].numpy()[keep], sims.y[i].numpy()[keep]]),
                      sims.flux[i].numpy()[keep]))
    tune_maps, tune_truth = maps[:args.n_tune], truth[:args.n_tune]
    test_maps, test_truth = maps[args.n_tune:], truth[args.n_tune:]

    finders = {
        "r1 (astrotrunc)": (lambda d, t: r1_positions(d, t, det), np.geomspace(0.5, 5000, 41)),
        "DAOStarFinder": (dao_positions, np.geomspace(0.05, 500, 41)),
        "segmentation+deblend": (seg_positions, np.geomspace(0.02, 200, 41)),
    }
    bins = np.geomspace(0.1, 1000, 13)
    results = {}
    for name, (fn, grid) in finders.items():
        thr = tune(fn, tune_maps, tune_truth, grid, args.purity)
        t_ok, flux, purity, n_det = evaluate(fn, test_maps, test_truth, thr)
        idx = np.digitize(flux, bins) - 1
        comp = np.array([t_ok[idx == k].mean() if (idx == k).any() else np.nan
                         for k in range(len(bins) - 1)])
        f50 = _f50(flux, t_ok)
        results[name] = comp
        print(f"{name:22s} threshold {thr:9.4g}: purity {purity:.3f} on {n_det} detections, "
              f"completeness {t_ok.mean():.3f} of {len(t_ok)} true sources, F50 = {f50:.3g}")

    print("\ncompleteness per flux bin (held-out maps)")
    header = "flux bin".ljust(18) + "".join(f"{n[:20]:>22s}" for n in results)
    print(header)
    for k in range(len(bins) - 1):
        row = f"[{bins[k]:7.3g},{bins[k + 1]:7.3g})".ljust(18)
        row += "".join(f"{results[n][k]:22.3f}" for n in results)
        print(row)

    # speed: 128x128 maps and one 2048x2048 map
    data = maps[0]
    find_sources(data, det)
    t0 = time.perf_counter()
    for m in maps[:50]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            find_sources(m, det)
    t_r1 = (time.perf_counter() - t0) / 50
    t0 = time.perf_counter()
    for m in maps[:50]:
        dao_positions(m, 1.0)
    t_dao = (time.perf_counter() - t0) / 50
    print(f"\nspeed 128x128: find_sources {1e3 * t_r1:.1f} ms/map, DAOStarFinder "
          f"{1e3 * t_dao:.1f} ms/map (ratio DAO/r1 = {t_dao / t_r1:.2f})")
    big = np.tile(maps[0], (16, 16))
    t0 = time.perf_counter()
    cat = find_sources(big, det)
    t_big = time.perf_counter() - t0
    t0 = time.perf_counter()
    dao_positions(big, 1.0)
    t_dao_big = time.perf_counter() - t0
    print(f"speed 2048x2048: find_sources {t_big:.2f} s ({len(cat)} sources), DAOStarFinder "
          f"{t_dao_big:.2f} s (ratio DAO/r1 = {t_dao_big / t_big:.2f})")


def _f50(flux, ok):
    order = np.argsort(flux)
    f, o = flux[order], ok[order].astype(float)
    edges = np.geomspace(f.min(), f.max(), 60)
    idx = np.digitize(f, edges)
    frac = np.array([o[idx == k].mean() if (idx == k).sum() > 20 else np.nan for k in range(1, len(edges))])
    centers = np.sqrt(edges[1:] * edges[:-1])
    above = np.nonzero(frac >= 0.5)[0]
    return centers[above[0]] if len(above) else np.nan


if __name__ == "__main__":
    main()
