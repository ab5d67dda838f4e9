"""r2: one-to-one matching, the monotone completeness MLP, injection-recovery, safe files."""

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from astrotrunc import CompletenessFunction, NeuralSourceFinder, PointSourceModel, SourceDetector
from astrotrunc._toys import toy_completeness_labels, toy_f50
from astrotrunc.completeness import (CompletenessLabels, default_completeness, detect_batch,
                                     injection_recovery, match_sources)
from astrotrunc.detection import default_detector
from astrotrunc.nre import Trainer


def test_match_sources_one_to_one():
    segm = np.zeros((1, 10, 10), dtype=int)
    segm[0, 2:5, 2:5] = 1
    segm[0, 7:9, 7:9] = 2
    flux = np.array([[5.0, 9.0, 1.0, 3.0, 2.0]])
    x = np.array([[3.0, 2.2, 7.6, 0.0, 7.0]])
    y = np.array([[3.0, 4.4, 8.0, 0.0, 7.0]])
    valid = np.array([[True, True, True, True, False]])
    d = match_sources(segm, flux, x, y, valid)
    # region 1 holds sources 0 and 1: the brighter (1) is detected; region 2 holds source 2
    # (source 4 is not a valid source, source 3 lies outside every region)
    assert d.tolist() == [[False, True, True, False, False]]


def _toy_labels(n=20000, seed=0):
    return toy_completeness_labels(n, seed), None


def test_completeness_learns_known_function_and_is_monotone(tmp_path):
    from astrotrunc.nre import Trainer

    labels, _ = _toy_labels()
    S = CompletenessFunction(detector_id="toy", hidden=32)
    Trainer(max_epochs=25, batch_size=512, learning_rate=1e-2, progress=False, seed=1).fit(
        S, labels
    )
    fl = np.geomspace(0.01, 1e4, 400)
    for lat in (0.0, 3.0, 15.0):
        p = S(fl, 5.0, lat)
        assert np.all(np.diff(p) >= 0), "completeness must not decrease with flux"
        f50_true = toy_f50(lat)
        f50 = S.flux_at(0.5, 5.0, lat)
        assert abs(np.log(f50) - np.log(f50_true)) < 0.25
    # inputs: Quantities, SkyCoord, broadcasting
    c = SkyCoord(5 * u.deg, 0 * u.deg, frame="galactic")
    assert np.isclose(S(10.0 * u.dimensionless_unscaled, c), S(10.0, 5.0, 0.0))
    assert S(np.ones((3, 1)), np.zeros((1, 4)) * u.deg, 0.0 * u.deg).shape == (3, 4)
    with pytest.warns(Warning, match="non-positive"):
        out = S([-1.0, np.nan, 2.0], 0.0, 0.0)
    assert np.isnan(out[:2]).all() and np.isfinite(out[2])
    with pytest.raises(ValueError, match="completeness must be in"):
        S.flux_at(1.5, 0, 0)
    # safe round-trip
    path = tmp_path / "S.safetensors"
    S.save(path)
    back = CompletenessFunction.load(path)
    assert back.detector_id == "toy" and np.allclose(back(fl, 0, 0), S(fl, 0, 0))


def test_completeness_refuses_other_detector():
    model = PointSourceModel.paper()
    det = SourceDetector.from_model(model, flux_thresholds=[10.0], base_channels=4, depth=2)
    S = CompletenessFunction(detector_id="someone-else")
    with pytest.raises(ValueError, match="belongs to detector"):
        S.check_detector(det)


def test_training_through_the_engine_records_every_finder_setting(tmp_path):
    model = PointSourceModel.paper()
    det = SourceDetector.from_model(model, flux_thresholds=[3.0, 10.0], base_channels=4, depth=2)
    finder = NeuralSourceFinder(det, threshold=2.0, n_pixels=2, flux_threshold=10.0,
                                deblend=False, tile_overlap=16)
    labels = CompletenessLabels(model, finder, n_maps=6, n_val_maps=2, progress=False)
    assert len(labels.train["d"]) > 0 and len(labels.val["d"]) > 0
    S = CompletenessFunction.for_finder(finder, model)
    hist = Trainer(max_epochs=1, batch_size=256, progress=False, seed=0).fit(S, labels)
    assert len(hist) == 1 and S.training is False
    assert (S.detector_id, S.threshold, S.flux_threshold, S.n_pixels, S.deblend,
            S.tile_overlap) == (det.identity, 2.0, 10.0, 2, False, 16)
    S.save(tmp_path / "S.safetensors")
    back = CompletenessFunction.load(tmp_path / "S.safetensors")
    assert back.finder(det).settings == finder.settings  # the file rebuilds the same finder
    with pytest.raises(TypeError, match="fit_to"):
        S.train(model)
    # the one-liner
    S2 = CompletenessFunction.fit_to(model, finder, n_maps=6, n_val_maps=2, max_epochs=1,
                                     batch_size=256, progress=False)
    assert S2.detector_id == det.identity and len(S2.history) == 1


def test_find_batch_equals_the_finder_on_each_map():
    model = PointSourceModel.paper()
    finder = NeuralSourceFinder(threshold=3.0, n_pixels=2, flux_threshold=10.0)
    maps = model.simulate(3, seed=11).maps
    labels = finder.find_batch(maps)
    for m, lab in zip(maps, labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cat, segm = finder(m, return_segmentation=True)
        assert np.array_equal(lab, segm.data if segm is not None else np.zeros_like(lab))
    with pytest.warns(Warning, match="deprecated"):
        old = detect_batch(finder.detector, maps, threshold=3.0, flux_threshold=10.0)
    assert old.shape == labels.shape
    # NaN pixels and masks (one for all maps, or one each) as the finder takes them
    maps = maps.numpy().astype(np.float64)
    maps[0, 5, 7] = maps[2, 60, 61] = np.nan
    shared = np.zeros(maps.shape[1:], bool)
    shared[30:34, 40:50] = True
    each = np.zeros(maps.shape, bool)
    each[1, 100:110, :20] = True
    for mask in (shared, each):
        labels = finder.find_batch(maps, mask)
        for m, mk, lab in zip(maps, np.broadcast_to(mask, maps.shape), labels):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, segm = finder(m, mk, return_segmentation=True)
            assert np.array_equal(lab, segm.data)
            assert not lab[mk | np.isnan(m)].any()
    with pytest.raises(ValueError, match="mask shape"):
        finder.find_batch(maps, np.zeros((5, 5), bool))


def test_injection_recovery_with_shipped_detector():
    model = PointSourceModel.paper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = injection_recovery(model, NeuralSourceFinder(flux_threshold=1.0, deblend=False),
                               fluxes=[0.3, 300.0], positions=[(10.0, 30.0)], n_maps=20,
                               progress=False)
    assert t["flux"].unit == u.dimensionless_unscaled and len(t) == 2
    assert t.meta["flux_threshold"] == 1.0 and t.meta["deblend"] is False  # settings recorded
    assert t["completeness"][1] >= 0.9  # bright, far from the plane: found
    assert t["completeness"][0] <= t["completeness"][1]
    assert np.all(t["completeness_low"] <= t["completeness"])
    assert np.all(t["completeness"] <= t["completeness_high"])
    with pytest.raises(ValueError, match="outside the map"):
        injection_recovery(model, fluxes=[1.0], positions=[(60.0, 0.0)], n_maps=2, progress=False)
    with pytest.raises(ValueError, match="positive"):
        injection_recovery(model, fluxes=[-1.0], positions=[(0.0, 0.0)], n_maps=2, progress=False)
    with pytest.raises(TypeError, match="belong to the NeuralSourceFinder"):
        injection_recovery(model, NeuralSourceFinder(), threshold=3.0, n_maps=2, progress=False)


def test_shipped_completeness_pairs_with_shipped_detector():
    S = default_completeness()
    S.check_detector(default_detector())
    p = S(np.geomspace(0.1, 1000, 50), 0.0, 10.0)
    assert np.all(np.diff(p) >= 0) and p[-1] > 0.9 and p[0] < 0.5
    assert np.allclose(S.extent, [-40, 40, -40, 40])
    with pytest.warns(Warning, match="outside the map"):
        out = S([10.0, 10.0], [0.0, 60.0], [0.0, 0.0])
    assert np.isfinite(out[0]) and np.isnan(out[1])
    with pytest.raises(ValueError):
        S(np.ones(3), np.zeros(4), 0.0)
