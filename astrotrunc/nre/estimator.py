"""The base of every ratio estimator (r1-r4): a torch module with a loss and a safe file format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._utils import atomic_write

__all__ = ["RatioEstimator", "contrastive_loss"]

_REGISTRY: dict[str, type] = {}
#: Modules that define the package's estimators (imported by `RatioEstimator.load` on demand).
_ESTIMATOR_MODULES = ("astrotrunc.detection", "astrotrunc.completeness", "astrotrunc.inference")
_FORMAT = "astrotrunc-ratio-estimator"


def contrastive_loss(logit_fn, batch, key="theta", reference=None):
    """The NRE loss: binary cross-entropy between joint pairs and marginal pairs.

    Parameters
    ----------
    logit_fn : callable
        ``logit_fn(batch)`` returns log-ratio logits of shape ``(n, ...)``.
    batch : dict of `torch.Tensor`
        A batch of joint samples (all tensors batch-first).
    key : str
        Marginal pairs reuse the batch with ``batch[key]`` rolled by one position along the batch
        axis (the batches themselves are shuffled), so that it is paired with another sample.
    reference : dict, optional
        Reference-density contrast: ``{name: reference_name}``; the marginal pairs are the batch
        with ``batch[name]`` replaced by ``batch[reference_name]``, samples of a reference density
        rho. The classifier then learns ``log p(name | rest) / rho(name)`` (r4 of the method).

    Returns
    -------
    loss : `torch.Tensor`
        Scalar: mean BCE of the joint pairs (label 1) plus that of the marginal pairs (label 0).

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import contrastive_loss
    >>> batch = {"x": torch.randn(8, 2), "theta": torch.randn(8, 2)}
    >>> float(contrastive_loss(lambda b: (b["x"] * b["theta"]).sum(1), batch)) > 0
    True
    """
    joint = logit_fn(batch)
    marginal_batch = dict(batch)
    if reference:
        for name, ref in reference.items():
            marginal_batch[name] = batch[ref]
    else:
        marginal_batch[key] = torch.roll(batch[key], 1, dims=0)
    marginal = logit_fn(marginal_batch)
    bce = nn.functional.binary_cross_entropy_with_logits
    return bce(joint, torch.ones_like(joint)) + bce(marginal, torch.zeros_like(marginal))


class RatioEstimator(nn.Module):
    """Abstract base of the ratio estimators: ``forward(batch) -> logits``, ``loss(batch)``.

    A subclass defines its network in ``__init__`` from JSON-serialisable arguments and returns
    them in `config`; `save` writes the weights as safetensors with the class name and config in
    the metadata, and `load` rebuilds the estimator from those -- nothing is ever unpickled.
    Subclasses register themselves by class name when they are defined.

    The `~astrotrunc.nre.Trainer` only calls ``loss(batch)`` (and ``train()``/``eval()``), so an
    estimator with another objective (a per-pixel classifier, say) overrides `loss`.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import RatioEstimator
    >>> class Bilinear(RatioEstimator):
    ...     def __init__(self, n=2):
    ...         super().__init__()
    ...         self.n = n
    ...         self.w = torch.nn.Parameter(torch.zeros(n, n))
    ...     @property
    ...     def config(self):
    ...         return {"n": self.n}
    ...     def forward(self, batch):
    ...         return torch.einsum("bi,ij,bj->b", batch["x"], self.w, batch["theta"])
    >>> est = Bilinear()
    >>> est.loss({"x": torch.ones(4, 2), "theta": torch.ones(4, 2)}).item()  # 2 log 2
    1.3862943649291992
    """

    #: Batch key whose values are shuffled to make the marginal pairs of the default `loss`.
    theta_key = "theta"
    #: Reference-density contrast ``{name: reference_name}`` of the default `loss` (or `None`).
    reference = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    @property
    def config(self) -> dict:
        """JSON-serialisable constructor arguments (``type(self)(**config)`` rebuilds the net)."""
        raise NotImplementedError(f"{type(self).__name__} must define the config property")

    def _weights_key(self):
        """Changes whenever a weight does: a tensor modified in place (optimizer steps,
        load_state_dict) -- torch bumps its version counter -- or replaced (the tensor list is
        rebuilt when the module is moved or cast)."""
        tensors = self.__dict__.get("_tensor_list")
        if tensors is None:
            tensors = self.__dict__["_tensor_list"] = [*self.parameters(), *self.buffers()]
        return tuple(id(t) for t in tensors), tuple(t._version for t in tensors)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_tensor_list", None)  # .to(), .float(), ... may replace tensors
        return super()._apply(fn, *args, **kwargs)

    def _cached(self, name, key, build):
        """``build()``, kept (as ``name``, outside the state dict) until ``key`` changes.

        For state derived from the weights -- inference copies of the network, hashes -- with
        ``key`` including `_weights_key`.
        """
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = self.__dict__[name] = (key, build())
            self.__dict__.setdefault("_cache_names", set()).add(name)
        return cached[1]

    def __getstate__(self):
        # copies and pickles leave the caches behind: they are rebuilt on use, and some cannot
        # be copied at all (ONNX Runtime sessions)
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__")
                     else self.__dict__)
        for name in state.pop("_cache_names", ()):
            state.pop(name, None)
        return state

    def loss(self, batch) -> torch.Tensor:
        """Contrastive NRE loss of a batch (see `contrastive_loss`); override it for others."""
        return contrastive_loss(self, batch, key=self.theta_key, reference=self.reference)

    def train(self, mode=True):
        """`torch.nn.Module.train`: switch training mode on (``True``) or off (``False``).

        Estimators do not train themselves: give them and their data to
        `~astrotrunc.nre.Trainer.fit` (or use a ``fit_to`` classmethod).
        """
        if not isinstance(mode, bool):
            msg = (f"{type(self).__name__}.train(mode) is torch's training-mode switch and takes "
                   f"True or False, not a {type(mode).__name__}; to train on simulations use "
                   f"{type(self).__name__}.fit_to(...) or Trainer().fit(estimator, data)")
            raise TypeError(msg)
        return super().train(mode)

    # -- files -----------------------------------------------------------------------------
    def save(self, path, overwrite=False, metadata=None):
        """Write the estimator to a safetensors file, atomically.

        Parameters
        ----------
        path : str or path-like
            Output file (``.safetensors`` by convention).
        overwrite : bool
            Replace an existing file; otherwise an existing ``path`` raises `OSError`.
        metadata : dict, optional
            JSON-serialisable user metadata (e.g. a detector's flux threshold), returned as the
            ``metadata`` attribute of the loaded estimator. An estimator trained by
            `~astrotrunc.nre.Trainer` also records the trainer's settings (``world_size``
            included) under ``"training"``.
        """
        from .. import __version__
        from .._utils import check_writable

        path = check_writable(path, overwrite)
        trained = getattr(getattr(self, "history", None), "meta", {}).get("trainer")
        if trained is not None:
            metadata = {"training": trained, **(metadata or {})}

        try:
            meta = {"format": _FORMAT, "class": type(self).__name__, "astrotrunc": __version__,
                    "config": json.dumps(self.config), "metadata": json.dumps(metadata or {})}
        except TypeError as exc:
            raise TypeError(f"the config and metadata of a {type(self).__name__} must be "
                            f"JSON-serialisable to be saved: {exc}") from None
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))

    @classmethod
    def load_shipped(cls, filename):
        """Load a model file shipped in ``astrotrunc/data`` (the defaults of r1, r2, r4).

        Parameters
        ----------
        filename : str
            File name inside the package's ``data`` directory.

        Returns
        -------
        `RatioEstimator`
        """
        from importlib import resources

        path = resources.files("astrotrunc") / "data" / filename
        if not path.is_file():  # pragma: no cover - packaging error
            raise OSError(f"the shipped model {filename} is missing from the installation ({path})")
        return cls.load(str(path))

    @classmethod
    def load(cls, path, map_location=None):
        """Rebuild a saved estimator. Only safetensors files written by `save` are accepted.

        Parameters
        ----------
        path : str or path-like
            A file written by `save`.
        map_location : str or `torch.device`, optional
            Device of the loaded weights (CPU by default).

        Raises
        ------
        OSError
            The file does not exist.
        ValueError
            The file is not an astrotrunc model file (a pickle, another safetensors file), holds
            another class, or its weights do not fit the architecture described by its config.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise OSError(f"no such model file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path} is not an astrotrunc model file (safetensors expected; "
                             f"pickled files are refused): {exc}") from None
        if meta.get("format") != _FORMAT or "class" not in meta or "config" not in meta:
            raise ValueError(f"{path} is a safetensors file but not an astrotrunc model file")
        name = meta["class"]
        if name not in _REGISTRY:  # the package's estimators register when their module loads
            import importlib

            for module in _ESTIMATOR_MODULES:
                importlib.import_module(module)
        klass = _REGISTRY.get(name)
        if klass is None or not issubclass(klass, cls):
            raise ValueError(f"{path} holds a {name}, not a {cls.__name__}"
                             + ("" if klass else " (is the module defining it imported?)"))
        config = _json_field(meta, "config", path)
        user_meta = _json_field(meta, "metadata", path, default="{}")
        if not isinstance(config, dict):
            raise ValueError(f"{path}: the model file's config is not a JSON object")
        # build on the meta device first (no memory) and compare with the header's tensor shapes:
        # a tampered config is refused before any real allocation
        try:
            with torch.device("meta"):
                skeleton = klass(**config)
            expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        except Exception as exc:  # noqa: BLE001 - any failure means the config is unusable
            raise ValueError(f"{path}: its config cannot rebuild a {name}: {exc}") from None
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if stored != expected:
            diff = sorted(set(stored) ^ set(expected)) or sorted(
                k for k in stored if stored[k] != expected[k])
            raise ValueError(
                f"{path}: the stored weights do not fit the {name} architecture its "
                f"config describes (they differ in {diff[:3]}); the config was altered or "
                "the file is damaged"
            )
        state = load_file(str(path), device=str(map_location or "cpu"))
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{path}: weights {bad[:3]} hold NaN or infinite values")
        try:
            est = klass(**config)
            est.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: weights do not fit the {name} architecture: {exc}") from None
        est.metadata = user_meta
        est._source_path = str(path)
        return est.eval()


def _json_field(meta, key, path, default=None):
    text = meta.get(key, default)
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the {key!r} metadata of the model file is not valid JSON "
                         f"({exc}); the file is damaged or was not written by astrotrunc") from None


_atomic = atomic_write  # used by the trainer
