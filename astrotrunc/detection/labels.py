"""r1 training data: per-pixel labels and the batch source of fresh simulations."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch

from .._utils import available_device, nearest_pixel

__all__ = ["detection_labels", "teacher_labels", "DetectionSimulations",
           "StoredDetectionSimulations"]

_STORED = ("maps", "flux", "x", "y", "in_map")


def detection_labels(sims, flux_thresholds) -> torch.Tensor:
    """Per-pixel detection labels ``(n, n_thresholds, H, W)`` of a `~astrotrunc.SimulationBatch`.

    Parameters
    ----------
    sims : `~astrotrunc.SimulationBatch`
        Simulated maps and their true sources.
    flux_thresholds : sequence of float
        The F_th of each label channel.

    Returns
    -------
    `torch.Tensor`
        Channel k of pixel p is 1 when p holds the centre (nearest pixel) of a source with
        ``F > flux_thresholds[k]``, 0 otherwise.
    """
    n, ny, nx = sims.maps.shape
    thr = torch.as_tensor(flux_thresholds, dtype=sims.flux.dtype, device=sims.flux.device)
    ix, iy = nearest_pixel(sims.x, nx), nearest_pixel(sims.y, ny)
    bright = sims.in_map[:, None, :] & (sims.flux[:, None, :] > thr[None, :, None])  # (n, k, s)
    labels = torch.zeros(n, len(thr), ny * nx, device=sims.maps.device)
    index = (iy * nx + ix)[:, None, :].expand_as(bright)
    labels.scatter_reduce_(2, index, bright.float(), reduce="amax")
    return labels.view(n, len(thr), ny, nx)


def teacher_labels(teacher, maps) -> torch.Tensor:
    """Soft per-pixel labels ``(n, n_thresholds, H, W)``: a trained detector's probabilities.

    Distillation (Hinton et al. 2015): a smaller detector trained on these labels, instead of
    the true source centres of `detection_labels`, learns the teacher's posterior odds of every
    pixel, which carry more information per map than the 0/1 truth (the teacher has averaged
    over many maps like it). The loss stays the binary cross-entropy, whose minimum is then at
    the teacher's odds.

    Parameters
    ----------
    teacher : `~astrotrunc.SourceDetector`
        The trained detector (evaluation mode, on any device).
    maps : `torch.Tensor`
        Maps ``(n, H, W)``.

    Returns
    -------
    `torch.Tensor`
        Probabilities in ``[0, 1]``, one channel per F_th of the teacher, on ``maps``' device.
    """
    return torch.sigmoid(teacher._inference_logits(maps)).to(maps.device)


def _same_thresholds(a, b):
    """Flux thresholds equal to float rounding (a file's JSON may hold them to fewer digits)."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b))


def _check_teacher(teacher, flux_thresholds):
    """``teacher`` when its F_th channels are ``flux_thresholds`` (to float rounding)."""
    if teacher is not None and not _same_thresholds(teacher.flux_thresholds, flux_thresholds):
        msg = (f"the teacher's flux thresholds {list(teacher.flux_thresholds)} are not the "
               f"labels' {list(flux_thresholds)}: a teacher labels the same F_th channels")
        raise ValueError(msg)
    return teacher


class DetectionSimulations:
    """r1 training data as a batch source of `~astrotrunc.nre.Trainer.fit`.

    Fresh simulations every epoch, made batch by batch: the simulator is far faster than the
    network, so every epoch sees new maps (no overfitting) and nothing is held in memory. The
    validation maps are the same every epoch.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The simulator.
    flux_thresholds : sequence of float
        F_th of the label channels (those of the detector to train).
    n_train, n_val : int
        Training maps per epoch and validation maps.
    seed : int
        Seed of the simulations (epoch ``e`` uses the stream ``(seed, 1, e)``).
    device : str or `torch.device`, optional
        Where the maps are simulated and labelled (``"cuda"``: on the GPU that trains, so that
        the simulations keep up with it; the same statistics, other random numbers). `None`:
        the CPU.
    teacher : `~astrotrunc.SourceDetector`, optional
        Distillation: label each map with this trained detector's per-pixel probabilities
        (`teacher_labels`) instead of its true sources. Its flux thresholds must be
        ``flux_thresholds``.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, SourceDetector, Trainer
    >>> from astrotrunc.detection import DetectionSimulations
    >>> model = PointSourceModel.paper()
    >>> det = SourceDetector.from_model(model, [10.0], base_channels=4, depth=1)
    >>> data = DetectionSimulations(model, det.flux_thresholds, n_train=8, n_val=4)
    >>> history = Trainer(max_epochs=1, batch_size=4, progress=False, seed=0).fit(det, data)
    >>> len(history), det.training
    (1, False)
    """

    def __init__(self, model, flux_thresholds, n_train=20000, n_val=1000, seed=0, device=None,
                 teacher=None):
        if int(n_train) < 1 or int(n_val) < 1:
            msg = f"n_train and n_val must be at least 1, got {n_train}, {n_val}"
            raise ValueError(msg)
        self.model, self.flux_thresholds = model, tuple(float(f) for f in flux_thresholds)
        self.n_train, self.n_val, self.seed = int(n_train), int(n_val), int(seed)
        self.device = None if device is None else available_device(device)
        self.teacher = _check_teacher(teacher, self.flux_thresholds)

    def __repr__(self):
        where = "" if self.device is None else f", device='{self.device}'"
        if self.teacher is not None:
            where += f", teacher='{self.teacher.name}'"
        return (f"DetectionSimulations(n_train={self.n_train}, n_val={self.n_val}, "
                f"flux_thresholds={self.flux_thresholds}, seed={self.seed}{where})")

    def _batches(self, n, seed, batch_size, chunks=None):
        for sims in self.model.iter_simulate(n, seed=seed, chunk_size=batch_size, chunks=chunks,
                                             device=self.device):
            yield {"x": sims.maps, "labels": _labels(sims, self.flux_thresholds, self.teacher)}

    def _chunks(self, n, batch_size, rank, world_size, pad):
        """The batches (chunks of the simulation stream) of ``rank``: dealt out in turn."""
        from ..nre._ddp import shard_indices

        if world_size == 1:
            return None
        return shard_indices(torch.arange(-(-n // batch_size)), rank, world_size, pad).tolist()

    def train_batches(self, batch_size, epoch, rank=0, world_size=1):
        """Batches ``{"x": maps, "labels": labels}`` of epoch ``epoch``.

        With ``world_size`` processes, ``rank`` simulates batches ``rank``, ``rank +
        world_size``, ... of the single-process stream (the last round wraps around, so that
        every rank takes as many steps).
        """
        return self._batches(self.n_train, (self.seed, 1, epoch), batch_size,
                             self._chunks(self.n_train, batch_size, rank, world_size, True))

    def val_batches(self, batch_size, rank=0, world_size=1):
        """The validation batches (the same maps every epoch; ``rank``'s share)."""
        return self._batches(self.n_val, (self.seed, 0), batch_size,
                             self._chunks(self.n_val, batch_size, rank, world_size, False))

    def n_batches(self, batch_size, rank=0, world_size=1):
        """Training batches per epoch (of ``rank``)."""
        chunks = self._chunks(self.n_train, batch_size, rank, world_size, True)
        return -(-self.n_train // batch_size) if chunks is None else len(chunks)

    def shard(self, rank, world_size):
        """Process ``rank``'s share of ``world_size`` as a batch source (data-parallel training).
        """
        from ..nre._ddp import RankView

        return RankView(self, rank, world_size)


class StoredDetectionSimulations:
    """r1 training data streamed from a `~astrotrunc.store.SimulationStore` (survey scale).

    The store holds rows of `~astrotrunc.PointSourceModel.simulate_arrays` (maps and padded true
    sources), simulated once and in parallel by a Dask cluster (`fill`); the trainer streams
    them chunk by chunk, each process of a data-parallel run reading its own chunks, and the
    labels are made batch by batch. Unlike `DetectionSimulations`, every epoch sees the same
    maps; validation holds out whole chunks (the trainer's ``val_fraction``).

    Parameters
    ----------
    store : `~astrotrunc.store.SimulationStore`
        Rows with at least ``maps, flux, x, y, in_map``.
    flux_thresholds : sequence of float
        F_th of the label channels (those of the detector to train).
    teacher : `~astrotrunc.SourceDetector`, optional
        Distillation, as in `DetectionSimulations`.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, SourceDetector, Trainer
    >>> from astrotrunc.detection import StoredDetectionSimulations
    >>> model = PointSourceModel.paper()
    >>> det = SourceDetector.from_model(model, [10.0], base_channels=4, depth=1)
    >>> data = StoredDetectionSimulations.fill(model, None, 12, det.flux_thresholds,
    ...                                        chunk_size=4, client="sync", progress=False)
    >>> history = Trainer(max_epochs=1, batch_size=4, progress=False, seed=0).fit(det, data)
    >>> len(data.store), len(history)
    (12, 1)
    """

    def __init__(self, store, flux_thresholds, teacher=None):
        missing = set(_STORED) - set(store.keys())
        if missing:
            msg = (f"the simulation store lacks {sorted(missing)}: fill it with "
                   "PointSourceModel.simulate_arrays (StoredDetectionSimulations.fill)")
            raise ValueError(msg)
        self.store, self.flux_thresholds = store, tuple(float(f) for f in flux_thresholds)
        self.teacher = _check_teacher(teacher, self.flux_thresholds)

    def __repr__(self):
        return (f"StoredDetectionSimulations({len(self.store)} maps, "
                f"flux_thresholds={self.flux_thresholds})")

    @classmethod
    def fill(cls, model, store, n, flux_thresholds, *, chunk_size=64, seed=0, client=None,
             progress=True, teacher=None):
        """Simulate ``n`` maps of ``model`` into ``store`` (only the missing chunks) and wrap it.

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The simulator.
        store : `~astrotrunc.store.SimulationStore`, path or None
            The store (a directory is opened or created; `None`: in memory).
        n : int
            Maps wanted.
        flux_thresholds : sequence of float
            F_th of the label channels.
        chunk_size : int
            Maps per chunk (per Dask task, and the unit of the validation split).
        seed : int
            Seed of the fill.
        client : `distributed.Client`, str or None
            Where to simulate (see `~astrotrunc.store.SimulationStore.fill`).
        progress : bool
            Progress bar.
        teacher : `~astrotrunc.SourceDetector`, optional
            Distillation (see the class).

        Returns
        -------
        `StoredDetectionSimulations`
        """
        from ..store import SimulationStore

        if not isinstance(store, SimulationStore):
            store = SimulationStore(store)
        store.fill(model.simulate_arrays, n, chunk_size=chunk_size, seed=seed, client=client,
                   progress=progress)
        return cls(store, flux_thresholds, teacher)

    @classmethod
    def wait(cls, path, n, flux_thresholds, timeout=1800.0, teacher=None):
        """The store at ``path`` once it holds ``n`` complete rows (another process fills it).

        Raises
        ------
        TimeoutError
            Not filled within ``timeout`` seconds.
        """
        from ..store import SimulationStore

        deadline = time.monotonic() + float(timeout)
        while True:
            try:
                store = SimulationStore(path, mode="r")
                if store.capacity >= n and len(store.complete_chunks) == store.n_chunks \
                        and set(_STORED) <= set(store.keys()):
                    return cls(store, flux_thresholds, teacher)
            except OSError:
                pass  # not created yet
            if time.monotonic() > deadline:
                msg = f"the simulation store {path} was not filled with {n} maps in {timeout} s"
                raise TimeoutError(msg)
            time.sleep(1.0)

    def batch_source(self, val_fraction=0.1, generator=None):
        """The trainer's view (chunk-level validation split; see `Trainer`)."""
        inner = self.store.batch_source(val_fraction, generator, keys=list(_STORED))
        return _LabelledSource(inner, self.flux_thresholds, self.teacher)


def _labels(sims, flux_thresholds, teacher):
    """The labels of a batch: the true sources', or the teacher's probabilities."""
    if teacher is None:
        return detection_labels(sims, flux_thresholds)
    return teacher_labels(teacher, sims.maps)


class _LabelledSource:
    """Store batches of maps and true sources turned into ``{"x": maps, "labels": labels}``."""

    checked = False

    def __init__(self, inner, flux_thresholds, teacher=None):
        self.inner, self.flux_thresholds, self.teacher = inner, flux_thresholds, teacher

    def _label(self, batches):
        for b in batches:
            sims = SimpleNamespace(maps=b["maps"], flux=b["flux"], x=b["x"], y=b["y"],
                                   in_map=b["in_map"].bool())
            yield {"x": b["maps"], "labels": _labels(sims, self.flux_thresholds, self.teacher)}

    def train_batches(self, batch_size, epoch):
        return self._label(self.inner.train_batches(batch_size, epoch))

    def val_batches(self, batch_size):
        return self._label(self.inner.val_batches(batch_size))

    def n_batches(self, batch_size):
        return self.inner.n_batches(batch_size)

    def shard(self, rank, world_size):
        from ..nre._ddp import shard

        return _LabelledSource(shard(self.inner, rank, world_size), self.flux_thresholds,
                               self.teacher)
