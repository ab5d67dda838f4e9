"""Neural r4 against the exact catalog likelihood (issue 9, "Proven" 2).

Trains r4 (`~astrotrunc.inference.DetectedCatalogRatio`) on the default model and a shipped
completeness -- by default the θ-conditional S(F, s | θ) of `~astrotrunc.PopulationInference`
(``--completeness conditional``: every simulated catalog thinned with the S of its own θ; the
θ-averaged one with ``--completeness averaged``) -- then, on catalogs that the real detector
finds on full-model maps, compares the
detected-branch posteriors p(θ) exp(log p(I=1 | θ)) of the neural route
(`~astrotrunc.inference.NeuralCatalogLikelihood`) and the exact one
(`~astrotrunc.inference.CatalogLikelihood`, with the same completeness) on the same prior
draws: the Jensen-Shannon
divergence (base 2, so in [0, 1]; also printed in nats) between the 1-D marginal histograms over
the prior range, for the joint head (what multiplies r3) and for the 1-D heads. Target: ≤ 0.05.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/r4_vs_exact.py --save astrotrunc/data/r4_paper.safetensors

The trained r4 is written to ``--save`` only if every JSD meets the target. Figures go to
``benchmarks/output/r4_vs_exact.json`` (``--out``). A held-out check of a trained r4 on other maps::

    python benchmarks/r4_vs_exact.py --load astrotrunc/data/r4_paper.safetensors \
        --catalog-seed 7777 --out benchmarks/output/r4_vs_exact_heldout.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from astrotrunc import CompletenessFunction, ConditionalCompleteness, PointSourceModel, find_sources
from astrotrunc._utils import available_device
from astrotrunc.inference import (
    CatalogLikelihood,
    DetectedCatalogRatio,
    DetectedCatalogs,
    NeuralCatalogLikelihood,
    ReferenceDensity,
    completeness_record,
)
from astrotrunc.nre import Trainer, effective_sample_size
from astrotrunc.truncation import DetectedRegions, completeness_table

OUT = Path(__file__).parent / "output"
TARGET = 0.05


def jsd(p, q, base=2.0):
    """Jensen-Shannon divergence of two histograms (normalised here)."""
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / b[nz])).sum())

    return 0.5 * (kl(p, m) + kl(q, m)) / math.log(base)


def weights(log_prob):
    lp = np.asarray(log_prob, dtype=np.float64)
    w = np.exp(lp - lp[np.isfinite(lp)].max())
    w[~np.isfinite(lp)] = 0.0
    return w


def train(args, model, table):
    ref = ReferenceDensity.from_model(model, table, n_pilot=20_000, seed=args.seed)
    torch.manual_seed(args.seed)  # the network initialisation
    est = DetectedCatalogRatio(ref, n_features=args.n_features, set_hidden=args.set_hidden,
                               hidden=args.hidden, n_blocks=args.n_blocks,
                               completeness=completeness_record(table))
    data = DetectedCatalogs(model, table, est.reference_density, args.n_train, args.n_val,
                            seed=args.seed, device=args.device)
    trainer = Trainer(max_epochs=args.epochs, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, patience=args.epochs, progress=False,
                      seed=args.seed, device=args.device)
    t0 = time.perf_counter()
    history = trainer.fit(est, data)
    seconds = time.perf_counter() - t0
    for row in history:
        print(f"  epoch {int(row['epoch']):3d}  train {float(row['train_loss']):.4f}  "
              f"val {float(row['val_loss']):.4f}  {float(row['time'].value):.1f} s")
    return est.cpu(), seconds, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=65_536, help="catalogs per epoch")
    parser.add_argument("--n-val", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--set-hidden", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--n-blocks", type=int, default=1)
    parser.add_argument("--n-catalogs", type=int, default=12)
    parser.add_argument("--n-theta", type=int, default=32768, help="prior draws per catalog")
    parser.add_argument("--n-reference", type=int, default=128)
    parser.add_argument("--n-bins", type=int, default=30)
    parser.add_argument("--completeness", choices=("conditional", "averaged"),
                        default="conditional",
                        help="the shipped S(F, s | θ) (default) or the θ-averaged S(F, s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu",
                        help="where r4 trains and its catalogs are drawn (e.g. cuda); the "
                             "comparison runs on the CPU")
    parser.add_argument("--train-only", action="store_true",
                        help="stop after training (with --checkpoint: evaluate later with --load)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--catalog-seed", type=int, default=None,
                        help="seed of the observed maps (default: seed + 1000)")
    parser.add_argument("--out", default=str(OUT / "r4_vs_exact.json"), help="JSON figures")
    parser.add_argument("--load", help="evaluate this trained r4 instead of training one")
    parser.add_argument("--checkpoint", help="also write the trained r4 here (always)")
    parser.add_argument("--save", help="write the trained r4 here if it meets the target")
    args = parser.parse_args(argv)
    if args.train_only and not args.checkpoint:
        parser.error("--train-only needs --checkpoint (where the trained r4 goes)")
    try:  # before the minute of pilot catalogs, not after it
        available_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)

    model = PointSourceModel.paper()
    completeness = (ConditionalCompleteness if args.completeness == "conditional"
                    else CompletenessFunction).load_default()
    table = completeness_table(completeness, model)
    record = completeness_record(table)
    print(f"completeness: {record['kind']} ({record['identity']})")
    result = {"settings": vars(args), "target": TARGET, "completeness": record}
    if args.load:
        est = DetectedCatalogRatio.load(args.load)
        print(f"loaded r4 from {args.load}; trained against "
              f"{est.completeness or 'an unrecorded completeness'}")
    else:
        print(f"training r4 on {args.threads} threads: {args.epochs} epochs x {args.n_train} "
              f"fresh catalogs, batch {args.batch_size}")
        est, seconds, history = train(args, model, table)
        print(f"training took {seconds:.0f} s ({seconds / 60:.1f} min); best val loss "
              f"{float(np.min(history['val_loss'])):.4f}")
        result["training_seconds"] = seconds
        result["val_loss"] = [float(v) for v in history["val_loss"]]
        if args.checkpoint:
            est.save(args.checkpoint, overwrite=True,
                     metadata={"command": "benchmarks/r4_vs_exact.py", "settings": vars(args),
                               "training_seconds": seconds})
        if args.train_only:
            return

    # observations: full-model maps, catalogs from the real detector
    catalog_seed = args.seed + 1000 if args.catalog_seed is None else args.catalog_seed
    sims = model.simulate(args.n_catalogs, seed=catalog_seed)
    theta = model.prior.sample(args.n_theta, generator=args.seed + 2000)
    lo, hi = model.prior.low.numpy(), model.prior.high.numpy()
    exact0 = None
    rows, t_exact, t_neural = [], 0.0, 0.0
    names = model.param_names
    print(f"\n{'cat':>3} {'N_det':>5} {'theta_true':>22}  {'ESS':>6}  "
          + "  ".join(f"{'joint ' + n:>12}" for n in names) + "  "
          + "  ".join(f"{'1-D ' + n:>11}" for n in names))
    for c in range(args.n_catalogs):
        cat, segm = find_sources(sims.maps[c].numpy(), wcs=model.wcs,
                                 flux_threshold=completeness.flux_threshold,
                                 threshold=completeness.threshold, return_segmentation=True)
        regions = DetectedRegions.from_catalog(cat, model.shape, segmentation=segm)
        t0 = time.perf_counter()
        exact0 = (CatalogLikelihood(model, regions, table) if exact0 is None
                  else exact0.for_regions(regions))
        lp_e = exact0.log_prob(theta).numpy()
        t1 = time.perf_counter()
        neural = NeuralCatalogLikelihood(est, model, regions, n_reference=args.n_reference,
                                         seed=args.seed + c)
        lp_n = neural.log_prob(theta).numpy()
        t2 = time.perf_counter()
        t_exact, t_neural = t_exact + t1 - t0, t_neural + t2 - t1
        w_e = weights(lp_e)
        row = {"catalog": c, "n_det": regions.n, "theta_true": sims.theta[c].tolist(),
               "ess_exact": float(effective_sample_size(np.where(np.isfinite(lp_e), lp_e, -1e300))),
               "jsd_joint": {}, "jsd_1d": {}, "jsd_joint_nats": {}, "jsd_1d_nats": {}}
        w_joint = weights(lp_n[:, -1])
        for i, n in enumerate(names):
            edges = np.linspace(lo[i], hi[i], args.n_bins + 1)
            h_e = np.histogram(theta[:, i], edges, weights=w_e)[0]
            h_j = np.histogram(theta[:, i], edges, weights=w_joint)[0]
            h_1 = np.histogram(theta[:, i], edges, weights=weights(lp_n[:, i]))[0]
            row["jsd_joint"][n], row["jsd_1d"][n] = jsd(h_e, h_j), jsd(h_e, h_1)
            row["jsd_joint_nats"][n] = jsd(h_e, h_j, math.e)
            row["jsd_1d_nats"][n] = jsd(h_e, h_1, math.e)
        rows.append(row)
        true = ", ".join(f"{v:.3g}" for v in row["theta_true"])
        print(f"{c:3d} {regions.n:5d} {true:>22}  {row['ess_exact']:6.0f}  "
              + "  ".join(f"{row['jsd_joint'][n]:12.4f}" for n in names) + "  "
              + "  ".join(f"{row['jsd_1d'][n]:11.4f}" for n in names))
    max_joint = max(max(r["jsd_joint"].values()) for r in rows)
    max_1d = max(max(r["jsd_1d"].values()) for r in rows)
    ok = max_joint <= TARGET and max_1d <= TARGET
    print(f"\nmax JSD (bits): joint head {max_joint:.4f}, 1-D heads {max_1d:.4f} "
          f"(target <= {TARGET}): {'met' if ok else 'NOT met'}")
    print(f"likelihood time for {args.n_theta} draws x {args.n_catalogs} catalogs: exact "
          f"{t_exact:.1f} s, neural {t_neural:.1f} s ({args.n_reference} references)")
    result.update(catalogs=rows, max_jsd_joint=max_joint, max_jsd_1d=max_1d, target_met=ok,
                  seconds_exact=t_exact, seconds_neural=t_neural)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if args.save:
        if ok:
            meta = {"command": "benchmarks/r4_vs_exact.py", "settings": vars(args),
                    "max_jsd_joint": max_joint, "max_jsd_1d": max_1d,
                    "training_seconds": result.get("training_seconds")}
            est.save(args.save, overwrite=True, metadata=meta)
            print(f"target met: saved r4 to {args.save}")
        else:
            print(f"target not met: {args.save} not written")


if __name__ == "__main__":
    main()
