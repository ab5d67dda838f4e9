"""Warnings and exceptions raised by astrotrunc."""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = ["AstrotruncWarning", "LowEffectiveSampleSizeWarning", "NoWCSWarning"]


class AstrotruncWarning(AstropyUserWarning):
    """Base class of every warning issued by astrotrunc."""


class NoWCSWarning(AstrotruncWarning):
    """A map has no usable WCS; pixel coordinates are used instead."""


class LowEffectiveSampleSizeWarning(AstrotruncWarning):
    """Importance weights are so uneven that the effective sample size is small."""
