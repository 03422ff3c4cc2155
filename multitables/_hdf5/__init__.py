"""The HDF5 read paths (internal): datasets described in the caller, and read by workers past
HDF5's per-element path where the results are identical."""
