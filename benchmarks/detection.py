"""r1 against photutils' finders on held-out paper-model maps (issue: r1 detector).

For each finder, the threshold is tuned to reach the same purity (default 0.95) on the maps, then
completeness per flux bin, the 50 %-completeness flux and speed are printed.

Finders, each configured fairly for crowded Galactic-plane fields:

* r1: `astrotrunc.NeuralSourceFinder` with the shipped detector (its regions and catalog
  positions, exactly as `find_sources` makes them); the F_th channel and the odds threshold are
  tuned (the network runs once per channel, the finder's ``segment``/``describe`` steps per
  threshold);
* DAOStarFinder: FWHM of the model PSF, ``min_separation=1`` px, sharpness/roundness filters
  opened wide, no border exclusion (threshold scanned);
* segmentation: `photutils.segmentation.detect_sources` + `deblend_sources` + `SourceCatalog` on
  the PSF-matched-filtered map (threshold scanned).

A detection is matched to a true source within 1.5 px, one-to-one, brightest true source first.

The figures are also written to ``benchmarks/output/detection.json``.

Run: ``python benchmarks/detection.py [--n-maps 200] [--n-tune 60] [--purity 0.95]``
"""

import argparse
import json
import os
import resource
import time
import warnings

import numpy as np
import torch
from astropy.convolution import Gaussian2DKernel, convolve_fft
from photutils.detection import DAOStarFinder
from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources
from scipy.spatial import cKDTree

from astrotrunc import NeuralSourceFinder, PointSourceModel, SourceDetector
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


def r1_log_odds(detector, flux_threshold, maps):
    """Per-pixel log r1 of every map for one F_th channel, ``(n, H, W)`` (batched network)."""
    return NeuralSourceFinder(detector, flux_threshold=flux_threshold).log_odds_batch(maps)


def r1_positions(detector, flux_threshold, data, log_odds, threshold):
    """Catalog positions of the finder with these settings, from a precomputed log-odds map."""
    finder = NeuralSourceFinder(detector, threshold, flux_threshold=flux_threshold)
    segm = finder.segment(log_odds)
    if segm is None:
        return np.zeros((0, 2))
    cat = finder.describe(data, log_odds, segm).to_table(["x_centroid", "y_centroid"])
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


def evaluate(positions_fn, items, truth, threshold):
    """Completeness flags, fluxes, purity and detection count of ``positions_fn(item, thr)``."""
    t_all, f_all, n_det, n_good = [], [], 0, 0
    for item, (txy, tf) in zip(items, truth):
        det = positions_fn(item, threshold)
        t_ok, d_ok = match(det, txy, tf)
        t_all.append(t_ok)
        f_all.append(tf)
        n_det += len(det)
        n_good += d_ok.sum()
    purity = n_good / max(n_det, 1)
    return np.concatenate(t_all), np.concatenate(f_all), purity, n_det


def _indexed(detector, flux_threshold, maps, log_odds):
    return lambda i, t: r1_positions(detector, flux_threshold, maps[i], log_odds[i], t)


def tune(positions_fn, maps, truth, low, high, purity, n_grid=10, n_iter=6):
    """Smallest threshold in [low, high] reaching ``purity``: a coarse log grid, then bisection."""
    grid = np.geomspace(low, high, n_grid)
    ok = [evaluate(positions_fn, maps, truth, t)[2:] for t in grid]
    hits = [i for i, (p, n) in enumerate(ok) if p >= purity and n > 0]
    if not hits:
        return float(grid[int(np.argmax([p for p, _ in ok]))])
    i = hits[0]
    if i == 0:
        return float(grid[0])
    lo, hi = np.log(grid[i - 1]), np.log(grid[i])
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        p, n = evaluate(positions_fn, maps, truth, np.exp(mid))[2:]
        if p >= purity and n > 0:
            hi = mid
        else:
            lo = mid
    return float(np.exp(hi))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-maps", type=int, default=200)
    p.add_argument("--n-tune", type=int, default=60, help="maps used to tune thresholds")
    p.add_argument("--purity", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=2024, help="held-out seed (training used others)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--detector", help="detector file (default: the shipped one)")
    p.add_argument("--speed-only", action="store_true", help="skip the depth figures")
    p.add_argument("--no-photutils-depth", action="store_true",
                   help="depth figures of r1 only (the photutils finders do not change)")
    p.add_argument("--speed-repeats", type=int, default=3, help="0: no speed figures")
    p.add_argument("--output", help="JSON file name in benchmarks/output (detection.json)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="where r1's network runs in the speed figures")
    p.add_argument("--device", default="cpu",
                   help="torch device of the networks (torch backend): 'cpu', 'cuda'...")
    args = p.parse_args()
    if args.backend != "torch" and torch.device(args.device).type != "cpu":
        p.error(f"--backend {args.backend} runs on the CPU: leave --device out")
    torch.set_num_threads(args.threads)

    model = PointSourceModel.paper()
    det = SourceDetector.load(args.detector) if args.detector else default_detector()
    det.to(args.device)
    n_sims = 64 if args.speed_only else args.n_maps + args.n_tune
    sims = model.simulate(max(n_sims, 64), seed=args.seed)
    maps = sims.maps.numpy().astype(np.float64)
    default_finder = NeuralSourceFinder(det)
    figures = {"detector_id": det.identity, "finder_settings": default_finder.settings,
               "device": _device_name(args.device)}
    if not args.speed_only:  # the depth runs as find_sources does by default ('auto')
        figures["depth_backend"] = default_finder.backend
        print(f"depth: r1's network runs in {figures['depth_backend']}", flush=True)
    if args.speed_repeats > 0:
        figures["speed"] = speed(det, maps, args.speed_repeats, args.threads, args.backend,
                                 args.device)
    if not args.speed_only:
        figures.update(depth(args, det, sims, maps))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
    os.makedirs(out, exist_ok=True)
    name = args.output or "detection.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(figures, f, indent=1)
    print(f"figures: {os.path.join(out, name)}")


def depth(args, det, sims, maps):
    """Tune every finder to the purity target on the tuning maps; print and return completeness
    per flux bin (with its binomial error) and F50 on the held-out maps."""
    truth = []
    for i in range(args.n_maps + args.n_tune):
        keep = sims.in_map[i].numpy()
        truth.append((np.column_stack([sims.x[i].numpy()[keep], sims.y[i].numpy()[keep]]),
                      sims.flux[i].numpy()[keep]))
    tune_maps, tune_truth = maps[:args.n_tune], truth[:args.n_tune]
    test_maps, test_truth = maps[args.n_tune:args.n_tune + args.n_maps], truth[args.n_tune:]

    bins = np.geomspace(0.1, 1000, 13)
    results = {}
    figures = {"n_maps": args.n_maps, "n_tune": args.n_tune, "purity_target": args.purity,
               "seed": args.seed, "flux_bins": bins.tolist(), "finders": {}}

    def report(name, fn, thr):
        t_ok, flux, purity, n_det = evaluate(fn, range(len(test_maps)), test_truth, thr)
        idx = np.digitize(flux, bins) - 1
        count = np.array([(idx == k).sum() for k in range(len(bins) - 1)])
        comp = np.array([t_ok[idx == k].mean() if (idx == k).any() else np.nan
                         for k in range(len(bins) - 1)])
        err = np.sqrt(comp * (1 - comp) / np.maximum(count, 1))
        results[name] = (comp, err)
        f50 = _f50(flux, t_ok)
        print(f"{name:24s} threshold {thr:9.4g}: purity {purity:.3f} on {n_det} detections, "
              f"completeness {t_ok.mean():.3f} of {len(t_ok)} true sources, F50 = {f50:.3g}",
              flush=True)
        figures["finders"][name] = {"threshold": float(thr), "purity": float(purity),
                                    "n_detections": int(n_det),
                                    "completeness": float(t_ok.mean()), "F50": float(f50),
                                    "completeness_per_bin": [None if np.isnan(c) else float(c)
                                                             for c in comp],
                                    "completeness_error_per_bin": [None if np.isnan(e) else
                                                                   float(e) for e in err],
                                    "sources_per_bin": count.tolist()}
        return t_ok.mean()

    # r1: tune the odds threshold of every F_th channel on the tuning maps, keep the best channel
    best = None
    for k, f_th in enumerate(det.flux_thresholds[:9]):
        fn_tune = _indexed(det, f_th, tune_maps, r1_log_odds(det, f_th, tune_maps))
        thr = tune(fn_tune, range(len(tune_maps)), tune_truth, 0.01, 1e4, args.purity, n_grid=13)
        t_ok, _, purity, _ = evaluate(fn_tune, range(len(tune_maps)), tune_truth, thr)
        print(f"  r1 channel F_th={f_th:7.3g}: odds threshold {thr:8.3g} -> tuning purity "
              f"{purity:.3f}, completeness {t_ok.mean():.3f}", flush=True)
        if purity >= args.purity and (best is None or t_ok.mean() > best[0]):
            best = (t_ok.mean(), k, thr)
    _, k_best, thr_best = best
    f_best = det.flux_thresholds[k_best]
    report(f"r1 F_th={f_best:.3g}",
           _indexed(det, f_best, test_maps, r1_log_odds(det, f_best, test_maps)), thr_best)
    # r1 at the paper's settings, for reference (odds > 5, default channel)
    f_def = NeuralSourceFinder(det).flux_threshold
    report(f"r1 F_th={f_def:.3g} odds>5",
           _indexed(det, f_def, test_maps, r1_log_odds(det, f_def, test_maps)), 5.0)
    del results[f"r1 F_th={f_def:.3g} odds>5"]

    idx_tune = range(len(tune_maps))
    dao = lambda maps: (lambda i, t: dao_positions(maps[i], t))  # noqa: E731
    seg = lambda maps: (lambda i, t: seg_positions(maps[i], t))  # noqa: E731
    if not args.no_photutils_depth:
        thr = tune(dao(tune_maps), idx_tune, tune_truth, 1e-3, 1e3, args.purity, n_grid=13)
        report("DAOStarFinder", dao(test_maps), thr)
        thr = tune(seg(tune_maps), idx_tune, tune_truth, 1e-3, 1e3, args.purity, n_grid=13,
                   n_iter=4)
        report("segmentation+deblend", seg(test_maps), thr)

    print("\ncompleteness per flux bin (held-out maps)")
    header = "flux bin".ljust(18) + "".join(f"{n[:20]:>22s}" for n in results)
    print(header)
    for k in range(len(bins) - 1):
        row = f"[{bins[k]:7.3g},{bins[k + 1]:7.3g})".ljust(18)
        row += "".join(f"{results[n][0][k]:15.3f} ± {results[n][1][k]:.3f}" for n in results)
        print(row)
    return figures



def _timed(fn):
    """Wall and CPU (this process, all threads) seconds of ``fn()``, and its result."""
    w0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiled maps are outside the domain of 128 x 128 maps
        res = fn()
    return time.perf_counter() - w0, time.process_time() - c0, res


def stages(finder, maps):
    """Where ``finder(m)``'s time goes on 128x128 maps: ms/map of each step, timed in the order
    the finder runs them, map after map (each step after the network finds the caches as
    ``finder(m)`` leaves them: timed stage by stage over all maps, they look 30-50 % cheaper);
    median of 3 rounds."""
    def one(m, acc):
        t = [time.perf_counter()]
        data, bad, unit, wcs = finder.prepare(m)
        t.append(time.perf_counter())
        log_odds = finder.detector.log_odds(
            data, bad, flux_threshold=finder.flux_threshold, tile_overlap=finder.tile_overlap,
            batch_size=finder.batch_size, backend=finder.backend)
        t.append(time.perf_counter())
        segm = finder.segment(log_odds, bad)
        t.append(time.perf_counter())
        cat = finder.describe(data, log_odds, segm, bad, wcs=wcs, unit=unit)
        cat._centroids
        t.append(time.perf_counter())
        cat._matched
        t.append(time.perf_counter())
        cat._flux
        t.append(time.perf_counter())
        cat.to_table()
        t.append(time.perf_counter())
        for name, a, b in zip(names, t, t[1:]):
            acc[name] += 1e3 * (b - a)

    names = ("validation (prepare)", "network (log_odds)", "segmentation + deblending",
             "positions (centroids)", "matched-filter flux", "photometry (flux columns)",
             "table (other columns)")
    rounds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one(maps[0], dict.fromkeys(names, 0.0))  # warm-up
        for _ in range(3):
            acc = dict.fromkeys(names, 0.0)
            for m in maps:
                one(m, acc)
            rounds.append(acc)
    out = {name: float(np.median([r[name] for r in rounds])) / len(maps) for name in names}
    print(f"\nwhere find_sources' time goes (128x128, {len(maps)} maps, ms/map, each step timed "
          "in the finder's order, median of 3)")
    for name, ms in out.items():
        print(f"  {name:32s} {ms:6.2f}")
    print(f"  {'sum':32s} {sum(out.values()):6.2f}")
    return out


def _device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def speed(det, maps, repeats, threads, backend="torch", device="cpu"):
    """find_sources on 128x128 maps (one by one and find_batch of 64) and on one 2048x2048 map,
    beside DAOStarFinder, ``repeats`` times (medians printed); peak RSS of the process."""
    finder = NeuralSourceFinder(det, backend=backend)
    if finder.photometry is not None:
        finder.photometry.to(device)
    _timed(lambda: finder(maps[0]))  # warm-up (builds the inference network)
    _timed(lambda: finder.find_batch(maps[:64]))
    big = np.tile(maps[0], (16, 16))
    rows = []
    for _ in range(repeats):
        r = {}
        w, c, _ = _timed(lambda: [finder(m) for m in maps[:50]])
        r["r1_128_ms"], r["r1_128_cpu_ms"] = 1e3 * w / 50, 1e3 * c / 50
        w, c, _ = _timed(lambda: finder.find_batch(maps[:64]))
        r["r1_batch64_ms"], r["r1_batch64_cpu_ms"] = 1e3 * w / 64, 1e3 * c / 64
        w, c, _ = _timed(lambda: [dao_positions(m, 1.0) for m in maps[:50]])
        r["dao_128_ms"], r["dao_128_cpu_ms"] = 1e3 * w / 50, 1e3 * c / 50
        w, c, cat = _timed(lambda: finder(big))
        r["r1_2048_s"], r["r1_2048_cpu_s"], r["n_sources_2048"] = w, c, len(cat)
        w, c, _ = _timed(lambda: dao_positions(big, 1.0))
        r["dao_2048_s"], r["dao_2048_cpu_s"] = w, c
        rows.append(r)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    steps = stages(finder, maps[:50])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"\nspeed ({backend} backend on {_device_name(device)}, {threads} threads, median of "
          f"{repeats}; wall / CPU of the process; load average {os.getloadavg()[0]:.1f})")
    print(f"  128x128 find_sources   {med['r1_128_ms']:7.1f} ms/map  (CPU "
          f"{med['r1_128_cpu_ms']:.1f})   DAOStarFinder {med['dao_128_ms']:6.1f} ms/map  (CPU "
          f"{med['dao_128_cpu_ms']:.1f})")
    print(f"  128x128 find_batch(64) {med['r1_batch64_ms']:7.1f} ms/map  (CPU "
          f"{med['r1_batch64_cpu_ms']:.1f})")
    print(f"  2048x2048 find_sources {med['r1_2048_s']:7.2f} s       (CPU "
          f"{med['r1_2048_cpu_s']:.2f}; {med['n_sources_2048']:.0f} sources)   DAOStarFinder "
          f"{med['dao_2048_s']:5.2f} s  (CPU {med['dao_2048_cpu_s']:.2f})")
    print(f"  peak RSS of the process {rss:.0f} MB")
    return dict(med, threads=threads, repeats=repeats, peak_rss_mb=rss, stages_ms=steps,
                backend=backend, device=_device_name(device),
                load_average=os.getloadavg()[0], detector_id=det.identity)


def _f50(flux, ok):
    order = np.argsort(flux)
    f, o = flux[order], ok[order].astype(float)
    edges = np.geomspace(f.min(), f.max(), 60)
    idx = np.digitize(f, edges)
    frac = np.array(
        [o[idx == k].mean() if (idx == k).sum() > 20 else np.nan for k in range(1, len(edges))]
    )
    centers = np.sqrt(edges[1:] * edges[:-1])
    above = np.nonzero(frac >= 0.5)[0]
    return centers[above[0]] if len(above) else np.nan


if __name__ == "__main__":
    main()
