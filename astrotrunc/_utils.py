"""Private helpers shared by several subpackages: one place for each check.

* `validate_map` -- a 2-D map (ndarray, Quantity, NDData, masked array or torch tensor) as a
  float64 array, its bad-pixel mask and its unit;
* `evaluating` -- a module in evaluation mode for the duration of a block, restored after (also
  on exceptions);
* `nearest_pixel` -- the one rounding rule from pixel coordinates to pixel indices;
* `spawn_seed` -- independent seeds from a base seed and a key;
* `check_writable` -- the no-clobber rule of every writer;
* `atomic_write` -- write through a temporary file, then rename (never a partial file);
* `weights_identity` -- a short hash of a network's configuration and weights.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

__all__: list[str] = []  # private module


@contextlib.contextmanager
def evaluating(module):
    """Put a `torch.nn.Module` in evaluation mode (and no-grad) inside a ``with`` block.

    The previous training/evaluation mode is restored on exit, also when the block raises.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc._utils import evaluating
    >>> net = torch.nn.Dropout(0.5).train()
    >>> with evaluating(net):
    ...     net.training
    False
    >>> net.training
    True
    """
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def available_device(device):
    """``torch.device(device)``, refused (`ValueError`) when this machine has no such device."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return dev


def celestial_wcs(wcs):
    """The 2-D celestial part of ``wcs``, or `None` when it has none. A 2-D celestial WCS is
    returned as it is: astropy's ``WCS.celestial`` deep-copies the WCS on every access (about
    1.5 ms)."""
    if wcs is None or not wcs.has_celestial:
        return None
    return wcs if wcs.naxis == 2 else wcs.celestial


def pixel_scale_deg(wcs) -> float:
    """The mean of the two axes' pixel scales (deg) of a 2-D celestial WCS, at its reference pixel.

    wcslib keeps celestial axes in degrees whatever their ``CUNIT``; the plain array is four
    times cheaper than ``WCS.proj_plane_pixel_scales``' Quantities.
    """
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(np.abs(proj_plane_pixel_scales(wcs))))


def padded_map(data, bad, half, background=0.0, dtype=np.float32):
    """The map minus ``background`` (0 where bad) and its validity (1 where good), stacked
    ``(2, ny + 2 hy, nx + 2 hx)`` and zero-padded by ``half = (hy, hx)`` (or one int) pixels.

    Bad pixels are those of ``bad`` (2-D bool array, or `None`) and every non-finite pixel.
    """
    hy, hx = (half, half) if np.ndim(half) == 0 else half
    data = np.asarray(data, dtype=np.float64)
    bad = ~np.isfinite(data) if bad is None else (np.asarray(bad, bool) | ~np.isfinite(data))
    ny, nx = data.shape
    padded = np.zeros((2, ny + 2 * hy, nx + 2 * hx), dtype)
    inner = (slice(hy, hy + ny), slice(hx, hx + nx))
    padded[0][inner] = data - background
    padded[1][inner] = ~bad
    if bad.any():
        padded[0][inner][bad] = 0.0
    return padded


def take_stamps(padded, ix, iy, half, channels_first=True):
    """``(2, n, 2 hy + 1, 2 hx + 1)``: the windows of a `padded_map` centred on pixels (ix, iy)
    (``channels_first=False``: ``(n, 2, ...)``, contiguous)."""
    hy, hx = (half, half) if np.ndim(half) == 0 else half
    # the windows whose top-left corner is each pixel (a view), gathered whole rows at a time:
    # faster than a gather of flat pixel indices (5x on the chunks of a 2048 x 2048 map)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * hy + 1, 2 * hx + 1),
                                                       axis=(1, 2))
    return windows[:, iy, ix] if channels_first else windows.transpose(1, 2, 0, 3, 4)[iy, ix]


def clip(a, low, high):
    """``np.clip(a, low, high)`` without its Python overhead, most of its time on small arrays
    (half the time on a few hundred values)."""
    return np.minimum(np.maximum(a, low), high)


def nearest_pixel(coord, n):
    """Index of the pixel whose centre is nearest to ``coord`` (0-based), clipped to ``[0, n)``.

    Pixel ``i`` covers ``[i - 0.5, i + 0.5)``; works on numpy arrays and torch tensors.
    """
    if hasattr(coord, "detach"):  # torch.Tensor
        return (coord + 0.5).floor().long().clamp(0, n - 1)
    index = np.floor(np.asarray(coord, dtype=np.float64) + 0.5).astype(np.int64)
    return clip(index, 0, n - 1)


def spawn_seed(seed, *key) -> int:
    """A seed for the independent stream ``key`` of a base ``seed`` (`numpy.random.SeedSequence`).

    Examples
    --------
    >>> from astrotrunc._utils import spawn_seed
    >>> spawn_seed(0, 1) == spawn_seed(0, 1) != spawn_seed(0, 2)
    True
    """
    state = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key))
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_writable(path, overwrite, option="overwrite=True") -> Path:
    """The path to write, or `OSError` if it exists (and ``overwrite`` is off) or has no directory.

    The one no-clobber rule of every astrotrunc writer; ``option`` names the switch in the message.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OSError(f"{path} is a directory; expected a file name")
    if path.exists() and not overwrite:
        raise OSError(f"{path} already exists; pass {option} to replace it")
    if not path.parent.is_dir():
        raise OSError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def atomic_write(path, write):
    """Write ``path`` through a temporary file in the same directory, then rename it over ``path``.

    ``write(tmp_path)`` writes the file; on any error the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
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


def weights_identity(config, tensors) -> str:
    """16 hex digits of SHA-256 over ``config`` (a dict) and the bytes of ``tensors``.

    The identity of a trained network (a detector, a completeness): equal files give equal
    identities, and any changed weight or setting another one.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc._utils import weights_identity
    >>> a = weights_identity({"k": 1}, [torch.zeros(3)])
    >>> a == weights_identity({"k": 1}, [torch.zeros(3)]) != weights_identity({"k": 2}, [])
    True
    """
    h = hashlib.sha256(repr(sorted(config.items())).encode())
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _to_numpy(data):
    """ndarray from an ndarray, masked array or torch tensor (no torch import)."""
    if hasattr(data, "detach") and hasattr(data, "cpu"):  # torch.Tensor
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ma.MaskedArray):
        data = data.filled(np.nan) if data.dtype.kind == "f" else data.data
    return np.asarray(data)


def validate_map(data, mask=None, *, what="data"):
    """A 2-D real map as ``(float64 array, bad-pixel mask, unit or None)``.

    ``data`` may be an ndarray, a `~astropy.units.Quantity`, an `~astropy.nddata.NDData` (its
    ``mask`` and ``unit`` are used unless ``mask`` is given), a masked array or a torch tensor.
    The mask is ``True`` where pixels are bad; NaN and infinite pixels are *not* added to it here
    (the caller decides how to report them).

    Raises
    ------
    ValueError
        Not 2-D, not real numbers, empty, or a mask of another shape.
    """
    from astropy import units as u
    from astropy.nddata import NDData

    unit = None
    if isinstance(data, NDData):
        if mask is None and data.mask is not None:
            mask = data.mask
        unit = data.unit
        data = data.data
    if isinstance(data, u.Quantity):
        unit = data.unit
        data = data.value
    if isinstance(data, np.ma.MaskedArray) and mask is None:
        mask = np.ma.getmaskarray(data)
    data = _to_numpy(data)
    if data.ndim != 2:
        hint = ""
        if data.ndim == 3:
            hint = (
                " (for a batch of maps, call it on each map or use NeuralSourceFinder.find_batch)"
            )
        elif data.ndim == 1:
            hint = (" (a 1-D array of 12*nside**2 values is a HEALPix map: project it to a patch "
                    "with astrotrunc.healpix_to_patch)")
        msg = (f"{what} must be a 2-D image, got an array with {data.ndim} dimensions and shape "
               f"{data.shape}{hint}")
        raise ValueError(msg)
    if data.dtype.kind not in "fiub":
        msg = f"{what} must be a real-valued numeric image, got dtype {data.dtype}"
        raise ValueError(msg)
    if data.size == 0:
        msg = f"{what} is empty (shape {data.shape})"
        raise ValueError(msg)
    data = data.astype(np.float64)  # integer maps: no overflow in the arithmetic downstream
    if mask is None:
        bad = np.zeros(data.shape, dtype=bool)
    else:
        bad = _to_numpy(mask)
        if bad.shape != data.shape:
            msg = f"mask shape {bad.shape} does not match the {what} shape {data.shape}"
            raise ValueError(msg)
        bad = bad.astype(bool)
    return data, bad, unit
