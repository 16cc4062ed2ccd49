"""When a parallel kernel may run: fork- and thread-safety on every numba threading layer.

numba starts its worker pool with the first parallel kernel, on the first layer that loads
of TBB, OpenMP and its own ``workqueue`` (``NUMBA_THREADING_LAYER`` overrides that order).
Two hazards follow, and both are handled here rather than by requiring one layer:

* **fork**: a child forked after GNU OpenMP's pool started is killed in its first parallel
  region ("fork() called from a process already using GNU OpenMP"), whatever its thread
  count; a fork ``multiprocessing.Pool`` then never returns and torch ``DataLoader`` workers
  die. A child forked after the pool started therefore runs the serial twins, on any layer.
* **threads**: ``workqueue`` aborts the process when two threads enter parallel regions at
  once. One thread at a time runs a parallel kernel; a thread that finds it busy runs the
  serial twin instead of waiting (the other thread already uses the cores).

The twins compute the same bits (the kernels' results never depend on the thread count),
so which one runs changes the time only. TBB as a dependency would make both hazards
numba's, but its wheels exist for x86-64 Linux and Windows only; this module works
wherever numba does.
"""

from __future__ import annotations

import os
import threading

import numba.np.ufunc.parallel

_busy = threading.Lock()  # held while this process runs a parallel kernel
_serial_only = False  # set in a child forked after the pool started


def _pool_started() -> bool:
    # numba records in this module global whether it has launched its layer's workers;
    # without it (a future numba), assume it has: the child then runs serially, which is safe.
    return bool(getattr(numba.np.ufunc.parallel, "_is_initialized", True))


def _after_fork_in_child() -> None:
    global _busy, _serial_only
    _busy = threading.Lock()  # a parent thread may have held it at the fork
    _serial_only = _serial_only or _pool_started()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Guarded:
    """A parallel numba kernel that runs its serial twin (``.serial``) where the parallel
    one is unsafe: in a forked child, or while another thread runs a parallel kernel."""

    def __init__(self, parallel, serial) -> None:
        self.parallel = parallel
        self.serial = serial
        self.__name__ = getattr(parallel, "__name__", "kernel")
        self.__doc__ = getattr(parallel, "__doc__", None)

    def __call__(self, *args):
        if _serial_only or not _busy.acquire(blocking=False):
            return self.serial(*args)
        try:
            return self.parallel(*args)
        finally:
            _busy.release()
