"""r1 -- the neural source detector and the catalog it makes (photutils-style).

The detector is an image-to-image network (a small U-Net) whose per-pixel logit estimates

    log r1(s, F_th; x) = log p(source with F > F_th centred at s | x) / p(none | x),

one output channel per flux threshold F_th (cumulative: channel k is "a source brighter than
``flux_thresholds[k]``"). It is trained with per-pixel binary cross-entropy on simulations of a
`~astrotrunc.PointSourceModel` -- an NRE classifier whose joint/marginal classes are "a source
centre here" / "none". A source is *detected* where a connected region has odds above a
threshold (5 in the paper); the regions are found with photutils segmentation.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from importlib import resources

import numpy as np
import torch
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable
from astropy.wcs import WCS
from photutils.segmentation import SegmentationImage, SourceCatalog, detect_sources
from photutils.utils import NoDetectionsWarning
from scipy import ndimage
from torch import nn

from .exceptions import AstrotruncWarning
from .nre import RatioEstimator, Trainer

__all__ = ["UNet", "SourceDetector", "find_sources", "NeuralSourceFinder", "detection_labels",
           "default_detector", "catalog_to_regions", "detection_regions", "peak_centroids",
           "PAPER_FLUX_THRESHOLDS"]

#: The paper's flux-threshold grid: the 13 edges of 12 log bins from 0.1 to 100 (F_th = 1, 10, ...).
PAPER_FLUX_THRESHOLDS = tuple(float(f) for f in np.logspace(-1, 2, 13))

_DEFAULT_DETECTOR = "detector_paper.safetensors"


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------
class _ConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net: ``(n, c_in, H, W) -> (n, c_out, H, W)`` logits.

    Parameters
    ----------
    in_channels, out_channels : int
        Input and output channels.
    base_channels : int
        Channels at full resolution; doubled at each level.
    depth : int
        Number of down-sampling steps; H and W are padded to multiples of ``2**depth``.
    """

    def __init__(self, in_channels=1, out_channels=1, base_channels=16, depth=3):
        super().__init__()
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([_ConvBlock(in_channels, chans[0])] +
                                  [_ConvBlock(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_ConvBlock(2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], out_channels, 1)
        # source centres are rare (~1 % of pixels): start at low prior odds, not at 1:1
        nn.init.constant_(self.head.bias, -5.0)

    def forward(self, x):
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------
def detection_labels(sims, flux_thresholds) -> torch.Tensor:
    """Per-pixel detection labels ``(n, n_thresholds, H, W)`` of a `~astrotrunc.SimulationBatch`.

    Channel k of pixel p is 1 when p holds the centre (nearest pixel) of a source with
    ``F > flux_thresholds[k]``.
    """
    n, ny, nx = sims.maps.shape
    thr = torch.as_tensor(flux_thresholds, dtype=sims.flux.dtype, device=sims.flux.device)
    ix = torch.floor(sims.x + 0.5).long().clamp(0, nx - 1)
    iy = torch.floor(sims.y + 0.5).long().clamp(0, ny - 1)
    bright = sims.in_map[:, None, :] & (sims.flux[:, None, :] > thr[None, :, None])  # (n, k, s)
    labels = torch.zeros(n, len(thr), ny * nx, device=sims.maps.device)
    index = (iy * nx + ix)[:, None, :].expand_as(bright)
    labels.scatter_reduce_(2, index, bright.float(), reduce="amax")
    return labels.view(n, len(thr), ny, nx)


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------
class SourceDetector(RatioEstimator):
    """r1: per-pixel detection odds of sources brighter than each flux threshold.

    Parameters
    ----------
    flux_thresholds : sequence of float
        Increasing flux thresholds F_th (model flux units), one output channel each.
    shape : tuple of int
        Map shape the detector is trained on (also the tile size on larger maps).
    exposure : float
        Exposure of the training model; the input is ``log1p(exposure * max(data, 0))``.
    psf_stamp : list of list of float
        Normalised PSF stamp of the model (for the flux estimate).
    normalization : float
        Instrument normalisation (data = normalization × flux ⊗ PSF).
    background : float
        Scalar background of the model, subtracted before the flux estimate.
    base_channels, depth : int
        U-Net size.
    flux_unit : str
        Unit of fluxes and data.
    name : str
        A label recorded in catalogs made with this detector.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, SourceDetector
    >>> model = PointSourceModel.paper()
    >>> det = SourceDetector.from_model(model, flux_thresholds=[1.0, 10.0], base_channels=4, depth=2)
    >>> sims = model.simulate(2, seed=0)
    >>> det.predict(sims.maps[0]).shape   # odds of a source with F > 1 (first channel)
    (128, 128)
    """

    def __init__(self, flux_thresholds=(10.0,), shape=(128, 128), exposure=100.0, psf_stamp=((1.0,),),
                 normalization=1.0, background=0.0, base_channels=16, depth=3, flux_unit="",
                 name="r1", default_flux_threshold=None):
        super().__init__()
        thr = [float(f) for f in flux_thresholds]
        if not thr or any(b <= a for a, b in zip(thr, thr[1:])) or thr[0] <= 0:
            raise ValueError(f"flux_thresholds must be positive and increasing, got {flux_thresholds}")
        self.flux_thresholds = tuple(thr)
        self.shape = (int(shape[0]), int(shape[1]))
        self.exposure = float(exposure)
        self.normalization = float(normalization)
        self.background = float(background)
        self.flux_unit = u.Unit(flux_unit).to_string()
        self.name = str(name)
        self.default_flux_threshold = float(default_flux_threshold or thr[0])
        self.base_channels, self.depth = int(base_channels), int(depth)
        stamp = torch.as_tensor(np.asarray(psf_stamp, dtype=np.float32))
        self.register_buffer("psf_stamp", stamp / stamp.sum())
        self.net = UNet(1, len(thr), self.base_channels, self.depth)

    @classmethod
    def from_model(cls, model, flux_thresholds=PAPER_FLUX_THRESHOLDS, **kwargs):
        """A detector matched to a `~astrotrunc.PointSourceModel` (its shape, exposure, PSF)."""
        return cls(flux_thresholds=flux_thresholds, **_instrument_config(model), **kwargs)

    @property
    def config(self) -> dict:
        return dict(flux_thresholds=list(self.flux_thresholds), shape=list(self.shape),
                    exposure=self.exposure, psf_stamp=self.psf_stamp.tolist(),
                    normalization=self.normalization, background=self.background,
                    base_channels=self.base_channels, depth=self.depth, flux_unit=self.flux_unit,
                    name=self.name, default_flux_threshold=self.default_flux_threshold)

    @property
    def identity(self) -> str:
        """A short hash of the detector's weights and configuration (pairs r2 with its r1)."""
        # hashing 2 MB of weights costs ~1.5 ms: cache it until a tensor is modified in place
        # (optimizer steps, load_state_dict) -- torch bumps every tensor's version counter then
        tensors = [*self.parameters(), *self.buffers()]
        key = (tuple(id(t) for t in tensors), tuple(t._version for t in tensors),
               repr(sorted(self.config.items())))
        cached = self.__dict__.get("_identity_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        h = hashlib.sha256(key[2].encode())
        for t in self.state_dict().values():
            h.update(t.detach().cpu().numpy().tobytes())
        self.__dict__["_identity_cache"] = (key, h.hexdigest()[:16])
        return self.__dict__["_identity_cache"][1]

    # -- NRE engine interface ------------------------------------------------------------
    def preprocess(self, data: torch.Tensor) -> torch.Tensor:
        """Network input ``(n, 1, H, W)`` from data ``(n, H, W)`` (flux units)."""
        return torch.log1p(data.clamp_min(0) * self.exposure).unsqueeze(1)

    def forward(self, batch) -> torch.Tensor:
        """Per-pixel log r1, ``(n, n_thresholds, H, W)``; ``batch`` is a dict with ``"x"`` or a tensor."""
        x = batch["x"] if isinstance(batch, dict) else batch
        return self.net(self.preprocess(x))

    def loss(self, batch) -> torch.Tensor:
        """Per-pixel binary cross-entropy against ``batch["labels"]`` (the NRE classifier loss)."""
        logits = self(batch)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])

    # -- training --------------------------------------------------------------------------
    def train(self, model=True, flux_thresholds=None, *, n_train=20000, n_val=1000, seed=0,
              **trainer_kwargs):
        """Train on fresh simulations of a `~astrotrunc.PointSourceModel`.

        ``detector.train(model, ...)`` trains; ``detector.train(True/False)`` keeps its
        `torch.nn.Module` meaning (training/evaluation mode).

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The simulator; the detector takes its map shape, exposure and PSF.
        flux_thresholds : sequence of float, optional
            New F_th channels (the network restarts from fresh weights); current ones if `None`.
        n_train, n_val : int
            Training and validation simulations (made on demand, never held in memory).
        seed : int
            Seed of the simulations and of the trainer.
        **trainer_kwargs
            Passed to `~astrotrunc.nre.Trainer` (``max_epochs``, ``batch_size``,
            ``learning_rate``, ``checkpoint_dir``, ``progress``, ...).

        Returns
        -------
        history
            The trainer's history.
        """
        if isinstance(model, bool):
            return super().train(model)
        cfg = self.config
        cfg.update(_instrument_config(model))
        if flux_thresholds is not None:
            cfg["flux_thresholds"] = [float(f) for f in flux_thresholds]
        if cfg != self.config:
            state = self.state_dict() if flux_thresholds is None else None
            self.__init__(**cfg)
            if state is not None and cfg["psf_stamp"] == state["psf_stamp"].tolist():
                self.load_state_dict(state)
        data = _DetectionSimulations(model, self.flux_thresholds, n_train, n_val, seed)
        trainer_kwargs.setdefault("seed", seed)
        return Trainer(**trainer_kwargs).fit(self, data)

    # -- inference -------------------------------------------------------------------------
    def _channel(self, flux_threshold):
        f = self.default_flux_threshold if flux_threshold is None else float(flux_threshold)
        k = int(np.argmin(np.abs(np.log(self.flux_thresholds) - math.log(f))))
        if not math.isclose(self.flux_thresholds[k], f, rel_tol=1e-3):
            raise ValueError(f"flux_threshold {f} is not one of the detector's thresholds "
                             f"{[round(t, 4) for t in self.flux_thresholds]}")
        return k

    @torch.no_grad()
    def log_odds(self, data, mask=None, *, flux_threshold=None, tile_overlap=32, batch_size=16):
        """Per-pixel log r1 of one map (2-D) for one flux threshold, as a numpy array.

        Maps larger than the training shape are processed in overlapping tiles of that shape;
        masked and NaN pixels are zero-filled at the input and get log-odds ``-inf``.
        """
        data, mask = _validated_map(data, mask)
        k = self._channel(flux_threshold)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        x = torch.as_tensor(np.where(mask, 0.0, data), dtype=torch.float32, device=device)
        # the U-Net is fully convolutional: on large maps, tiles of 4x the training size cut the
        # overlap overhead while memory stays bounded
        tile = (min(x.shape[0], 4 * self.shape[0]), min(x.shape[1], 4 * self.shape[1]))
        tile = tuple(max(t, s) for t, s in zip(tile, self.shape))
        out = _tiled(lambda t: self(t)[:, k], x, tile, tile_overlap, batch_size)
        self.train(was_training)
        logits = out.cpu().numpy().astype(np.float64)
        logits[mask] = -np.inf
        return logits

    def predict(self, data, mask=None, *, flux_threshold=None, **kwargs):
        """Per-pixel odds r1 of a source brighter than ``flux_threshold`` (2-D numpy array)."""
        with np.errstate(over="ignore"):
            return np.exp(self.log_odds(data, mask, flux_threshold=flux_threshold, **kwargs))

    def estimate_flux(self, data, x, y, mask=None):
        """PSF-weighted least-squares flux (and its Poisson error) of sources at pixels (x, y)."""
        data = np.asarray(data, dtype=np.float64)
        stamp = self.psf_stamp.cpu().numpy().astype(np.float64)
        r_y, r_x = stamp.shape[0] // 2, stamp.shape[1] // 2
        bad = ~np.isfinite(data) if mask is None else (mask | ~np.isfinite(data))
        padded = np.pad(np.where(bad, 0.0, data - self.background), ((r_y, r_y), (r_x, r_x)))
        weight = np.pad((~bad).astype(float), ((r_y, r_y), (r_x, r_x)))
        ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(int), 0, data.shape[1] - 1)
        iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(int), 0, data.shape[0] - 1)
        dy, dx = np.mgrid[0:2 * r_y + 1, 0:2 * r_x + 1]
        cut = padded[iy[:, None, None] + dy, ix[:, None, None] + dx]
        wcut = weight[iy[:, None, None] + dy, ix[:, None, None] + dx] * stamp
        norm = self.normalization * (wcut * stamp).sum((1, 2))
        flux = (cut * wcut).sum((1, 2)) / norm
        var = (np.clip(cut + self.background, 0, None) * wcut**2).sum((1, 2)) / self.exposure / norm**2
        return flux, np.sqrt(var)

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def load_default(cls) -> "SourceDetector":
        """The detector shipped with astrotrunc, trained on `PointSourceModel.paper`."""
        path = resources.files("astrotrunc") / "data" / _DEFAULT_DETECTOR
        if not path.is_file():  # pragma: no cover - packaging error
            raise OSError(f"the default detector is missing from the installation ({path})")
        return cls.load(str(path))


@functools.lru_cache(maxsize=1)
def default_detector() -> SourceDetector:
    """The shipped default detector (loaded once per process)."""
    return SourceDetector.load_default()


def _instrument_config(model) -> dict:
    inst = model.instrument
    if np.ndim(inst.exposure) or np.ndim(inst.background):
        warnings.warn("exposure/background maps are summarised by their mean in the detector's "
                      "input scaling and flux estimate", AstrotruncWarning)
    return dict(shape=list(model.shape), exposure=float(np.mean(inst.exposure)),
                psf_stamp=_psf_stamp(model).tolist(), normalization=inst.normalization,
                background=float(np.mean(inst.background)), flux_unit=model.flux_unit.to_string())


def _psf_stamp(model) -> np.ndarray:
    """The model's noiseless response to one unit source at the map centre, cropped, sum 1."""
    ny, nx = model.shape
    one = torch.ones(1, 1)
    mu = model.render(one, one * (nx // 2), one * (ny // 2), one.bool())[0].double().numpy()
    mu -= mu.min()  # background
    rows, cols = np.nonzero(mu > mu.max() * 1e-12)
    r = max(ny // 2 - rows.min(), rows.max() - ny // 2, nx // 2 - cols.min(), cols.max() - nx // 2)
    stamp = mu[ny // 2 - r: ny // 2 + r + 1, nx // 2 - r: nx // 2 + r + 1]
    return stamp / stamp.sum()


class _DetectionSimulations:
    """r1 training data as an engine batch source: fresh simulations every epoch, in batches.

    The simulator is far faster than the network, so every epoch sees new maps (no overfitting)
    and nothing is held in memory; the validation maps are the same every epoch.
    """

    def __init__(self, model, thresholds, n_train, n_val, seed):
        self.model, self.thresholds = model, tuple(thresholds)
        self.n_train, self.n_val, self.seed = int(n_train), int(n_val), int(seed)

    def _batches(self, n, seed, batch_size):
        for sims in self.model.iter_simulate(n, seed=seed, chunk_size=batch_size):
            yield {"x": sims.maps, "labels": detection_labels(sims, self.thresholds)}

    def train_batches(self, batch_size, epoch):
        return self._batches(self.n_train, (self.seed, 1, epoch), batch_size)

    def val_batches(self, batch_size):
        return self._batches(self.n_val, (self.seed, 0), batch_size)

    def n_batches(self, batch_size):
        return -(-self.n_train // batch_size)


def _tiled(fn, x, tile, overlap, batch_size):
    """Apply an image-to-image ``fn`` on ``x (H, W)`` in overlapping tiles of shape ``tile``."""
    h, w = x.shape
    th, tw = tile
    if h <= th and w <= tw:
        return fn(x[None])[0]
    margin = overlap // 2
    step_y, step_x = max(th - 2 * margin, 1), max(tw - 2 * margin, 1)
    ys = list(range(0, max(h - th, 0) + 1, step_y))
    xs = list(range(0, max(w - tw, 0) + 1, step_x))
    if ys[-1] + th < h:
        ys.append(h - th)
    if xs[-1] + tw < w:
        xs.append(w - tw)
    padded = nn.functional.pad(x[None, None], (0, max(tw - w, 0), 0, max(th - h, 0)))[0, 0]
    out = torch.empty(padded.shape, dtype=torch.float32, device=x.device)
    corners = [(y0, x0) for y0 in ys for x0 in xs]
    for i in range(0, len(corners), batch_size):
        group = corners[i:i + batch_size]
        tiles = torch.stack([padded[y0:y0 + th, x0:x0 + tw] for y0, x0 in group])
        res = fn(tiles)
        for (y0, x0), r in zip(group, res):
            # keep the tile's centre; a tile touching the map edge keeps that edge too
            top = 0 if y0 == 0 else margin
            left = 0 if x0 == 0 else margin
            bottom = th if y0 + th >= padded.shape[0] else th - margin
            right = tw if x0 + tw >= padded.shape[1] else tw - margin
            out[y0 + top:y0 + bottom, x0 + left:x0 + right] = r[top:bottom, left:right]
    return out[:h, :w]


# ----------------------------------------------------------------------------------------------
# Catalogs
# ----------------------------------------------------------------------------------------------
def _validated_map(data, mask):
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    data = np.asarray(getattr(data, "data", data))
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-D image, got an array with {data.ndim} dimensions "
                         f"and shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.number) and not np.iscomplexobj(data)):
        raise ValueError(f"data must be a real-valued numeric image, got dtype {data.dtype}")
    data = data.astype(np.float64)  # integer maps: no overflow in the arithmetic below
    bad = ~np.isfinite(data)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the data shape {data.shape}")
        unmasked_bad = bad & ~mask
        bad = bad | mask
    else:
        unmasked_bad = bad
    if unmasked_bad.any() and not bad.all():
        warnings.warn(f"{int(unmasked_bad.sum())} NaN or infinite pixel(s) are not in the mask: "
                      "they are treated as masked", AstrotruncWarning)
    if bad.all():
        raise ValueError("every pixel of the map is masked or not finite: nothing to detect")
    return data, bad


def find_sources(data, detector=None, *, wcs=None, mask=None, threshold=5.0, n_pixels=1,
                 flux_threshold=None, deblend=True, return_segmentation=False):
    """Detect point sources with the r1 detector: one catalog row per region with odds > threshold.

    Parameters
    ----------
    data : 2-D array, `~astropy.nddata.NDData` or `torch.Tensor`
        The map, in the flux units of the detector's model. An `~astropy.nddata.NDData` brings its
        own ``wcs`` and ``mask``.
    detector : `SourceDetector`, optional
        The shipped default (trained on `~astrotrunc.PointSourceModel.paper`) when `None`.
    wcs : `~astropy.wcs.WCS`, optional
        Celestial WCS of the map, for sky coordinates.
    mask : 2-D bool array, optional
        True where pixels are bad; NaN pixels are masked too.
    threshold : float
        Odds threshold r1 > threshold (5 in the paper).
    n_pixels : int
        Minimum number of connected pixels of a region.
    flux_threshold : float, optional
        Which F_th channel of the detector to use (its default when `None`).
    deblend : bool
        Split regions at their local odds maxima (see `detection_regions`).
    return_segmentation : bool
        Also return the `~photutils.segmentation.SegmentationImage` of the regions R_i.

    Returns
    -------
    catalog : `~astropy.table.QTable` or `None`
        Columns ``id, x_centroid, y_centroid, sky_centroid, l, b, flux, flux_err, peak_odds,
        detection_probability, n_pixels, label`` (photutils 3.x names); the centroid is that of
        the odds around the region's peak (`peak_centroids`); `None` (with a
        `~photutils.utils.NoDetectionsWarning`) if nothing is detected. ``detection_probability``
        is the probability that the region holds at least one source centre, ``1 - prod(1 - p)``
        over its pixels with ``p = odds / (1 + odds)``.
    segmentation : `~photutils.segmentation.SegmentationImage`
        Only with ``return_segmentation=True``.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, find_sources
    >>> sims = PointSourceModel.paper().simulate(1, seed=3)
    >>> cat = find_sources(sims.maps[0], wcs=PointSourceModel.paper().wcs)
    >>> cat.colnames[:4]
    ['id', 'x_centroid', 'y_centroid', 'sky_centroid']
    """
    if wcs is None:
        wcs = getattr(data, "wcs", None)
    if mask is None:
        mask = getattr(data, "mask", None)
    if detector is None:
        detector = default_detector()
    elif not isinstance(detector, SourceDetector):
        raise TypeError(f"detector must be a SourceDetector, got {type(detector).__name__}")
    data, bad = _validated_map(data, mask)
    if wcs is not None:
        if not isinstance(wcs, WCS):
            raise TypeError(f"wcs must be an astropy WCS, got {type(wcs).__name__}")
        if wcs.array_shape is not None and tuple(wcs.array_shape) != data.shape:
            raise ValueError(f"the WCS describes a {tuple(wcs.array_shape)} image but the data are "
                             f"{data.shape}")
    f_th = detector.flux_thresholds[detector._channel(flux_threshold)]
    log_odds = detector.log_odds(data, bad, flux_threshold=f_th)
    segm = detection_regions(log_odds, threshold, n_pixels, bad, deblend)
    if segm is None:
        warnings.warn("No sources were found (no region with odds above the threshold).",
                      NoDetectionsWarning)
        return (None, None) if return_segmentation else None
    with np.errstate(over="ignore"):
        odds = np.exp(np.clip(log_odds, -700, 700))
        odds[bad] = 0.0
    cat = SourceCatalog(odds, segm, mask=bad)
    labels = segm.labels
    log_miss = ndimage.sum_labels(-np.logaddexp(0, np.where(bad, -np.inf, log_odds)), segm.data, labels)
    xc, yc = peak_centroids(odds, segm)
    table = QTable()
    table["id"] = np.arange(1, len(labels) + 1)
    table["x_centroid"] = xc * u.pix
    table["y_centroid"] = yc * u.pix
    if wcs is not None and wcs.has_celestial:
        sky = wcs.celestial.pixel_to_world(xc, yc)
        sky = sky.galactic if hasattr(sky, "galactic") else sky
        table["sky_centroid"] = sky
        table.meta["pixel_scale_deg"] = float(np.mean(
            [abs(p.to_value(u.deg)) for p in wcs.celestial.proj_plane_pixel_scales()]))
        table["l"] = sky.l.wrap_at(180 * u.deg).to(u.deg)
        table["b"] = sky.b.to(u.deg)
    else:
        nan = np.full(len(labels), np.nan) * u.deg
        table["sky_centroid"] = SkyCoord(nan, nan, frame="galactic")
        table["l"], table["b"] = nan, nan
    flux, flux_err = detector.estimate_flux(data, xc, yc, bad)
    funit = u.Unit(detector.flux_unit)
    table["flux"] = flux * funit
    table["flux_err"] = flux_err * funit
    table["peak_odds"] = cat.max_value
    table["detection_probability"] = -np.expm1(log_miss)
    table["n_pixels"] = cat.area.to_value(u.pix**2).astype(int)
    table["label"] = labels
    table.meta.update({"detector": detector.name, "detector_id": detector.identity,
                       "threshold": float(threshold), "flux_threshold": float(f_th),
                       "n_pixels": int(n_pixels)})
    return (table, segm) if return_segmentation else table


def detection_regions(log_odds, threshold=5.0, n_pixels=1, mask=None, deblend=True):
    """The detected regions R_i of a log-odds map, as a `~photutils.segmentation.SegmentationImage`.

    Pixels with odds > ``threshold`` are segmented with `photutils.segmentation.detect_sources`;
    with ``deblend=True`` every segment is then split into the basins of its local odds maxima
    (each pixel joins the maximum that steepest ascent inside its segment leads to), so that
    neighbouring sources whose odds regions touch are catalogued separately -- one region per
    most-probable source centre. A pixel never joins a maximum of another segment.

    Returns `None` when nothing is above the threshold.
    """
    segm = detect_sources(log_odds, math.log(threshold), n_pixels=n_pixels, mask=mask)
    if segm is None or not deblend:
        return segm
    inside = segm.data > 0
    peaks = inside & (log_odds == ndimage.maximum_filter(log_odds, size=3, mode="nearest"))
    markers, _ = ndimage.label(peaks, structure=np.ones((3, 3)))
    # steepest ascent within the segment, by pointer jumping (scipy's watershed_ift let distant
    # markers flood across the background and take pixels of other segments)
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
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    basins = markers.ravel()[parent].reshape(ny, nx)
    basins[~inside] = 0
    return SegmentationImage(basins)


def peak_centroids(odds, segm):
    """Source position of every region: its odds peak, refined by the odds-weighted 3×3 centroid.

    A region that merges several sources (bright neighbours at a low odds threshold) is placed on
    its most probable source centre, not between the sources as a whole-region centroid would be.

    Returns
    -------
    x, y : arrays
        Pixel coordinates (0-based), in the order of ``segm.labels``.
    """
    ny, nx = odds.shape
    peaks = np.array(ndimage.maximum_position(odds, segm.data, segm.labels)).reshape(-1, 2)
    dy, dx = np.mgrid[-1:2, -1:2]
    yy = np.clip(peaks[:, 0, None, None] + dy, 0, ny - 1)
    xx = np.clip(peaks[:, 1, None, None] + dx, 0, nx - 1)
    same = segm.data[yy, xx] == segm.data[peaks[:, 0], peaks[:, 1]][:, None, None]
    w = np.where(same, odds[yy, xx], 0.0)
    w_sum = w.sum((1, 2))
    return (w * xx).sum((1, 2)) / w_sum, (w * yy).sum((1, 2)) / w_sum


class NeuralSourceFinder:
    """photutils-style finder class around `find_sources`.

    Parameters
    ----------
    detector : `SourceDetector`, optional
        The shipped default when `None`.
    threshold : float
        Odds threshold (5 in the paper).
    n_pixels : int
        Minimum region size.
    flux_threshold : float, optional
        F_th channel.

    Examples
    --------
    >>> from astrotrunc import NeuralSourceFinder, PointSourceModel
    >>> finder = NeuralSourceFinder(threshold=5)
    >>> cat = finder(PointSourceModel.paper().simulate(1, seed=3).maps[0])
    >>> len(cat) > 0
    True
    """

    def __init__(self, detector=None, threshold=5.0, n_pixels=1, flux_threshold=None):
        self.detector = detector
        self.threshold = threshold
        self.n_pixels = n_pixels
        self.flux_threshold = flux_threshold

    def __call__(self, data, mask=None, wcs=None):
        return find_sources(data, self.detector, wcs=wcs, mask=mask, threshold=self.threshold,
                            n_pixels=self.n_pixels, flux_threshold=self.flux_threshold)

    def __repr__(self):
        return (f"NeuralSourceFinder(threshold={self.threshold}, n_pixels={self.n_pixels}, "
                f"flux_threshold={self.flux_threshold})")




def catalog_to_regions(catalog, radius=None):
    """DS9-ready `regions.Regions` of a `find_sources` catalog: one circle per source.

    Sky circles (Galactic) when the catalog has sky coordinates, pixel circles otherwise; the
    default radius is the PSF's half width at half maximum (one pixel at least). Write them with
    ``catalog_to_regions(cat).write("catalog.reg", format="ds9")``.
    """
    from regions import CirclePixelRegion, CircleSkyRegion, PixCoord, RegionMeta, Regions

    if catalog is None or len(catalog) == 0:
        raise ValueError("the catalog is empty: no regions to make")
    sky = catalog["sky_centroid"] if "sky_centroid" in catalog.colnames else None
    scale = catalog.meta.get("pixel_scale_deg")
    use_sky = sky is not None and scale is not None and np.isfinite(sky.galactic.l.deg).all()
    radius = 1.5 * u.pix if radius is None else radius
    out = []
    for i, row in enumerate(catalog):
        meta = RegionMeta({"text": str(row["id"])})
        if use_sky:
            r = radius * scale * u.deg / u.pix if radius.unit == u.pix else radius
            out.append(CircleSkyRegion(sky[i], r.to(u.arcmin), meta=meta))
        else:
            r = radius.to_value(u.pix) if isinstance(radius, u.Quantity) else float(radius)
            out.append(CirclePixelRegion(PixCoord(row["x_centroid"].value, row["y_centroid"].value),
                                         r, meta=meta))
    return Regions(out)
