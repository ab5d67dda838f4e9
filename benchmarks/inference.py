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
* ``truncated`` -- simulation speed (maps/s) of the truncated model of one observation's catalog,
  with the θ-averaged and the θ-conditional completeness, beside the full model.

Run: ``python benchmarks/inference.py detected --n-obs 200``
"""

import argparse
import json
import resource
import shutil
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
from astrotrunc.priors import BoxPrior
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


def _completeness(args):
    from astrotrunc.nre import RatioEstimator

    return RatioEstimator.load(args.completeness) if args.completeness else default_completeness()


def detected(args):
    model = PointSourceModel.paper()
    det, S = default_detector(), _completeness(args)
    print(f"completeness: {type(S).__name__} ({args.completeness or 'shipped'})")
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


def r3(args):
    """Local calibration of r3 (both features) on held-out truncated simulations."""
    from astrotrunc import PopulationInference
    from astrotrunc.diagnostics import coverage
    from astrotrunc.inference import InferenceSettings
    from astrotrunc.nre import RatioEstimator
    from astrotrunc.truncation import TruncatedModel

    model = PointSourceModel.paper()
    obs = model.simulate(1, seed=args.seed)
    out = {"truth": obs.theta[0].tolist()}
    print(f"observation seed {args.seed}, truth {obs.theta[0].tolist()}")
    for features in args.features.split(","):
        cfg = InferenceSettings(features=features, n_rounds=args.n_rounds,
                                n_simulations=args.n_simulations, n_samples=args.n_samples,
                                max_epochs=args.max_epochs, balance=args.balance)
        inf = PopulationInference(model, completeness=_completeness(args)
                                  if args.completeness else None, settings=cfg)
        work = OUT / f"r3_work_{features}_{args.n_rounds}x{args.n_simulations}_b{args.balance:g}"
        if work.exists():  # a finished run would be resumed, not measured
            shutil.rmtree(work)
        t0 = time.perf_counter()
        post = inf.run(obs.maps[0], workdir=work, progress=False, seed=args.seed,
                       branches=("sub-threshold",), client="sync")
        wall = time.perf_counter() - t0
        last = len(post.truncation) - 1
        est = RatioEstimator.load(work / f"round_{last}" / "r3.safetensors")
        import json as _json

        box = BoxPrior.from_dict(_json.loads((work / f"round_{last}" / "round.json").read_text())
                                 ["prior"])
        tm = TruncatedModel(model, post.regions, inf.completeness)
        held = tm.simulate(args.n_test, seed=(args.seed, 77), prior=box)
        cov = coverage(est, {"theta": held.theta, "x": est.prepare(held.maps)}, box,
                       n_test=args.n_test, n_samples=5000, levels=(0.68, 0.95))
        widths = post.widths()
        res = {"wall_s": wall, "coverage": {f"{r['marginal']}@{r['nominal']}": float(r["empirical"])
                                            for r in cov},
               "widths_68": {n: float(widths[n][0]) for n in NAMES}}
        print(f"{features}: run {wall:.0f} s; widths(68%) " +
              ", ".join(f"{k} {v:.3g}" for k, v in res["widths_68"].items()))
        print("   coverage: " + ", ".join(f"{k} {v:.3f}" for k, v in res["coverage"].items()))
        res["calibrated_width_per_minute"] = {
            n: 1.0 / (res["widths_68"][n] * max(wall / 60, 1e-3)) for n in NAMES}
        out[features] = res
    return out


def end_to_end(args):
    """PopulationInference.run on independent observations: coverage, widths, stage times."""
    from astrotrunc import PopulationInference
    from astrotrunc.inference import InferenceSettings

    model = PointSourceModel.paper()
    obs = model.simulate(args.n_obs, seed=args.seed)
    features = args.features if args.features in ("summary", "cnn") else "summary"
    cfg = (InferenceSettings.quick(features=features) if args.quick
           else InferenceSettings(features=features))
    inf = PopulationInference(model, completeness=_completeness(args) if args.completeness
                              else None, settings=cfg)
    hits, widths, times = [], [], []
    for j in range(args.n_obs):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = inf.run(obs.maps[j], seed=args.seed + j, progress=False, client="sync")
        truth = obs.theta[j].double().numpy()
        hits.append([_covered(p, truth, 0.68) for p in post.posteriors().values()])
        w = post.widths()
        widths.append([[float(w[n][k]) for n in NAMES] for k in range(len(w))])
        times.append(post.meta["times_s"])
        print(f"  obs {j}: truth {np.round(truth, 2).tolist()}, N_det {post.meta['n_detected']}, "
              f"{time.perf_counter() - t0:.0f} s, combined 68% hit {hits[-1][-1].tolist()}, "
              "68% widths (sub-threshold / detected / combined) "
              + "; ".join(f"{n} " + "/".join(f"{widths[-1][k][i]:.3g}" for k in range(3))
                          for i, n in enumerate(NAMES)), flush=True)
    hits, widths = np.array(hits), np.array(widths)  # (obs, branch, param)
    out = {"n_obs": args.n_obs, "quick": bool(args.quick), "settings": str(cfg)}
    for b, branch in enumerate(("sub-threshold", "detected", "combined")):
        cov = hits[:, b].mean(0)
        med = np.median(widths[:, b], 0)
        out[branch] = {"coverage_68": dict(zip(NAMES, cov.tolist())),
                       "median_width_68": dict(zip(NAMES, med.tolist()))}
        print(f"{branch:>13}: 68% coverage " + ", ".join(f"{n} {c:.2f}" for n, c in zip(NAMES, cov))
              + "; median 68% width " + ", ".join(f"{n} {m:.3g}" for n, m in zip(NAMES, med)))
    tighter = (widths[:, 2] <= np.minimum(widths[:, 0], widths[:, 1]) * 1.05).mean(0)
    out["combined_at_least_as_tight"] = dict(zip(NAMES, tighter.tolist()))
    print("combined at least as tight as the tighter branch (within 5%): "
          + ", ".join(f"{n} {t:.2f}" for n, t in zip(NAMES, tighter)))
    keys = times[0].keys()
    out["median_stage_s"] = {k: float(np.median([t[k] for t in times])) for k in keys}
    print("median stage times: " + ", ".join(f"{k} {v:.1f} s"
                                            for k, v in out["median_stage_s"].items()))
    return out


def truncated(args):
    """Maps per second of the truncated model (both completeness kinds) and of the full model."""
    from astrotrunc import ConditionalCompleteness, PopulationInference
    from astrotrunc.truncation import TruncatedModel

    model = PointSourceModel.paper()
    x = model.simulate(1, seed=args.seed).maps[0]
    inf = PopulationInference(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        catalog, segm = find_sources(x, wcs=model.wcs, threshold=inf.threshold,
                                     flux_threshold=inf.flux_threshold, return_segmentation=True)
    kinds = {"theta-averaged S": default_completeness(),
             "theta-conditional S": ConditionalCompleteness.load_default()}
    sims = {"full model": model.simulate}
    for name, S in kinds.items():
        regions = DetectedRegions.from_catalog(catalog, model.shape, segmentation=segm)
        tm = TruncatedModel(model, regions, S)
        sims[f"truncated, {name}"] = tm.simulate

    def rate(simulate):
        simulate(256, seed=1)  # warm-up
        t0 = time.perf_counter()
        simulate(2048, seed=2)
        return 2048 / (time.perf_counter() - t0)

    out = {"n_detected": len(catalog), "maps_per_s": {k: [] for k in sims}}
    for _ in range(2):
        for name, simulate in sims.items():
            out["maps_per_s"][name].append(rate(simulate))
    print(f"{len(catalog)} detections, 2048 maps of 128x128 after a warm-up, "
          f"{torch.get_num_threads()} threads, two passes:")
    for name, r in out["maps_per_s"].items():
        print(f"  {name:>28}: " + " / ".join(f"{v:.0f}" for v in r) + " maps/s")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["detected", "r3", "end-to-end", "truncated"])
    p.add_argument("--n-obs", type=int, default=200)
    p.add_argument("--n-samples", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--completeness", help="completeness file (default: the shipped one)")
    p.add_argument("--features", default="summary,cnn",
                   help="r3 mode: features to compare; end-to-end mode: r3's features (one of "
                        "them; 'summary' unless one is given), written to "
                        "inference_end-to-end_cnn.json for 'cnn'")
    p.add_argument("--n-rounds", type=int, default=2, help="r3 mode: TMNRE rounds")
    p.add_argument("--n-simulations", type=int, default=4096, help="r3 mode: per round")
    p.add_argument("--n-test", type=int, default=300, help="r3 mode: held-out simulations")
    p.add_argument("--max-epochs", type=int, default=40, help="r3 mode: training epochs (max)")
    p.add_argument("--balance", type=float, default=0.0, help="r3 balanced-NRE weight")
    p.add_argument("--quick", action="store_true", help="end-to-end mode: quick settings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = {"detected": detected, "r3": r3, "end-to-end": end_to_end,
           "truncated": truncated}[args.mode](args)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    OUT.mkdir(exist_ok=True)
    name = f"inference_{args.mode}" + ("_cnn" if args.mode == "end-to-end"
                                        and args.features == "cnn" else "")
    (OUT / f"{name}.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT / f'{name}.json'}")


if __name__ == "__main__":
    main()
