"""Read pickled ``.npy`` title maps without running arbitrary code.

The DEALRec / TransRec repositories ship their title maps as numpy object arrays, i.e. pickles, which
``np.load(allow_pickle=True)`` would execute blindly. Here the pickle is read by an unpickler that
resolves only the few numpy globals an object array needs; plain containers (dict, list, str, int,
float, ...) need no globals at all. Anything else is refused with an error naming the file.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path

import numpy as np

# (module, name) pairs a pickled numpy object array may reference.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class UnsafePickleError(ValueError):
    """The file's pickle references something other than numpy arrays and plain containers."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle '{module}.{name}' "
                "(only numpy arrays and plain containers are allowed)"
            )
        if module.startswith("numpy.core"):
            # numpy 2 moved numpy.core to numpy._core; pickles written by numpy 1 name the old path.
            try:
                module = module.replace("numpy.core", "numpy._core", 1)
                importlib.import_module(module)
            except ImportError:
                module = module.replace("numpy._core", "numpy.core", 1)
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed")


def load_npy_restricted(path: str | Path):
    """Load a ``.npy`` file; object arrays go through the restricted unpickler.

    A 0-d object array (how ``np.save`` stores a dict) is returned as the object itself.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f, max_header_size=1 << 20)
        except Exception as e:  # numpy parses the header with ast/tokenize: any error means a bad header
            raise ValueError(f"{path}: not a .npy file ({type(e).__name__}: {e})") from None
        if not dtype.hasobject:
            f.seek(0)
            try:
                return np.load(f, allow_pickle=False)
            except Exception as e:  # a truncated or corrupted array body
                raise ValueError(f"{path}: cannot read the array ({type(e).__name__}: {e})") from None
        try:
            arr = _RestrictedUnpickler(io.BufferedReader(f), str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # a truncated or corrupted pickle
            raise ValueError(f"{path}: cannot read the pickled array ({type(e).__name__}: {e})") from None
    if isinstance(arr, np.ndarray) and arr.shape == () and arr.dtype == object:
        return arr.item()
    return arr
