"""r1: labels, the U-Net, tiling, the finder and its catalogs, training, the shipped detector."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from astropy import units as u
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
    local = lambda t: torch.nn.functional.avg_pool2d(t[:, None], 3, 1, 1, count_include_pad=True)[:, 0]  # noqa: E731
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
                            "flux_err", "peak_odds", "detection_probability", "n_pixels", "label"]
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
    kwargs.setdefault("detector", _FixedOdds.from_model(model, flux_thresholds=[10.0], base_channels=4,
                                                       depth=2).set_map(np.zeros((128, 128))))
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
