"""Warnings and exceptions raised by astrotrunc.

Errors are the built-in `ValueError` (bad values, incompatible files), `TypeError` (wrong kind of
object) and `OSError` (missing, unreadable or existing files); warnings derive from
`AstrotruncWarning`.
"""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = ["AstrotruncWarning", "LowEffectiveSampleSizeWarning", "NoWCSWarning",
           "OutOfDomainWarning"]


class AstrotruncWarning(AstropyUserWarning):
    """Base class of every warning issued by astrotrunc."""


class NoWCSWarning(AstrotruncWarning):
    """A map has no usable WCS; pixel coordinates are used instead."""


class LowEffectiveSampleSizeWarning(AstrotruncWarning):
    """Importance weights are so uneven that the effective sample size is small."""


class OutOfDomainWarning(AstrotruncWarning):
    """A map is unlike the maps a trained network saw (instrument, units or statistics).

    The network's output on it is an extrapolation: a catalog may miss sources or hold spurious
    ones. Retrain the detector for that instrument (see the "Training a detector for your
    instrument" section of the detection documentation).
    """
