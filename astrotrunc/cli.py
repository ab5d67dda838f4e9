"""The ``astrotrunc`` command line: ``simulate``, ``train``, ``detect``, ``infer``, ``demo``.

One function per subcommand (``_cmd_<name>``) and one parser builder per subcommand
(``_add_<name>``). Heavy packages (torch, astropy tables) are imported inside the commands, so
``astrotrunc --help`` answers at once. Every command checks all its output paths before doing any
work and writes its outputs atomically, all or none.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

__all__ = ["main"]


# ----------------------------------------------------------------------------------------------
# Outputs: checked before any work, written all-or-none
# ----------------------------------------------------------------------------------------------
def _check_outputs(outputs, overwrite, inputs=()):
    """Check every output path before work: writable, distinct, never one of the inputs."""
    from ._utils import check_writable

    paths = [check_writable(p, overwrite, option="--overwrite") for p in outputs if p]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        msg = f"two outputs are the same file: {[str(p) for p in paths]}"
        raise ValueError(msg)
    for src in inputs:
        src = Path(src).expanduser()
        for p in paths:
            if src.resolve() == p.resolve() or (p.exists() and src.exists()
                                                and os.path.samefile(src, p)):
                msg = f"output {p} is the input file; choose another name (even with --overwrite)"
                raise ValueError(msg)
    return paths


def _write_all(writers):
    """``[(path, write(tmp))]``: every file written to a temporary name first, then renamed.

    If any write fails, no output is touched (the temporary files are removed).
    """
    import tempfile

    done = []
    try:
        for path, write in writers:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in done:
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
    finally:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# simulate
# ----------------------------------------------------------------------------------------------
def _add_simulate(sub):
    s = sub.add_parser("simulate", help="simulate maps of the paper's model (FITS + truth ECSV)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", required=True, help="output FITS file")
    s.add_argument("--truth", help="output ECSV file of the true sources and θ")
    s.add_argument("--n-maps", type=int, default=1, help="number of maps (one HDU each)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args):
    if args.n_maps < 1:
        msg = f"--n-maps must be at least 1, got {args.n_maps}"
        raise ValueError(msg)
    out, *truth = _check_outputs([args.out, args.truth], args.overwrite)

    from .io import _write_images
    from .simulation import PointSourceModel

    model = PointSourceModel.paper()
    sims = model.simulate(args.n_maps, seed=args.seed)
    images = []
    for i in range(args.n_maps):
        hdr = {"SEED": args.seed, "MAP_ID": i}
        hdr.update({f"HIERARCH TRUTH {name}": value
                    for name, value in zip(model.param_names, sims.theta[i].tolist())})
        images.append(dict(data=sims.maps[i].numpy(), wcs=model.wcs, header=hdr,
                           unit=model.flux_unit, name=None if i == 0 else f"MAP{i}"))
    writers = [(out, lambda tmp: _write_images(tmp, images, overwrite=True))]
    if truth:
        table = sims.truth_table()
        table.meta["seed"] = args.seed
        writers.append((truth[0], lambda tmp: table.write(tmp, format="ascii.ecsv",
                                                          overwrite=True)))
    _write_all(writers)
    print(f"wrote {args.n_maps} map(s) of {model.shape[0]}x{model.shape[1]} pixels to {out}")
    if truth:
        print(f"wrote {len(table)} true sources to {truth[0]}")


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def _add_train(sub):
    t = sub.add_parser("train", help="train an estimator on the paper's model")
    t.add_argument("what", choices=["detector", "completeness", "photometry"],
                   help="which estimator")
    t.add_argument("--out", required=True, help="output model file (.safetensors)")
    t.add_argument("--n-train", type=int, default=4000, help="detector: simulations per epoch")
    t.add_argument("--n-val", type=int, default=400, help="validation simulations (maps)")
    t.add_argument("--n-maps", type=int, default=2000,
                   help="completeness, photometry: labelled maps")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", type=float, default=3e-3)
    t.add_argument("--channels", type=int, default=16,
                   help="detector: U-Net base channels; photometry: conv channels")
    t.add_argument("--default-flux-threshold", type=float, default=None,
                   help="detector: F_th channel find_sources uses by default")
    t.add_argument("--detector", help="completeness, photometry: detector file (default: the "
                                      "shipped one)")
    t.add_argument("--flux-threshold", type=float, default=None,
                   help="completeness (default 10), photometry (default: the detector's): F_th "
                        "channel")
    t.add_argument("--threshold", type=float, default=5.0, help="completeness: odds threshold")
    t.add_argument("--n-pixels", type=int, default=1, help="completeness: minimum region size")
    t.add_argument("--conditional", action="store_true",
                   help="completeness: S(F, l, b | θ), conditional on the population (crowding)")
    t.add_argument("--depth", type=int, default=3, help="detector: U-Net depth")
    t.add_argument("--widths", type=int, nargs="+", metavar="W", default=None,
                   help="detector: the U-Net's channels at each level, full resolution first, "
                        "instead of --channels doubled --depth times (e.g. 8 8 16 32)")
    t.add_argument("--init", help="detector: start from this detector file's weights ('default':"
                                  " the shipped detector's; the same --space-to-depth; a wider "
                                  "or deeper one gives its strongest channels and its levels "
                                  "down to --depth)")
    t.add_argument("--teacher", help="detector: distil this detector file ('default': the shipped "
                                     "one): learn its per-pixel odds instead of the true sources")
    t.add_argument("--simulation-device", default=None,
                   help="detector: simulate the training maps on this device (e.g. cuda, to "
                        "keep a GPU busy; default: the CPU)")
    t.add_argument("--space-to-depth", type=int, default=1,
                   help="detector: run the U-Net on f x f pixel blocks folded into channels "
                        "(2: about 4x faster)")
    t.add_argument("--half-size", type=int, default=7, help="photometry: cutout half size")
    t.add_argument("--hidden", type=int, default=64, help="photometry: hidden units")
    t.add_argument("--activation", choices=["silu", "relu"], default="silu",
                   help="photometry: the network's activation (relu is cheaper on CPUs)")
    t.add_argument("--architecture", choices=["conv", "strided", "dense", "patch"], default="conv",
                   help="photometry: convolutions of the cutout, the same without the "
                        "full-resolution one (strided, cheaper), dense layers on all its "
                        "pixels (cheapest), or on its 3x3 squares, each embedded alike (patch: "
                        "about as cheap as dense)")
    t.add_argument("--calibration-maps", type=int, default=600,
                   help="photometry: new maps the quantiles and flux_err are calibrated on "
                        "(0: none)")
    t.add_argument("--crowding-bins", type=int, default=4,
                   help="photometry: crowding bins of the calibration groups")
    t.add_argument("--latitude-bins", type=int, nargs=2, default=(0, 4), metavar=("NB", "NC"),
                   help="photometry: also calibration groups for maps with a WCS, by NB bins of "
                        "absolute Galactic latitude x NC crowding bins (NB = 0: none)")
    t.add_argument("--psf-calibration-maps", type=int, default=0,
                   help="photometry: maps the flux_method='psf' errors are calibrated on")
    t.add_argument("--domain-maps", type=int, default=1000,
                   help="detector: simulations whose statistics record its domain")
    t.add_argument("--name", default="astrotrunc-paper-r1")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-dir", default=None, help="checkpoint every epoch here")
    t.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel training processes on this machine (DDP: gloo on CPU, "
                        "nccl on GPUs, one GPU each); under torchrun, its ranks are used instead")
    t.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="torch.distributed backend (default: nccl on GPUs, gloo on CPU)")
    t.add_argument("--store", help="detector: simulate the training maps once into this zarr "
                                   "store (on the Dask cluster of --client) and train from it")
    t.add_argument("--client", default=None,
                   help="detector with --store: Dask scheduler address ('sync': no Dask)")
    t.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a training process waits for the others before failing")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_cmd_train)


def _cmd_train(args):
    (out,) = _check_outputs([args.out], args.overwrite,
                            inputs=[f for f in (args.detector, args.init, args.teacher) if f])
    if args.resume and not args.checkpoint_dir:
        msg = "--resume needs --checkpoint-dir (where the checkpoint is)"
        raise ValueError(msg)
    from .nre._ddp import env_rank
    from .simulation import PointSourceModel

    model = PointSourceModel.paper()
    trainer = dict(max_epochs=args.epochs, batch_size=args.batch_size,
                   learning_rate=args.learning_rate, checkpoint_dir=args.checkpoint_dir,
                   progress=not args.quiet, nproc=args.nproc, backend=args.backend,
                   timeout=args.timeout, resume=args.resume)
    try:
        est = _train(args, model, trainer)
    except RuntimeError as err:  # a training process died or the group could not form
        print(f"astrotrunc train: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    if env_rank() != 0:  # one rank of a torchrun group: rank 0 writes the file
        return
    est.save(out, overwrite=args.overwrite)
    world = est.history.meta.get("trainer", {}).get("world_size", 1)
    print(f"wrote {args.what} to {out}" + (f" (trained by {world} processes)" if world > 1
                                           else ""))


def _train(args, model, trainer):
    if args.what == "detector":
        from .detection import PAPER_FLUX_THRESHOLDS, SourceDetector

        est = SourceDetector.fit_to(model, PAPER_FLUX_THRESHOLDS, n_train=args.n_train,
                                    n_val=args.n_val, seed=args.seed,
                                    base_channels=args.channels, depth=args.depth,
                                    space_to_depth=args.space_to_depth, widths=args.widths,
                                    domain_maps=args.domain_maps, name=args.name,
                                    default_flux_threshold=args.default_flux_threshold,
                                    store=args.store, client=args.client, init=args.init,
                                    teacher=args.teacher,
                                    simulation_device=args.simulation_device,
                                    **trainer)
    elif args.what == "photometry":
        if args.store is not None:
            raise ValueError("--store is for the detector; the photometry labels its own "
                             "simulations")
        from .detection import FluxEstimator, NeuralSourceFinder, SourceDetector

        det = SourceDetector.load(args.detector) if args.detector else None
        # detections only: the finder needs no flux estimator to train one
        finder = NeuralSourceFinder(det, args.threshold, args.n_pixels, args.flux_threshold,
                                    flux_method="matched")
        est = FluxEstimator.fit_to(model, finder, n_maps=args.n_maps, n_val_maps=args.n_val,
                                   seed=args.seed, half_size=args.half_size,
                                   channels=args.channels, hidden=args.hidden,
                                   activation=args.activation,
                                   architecture=args.architecture,
                                   calibration_maps=args.calibration_maps,
                                   psf_calibration_maps=args.psf_calibration_maps,
                                   n_crowding_bins=args.crowding_bins,
                                   n_latitude_bins=args.latitude_bins[0],
                                   latitude_crowding_bins=args.latitude_bins[1], **trainer)
    else:
        if args.store is not None:
            msg = "--store is for the detector; the completeness labels its own simulations"
            raise ValueError(msg)
        from .completeness import CompletenessFunction, ConditionalCompleteness
        from .detection import NeuralSourceFinder, SourceDetector

        det = SourceDetector.load(args.detector) if args.detector else None
        f_th = 10.0 if args.flux_threshold is None else args.flux_threshold
        finder = NeuralSourceFinder(det, args.threshold, args.n_pixels, f_th)
        kind = ConditionalCompleteness if args.conditional else CompletenessFunction
        est = kind.fit_to(model, finder, n_maps=args.n_maps, n_val_maps=args.n_val,
                          seed=args.seed, **trainer)
    return est


# ----------------------------------------------------------------------------------------------
# detect
# ----------------------------------------------------------------------------------------------
def _add_detect(sub):
    d = sub.add_parser("detect", help="detect sources in FITS maps (images or HEALPix)")
    d.add_argument("map", nargs="+", help="input FITS map(s): images with WCS, or HEALPix (all "
                                          "sky, or a patch with --center, --shape, --resolution)")
    d.add_argument("--out", help="output catalog of a single map (.ecsv or .fits)")
    d.add_argument("--out-dir", help="output directory for several maps: one catalog each "
                   "plus merged.ecsv; a killed run resumes (finished maps are not redone)")
    d.add_argument("--workers", type=int, default=None,
                   help="parallel Dask workers (default: the number of CPUs)")
    d.add_argument("--regions", help="also write DS9 regions here")
    d.add_argument("--threshold", type=float, default=5.0, help="odds threshold (default 5)")
    d.add_argument("--flux-threshold", type=float, default=None, help="detector F_th channel")
    d.add_argument("--n-pixels", type=int, default=1, help="minimum region size (pixels)")
    d.add_argument("--detector", help="detector file (default: the shipped one)")
    d.add_argument("--backend", choices=["auto", "torch", "openvino", "onnxruntime"],
                   default="auto",
                   help="where the networks run: torch, OpenVINO or ONNX Runtime (faster on "
                        "CPUs; pip install 'astrotrunc[openvino]' or 'astrotrunc[onnx]'); the "
                        "same catalogs. auto (default): OpenVINO, else ONNX Runtime, when "
                        "installed")
    d.add_argument("--center", type=float, nargs=2, metavar=("L", "B"),
                   help="HEALPix input: centre (deg) of the patch to project to")
    d.add_argument("--shape", type=int, nargs=2, metavar=("NY", "NX"),
                   help="HEALPix input: patch shape in pixels")
    d.add_argument("--resolution", type=float, metavar="DEG",
                   help="HEALPix input: patch pixel size in degrees")
    d.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (an empty result writes an empty catalog)")
    d.set_defaults(func=_cmd_detect)


def _cmd_detect(args):
    if args.out_dir is not None or len(args.map) > 1 or args.out is None:
        return _cmd_detect_many(args)
    args.map = args.map[0]
    out, *regions = _check_outputs([args.out, args.regions], args.overwrite,
                                   inputs=[args.map] + ([args.detector] if args.detector else []))
    geometry = (args.center, args.shape, args.resolution)
    if any(g is not None for g in geometry) and not all(g is not None for g in geometry):
        msg = "projecting a HEALPix map needs all of --center, --shape and --resolution"
        raise ValueError(msg)

    from astropy import units as u
    from photutils.utils import NoDetectionsWarning

    from .detection import NeuralSourceFinder, SourceDetector, catalog_to_regions, empty_catalog
    from .io import HealpixMap, read_map

    kwargs = {}
    if args.center is not None:
        kwargs = dict(center=tuple(args.center), shape=tuple(args.shape),
                      resolution=args.resolution * u.deg)
    nd = read_map(args.map, **kwargs)
    det = SourceDetector.load(args.detector) if args.detector else None
    finder = NeuralSourceFinder(det, args.threshold, args.n_pixels, args.flux_threshold,
                                backend=args.backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)  # reported below
        if isinstance(nd, HealpixMap):  # the whole sky, in overlapping patches
            from .survey import find_sources_healpix

            cat = find_sources_healpix(nd, detector=det, threshold=args.threshold,
                                       flux_threshold=args.flux_threshold, workers=args.workers,
                                       backend=args.backend)
        else:
            cat = finder(nd)
    if cat is None:
        unit = nd.unit if nd.unit is not None else u.Unit(finder.detector.flux_unit)
        cat = empty_catalog(unit, finder.settings, finder.flux_method)
    fmt = "fits" if out.suffix.lower() in (".fits", ".fit") else "ascii.ecsv"
    writers = [(out, lambda tmp: cat.write(tmp, format=fmt, overwrite=True))]
    if regions:
        regs = catalog_to_regions(cat)
        writers.append((regions[0], lambda tmp: regs.write(tmp, format="ds9", overwrite=True)))
    _write_all(writers)
    print(f"wrote {len(cat)} sources to {out}" + ("" if len(cat) else " (no sources detected)"))
    if regions:
        print(f"wrote DS9 regions to {regions[0]}")


def _cmd_detect_many(args):
    """``detect a.fits b.fits ... --out-dir DIR``: one catalog per map plus a merged one."""
    if args.out_dir is None:
        msg = ("give --out FILE for the catalog of one map, or --out-dir DIR for several maps "
               "(one catalog per map plus merged.ecsv)")
        raise ValueError(msg)
    if args.out is not None or args.regions is not None:
        msg = "--out and --regions are for a single map; with --out-dir, drop them"
        raise ValueError(msg)
    from .detection import SourceDetector
    from .survey import find_sources_many

    det = SourceDetector.load(args.detector) if args.detector else None
    try:
        merged = find_sources_many(args.map, out_dir=args.out_dir, detector=det,
                                   workers=args.workers, overwrite=args.overwrite,
                                   threshold=args.threshold, flux_threshold=args.flux_threshold,
                                   backend=args.backend)
    except RuntimeError as err:  # some maps failed; the others' catalogs are written
        print(f"astrotrunc detect: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    n = 0 if merged is None else len(merged)
    print(f"wrote {len(args.map)} catalog(s) and {n} sources in all to "
          f"{args.out_dir}/merged.ecsv")


# ----------------------------------------------------------------------------------------------
# infer and demo
# ----------------------------------------------------------------------------------------------
def _cmd_infer(args):
    import shutil

    from astropy.table import QTable

    from .inference import PopulationInference
    from .io import HealpixMap, read_map

    names = ("posterior_corner", "truncated_samples", "truncation")
    plot_paths = []
    if args.plots:
        Path(args.plots).expanduser().mkdir(parents=True, exist_ok=True)
        plot_paths = [Path(args.plots).expanduser() / f"{k}.png" for k in names]
    out, *checked = _check_outputs([args.out, *plot_paths], args.overwrite,
                                   inputs=[args.map] + ([args.catalog] if args.catalog else []))
    plots = dict(zip(names, checked))
    workdir = Path(args.workdir).expanduser() if args.workdir else out.with_name(out.name + ".work")
    nd = read_map(args.map)
    if isinstance(nd, HealpixMap):
        raise ValueError(f"{args.map} is a HEALPix map: project the patch to infer on first "
                         "(astrotrunc.read_map(path, center=..., shape=..., resolution=...))")
    catalog = QTable.read(args.catalog) if args.catalog else None
    inference = PopulationInference()
    post = inference.run(nd, catalog, quick=args.quick, seed=args.seed, workdir=workdir,
                         n_rounds=args.n_rounds, n_simulations=args.n_simulations,
                         client=args.client, progress=not args.quiet)
    post.write(out, overwrite=args.overwrite)
    print(f"wrote the posterior samples to {out}")
    print(post.summary())
    if plots:
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        figs = {"posterior_corner": post.plot_corner(),
                "truncated_samples": post.plot_truncated_samples()}
        if post.truncation is not None:
            fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
            for ax, name in zip(axes, post.names):
                r = list(post.truncation["round"]) + [len(post.truncation)]
                lo = [post.meta["prior"][name]["low"]] + list(post.truncation[f"{name}_low"])
                hi = [post.meta["prior"][name]["high"]] + list(post.truncation[f"{name}_high"])
                ax.fill_between(r, lo, hi, step="post", alpha=0.4)
                ax.set(xlabel="round", title=name)
            fig.tight_layout()
            figs["truncation"] = fig
        for key, fig in figs.items():
            fig.savefig(plots[key], dpi=110, bbox_inches="tight")
            print(f"wrote {plots[key]}")
    times = post.meta["times_s"]
    print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _add_infer(sub):
    i = sub.add_parser("infer", help="population posterior of a map (r3 x detected catalog)")
    i.add_argument("map", help="input FITS map (image with WCS, the model's geometry)")
    i.add_argument("--catalog", help="its catalog (.ecsv; default: detect with the shipped r1)")
    i.add_argument("--out", required=True, help="output posterior samples (.ecsv or .fits)")
    i.add_argument("--plots", help="write posterior_corner.png, truncated_samples.png, "
                                   "truncation.png into this directory")
    i.add_argument("--quick", action="store_true", help="quick settings (a few minutes)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--n-rounds", type=int, default=None, help="TMNRE rounds of r3")
    i.add_argument("--n-simulations", type=int, default=None, help="simulations per round")
    i.add_argument("--client", default=None,
                   help="Dask scheduler address for the simulations ('sync': no Dask)")
    i.add_argument("--workdir", help="stores and checkpoints (default: OUT.work); a killed run "
                                     "resumes from it")
    i.add_argument("--keep-workdir", action="store_true", help="keep the work directory")
    i.add_argument("--quiet", action="store_true", help="no progress bars")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=_cmd_infer)


def _cmd_demo(args):
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, map_path=args.map,
             overwrite=args.overwrite, progress=not args.quiet)


def _add_demo(sub):
    m = sub.add_parser("demo", help="the whole pipeline on one map: detections, completeness, "
                                    "population posterior, plots and report.html")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--quick", action="store_true", help="quick inference (a few minutes)")
    m.add_argument("--seed", type=int, default=1, help="seed of the simulated observation")
    m.add_argument("--map", help="use this FITS map instead of a simulated observation")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    m.set_defaults(func=_cmd_demo)



# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def _parser():
    p = argparse.ArgumentParser(prog="astrotrunc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_train(sub)
    _add_detect(sub)
    _add_infer(sub)
    _add_demo(sub)
    return p


def main(argv=None):
    """Entry point of the ``astrotrunc`` command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (``sys.argv[1:]`` by default).

    Returns
    -------
    int
        0 on success, 2 on an error (printed to stderr).
    """
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
