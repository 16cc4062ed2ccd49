"""The compiled kernels under fork and threads, on every numba threading layer that loads here.

Each layer runs in its own subprocess (numba picks its layer once per process): the parent
of the probes first runs parallel kernels (the pool starts), then computes the same losses
and gradients in a forked child, a fork ``multiprocessing.Pool``, torch ``DataLoader``
workers and 8 concurrent threads. Without ``nllloss._kernels.cpu._threads``, GNU OpenMP
kills the forked child (and hangs the pool), and ``workqueue`` aborts the process under the
threads. Every result must equal torch's, computed here in the test process.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).parents[1]
TIMEOUT = 240  # seconds for one layer's probes; a hang fails instead

# Large enough for the parallel kernels (``_kernels.cpu._threads.PARALLEL_MIN`` elements and
# beyond).
N, C = 70_000, 4

PROBES = textwrap.dedent(
    """
    import multiprocessing, os, sys, threading
    import numpy as np
    import numba
    import nllloss

    folder = sys.argv[1]
    x, t = np.load(f"{folder}/x.npy"), np.load(f"{folder}/t.npy")
    expected = {name: np.load(f"{folder}/{name}.npy") for name in ("none", "mean", "grad")}


    def check(label):
        got = {
            "none": nllloss.nll_loss(x, t, reduction="none"),
            "mean": nllloss.nll_loss(x, t),
            "grad": nllloss.nll_loss_backward(1.0, x, t, reduction="sum"),
        }
        for name, value in got.items():
            if not np.array_equal(value, expected[name]):
                raise AssertionError(f"{label}: {name} differs from torch's")
        return label


    check("parent")  # the pool starts here
    print("layer", numba.threading_layer(), flush=True)

    pid = os.fork()
    if pid == 0:
        try:
            check("fork")
        except BaseException as error:
            print(error, flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"forked child: status {status}"
    print("fork ok", flush=True)

    with multiprocessing.get_context("fork").Pool(2) as pool:
        labels = pool.map_async(check, [f"pool {i}" for i in range(4)]).get(timeout=60)
    assert len(labels) == 4
    print("pool ok", flush=True)

    import torch.utils.data

    class Losses(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return check(f"worker item {i}")

    loader = torch.utils.data.DataLoader(
        Losses(), num_workers=2, batch_size=None, multiprocessing_context="fork", timeout=60
    )
    assert len(list(loader)) == 4
    print("dataloader ok", flush=True)

    errors = []

    def calls(i):
        try:
            for k in range(5):
                check(f"thread {i} call {k}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    print("threads ok", flush=True)
    """
)


def _layer_environment(layer: str) -> dict[str, str]:
    """A child's environment that selects ``layer``. pip installs TBB's library in the
    environment's ``lib/``, where numba does not look: it goes on the loader's path, as a
    user of the pip package puts it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "NUMBA_THREADING_LAYER": layer,
        "NUMBA_NUM_THREADS": "2",
    }
    env.pop("NLLLOSS_DISABLE_NUMBA", None)
    library_paths = [str(Path(sys.prefix) / "lib"), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, library_paths))
    return env


def _layer_loads(layer: str) -> bool:
    """Whether numba can load ``layer`` here."""
    module = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}[layer]
    code = f"import numba.np.ufunc.{module}"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, env=_layer_environment(layer)
    )
    return done.returncode == 0


def _tbb_installed() -> bool:
    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Log-probabilities, targets (some ignored) and torch's loss and gradient, as files."""
    folder = tmp_path_factory.mktemp("threads")
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((N, C)).astype(np.float32)).log_softmax(1)
    t = torch.from_numpy(rng.integers(0, C, N))
    t[torch.from_numpy(rng.random(N) < 0.1)] = -100
    grad_x = x.clone().requires_grad_()
    F.nll_loss(grad_x, t, reduction="sum").backward()
    arrays = {
        "x": x.numpy(),
        "t": t.numpy(),
        "none": F.nll_loss(x, t, reduction="none").numpy(),
        "mean": F.nll_loss(x, t).numpy(),
        "grad": grad_x.grad.numpy(),
    }
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return folder


@pytest.fixture
def numpy_engine():
    """Overrides conftest's two-engine fixture: the probes exercise the compiled kernels."""
    return "compiled"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX's")
@pytest.mark.parametrize("layer", ["omp", "workqueue", "tbb"])
def test_fork_pool_dataloader_and_threads_on_each_layer(layer, inputs):
    if layer == "tbb" and not _tbb_installed():  # the test extra installs it on x86-64
        pytest.skip("the tbb package has no wheel for this machine")
    assert _layer_loads(layer), f"numba's {layer} threading layer does not load"
    env = _layer_environment(layer)
    done = subprocess.run(
        [sys.executable, "-c", PROBES, str(inputs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines == [f"layer {layer}", "fork ok", "pool ok", "dataloader ok", "threads ok"]


# set_num_threads: one count for the process, with or without numba -----------------------

PROCESS_WIDE = textwrap.dedent(
    """
    import threading
    import numba
    import numpy as np
    import nllloss
    from nllloss._kernels.cpu import _threads

    # What a parallel kernel's region would use: numba's count in the calling thread.
    probe = _threads.Guarded(numba.get_num_threads, lambda: "serial")
    x = np.log(np.full((70_000, 4), 0.25, np.float32))
    t = np.arange(70_000) % 4
    before = nllloss.nll_loss_backward(1.0, x, t, reduction="sum")  # 2 threads, main thread

    nllloss.set_num_threads(1)
    seen = {}

    def in_a_thread():
        seen["kernel"] = probe()
        seen["own"] = numba.get_num_threads()  # the thread's numba count, left as it was
        seen["grad"] = nllloss.nll_loss_backward(1.0, x, t, reduction="sum")

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    print(seen["kernel"], seen["own"], probe(), numba.get_num_threads())
    print(np.array_equal(seen["grad"], before))
    """
)


def test_set_num_threads_holds_in_every_thread():
    """After set_num_threads(1) on the main thread, a kernel called from another thread
    runs with 1 thread too (numba's own count is per thread), the threads' numba counts
    are left at NUMBA_NUM_THREADS, and the gradient has the same bits."""
    env = {**_layer_environment("workqueue"), "NUMBA_NUM_THREADS": "2"}
    env.pop("NUMBA_THREADING_LAYER")
    done = subprocess.run(
        [sys.executable, "-c", PROCESS_WIDE],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["1 2 1 2", "True"]


WITHOUT_NUMBA = textwrap.dedent(
    """
    import sys
    sys.modules["numba"] = None  # as if numba were not installed: its import fails
    import numpy as np
    import nllloss

    nllloss.set_num_threads(3)
    for bad in (0, 1.5):
        try:
            nllloss.set_num_threads(bad)
        except (TypeError, ValueError) as error:
            print(type(error).__name__, error)
    print(nllloss.nll_loss(np.log(np.array([[0.5, 0.5]])), np.array([1])))
    """
)


def test_set_num_threads_without_numba_checks_and_records():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", WITHOUT_NUMBA], capture_output=True, text=True,
        env=env, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "ValueError n must be 1 or more, got 0",
        "TypeError n must be an int, not float",
        "0.6931471805599453",
    ]


# When threads pay: each kernel times its two twins -------------------------------------


def test_pace_tries_threads_then_one_thread_then_keeps_the_faster():
    from nllloss._kernels.cpu._threads import Pace

    pace = Pace()
    assert pace.use_threads()  # nothing timed: the threads first
    pace.record(True, 1.0)
    assert not pace.use_threads()  # then one thread, once
    pace.record(False, 2.0)
    for _ in range(5):  # the threads were faster: they keep running
        assert pace.use_threads()
        pace.record(True, 1.0)


def test_pace_retries_losing_threads_ever_less_often():
    """While one thread wins, the threads are tried after 1, 4, 16, ... calls, at most
    PROBE_MAX; a try that wins brings them back at once."""
    from nllloss._kernels.cpu._threads import PROBE_MAX, Pace

    pace = Pace()
    pace.record(True, 5.0)
    pace.record(False, 1.0)
    waits = []
    for _ in range(7):
        calls = 0
        while not pace.use_threads():
            calls += 1
        waits.append(calls)
        pace.record(True, 5.0)  # the try loses
    assert waits == [0, 1, 4, 16, 64, 256, 256]
    assert PROBE_MAX == 256
    while not pace.use_threads():
        pass
    pace.record(True, 0.5)  # the machine quieted down: this try wins
    assert pace.use_threads()
    assert pace.use_threads()


def test_pace_ignores_one_slow_call():
    """The median of the last three timings decides: one slow call (a page fault, a
    preemption) does not hand the kernel to one thread."""
    from nllloss._kernels.cpu._threads import Pace

    pace = Pace()
    pace.record(True, 1.0)
    pace.record(False, 2.0)
    for seconds in (1.0, 1.0, 50.0):
        assert pace.use_threads()
        pace.record(True, seconds)
    assert pace.use_threads()


RUN_CHOICES = textwrap.dedent(
    """
    import numpy as np
    import nllloss
    from nllloss._kernels.cpu import _threads

    x = np.log(np.full((70_000, 4), 0.25, np.float32))
    t = np.arange(70_000) % 4
    small = (x[:100], t[:100])

    def runs(call):
        before = dict(_threads.runs)
        call()
        return {k: _threads.runs[k] - before[k] for k in before}

    print(runs(lambda: nllloss.nll_loss(x, t, reduction="none")))  # threads tried first
    print(runs(lambda: nllloss.nll_loss(*small, reduction="none")))  # below PARALLEL_MIN
    nllloss.set_num_threads(1)
    print(runs(lambda: nllloss.nll_loss(x, t, reduction="none")))  # one thread asked for
    """
)


def test_small_work_and_one_thread_never_start_threads():
    done = subprocess.run(
        [sys.executable, "-c", RUN_CHOICES], capture_output=True, text=True,
        env=_layer_environment("workqueue"), timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "{'parallel': 1, 'serial': 0}",
        "{'parallel': 0, 'serial': 1}",
        "{'parallel': 0, 'serial': 1}",
    ]


# How idle workers wait: sleeping, unless the user chose --------------------------------

WAIT_POLICY = textwrap.dedent(
    """
    import os
    import numpy as np
    import nllloss

    x = np.log(np.full((70_000, 4), 0.25, np.float32))
    nllloss.nll_loss(x, np.arange(70_000) % 4, reduction="none")  # the pool starts
    print("OMP_WAIT_POLICY" in os.environ)
    """
)


@pytest.mark.parametrize(
    ("user", "shown"),
    [
        ({}, "OMP_WAIT_POLICY = 'PASSIVE'"),
        ({"GOMP_SPINCOUNT": "1000"}, "GOMP_SPINCOUNT = '1000'"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY = 'ACTIVE'"),
    ],
)
def test_openmp_workers_sleep_unless_the_user_chose(user, shown):
    """GNU OpenMP shows the policy it read at load (OMP_DISPLAY_ENV): the library's
    PASSIVE, or the user's own setting untouched; the environment is left as it was."""
    if not _layer_loads("omp"):
        pytest.skip("numba's OpenMP layer does not load here")
    env = {**_layer_environment("omp"), "OMP_DISPLAY_ENV": "VERBOSE", **user}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        if name not in user:
            env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", WAIT_POLICY], capture_output=True, text=True, env=env,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    if "GNU" not in _openmp_vendor(env):
        pytest.skip("numba's OpenMP runtime here is not GNU's")
    assert shown in done.stderr, done.stderr
    assert done.stdout.split() == [str("OMP_WAIT_POLICY" in user)]


def _openmp_vendor(env) -> str:
    code = "import numba.np.ufunc.omppool as o; print(o.openmp_vendor)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    return done.stdout


# The same bits on threads and on one thread ---------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"softcap": 30.0},
        {"softcap": 1e39},  # float32 input: the cap in float64
        {"softcap": 0.5, "label_smoothing": 0.1, "z_loss": 1e-3},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "plain",
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(20_000, 10), (2, 5, 40_000)], ids=["rows", "tiles"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_from_logits_kernels_give_the_same_bits_on_threads_and_one_thread(
    monkeypatch, options, dtype, shape, probabilities
):
    import nllloss
    from nllloss._kernels.cpu import _threads

    rng = np.random.default_rng(3)
    x = (4 * rng.standard_normal(shape)).astype(dtype)
    if probabilities:
        t = rng.random(shape).astype(dtype)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, shape[1], (shape[0], *shape[2:]))
        t.reshape(-1)[::13] = -100

    def results():
        return [
            nllloss.nll_loss_and_grad(x, t, from_logits=True, reduction=reduction, **options)
            for reduction in ("mean", "none")
        ]

    monkeypatch.setattr(_threads, "_requested", _threads._requested)  # restored after
    monkeypatch.setattr(_threads.Pace, "use_threads", lambda self: True)
    before = _threads.runs["parallel"]
    on_threads = results()
    assert _threads.runs["parallel"] > before  # the threads' kernel ran
    nllloss.set_num_threads(1)
    on_one_thread = results()
    for (loss, grad), (loss_1, grad_1) in zip(on_threads, on_one_thread, strict=True):
        assert loss.tobytes() == loss_1.tobytes()
        assert grad.tobytes() == grad_1.tobytes()
