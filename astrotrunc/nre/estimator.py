"""The base of every ratio estimator (r1-r4): a torch module with a loss and a safe file format."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["RatioEstimator", "contrastive_loss"]

_REGISTRY: dict[str, type] = {}
_FORMAT = "astrotrunc-ratio-estimator"


def contrastive_loss(logit_fn, batch, key="theta"):
    """The NRE loss: joint pairs vs pairs with ``batch[key]`` rolled within the batch (BCE).

    ``logit_fn(batch)`` returns log-ratio logits of shape ``(n, ...)``; the marginal pairs reuse
    the same data with the parameters shifted by one position in the batch.
    """
    joint = logit_fn(batch)
    shuffled = dict(batch)
    shuffled[key] = torch.roll(batch[key], 1, dims=0)
    marginal = logit_fn(shuffled)
    bce = nn.functional.binary_cross_entropy_with_logits
    return bce(joint, torch.ones_like(joint)) + bce(marginal, torch.zeros_like(marginal))


class RatioEstimator(nn.Module):
    """Abstract base of the ratio estimators: ``forward(batch) -> logits``, ``loss(batch)``.

    A subclass defines its network in ``__init__`` from JSON-serialisable arguments and returns
    them in `config`; `save` writes the weights as safetensors with the class name and config in
    the metadata, and `load` rebuilds the estimator from those -- nothing is ever unpickled.
    Subclasses register themselves by class name.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    @property
    def config(self) -> dict:  # pragma: no cover - abstract
        """JSON-serialisable constructor arguments."""
        raise NotImplementedError

    def loss(self, batch) -> torch.Tensor:
        """Contrastive NRE loss of a batch with ``"theta"`` (override for other estimators)."""
        return contrastive_loss(self, batch)

    # -- files -----------------------------------------------------------------------------
    def save(self, path, overwrite=False, metadata=None):
        """Write weights (safetensors) + class name + config + ``metadata`` (JSON) atomically."""
        path = Path(path).expanduser()
        if path.exists() and not overwrite:
            raise OSError(f"{path} already exists; pass overwrite=True to replace it")
        from .. import __version__

        meta = {"format": _FORMAT, "class": type(self).__name__, "astrotrunc": __version__,
                "config": json.dumps(self.config), "metadata": json.dumps(metadata or {})}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))

    @classmethod
    def load(cls, path, map_location=None):
        """Rebuild a saved estimator. Only safetensors files written by `save` are accepted."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise OSError(f"no such model file: {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path} is not an astrotrunc model file (safetensors expected; "
                             f"pickled files are refused): {exc}") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is a safetensors file but not an astrotrunc model file")
        name = meta["class"]
        klass = _REGISTRY.get(name)
        if klass is None or not issubclass(klass, cls):
            raise ValueError(f"{path} holds a {name}, not a {cls.__name__}")
        est = klass(**json.loads(meta["config"]))
        state = load_file(str(path), device=str(map_location or "cpu"))
        try:
            est.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not fit the {name} architecture: {exc}") from None
        est.metadata = json.loads(meta.get("metadata", "{}"))
        est._source_path = str(path)
        return est.eval()


def _atomic(path: Path, write):
    """Write through a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: use the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
