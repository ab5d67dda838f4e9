"""The ``astrotrunc`` command line: ``simulate``, ``train``, ``detect``."""

from __future__ import annotations

import argparse
import sys
import warnings

__all__ = ["main"]


def _check_writable(path, overwrite):
    from .io import _check_writable as check

    return check(path, overwrite, option="--overwrite")


def _cmd_simulate(args):
    from astropy.io import fits

    from .simulation import PointSourceModel

    if args.n_maps < 1:
        raise ValueError(f"--n-maps must be at least 1, got {args.n_maps}")
    out = _check_writable(args.out, args.overwrite)
    if args.truth:
        _check_writable(args.truth, args.overwrite)
    model = PointSourceModel.paper()
    sims = model.simulate(args.n_maps, seed=args.seed)
    header = model.wcs.to_header()
    hdus = []
    for i in range(args.n_maps):
        hdr = header.copy()
        hdr["BUNIT"] = (model.flux_unit.to_string(), "data unit")
        hdr["SEED"] = (args.seed, "astrotrunc simulate seed")
        hdr["MAP_ID"] = (i, "index of this map in the truth table")
        for name, value in zip(model.param_names, sims.theta[i].tolist()):
            hdr[f"HIERARCH TRUTH {name}"] = value
        data = sims.maps[i].numpy()
        hdus.append(fits.PrimaryHDU(data, hdr) if i == 0 else fits.ImageHDU(data, hdr, name=f"MAP{i}"))
    fits.HDUList(hdus).writeto(out, overwrite=args.overwrite)
    print(f"wrote {args.n_maps} map(s) of {model.shape[0]}x{model.shape[1]} pixels to {out}")
    if args.truth:
        truth = sims.truth_table()
        truth.meta["seed"] = args.seed
        truth.write(args.truth, format="ascii.ecsv", overwrite=args.overwrite)
        print(f"wrote {len(truth)} true sources to {args.truth}")


def _cmd_train(args):
    import torch

    from .simulation import PointSourceModel

    torch.manual_seed(args.seed)  # network initialisation: same command, same weights

    model = PointSourceModel.paper()
    if args.what == "detector":
        from .detection import PAPER_FLUX_THRESHOLDS, SourceDetector

        out = _check_writable(args.out, args.overwrite)
        det = SourceDetector.from_model(model, PAPER_FLUX_THRESHOLDS, base_channels=args.channels,
                                        name=args.name, default_flux_threshold=args.default_flux_threshold)
        det.train(model, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                     max_epochs=args.epochs, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, checkpoint_dir=args.checkpoint_dir,
                     progress=not args.quiet)
        det.save(out, overwrite=args.overwrite)
        print(f"wrote detector to {out}")
    elif args.what == "completeness":
        from .completeness import CompletenessFunction
        from .detection import SourceDetector

        out = _check_writable(args.out, args.overwrite)
        det = SourceDetector.load(args.detector) if args.detector else None
        comp = CompletenessFunction()
        comp.train(model, det, n_maps=args.n_maps, n_val_maps=args.n_val, seed=args.seed,
                   flux_threshold=args.flux_threshold, threshold=args.threshold,
                   max_epochs=args.epochs, batch_size=args.batch_size,
                   learning_rate=args.learning_rate, progress=not args.quiet,
                   checkpoint_dir=args.checkpoint_dir)
        comp.save(out, overwrite=args.overwrite)
        print(f"wrote completeness to {out}")


def _cmd_detect(args):
    from .detection import SourceDetector, find_sources
    from .io import HealpixMap, read_map

    if args.out_dir is not None or len(args.map) > 1 or args.out is None:
        return _cmd_detect_many(args)
    nd = read_map(args.map[0])
    det = SourceDetector.load(args.detector) if args.detector else None
    if isinstance(nd, HealpixMap):
        from .survey import find_sources_healpix

        cat = find_sources_healpix(nd, detector=det, threshold=args.threshold,
                                   flux_threshold=args.flux_threshold, workers=args.workers)
    else:
        cat = find_sources(nd, det, threshold=args.threshold, flux_threshold=args.flux_threshold)
    if cat is None:
        print("no sources detected")
        return
    out = _check_writable(args.out, args.overwrite)
    fmt = "fits" if out.suffix.lower() in (".fits", ".fit") else "ascii.ecsv"
    cat.write(out, format=fmt, overwrite=args.overwrite)
    print(f"wrote {len(cat)} sources to {out}")
    if args.regions:
        from .detection import catalog_to_regions

        _check_writable(args.regions, args.overwrite)
        catalog_to_regions(cat).write(args.regions, format="ds9", overwrite=args.overwrite)
        print(f"wrote DS9 regions to {args.regions}")


def _cmd_detect_many(args):
    """``detect a.fits b.fits ... --out-dir DIR``: one catalog per map plus a merged one."""
    from .detection import SourceDetector
    from .survey import find_sources_many

    if args.out_dir is None:
        msg = ("give --out FILE for the catalog of one map, or --out-dir DIR for several maps "
               "(one catalog per map plus merged.ecsv)")
        raise ValueError(msg)
    if args.out is not None or args.regions is not None:
        msg = "--out and --regions are for a single map; with --out-dir, drop them"
        raise ValueError(msg)
    det = SourceDetector.load(args.detector) if args.detector else None
    try:
        merged = find_sources_many(args.map, out_dir=args.out_dir, detector=det,
                                   workers=args.workers, overwrite=args.overwrite,
                                   threshold=args.threshold, flux_threshold=args.flux_threshold)
    except RuntimeError as err:  # some maps failed; the others' catalogs are written
        print(f"astrotrunc detect: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    n = 0 if merged is None else len(merged)
    print(f"wrote {len(args.map)} catalog(s) and {n} sources in all to "
          f"{args.out_dir}/merged.ecsv")


def _parser():
    p = argparse.ArgumentParser(prog="astrotrunc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate maps of the paper's model (FITS + truth ECSV)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", required=True, help="output FITS file")
    s.add_argument("--truth", help="output ECSV file of the true sources and θ")
    s.add_argument("--n-maps", type=int, default=1, help="number of maps (one HDU each)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("train", help="train an estimator on the paper's model")
    t.add_argument("what", choices=["detector", "completeness"], help="which estimator")
    t.add_argument("--out", required=True, help="output model file (.safetensors)")
    t.add_argument("--n-train", type=int, default=4000, help="detector: simulations per epoch")
    t.add_argument("--n-val", type=int, default=400, help="validation simulations (maps)")
    t.add_argument("--n-maps", type=int, default=2000, help="completeness: labelled maps")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", type=float, default=3e-3)
    t.add_argument("--channels", type=int, default=16, help="detector: U-Net base channels")
    t.add_argument("--default-flux-threshold", type=float, default=None,
                   help="detector: F_th channel find_sources uses by default")
    t.add_argument("--detector", help="completeness: detector file (default: the shipped one)")
    t.add_argument("--flux-threshold", type=float, default=10.0, help="completeness: F_th channel")
    t.add_argument("--threshold", type=float, default=5.0, help="completeness: odds threshold")
    t.add_argument("--name", default="astrotrunc-paper-r1")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-dir", default=None, help="checkpoint every epoch here")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("detect", help="detect sources in FITS maps (images or HEALPix)")
    d.add_argument("map", nargs="+", help="input FITS map(s): images with WCS or HEALPix")
    d.add_argument("--out", help="output catalog of a single map (.ecsv or .fits)")
    d.add_argument("--out-dir", help="output directory for several maps: one catalog each "
                   "plus merged.ecsv; a killed run resumes (finished maps are not redone)")
    d.add_argument("--workers", type=int, default=None,
                   help="parallel Dask workers (default: the number of CPUs)")
    d.add_argument("--regions", help="also write DS9 regions here")
    d.add_argument("--threshold", type=float, default=5.0, help="odds threshold (default 5)")
    d.add_argument("--flux-threshold", type=float, default=None, help="detector F_th channel")
    d.add_argument("--detector", help="detector file (default: the shipped one)")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=_cmd_detect)
    return p


def main(argv=None):
    """Entry point of the ``astrotrunc`` command."""
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            args.func(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"astrotrunc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
