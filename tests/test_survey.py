"""Tests of astrotrunc.survey: all-sky HEALPix detection and many-map catalogs on Dask."""

import warnings

import healpy as hp
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable
from photutils.utils import NoDetectionsWarning

from astrotrunc import (
    HealpixMap,
    PointSourceModel,
    find_sources_healpix,
    find_sources_many,
    healpix_patches,
    healpix_point_sources,
    survey,
    write_map,
)
from astrotrunc.survey import _band_px, _edge_distance


def _inside(w, lon, lat):
    """How far inside a patch's usable interior (default settings) points are, in px."""
    return _edge_distance(w, lon, lat, (_band_px(w, 1.05), 16))

NSIDE = 256
MIN_SEP = 3.0  # deg between injected sources: each is resolved (PSF sigma 0.94 deg)


def _far_from(lon, lat, taken, sep=MIN_SEP):
    """Greedy selection of candidates at least ``sep`` deg from the taken ones and each other."""
    keep = []
    tv = [hp.ang2vec(a, b, lonlat=True) for a, b in taken]
    cos = np.cos(np.radians(sep))
    for a, b in zip(lon, lat):
        v = hp.ang2vec(a, b, lonlat=True)
        if all(v @ w < cos for w in tv):
            tv.append(v)
            keep.append((a, b))
    return keep


def _injected_positions(rng):
    """Poles, points on patch seams and random points: (lon, lat, kind) arrays, >= 200 sources."""
    patches = healpix_patches()
    margin = 16
    # poles and rings just around them
    poles = [(0.0, 90.0), (0.0, -90.0)]
    poles += [(float(lo), s * 86.0) for s in (1, -1) for lo in (0, 90, 180, 270)]
    chosen = _far_from(*zip(*poles), [])
    n_pole = len(chosen)
    # seams: where the two best patches see a point equally far inside
    lon_c = rng.uniform(0, 360, 60000)
    lat_c = np.degrees(np.arcsin(rng.uniform(-1, 1, 60000)))
    e = np.sort(np.stack([_inside(w, lon_c, lat_c) for w in patches]), axis=0)
    seam = (e[-1] - e[-2] < 0.5) & (e[-1] >= margin)
    seams = _far_from(lon_c[seam], lat_c[seam], chosen)[:90]
    chosen += seams
    n_seam = len(seams)
    # anywhere
    lon_r = rng.uniform(0, 360, 4000)
    lat_r = np.degrees(np.arcsin(rng.uniform(-1, 1, 4000)))
    chosen += _far_from(lon_r, lat_r, chosen)[:230 - len(chosen)]
    kind = ["pole"] * n_pole + ["seam"] * n_seam + ["random"] * (len(chosen) - n_pole - n_seam)
    lon, lat = np.array(chosen).T
    return lon, lat, np.array(kind)


@pytest.fixture(scope="module")
def injected():
    """An nside-256 sky of >= 200 bright sources and its all-sky catalog (2 Dask threads)."""
    rng = np.random.default_rng(42)
    lon, lat, kind = _injected_positions(rng)
    flux = rng.uniform(30, 100, lon.size)
    values = healpix_point_sources(NSIDE, lon, lat, flux, nest=True, seed=7)
    hmap = HealpixMap(values, nest=True, frame="galactic")
    cat = find_sources_healpix(hmap, workers=2, progress=False)
    return lon, lat, kind, cat


def test_healpix_injected_sources_found_exactly_once(injected):
    lon, lat, kind, cat = injected
    assert len(lon) >= 200 and (kind == "pole").sum() >= 2 and (kind == "seam").sum() >= 50
    true = SkyCoord(lon * u.deg, lat * u.deg, frame="galactic")
    sep = cat["sky_centroid"].separation(true[:, None]).deg       # (n_true, n_cat)
    within = sep < 0.625                                           # one detector pixel
    n_found = within.sum(axis=1)
    missed = [(k, round(a, 2), round(b, 2)) for k, a, b, n in zip(kind, lon, lat, n_found)
              if n != 1]
    assert not missed, f"sources not found exactly once: {missed}"
    # and nothing else: every catalog row is one of the injected sources
    assert within.sum(axis=0).tolist() == [1] * len(cat)
    assert len(cat) == len(lon)
    assert np.median(sep.min(axis=1)) < 0.3  # the 3x3 odds centroid: about a third of a pixel


def test_healpix_catalog_columns_and_meta(injected):
    cat = injected[-1]
    assert isinstance(cat, QTable)
    for name in ("id", "x_centroid", "sky_centroid", "l", "b", "flux", "peak_odds",
                 "healpix_pixel", "patch", "edge_distance"):
        assert name in cat.colnames
    assert cat["flux"].unit is not None and cat["edge_distance"].unit == u.pix
    assert cat.meta["nside"] == NSIDE and cat.meta["ordering"] == "NESTED"
    assert cat.meta["frame"] == "galactic" and cat.meta["n_patches"] == len(healpix_patches())
    np.testing.assert_array_equal(cat["id"], np.arange(1, len(cat) + 1))
    sky = cat["sky_centroid"]
    expected = hp.ang2pix(NSIDE, sky.l.deg, sky.b.deg, nest=True, lonlat=True)
    np.testing.assert_array_equal(cat["healpix_pixel"], expected)
    assert np.all(np.diff(cat["healpix_pixel"]) >= 0)
    # each source from the patch where it sits farthest from the edge (within a pixel)
    patches = healpix_patches()
    e = np.stack([_inside(w, sky.l.deg, sky.b.deg) for w in patches])
    assert np.all(cat["edge_distance"].value >= e.max(axis=0) - 1.5)


def test_patch_layout_covers_sphere_and_poles():
    for projection in ("CAR", "TAN"):
        patches = healpix_patches(projection=projection)
        lon, lat = hp.pix2ang(64, np.arange(hp.nside2npix(64)), lonlat=True)
        lon, lat = np.r_[lon, 0, 0], np.r_[lat, 90, -90]
        best = np.max([_inside(w, lon, lat) for w in patches], axis=0)
        assert best.min() >= 16  # overlap / 2 pixels inside some patch, poles included
        assert all(w.wcs.ctype[0].endswith(projection) for w in patches)


def test_healpix_file_ring_tan_and_pole(tmp_path):
    # a coarse map through a file, RING ordering, TAN patches (small and of stretch <= 1.1, for
    # speed), a source on the north pole and one on a patch centre
    tan = {"projection": "TAN", "patch_size": 64, "overlap": 16, "max_stretch": 1.1}
    patches = healpix_patches(**tan)
    lon0, lat0 = patches[20].wcs.crval
    values = healpix_point_sources(64, [0.0, lon0], [90.0, lat0], [60.0, 60.0], seed=1)
    path = tmp_path / "sky.fits"
    write_map(path, HealpixMap(values, nest=False, frame="galactic"))
    cat = find_sources_healpix(path, workers=2, progress=False, **tan)
    assert len(cat) == 2 and cat.meta["ordering"] == "RING" and cat.meta["nside"] == 64
    assert cat.meta["patch_projection"] == "TAN" and cat.meta["n_patches"] == len(patches)
    assert abs(cat["b"].to_value(u.deg)).max() > 89.5
    pole, other = cat["healpix_pixel"].tolist()
    assert pole in (0, 1, 2, 3) and other == hp.ang2pix(64, lon0, lat0, lonlat=True)


def test_healpix_nothing_found_and_bad_input():
    with pytest.warns(NoDetectionsWarning):  # (max_stretch=1.2: fewer patches, faster)
        assert find_sources_healpix(np.zeros(hp.nside2npix(16)), workers=2, max_stretch=1.2,
                                    progress=False) is None
    with pytest.raises(ValueError, match="12\\*nside\\*\\*2"):
        find_sources_healpix(np.zeros(1000), progress=False)
    with pytest.raises(ValueError, match="nside=32 was given"):
        find_sources_healpix(np.zeros(hp.nside2npix(16)), nside=32, progress=False)
    with pytest.raises(ValueError, match="no valid pixel"):
        find_sources_healpix(np.full(hp.nside2npix(16), np.nan), progress=False)
    with pytest.raises(ValueError, match="image"):
        find_sources_healpix(PointSourceModel.paper().simulate(1, seed=0).maps[0].numpy(),
                             progress=False)
    zeros = np.zeros(hp.nside2npix(16))
    for kwargs, match in [({"projection": "MOL"}, "not supported"),
                          ({"overlap": 100}, "overlap"),
                          ({"patch_size": 8}, "patch_size"),
                          ({"resolution": 2 * u.deg}, "at most"),
                          ({"workers": 0}, "workers")]:
        with pytest.raises(ValueError, match=match):
            find_sources_healpix(zeros, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# many maps
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def map_files(tmp_path_factory):
    """Three paper-model maps with WCS as FITS files."""
    d = tmp_path_factory.mktemp("maps")
    model = PointSourceModel.paper()
    sims = model.simulate(3, seed=11)
    paths = []
    for i in range(3):
        p = d / f"obs{i}.fits"
        write_map(p, sims.maps[i].numpy(), wcs=model.wcs)
        paths.append(p)
    return paths


def test_many_maps_writes_catalogs_and_merged(map_files, tmp_path):
    out = tmp_path / "cats"
    merged = find_sources_many(map_files, out_dir=out, workers=2, progress=False)
    names = ["obs0", "obs1", "obs2"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.ecsv" for n in names]
                                                           + ["merged.ecsv"])
    assert merged.colnames[0] == "map" and set(merged["map"]) <= set(names)
    total = 0
    for n in names:
        t = QTable.read(out / f"{n}.ecsv")
        assert t.meta["complete"] and t.meta["map"] == n and t["flux"].unit is not None
        total += len(t)
    assert len(merged) == total
    back = QTable.read(out / "merged.ecsv")
    assert len(back) == total and isinstance(back["sky_centroid"], SkyCoord)


def test_many_maps_resume_after_failure(map_files, tmp_path, monkeypatch):
    out = tmp_path / "cats"
    broken = tmp_path / "obs_broken.fits"
    broken.write_bytes(b"not a FITS file")
    maps = [map_files[0], broken, map_files[1]]
    # a killed earlier run left a temporary file behind
    out.mkdir()
    (out / ".obs_broken.ecsv.123-abc.tmp").write_text("partial")
    with pytest.raises(RuntimeError, match="1 of 3 maps failed:\n  obs_broken: OSError"):
        find_sources_many(maps, out_dir=out, workers=2, progress=False)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.ecsv")}
    assert sorted(done) == ["obs0.ecsv", "obs1.ecsv"]  # no merged catalog yet
    assert not list(out.glob("*.tmp"))

    # the map is repaired; the run resumes and does only that map
    model = PointSourceModel.paper()
    write_map(broken, model.simulate(1, seed=5).maps[0].numpy(), wcs=model.wcs, overwrite=True)
    calls = []
    real = survey.find_sources

    def counting(data, *args, **kwargs):
        calls.append(1)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(survey, "find_sources", counting)
    merged = find_sources_many(maps, out_dir=out, workers=2, progress=False)
    assert len(calls) == 1
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done
    assert set(merged["map"]) == {"obs0", "obs_broken", "obs1"}
    # everything finished: a third run does nothing and returns the same catalog
    again = find_sources_many(maps, out_dir=out, workers=1, progress=False)
    assert len(calls) == 1 and len(again) == len(merged)
    # overwrite=True redoes every map
    find_sources_many(maps, out_dir=out, workers=1, progress=False, overwrite=True)
    assert len(calls) == 4


def test_many_maps_bad_input(map_files, tmp_path):
    with pytest.raises(ValueError, match="no maps"):
        find_sources_many([], out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such map file"):
        find_sources_many([tmp_path / "missing.fits"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="same catalog"):
        find_sources_many([map_files[0], map_files[0]], out_dir=tmp_path)
    with pytest.raises(ValueError, match="one name per map"):
        find_sources_many(map_files, out_dir=tmp_path, names=["a"])
    # existing outputs that this run did not make are never clobbered
    out = tmp_path / "out"
    out.mkdir()
    (out / "obs0.ecsv").write_text("my own notes")
    with pytest.raises(OSError, match="overwrite=True"):
        find_sources_many(map_files[:1], out_dir=out, progress=False)
    assert (out / "obs0.ecsv").read_text() == "my own notes"
    # a finished run with other settings is not mistaken for this one
    out2 = tmp_path / "out2"
    find_sources_many(map_files[:1], out_dir=out2, workers=1, progress=False)
    with pytest.raises(OSError, match="not a finished catalog of this run"):
        find_sources_many(map_files[:1], out_dir=out2, threshold=50.0, progress=False)


def test_many_maps_in_memory_and_healpix(tmp_path):
    model = PointSourceModel.paper()
    image = model.simulate(1, seed=3).maps[0].numpy()
    # nside 64: 0.92 deg pixels, near the detector's 0.625 (at nside 32, 1.8 deg, the 8-16-16
    # detector splits the blocky source in two; the 8-16-16-32 one did not)
    sky = HealpixMap(healpix_point_sources(64, [20.0], [10.0], [80.0], seed=0))
    empty = np.zeros((64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoDetectionsWarning)
        merged = find_sources_many([image, sky, empty], out_dir=tmp_path, workers=1,
                                   progress=False)
    assert set(merged["map"]) == {"map0000", "map0001"}
    assert len(QTable.read(tmp_path / "map0002.ecsv")) == 0
    assert (merged["map"] == "map0001").sum() == 1


def test_cli_detect_many_and_single(map_files, tmp_path, capsys):
    from astrotrunc.cli import main

    out = tmp_path / "dir"
    assert main(["detect", *map(str, map_files), "--out-dir", str(out), "--workers", "2"]) == 0
    assert (out / "merged.ecsv").exists() and (out / "obs2.ecsv").exists()
    assert "merged" in capsys.readouterr().out
    # single map, single catalog: unchanged
    assert main(["detect", str(map_files[0]), "--out", str(tmp_path / "one.ecsv")]) == 0
    assert (tmp_path / "one.ecsv").exists()
    # several maps need --out-dir
    assert main(["detect", *map(str, map_files), "--out", str(tmp_path / "x.ecsv")]) == 2
    assert "--out-dir" in capsys.readouterr().err
    # a map that fails: exit status 1, the others written, the failure named
    broken = tmp_path / "broken.fits"
    broken.write_text("not FITS")
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", str(map_files[0]), str(broken), "--out-dir", str(tmp_path / "d2")])
    assert exit_info.value.code == 1 and "broken: OSError" in capsys.readouterr().err
    assert (tmp_path / "d2" / "obs0.ecsv").exists()


def test_find_sources_healpix_wcs_frame_icrs():
    # an equatorial HEALPix map: patches in its frame, sky_centroid still Galactic
    c = SkyCoord(ra=150 * u.deg, dec=-20 * u.deg, frame="icrs")
    values = healpix_point_sources(64, [150.0], [-20.0], [70.0], seed=2)
    cat = find_sources_healpix(values, nside=64, frame="icrs", workers=2, progress=False)
    assert len(cat) == 1 and cat.meta["frame"] == "icrs"
    assert cat["sky_centroid"][0].separation(c) < 0.625 * u.deg
    # the pixel holding the measured position (the true one or, the position being off by about
    # half a projected pixel, one of its neighbours)
    icrs = cat["sky_centroid"][0].icrs
    assert cat["healpix_pixel"][0] == hp.ang2pix(64, icrs.ra.deg, icrs.dec.deg, lonlat=True)
    true_pix = hp.ang2pix(64, 150.0, -20.0, lonlat=True)
    assert cat["healpix_pixel"][0] in [true_pix, *hp.get_all_neighbours(64, true_pix)]


def test_many_maps_on_a_distributed_client(map_files, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        merged = find_sources_many(map_files, out_dir=tmp_path, client=client, progress=False)
    local = find_sources_many(map_files, out_dir=tmp_path / "local", workers=1, progress=False)
    assert len(merged) == len(local) and list(merged["map"]) == list(local["map"])


def test_detection_regions_never_cross_segments():
    # regression: scipy's watershed_ift let markers flood across the background and give a
    # pixel next to one source's peak to the region of another far away; each deblended region
    # must lie in one above-threshold segment and be connected
    import math

    from photutils.segmentation import detect_sources
    from scipy import ndimage

    from astrotrunc.detection import detection_regions

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    log_odds = np.full((128, 128), -10.0)
    for _ in range(40):  # peaks of very different heights and widths
        x0, y0, h = rng.uniform(5, 123), rng.uniform(5, 123), rng.uniform(2, 30)
        log_odds = np.maximum(log_odds, h - rng.uniform(2, 8) * ((xx - x0) ** 2 + (yy - y0) ** 2))
    segments = detect_sources(log_odds, math.log(5), n_pixels=1)
    regions = detection_regions(log_odds)
    assert regions.n_labels >= segments.n_labels
    for label in regions.labels:
        inside = regions.data == label
        assert len(np.unique(segments.data[inside])) == 1
        assert ndimage.label(inside, structure=np.ones((3, 3)))[1] == 1


def test_fast_projection_matches_wcslib():
    from astrotrunc.survey import _projector, _radius

    for projection in ("CAR", "TAN"):
        for w in healpix_patches(projection=projection, max_stretch=1.3)[::4]:
            centre = hp.ang2vec(*w.wcs.crval, lonlat=True)
            vec = np.column_stack(hp.pix2vec(32, hp.query_disc(32, centre, _radius(w))))
            x, y = _projector(w)(vec)
            lon, lat = hp.vec2ang(vec, lonlat=True)
            x_ref, y_ref = w.wcs_world2pix(lon, lat, 0)
            inside = (np.abs(x_ref - 63.5) < 70) & (np.abs(y_ref - 63.5) < 70)
            np.testing.assert_allclose(x[inside], x_ref[inside], atol=1e-6)
            np.testing.assert_allclose(y[inside], y_ref[inside], atol=1e-6)
