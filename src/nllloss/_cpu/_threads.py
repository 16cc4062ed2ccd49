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

**thread count**: numba's ``set_num_threads`` holds one count per calling thread, so a count
set on the main thread would not reach kernels called from a data-loading thread or a
thread pool. ``set_num_threads`` here records one count for the process, and the launcher
applies it, in whichever thread calls, around each parallel kernel (then restores the
thread's own numba count, which the caller's numba code may use). It needs no numba: it
records the count that the kernels, when they load, will use.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from .. import _validate

_busy = threading.Lock()  # held while this process runs a parallel kernel
_serial_only = False  # set in a child forked after the pool started
_requested: int | None = None  # set_num_threads's count; None: numba's (NUMBA_NUM_THREADS)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the compiled kernels, whichever thread calls them (at most
    ``NUMBA_NUM_THREADS``, the default, all cores).

    The count holds for the whole process (numba's own ``set_num_threads`` holds for the
    thread that calls it only) and leaves the threads' numba count, used by other numba
    code, as it is. Results do not depend on it: the kernels' summation order is fixed.
    Without numba, the count is checked and recorded, and the generic path (which runs
    no threads of its own) ignores it.

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n`` is below 1, or above ``NUMBA_NUM_THREADS``.
    """
    global _requested
    try:
        import numba
    except ImportError:
        limit = None  # no kernels to run: any count of 1 or more is recorded
    else:
        limit = numba.config.NUMBA_NUM_THREADS
    _requested = _validate.check_num_threads(n, limit)


def _pool_started() -> bool:
    # numba records in this module global whether it has launched its layer's workers;
    # without it (a future numba), assume it has: the child then runs serially, which is safe.
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return parallel is not None and bool(getattr(parallel, "_is_initialized", True))


def _after_fork_in_child() -> None:
    global _busy, _serial_only
    _busy = threading.Lock()  # a parent thread may have held it at the fork
    _serial_only = _serial_only or _pool_started()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Guarded:
    """A parallel numba kernel that runs its serial twin (``.serial``) where the parallel
    one is unsafe: in a forked child, or while another thread runs a parallel kernel."""

    def __init__(self, parallel, serial) -> None:
        import numba  # the kernels are numba's: it is loaded

        self.parallel = parallel
        self.serial = serial
        self.__name__ = getattr(parallel, "__name__", "kernel")
        self.__doc__ = getattr(parallel, "__doc__", None)
        self._numba = numba

    def __call__(self, *args: Any):
        if _serial_only or not _busy.acquire(blocking=False):
            return self.serial(*args)
        try:
            requested = _requested
            if requested is None:
                return self.parallel(*args)
            # numba's count is the calling thread's: the process's count for this kernel
            own = self._numba.get_num_threads()
            self._numba.set_num_threads(requested)
            try:
                return self.parallel(*args)
            finally:
                self._numba.set_num_threads(own)
        finally:
            _busy.release()
