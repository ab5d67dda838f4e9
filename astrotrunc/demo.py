"""``astrotrunc demo``: the paper's pipeline end to end on one map, with a report page.

simulate (or read) an observation → detect its sources with the shipped r1 → the shipped
completeness r2 → `~astrotrunc.PopulationInference` (r3 × the catalog likelihood) → files,
plots and one self-contained HTML page (``report.html``) that shows them with the numbers and
the command that made them.
"""

from __future__ import annotations

import base64
import html
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DEMO_FILES"]

#: What ``astrotrunc demo`` writes into its output directory.
DEMO_FILES = ("observation.fits", "catalog.ecsv", "catalog.reg", "detections.png",
              "completeness.png", "truncated_samples.png", "posterior_corner.png",
              "posterior_summary.ecsv", "posterior.ecsv", "report.html")


def run_demo(out_dir, *, quick=False, seed=1, map_path=None, overwrite=False, progress=True,
             settings=None, command=None):
    """Run the whole pipeline on one observation and write every output into ``out_dir``.

    Parameters
    ----------
    out_dir : str or path-like
        Output directory (created); existing outputs are replaced only with ``overwrite``.
    quick : bool
        Quick inference settings (a few minutes on a laptop CPU).
    seed : int
        Seed of the simulated observation and of the inference.
    map_path : str, optional
        Use this FITS map (the paper model's geometry) instead of a simulated observation.
    overwrite : bool
        Replace existing outputs.
    progress : bool
        Progress bars and stage messages.
    settings : `~astrotrunc.inference.InferenceSettings`, optional
        Inference settings (overrides ``quick``).
    command : str, optional
        The command line recorded in the report.

    Returns
    -------
    dict
        ``{name: path}`` of the files written.
    """
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from .completeness import default_completeness
    from .detection import catalog_to_regions, default_detector, find_sources
    from .inference import PopulationInference
    from .io import read_map, write_map
    from .simulation import PointSourceModel

    out = Path(out_dir).expanduser()
    paths = _check_outputs(out, DEMO_FILES, overwrite)
    say = print if progress else (lambda *a, **k: None)
    times, t0 = {}, time.perf_counter()
    model = PointSourceModel.paper()
    truth_sources = truth = None
    if map_path is None:
        sims = model.simulate(1, seed=seed)
        data = sims.maps[0].numpy()
        truth = sims.theta[0].numpy().astype(float)
        truth_sources = sims.sources(0)
        source = f"simulated from PointSourceModel.paper() with seed {seed}"
        mask = None
    else:
        nd = read_map(map_path)
        if not hasattr(nd, "wcs"):
            raise ValueError(f"{map_path} is a HEALPix map: project a patch first (read_map(path, "
                             "center=..., shape=(128, 128), resolution=0.625 * u.deg))")
        data, mask = np.asarray(nd.data, float), nd.mask
        source = f"read from {map_path}"
    write_map(paths["observation.fits"], data, wcs=model.wcs, mask=mask, unit=model.flux_unit,
              overwrite=True)
    times["observation"] = time.perf_counter() - t0
    say(f"[1/4] observation {source} -> {paths['observation.fits']}")

    t1 = time.perf_counter()
    detector, completeness = default_detector(), default_completeness()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        catalog = find_sources(data, detector, wcs=model.wcs, mask=mask,
                               threshold=completeness.threshold,
                               flux_threshold=completeness.flux_threshold)
    n_det = 0 if catalog is None else len(catalog)
    if catalog is not None:
        catalog.write(paths["catalog.ecsv"], format="ascii.ecsv", overwrite=True)
        catalog_to_regions(catalog).write(str(paths["catalog.reg"]), format="ds9",
                                          overwrite=True)
    else:  # an empty catalog and region file, never a stale one
        from astropy.table import QTable

        QTable(names=("id", "x_centroid", "y_centroid")).write(paths["catalog.ecsv"],
                                                              format="ascii.ecsv", overwrite=True)
        paths["catalog.reg"].write_text("# Region file format: DS9 astropy/regions\n")
    fig = _detections_figure(data, model.wcs, catalog, truth_sources, completeness)
    fig.savefig(paths["detections.png"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    axes = completeness.plot()
    axes[0].figure.savefig(paths["completeness.png"], dpi=110, bbox_inches="tight")
    plt.close(axes[0].figure)
    times["detection + completeness"] = time.perf_counter() - t1
    say(f"[2/4] {n_det} sources detected (odds > {completeness.threshold:g}, F_th = "
        f"{completeness.flux_threshold:g}) -> {paths['catalog.ecsv']}")

    t1 = time.perf_counter()
    say("[3/4] population inference (r3 rounds, detected-catalog likelihood)")
    # the shipped pair with the θ-conditional completeness (the averaged one, plotted above,
    # makes the detected branch over-confident in crowded maps)
    inference = PopulationInference(model)
    post = inference.run(data, mask=mask, quick=quick, seed=seed, truth=truth,
                         progress=progress, settings=settings, client="sync")
    times["population inference"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    post.write(paths["posterior.ecsv"], overwrite=True)
    summary = post.summary()
    summary.write(paths["posterior_summary.ecsv"], format="ascii.ecsv", overwrite=True)
    fig = post.plot_corner()
    fig.savefig(paths["posterior_corner.png"], dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig = post.plot_truncated_samples()
    fig.savefig(paths["truncated_samples.png"], dpi=100, bbox_inches="tight")
    plt.close(fig)
    times["plots + files"] = time.perf_counter() - t1
    times["total"] = time.perf_counter() - t0
    say("[4/4] plots and report")
    cmd = command or " ".join(shlex.quote(a) for a in ["astrotrunc", *sys.argv[1:]])
    _write_report(paths, source, cmd, catalog, summary, post, truth, times)
    say(f"everything is in {out.resolve()} (open {paths['report.html'].name})")
    return paths


def _check_outputs(out_dir, names, overwrite):
    """``{name: path}`` in ``out_dir`` (created); `OSError` if any exists without ``overwrite``."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OSError(f"{out} exists and is not a directory")
    paths = {n: out / n for n in names}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OSError(f"{len(existing)} output(s) exist already (use --overwrite to replace "
                      f"them): {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}")
    out.mkdir(parents=True, exist_ok=True)
    return paths


def _detections_figure(data, wcs, catalog, truth_sources, completeness):
    import matplotlib.pyplot as plt
    from matplotlib.colors import AsinhNorm

    fig = plt.figure(figsize=(7.2, 6.4))
    ax = fig.add_subplot(projection=wcs)
    vmax = float(np.nanpercentile(data, 99.9)) or 1.0
    im = ax.imshow(np.nan_to_num(data), origin="lower", cmap="magma",
                   norm=AsinhNorm(linear_width=vmax / 30, vmin=0, vmax=vmax))
    fig.colorbar(im, ax=ax, label="data [flux units]", shrink=0.8)
    if truth_sources is not None:
        bright = truth_sources[truth_sources["in_map"]]
        ax.scatter(bright["x"].value, bright["y"].value, s=6, marker=".", color="deepskyblue",
                   alpha=0.6, label=f"true sources ({len(bright)})")
    if catalog is not None:
        ax.scatter(catalog["x_centroid"].value, catalog["y_centroid"].value, s=70,
                   facecolors="none", edgecolors="lime", linewidths=1.2,
                   label=f"detected ({len(catalog)})")
    ax.coords[0].set_axislabel("Galactic longitude")
    ax.coords[1].set_axislabel("Galactic latitude")
    ax.set_title(f"r1 detections: odds > {completeness.threshold:g}, F > "
                 f"{completeness.flux_threshold:g}")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _img(path):
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _table_html(table, floatfmt="{:.4g}"):
    units = {c: str(getattr(table[c], "unit", None) or "") for c in table.colnames}
    head = "".join(f"<th>{html.escape(c)}{f' [{html.escape(units[c])}]' if units[c] else ''}</th>"
                   for c in table.colnames)
    rows = []
    for row in table:
        cells = []
        for c in table.colnames:
            v = row[c]
            v = getattr(v, "value", v)
            text = (floatfmt.format(v) if isinstance(v, (float, np.floating))
                    else html.escape(str(v)))
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _write_report(paths, source, cmd, catalog, summary, post, truth, times):
    from . import __version__

    names = post.names
    truth_html = ("" if truth is None else "<p>True population: " + ", ".join(
        f"{n} = {t:.3g}" for n, t in zip(names, truth)) + "</p>")
    widths = post.widths()
    rows = []
    for k, v in times.items():
        rows.append((k, v))
        if k == "population inference":  # then the inference's own stages (its total is this)
            rows += [(f"population inference: {k2}", v2)
                     for k2, v2 in post.meta["times_s"].items() if k2 != "total"]
    stage = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in rows)
    cat_rows = catalog[["id", "l", "b", "flux", "peak_odds"]][:15] if catalog is not None else None
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>astrotrunc demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
code {{ background: #f4f4f4; padding: 0.1em 0.3em; }}
</style></head><body>
<h1>astrotrunc demo: detection is truncation</h1>
<p>Made by <code>{html.escape(cmd)}</code> (astrotrunc {html.escape(__version__)}).
Observation {html.escape(source)}.</p>
{truth_html}
<h2>1. Detections (r1)</h2>
<p>{post.meta['n_detected']} sources detected with odds &gt; {post.meta['threshold']:g} for
F &gt; {post.meta['flux_threshold']:g}; they define the regions R<sub>i</sub> of the truncated
model. Files: <code>catalog.ecsv</code>, <code>catalog.reg</code> (DS9).</p>
{_img(paths['detections.png'])}
{_table_html(cat_rows) if cat_rows is not None else '<p>No detections.</p>'}
<h2>2. Completeness (r2)</h2>
<p>S(F, l, b): the probability that r1 detects a source of flux F at (l, b).</p>
{_img(paths['completeness.png'])}
<h2>3. The truncated model (fig. 2 of the paper)</h2>
<p>Full-model samples look nothing like the observation; truncated-model samples reproduce its
detected sources (cyan outlines: the regions) and differ only below threshold.</p>
{_img(paths['truncated_samples.png'])}
<h2>4. Population posterior (fig. 3 of the paper)</h2>
<p>Sub-threshold (r3 on the map), detected (the catalog likelihood with the completeness) and
combined posteriors of θ = (N, σ<sub>F</sub>, h), h in degrees.</p>
{_img(paths['posterior_corner.png'])}
{_table_html(summary)}
<p>Widths of the 68 % intervals:</p>
{_table_html(widths)}
<h2>Stage times</h2>
<table><tbody>{stage}</tbody></table>
</body></html>
"""
    tmp = paths["report.html"].with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(paths["report.html"])
