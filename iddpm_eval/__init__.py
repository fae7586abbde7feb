"""Measuring side of iddpm: FID, precision/recall, bits/dim, scaling fits, results tables."""

from iddpm_core import __version__

__all__ = ["__version__"]
