"""r1: labels, the U-Net, tiling, the finder and its catalogs, training, the shipped detector."""

import importlib.util
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable
from photutils.utils import NoDetectionsWarning

from astrotrunc import NeuralSourceFinder, PointSourceModel, SourceDetector, find_sources
from astrotrunc.detection import (DetectionSimulations, catalog_to_regions, default_detector,
                                  detection_labels)
from astrotrunc.detection.tiling import tiled
from astrotrunc.detection.unet import UNet
from astrotrunc.nre import Trainer


@pytest.fixture(scope="module")
def model():
    return PointSourceModel.paper()


class _FixedOdds(SourceDetector):
    """A detector whose log-odds map is given: isolates the catalog logic from the network."""

    def set_map(self, log_odds):
        self._fixed = np.asarray(log_odds, dtype=float)
        return self

    def log_odds(self, data, mask=None, *, flux_threshold=None, **kwargs):
        out = self._fixed.copy()
        if mask is not None:
            out[np.asarray(mask)] = -np.inf
        return out


def _blobs(shape, centres, peak=6.0):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    lo = np.full(shape, -8.0)
    for x0, y0 in centres:
        lo = np.maximum(lo, peak - ((xx - x0) ** 2 + (yy - y0) ** 2))
    return lo


def test_detection_labels(model):
    sims = model.simulate(3, seed=1)
    thr = [1.0, 10.0]
    lab = detection_labels(sims, thr)
    assert lab.shape == (3, 2, 128, 128)
    for i in range(3):
        for k, f in enumerate(thr):
            sel = sims.in_map[i] & (sims.flux[i] > f)
            ix = torch.floor(sims.x[i][sel] + 0.5).long()
            iy = torch.floor(sims.y[i][sel] + 0.5).long()
            expected = torch.zeros(128, 128)
            expected[iy, ix] = 1
            assert torch.equal(lab[i, k], expected)
    assert (lab[:, 1] <= lab[:, 0]).all()  # cumulative in F_th


def test_unet_any_shape():
    net = UNet(1, 3, base_channels=4, depth=2)
    assert net(torch.zeros(2, 1, 37, 50)).shape == (2, 3, 37, 50)


def test_tiling_matches_full_map():
    x = torch.randn(300, 211)
    def local(t):
        return torch.nn.functional.avg_pool2d(t[:, None], 3, 1, 1, count_include_pad=True)[:, 0]

    full = local(x[None])[0]
    out = tiled(local, x, (64, 64), overlap=8, batch_size=5)
    assert torch.allclose(out, full, atol=1e-6)


def test_find_sources_catalog(model):
    det = _FixedOdds.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    det.set_map(_blobs((128, 128), [(20.0, 30.0), (100.3, 64.0)]))
    data = model.simulate(1, seed=2).maps[0].numpy()
    cat, segm = find_sources(data, det, wcs=model.wcs, return_segmentation=True)
    assert isinstance(cat, QTable) and len(cat) == 2
    assert cat.colnames == ["id", "x_centroid", "y_centroid", "sky_centroid", "l", "b", "flux",
                            "flux_err", "flux_lo", "flux_hi", "flux_matched", "peak_odds",
                            "detection_probability", "n_pixels", "label"]
    assert cat.meta["flux_method"] == "matched"  # a detector with no flux estimator
    assert cat["x_centroid"].unit == u.pix and cat["l"].unit == u.deg
    np.testing.assert_allclose(cat["x_centroid"].value, [20.0, 100.3], atol=0.05)
    np.testing.assert_allclose(cat["y_centroid"].value, [30.0, 64.0], atol=0.05)
    sky = model.wcs.pixel_to_world(cat["x_centroid"].value, cat["y_centroid"].value)
    assert np.allclose(cat["sky_centroid"].separation(sky).deg, 0, atol=1e-8)
    assert cat["sky_centroid"].frame.name == "galactic"
    assert np.all(cat["peak_odds"] > 5) and np.all(cat["detection_probability"] > 0.8)
    assert np.all(cat["detection_probability"] <= 1)
    assert cat.meta["threshold"] == 5.0 and cat.meta["flux_threshold"] == 10.0
    assert set(np.unique(segm.data)) == {0, 1, 2}
    # a WCS with a third (spectral) axis: its celestial part gives the same coordinates
    cube = model.wcs.sub([1, 2, 0])
    cube.wcs.ctype[2], cube.wcs.crval[2], cube.wcs.cdelt[2] = "FREQ", 1e9, 1e6
    finder = NeuralSourceFinder(det)
    bad = np.zeros(data.shape, bool)
    in_cube = finder.describe(data, finder.detector.log_odds(data), segm, bad,
                              wcs=cube).to_table()
    assert cube.naxis == 3 and cube.has_celestial
    np.testing.assert_array_equal(in_cube["b"], cat["b"])
    assert in_cube.meta["pixel_scale_deg"] == cat.meta["pixel_scale_deg"]
    # l and b are the Galactic coordinates of the centroids, read straight from a Galactic WCS
    # or through the frame transformation of another, latitude axis first or not
    np.testing.assert_allclose(cat["l"].to_value(u.deg), sky.l.wrap_at(180 * u.deg).deg,
                               atol=1e-9)
    np.testing.assert_allclose(cat["b"].to_value(u.deg), sky.b.deg, atol=1e-9)
    equatorial = model.wcs.deepcopy()
    equatorial.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    equatorial.wcs.crval = [266.4, -28.9]
    for w in (equatorial, model.wcs.swapaxes(0, 1), equatorial.swapaxes(0, 1)):
        got = finder.describe(data, finder.detector.log_odds(data), segm, bad,
                              wcs=w).to_table()
        ref = w.pixel_to_world(got["x_centroid"].value, got["y_centroid"].value).galactic
        assert got["sky_centroid"].frame.name == "galactic"
        assert np.allclose(got["sky_centroid"].separation(ref).deg, 0, atol=1e-9)
        np.testing.assert_allclose(got["l"].to_value(u.deg), ref.l.wrap_at(180 * u.deg).deg,
                                   atol=1e-9)
        np.testing.assert_allclose(got["b"].to_value(u.deg), ref.b.deg, atol=1e-9)
    # the tables share no memory with the catalog they came from (nor with each other)
    for w in (model.wcs, None):
        regions = finder.describe(data, finder.detector.log_odds(data), segm, bad, wcs=w)
        first = regions.to_table()
        for name in first.colnames:
            if name == "sky_centroid":
                first[name][:] = SkyCoord(1 * u.deg, 2 * u.deg, frame="galactic")
            else:
                first[name][:] = 0
        second = regions.to_table()
        assert np.all(second["flux"] > 0) and np.all(second["label"] == [1, 2])
        assert np.all(second["n_pixels"] > 0) and np.all(second["id"] == [1, 2])
        if w is None:  # no sky: NaN positions, in the Galactic frame
            assert second["sky_centroid"].frame.name == "galactic"
            assert np.isnan(second["sky_centroid"].l.deg).all()
        else:
            np.testing.assert_array_equal(second["b"], cat["b"])
            assert np.allclose(second["sky_centroid"].separation(sky).deg, 0, atol=1e-8)
    # a higher odds threshold shrinks the regions
    cat_hi = find_sources(data, det, wcs=model.wcs, threshold=100.0)
    assert np.all(cat_hi["n_pixels"] < cat["n_pixels"])
    # DS9 regions through the regions package
    regs = catalog_to_regions(cat)
    assert len(regs) == 2 and "circle" in regs.serialize(format="ds9")


def test_flux_estimate_recovers_isolated_source(model):
    det = SourceDetector.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    mu = model.render(torch.tensor([[50.0]]), torch.tensor([[40.0]]), torch.tensor([[70.0]]),
                      torch.tensor([[True]]))
    data = model.observe(mu.repeat(200, 1, 1), torch.Generator().manual_seed(0)).numpy()
    est = np.array([det.estimate_flux(d, [40.0], [70.0]) for d in data])[:, :, 0]
    assert abs(est[:, 0].mean() - 50.0) < 0.5
    assert 0.7 < est[:, 0].std() / est[:, 1].mean() < 1.3  # the error bar is honest


def test_no_detections_and_finder(model):
    det = _FixedOdds.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    det.set_map(np.full((128, 128), -5.0))
    data = np.ones((128, 128))
    with pytest.warns(NoDetectionsWarning):
        assert find_sources(data, det) is None
    det.set_map(_blobs((128, 128), [(64, 64)]))
    finder = NeuralSourceFinder(det, threshold=5)
    cat = finder(data)
    assert len(cat) == 1 and np.isnan(cat["l"][0].value)  # no WCS: pixel coordinates only


def test_masked_pixels_are_excluded(model):
    det = _FixedOdds.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    det.set_map(_blobs((128, 128), [(20, 20), (90, 90)]))
    data = np.ones((128, 128))
    data[85:96, 85:96] = np.nan
    with pytest.warns(Warning, match="NaN or infinite pixel"):
        cat = find_sources(data, det)
    assert len(find_sources(data, det, mask=~np.isfinite(data))) == 1  # masked: no warning
    assert len(cat) == 1 and abs(cat["x_centroid"][0].value - 20) < 0.1


@pytest.mark.parametrize(
    "data, kwargs, err, match",
    [
        (np.zeros((2, 128, 128)), {}, ValueError, "2-D"),
        (np.full((128, 128), np.nan), {}, ValueError, "masked or not finite"),
        (np.zeros((128, 128)), {"mask": np.ones((128, 128), bool)}, ValueError, "masked"),
        (np.zeros((128, 128)), {"mask": np.zeros((5, 5), bool)}, ValueError, "mask shape"),
        (np.array([["a"] * 4] * 4), {}, ValueError, "numeric"),
        (np.zeros((64, 64)), {"wcs": "paper"}, ValueError, "WCS describes"),
        (np.zeros((128, 128)), {"detector": "detector.safetensors"}, TypeError, "SourceDetector"),
    ],
)
def test_bad_input(model, data, kwargs, err, match):
    if kwargs.get("wcs") == "paper":
        kwargs["wcs"] = model.wcs
    kwargs.setdefault(
        "detector",
        _FixedOdds.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2).set_map(
            np.zeros((128, 128))
        ),
    )
    with pytest.raises(err, match=match):
        find_sources(data, **kwargs)


def test_integer_maps_do_not_overflow(model):
    det = _FixedOdds.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    det.set_map(_blobs((128, 128), [(64, 64)]))
    data = np.full((128, 128), 60000, dtype=np.uint16)
    cat = find_sources(data, det)
    assert np.isfinite(cat["flux"].value).all() and cat["flux"][0].value > 0


def test_detector_file_roundtrip_and_bad_file(model, tmp_path):
    det = SourceDetector.from_model(model, flux_thresholds=[1.0, 10.0], base_channels=4, depth=2)
    path = tmp_path / "det.safetensors"
    det.save(path)
    with pytest.raises(OSError, match="overwrite"):
        det.save(path)
    back = SourceDetector.load(path)
    assert back.identity == det.identity and back.flux_thresholds == (1.0, 10.0)
    x = model.simulate(1, seed=0).maps
    assert torch.equal(back.eval()({"x": x}), det.eval()({"x": x}))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises((ValueError, OSError)):
        SourceDetector.load(junk)


def test_training_goes_through_the_engine(model):
    det = SourceDetector.from_model(model, flux_thresholds=[3.0, 30.0], base_channels=4, depth=2)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    data = DetectionSimulations(model, det.flux_thresholds, n_train=48, n_val=16, seed=1)
    hist = Trainer(max_epochs=2, batch_size=16, progress=False, learning_rate=3e-3,
                   seed=1).fit(det, data)
    assert len(hist) == 2 and det.training is False
    assert any(not torch.equal(before[k], v) for k, v in det.state_dict().items())
    # train(mode) is torch's switch, in both directions; a model instead of a bool is refused
    assert det.train(True) is det and det.training is True
    assert det.train(False).training is False
    with pytest.raises(TypeError, match="fit_to"):
        det.train(model)
    assert det.training is False


def test_fit_to_is_reproducible_and_records_the_domain(model):
    kw = dict(n_train=16, n_val=8, base_channels=4, depth=1, domain_maps=20, max_epochs=1,
              batch_size=8, progress=False, seed=3)
    a = SourceDetector.fit_to(model, [10.0], **kw)
    b = SourceDetector.fit_to(model, [10.0], **kw)
    assert a.identity == b.identity and len(a.history) == 1 and a.training is False
    dom = a.domain
    assert dom["pixel_scale_deg"] == pytest.approx(0.625) and dom["psf_sigma_px"] == 1.5
    assert dom["exposure"] == 100.0 and dom["statistics"]["n_maps"] == 20
    lo, hi = dom["statistics"]["p99"]
    assert 0 < lo <= hi


def test_fit_to_init_starts_from_the_given_weights(model, tmp_path):
    kw = dict(n_train=8, n_val=4, base_channels=4, depth=1, domain_maps=0, max_epochs=1,
              batch_size=4, progress=False)
    a = SourceDetector.fit_to(model, [10.0], **kw)
    a.save(tmp_path / "a.safetensors")
    # a vanishing learning rate: the weights stay those of ``a`` (not a new initialisation)
    b = SourceDetector.fit_to(model, [10.0], init=tmp_path / "a.safetensors", seed=3,
                              learning_rate=1e-12, **kw)
    start = dict(a.net.named_parameters())
    assert all(torch.allclose(p, start[n], atol=1e-8) for n, p in b.net.named_parameters())
    assert b.history.meta["trainer"]["init"] == a.identity
    b.save(tmp_path / "b.safetensors")
    assert SourceDetector.load(tmp_path / "b.safetensors").metadata["training"]["init"] == (
        a.identity)
    for bad in ({"base_channels": 6}, {"depth": 2}, {"space_to_depth": 2}):  # wider, deeper
        with pytest.raises(ValueError, match="init must have"):
            SourceDetector.fit_to(model, [10.0], init=a, **{**kw, **bad})
    with pytest.raises(ValueError, match="init must have"):
        SourceDetector.fit_to(model, [11.0], init=a, **kw)
    # a narrower network starts from a's strongest channels (full resolution: all of them)
    n = SourceDetector.fit_to(model, [10.0], init=a, learning_rate=1e-12,
                              **{**kw, "widths": [4, 4]})
    assert n.history.meta["trainer"]["init"] == a.identity
    assert torch.allclose(n.net.down[0][0].weight, a.net.down[0][0].weight, atol=1e-8)
    assert not torch.allclose(n.net.down[1][0].weight, a.net.down[1][0].weight[:4], atol=1e-8)
    # a shallower network starts from a's levels down to its depth
    s = SourceDetector.fit_to(model, [10.0], init=a, learning_rate=1e-12,
                              **{**kw, "widths": [4]})
    assert s.depth == 0 and s.history.meta["trainer"]["init"] == a.identity
    assert torch.allclose(s.net.down[0][3].weight, a.net.down[0][3].weight, atol=1e-8)
    # a's architecture given as widths is a's architecture
    SourceDetector.fit_to(model, [10.0], init=a, **{**kw, "widths": [4, 8]})
    # thresholds equal to float rounding (as a file's JSON may write them) are the same
    SourceDetector.fit_to(model, [10.0 * (1 + 1e-15)], init=a, **kw)
    # simulations on a named device (the trainer's GPU in practice) are recorded
    c = SourceDetector.fit_to(model, [10.0], simulation_device="cpu", **kw)
    assert c.history.meta["trainer"]["simulation_device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            SourceDetector.fit_to(model, [10.0], simulation_device="cuda", **kw)
    with pytest.raises(ValueError, match="unknown device"):
        SourceDetector.fit_to(model, [10.0], simulation_device="gpu9", **kw)
    with pytest.raises(ValueError, match="simulation_device"):
        SourceDetector.fit_to(model, [10.0], simulation_device="cpu",
                              store=tmp_path / "s.zarr", **kw)
    # the shipped detector as the start of a fine-tuning run of the paper model
    from astrotrunc.detection import PAPER_FLUX_THRESHOLDS
    from astrotrunc.detection.estimator import _initial_weights

    ship = default_detector()
    fresh = SourceDetector.from_model(model, PAPER_FLUX_THRESHOLDS, widths=ship.widths)
    assert _initial_weights(fresh, ship) == ship.identity
    shipped = dict(ship.net.named_parameters())
    assert all(torch.equal(p, shipped[n]) for n, p in fresh.net.named_parameters())


def test_shipped_detector_finds_bright_sources(model):
    det = default_detector()
    assert os.path.getsize(det._source_path) <= 5 * 2**20
    # a sparse field (thin disk) with three bright sources injected far from the plane
    theta = torch.tensor([[100.0, 1.0, 2.0]])
    base = model.simulate(1, seed=5, theta=theta, noise=False).maps
    pos = [(20.0, 20.0), (100.0, 30.0), (60.0, 110.0)]
    inj = model.render(torch.full((1, 3), 100.0), torch.tensor([[p[0] for p in pos]]),
                       torch.tensor([[p[1] for p in pos]]), torch.ones(1, 3, dtype=torch.bool))
    data = model.observe(base + inj, torch.Generator().manual_seed(1))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat = find_sources(data, wcs=model.wcs, flux_threshold=10.0)
    xy = np.column_stack([cat["x_centroid"].value, cat["y_centroid"].value])
    for p in pos:
        d = np.hypot(*(xy - np.array(p)).T)
        assert d.min() < 1.5, f"bright source at {p} not found"
        assert math.isclose(cat["flux"][d.argmin()].value, 100.0, rel_tol=0.2)


# ----------------------------------------------------------------------------------------------
# The finder's settings, the detector's domain, hostile maps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, err, match", [
    ({"threshold": 0}, ValueError, "threshold must be positive"),
    ({"threshold": -1.0}, ValueError, "threshold must be positive"),
    ({"threshold": float("nan")}, ValueError, "threshold must be positive"),
    ({"threshold": "high"}, TypeError, "threshold must be a positive number"),
    ({"n_pixels": 0}, ValueError, "n_pixels"),
    ({"n_pixels": 1.5}, ValueError, "n_pixels"),
    ({"flux_threshold": 7.0}, ValueError, "not one of the detector's thresholds"),
    ({"flux_threshold": float("nan")}, ValueError, "flux_threshold must be positive"),
    ({"deblend": "yes"}, TypeError, "deblend"),
    ({"tile_overlap": 500}, ValueError, "tile_overlap"),
])
def test_finder_settings_are_validated_once(kwargs, err, match):
    with pytest.raises(err, match=match):
        NeuralSourceFinder(**kwargs)


def test_finder_records_every_setting_in_the_catalog(model):
    finder = NeuralSourceFinder(threshold=3.0, n_pixels=1, flux_threshold=10.0, deblend=False,
                                tile_overlap=16)
    cat = finder(model.simulate(1, seed=3).maps[0], wcs=model.wcs)
    assert {k: cat.meta[k] for k in finder.settings} == finder.settings
    assert cat.meta["deblend"] is False and cat.meta["tile_overlap"] == 16
    assert "NeuralSourceFinder(" in repr(finder)


@pytest.fixture(scope="module")
def paper_map(model):
    return model.simulate(1, seed=11).maps[0].numpy().astype(float)


def _domain_warnings(data, **kwargs):
    from astrotrunc import OutOfDomainWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        find_sources(data, **kwargs)
    return " ".join(str(w.message) for w in caught if issubclass(w.category, OutOfDomainWarning))


def test_maps_like_the_training_maps_raise_no_domain_warning(model, paper_map):
    assert _domain_warnings(paper_map, wcs=model.wcs) == ""
    for seed in range(3):
        assert _domain_warnings(model.simulate(1, seed=100 + seed).maps[0]) == ""


def test_map_statistics_quantiles_are_numpys():
    from astrotrunc.detection.domain import _QUANTILES, _quantiles, map_statistics

    rng = np.random.default_rng(5)
    for values in (rng.normal(size=1), rng.normal(size=2), rng.poisson(3.0, 1001) / 7.0,
                   rng.normal(size=16384), np.repeat(rng.normal(size=5), 7)):
        assert np.array_equal(_quantiles(np.sort(values), _QUANTILES),
                              np.quantile(values, _QUANTILES))
    data, bad = rng.normal(size=(40, 50)), rng.random((40, 50)) < 0.3
    stats = map_statistics(data, bad)
    expected = np.quantile(data[~bad], _QUANTILES)
    assert [stats["p1"], stats["p50"], stats["p99"]] == list(expected)
    assert (stats["min"], stats["max"]) == (data[~bad].min(), data[~bad].max())


@pytest.mark.parametrize("case, match", [
    ("pixel_scale", "pixel scale is 0.1 deg"),
    ("times_1e6", "99th-percentile pixel value"),
    ("over_1000", "99th-percentile pixel value"),
    ("background", "median pixel value"),
    ("psf4", "PSF width measured on the map"),
    ("zero", "the map is constant"),
    ("negative", "1st-percentile pixel value"),
])
def test_maps_outside_the_domain_are_named(model, paper_map, case, match):
    from astrotrunc import Instrument, make_wcs

    kwargs = {}
    data = paper_map
    if case == "pixel_scale":
        kwargs["wcs"] = make_wcs(128, (0, 0), 0.1 * u.deg)
    elif case == "times_1e6":
        data = paper_map * 1e6
    elif case == "over_1000":
        data = paper_map / 1000
    elif case == "background":
        data = PointSourceModel(instrument=Instrument(background=1.0)).simulate(1, seed=11).maps[0]
    elif case == "psf4":
        data = PointSourceModel(instrument=Instrument(psf=4.0)).simulate(1, seed=11).maps[0]
    elif case == "zero":
        data = np.zeros((128, 128))
    elif case == "negative":
        data = -paper_map
    message = _domain_warnings(data, **kwargs)
    assert match in message and "retrain" in message


def test_quantity_maps_are_converted_or_refused(model, paper_map):
    with pytest.raises(ValueError, match="does not convert to the detector's flux unit"):
        find_sources(paper_map * u.mJy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = find_sources(paper_map)
        same = find_sources(paper_map * u.dimensionless_unscaled)
    assert len(plain) == len(same)
    # a detector in Jy: a map in mJy is converted, and the catalog keeps the map's unit
    jy = PointSourceModel(flux_unit=u.Jy)
    det = _FixedOdds.from_model(jy, flux_thresholds=[10.0], base_channels=4, depth=1)
    det.set_map(_blobs((128, 128), [(64, 64)]))
    in_jy = find_sources(paper_map * u.Jy, det)
    in_mjy = find_sources((paper_map * 1000) * u.mJy, det)
    assert in_mjy["flux"].unit == u.mJy and in_jy["flux"].unit == u.Jy
    assert u.allclose(in_mjy["flux"], in_jy["flux"])


def test_non_physical_pixel_is_masked_and_its_neighbours_survive(paper_map):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = find_sources(paper_map)
    xy = np.c_[clean["x_centroid"].value, clean["y_centroid"].value]
    # the pixel with most catalogued sources within 4 px
    grid = [(ix, iy) for ix in range(5, 123, 2) for iy in range(5, 123, 2)]
    best = max(grid, key=lambda p: (np.hypot(*(xy - p).T) < 4).sum())
    near = np.hypot(*(xy - best).T) < 4
    assert near.sum() >= 3
    spiked = paper_map.copy()
    spiked[best[1], best[0]] = 1e30
    with pytest.warns(Warning, match="not physical for this detector"):
        cat = find_sources(spiked)
    xy2 = np.c_[cat["x_centroid"].value, cat["y_centroid"].value]
    for p in xy[near]:
        assert np.hypot(*(xy2 - p).T).min() < 1.0, f"source at {p} lost next to the bad pixel"


def test_tiny_maps(model):
    with pytest.raises(ValueError, match="too small"):
        find_sources(np.ones((1, 1)))
    with pytest.raises(ValueError, match="too small"):
        find_sources(np.ones((2, 50)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat = find_sources(np.ones((3, 3)))
    assert cat is None or len(cat) >= 0


def _tampered(det, tmp_path, name, config=None, tensors=None, raw_config=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "det.safetensors"
    if not path.exists():
        det.save(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    if config:
        cfg = json.loads(meta["config"])
        cfg.update(config)
        meta["config"] = json.dumps(cfg)
    if raw_config is not None:
        meta["config"] = raw_config
    if tensors:
        tensors(state)
    out = tmp_path / f"{name}.safetensors"
    save_file(state, str(out), metadata=meta)
    return out


def test_tampered_model_files_are_refused_before_building(model, tmp_path):
    det = SourceDetector.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    with pytest.raises(ValueError, match="cannot rebuild"):
        SourceDetector.load(_tampered(det, tmp_path, "d60", config={"depth": 60}))
    with pytest.raises(ValueError, match="do not fit"):  # valid config, other shapes
        SourceDetector.load(_tampered(det, tmp_path, "d3", config={"depth": 3}))
    with pytest.raises(ValueError, match="do not fit"):
        SourceDetector.load(_tampered(det, tmp_path, "c64", config={"base_channels": 64}))

    def nan(state):
        state["net.head.weight"][...] = float("nan")

    with pytest.raises(ValueError, match="NaN or infinite"):
        SourceDetector.load(_tampered(det, tmp_path, "nan", tensors=nan))
    with pytest.raises(ValueError, match="not valid JSON"):
        SourceDetector.load(_tampered(det, tmp_path, "json", raw_config='{"depth": 2,'))
    with pytest.raises(ValueError, match="not a JSON object"):
        SourceDetector.load(_tampered(det, tmp_path, "list", raw_config="[1, 2]"))


def test_shipped_detector_records_its_instrument():
    det = default_detector()
    dom = det.domain
    assert dom["pixel_scale_deg"] == pytest.approx(0.625) and dom["psf_sigma_px"] == 1.5
    assert dom["exposure"] == 100.0 and dom["background"] == 0.0 and dom["flux_unit"] == ""
    assert dom["statistics"]["n_maps"] == 1000
    from astrotrunc import CompletenessFunction

    from astrotrunc import ConditionalCompleteness
    from astrotrunc.detection.photometry import default_photometry
    from astrotrunc.inference import DetectedCatalogRatio, completeness_record

    # every shipped model was made with the shipped detector (the domain is descriptive and
    # not part of the identity that pairs them)
    assert det.identity == CompletenessFunction.load_default().detector_id
    assert det.identity == ConditionalCompleteness.load_default().detector_id
    assert det.identity == default_photometry().detector_id
    r4 = DetectedCatalogRatio.load_default()
    assert r4.completeness == completeness_record(ConditionalCompleteness.load_default())
    assert r4.completeness["detector_id"] == det.identity


def test_distillation_labels_are_the_teachers_probabilities(model, tmp_path):
    """teacher= gives soft labels (the teacher's sigmoid odds) in place of the true sources, in
    fresh and in stored simulations, and fit_to records the teacher."""
    from astrotrunc import SimulationStore
    from astrotrunc.detection import StoredDetectionSimulations, teacher_labels

    torch.manual_seed(0)
    teacher = SourceDetector.from_model(model, [1.0, 10.0], base_channels=4, depth=1)
    data = DetectionSimulations(model, [1.0, 10.0], n_train=4, n_val=2, seed=5, teacher=teacher)
    truth = DetectionSimulations(model, [1.0, 10.0], n_train=4, n_val=2, seed=5)
    (soft,), (hard,) = list(data.val_batches(2)), list(truth.val_batches(2))
    assert torch.equal(soft["x"], hard["x"]) and soft["labels"].shape == hard["labels"].shape
    expect = torch.sigmoid(teacher.eval()(soft["x"]))
    assert torch.allclose(soft["labels"], expect, atol=1e-5)
    assert torch.allclose(teacher_labels(teacher, soft["x"]), expect, atol=1e-5)
    assert not torch.equal(soft["labels"], hard["labels"]) and "teacher=" in repr(data)
    with pytest.raises(ValueError, match="teacher's flux thresholds"):
        DetectionSimulations(model, [10.0], n_train=4, n_val=2, teacher=teacher)
    stored = StoredDetectionSimulations.fill(model, SimulationStore(), 4, [1.0, 10.0],
                                             chunk_size=2, client="sync", progress=False,
                                             teacher=teacher)
    batch = next(iter(stored.batch_source(0.5, torch.Generator().manual_seed(0))
                      .train_batches(2, 0)))
    assert torch.allclose(batch["labels"], torch.sigmoid(teacher(batch["x"])), atol=1e-5)
    # a narrower student, started from the teacher and trained on its odds
    teacher.save(tmp_path / "t.safetensors")
    student = SourceDetector.fit_to(model, [1.0, 10.0], widths=[4, 4], init=teacher,
                                    teacher=tmp_path / "t.safetensors", n_train=4, n_val=2,
                                    domain_maps=0, max_epochs=1, batch_size=2, progress=False)
    meta = student.history.meta["trainer"]
    assert meta["teacher"] == meta["init"] == teacher.identity
    assert next(teacher.parameters()).requires_grad  # the caller's teacher is left as it was
    if importlib.util.find_spec("onnxruntime") is not None:  # a teacher holding a session
        teacher._inference_logits(soft["x"], backend="onnxruntime")
        import copy

        assert "_onnx_net" not in copy.deepcopy(teacher).__dict__  # copies leave caches behind
        SourceDetector.fit_to(model, [1.0, 10.0], base_channels=4, depth=1, teacher=teacher,
                              n_train=2, n_val=2, domain_maps=0, max_epochs=1, batch_size=2,
                              progress=False)
    # a teacher of another instrument labels maps it was not trained on: said, not silent
    from astrotrunc.exceptions import OutOfDomainWarning

    other = SourceDetector(**{**teacher.config, "exposure": 50.0})
    with pytest.warns(OutOfDomainWarning, match="another instrument.*exposure"):
        SourceDetector.fit_to(model, [1.0, 10.0], base_channels=4, depth=1, teacher=other,
                              n_train=2, n_val=2, domain_maps=0, max_epochs=1, batch_size=2,
                              progress=False)


def test_narrowed_weights_refuses_what_it_cannot_narrow():
    from astrotrunc.detection import narrowed_weights

    wide = UNet(1, 2, widths=(4, 8, 16))
    for narrow in (UNet(1, 2, widths=(4, 16, 16)), UNet(1, 2, widths=(4, 8, 16, 16)),
                   UNet(1, 3, widths=(4, 4, 8)), UNet(2, 2, widths=(4, 4, 8)),
                   UNet(1, 2, widths=(4, 4, 8), space_to_depth=2)):
        with pytest.raises(ValueError, match="needs a network at least as wide and deep"):
            narrowed_weights(wide, narrow)
    narrow = UNet(1, 2, widths=(4, 8, 16))  # as wide: a copy
    narrow.load_state_dict(narrowed_weights(wide, narrow))
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(narrow.eval()(x), wide.eval()(x), atol=1e-6)
