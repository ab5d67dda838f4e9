"""One trainer for every ratio estimator: AdamW, schedule, validation, early stopping, checkpoints."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from astropy.table import QTable
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .estimator import _atomic

__all__ = ["Trainer"]


class _TensorSource:
    """Batches from a dict of equal-length tensors (random validation split, shuffled batches)."""

    def __init__(self, data, val_fraction, generator):
        tensors = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
                   for k, v in data.items()}
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all arrays must have the same length (batch size), got {lengths}")
        n = next(iter(lengths.values()))
        if n < 2:
            raise ValueError(f"need at least 2 samples to train, got {n}")
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"array {k!r} holds NaN or infinite values")
        perm = torch.randperm(n, generator=generator)
        n_val = max(1, int(round(val_fraction * n)))
        self.tensors, self.val_idx, self.train_idx = tensors, perm[:n_val], perm[n_val:]
        self.generator = generator

    def _take(self, idx, batch_size):
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield {k: v[j] for k, v in self.tensors.items()}

    def train_batches(self, batch_size, epoch):
        perm = self.train_idx[torch.randperm(len(self.train_idx), generator=self.generator)]
        return self._take(perm, batch_size)

    def val_batches(self, batch_size):
        return self._take(self.val_idx, batch_size)

    def n_batches(self, batch_size):
        return -(-len(self.train_idx) // batch_size)


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
        Fraction of the data held out for validation (array data).
    patience : int
        Early stopping: stop after this many epochs without a better validation loss; the best
        weights are restored at the end.
    scheduler : {'cosine', 'plateau', None}
        Learning-rate schedule (cosine annealing per step, or halving on a validation plateau).
    device : str or `torch.device`, optional
        ``"cpu"``, ``"cuda"``...; CUDA when available by default.
    checkpoint_dir : str, optional
        A checkpoint (model, optimiser, scheduler, RNG, history) is written there atomically
        after every epoch, as safetensors + JSON: ``fit(..., resume=True)`` continues from it.
    progress : bool
        tqdm progress bars (only when stderr is a terminal).
    seed : int, optional
        Seeds batching and initialisation-independent randomness: runs on CPU are reproducible.

    Notes
    -----
    ``data`` given to `fit` is a dict of equal-length arrays/tensors, or a *batch source*: an
    object with ``train_batches(batch_size, epoch)`` and ``val_batches(batch_size)`` returning
    iterables of dict batches (and optionally ``n_batches(batch_size)``), e.g. an on-the-fly
    simulator or a `~astrotrunc.store.SimulationStore` view.
    """

    def __init__(self, max_epochs=50, batch_size=128, learning_rate=1e-3, weight_decay=1e-4,
                 val_fraction=0.1, patience=5, scheduler="cosine", device=None,
                 checkpoint_dir=None, progress=True, seed=None):
        if scheduler not in ("cosine", "plateau", None):
            raise ValueError(f"scheduler must be 'cosine', 'plateau' or None, got {scheduler!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.max_epochs, self.batch_size = int(max_epochs), int(batch_size)
        self.learning_rate, self.weight_decay = float(learning_rate), float(weight_decay)
        self.val_fraction, self.patience, self.scheduler = float(val_fraction), int(patience), scheduler
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.progress, self.seed = progress, seed

    def fit(self, estimator, data, resume=False):
        """Train ``estimator`` on ``data``; returns the history as a `~astropy.table.QTable`."""
        gen = torch.Generator().manual_seed(self.seed if self.seed is not None else
                                            int(torch.randint(0, 2**62, (1,))))
        source = (data if hasattr(data, "train_batches") else
                  _TensorSource(data, self.val_fraction, gen))
        estimator.to(self.device)
        opt = torch.optim.AdamW(estimator.parameters(), lr=self.learning_rate,
                                weight_decay=self.weight_decay)
        n_steps = self.max_epochs * (source.n_batches(self.batch_size)
                                     if hasattr(source, "n_batches") else 1000)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(n_steps, 1), self.learning_rate * 0.02)
                 if self.scheduler == "cosine" else
                 torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(self.patience // 2, 1))
                 if self.scheduler == "plateau" else None)
        history, start, best, best_state, stale = [], 0, math.inf, None, 0
        if resume and self.checkpoint_dir is not None and (self.checkpoint_dir / "checkpoint.json").exists():
            start, best, stale, history, best_state = self._restore(estimator, opt, sched, gen)
        show = self.progress and sys.stderr.isatty()
        for epoch in range(start, self.max_epochs):
            estimator.train()
            losses = []
            bar = tqdm(source.train_batches(self.batch_size, epoch), disable=not show,
                       desc=f"epoch {epoch + 1}/{self.max_epochs}", leave=False,
                       total=source.n_batches(self.batch_size) if hasattr(source, "n_batches") else None)
            for batch in bar:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss = estimator.loss(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss.item()} at epoch {epoch + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if self.scheduler == "cosine":
                    sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if not losses:
                raise ValueError("no training batches: the data are empty")
            val = self._validate(estimator, source)
            if self.scheduler == "plateau":
                sched.step(val)
            history.append((epoch + 1, float(np.mean(losses)), val, opt.param_groups[0]["lr"]))
            if val < best:
                best, stale = val, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in estimator.state_dict().items()})
            else:
                stale += 1
            if self.checkpoint_dir is not None:
                self._checkpoint(estimator, opt, sched, gen, epoch + 1, best, stale, history, best_state)
            if show:
                tqdm.write(f"epoch {epoch + 1}: train {history[-1][1]:.5g}  val {val:.5g}")
            if stale >= self.patience:
                break
        if best_state is not None:
            estimator.load_state_dict(best_state)
        estimator.eval()
        return QTable(rows=history, names=("epoch", "train_loss", "val_loss", "learning_rate")) \
            if history else QTable(names=("epoch", "train_loss", "val_loss", "learning_rate"))

    @torch.no_grad()
    def _validate(self, estimator, source):
        estimator.eval()
        total, n = 0.0, 0
        for batch in source.val_batches(self.batch_size):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            size = len(next(iter(batch.values())))
            total += estimator.loss(batch).item() * size
            n += size
        if n == 0:
            raise ValueError("no validation batches: the data are empty")
        return total / n

    # -- checkpoints: safetensors for tensors, JSON for the rest; never pickle ----------------
    def _checkpoint(self, estimator, opt, sched, gen, epoch, best, stale, history, best_state):
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in estimator.state_dict().items()}
        tensors.update({f"best.{k}": v.contiguous() for k, v in (best_state or {}).items()})
        opt_state = opt.state_dict()
        for pid, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng.cpu"] = torch.get_rng_state()
        tensors["rng.batches"] = gen.get_state()
        meta = {"epoch": epoch, "best": best, "stale": stale, "history": history,
                "param_groups": opt_state["param_groups"],
                "scheduler": sched.state_dict() if sched is not None else None,
                "architecture": type(estimator).__name__}
        _atomic(self.checkpoint_dir / "checkpoint.safetensors", lambda tmp: save_file(tensors, tmp))
        _atomic(self.checkpoint_dir / "checkpoint.json",
                lambda tmp: Path(tmp).write_text(json.dumps(meta, default=float)))

    def _restore(self, estimator, opt, sched, gen):
        meta = json.loads((self.checkpoint_dir / "checkpoint.json").read_text())
        if meta["architecture"] != type(estimator).__name__:
            raise ValueError(f"the checkpoint in {self.checkpoint_dir} is for a {meta['architecture']}, "
                             f"not a {type(estimator).__name__}")
        tensors = load_file(str(self.checkpoint_dir / "checkpoint.safetensors"))
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            estimator.load_state_dict(model)
        except RuntimeError as exc:
            raise ValueError(f"the checkpoint in {self.checkpoint_dir} does not fit this estimator's "
                             f"architecture: {exc}") from None
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        state = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v.to(self.device) if name != "step" else v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if sched is not None and meta["scheduler"] is not None:
            sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        gen.set_state(tensors["rng.batches"])
        return meta["epoch"], meta["best"], meta["stale"], [tuple(h) for h in meta["history"]], best_state
