"""Catalog photometry: the learned flux estimator, its file, the PSF path (issue 12)."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from astropy import units as u

from astrotrunc import NeuralSourceFinder, PointSourceModel, SourceDetector, find_sources
from astrotrunc.detection import CATALOG_COLUMNS, FluxEstimator, empty_catalog
from astrotrunc.detection.photometry import (
    PhotometrySimulations,
    default_photometry,
    flux_summary,
    measure_fluxes,
    psf_photometry,
)
from astrotrunc.nre import Trainer

FLUX_COLUMNS = ("flux", "flux_err", "flux_lo", "flux_hi", "flux_matched")


@pytest.fixture(scope="module")
def model():
    return PointSourceModel.paper()


@pytest.fixture(scope="module")
def paper_map(model):
    return model.simulate(1, seed=3).maps[0].numpy()


def test_default_catalog_has_honest_flux_columns(paper_map, one_thread):
    cat = find_sources(paper_map * u.dimensionless_unscaled)
    assert cat.meta["flux_method"] == "neural"
    assert [c for c in cat.colnames if c.startswith("flux")] == list(FLUX_COLUMNS)
    for name in FLUX_COLUMNS:
        assert cat[name].unit == u.dimensionless_unscaled
        assert cat[name].info.description
        assert np.all(np.isfinite(cat[name]))
    assert "brightest true source" in cat["flux"].info.description
    assert np.all(cat["flux_lo"] < cat["flux"]) and np.all(cat["flux"] < cat["flux_hi"])
    assert np.all(cat["flux_err"] > 0)


def test_flux_methods_and_fallback(paper_map, model, one_thread):
    tiny = SourceDetector.from_model(model, flux_thresholds=[10.0], base_channels=2, depth=1)
    finder = NeuralSourceFinder(tiny)  # no estimator for this detector: matched filter
    assert finder.flux_method == "matched" and finder.photometry is None
    with pytest.raises(ValueError, match="needs a FluxEstimator"):
        NeuralSourceFinder(tiny, flux_method="neural")
    with pytest.raises(ValueError, match="flux_method must be one of"):
        NeuralSourceFinder(flux_method="aperture")
    with pytest.raises(TypeError, match="must be a FluxEstimator"):
        NeuralSourceFinder(photometry="file.safetensors")
    with pytest.warns(UserWarning, match="trained on detections of detector"):
        NeuralSourceFinder(tiny, photometry=default_photometry())
    with pytest.warns(UserWarning, match="do not include confusion"):
        NeuralSourceFinder(tiny, flux_method="psf")
    assert NeuralSourceFinder().photometry is default_photometry()


def test_empty_inputs_give_empty_columns():
    cat = empty_catalog("mJy")
    assert list(cat.colnames) == list(CATALOG_COLUMNS)
    for name in FLUX_COLUMNS:
        assert len(cat[name]) == 0 and cat[name].unit == u.mJy
    est = FluxEstimator(half_size=2, channels=2, hidden=4)
    assert est.log_quantiles(np.zeros((8, 8)), None, [], [], []).shape == (0, 7)
    flux, err, lo, hi = flux_summary(np.zeros((0, 7)))
    assert flux.shape == err.shape == lo.shape == hi.shape == (0,)
    det = SourceDetector(base_channels=1, depth=0)
    for method in ("matched", "psf"):
        assert all(len(c) == 0 for c in measure_fluxes(method, np.zeros((8, 8)), None, [], [],
                                                       det))
    with pytest.raises(ValueError, match="needs the flux estimator"):
        measure_fluxes("neural", np.zeros((8, 8)), None, [1.0], [2.0], det)


def test_nan_masked_pixels_are_handled(paper_map, one_thread):
    data = paper_map.copy()
    cat = find_sources(data)
    x, y = int(cat["x_centroid"][0].value), int(cat["y_centroid"][0].value)
    data[y - 2:y + 3, x + 1:x + 4] = np.nan  # next to a source
    with pytest.warns(UserWarning, match="NaN or infinite"):
        cat2 = find_sources(data)
    for name in FLUX_COLUMNS:
        assert np.all(np.isfinite(cat2[name]))
    est = default_photometry()
    q_nan = est.log_quantiles(data, None, [x], [y], [1.0])
    q_mask = est.log_quantiles(np.nan_to_num(data), np.isnan(data), [x], [y], [1.0])
    np.testing.assert_allclose(q_nan, q_mask)  # NaN pixels are masked pixels


def test_quantiles_are_ordered_and_summary_is_right():
    est = FluxEstimator(half_size=3, channels=3, hidden=8)
    torch.manual_seed(1)
    for p in est.parameters():
        torch.nn.init.normal_(p, std=0.5)  # random weights: still increasing quantiles
    rng = np.random.default_rng(0)
    q = est.log_quantiles(rng.normal(size=(20, 20)), None, rng.uniform(0, 19, 50),
                          rng.uniform(0, 19, 50), rng.uniform(-1, 50, 50))
    assert np.all(np.diff(q, axis=1) > 0)
    # lognormals: flux +- 2 flux_err holds 95 % of each (the widest, sigma = 3, is solved on the
    # wide grid: its answer lies outside the narrow one)
    from scipy.stats import norm

    levels = (0.005, 0.025, 0.16, 0.5, 0.84, 0.975, 0.995)
    sigma = np.array([0.01, 0.4, 1.5, 3.0])
    q = np.log(20.0) + sigma[:, None] * norm.ppf(levels)[None]
    flux, err, lo, hi = flux_summary(q, levels)
    mass = norm.cdf((np.log(flux + 2 * err) - np.log(20.0)) / sigma) \
        - norm.cdf((np.log(np.clip(flux - 2 * err, 1e-300, None)) - np.log(20.0)) / sigma)
    np.testing.assert_allclose(mass, 0.95, atol=1e-3)
    np.testing.assert_allclose([lo[1], hi[1]], 20.0 * np.exp([-0.4 * 0.9945, 0.4 * 0.9945]),
                               rtol=1e-3)


def test_shipped_file_loads_without_pickle_and_tampering_is_refused(tmp_path):
    from importlib import resources

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = resources.files("astrotrunc") / "data" / "photometry_paper.safetensors"
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header])  # safetensors, not a pickle
    est = FluxEstimator.load(str(path))
    assert est.detector_id == SourceDetector.load_default().identity
    assert sum(p.numel() for p in est.parameters()) < 100_000  # small: 69,431 (0.3 MB)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    cfg = json.loads(meta["config"])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=dict(meta, config=json.dumps(dict(cfg, channels=8))))
    with pytest.raises(ValueError, match="do not fit"):
        FluxEstimator.load(bad)
    state["net.head.4.bias"][...] = float("nan")
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="NaN or infinite"):
        FluxEstimator.load(bad)
    evil = tmp_path / "evil.safetensors"
    torch.save({"w": torch.zeros(2)}, evil)
    with pytest.raises(ValueError, match="pickled files are refused"):
        FluxEstimator.load(evil)


def test_training_through_the_engine(model, tmp_path, one_thread):
    data = PhotometrySimulations(model, None, 2, 1, progress=False)
    assert 0.5 < data.matched_fraction <= 1
    assert len(data.train["log_flux"]) > 10 and data.train["cutout"].shape[1:] == (2, 15, 15)
    est = FluxEstimator.for_finder(data.finder, channels=2, hidden=8)
    hist = Trainer(max_epochs=2, batch_size=64, progress=False, seed=0).fit(est, data)
    assert len(hist) == 2 and np.isfinite(hist["val_loss"]).all()
    est.save(tmp_path / "p.safetensors")
    back = FluxEstimator.load(tmp_path / "p.safetensors")
    assert back.config == est.config and back.finder_settings == data.finder.settings
    with pytest.raises(OSError):
        est.save(tmp_path / "p.safetensors")  # no clobbering


def test_psf_path_on_a_tiny_map():
    det = SourceDetector(base_channels=1, depth=0, normalization=4.0, exposure=100.0,
                         psf_stamp=_gaussian_stamp(1.5))
    data = np.zeros((24, 24))
    truth = {(6, 8): 30.0, (15, 12): 80.0, (17, 13): 10.0}  # two blended sources
    stamp = det.psf_stamp.numpy().astype(float)
    r = stamp.shape[0] // 2
    padded = np.pad(data, r)
    for (x, y), f in truth.items():
        padded[y:y + 2 * r + 1, x:x + 2 * r + 1] += 4.0 * f * stamp
    data = padded[r:-r, r:-r]
    x, y = np.array([k[0] for k in truth], float), np.array([k[1] for k in truth], float)
    flux, err = psf_photometry(data, None, x, y, det)
    np.testing.assert_allclose(flux, list(truth.values()), rtol=0.02)
    assert np.all(err > 0)
    # with a learned term the errors only grow
    est = FluxEstimator(half_size=3, channels=2, hidden=4)
    f2, e2, lo, hi = measure_fluxes("psf", data, None, x, y, det, est)
    np.testing.assert_allclose(f2, flux)
    with pytest.raises(ValueError, match="backend must be one of"):
        measure_fluxes("psf", data, None, x, y, det, est, backend="onnx")
    assert np.all(e2 >= err) and np.all(lo < f2) and np.all(f2 < hi)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # masked pixels are fine
        bad = np.zeros(data.shape, bool)
        bad[0, :] = True
        psf_photometry(data, bad, x, y, det)


def _gaussian_stamp(sigma, r=5):
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    g = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return (g / g.sum()).tolist()


def test_crowding_is_the_median_of_valid_pixels():
    from astrotrunc.detection.photometry import _crowding

    rng = np.random.default_rng(0)
    cut = rng.normal(size=(30, 2, 7, 7)).astype(np.float32)
    cut[:, 1] = 1
    for i in range(10):  # partly masked (map edges, bad pixels) and one fully masked
        cut[i, 1] = rng.random((7, 7)) > rng.random()
    cut[3, 1] = 0
    values = np.where(cut[:, 1] > 0, cut[:, 0], np.nan).reshape(30, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nan_to_num(np.nanmedian(values, axis=1))
    np.testing.assert_array_equal(_crowding(cut), expected)


def test_pooling_and_cutout_layouts_give_the_same_values():
    from astrotrunc.detection.photometry import _AvgPool2, _Quantiles

    rng = np.random.default_rng(4)
    for n in range(2, 7):  # even n: plain pooling; odd n: overlapping bins
        x = torch.as_tensor(rng.normal(size=(5, 3, n, n)), dtype=torch.float32)
        for fmt in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(_AvgPool2(n)(x.contiguous(memory_format=fmt)),
                                       torch.nn.functional.adaptive_avg_pool2d(x, 2))
    cut = rng.normal(size=(6, 2, 7, 7)).astype(np.float32)
    q = _Quantiles(torch.nn.Identity(), 3.0, 0.1, 1, scaled_input=True)
    last = q.scale_cutouts(cut, channels_last=True)
    np.testing.assert_array_equal(last, q.scale_cutouts(cut))
    assert torch.as_tensor(last).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("architecture", ["conv", "strided", "dense", "patch"])
def test_fast_inference_copy_follows_the_weights(architecture):
    est = FluxEstimator(half_size=4 if architecture == "patch" else 3, channels=4, hidden=8,
                        activation="relu", architecture=architecture)
    rng = np.random.default_rng(1)
    args = (rng.normal(size=(20, 20)), None, rng.uniform(0, 19, 9), rng.uniform(0, 19, 9),
            rng.uniform(1, 50, 9))
    cut, offset = _cut_args(args[0], args[2:], est.half_size)[:2]
    batch = {"cutout": torch.as_tensor(cut), "offset": torch.as_tensor(offset),
             "matched": torch.as_tensor(args[4], dtype=torch.float32)}
    with torch.no_grad():
        np.testing.assert_allclose(est.log_quantiles(*args), est(batch).double(), atol=1e-5)
        for p in est.parameters():
            p.add_(0.1)  # in place: the cached copy must be rebuilt
        np.testing.assert_allclose(est.log_quantiles(*args), est(batch).double(), atol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        FluxEstimator(activation="tanh")
    with pytest.raises(ValueError, match="architecture must be one of"):
        FluxEstimator(architecture="transformer")


def test_dense_network_round_trips_and_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    est = FluxEstimator(half_size=3, hidden=8, activation="relu", architecture="dense")
    assert not any(isinstance(m, torch.nn.Conv2d) for m in est.modules())
    rng = np.random.default_rng(2)
    data = rng.normal(size=(20, 20))
    x, y, matched = rng.uniform(0, 19, 9), rng.uniform(0, 19, 9), rng.uniform(1, 50, 9)
    est.save(tmp_path / "d.safetensors")
    back = FluxEstimator.load(tmp_path / "d.safetensors")
    assert back.architecture == "dense" and back.config == est.config
    q = est.log_quantiles(data, None, x, y, matched)
    np.testing.assert_allclose(back.log_quantiles(data, None, x, y, matched), q)
    q_ort = back._predict(data, None, x, y, matched, backend="onnxruntime")[0]
    np.testing.assert_allclose(q_ort, q, atol=1e-4)


@pytest.mark.parametrize(("architecture", "half_size"), [
    *[(a, h) for a in ("conv", "strided") for h in (3, 4, 5)],  # 4, 5: sides 3 after the convs
    ("patch", 1), ("patch", 4)])  # a single square, and 3 x 3 of them
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtimes_give_the_torch_quantiles(architecture, half_size, runtime, monkeypatch):
    pytest.importorskip(runtime)
    if runtime == "openvino":  # under 'openvino' the flux network runs in ONNX Runtime when
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # installed: OpenVINO here
    est = FluxEstimator(half_size=half_size, channels=4, hidden=8, architecture=architecture)
    rng = np.random.default_rng(3)
    data = rng.normal(size=(24, 24))
    data[3, 3], data[20, 5] = 1e25, -1e30  # beyond the float32 square: asinh stays finite
    x, y = np.r_[3.2, 5.0, rng.uniform(0, 23, 9)], np.r_[3.1, 20.0, rng.uniform(0, 23, 9)]
    matched = np.r_[1e25, -5.0, rng.uniform(1, 50, 9)]
    q = est.log_quantiles(data, None, x, y, matched)
    q_ort = est._predict(data, None, x, y, matched, backend=runtime)[0]
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q_ort, q, atol=1e-4)
    assert est.__dict__["_onnx_copy"][1].runtime == runtime
    # both scale the cutouts with numpy before the network: the network's own forward (training)
    # scales them inside, and gives the same quantiles
    from astrotrunc._utils import padded_map
    from astrotrunc.detection.photometry import _take_cutouts

    cut, offset = _take_cutouts(padded_map(data, None, half_size), x, y, half_size)
    with torch.no_grad():
        q_net = est.eval()({"cutout": torch.as_tensor(cut), "offset": torch.as_tensor(offset),
                            "matched": torch.as_tensor(matched, dtype=torch.float32)})
    np.testing.assert_allclose(est._raw_log_quantiles(cut, offset, matched.astype(np.float32)),
                               q_net.numpy(), atol=1e-4)


def test_patch_network_cuts_its_squares_once():
    from astrotrunc.detection.photometry import _PatchNet

    net = _PatchNet(9, 4, 8, 3, 7)
    cut = np.arange(2 * 9 * 9, dtype=np.float32).reshape(1, 2, 9, 9)
    squares = net.patches(cut)  # numpy, as the inference copies get them
    assert squares.shape == (1, 9, 18)
    # square 4 is the centre: its 3 x 3 pixels of each channel, rows first
    np.testing.assert_array_equal(squares[0, 4], np.r_[cut[0, 0, 3:6, 3:6].ravel(),
                                                       cut[0, 1, 3:6, 3:6].ravel()])
    np.testing.assert_array_equal(net.patches(torch.as_tensor(cut)).numpy(), squares)
    with torch.no_grad():  # the network takes either form
        torch.testing.assert_close(net(torch.as_tensor(cut), torch.zeros(1, 3)),
                                   net(torch.as_tensor(squares), torch.zeros(1, 3)))
    # the inference path gathers the squares from the map directly: the same pixels, at the
    # edges and at bad pixels too, and the same crowding
    from astrotrunc._utils import padded_map
    from astrotrunc.detection.photometry import _crowding, _take_cutouts

    rng = np.random.default_rng(4)
    data = rng.normal(size=(12, 17))
    bad = rng.random(data.shape) < 0.1
    padded = padded_map(data, bad, 4)
    x, y = np.r_[0.0, 16.4, rng.uniform(0, 16, 5)], np.r_[11.2, 0.0, rng.uniform(0, 11, 5)]
    cut, offset = _take_cutouts(padded, x, y, 4)
    squares, offset_sq = _take_cutouts(padded, x, y, 4, patch=3)
    assert squares.shape == (7, 9, 2, 9)
    np.testing.assert_array_equal(squares.reshape(7, 9, 18), net.patches(cut))
    np.testing.assert_array_equal(offset_sq, offset)
    np.testing.assert_array_equal(_crowding(squares), _crowding(cut))
    with pytest.raises(ValueError, match="multiple of 3 .half_size 1, 4, 7"):
        FluxEstimator(half_size=3, architecture="patch")


def test_calibration_makes_each_level_hold_per_group(model, tmp_path, one_thread):
    from astrotrunc.detection.photometry import (
        _crowding,
        _detection_finder,
        _matched_detections,
    )

    torch.manual_seed(0)
    est = FluxEstimator(half_size=3, channels=2, hidden=4)  # untrained: badly calibrated
    est.calibrate(model, n_maps=3, seed=5, n_crowding_bins=2, min_group=20, progress=False)
    cal = est.calibration
    assert cal["n_maps"] == 3 and len(cal["crowding_edges"]) == 1 and sum(cal["counts"]) > 100
    # on the calibration detections themselves every quantile but the median (not moved) holds
    # its level in every group that has its own factors (split-conformal: exact up to 1/n)
    rows = _matched_detections(model, _detection_finder(None), 3, 5, 3, progress=False)
    raw = est._raw_log_quantiles(rows["cutout"], rows["offset"], rows["matched"])
    crowd = _crowding(rows["cutout"])
    q, err_factor = est._calibrated(raw, crowd)
    groups = est._groups(raw[:, 3], crowd)
    truth = rows["log_flux"][:, None]
    flux, err = flux_summary(q, est.levels)[:2]
    in_2_err = np.abs(np.exp(truth[:, 0]) - flux) <= 2 * err * err_factor
    raw_miss = 0.0
    for g in np.unique(groups):
        sel = groups == g
        if sel.sum() < 20:
            continue
        below = np.delete((truth[sel] <= q[sel]).mean(0), 3)
        levels = np.delete(est.levels, 3)
        np.testing.assert_allclose(below, levels, atol=2.5 / sel.sum() + 1e-9)
        # and flux ± 2 flux_err, with its own factor, holds 95 %
        np.testing.assert_allclose(in_2_err[sel].mean(), 0.95, atol=1.5 / sel.sum() + 1e-9)
        raw_miss = max(raw_miss, np.abs(np.delete((truth[sel] <= raw[sel]).mean(0), 3)
                                        - levels).max())
    assert raw_miss > 0.1  # the untrained network was not calibrated
    assert est._calibration.shape == (6, 8) and not np.allclose(err_factor, 1)
    # a file calibrated before the flux_err factors existed: its quantiles, flux_err unscaled
    before = FluxEstimator(half_size=3, channels=2, hidden=4, calibration={
        k: v for k, v in est.calibration.items() if k != "flux_err_factors"})
    state = est.state_dict()
    state["_calibration"] = state["_calibration"][:, :-1]
    before.load_state_dict(state)
    q_before, factor_before = before._calibrated(raw, crowd)
    np.testing.assert_array_equal(q_before, q)
    np.testing.assert_array_equal(factor_before, 1.0)
    # saved and loaded with its calibration, no pickle
    est.save(tmp_path / "c.safetensors")
    back = FluxEstimator.load(tmp_path / "c.safetensors")
    assert back.calibration == est.calibration
    m = model.simulate(1, seed=8).maps[0].numpy()
    xy = (np.array([20.0, 60.0]), np.array([64.0, 63.0]), np.array([5.0, 30.0]))
    np.testing.assert_allclose(back.log_quantiles(m, None, *xy), est.log_quantiles(m, None, *xy))
    assert not np.allclose(est.log_quantiles(m, None, *xy),
                           est._raw_log_quantiles(*_cut_args(m, xy)))
    with pytest.raises(ValueError, match="too few to calibrate"):
        est.calibrate(model, n_maps=1, seed=5, min_group=10**6, progress=False)


def test_latitude_calibration_holds_per_group_and_needs_b(model, tmp_path, one_thread):
    from astrotrunc.detection.photometry import (
        _crowding,
        _detection_finder,
        _matched_detections,
    )

    torch.manual_seed(0)
    est = FluxEstimator(half_size=3, channels=2, hidden=4)
    est.calibrate(model, n_maps=3, seed=5, n_crowding_bins=2, n_latitude_bins=2,
                  latitude_crowding_bins=1, min_group=20, progress=False)
    lat = est.calibration["latitude"]
    assert len(lat["latitude_edges"]) == 1 and len(lat["crowding_edges"]) == 0
    assert sum(lat["counts"]) == sum(est.calibration["counts"])
    rows = _matched_detections(model, _detection_finder(None), 3, 5, 3, progress=False)
    # the detections' |b| (from their positions) is close to their true sources'
    assert np.median(np.abs(rows["abs_b"] - np.abs(rows["b"]))) < 0.5
    raw = est._raw_log_quantiles(rows["cutout"], rows["offset"], rows["matched"])
    crowd = _crowding(rows["cutout"])
    q = est._calibrated(raw, crowd, rows["abs_b"])[0]
    groups = est._groups(raw[:, 3], crowd, rows["abs_b"])
    truth = rows["log_flux"][:, None]
    for g in np.unique(groups):  # the latitude groups' levels hold on their detections
        sel = groups == g
        if sel.sum() >= 20:
            np.testing.assert_allclose(np.delete((truth[sel] <= q[sel]).mean(0), 3),
                                       np.delete(est.levels, 3), atol=2.5 / sel.sum() + 1e-9)
    # without b (or where b is NaN) the crowding groups' factors are used
    b = np.full(len(raw), np.nan)
    b[::2] = rows["abs_b"][::2]
    mixed = est._calibrated(raw, crowd, b)[0]
    np.testing.assert_array_equal(mixed[::2], q[::2])
    np.testing.assert_array_equal(mixed[1::2], est._calibrated(raw, crowd)[0][1::2])
    assert not np.allclose(q, est._calibrated(raw, crowd)[0])
    # saved and loaded with both tables; a Quantity b is taken in degrees
    est.save(tmp_path / "lat.safetensors")
    back = FluxEstimator.load(tmp_path / "lat.safetensors")
    assert back.calibration == est.calibration
    m = model.simulate(1, seed=8).maps[0].numpy()
    xy = (np.array([20.0, 60.0]), np.array([64.0, 63.0]), np.array([5.0, 30.0]))
    b_deg = np.array([0.5, 30.0])
    np.testing.assert_allclose(back.log_quantiles(m, None, *xy, b=b_deg * u.deg),
                               est.log_quantiles(m, None, *xy, b=b_deg))
    # a catalog with a celestial WCS uses the latitude groups, one without does not
    finder = NeuralSourceFinder(photometry=est)
    with_wcs, without = finder(m, wcs=model.wcs), finder(m)
    assert np.isfinite(with_wcs["b"]).all() and np.isnan(without["b"]).all()
    np.testing.assert_array_equal(with_wcs["flux_matched"], without["flux_matched"])
    assert not np.allclose(with_wcs["flux_err"], without["flux_err"])
    with pytest.raises(ValueError, match="one latitude per position"):
        est.log_quantiles(m, None, *xy, b=[1.0, 2.0, 3.0])
    with pytest.raises(u.UnitsError):
        est.log_quantiles(m, None, *xy, b=b_deg * u.m)
    with pytest.raises(ValueError, match="n_latitude_bins >= 0"):
        est.calibrate(model, n_maps=1, n_latitude_bins=-1, progress=False)


def _cut_args(m, xy, half_size=3):
    from astrotrunc.detection.photometry import _cutouts

    cut, offset = _cutouts(m, None, xy[0], xy[1], half_size)
    return cut, offset, xy[2].astype(np.float32)


def test_psf_errors_are_calibrated_when_asked(model, one_thread):
    torch.manual_seed(0)
    est = FluxEstimator(half_size=3, channels=2, hidden=4)
    est.calibrate(model, n_maps=2, seed=5, n_crowding_bins=1, min_group=20, psf_maps=1,
                  progress=False)
    assert est.calibration["psf_maps"] == 1 and est.calibration["psf_detections"] > 5
    factors = est._calibration_psf.numpy()
    assert factors.shape == (3, 3) and np.all(factors > 0) and not np.allclose(factors, 1)
    m = model.simulate(1, seed=9).maps[0].numpy()
    det = _detection_finder_detector()
    x, y = np.array([30.0, 90.0]), np.array([64.0, 70.0])
    flux, err, lo, hi = measure_fluxes("psf", m, None, x, y, det, est)
    q, crowd, _ = est._predict(m, None, x, y, det.estimate_flux(m, x, y)[0])
    med, d_err, d_lo, d_hi = est._psf_distances(flux, psf_photometry(m, None, x, y, det)[1], q)
    f = factors[est._groups(np.log(med), crowd)]
    np.testing.assert_allclose(err, f[:, 0] * d_err)
    f = np.maximum(f, 0)
    np.testing.assert_allclose([flux - lo, hi - flux], [f[:, 1] * d_lo, f[:, 2] * d_hi])
    est.calibrate(model, n_maps=2, seed=5, n_crowding_bins=1, min_group=20, progress=False)
    assert getattr(est, "_calibration_psf", None) is None  # no stale PSF factors


def _detection_finder_detector():
    from astrotrunc.detection.photometry import _detection_finder

    return _detection_finder(None).detector
