"""Array helpers the table, inventory and leak modules share."""

from __future__ import annotations

import numpy as np


def fields_of(dtype: np.dtype, names: tuple[str, ...] | list[str], align: bool = False) -> np.dtype:
    """A structured dtype of some of ``dtype``'s fields, in ``names``' order
    (a whole array of it takes them by position: ``out[:] = a[list(names)]``)."""
    return np.dtype([(n, dtype.fields[n][0]) for n in names], align=align)


def is_sorted(a: np.ndarray) -> bool:
    """Ascending (ties allowed)."""
    return len(a) < 2 or bool(np.all(a[1:] >= a[:-1]))


def find_sorted(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``wanted``: its position in the ascending ``keys`` (clamped
    to a valid index; 0 when ``keys`` is empty) and whether it is there."""
    wanted = np.asarray(wanted)
    if not len(keys):
        return np.zeros(len(wanted), np.intp), np.zeros(len(wanted), bool)
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return pos, keys[pos] == wanted
