"""The fast decode path's public counters: ``fallbacks`` counts, per process, the reads that went to
HDF5's own filter pipeline instead, by reason."""

from ._hdf5.fallback import fallbacks

__all__ = ["fallbacks"]
