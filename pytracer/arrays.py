"""Array helpers the table, inventory and leak modules share."""

from __future__ import annotations

import mmap

import numpy as np

FIRST_ROWS = 16_384  # a Rows' first mapping, doubled as it fills


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


def among(keys: np.ndarray, cookies: np.ndarray) -> np.ndarray:
    """Which ``keys`` are among ``cookies``: a binary search when the
    cookies are sorted (a full scan's rows are; sort your own in place
    first), else ``isin``, which sorts both sides together (at 100k a side,
    ~5 MB of temporaries)."""
    if not is_sorted(cookies):
        return np.isin(keys, cookies)
    return find_sorted(cookies, keys)[1]


class Rows:
    """An array filled a part at a time (a sock_diag dump: a datagram at a
    time), in an anonymous mapping that starts at ``capacity`` rows and
    doubles in place (mremap: the kernel moves the pages, nothing is
    copied): the rows are held once (not the parts and their concatenation
    too), the kernel backs only the pages written, and the address space
    reserved is at most twice the rows (a host with strict overcommit
    accounting is charged for what can be used)."""

    def __init__(self, dtype: np.dtype, capacity: int = FIRST_ROWS) -> None:
        self._dtype = np.dtype(dtype)
        self._cap = max(1, capacity)
        self._mm: mmap.mmap | None = mmap.mmap(-1, self._cap * self._dtype.itemsize, flags=mmap.MAP_PRIVATE)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, part: np.ndarray) -> None:
        if self._mm is None:
            raise ValueError("Rows.append after take()")
        end = self._n + len(part)
        if end > self._cap:  # bounded by the callers' max_rows
            self._cap = max(end, 2 * self._cap)
            self._mm.resize(self._cap * self._dtype.itemsize)  # no view of the mapping is alive here
        view = np.frombuffer(self._mm, self._dtype, count=end)
        view[self._n : end] = part
        del view
        self._n = end

    def truncate(self, n: int) -> None:
        self._n = min(self._n, n)

    def take(self) -> np.ndarray:
        """The rows (a view that keeps the mapping); the object is empty after."""
        out = np.frombuffer(self._mm, self._dtype, count=self._n) if self._mm is not None else \
            np.zeros(0, self._dtype)
        self._mm, self._n, self._cap = None, 0, 0
        return out
