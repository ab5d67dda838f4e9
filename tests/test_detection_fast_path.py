"""The optimised r1 path (fused network, region-pixel segmentation and catalog) against the
reference path it replaced: the same regions and catalog rows, to float tolerance."""

import importlib.util
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from photutils.segmentation import SegmentationImage, detect_sources
from scipy import ndimage

from astrotrunc import NeuralSourceFinder, PointSourceModel, SourceDetector
from astrotrunc.detection import default_detector, detection_regions, peak_centroids
from astrotrunc.detection.finder import _regions_batch
from astrotrunc.detection._onnx import check_backend
from astrotrunc.detection.estimator import _tile_shape
from astrotrunc.detection.unet import inference_copy


def _reference_regions(log_odds, threshold, n_pixels, mask, deblend):
    """The segmentation of astrotrunc 0.2: photutils' detect_sources, then steepest ascent over
    the whole map by pointer jumping, maxima by a 3×3 maximum filter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segm = detect_sources(log_odds, math.log(threshold), n_pixels=n_pixels, mask=mask)
    if segm is None or not deblend:
        return segm
    inside = segm.data > 0
    peaks = inside & (log_odds == ndimage.maximum_filter(log_odds, size=3, mode="nearest"))
    markers, _ = ndimage.label(peaks, structure=np.ones((3, 3)))
    ny, nx = log_odds.shape
    value = np.where(inside, log_odds, -np.inf)
    padded = np.pad(value, 1, constant_values=-np.inf)
    seg_padded = np.pad(segm.data, 1)
    index = np.arange(ny * nx).reshape(ny, nx)
    idx_padded = np.pad(index, 1)
    best, parent = value.copy(), index.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            window = (slice(1 + dy, 1 + dy + ny), slice(1 + dx, 1 + dx + nx))
            higher = (padded[window] > best) & (seg_padded[window] == segm.data)
            best = np.where(higher, padded[window], best)
            parent = np.where(higher, idx_padded[window], parent)
    parent = parent.ravel()
    while not np.array_equal(parent[parent], parent):
        parent = parent[parent]
    basins = markers.ravel()[parent].reshape(ny, nx)
    basins[~inside] = 0
    return SegmentationImage(basins)


def _reference_logits(self, maps, channel=None, backend="torch"):
    """The plain evaluation-mode network (BatchNorm unfused, channels-first, all channels)."""
    was = self.training
    self.eval()
    try:
        with torch.no_grad():
            out = self(torch.as_tensor(maps, dtype=torch.float32))
    finally:
        self.train(was)
    return out if channel is None else out[:, channel:channel + 1]


def _tiny_detector(seed=0, space_to_depth=1):
    torch.manual_seed(seed)
    det = SourceDetector.from_model(PointSourceModel.paper(), [1.0, 10.0], base_channels=4,
                                    depth=2, space_to_depth=space_to_depth)
    for m in det.modules():  # non-trivial BatchNorm statistics: the fusion has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return det


@pytest.mark.parametrize("space_to_depth", [1, 2])
def test_inference_copy_matches_the_network_and_leaves_it_alone(space_to_depth):
    det = _tiny_detector(space_to_depth=space_to_depth)
    x = det.preprocess(PointSourceModel.paper().simulate(3, seed=2).maps)
    before = {k: v.clone() for k, v in det.net.state_dict().items()}
    with torch.no_grad():
        ref = det.net.eval()(x)
    fast = inference_copy(det.net, channels=[1])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert torch.allclose(fast(x), ref[:, 1:2], atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in det.net.state_dict().items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in det.net.modules())


def test_fast_logits_follow_weight_changes():
    det = _tiny_detector()
    maps = PointSourceModel.paper().simulate(2, seed=4).maps
    first = det._inference_logits(maps, 0).clone()
    assert torch.allclose(first, _reference_logits(det, maps, 0), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        det.net.head.bias += 1.0  # an in-place change (as an optimiser step makes)
    assert torch.allclose(det._inference_logits(maps, 0), first + 1.0, atol=1e-4, rtol=1e-4)
    det.load_state_dict(_tiny_detector(seed=1).state_dict())
    assert torch.allclose(det._inference_logits(maps, 0), _reference_logits(det, maps, 0),
                          atol=1e-4, rtol=1e-4)


def test_space_to_depth_detector(tmp_path):
    """A detector on folded 2x2 pixel blocks: every pixel out, its own identity, saved and loaded
    as such, tiled in multiples of its block on large maps; the shipped file is unchanged."""
    det = _tiny_detector(space_to_depth=2)
    assert det.net.head.out_channels == 2 * 4  # two F_th channels, four sub-pixels each
    assert det.identity != _tiny_detector().identity
    assert "space_to_depth" not in default_detector().config  # earlier files keep their identity
    maps = PointSourceModel.paper().simulate(2, seed=4).maps
    lo = det._inference_logits(maps, 1)
    assert lo.shape == (2, 1, 128, 128)
    assert torch.allclose(lo, _reference_logits(det, maps, 1), atol=1e-4, rtol=1e-4)
    path = tmp_path / "s2d.safetensors"
    det.save(path)
    back = SourceDetector.load(path)
    assert back.space_to_depth == 2 and back.identity == det.identity
    odd = np.tile(maps[0].numpy(), (5, 4))[:601, :509]  # tiles of an odd-sized large map
    lo = back.log_odds(odd)
    assert lo.shape == odd.shape and np.isfinite(lo).all()
    with pytest.raises(ValueError, match="space_to_depth"):
        SourceDetector(space_to_depth=0)


def test_detector_with_widths(tmp_path):
    """A U-Net with its own channels per level: built so, its own identity, saved and loaded as
    such, the same through the fast paths; earlier files keep theirs."""
    torch.manual_seed(0)
    det = SourceDetector.from_model(PointSourceModel.paper(), [1.0, 10.0], widths=[4, 4, 8])
    assert (det.base_channels, det.depth, det.widths) == (4, 2, (4, 4, 8))
    assert [b[0].out_channels for b in det.net.down] == [4, 4, 8]
    assert det.config["widths"] == [4, 4, 8]
    assert "widths" not in _tiny_detector().config  # base channels doubling: no widths recorded
    assert det.identity != _tiny_detector().identity  # base 4, depth 2 doubles: 4, 8, 16
    maps = PointSourceModel.paper().simulate(2, seed=4).maps
    assert torch.allclose(det._inference_logits(maps, 1), _reference_logits(det, maps, 1),
                          atol=1e-4, rtol=1e-4)
    det.save(tmp_path / "w.safetensors")
    back = SourceDetector.load(tmp_path / "w.safetensors")
    assert back.widths == (4, 4, 8) and back.identity == det.identity
    assert SourceDetector(widths=[4, 8, 16]).config == SourceDetector(base_channels=4,
                                                                        depth=2).config
    for bad in ([], [4, 0], [4, 2.5], "448", [True, 4], 8):
        with pytest.raises(ValueError, match="widths"):
            SourceDetector(widths=bad)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("space_to_depth", [1, 2])
def test_runtime_backends_give_the_torch_logits(space_to_depth, runtime):
    pytest.importorskip(runtime)
    det = _tiny_detector(space_to_depth=space_to_depth)
    sims = PointSourceModel.paper().simulate(2, seed=4).maps
    for maps in (sims, sims[:, :77, :101]):  # the map's own shape and one the network pads
        ref = det._inference_logits(maps, 1)
        assert torch.allclose(det._inference_logits(maps, 1, runtime), ref, atol=1e-4,
                              rtol=1e-4)
    big = np.tile(sims[0].numpy(), (5, 4))[:601, :509]  # tiled
    np.testing.assert_allclose(det.log_odds(big, backend=runtime), det.log_odds(big),
                               atol=1e-4, rtol=1e-4)
    # one tile (numpy in and out), with bad pixels filled and masked
    one = sims[1].numpy().copy()
    one[5, 7] = np.nan
    mask = np.zeros(one.shape, bool)
    mask[60:63, 40:44] = True
    ref = det.log_odds(one, mask)
    assert np.isneginf(ref[5, 7]) and np.isneginf(ref[mask]).all()
    np.testing.assert_allclose(det.log_odds(one, mask, backend=runtime), ref, atol=1e-4,
                               rtol=1e-4)
    ref = det._inference_logits(sims, 1)
    with torch.no_grad():
        det.net.head.bias += 1.0  # the session follows the weights
    assert torch.allclose(det._inference_logits(sims, 1, runtime), ref + 1.0, atol=1e-4,
                          rtol=1e-4)
    net = det.__dict__["_onnx_net"][1]
    assert net.runtime == runtime
    if runtime == "openvino":
        import openvino

        # the first shapes run by a model compiled for them, others by the dynamic model: both
        # gave the torch logits above; both in float32 whatever the CPU offers (bfloat16 would
        # move detections)
        net.run(np.zeros((1, 1, 40, 48), np.float32))
        session = net.session
        assert session.compiled(((2, 1, 128, 128),)) is session._static
        assert session.compiled(((1, 1, 40, 48),)) is session._dynamic is not None
        for compiled in (session._static, session._dynamic):
            assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32


def test_onnx_export_without_the_deprecated_exporter(monkeypatch):
    # torch's TorchScript-based exporter is deprecated: where it is gone, torch.export's makes
    # the same networks (the U-Net with dynamic map sides, the flux estimator's)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from astrotrunc.detection import _onnx
    from astrotrunc.detection.photometry import FluxEstimator
    from astrotrunc.detection.unet import inference_copy

    det = _tiny_detector(space_to_depth=2)
    net = inference_copy(det.net, [1])
    est = FluxEstimator(half_size=3, channels=4, hidden=8, architecture="strided")
    phot = est._inference_net()
    rng = np.random.default_rng(0)
    maps = torch.as_tensor(rng.normal(size=(3, 1, 40, 52)), dtype=torch.float32)
    cut = (torch.as_tensor(rng.normal(size=(5, 2, 7, 7)), dtype=torch.float32),
           torch.zeros(5, 2), torch.full((5,), 3.0))
    real = torch.onnx.export

    def no_legacy(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript-based exporter is gone")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_legacy)
    m = det.space_to_depth * 2**det.depth
    with torch.no_grad():
        onnx_net = _onnx.OnnxNetwork(net, (torch.zeros(1, 1, 2 * m, 2 * m),), multiple=m)
        torch.testing.assert_close(onnx_net(maps), net(maps), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_onnx.OnnxNetwork(phot, tuple(t[:1] for t in cut))(*cut),
                                   phot(*cut), atol=1e-4, rtol=1e-4)

    def broken(*args, **kwargs):
        raise ValueError("no exporter")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="TorchScript-based exporter.*use backend='torch'"):
        _onnx.OnnxNetwork(net, (torch.zeros(1, 1, 2 * m, 2 * m),), multiple=m)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_finders_give_the_torch_catalog(one_thread, runtime):
    pytest.importorskip(runtime)
    maps = PointSourceModel.paper().simulate(2, seed=8).maps.numpy()
    torch_finder = NeuralSourceFinder(backend="torch")
    runtime_finder = NeuralSourceFinder(backend=runtime)
    for m in maps:
        a, b = torch_finder(m), runtime_finder(m)
        assert len(a) == len(b) > 10
        np.testing.assert_allclose(a["x_centroid"].value, b["x_centroid"].value, atol=1e-3)
        np.testing.assert_allclose(a["flux"].value, b["flux"].value, rtol=1e-3)
    np.testing.assert_array_equal(torch_finder.find_batch(maps),
                                  runtime_finder.find_batch(maps))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_finders_from_several_threads(runtime):
    # the first maps of a survey's thread pool export the networks at the same time; an
    # OpenVINO request serves one call at a time: each thread has its own
    pytest.importorskip(runtime)
    finder = NeuralSourceFinder(SourceDetector.load_default(), backend=runtime)  # a copy
    maps = PointSourceModel.paper().simulate(4, seed=9).maps.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(4) as pool:
            cats = list(pool.map(finder, maps))
        assert [len(c) for c in cats] == [len(finder(m)) for m in maps]


def test_backend_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        NeuralSourceFinder(backend="tensorrt")
    assert check_backend("auto", "cuda") == "torch"  # the runtimes run on the CPU only
    installed = [r for r in ("openvino", "onnxruntime") if importlib.util.find_spec(r)]
    if installed:  # the default, 'auto': OpenVINO first (the faster for r1's network)
        assert NeuralSourceFinder().backend == installed[0]
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ImportError, match=r"astrotrunc\[openvino\]"):
        NeuralSourceFinder(backend="openvino")
    if "onnxruntime" in installed:
        assert NeuralSourceFinder().backend == "onnxruntime"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"astrotrunc\[onnx\]"):
        NeuralSourceFinder(backend="onnxruntime")
    assert NeuralSourceFinder().backend == "torch"
    assert check_backend("auto") == "torch"


@pytest.mark.parametrize("deblend", [True, False])
@pytest.mark.parametrize("n_pixels", [1, 3])
def test_regions_equal_the_reference(deblend, n_pixels):
    rng = np.random.default_rng(3)
    # smooth maps with many maxima, plateaus (quantised values), masks and border regions
    stack, masks = [], []
    for i in range(6):
        lo = ndimage.gaussian_filter(rng.normal(size=(61, 47)), 1.5) * 12
        if i % 2:
            lo = np.round(lo)
        mask = rng.random(lo.shape) < 0.03 if i % 3 else None
        for threshold in (0.5, 3.0):
            ref = _reference_regions(lo, threshold, n_pixels, mask, deblend)
            got = detection_regions(lo, threshold, n_pixels, mask, deblend)
            assert (ref is None) == (got is None)
            if ref is not None:
                np.testing.assert_array_equal(got.data, ref.data)
                np.testing.assert_array_equal(got.labels, ref.labels)
        stack.append(lo)
        masks.append(np.zeros(lo.shape, bool) if mask is None else mask)
    # the batch path (find_batch) segments a stack at once; a map without regions in between
    stack.insert(2, np.full_like(stack[0], -np.inf))
    masks.insert(2, np.zeros(stack[0].shape, bool))
    for threshold in (0.5, 3.0):
        batch = _regions_batch(np.stack(stack), threshold, n_pixels, np.stack(masks), deblend)
        assert batch.dtype == np.int32
        for lo, mask, got in zip(stack, masks, batch):
            ref = detection_regions(lo, threshold, n_pixels, mask, deblend)
            np.testing.assert_array_equal(got, 0 if ref is None else ref.data)


def test_shipped_detector_catalogs_equal_the_reference_path(monkeypatch, one_thread):
    """Optimised against reference (unfused network, photutils segmentation, scipy region
    statistics) on a few paper maps and one tiled map: same rows, columns to float tolerance."""
    maps = PointSourceModel.paper().simulate(3, seed=21).maps.numpy()
    finder = NeuralSourceFinder(default_detector())
    fast = [finder(m) for m in maps]
    fast_batch = finder.find_batch(maps)
    with monkeypatch.context() as mp:
        mp.setattr(SourceDetector, "_inference_logits", _reference_logits)
        mp.setattr(NeuralSourceFinder, "segment", lambda self, lo, bad=None: _reference_regions(
            lo, self.threshold, self.n_pixels, bad, self.deblend))
        ref_lo = finder.log_odds_batch(maps)
        ref = [finder(m) for m in maps]
    for i, (cat, want) in enumerate(zip(fast, ref)):
        assert len(cat) == len(want) > 10
        for name in ("id", "n_pixels", "label"):
            np.testing.assert_array_equal(cat[name], want[name])
        for name in ("x_centroid", "y_centroid", "flux", "flux_err", "peak_odds",
                     "detection_probability"):
            np.testing.assert_allclose(np.asarray(cat[name]), np.asarray(want[name]),
                                       rtol=1e-3, atol=1e-6, err_msg=name)
        assert np.isnan(cat["l"]).all() and cat["l"].unit == want["l"].unit
        # the batch path makes the same regions
        segm = _reference_regions(ref_lo[i], finder.threshold, 1, None, True)
        np.testing.assert_array_equal(fast_batch[i], segm.data)
        # and the region statistics equal scipy's on the same odds map
        odds = np.exp(ref_lo[i])
        x, y = peak_centroids(odds, segm)
        peaks = ndimage.maximum_position(odds, segm.data, segm.labels)
        np.testing.assert_allclose(y, [p[0] for p in peaks], atol=1.0)
        np.testing.assert_allclose(x, [p[1] for p in peaks], atol=1.0)


def test_large_maps_use_even_tiles_and_bounded_calls(monkeypatch):
    assert _tile_shape((128, 128), (128, 128), 32, 8) == (128, 128)
    assert _tile_shape((512, 300), (128, 128), 32, 8) == (512, 300)
    for n in (513, 700, 2048, 5000):
        th, tw = _tile_shape((n, n), (128, 128), 32, 8)
        assert th == tw and th % 8 == 0 and 128 < th <= 512
        count = -(-(n - 32) // (th - 32))
        assert count * (th - 32) + 32 >= n  # the tiles cover the map
    det = _tiny_detector()
    calls = []
    real = SourceDetector._inference_logits

    def spy(self, maps, channel=None, backend="torch"):
        calls.append(tuple(maps.shape))
        return real(self, maps, channel, backend)

    monkeypatch.setattr(SourceDetector, "_inference_logits", spy)
    big = np.tile(PointSourceModel.paper().simulate(1, seed=5).maps.numpy()[0], (5, 4))
    lo = det.log_odds(big, batch_size=64)
    assert lo.shape == big.shape and np.isfinite(lo).all()
    assert all(n * h * w <= 2**19 for n, h, w in calls)


def test_empty_batch_gives_empty_stacks():
    finder = NeuralSourceFinder(default_detector())
    empty = np.zeros((0, 32, 40))
    labels, log_odds = finder.find_batch(empty), finder.log_odds_batch(empty)
    assert labels.shape == log_odds.shape == (0, 32, 40)
    assert labels.dtype == np.int32 and log_odds.dtype == np.float64


def test_find_batch_segments_in_parts_as_in_one(monkeypatch):
    from astrotrunc.detection import finder as finder_module

    maps = PointSourceModel.paper().simulate(5, seed=4).maps.numpy()
    finder = NeuralSourceFinder(default_detector())
    whole = finder.find_batch(maps)
    monkeypatch.setattr(finder_module, "_PIXELS_PER_SEGMENTATION", 2 * 128 * 128)
    np.testing.assert_array_equal(finder.find_batch(maps), whole)  # parts of 2, 2 and 1 maps
    assert whole.max() > 0
