"""One trainer for every ratio estimator: AdamW, schedule, validation, early stopping, checkpoints.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from astropy import units as u
from astropy.table import QTable
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._utils import spawn_seed
from ..exceptions import AstrotruncWarning
from . import _ddp
from .estimator import _atomic

__all__ = ["Trainer"]

_CKPT = "checkpoint.safetensors"
_CKPT_SUMMARY = "checkpoint.json"
_HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "learning_rate", "time")


# ----------------------------------------------------------------------------------------------
# Batch sources: what `Trainer.fit` iterates over
# ----------------------------------------------------------------------------------------------
class _TensorSource:
    """Batches from a dict of equal-length tensors (random validation split, shuffled batches)."""

    checked = True  # validated once here, not batch by batch

    def __init__(self, data, val_fraction, generator):
        if not data:
            raise ValueError("the training data are empty (no arrays given)")
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
                   for k, v in data.items()}
        lengths = {k: (len(v) if v.ndim else 0) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all arrays must have the same length (batch size), got {lengths}")
        n = next(iter(lengths.values()))
        if n < 2:
            raise ValueError(f"need at least 2 samples to train, got {n}")
        for k, v in tensors.items():
            _check_finite(k, v)
        perm = torch.randperm(n, generator=generator)
        n_val = max(1, int(round(val_fraction * n)))
        self.tensors, self.val_idx, self.train_idx = tensors, perm[:n_val], perm[n_val:]
        self.generator = generator

    def _take(self, idx, batch_size):
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield {k: v[j] for k, v in self.tensors.items()}

    def train_batches(self, batch_size, epoch, rank=0, world_size=1):
        perm = self.train_idx[torch.randperm(len(self.train_idx), generator=self.generator)]
        return self._take(_ddp.shard_indices(perm, rank, world_size), batch_size)

    def val_batches(self, batch_size, rank=0, world_size=1):
        return self._take(_ddp.shard_indices(self.val_idx, rank, world_size, pad=False),
                          batch_size)

    def n_batches(self, batch_size, rank=0, world_size=1):
        return -(-len(_ddp.shard_indices(self.train_idx, rank, world_size)) // batch_size)

    def shard(self, rank, world_size):
        return _ddp.RankView(self, rank, world_size)


class _DatasetSource:
    """Batches from a map-style `torch.utils.data.Dataset` whose items are dicts of arrays."""

    checked = False

    def __init__(self, dataset, val_fraction, generator):
        n = len(dataset)
        if n < 2:
            raise ValueError(f"need at least 2 samples to train, got {n}")
        perm = torch.randperm(n, generator=generator).tolist()
        n_val = max(1, int(round(val_fraction * n)))
        self.dataset, self.val_idx, self.train_idx = dataset, perm[:n_val], perm[n_val:]
        self.generator = generator

    def _loader(self, idx, batch_size, shuffle):
        from torch.utils.data import DataLoader, Subset

        return DataLoader(Subset(self.dataset, idx), batch_size=batch_size, shuffle=shuffle,
                          generator=self.generator if shuffle else None)

    def train_batches(self, batch_size, epoch, rank=0, world_size=1):
        if world_size == 1:
            return iter(self._loader(self.train_idx, batch_size, True))
        perm = torch.as_tensor(self.train_idx)[
            torch.randperm(len(self.train_idx), generator=self.generator)]
        mine = _ddp.shard_indices(perm, rank, world_size).tolist()
        return iter(self._loader(mine, batch_size, False))

    def val_batches(self, batch_size, rank=0, world_size=1):
        mine = _ddp.shard_indices(self.val_idx, rank, world_size, pad=False).tolist()
        return iter(self._loader(mine, batch_size, False))

    def n_batches(self, batch_size, rank=0, world_size=1):
        return -(-len(_ddp.shard_indices(self.train_idx, rank, world_size)) // batch_size)

    def shard(self, rank, world_size):
        return _ddp.RankView(self, rank, world_size)


def _as_source(data, val_fraction, generator):
    if hasattr(data, "train_batches") and hasattr(data, "val_batches"):
        return data
    if hasattr(data, "batch_source"):  # a SimulationStore
        return data.batch_source(val_fraction=val_fraction, generator=generator)
    if isinstance(data, dict):
        return _TensorSource(data, val_fraction, generator)
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError("an IterableDataset cannot be split for validation: give a map-style "
                        "Dataset, a SimulationStore, or an object with train_batches/val_batches")
    if isinstance(data, torch.utils.data.Dataset):
        return _DatasetSource(data, val_fraction, generator)
    raise TypeError(f"cannot train on a {type(data).__name__}: give a dict of arrays, a "
                    "torch Dataset of dicts, a SimulationStore or a batch source")


def _check_finite(key, value):
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"array {key!r} holds NaN or infinite values")


def _check_batch(batch):
    """Validation of a streamed batch (dict arrays are checked once up front instead)."""
    if not isinstance(batch, dict) or not batch:
        raise TypeError(f"batches must be non-empty dicts of tensors, got {type(batch).__name__}")
    sizes = {k: len(v) for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"all arrays of a batch must have the same length (batch size), got {sizes}"
        )
    for k, v in batch.items():
        _check_finite(k, v)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Train any `~astrotrunc.nre.RatioEstimator` by minimising its ``loss(batch)``.

    Parameters
    ----------
    max_epochs : int
        Maximum number of epochs.
    batch_size : int
        Minibatch size.
    learning_rate, weight_decay : float
        AdamW settings.
    val_fraction : float
        Fraction of the data held out for validation (chunks of a store; samples otherwise).
    patience : int
        Early stopping: stop after this many epochs without a better validation loss; the best
        weights are restored at the end.
    scheduler : {'cosine', 'plateau', None}
        Learning-rate schedule: cosine annealing per step (to 2 % of the initial rate), or
        halving when the validation loss plateaus.
    device : str or `torch.device`, optional
        ``"cpu"``, ``"cuda"``...; CUDA when available by default.
    checkpoint_dir : str or path-like, optional
        A checkpoint (model, best model, optimiser, scheduler, RNG states, history) is written
        there atomically after every epoch, as one safetensors file with JSON metadata (plus a
        human-readable ``checkpoint.json`` summary): ``fit(..., resume=True)`` continues from it.
        A fresh ``fit`` (``resume=False``) starts over and replaces it.
    progress : bool
        tqdm progress bars (only when stderr is a terminal).
    seed : int, optional
        Seeds the validation split, batch order and the torch RNG used during training (dropout);
        CPU runs are then reproducible. The global RNG state is left untouched.
    grad_clip : float, optional
        Clip the gradient norm to this value.
    nproc : int
        Data-parallel processes on this machine (`torch.nn.parallel.DistributedDataParallel`;
        gloo on CPUs, nccl on GPUs, one GPU per process). ``fit`` starts them itself unless
        this process was launched as one rank of a group by ``torchrun`` (``RANK`` and
        ``WORLD_SIZE`` in the environment) or a process group is initialised already: it then
        trains as that rank, whatever ``nproc``. ``batch_size`` is per process.
    backend : {'gloo', 'nccl'}, optional
        ``torch.distributed`` backend (gloo on CPU, nccl on CUDA by default).
    timeout : float
        Seconds a process waits for the others (a rank that died or hangs) before failing.

    Notes
    -----
    ``data`` given to `fit` is a dict of equal-length arrays/tensors; a map-style
    `torch.utils.data.Dataset` whose items are dicts; a `~astrotrunc.store.SimulationStore`
    (streamed chunk by chunk); or a *batch source*: an object with
    ``train_batches(batch_size, epoch)`` and ``val_batches(batch_size)`` returning iterables of
    dict batches (and optionally ``n_batches(batch_size)``), e.g. an on-the-fly simulator.

    With several processes each rank trains on a disjoint shard of the data: a source's own
    ``shard(rank, world_size)`` method (that of arrays, datasets, stores, `DetectionSimulations`
    and `CompletenessLabels`) or, failing that, every ``world_size``-th batch. Gradients are
    averaged over the ranks, the validation loss is summed over them, and only rank 0 writes
    the checkpoint; every rank resumes from it. The history's ``meta["trainer"]`` records the
    settings, ``world_size`` included (a saved estimator keeps them in its file).

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import MarginalRatioEstimator, Trainer
    >>> theta = torch.rand(512, 2)
    >>> data = {"theta": theta, "x": theta + 0.1 * torch.randn(512, 2)}
    >>> est = MarginalRatioEstimator(x_shape=2, params=["a", "b"], hidden=16)
    >>> history = Trainer(max_epochs=2, batch_size=64, progress=False, seed=0).fit(est, data)
    >>> history.colnames
    ['epoch', 'train_loss', 'val_loss', 'learning_rate', 'time']
    """

    def __init__(self, max_epochs=50, batch_size=128, learning_rate=1e-3, weight_decay=1e-4,
                 val_fraction=0.1, patience=5, scheduler="cosine", device=None,
                 checkpoint_dir=None, progress=True, seed=None, grad_clip=None, nproc=1,
                 backend=None, timeout=1800.0):
        if scheduler not in ("cosine", "plateau", None):
            raise ValueError(f"scheduler must be 'cosine', 'plateau' or None, got {scheduler!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if int(max_epochs) < 1 or int(batch_size) < 1:
            raise ValueError(
                f"max_epochs and batch_size must be positive, got {max_epochs}, {batch_size}"
            )
        self.max_epochs, self.batch_size = int(max_epochs), int(batch_size)
        self.learning_rate, self.weight_decay = float(learning_rate), float(weight_decay)
        self.val_fraction, self.patience, self.scheduler = (
            float(val_fraction),
            int(patience),
            scheduler,
        )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_dir = Path(checkpoint_dir).expanduser() if checkpoint_dir else None
        self.progress, self.seed = progress, seed
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        if backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo', 'nccl' or None, got {backend!r}")
        if not float(timeout) > 0:
            raise ValueError(f"timeout must be positive (seconds), got {timeout}")
        self.nproc = _ddp.check_nproc(nproc, self.device)
        self.backend, self.timeout = backend, float(timeout)

    def settings(self, world_size=1, backend=None) -> dict:
        """The trainer's settings as a JSON-serialisable dict (recorded in what it trains)."""
        return dict(max_epochs=self.max_epochs, batch_size=self.batch_size,
                    learning_rate=self.learning_rate, weight_decay=self.weight_decay,
                    val_fraction=self.val_fraction, patience=self.patience,
                    scheduler=self.scheduler, seed=self.seed, grad_clip=self.grad_clip,
                    world_size=int(world_size), backend=backend or self.backend)

    def fit(self, estimator, data, resume=False):
        """Train ``estimator`` on ``data``.

        Parameters
        ----------
        estimator : `~astrotrunc.nre.RatioEstimator`
            Any module with ``loss(batch)``.
        data : dict, `torch.utils.data.Dataset`, `~astrotrunc.store.SimulationStore` or batch source
            The training data (see the class notes).
        resume : bool
            Continue from the checkpoint in ``checkpoint_dir`` if there is one.

        Returns
        -------
        history : `~astropy.table.QTable`
            One row per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``learning_rate``,
            ``time`` (s). The estimator holds the best weights (lowest validation loss), in
            evaluation mode.
        """
        if self.nproc > 1 and not _ddp.launched():
            rows, settings = _ddp.spawn_fit(self, estimator, data, resume, self.nproc)
            estimator.eval()
            return _history(rows, settings)
        if self.nproc > 1 and self.nproc != _ddp.local_world_size():
            warnings.warn(f"nproc={self.nproc} is ignored: this process is one rank of a group "
                          f"launched with {_ddp.local_world_size()} process(es) on this machine",
                          AstrotruncWarning, stacklevel=2)
        group = _ddp.Group(self.device, self.backend, self.timeout)
        try:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
            if resume and self.checkpoint_dir is not None \
                    and (self.checkpoint_dir / _CKPT).exists():
                seed = self._read_meta().get("seed", seed)  # the same validation split as before
            seed = group.broadcast_int(seed)  # every rank splits and shuffles alike
            gen = torch.Generator().manual_seed(seed)
            source = _ddp.shard(_as_source(data, self.val_fraction, gen), group.rank,
                                group.world_size)
            devices = [group.device.index or 0] if group.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                if self.seed is not None:
                    torch.manual_seed(spawn_seed(self.seed, group.rank) if group.rank
                                      else self.seed)
                return self._fit(estimator, source, gen, resume, seed, group)
        finally:
            group.close()

    def _fit(self, estimator, source, gen, resume, seed, group):
        device = group.device
        estimator.to(device)
        opt = torch.optim.AdamW(estimator.parameters(), lr=self.learning_rate,
                                weight_decay=self.weight_decay)
        n_batches = source.n_batches(self.batch_size) if hasattr(source, "n_batches") else None
        if self.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, max(self.max_epochs * (n_batches or 1000), 1), self.learning_rate * 0.02)
        elif self.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=0.5, patience=max(self.patience // 2, 1))
        else:
            sched = None
        state = {
            "epoch": 0,
            "best": math.inf,
            "stale": 0,
            "history": [],
            "done": False,
            "seed": seed,
        }
        best_state = None
        if resume and self.checkpoint_dir is not None and (self.checkpoint_dir / _CKPT).exists():
            state, best_state = self._restore(estimator, opt, sched, gen, group)
        loss_fn = _ddp.wrap(estimator, group)
        show = bool(self.progress) and sys.stderr.isatty() and group.rank == 0
        check = not getattr(source, "checked", False)
        history = state["history"]
        for epoch in range(state["epoch"], self.max_epochs):
            if state["done"]:
                break
            t0 = time.perf_counter()
            estimator.train()
            total, count = 0.0, 0
            bar = tqdm(source.train_batches(self.batch_size, epoch), disable=not show,
                       desc=f"epoch {epoch + 1}/{self.max_epochs}", leave=False, total=n_batches)
            for batch in bar:
                if check:
                    _check_batch(batch)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss = loss_fn(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the training loss became {value} at epoch {epoch + 1}"
                    )
                if self.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(estimator.parameters(), self.grad_clip)
                opt.step()
                if self.scheduler == "cosine":
                    sched.step()
                total += value
                count += 1
                if show:
                    bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            group.sync_buffers(estimator)
            total, count = group.sum(total, count)
            if count == 0:
                raise ValueError("no training batches: the data are empty")
            val = self._validate(estimator, source, check, group)
            if self.scheduler == "plateau":
                sched.step(val)
            history.append((epoch + 1, total / count, val, opt.param_groups[0]["lr"],
                            time.perf_counter() - t0))
            if val < state["best"]:
                state["best"], state["stale"] = val, 0
                best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in estimator.state_dict().items()
                }
            else:
                state["stale"] += 1
            state["epoch"] = epoch + 1
            state["done"] = state["stale"] >= self.patience
            if self.checkpoint_dir is not None:
                rng = group.gather_rng()  # every rank's, for an exact resume
                if group.rank == 0:
                    self._checkpoint(estimator, opt, sched, gen, state, best_state, rng, group)
                group.barrier()  # no rank starts the next epoch before its checkpoint exists
            if show:
                tqdm.write(f"epoch {epoch + 1}: train {history[-1][1]:.5g}  val {val:.5g}")
        if best_state is not None:
            estimator.load_state_dict(best_state)
        estimator.eval()
        return _history(history, self.settings(group.world_size, group.backend))

    @torch.no_grad()
    def _validate(self, estimator, source, check, group):
        estimator.eval()
        total, n = 0.0, 0
        for batch in source.val_batches(self.batch_size):
            if check:
                _check_batch(batch)
            batch = {k: v.to(group.device) for k, v in batch.items()}
            size = len(next(iter(batch.values())))
            total += estimator.loss(batch).item() * size
            n += size
        total, n = group.sum(total, n)
        if n == 0:
            raise ValueError("no validation batches: the data are empty")
        return total / n

    # -- checkpoints: one safetensors file (tensors + JSON metadata), replaced atomically ------
    def _checkpoint(self, estimator, opt, sched, gen, state, best_state, rng, group):
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"model.{k}": v.detach().cpu().contiguous() for k, v in estimator.state_dict().items()
        }
        tensors.update({f"best.{k}": v.contiguous() for k, v in (best_state or {}).items()})
        opt_state = opt.state_dict()
        for pid, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng.cpu"] = rng[0]
        tensors.update({f"rng.cpu.{r}": st for r, st in enumerate(rng) if r})
        tensors["rng.batches"] = gen.get_state()
        if group.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(group.device)
        meta = dict(state, architecture=type(estimator).__name__, world_size=group.world_size,
                    config=getattr(estimator, "config", None) if _jsonable(estimator) else None,
                    param_groups=opt_state["param_groups"],
                    scheduler=sched.state_dict() if sched is not None else None)
        text = json.dumps(meta, default=float)
        _atomic(self.checkpoint_dir / _CKPT,
                lambda tmp: save_file(tensors, tmp, metadata={"astrotrunc-checkpoint": text}))
        summary = {k: meta[k] for k in ("epoch", "best", "stale", "done", "architecture",
                                        "world_size")}
        _atomic(self.checkpoint_dir / _CKPT_SUMMARY,
                lambda tmp: Path(tmp).write_text(json.dumps(summary, default=float)))

    @staticmethod
    def best_weights(checkpoint_dir):
        """The best weights in the checkpoint of ``checkpoint_dir``, and its summary.

        For a run stopped before its last epoch: ``est.load_state_dict(weights)`` gives the
        estimator of the best validation loss so far (``scripts/checkpoint_to_detector.py``).

        Returns
        -------
        weights : dict of `torch.Tensor`
            A state dict of the checkpoint's architecture.
        info : dict
            ``architecture`` (class name), ``epoch`` and ``best`` (validation loss).
        """
        path = Path(checkpoint_dir) / _CKPT
        meta = _read_checkpoint_meta(path)
        weights = _prefixed(load_file(str(path)), "best.")
        if not weights:
            raise ValueError(f"{path} holds no best weights yet (no epoch finished)")
        return weights, {k: meta[k] for k in ("architecture", "epoch", "best")}

    def _read_meta(self) -> dict:
        return _read_checkpoint_meta(self.checkpoint_dir / _CKPT)

    def _restore(self, estimator, opt, sched, gen, group):
        meta = self._read_meta()
        tensors = load_file(str(self.checkpoint_dir / _CKPT))
        if meta["architecture"] != type(estimator).__name__:
            raise ValueError(
                f"the checkpoint in {self.checkpoint_dir} is for a {meta['architecture']}, "
                f"not a {type(estimator).__name__}"
            )
        model = _prefixed(tensors, "model.")
        try:
            estimator.load_state_dict(model)
        except RuntimeError as exc:
            raise ValueError(
                f"the checkpoint in {self.checkpoint_dir} does not fit this estimator's "
                f"architecture: {exc}"
            ) from None
        best_state = _prefixed(tensors, "best.") or None
        opt_tensors = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                opt_tensors.setdefault(int(pid), {})[name] = (
                    v.to(group.device) if name != "step" else v
                )
        opt.load_state_dict({"state": opt_tensors, "param_groups": meta["param_groups"]})
        if sched is not None and meta["scheduler"] is not None:
            sched.load_state_dict(meta["scheduler"])
        written = meta.get("world_size", 1)
        if written != group.world_size:
            warnings.warn(f"the checkpoint in {self.checkpoint_dir} was written by "
                          f"{written} process(es) and is resumed by {group.world_size}: the "
                          "batch order differs from an uninterrupted run", AstrotruncWarning,
                          stacklevel=4)
        key = f"rng.cpu.{group.rank}" if group.rank else "rng.cpu"
        if key in tensors:
            torch.set_rng_state(tensors[key])
        else:
            torch.manual_seed(spawn_seed(meta["seed"], group.rank, meta["epoch"]))
        gen.set_state(tensors["rng.batches"])
        if "rng.cuda" in tensors and group.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], group.device)
        state = {k: meta[k] for k in ("epoch", "best", "stale", "done", "seed")}
        state["history"] = [tuple(h) for h in meta["history"]]
        return state, best_state


def _read_checkpoint_meta(path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint {path}: the run wrote none yet (it writes one "
                                "after each epoch)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["astrotrunc-checkpoint"])
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"{path} is not an astrotrunc checkpoint (pickled files are refused): "
                         f"{exc}") from None


def _prefixed(tensors, prefix):
    """The tensors whose names start with ``prefix``, without it (a state dict)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _history(rows, settings) -> QTable:
    """The history table of the epochs trained, with the trainer's settings in its meta."""
    table = QTable(rows=[tuple(r) for r in rows], names=_HISTORY_COLUMNS) if len(rows) \
        else QTable(names=_HISTORY_COLUMNS)
    if len(rows):
        table["time"].unit = u.s
    table.meta["trainer"] = settings
    return table


def _jsonable(estimator) -> bool:
    try:
        json.dumps(estimator.config)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not recorded"
        return False
