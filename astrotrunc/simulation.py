"""The forward model: point-source population, sky geometry, instrument, simulated maps.

`PointSourceModel.paper` is the configuration of "Detection is truncation" (the authors' own
simulator: same distribution, same data units). Everything is batched in torch: no Python loop over
sources or maps on the hot path, chunked so memory stays bounded for any number of maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable
from astropy.wcs import WCS
from scipy.ndimage import gaussian_filter1d

from ._utils import pixel_scale_deg
from .priors import BoxPrior, Uniform, _as_generator

__all__ = ["SkyGeometry", "Instrument", "PointSourceModel", "SimulationBatch"]


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
class SkyGeometry:
    """Pixel grid of a map and its celestial WCS.

    Parameters
    ----------
    wcs : `~astropy.wcs.WCS`
        Celestial WCS of the map (Galactic longitude/latitude axes).
    shape : tuple of int, optional
        ``(ny, nx)``; defaults to ``wcs.array_shape``.

    Notes
    -----
    Sources are placed by the WCS: pixel ``(x, y)`` (0-based, photutils convention) of a source is
    ``wcs.world_to_pixel``. When the projection is affine in (l, b) -- a plate carrée map centred on
    the equator of its frame, the paper's geometry -- the mapping is evaluated in torch directly.
    """

    def __init__(self, wcs: WCS, shape=None):
        if not isinstance(wcs, WCS) or not wcs.has_celestial:
            raise ValueError("SkyGeometry needs an astropy WCS with celestial axes")
        shape = tuple(shape) if shape is not None else wcs.array_shape
        if shape is None or len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"map shape must be (ny, nx) with positive sizes, got {shape}")
        self.wcs = wcs.celestial
        self.shape = (int(shape[0]), int(shape[1]))
        self.wcs.array_shape = self.shape
        self._affine = _affine_from_wcs(self.wcs, self.shape)

    @classmethod
    def from_extent(cls, shape=(128, 128), center=None, resolution=0.625 * u.deg, projection="CAR"):
        """A Galactic map of ``shape`` pixels of ``resolution`` centred on ``center``.

        Parameters
        ----------
        shape : tuple of int
            ``(ny, nx)``.
        center : `~astropy.coordinates.SkyCoord`, optional
            Map centre; the Galactic centre by default.
        resolution : `~astropy.units.Quantity`
            Angular size of a pixel.
        projection : str
            FITS projection code (``"CAR"``, ``"TAN"``, ...).
        """
        from .io import make_wcs

        if center is None:
            center = SkyCoord(0 * u.deg, 0 * u.deg, frame="galactic")
        return cls(make_wcs(shape, center, resolution, projection=projection, frame="galactic"))

    @property
    def pixel_scale(self) -> u.Quantity:
        """Angular pixel size at the reference point (mean of the two axes)."""
        return pixel_scale_deg(self.wcs) * u.deg

    def world_to_pixel(self, l, b):  # noqa: E741
        """Pixel coordinates ``(x, y)`` of Galactic (l, b) in degrees (torch tensors in and out)."""
        if self._affine is not None:
            (a00, a01, a10, a11), (x0, y0), lon0 = self._affine
            dl = torch.remainder(l - lon0 + 180.0, 360.0) - 180.0
            return a00 * dl + a01 * b + x0, a10 * dl + a11 * b + y0
        sky = SkyCoord(l.detach().cpu().numpy() * u.deg, b.detach().cpu().numpy() * u.deg,
                       frame="galactic")
        x, y = self.wcs.world_to_pixel(sky)
        as_t = lambda a: torch.as_tensor(np.nan_to_num(a, nan=-1e9), dtype=l.dtype, device=l.device)  # noqa: E731
        return as_t(x), as_t(y)

    def pixel_to_world(self, x, y) -> SkyCoord:
        """Sky coordinates of pixel positions (0-based)."""
        return self.wcs.pixel_to_world(np.asarray(x), np.asarray(y)).galactic

    def __repr__(self):
        return (f"SkyGeometry(shape={self.shape}, pixel_scale={self.pixel_scale:.4g}, "
                f"ctype={list(self.wcs.wcs.ctype)})")


def _affine_from_wcs(wcs, shape):
    """(matrix, offset, lon0) if pixel = A @ (l - lon0, b) + offset is exact on this map, else None.
    """
    ny, nx = shape
    lon0 = float(wcs.wcs.crval[0])
    xs = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2, 0.3 * nx])
    ys = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2, 0.7 * ny])
    world = wcs.pixel_to_world(xs, ys).galactic
    dl = (world.l.deg - lon0 + 180.0) % 360.0 - 180.0
    design = np.column_stack([dl, world.b.deg, np.ones_like(dl)])
    coef_x, *_ = np.linalg.lstsq(design, xs, rcond=None)
    coef_y, *_ = np.linalg.lstsq(design, ys, rcond=None)
    if max(np.abs(design @ coef_x - xs).max(), np.abs(design @ coef_y - ys).max()) > 1e-6:
        return None
    return (coef_x[0], coef_x[1], coef_y[0], coef_y[1]), (coef_x[2], coef_y[2]), lon0


# ----------------------------------------------------------------------------------------------
# Instrument
# ----------------------------------------------------------------------------------------------
class Instrument:
    """PSF, normalisation, background, exposure and Poisson noise.

    The mean map is ``mu = normalization * (binned fluxes ⊗ PSF) + background`` and the data are
    ``Poisson(exposure * mu) / exposure`` (flux units).

    Parameters
    ----------
    psf : float, `~astropy.units.Quantity` or 2-D array
        Gaussian PSF standard deviation in pixels (float), as an angle (Quantity; converted with
        the map's pixel scale), or an explicit 2-D kernel (normalised to unit sum).
    normalization : float
        Factor applied to the PSF-convolved flux map (4 in the paper).
    exposure : float or 2-D array
        Exposure (100 in the paper); positive.
    background : float or 2-D array
        Diffuse background added to the mean map, in flux units per pixel.
    boundary : {'reflect', 'constant'}
        PSF boundary condition at the map edges: ``'reflect'`` (scipy's ``gaussian_filter``
        default, the paper's simulator) or ``'constant'`` (flux leaving the map is lost).
    noise : {'poisson', None}
        Poisson noise, or none (the data are the mean map).
    """

    def __init__(self, psf=1.5, normalization=4.0, exposure=100.0, background=0.0,
                 boundary="reflect", noise="poisson"):
        if boundary not in ("reflect", "constant"):
            raise ValueError(f"boundary must be 'reflect' or 'constant', got {boundary!r}")
        if noise not in ("poisson", None):
            raise ValueError(f"noise must be 'poisson' or None, got {noise!r}")
        if isinstance(psf, u.Quantity):
            if not psf.unit.is_equivalent(u.deg) or psf.isscalar is False:
                raise ValueError(f"a PSF given as a Quantity must be a scalar angle, got {psf!r}")
            if psf.value <= 0:
                raise ValueError(f"PSF width must be positive, got {psf}")
        elif np.ndim(psf) == 0:
            if not float(psf) > 0:
                raise ValueError(f"PSF width must be positive (pixels), got {psf}")
            psf = float(psf)
        else:
            kernel = np.asarray(psf, dtype=float)
            if (
                kernel.ndim != 2
                or not np.isfinite(kernel).all()
                or kernel.sum() <= 0
                or (kernel < 0).any()
            ):
                raise ValueError(
                    "a PSF kernel must be a finite, non-negative 2-D array with positive sum"
                )
            psf = kernel / kernel.sum()
        self.psf = psf
        self.normalization = float(normalization)
        self.exposure = _positive_scalar_or_map(exposure, "exposure", strictly=True)
        self.background = _positive_scalar_or_map(background, "background", strictly=False)
        self.boundary = boundary
        self.noise = noise

    def __repr__(self):
        psf = f"{self.psf}" if not isinstance(self.psf, np.ndarray) else f"kernel{self.psf.shape}"
        return (
            f"Instrument(psf={psf}, normalization={self.normalization}, "
            f"boundary={self.boundary!r}, noise={self.noise!r})"
        )


def _positive_scalar_or_map(value, name, strictly):
    arr = np.asarray(value, dtype=float)
    if arr.ndim not in (0, 2):
        raise ValueError(f"{name} must be a scalar or a 2-D map, got an array of shape {arr.shape}")
    bad = ~np.isfinite(arr) | ((arr <= 0) if strictly else (arr < 0))
    if bad.any():
        raise ValueError(f"{name} must be finite and {'positive' if strictly else 'non-negative'}")
    return float(arr) if arr.ndim == 0 else arr


class _PSFOperator(torch.nn.Module):
    """Convolution with the instrument PSF on a fixed map shape (batched, device-agnostic).

    A Gaussian is applied as two dense 1-D operators (``A_y @ m @ A_x^T``, exactly scipy's
    ``gaussian_filter`` with the same boundary mode); a general kernel by FFT after padding.
    """

    def __init__(self, instrument: Instrument, shape, pixel_scale_deg: float):
        super().__init__()
        ny, nx = shape
        psf = instrument.psf
        mode = "reflect" if instrument.boundary == "reflect" else "constant"
        if isinstance(psf, u.Quantity):
            psf = psf.to_value(u.deg) / pixel_scale_deg
        self.separable = np.ndim(psf) == 0
        self.shape = (ny, nx)
        if self.separable:
            ay = gaussian_filter1d(np.eye(ny), float(psf), axis=0, mode=mode, truncate=4.0)
            ax = gaussian_filter1d(np.eye(nx), float(psf), axis=0, mode=mode, truncate=4.0)
            # Column j of A_y is non-zero only on rows j-r..j+r: keep that band, so that a source
            # at (iy, ix) scatters f * A_y[:, iy] into column ix of U = A_y @ B, and mu = U @ A_x^T
            # is one dense GEMM (no dense binned map, no second GEMM).
            rows, cols = np.nonzero(ay)
            r = int(np.abs(rows - cols).max())
            band_rows = np.arange(ny)[:, None] + np.arange(-r, r + 1)[None, :]
            inside = (band_rows >= 0) & (band_rows < ny)
            band_rows = np.clip(band_rows, 0, ny - 1)
            band = np.where(inside, ay[band_rows, np.arange(ny)[:, None]], 0.0)
            self.register_buffer("band", torch.as_tensor(band, dtype=torch.float32))
            self.register_buffer("band_rows", torch.as_tensor(band_rows))
            self.register_buffer("axt", torch.as_tensor(ax.T.copy(), dtype=torch.float32))
        else:
            ky, kx = psf.shape
            py, px = ky // 2, kx // 2
            self.pad = (py, ky - 1 - py, px, kx - 1 - px)
            # index gather implements scipy's 'reflect' (half-sample symmetric) or zero padding
            self.iy = _pad_index(ny, py, ky - 1 - py, mode)
            self.ix = _pad_index(nx, px, kx - 1 - px, mode)
            fy, fx = ny + ky - 1, nx + kx - 1
            kpad = np.zeros((fy, fx))
            kpad[:ky, :kx] = psf  # circular convolution of the padded map == scipy.ndimage.convolve
            self.register_buffer("kft", torch.fft.rfft2(torch.as_tensor(kpad)).to(torch.complex64))
            self.kshape = (ky, kx)

    def forward(self, flux, iy, ix, inside) -> torch.Tensor:
        """PSF-convolved map ``(n, ny, nx)`` of point fluxes at integer pixels ``(iy, ix)``."""
        ny, nx = self.shape
        n = flux.shape[0]
        flux = torch.where(inside, flux, 0.0).float()
        iy, ix = torch.where(inside, iy, 0), torch.where(inside, ix, 0)
        if self.separable:
            u_map = torch.zeros(n, ny * nx, dtype=torch.float32, device=flux.device)
            index = (self.band_rows[iy] * nx + ix[..., None]).flatten(1)
            u_map.scatter_add_(1, index, (flux[..., None] * self.band[iy]).flatten(1))
            return (u_map.view(n * ny, nx) @ self.axt).view(n, ny, nx)
        binned = torch.zeros(n, ny * nx, dtype=torch.float32, device=flux.device)
        binned.scatter_add_(1, iy * nx + ix, flux)
        m = binned.view(n, ny, nx)
        iy, ix = self.iy.to(m.device), self.ix.to(m.device)
        padded = m[..., iy.clamp(min=0), :][..., :, ix.clamp(min=0)]
        padded = padded * (iy >= 0)[:, None] * (ix >= 0)[None, :]
        full = torch.fft.irfft2(torch.fft.rfft2(padded) * self.kft, s=padded.shape[-2:])
        ky, kx = self.kshape
        return full[..., ky - 1: ky - 1 + ny, kx - 1: kx - 1 + nx]


def _pad_index(n, before, after, mode):
    idx = np.arange(-before, n + after)
    if mode == "reflect":
        period = 2 * n
        idx = np.mod(idx, period)
        idx = np.where(idx >= n, period - 1 - idx, idx)
    else:
        idx = np.where((idx < 0) | (idx >= n), -1, idx)
    return torch.as_tensor(idx)


# ----------------------------------------------------------------------------------------------
# Simulations
# ----------------------------------------------------------------------------------------------
@dataclass
class SimulationBatch:
    """A batch of simulated maps and their truth.

    Attributes
    ----------
    maps : `torch.Tensor`
        ``(n, ny, nx)`` float32 data (flux units).
    theta : `torch.Tensor`
        ``(n, n_params)`` population parameters.
    flux, l, b, x, y : `torch.Tensor`
        ``(n, n_max)`` source fluxes, Galactic coordinates (deg) and pixel coordinates (0-based),
        padded to the largest number of sources in the batch.
    valid : `torch.Tensor`
        ``(n, n_max)`` bool: the entry is a real source (index < N).
    in_map : `torch.Tensor`
        ``(n, n_max)`` bool: a real source whose centre falls inside the map.
    detected : `torch.Tensor` or `None`
        ``(n, n_max)`` bool, truncated-model batches only: the source stands for a detection of
        the observed catalog (placed in its region R_i); the others are sub-threshold sources.
    """

    maps: torch.Tensor
    theta: torch.Tensor
    flux: torch.Tensor
    l: torch.Tensor  # noqa: E741
    b: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    valid: torch.Tensor
    in_map: torch.Tensor
    param_names: tuple = ("N", "sigma_F", "h")
    flux_unit: str = ""
    detected: torch.Tensor | None = None

    def __len__(self):
        return self.maps.shape[0]

    def __getitem__(self, index):
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device):
        """The batch with every tensor moved to ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def theta_table(self) -> QTable:
        """θ per map as a `~astropy.table.QTable` (``h`` in degrees)."""
        theta = self.theta.detach().cpu().numpy()
        t = QTable()
        t["map_id"] = np.arange(len(self))
        for j, name in enumerate(self.param_names):
            t[name] = theta[:, j] * (u.deg if name == "h" else u.dimensionless_unscaled)
        return t

    def sources(self, i: int) -> QTable:
        """The source table of map ``i``: flux, l, b, pixel x, y and whether it lies in the map."""
        keep = self.valid[i].cpu().numpy()
        get = lambda a: a[i].detach().cpu().numpy()[keep]  # noqa: E731
        t = QTable()
        t["flux"] = get(self.flux) * u.Unit(self.flux_unit)
        t["l"] = get(self.l) * u.deg
        t["b"] = get(self.b) * u.deg
        t["x"] = get(self.x) * u.pix
        t["y"] = get(self.y) * u.pix
        t["in_map"] = get(self.in_map)
        if self.detected is not None:
            t["detected"] = get(self.detected)
        t.meta.update({name: float(v) for name, v in zip(self.param_names, self.theta[i].tolist())})
        return t

    def truth_table(self) -> QTable:
        """All sources of all maps in one table, with a ``map_id`` column and θ per row."""
        keep = self.valid.cpu().numpy()
        map_id, _ = np.nonzero(keep)
        cols = {
            k: getattr(self, k).detach().cpu().numpy()[keep] for k in ("flux", "l", "b", "x", "y")
        }
        t = QTable()
        t["map_id"] = map_id
        t["flux"] = cols["flux"] * u.Unit(self.flux_unit)
        t["l"] = cols["l"] * u.deg
        t["b"] = cols["b"] * u.deg
        t["x"] = cols["x"] * u.pix
        t["y"] = cols["y"] * u.pix
        t["in_map"] = self.in_map.cpu().numpy()[keep]
        theta = self.theta_table()
        for name in self.param_names:
            t[name] = theta[name][map_id]
        return t

    @staticmethod
    def concatenate(batches):
        """Concatenate batches, padding source arrays to the largest ``n_max``."""
        n_max = max(b.flux.shape[1] for b in batches)
        out = {}
        for f in fields(batches[0]):
            vals = [getattr(b, f.name) for b in batches]
            if not isinstance(vals[0], torch.Tensor):
                out[f.name] = vals[0]
            elif f.name in ("maps", "theta"):
                out[f.name] = torch.cat(vals)
            else:
                out[f.name] = torch.cat([F.pad(v, (0, n_max - v.shape[1])) for v in vals])
        return SimulationBatch(**out)


class PointSourceModel:
    """Point-source population + sky geometry + instrument: the simulation model p(x, S, θ).

    θ = (N, σ_F, h): N sources with fluxes ``F ~ LogNormal(flux_mu, σ_F)`` and positions
    ``l ~ Normal(0, l_scale)``, ``b ~ Normal(0, h)`` (degrees). Sources outside the map add nothing.

    Parameters
    ----------
    geometry : `SkyGeometry`, optional
        Map grid and WCS; the paper's 128×128 Galactic CAR map over ±40° by default.
    instrument : `Instrument`, optional
        PSF, normalisation, exposure, background, noise; the paper's by default.
    prior : `~astrotrunc.priors.BoxPrior`, optional
        Prior of (N, sigma_F, h); the paper's by default.
    flux_mu : float
        Location of the log-normal flux distribution (``mu`` of ``log F``).
    l_scale : `~astropy.units.Quantity`
        Standard deviation of Galactic longitude.
    flux_unit : str or `~astropy.units.Unit`
        Unit of fluxes and of the data.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel
    >>> model = PointSourceModel.paper()
    >>> sims = model.simulate(4, seed=1)
    >>> sims.maps.shape, sims.theta.shape
    (torch.Size([4, 128, 128]), torch.Size([4, 3]))
    >>> bool((model.simulate(4, seed=1).maps == sims.maps).all())
    True
    """

    param_names = ("N", "sigma_F", "h")

    def __init__(self, geometry=None, instrument=None, prior=None, flux_mu=1.0,
                 l_scale=20 * u.deg, flux_unit=u.dimensionless_unscaled):
        self.geometry = geometry if geometry is not None else SkyGeometry.from_extent()
        self.instrument = instrument if instrument is not None else Instrument()
        self.prior = prior if prior is not None else self.paper_prior()
        if not isinstance(self.geometry, SkyGeometry):
            raise TypeError("geometry must be a SkyGeometry")
        if not isinstance(self.instrument, Instrument):
            raise TypeError("instrument must be an Instrument")
        if not isinstance(self.prior, BoxPrior) or self.prior.names != self.param_names:
            raise ValueError(f"prior must be a BoxPrior over {self.param_names}")
        if self.prior.components["N"].low < 0 or self.prior.components["sigma_F"].low <= 0 \
                or self.prior.components["h"].low <= 0:
            raise ValueError("priors need N >= 0, sigma_F > 0 and h > 0")
        self.flux_mu = float(flux_mu)
        self.l_scale = u.Quantity(l_scale, u.deg)
        self.flux_unit = u.Unit(flux_unit)
        for name in ("exposure", "background"):
            val = getattr(self.instrument, name)
            if np.ndim(val) == 2 and np.shape(val) != self.geometry.shape:
                raise ValueError(
                    f"{name} map has shape {np.shape(val)}, the map is {self.geometry.shape}"
                )
        self._psf = _PSFOperator(
            self.instrument, self.geometry.shape, self.geometry.pixel_scale.to_value(u.deg)
        )

    # -- configuration ---------------------------------------------------------------------
    @staticmethod
    def paper_prior() -> BoxPrior:
        """The paper's θ prior: N ~ U(10, 500) rounded down, σ_F ~ U(1, 3), h ~ U(1°, 20°)."""
        return BoxPrior(N=Uniform(10, 500, integer=True), sigma_F=Uniform(1, 3),
                        h=Uniform(1, 20, unit="deg"))

    @classmethod
    def paper(cls, **kwargs) -> "PointSourceModel":
        """The configuration of "Detection is truncation" (the docs' model table).

        Parameters
        ----------
        **kwargs
            Override the defaults (``geometry``, ``instrument``, ``prior``, ...).

        Returns
        -------
        `PointSourceModel`
        """
        return cls(**kwargs)

    @property
    def shape(self):
        """Map shape ``(ny, nx)``."""
        return self.geometry.shape

    @property
    def wcs(self) -> WCS:
        """The map WCS."""
        return self.geometry.wcs

    def __repr__(self):
        return (f"PointSourceModel(geometry={self.geometry!r}, instrument={self.instrument!r}, "
                f"prior={self.prior!r}, flux_mu={self.flux_mu}, l_scale={self.l_scale})")

    # -- sampling --------------------------------------------------------------------------
    def sample_population(self, n: int, seed=None, device=None) -> torch.Tensor:
        """θ ~ p(θ): ``(n, 3)`` tensor of (N, sigma_F, h)."""
        return self.prior.sample(n, generator=seed, device=device)

    def sample_sources(self, theta: torch.Tensor, generator=None):
        """Sources given θ, padded: ``flux, l, b, valid`` each ``(n, max N)``."""
        theta = torch.as_tensor(theta, dtype=torch.float32)
        gen = _as_generator(generator)
        counts = theta[:, 0].floor().long()
        n_max = max(int(counts.max()) if len(counts) else 0, 1)
        z = torch.randn(theta.shape[0], 3, n_max, generator=gen, device=theta.device)
        flux = torch.exp(self.flux_mu + theta[:, 1:2] * z[:, 0])
        lon = self.l_scale.to_value(u.deg) * z[:, 1]
        lat = theta[:, 2:3] * z[:, 2]
        valid = torch.arange(n_max, device=theta.device) < counts[:, None]
        return flux, lon, lat, valid

    def flux_log_density(self, flux, theta) -> torch.Tensor:
        """log p(F | θ) of single sources (flux in model units), broadcasting; float64."""
        flux = torch.as_tensor(flux, dtype=torch.float64)
        sig = torch.as_tensor(theta, dtype=torch.float64)[..., 1]
        logf = torch.log(flux)
        return (-0.5 * ((logf - self.flux_mu) / sig) ** 2 - torch.log(sig)
                - 0.5 * math.log(2 * math.pi) - logf)

    def position_log_density(self, l, b, theta) -> torch.Tensor:  # noqa: E741
        """log p(l, b | θ) of single sources (degrees, per square degree), broadcasting; float64."""
        l, b = (torch.as_tensor(a, dtype=torch.float64) for a in (l, b))  # noqa: E741
        h = torch.as_tensor(theta, dtype=torch.float64)[..., 2]
        lsc = self.l_scale.to_value(u.deg)
        lp_l = (-0.5 * (torch.remainder(l + 180, 360) - 180) ** 2 / lsc**2 - math.log(lsc)
                - 0.5 * math.log(2 * math.pi))
        return lp_l - 0.5 * (b / h) ** 2 - torch.log(h) - 0.5 * math.log(2 * math.pi)

    def source_log_density(self, flux, l, b, theta) -> torch.Tensor:  # noqa: E741
        """log p(F, l, b | θ) of single sources (flux in model units, l, b in degrees)."""
        return self.flux_log_density(flux, theta) + self.position_log_density(l, b, theta)

    def render(self, flux, x, y, mask) -> torch.Tensor:
        """Noiseless mean map ``(n, ny, nx)`` from sources at pixel positions (x, y).

        Fluxes are binned to the nearest pixel (sources outside the map add nothing), convolved
        with the PSF, multiplied by the normalisation, plus the background.
        """
        ny, nx = self.shape
        ix = torch.floor(x + 0.5).long()
        iy = torch.floor(y + 0.5).long()
        inside = mask & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        mu = self._psf.to(flux.device)(flux, iy, ix, inside) * self.instrument.normalization
        bkg = self.instrument.background
        if np.ndim(bkg) or bkg:
            mu = mu + torch.as_tensor(bkg, dtype=torch.float32, device=mu.device)
        return mu

    def observe(self, mu: torch.Tensor, generator=None) -> torch.Tensor:
        """Data from a mean map: ``Poisson(exposure · mu) / exposure``."""
        if self.instrument.noise is None:
            return mu
        expo = torch.as_tensor(self.instrument.exposure, dtype=torch.float32, device=mu.device)
        # one stream, whatever the number of threads: same seed, same maps (splitting it over
        # threads made the maps depend on torch.get_num_threads())
        return torch.poisson((mu * expo).clamp_min_(0), generator=generator).div_(expo)

    def _simulate_chunk(self, theta, generator, noise):
        flux, lon, lat, valid = self.sample_sources(theta, generator)
        x, y = self.geometry.world_to_pixel(lon, lat)
        ny, nx = self.shape
        in_map = valid & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        mu = self.render(flux, x, y, in_map)
        maps = self.observe(mu, generator) if noise else mu
        return SimulationBatch(maps, theta, flux, lon, lat, x, y, valid, in_map,
                               self.param_names, self.flux_unit.to_string())

    def iter_simulate(self, n: int, seed=None, *, theta=None, chunk_size=256, device=None,
                      noise=True, chunks=None):
        """Simulate ``n`` maps in chunks, yielding one `SimulationBatch` per chunk.

        Memory stays bounded by ``chunk_size`` whatever ``n``. Chunk ``k`` draws from a generator
        seeded by ``(seed, k)``, so the output depends only on ``seed`` and ``chunk_size``.
        ``seed`` is an integer or a sequence of integers (e.g. ``(seed, index)``). ``chunks``
        (indices of chunks, in the order wanted) simulates only those, e.g. one process's share.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"number of maps must be non-negative, got {n}")
        if theta is not None:
            theta = torch.as_tensor(theta, dtype=torch.float32, device=device)
            if theta.ndim != 2 or theta.shape != (n, len(self.param_names)):
                raise ValueError(
                    f"theta must have shape ({n}, {len(self.param_names)}), "
                    f"got {tuple(theta.shape)}"
                )
        root = np.random.SeedSequence(seed)
        n_chunks = -(-n // chunk_size)
        for k in range(n_chunks) if chunks is None else (int(c) for c in chunks):
            if not 0 <= k < n_chunks:
                raise ValueError(f"chunk {k} is not one of the {n_chunks} chunks")
            start, stop = k * chunk_size, min((k + 1) * chunk_size, n)
            state = np.random.SeedSequence(root.entropy, spawn_key=(k,))
            gen = torch.Generator(device=device or "cpu").manual_seed(
                int(state.generate_state(1, np.uint64)[0] >> 1)
            )
            th = (
                theta[start:stop]
                if theta is not None
                else self.prior.sample(stop - start, gen, device=device)
            )
            yield self._simulate_chunk(th, gen, noise)

    def simulate(self, n: int, seed=None, *, theta=None, chunk_size=256, device=None,
                 noise=True) -> SimulationBatch:
        """Simulate ``n`` maps: θ ~ prior (or the given ``theta``), sources, maps.

        Parameters
        ----------
        n : int
            Number of maps.
        seed : int, optional
            Same seed, same output (on a given device).
        theta : array-like, optional
            ``(n, 3)`` population parameters to use instead of prior draws.
        chunk_size : int
            Maps simulated at once.
        device : str or `torch.device`, optional
            Where to simulate (``"cpu"``, ``"cuda"``).
        noise : bool
            If `False`, return the noiseless mean maps.

        Returns
        -------
        `SimulationBatch`
        """
        batches = list(self.iter_simulate(n, seed, theta=theta, chunk_size=chunk_size,
                                          device=device, noise=noise))
        if not batches:
            raise ValueError("n must be at least 1")
        return batches[0] if len(batches) == 1 else SimulationBatch.concatenate(batches)

    def simulate_truncated(self, catalog, completeness, n: int, *, seed=None, theta=None,
                           chunk_size=256, segmentation=None, mask=None, flux_threshold=None,
                           device=None) -> SimulationBatch:
        """Simulate ``n`` maps from the truncated model of an observed catalog.

        θ ~ p(θ) restricted to N ≥ N_det; the N_det detected sources are drawn inside their
        detection regions from p(F, s | θ) S(F, s); the N − N_det others from
        p(F, s | θ) (1 − S(F, s)). See `~astrotrunc.truncation.TruncatedModel`, which this
        builds (build it once yourself to simulate repeatedly for the same catalog).

        Parameters
        ----------
        catalog : `~astropy.table.QTable` or `~astrotrunc.truncation.DetectedRegions`
            The observed catalog (from `~astrotrunc.find_sources`) or its regions.
        completeness : `~astrotrunc.CompletenessFunction`
            S(F, s) of the detector that made the catalog.
        n : int
            Number of maps.
        seed, theta, chunk_size, device
            As in `simulate`.
        segmentation : `~photutils.segmentation.SegmentationImage`, optional
            The catalog's regions (``find_sources(..., return_segmentation=True)``); without it,
            each region is a disk around the catalog position.
        mask : 2-D bool array, optional
            Pixels where nothing can be detected.
        flux_threshold : float, optional
            Also require F ≥ ``flux_threshold`` for detected sources (the paper's option).

        Returns
        -------
        `SimulationBatch`
            With ``detected`` marking the sources that stand for the catalog's detections.
        """
        from .truncation import DetectedRegions, TruncatedModel

        regions = (catalog if isinstance(catalog, DetectedRegions) else
                   DetectedRegions.from_catalog(catalog, self.shape, segmentation=segmentation,
                                                mask=mask))
        truncated = TruncatedModel(self, regions, completeness, flux_threshold=flux_threshold)
        return truncated.simulate(n, seed, theta=theta, chunk_size=chunk_size, device=device)

    def simulate_arrays(self, n: int, seed=None, max_sources=None) -> dict:
        """Simulate ``n`` maps as plain numpy arrays (for `~astrotrunc.store.SimulationStore`).

        Source arrays are padded to ``max_sources`` (the prior's upper bound of N by default) so
        that every chunk has the same shape.
        """
        sims = self.simulate(n, seed)
        n_max = int(max_sources or math.floor(self.prior.components["N"].high))
        pad = lambda a: F.pad(a, (0, n_max - a.shape[1]))[:, :n_max].cpu().numpy()  # noqa: E731
        out = {"theta": sims.theta.cpu().numpy(), "maps": sims.maps.cpu().numpy()}
        for k in ("flux", "l", "b", "x", "y"):
            out[k] = pad(sims.__dict__[k]).astype(np.float32)
        out["in_map"] = pad(sims.in_map)
        return out
