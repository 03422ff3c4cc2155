"""Declares the Cython extensions; all metadata lives in pyproject.toml."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("multitables._engine._ringbuf", ["multitables/_engine/_ringbuf.pyx"]),
    Extension(
        "multitables._engine._lent",
        ["multitables/_engine/_lent.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._keys._selection",
        ["multitables/_keys/_selection.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._keys._indexsets",
        ["multitables/_keys/_indexsets.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._keys._keyitems",
        ["multitables/_keys/_keyitems.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._keys._plan",
        ["multitables/_keys/_plan.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._keys._indexing",
        ["multitables/_keys/_indexing.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._hdf5._rows",
        ["multitables/_hdf5/_rows.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
    Extension(
        "multitables._hdf5._vlen",
        ["multitables/_hdf5/_vlen.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    ),
]

setup(ext_modules=cythonize(extensions, language_level=3))
