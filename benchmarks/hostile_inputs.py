"""Hostile inputs -> behaviour (issue 8's table): one line per input, the result and the warnings.

Runs against whichever astrotrunc is importable, so the same script gives the "before" and
"after" columns: ``PYTHONPATH=<tree> python benchmarks/hostile_inputs.py``.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings

import astropy.units as u
import healpy as hp
import numpy as np
import torch
from astropy.io import fits

from astrotrunc import (Instrument, PointSourceModel, SourceDetector, find_sources, make_wcs,
                        read_map, write_map)

torch.set_num_threads(1)


def short(x, n=150):
    x = str(x).replace("\n", " ")
    return x if len(x) < n else x[:n] + "..."


def run(name, fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                res = fn()
            out = f"-> {res}"
        except Exception as e:
            out = f"-> {type(e).__name__}: {short(e)}"
    ws = sorted(
        {
            f"{w.category.__name__}({short(w.message, 200)})"
            for w in caught
            if not issubclass(w.category, (ResourceWarning, DeprecationWarning))
        }
    )
    printed = buf.getvalue().strip()
    print(
        f"* {name} {out}"
        + (f" | warnings: {ws}" if ws else "")
        + (f" | printed: {short(printed, 60)}" if printed else "")
    )


def rows(cat):
    return "None (no catalog)" if cat is None else f"{len(cat)} rows"


model = PointSourceModel.paper()
sims = model.simulate(1, seed=11)
x = sims.maps[0].numpy().astype(float)
theta = sims.theta[0].tolist()
run(
    f"reference map theta={['%.3g' % t for t in theta]}",
    lambda: rows(find_sources(x, wcs=model.wcs)),
)
run(
    "0.1 deg pixel scale WCS", lambda: rows(find_sources(x, wcs=make_wcs(128, (0, 0), 0.1 * u.deg)))
)
run("map x 1e6", lambda: rows(find_sources(x * 1e6)))
run("map / 1000", lambda: rows(find_sources(x / 1000)))
xb = PointSourceModel(instrument=Instrument(background=1.0)).simulate(1, seed=11).maps[0].numpy()
run("background 1 per pixel", lambda: rows(find_sources(xb)))
s4 = PointSourceModel(instrument=Instrument(psf=4.0)).simulate(1, seed=11)
bright = int((s4.in_map[0] & (s4.flux[0] > 10)).sum())
run(
    f"PSF sigma 4 px ({bright} sources F>10)",
    lambda: rows(find_sources(s4.maps[0].numpy(), flux_threshold=10.0)),
)
run("x * u.mJy (Quantity)", lambda: rows(find_sources(x * u.mJy)))


def spike():
    c0 = find_sources(x)
    xy = np.c_[c0["x_centroid"].value, c0["y_centroid"].value]
    # the pixel with most catalog sources within 4 px
    best = max(
        ((ix, iy) for ix in range(5, 123, 2) for iy in range(5, 123, 2)),
        key=lambda p: (np.hypot(*(xy - p).T) < 4).sum(),
    )
    near0 = (np.hypot(*(xy - best).T) < 4).sum()
    y = x.copy()
    y[best[1], best[0]] = 1e30
    c1 = find_sources(y)
    xy1 = np.c_[c1["x_centroid"].value, c1["y_centroid"].value]
    near1 = (np.hypot(*(xy1 - best).T) < 4).sum()
    return (f"{near0} sources within 4 px of the pixel before the spike, {near1} after "
            f"({len(c0)} -> {len(c1)} rows)")


run("one pixel = 1e30", spike)
run("1x1 map", lambda: rows(find_sources(np.ones((1, 1)))))
run("all-zero map", lambda: rows(find_sources(np.zeros((128, 128)))))
run("negative map (-x)", lambda: rows(find_sources(-x)))
run("threshold 0", lambda: rows(find_sources(x, threshold=0)))
run("threshold -1", lambda: rows(find_sources(x, threshold=-1)))
run("threshold NaN", lambda: rows(find_sources(x, threshold=float("nan"))))

tmp = tempfile.mkdtemp()
p = os.path.join(tmp, "obs.fits")
write_map(p, x, wcs=model.wcs)
b = open(p, "rb").read()
open(os.path.join(tmp, "trunc.fits"), "wb").write(b[: len(b) // 2])
run("truncated FITS (read_map)", lambda: read_map(os.path.join(tmp, "trunc.fits")))
with contextlib.redirect_stdout(io.StringIO()):
    hp.write_map(os.path.join(tmp, "hpx.fits"), np.arange(768.0), overwrite=True, coord="G")
with fits.open(os.path.join(tmp, "hpx.fits")) as h:
    nh = fits.BinTableHDU.from_columns(
        fits.ColDefs([fits.Column(name="T", format="D", array=np.arange(700.0))]),
        header=h[1].header,
    )
    fits.HDUList([h[0], nh]).writeto(os.path.join(tmp, "hpxbad.fits"))
run("HEALPix table of 700 values (read_map)", lambda: read_map(os.path.join(tmp, "hpxbad.fits")))


def cli(*args):
    r = subprocess.run(
        [sys.executable, "-m", "astrotrunc.cli", *args], cwd=tmp, capture_output=True, text=True
    )
    return r.returncode, short(
        r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout.strip(), 150
    )


run("CLI detect HEALPix file", lambda: cli("detect", "hpx.fits", "--out", "h.ecsv"))
open(os.path.join(tmp, "existing.reg"), "w").write("# old\n")


def partial():
    r = cli("detect", "obs.fits", "--out", "new.ecsv", "--regions", "existing.reg")
    return f"{r}; new.ecsv written: {os.path.exists(os.path.join(tmp, 'new.ecsv'))}"


run("CLI --out new.ecsv --regions existing.reg", partial)


def stale():
    cli("detect", "obs.fits", "--out", "cat.ecsv")
    write_map(os.path.join(tmp, "zero.fits"), np.zeros((128, 128)), wcs=model.wcs)
    r = cli("detect", "zero.fits", "--out", "cat.ecsv", "--overwrite", "--threshold", "1e9")
    from astropy.table import QTable

    return f"{r}; cat.ecsv now has {len(QTable.read(os.path.join(tmp, 'cat.ecsv')))} rows"


run("CLI empty result with --overwrite over an old catalog", stale)


def same():
    r = cli("detect", "obs.fits", "--out", "obs.fits", "--overwrite")
    try:
        ok = read_map(os.path.join(tmp, "obs.fits")).data.shape
    except Exception as e:
        ok = f"input destroyed ({type(e).__name__})"
    return f"{r}; input afterwards: {ok}"


run("CLI --out equal to the input map, --overwrite", same)
det = SourceDetector.from_model(model, [10.0], base_channels=4, depth=2)
dp = os.path.join(tmp, "det.safetensors")
det.save(dp)


def tamper(edit_meta=None, edit_tensors=None, name="t"):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(dp, "pt") as f:
        meta = dict(f.metadata())
    t = load_file(dp)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(t)
    out = os.path.join(tmp, name + ".safetensors")
    save_file(t, out, metadata=meta)
    return out


def depth60(m):
    c = json.loads(m["config"])
    c["depth"] = 60
    m["config"] = json.dumps(c)


def nanw(t):
    k = [k for k in t if t[k].is_floating_point()][0]
    t[k][...] = float("nan")


def badjson(m):
    m["config"] = m["config"][:-5]


def load_report(path):
    SourceDetector.load(path)
    return "loaded"


def d60():
    path = tamper(depth60, name="d60")
    code = (
        "import resource, time; t=time.time(); from astrotrunc import SourceDetector\n"
        "try:\n    SourceDetector.load(%r); print('loaded', round(time.time()-t,1), 's')\n"
        "except Exception as e:\n    print(type(e).__name__, str(e)[:150])" % path
    )
    r = subprocess.run(
        ["bash", "-c", f'ulimit -v 6000000; {sys.executable} -c "$0"', code],
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = (r.stdout.strip() or r.stderr.strip()).splitlines()
    return (f"rc={r.returncode}: {short(last[-1] if last else '', 150)} "
            "(under a 6 GB address-space limit)")


run("model file with config depth=60", d60)
run("model file with NaN weights", lambda: load_report(tamper(edit_tensors=nanw, name="nan")))
run("model file with bad metadata JSON", lambda: load_report(tamper(badjson, name="json")))
# BUNIT into the catalog
jm = PointSourceModel(flux_unit=u.Jy)
jdet = SourceDetector.from_model(jm, [10.0], base_channels=4, depth=1)
xp = os.path.join(tmp, "mjy.fits")
write_map(xp, x * 1000, wcs=model.wcs, unit="mJy")


def bunit():
    nd = read_map(xp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat = find_sources(nd, jdet, threshold=1e-3)
    return f"map unit {nd.unit}, catalog flux unit {cat['flux'].unit if cat is not None else None}"


run("BUNIT mJy map with a Jy detector", bunit)
