"""r1 -- the source detector: per-pixel detection odds of sources above flux thresholds.

The detector is an image-to-image network (`~astrotrunc.detection.unet.UNet`) whose per-pixel
logit estimates

    log r1(s, F_th; x) = log p(source with F > F_th centred at s | x) / p(none | x),

one output channel per flux threshold F_th (cumulative: channel k is "a source brighter than
``flux_thresholds[k]``"). It is trained with per-pixel binary cross-entropy on simulations of a
`~astrotrunc.PointSourceModel` (`~astrotrunc.detection.DetectionSimulations`) by the engine's
`~astrotrunc.nre.Trainer`; `SourceDetector.fit_to` is the one-liner.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings

import numpy as np
import torch
from astropy import units as u
from torch import nn

from .._utils import nearest_pixel, padded_map, take_stamps, validate_map, weights_identity
from ..exceptions import AstrotruncWarning, OutOfDomainWarning
from ..nre import RatioEstimator, Trainer
from ._onnx import OnnxNetwork, check_backend
from .domain import instrument_domain
from .labels import DetectionSimulations, StoredDetectionSimulations, _same_thresholds
from .tiling import tiled
from .unet import UNet, inference_copy, narrowed_weights

__all__ = ["SourceDetector", "default_detector", "PAPER_FLUX_THRESHOLDS"]

#: The paper's flux-threshold grid: the 13 edges of 12 log bins from 0.1 to 100 (F_th = 1, 10, ...).
PAPER_FLUX_THRESHOLDS = tuple(float(f) for f in np.logspace(-1, 2, 13))

_DEFAULT_DETECTOR = "detector_paper.safetensors"


class SourceDetector(RatioEstimator):
    """r1: per-pixel detection odds of sources brighter than each flux threshold.

    A detector is a network with a domain: it describes, it does not train itself. Train one with
    `SourceDetector.fit_to` (or ``Trainer().fit(detector, DetectionSimulations(model, ...))``);
    ``detector.train(mode)`` is `torch.nn.Module.train`. Detect sources with
    `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.find_sources`.

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
    widths : sequence of int, optional
        The U-Net's channels at each level, full resolution first, instead of
        ``base_channels`` doubled ``depth`` times (``base_channels`` and ``depth`` are then
        ``widths[0]`` and ``len(widths) - 1``; see `~astrotrunc.detection.unet.UNet`). The
        attribute is `None` for doubling widths.
    space_to_depth : int
        Run the U-Net on ``f x f`` pixel blocks folded into channels (1: full resolution; 2:
        about four times faster at the same widths; see `~astrotrunc.detection.unet.UNet`).
    flux_unit : str
        Unit of fluxes and data.
    name : str
        A label recorded in catalogs made with this detector.
    default_flux_threshold : float, optional
        The F_th channel used when none is asked for (the first one by default).
    domain : dict, optional
        The instrument and map statistics of the training maps
        (`~astrotrunc.detection.domain.instrument_domain`); maps are checked against it before
        detection. Not part of `identity`.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, SourceDetector
    >>> model = PointSourceModel.paper()
    >>> det = SourceDetector.from_model(model, flux_thresholds=[1.0, 10.0], base_channels=4,
    ...                                 depth=2)
    >>> sims = model.simulate(2, seed=0)
    >>> det.predict(sims.maps[0]).shape   # odds of a source with F > 1 (first channel)
    (128, 128)
    """

    def __init__(self, flux_thresholds=(10.0,), shape=(128, 128), exposure=100.0,
                 psf_stamp=((1.0,),), normalization=1.0, background=0.0, base_channels=16,
                 depth=3, flux_unit="", name="r1", default_flux_threshold=None, domain=None,
                 space_to_depth=1, widths=None):
        super().__init__()
        thr = [float(f) for f in flux_thresholds]
        if not thr or any(b <= a for a, b in zip(thr, thr[1:])) or not thr[0] > 0 \
                or not all(math.isfinite(t) for t in thr):
            msg = f"flux_thresholds must be positive, finite and increasing, got {flux_thresholds}"
            raise ValueError(msg)
        if widths is not None:
            given = widths
            widths = () if isinstance(widths, (str, bytes)) or not np.iterable(widths) \
                else tuple(widths)
            if not 1 <= len(widths) <= 9 or not all(
                    isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1
                    for w in widths):
                msg = f"widths must be 1 to 9 integers >= 1, got {given!r}"
                raise ValueError(msg)
            widths = tuple(int(w) for w in widths)
            base_channels, depth = widths[0], len(widths) - 1
            if widths == tuple(base_channels * 2**i for i in range(depth + 1)):
                widths = None  # the doubling widths: one architecture, one configuration
        if int(base_channels) < 1 or not 0 <= int(depth) <= 8:
            msg = f"base_channels must be >= 1 and depth in [0, 8], got {base_channels}, {depth}"
            raise ValueError(msg)
        if len(shape) != 2 or min(int(s) for s in shape) < 1:
            msg = f"shape must be two positive integers, got {shape}"
            raise ValueError(msg)
        if not (float(exposure) > 0 and math.isfinite(float(exposure))):
            msg = f"exposure must be positive and finite, got {exposure}"
            raise ValueError(msg)
        self.flux_thresholds = tuple(thr)
        self.shape = (int(shape[0]), int(shape[1]))
        self.exposure = float(exposure)
        self.normalization = float(normalization)
        self.background = float(background)
        self.flux_unit = u.Unit(flux_unit).to_string()
        self.name = str(name)
        self.default_flux_threshold = float(default_flux_threshold or thr[0])
        if not isinstance(space_to_depth, numbers.Integral) or isinstance(space_to_depth, bool) \
                or not 1 <= int(space_to_depth) <= 8:
            msg = f"space_to_depth must be an integer in [1, 8], got {space_to_depth!r}"
            raise ValueError(msg)
        self.base_channels, self.depth = int(base_channels), int(depth)
        self.space_to_depth, self.widths = int(space_to_depth), widths
        if domain is not None and not isinstance(domain, dict):
            msg = f"domain must be a dict (see instrument_domain), got {type(domain).__name__}"
            raise TypeError(msg)
        self.domain = domain
        stamp = torch.as_tensor(np.asarray(psf_stamp, dtype=np.float32))
        if stamp.ndim != 2:
            msg = f"psf_stamp must be a 2-D array, got shape {tuple(stamp.shape)}"
            raise ValueError(msg)
        self.register_buffer("psf_stamp", stamp / stamp.sum())
        self.net = UNet(1, len(thr), self.base_channels, self.depth, self.space_to_depth,
                        self.widths)
        self._channel(None)  # the default channel exists

    @classmethod
    def from_model(cls, model, flux_thresholds=PAPER_FLUX_THRESHOLDS, *, domain_maps=0,
                   **kwargs):
        """An untrained detector matched to a `~astrotrunc.PointSourceModel`.

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            Gives the map shape, exposure, PSF, background and flux unit.
        flux_thresholds : sequence of float
            F_th channels.
        domain_maps : int
            Simulations whose statistics are recorded in the detector's domain (0: the
            instrument only, no map statistics).
        **kwargs
            Other `SourceDetector` arguments (``base_channels``, ``depth``, ``name``, ...).

        Returns
        -------
        `SourceDetector`
        """
        if "domain" not in kwargs:
            kwargs["domain"] = _domain(model, domain_maps)
        return cls(flux_thresholds=flux_thresholds, **_instrument_config(model), **kwargs)

    @classmethod
    def fit_to(cls, model, flux_thresholds=PAPER_FLUX_THRESHOLDS, *, n_train=20000, n_val=1000,
               seed=0, domain_maps=1000, base_channels=16, depth=3, name="r1",
               default_flux_threshold=None, resume=False, store=None, client=None,
               space_to_depth=1, init=None, simulation_device=None, widths=None,
               teacher=None, **trainer_kwargs):
        """A detector trained on fresh simulations of ``model`` (the one-liner).

        Equivalent to ``det = SourceDetector.from_model(model, ...)`` then
        ``Trainer(**trainer_kwargs).fit(det, DetectionSimulations(model, ...))``.

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The simulator.
        flux_thresholds : sequence of float
            F_th channels.
        n_train, n_val : int
            Training maps per epoch and validation maps (made on demand, never held in memory).
        seed : int
            Seed of the simulations, of the network initialisation and of the trainer.
        domain_maps : int
            Simulations whose statistics are recorded as the detector's domain.
        base_channels, depth, space_to_depth, widths, name, default_flux_threshold
            See `SourceDetector`.
        resume : bool
            Continue from the trainer's checkpoint (``checkpoint_dir``).
        store : str, path-like or `~astrotrunc.store.SimulationStore`, optional
            Survey scale: simulate ``n_train + n_val`` maps once into this store, in parallel on
            the Dask ``client`` (`~astrotrunc.detection.StoredDetectionSimulations`; a filled
            store is reused, a killed fill resumes), and train from it, ``n_val`` maps' worth of
            chunks (of ``min(64, n_val)`` maps) held out. With ``torchrun``, rank 0 fills it
            and the other ranks wait.
        client : `distributed.Client`, str or None
            Where the store is filled (see `~astrotrunc.store.SimulationStore.fill`).
        init : `SourceDetector`, str or path-like, optional
            Start from this detector's network weights instead of random ones (fine-tuning:
            a longer schedule, or the shipped detector adapted to another instrument of the
            same map shape; ``"default"``: the shipped detector). Its ``space_to_depth`` and
            flux thresholds must be those asked for; a wider or deeper one gives the weights of
            its strongest channels and of its levels down to the depth asked for
            (`~astrotrunc.detection.unet.narrowed_weights`). The instrument (PSF, exposure...)
            is ``model``'s. Its identity is recorded with the training settings
            (``history.meta["trainer"]["init"]``, in a saved file ``metadata["training"]``).
        simulation_device : str or `torch.device`, optional
            Simulate the training maps there (`DetectionSimulations`' ``device``; e.g.
            ``"cuda"`` when the trainer's ``device`` is a GPU, which CPU simulations cannot
            keep busy). `None`: on the CPU. Not with ``store``.
        teacher : `SourceDetector`, str or path-like, optional
            Distillation: train on this detector's per-pixel probabilities instead of the true
            sources (`~astrotrunc.detection.teacher_labels`; ``"default"``: the shipped
            detector), e.g. a narrower network (``widths``, ``init=teacher``) that should find
            what the teacher finds. Its flux thresholds must be those asked for. It runs where
            the maps are simulated; its identity is recorded as
            ``history.meta["trainer"]["teacher"]``.
        **trainer_kwargs
            Passed to `~astrotrunc.nre.Trainer` (``max_epochs``, ``batch_size``,
            ``learning_rate``, ``checkpoint_dir``, ``progress``, ``nproc``...; with
            ``nproc=K`` the training is data-parallel over K processes).

        Returns
        -------
        `SourceDetector`
            Trained, in evaluation mode; its ``history`` attribute holds the trainer's history.

        Examples
        --------
        >>> from astrotrunc import PointSourceModel, SourceDetector
        >>> det = SourceDetector.fit_to(PointSourceModel.paper(), [10.0], n_train=8, n_val=4,
        ...                             base_channels=4, depth=1, domain_maps=10, max_epochs=1,
        ...                             batch_size=4, progress=False)
        >>> len(det.history), det.training
        (1, False)
        """
        if store is not None and simulation_device is not None:  # before any work
            raise ValueError("simulation_device is for fresh simulations; a store's maps are "
                             "simulated by its Dask client")
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the initial weights: same call, same detector
            det = cls.from_model(model, flux_thresholds, domain_maps=domain_maps,
                                 base_channels=base_channels, depth=depth, name=name,
                                 default_flux_threshold=default_flux_threshold,
                                 space_to_depth=space_to_depth, widths=widths)
        init_id = None if init is None else _initial_weights(det, init)
        if teacher is not None:
            teacher, teacher_id = _teacher_for(teacher, det, simulation_device)
        if store is None:
            data = DetectionSimulations(model, det.flux_thresholds, n_train, n_val, seed,
                                        device=simulation_device, teacher=teacher)
        else:
            data = _stored(model, store, det.flux_thresholds, n_train + n_val, min(64, n_val),
                           seed, client, trainer_kwargs, teacher)
            trainer_kwargs.setdefault("val_fraction", n_val / (n_train + n_val))
        trainer_kwargs.setdefault("seed", seed)
        det.history = Trainer(**trainer_kwargs).fit(det, data, resume=resume)
        if init_id is not None:
            det.history.meta["trainer"]["init"] = init_id
        if teacher is not None:
            det.history.meta["trainer"]["teacher"] = teacher_id
        if simulation_device is not None:
            det.history.meta["trainer"]["simulation_device"] = str(data.device)
        return det

    @property
    def config(self) -> dict:
        """The constructor arguments (JSON-serialisable)."""
        cfg = dict(flux_thresholds=list(self.flux_thresholds), shape=list(self.shape),
                   exposure=self.exposure, psf_stamp=self.psf_stamp.tolist(),
                   normalization=self.normalization, background=self.background,
                   base_channels=self.base_channels, depth=self.depth, flux_unit=self.flux_unit,
                   name=self.name, default_flux_threshold=self.default_flux_threshold)
        if self.space_to_depth != 1:  # absent at 1: earlier files keep their identity
            cfg["space_to_depth"] = self.space_to_depth
        if self.widths is not None:  # likewise
            cfg["widths"] = list(self.widths)
        if self.domain is not None:
            cfg["domain"] = self.domain
        return cfg

    @property
    def identity(self) -> str:
        """A short hash of the detector's weights and configuration (pairs r2 with its r1).

        The domain record is descriptive and not part of the identity.
        """
        # hashing 2 MB of weights costs milliseconds: cache it until the weights change (see
        # _weights_key) or a scalar setting changes
        key = (self._weights_key(), self.flux_thresholds, self.shape, self.exposure,
               self.normalization,
               self.background, self.base_channels, self.depth, self.flux_unit, self.name,
               self.default_flux_threshold, self.space_to_depth, self.widths)

        def digest():
            cfg = self.config
            cfg.pop("domain", None)
            return weights_identity(cfg, self.state_dict().values())

        return self._cached("_identity_cache", key, digest)

    def _inference_logits(self, maps, channel=None, backend="torch"):
        """Evaluation-mode logits ``(n, n_channels or 1, H, W)`` of maps ``(n, H, W)``, fast.

        The network's BatchNorm-fused, channels-last copy (`~astrotrunc.detection.unet.
        inference_copy`, computing only ``channel`` when given) runs under
        `torch.inference_mode`; it is rebuilt when the weights change. Equal to
        ``self.eval()(maps)`` to float32 rounding; never used in training. With
        ``backend="onnxruntime"`` or ``"openvino"`` the same copy runs through that runtime
        (on the CPU).
        """
        if backend != "torch":  # 'onnxruntime' or 'openvino'
            return torch.from_numpy(self._runtime_logits(maps, channel, backend)).to(
                self.psf_stamp.device)  # a no-op on the CPU, where the runtimes run
        keep = None if channel is None else [channel]
        net = self._cached("_inference_net", (self._weights_key(), channel),
                           lambda: inference_copy(self.net, keep))
        device = self.psf_stamp.device
        with torch.inference_mode():
            x = self.preprocess(torch.as_tensor(maps, dtype=torch.float32, device=device))
            return net(x.contiguous(memory_format=torch.channels_last)).to(device)

    # -- NRE engine interface ------------------------------------------------------------
    def preprocess(self, data: torch.Tensor) -> torch.Tensor:
        """Network input ``(n, 1, H, W)`` from data ``(n, H, W)`` (flux units).

        Parameters
        ----------
        data : `torch.Tensor`
            Maps ``(n, H, W)``.

        Returns
        -------
        `torch.Tensor`
            ``log1p(exposure * max(data, 0))`` with a channel axis.
        """
        return torch.log1p(data.clamp_min(0) * self.exposure).unsqueeze(1)

    def _runtime_logits(self, maps, channel, backend):
        """`_inference_logits` through the ONNX runtime ``backend``, numpy in and out (float32
        ``(n, 1 or n_channels, H, W)``); the exported network is kept until the weights, the
        channel, torch's number of threads or the backend change."""
        m = self.space_to_depth * 2**self.depth
        keep = None if channel is None else [channel]
        net = self._cached(
            "_onnx_net", (self._weights_key(), channel, torch.get_num_threads(), backend),
            lambda: OnnxNetwork(inference_copy(self.net, keep, split_merges=backend == "openvino"),
                                (torch.zeros(1, 1, 2 * m, 2 * m),), multiple=m, runtime=backend))
        return net.run(self._runtime_input(maps))

    def _runtime_input(self, maps):
        """`preprocess` in numpy (float32 ``(n, 1, H, W)``), for the ONNX runtimes.

        Not torch: its log1p opens a parallel region whose OpenMP threads then spin and take the
        cores from the runtime's (0.85 ms per 128 x 128 map interleaved in one process, 0.1-0.4
        ms across processes). numpy's float32 log1p differs from torch's by one unit in the last
        place in ~1.5 % of the pixels: the log-odds then differ from torch's by at most 2.8e-5
        (2.1e-5 with a float64 log1p, at twice the cost), and the labels of 200 paper maps were
        the same.
        """
        x = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        x = x.astype(np.float32, copy=False)
        return np.log1p(np.maximum(x, 0) * np.float32(self.exposure))[:, None]

    def forward(self, batch) -> torch.Tensor:
        """Per-pixel log r1 ``(n, n_thresholds, H, W)`` of a dict with ``"x"``, or of a tensor."""
        x = batch["x"] if isinstance(batch, dict) else batch
        return self.net(self.preprocess(x))

    def loss(self, batch) -> torch.Tensor:
        """Per-pixel binary cross-entropy against ``batch["labels"]`` (the NRE classifier loss)."""
        logits = self(batch)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])

    # -- inference -------------------------------------------------------------------------
    def channel(self, flux_threshold=None) -> int:
        """Index of the output channel of ``flux_threshold`` (the default channel when `None`).

        Parameters
        ----------
        flux_threshold : float, optional
            One of `flux_thresholds` (to 0.1 %).

        Returns
        -------
        int

        Raises
        ------
        ValueError
            ``flux_threshold`` is not one of `flux_thresholds` (to 0.1 %).
        """
        f = self.default_flux_threshold if flux_threshold is None else float(flux_threshold)
        if not (math.isfinite(f) and f > 0):
            msg = f"flux_threshold must be positive and finite, got {flux_threshold}"
            raise ValueError(msg)
        k = int(np.argmin(np.abs(np.log(self.flux_thresholds) - math.log(f))))
        if not math.isclose(self.flux_thresholds[k], f, rel_tol=1e-3):
            msg = (f"flux_threshold {f} is not one of the detector's thresholds "
                   f"{[round(t, 4) for t in self.flux_thresholds]}")
            raise ValueError(msg)
        return k

    _channel = channel  # the name used before 0.2

    def log_odds(self, data, mask=None, *, flux_threshold=None, tile_overlap=32, batch_size=16,
                 backend="torch"):
        """Per-pixel log r1 of one map (2-D) for one flux threshold, as a numpy array.

        Parameters
        ----------
        data : 2-D array or `torch.Tensor`
            The map, in the detector's flux unit.
        mask : 2-D bool array, optional
            Bad pixels; NaN and infinite pixels are bad too.
        flux_threshold : float, optional
            The F_th channel (default channel when `None`).
        tile_overlap : int
            Overlap of the tiles on maps larger than 4 times the training shape (the fewest
            evenly sized tiles of at most that shape).
        batch_size : int
            Tiles per network call, at most (and at most about half a megapixel per call).
        backend : {'torch', 'openvino', 'onnxruntime', 'auto'}
            Where the network runs: torch (the reference), OpenVINO or ONNX Runtime, faster on
            CPUs (``pip install "astrotrunc[openvino]"`` or ``"astrotrunc[onnx]"``); the same
            logits to float32 rounding. ``'auto'``: the first of OpenVINO and ONNX Runtime
            installed when the detector is on the CPU, else torch.

        Returns
        -------
        `numpy.ndarray`
            Float64 log-odds; ``-inf`` at bad pixels (filled at the network's input with the
            mean of their valid neighbours, see `fill_bad_pixels`).
        """
        backend = check_backend(backend, self.psf_stamp.device)
        data, bad, _ = validate_map(data, mask)
        bad |= ~np.isfinite(data)
        k = self.channel(flux_threshold)
        filled = fill_bad_pixels(data, bad) if bad.any() else data
        tile = _tile_shape(filled.shape, self.shape, tile_overlap,
                           self.space_to_depth * 2**self.depth)
        if backend != "torch" and tile == filled.shape:  # one tile: numpy in and out, no tensors
            # (find_sources 0.3-0.4 ms faster per 128 x 128 map than through `tiled`, paired)
            logits = self._runtime_logits(filled[None], k, backend)[0, 0].astype(np.float64)
        else:
            x = torch.as_tensor(filled, dtype=torch.float32, device=self.psf_stamp.device)
            # at most ~0.5 Mpixel per network call: memory stays bounded on large maps
            per_call = max(1, min(batch_size, _PIXELS_PER_CALL // (tile[0] * tile[1])))
            logits = tiled(lambda t: self._inference_logits(t, k, backend)[:, 0], x, tile,
                           tile_overlap, per_call).cpu().numpy().astype(np.float64)
        logits[bad] = -np.inf
        return logits

    def predict(self, data, mask=None, *, flux_threshold=None, **kwargs):
        """Per-pixel odds r1 of a source brighter than ``flux_threshold`` (2-D numpy array).

        Parameters are those of `log_odds`.

        Returns
        -------
        `numpy.ndarray`
            Odds (0 at bad pixels).
        """
        with np.errstate(over="ignore"):
            return np.exp(self.log_odds(data, mask, flux_threshold=flux_threshold, **kwargs))

    def estimate_flux(self, data, x, y, mask=None):
        """PSF-weighted least-squares flux (and its Poisson error) of sources at pixels (x, y).

        Parameters
        ----------
        data : 2-D array
            The map (detector flux units).
        x, y : arrays
            Source positions (pixels, 0-based).
        mask : 2-D bool array, optional
            Bad pixels (not used in the fit).

        Returns
        -------
        flux, flux_err : arrays
        """
        r_y, r_x = self.psf_stamp.shape[0] // 2, self.psf_stamp.shape[1] // 2
        stamp = self.psf_stamp.cpu().double().numpy().ravel()
        stamp2 = stamp**2
        padded = padded_map(data, mask, (r_y, r_x), self.background, np.float64)
        ny, nx = np.shape(data)
        ix, iy = nearest_pixel(x, nx), nearest_pixel(y, ny)
        flux, var = np.empty(len(ix)), np.empty(len(ix))
        for i in range(0, len(ix), _STAMPS_PER_CHUNK):  # a few MB at a time on large maps
            chunk = slice(i, i + _STAMPS_PER_CHUNK)
            cut, weight = (a.reshape(a.shape[0], -1)  # (n, stamp pixels)
                           for a in take_stamps(padded, ix[chunk], iy[chunk], (r_y, r_x)))
            # the sums over the stamp as products with it; `cut` is 0 where `weight` is
            norm = self.normalization * (weight @ stamp2)
            with np.errstate(invalid="ignore", divide="ignore"):
                flux[chunk] = (cut @ stamp) / norm
                var[chunk] = (np.maximum(cut + self.background, 0) * weight) @ stamp2 \
                    / self.exposure / norm**2
        return flux, np.sqrt(var)

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def load_default(cls) -> "SourceDetector":
        """The detector shipped with astrotrunc, trained on `PointSourceModel.paper`.

        Returns
        -------
        `SourceDetector`
        """
        return cls.load_shipped(_DEFAULT_DETECTOR)


#: Detections whose PSF stamps `SourceDetector.estimate_flux` gathers at once (a few MB).
_STAMPS_PER_CHUNK = 2048


@functools.lru_cache(maxsize=1)
def default_detector() -> SourceDetector:
    """The shipped default detector (loaded once per process).

    Returns
    -------
    `SourceDetector`
    """
    return SourceDetector.load_default()


_PIXELS_PER_CALL = 2**19


def _tile_shape(shape, train_shape, overlap, multiple):
    """Tiles of at most 4x the training shape that cover a map evenly (the U-Net is fully
    convolutional: the fewest, evenly sized tiles cut the overlap overhead; sides are rounded up
    to a multiple of the network's ``2**depth`` so that it pads nothing)."""
    tile = []
    for n, t in zip(shape, train_shape):
        largest = max(4 * t, overlap + 1)
        if n <= largest:
            tile.append(n)
            continue
        count = -(-(n - overlap) // (largest - overlap))
        side = -(-(n - overlap) // count) + overlap
        tile.append(min(n, -(-side // multiple) * multiple))
    return tuple(tile)


def fill_bad_pixels(data, bad):
    """The map with each bad pixel replaced by the mean of its valid 3×3 neighbours (0 if none).

    An isolated bad pixel then leaves no hole for the network to see: the sources around it keep
    their shape. Interiors of large masked areas are 0.
    """
    out = np.where(bad, 0.0, data)
    if bad.any():
        from scipy import ndimage

        weight = ndimage.uniform_filter((~bad).astype(np.float64), 3, mode="constant")
        total = ndimage.uniform_filter(out, 3, mode="constant")
        local = np.divide(total, weight, out=np.zeros_like(total), where=weight > 1e-9)
        out = np.where(bad, local, out)
    return out


def _stored(model, store, flux_thresholds, n, chunk_size, seed, client, trainer_kwargs,
            teacher=None):
    """The store-backed batch source; in a torchrun group only rank 0 fills, the others wait."""
    from ..nre._ddp import env_rank, launched

    if launched() and env_rank() != 0:
        return StoredDetectionSimulations.wait(getattr(store, "path", store), n,
                                               flux_thresholds,
                                               trainer_kwargs.get("timeout", 1800.0), teacher)
    return StoredDetectionSimulations.fill(model, store, n, flux_thresholds,
                                           chunk_size=chunk_size, seed=seed, client=client,
                                           progress=trainer_kwargs.get("progress", True),
                                           teacher=teacher)


def _domain(model, n_maps):
    dom = instrument_domain(model, n_maps=max(int(n_maps), 1))
    if not n_maps:
        dom.pop("statistics")
    return dom


def _instrument_config(model) -> dict:
    inst = model.instrument
    if np.ndim(inst.exposure) or np.ndim(inst.background):
        warnings.warn("exposure/background maps are summarised by their mean in the detector's "
                      "input scaling and flux estimate", AstrotruncWarning, stacklevel=3)
    return dict(shape=list(model.shape), exposure=float(np.mean(inst.exposure)),
                psf_stamp=_psf_stamp(model).tolist(), normalization=inst.normalization,
                background=float(np.mean(inst.background)),
                flux_unit=model.flux_unit.to_string())


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


def _initial_weights(det, init):
    """Copy the network weights of ``init`` (a detector or its file) into ``det``; its identity.

    A wider or deeper ``init`` gives the weights of its strongest channels and of its levels
    down to ``det``'s depth (`~astrotrunc.detection.unet.narrowed_weights`).
    """
    init = _as_detector(init)
    differ = [f"space_to_depth {init.space_to_depth} (asked for: {det.space_to_depth})"] \
        if init.space_to_depth != det.space_to_depth else []
    if init.depth < det.depth:
        differ.append(f"depth {init.depth}, shallower than the {det.depth} asked for")
    if not _same_thresholds(det.flux_thresholds, init.flux_thresholds):
        differ.append(f"flux_thresholds {list(init.flux_thresholds)} (asked for: "
                      f"{list(det.flux_thresholds)})")
    if not differ and any(n > w for n, w in zip(det.net.widths, init.net.widths)):
        differ.append(f"widths {init.net.widths}, narrower than those asked for "
                      f"({det.net.widths})")
    if differ:
        msg = ("init must have the space_to_depth and flux thresholds asked for, and no "
               f"narrower level nor smaller depth; it has {'; '.join(differ)}")
        raise ValueError(msg)
    if det.net.widths == init.net.widths:  # the same depth too
        det.net.load_state_dict(init.net.state_dict())
    else:
        det.net.load_state_dict(narrowed_weights(init.net, det.net))
    return init.identity


def _teacher_for(teacher, det, device):
    """A copy of ``teacher`` (a detector, file or ``"default"``) on ``device``, and its identity.

    Warns when it was trained for another instrument than ``det``'s: its odds would not be
    those of the maps it labels.
    """
    teacher = _as_detector(teacher)
    mine, theirs = det.config, teacher.config
    differ = [k for k in ("shape", "exposure", "psf_stamp", "normalization", "background",
                          "flux_unit") if not _same_setting(mine.get(k), theirs.get(k))]
    if differ:
        warnings.warn(f"the teacher {teacher.name!r} was trained for another instrument (its "
                      f"{', '.join(differ)} differ): its odds are not those of these maps",
                      OutOfDomainWarning, stacklevel=3)
    return copy.deepcopy(teacher).to(device or "cpu").eval(), teacher.identity


def _same_setting(a, b):
    """Two configuration values equal (numbers and arrays of them to float32 rounding)."""
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=0.0)


def _as_detector(det):
    """A `SourceDetector` from a detector, a file or ``"default"`` (the shipped one)."""
    if isinstance(det, SourceDetector):
        return det
    return SourceDetector.load_default() if det == "default" else SourceDetector.load(det)
