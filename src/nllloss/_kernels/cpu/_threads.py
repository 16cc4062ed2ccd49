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

**waiting**: an OpenMP runtime's idle workers spin after each parallel region before they
sleep (GNU OpenMP: 300,000 spins, 8 ms of a core on the machine we measure on; Intel's
and LLVM's: 200 ms). Where other work wants the cores -- another process, torch's own
OpenMP threads in a training loop, the caller's next Python statement -- the spinning
workers take cores from it, and the scheduler then counts them as CPU hogs, so they are
the last to run when the next region needs them: a region of two elements took 32 ms
(median of 200) on 2 cores shared with other jobs, 0.03 ms with sleeping workers. Before
numba starts its pool, the library therefore asks for sleeping workers
(``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy (``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``), and restores the environment at once: the runtime
reads it when it loads, so the setting reaches numba's OpenMP runtime only. (If torch is
imported after the pool started, torch uses the same GNU OpenMP runtime and its workers
sleep too; torch imported first brings its own runtime, which keeps its own policy.)

**when threads pay**: whether a parallel region beats one thread depends on the machine
and on what else runs on it. On 2 cores shared with other jobs (load average 16), writing a
(1048576, 10) gradient took 7.6 ms on two threads and 1.9 ms on one (medians of 40 calls,
sleeping workers; 32 ms on two threads with spinning ones), because a region ends only
when its slowest thread has run, and a descheduled thread waits milliseconds for a core.
numba's ``parallel_chunksize`` does not help: only its TBB layer hands chunks out as
threads free up; OpenMP and ``workqueue`` split them between the threads in advance.
No constant fits both, so each kernel times itself: per size class (work within a factor
of 2), the twin with the lower median time per element over its last three calls runs;
while one thread wins, the threads are tried again after 1, 4, 16, ... calls (at most
``PROBE_MAX``), so that a machine that quiets down gets its threads back. Below
``PARALLEL_MIN`` elements of work, one thread always runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Hashable
from typing import Any

from ... import _validate

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


# Below this many elements of work, kernels run on one thread without timing themselves: a
# parallel region costs 0.03 ms to start with sleeping workers on 2 cores (median of 200,
# two-element region, loaded machine), and 1 << 16 elements written take about as long.
PARALLEL_MIN = 1 << 16
# Most calls between two tries of the threads while one thread has been faster.
PROBE_MAX = 256
_PROBE_GROWTH = 4
_KEPT = 3  # timings kept per twin and size class: their median decides

# Kernel calls of the process by twin that ran (parallel, serial), for the benchmarks.
runs = {"parallel": 0, "serial": 0}

_USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _start_pool() -> None:
    """Start numba's threading layer with sleeping idle workers (see the module's
    docstring), unless the user set a wait policy or the pool runs already; the
    environment is restored after."""
    if _pool_started() or any(name in os.environ for name in _USER_WAIT_SETTINGS):
        return
    try:
        from numba.np.ufunc.parallel import _launch_threads
    except ImportError:  # a future numba: it starts its pool itself, with its defaults
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        _launch_threads()
    finally:
        del os.environ["OMP_WAIT_POLICY"]


class Pace:
    """The recent timings (seconds per element) of work run on threads and on one thread in
    one size class (a kernel's two twins, a block of the loss from hidden states), and when
    to try the losing threads again."""

    __slots__ = ("interval", "parallel", "serial", "wait")

    def __init__(self) -> None:
        self.parallel: list[float] = []
        self.serial: list[float] = []
        self.wait = 0  # calls left before the threads are tried again
        self.interval = 1

    def use_threads(self) -> bool:
        if not self.parallel:
            return True
        if not self.serial:
            return False
        if _median(self.parallel) <= _median(self.serial):
            return True
        if self.wait > 0:
            self.wait -= 1
            return False
        return True  # a try of the threads

    def record(self, parallel: bool, seconds_per_element: float) -> None:
        if parallel and self.serial and _median(self.parallel) > _median(self.serial):
            self.parallel.clear()  # a try of the losing threads: older timings are stale
        kept = self.parallel if parallel else self.serial
        kept.append(seconds_per_element)
        del kept[:-_KEPT]
        if not parallel or not self.serial:
            return
        if _median(self.parallel) <= _median(self.serial):
            self.interval = 1
        else:  # the threads lost (again): try them less often
            self.wait = self.interval
            self.interval = min(self.interval * _PROBE_GROWTH, PROBE_MAX)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class Guarded:
    """A parallel numba kernel that runs its serial twin (``.serial``) where the parallel
    one is unsafe: in a forked child, or while another thread runs a parallel kernel; and,
    called through ``run``, where one thread has lately been as fast."""

    def __init__(self, parallel, serial) -> None:
        import numba  # the kernels are numba's: it is loaded

        self.parallel = parallel
        self.serial = serial
        self.__name__ = getattr(parallel, "__name__", "kernel")
        self.__doc__ = getattr(parallel, "__doc__", None)
        self._numba = numba
        self._paces: dict[tuple[int, Hashable], Pace] = {}
        self._one_thread = numba.config.NUMBA_NUM_THREADS == 1

    def run(self, work: int, variant: Hashable, *args: Any):
        """The kernel on ``args``, ``work`` elements: the twin that has been faster lately
        for work of this size and ``variant`` (calls of one kernel whose cost per element
        differs, e.g. with and without a gradient, are timed apart). One thread below
        ``PARALLEL_MIN`` or with one thread set."""
        if work < PARALLEL_MIN or _serial_only or _requested == 1 or self._one_thread:
            runs["serial"] += 1
            return self.serial(*args)
        key = (work.bit_length(), variant)
        pace = self._paces.get(key)
        if pace is None:
            pace = self._paces[key] = Pace()
        threads = pace.use_threads()
        compiled = self._compiled()
        start = time.perf_counter()
        if threads:
            ran_parallel, result = self._parallel_if_safe(args)
        else:
            ran_parallel, result = False, self.serial(*args)
        seconds = time.perf_counter() - start
        # Not timed: a serial run forced by another thread's kernel, or a first call of
        # these argument types (compiled or loaded from numba's cache in the call).
        if ran_parallel == threads and compiled == self._compiled():
            pace.record(threads, seconds / work)
        runs["parallel" if ran_parallel else "serial"] += 1
        return result

    def __call__(self, *args: Any):
        return self._parallel_if_safe(args)[1]

    def _compiled(self) -> int:
        """How many argument types the twins have machine code for (numba's dispatchers)."""
        return len(getattr(self.parallel, "overloads", ())) + len(
            getattr(self.serial, "overloads", ())
        )

    def _parallel_if_safe(self, args) -> tuple[bool, Any]:
        """(whether the parallel kernel ran, the result)."""
        if _serial_only or not _busy.acquire(blocking=False):
            return False, self.serial(*args)
        try:
            _start_pool()
            requested = _requested
            if requested is None:
                return True, self.parallel(*args)
            # numba's count is the calling thread's: the process's count for this kernel
            own = self._numba.get_num_threads()
            self._numba.set_num_threads(requested)
            try:
                return True, self.parallel(*args)
            finally:
                self._numba.set_num_threads(own)
        finally:
            _busy.release()
