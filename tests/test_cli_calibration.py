"""``nllloss eval --calibration``: every figure against an independent computation.

torchmetrics (``MulticlassCalibrationError``, ``MulticlassAccuracy``), scikit-learn
(``log_loss``) and float64 NumPy written here, on files the tests write: 2-D and K-dim
predictions, ignored targets, several blocks, and on Dask.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_bitwise
from sklearn.metrics import log_loss
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from nllloss._cli import main

IGNORE = -100
once = pytest.mark.parametrize("numpy_engine", ["compiled"], indirect=True)


def report(argv, capsys) -> dict:
    code = main([str(a) for a in [*argv, "--format", "json", "--quiet"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Logits (2-D and (N, C, 3, 2)) of a miscalibrated model, log-probabilities, targets with
    ignored elements; ``arrays`` holds each as elements: scores (M, C) float64 and targets."""
    rng = np.random.default_rng(11)
    folder = tmp_path_factory.mktemp("calibration")
    n, c = 400, 7
    out = {"folder": folder, "classes": c}
    for name, shape in (("flat", (n,)), ("spatial", (60, 3, 2))):
        t = rng.integers(0, c, shape)
        # overconfident: the true class gets a bump, everything is scaled up
        scores = rng.standard_normal((*shape, c)) + 1.5 * np.eye(c)[t]
        logits = (2.5 * scores).astype(np.float32)
        t[rng.random(shape) < 0.1] = IGNORE
        x = np.moveaxis(logits, -1, 1)  # (N, C, ...)
        np.save(folder / f"{name}.npy", x)
        np.save(folder / f"{name}_t.npy", t)
        log_probs = torch.from_numpy(x).log_softmax(1).numpy()
        np.save(folder / f"{name}_lp.npy", log_probs)
        keep = t.reshape(-1) != IGNORE
        z = logits.reshape(-1, c).astype(np.float64)
        out[name] = dict(
            z=z[keep],
            lp=np.moveaxis(log_probs, 1, -1).reshape(-1, c).astype(np.float64)[keep],
            y=t.reshape(-1)[keep],
            position=np.flatnonzero(keep),
        )
    return out


def softmax(z, temperature=1.0):
    z = z / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fitted_temperature(z, y) -> float:
    """The minimiser of the mean NLL of softmax(z / T), by bisection on the derivative in
    beta = 1/T (float64)."""

    masked = np.where(np.isinf(z), 0.0, z)  # a -inf score has p = 0: it adds 0

    def slope(beta):
        p = softmax(z * beta)
        return np.mean((p * masked).sum(1) - z[np.arange(len(y)), y])

    low, high = 1e-3, 1e3
    for _ in range(200):
        mid = np.sqrt(low * high)
        low, high = (mid, high) if slope(mid) < 0 else (low, mid)
    return 1 / np.sqrt(low * high)


def ece(p, y, bins, norm="l1"):
    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=bins, norm=norm)
    return float(metric(torch.from_numpy(p), torch.from_numpy(y)))


@once
@pytest.mark.parametrize("name", ["flat", "spatial"])
@pytest.mark.parametrize("logits", [True, False])
def test_every_figure_against_torchmetrics_sklearn_and_numpy(files, name, logits, capsys):
    elements = files[name]
    z, y, c = elements["z" if logits else "lp"], elements["y"], files["classes"]
    pred = files["folder"] / f"{name}{'' if logits else '_lp'}.npy"
    argv = ["eval", pred, files["folder"] / f"{name}_t.npy", "--calibration", "--bins", 10]
    argv += ["--top-k", "2,3", "--from-logits"] if logits else ["--top-k", "2,3"]
    result = report(argv, capsys)
    section = result["calibration"]
    p = softmax(z) if logits else np.exp(z)
    assert section["count"] == len(y) == result["count"]
    for k, key in ((1, "accuracy"), (2, "top_k_accuracy"), (3, "top_k_accuracy")):
        metric = MulticlassAccuracy(num_classes=c, top_k=k, average="micro")
        expected = float(metric(torch.from_numpy(p), torch.from_numpy(y)))
        value = section[key] if k == 1 else section[key][str(k)]
        assert value == pytest.approx(expected, rel=1e-7)  # torchmetrics gives float32
    brier = np.mean(((p - np.eye(c)[y]) ** 2).sum(1))
    assert section["brier"] == pytest.approx(brier, rel=1e-9)
    assert section["ece"] == pytest.approx(ece(p, y, 10), rel=1e-5)  # in float32
    assert section["mce"] == pytest.approx(ece(p, y, 10, "max"), rel=1e-5)
    # the bins, by NumPy
    confidence, correct = p.max(1), p.argmax(1) == y
    index = np.minimum((confidence * 10).astype(int), 9)
    for b, row in enumerate(section["bins"]):
        assert (row["lower"], row["upper"]) == pytest.approx((b / 10, (b + 1) / 10))
        assert row["count"] == np.count_nonzero(index == b)
        if row["count"]:
            assert row["confidence"] == pytest.approx(confidence[index == b].mean(), rel=1e-9)
            assert row["accuracy"] == pytest.approx(correct[index == b].mean(), rel=1e-12)
        else:
            assert row["confidence"] is row["accuracy"] is None
    # the temperature: a bisection's minimiser; the loss and ECE at the reported T
    temperature = section["temperature"]
    assert temperature == pytest.approx(fitted_temperature(z, y), rel=1e-4)
    at_t = softmax(z, temperature)
    expected = log_loss(y, at_t, labels=range(c))
    assert section["loss_at_temperature"] == pytest.approx(expected, rel=1e-9)
    assert section["ece_at_temperature"] == pytest.approx(ece(at_t, y, 10), rel=1e-5)
    assert section["loss_at_temperature"] <= -np.mean(np.log(p[np.arange(len(y)), y]))


# The bootstrap's weights, from the generator's definition (SplitMix64, Poisson(1) by the
# inverse of its distribution function), in Python integers.
def splitmix64(seed: int, i: int) -> int:
    mask = 2**64 - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def poisson_weight(seed: int, r: int, i: int) -> int:
    u = (splitmix64(splitmix64(seed, r), i) >> 11) / 2.0**53
    k, term = 0, np.exp(-1.0)
    total = term
    while u >= total:
        k += 1
        term /= k
        total += term
    return k


@once
@pytest.mark.parametrize("name", ["flat", "spatial"])
def test_bootstrap_intervals_follow_the_documented_resamples(files, name, capsys):
    elements = files[name]
    z, y, position = elements["z"], elements["y"], elements["position"]
    c, resamples, seed, bins = files["classes"], 40, 12345, 15
    weight = np.random.default_rng(0).uniform(0.5, 2, c).astype(np.float32)
    np.save(files["folder"] / "w.npy", weight)
    argv = ["eval", files["folder"] / f"{name}.npy", files["folder"] / f"{name}_t.npy"]
    argv += ["--from-logits", "--calibration", "--bootstrap", resamples, "--seed", seed]
    argv += ["--weight", files["folder"] / "w.npy"]
    results = [report([*argv, "--chunk-rows", rows], capsys) for rows in (7, 1000)]
    p = softmax(z)
    nll = -np.log(p[np.arange(len(y)), y])
    w = weight.astype(np.float64)[y]
    correct = (p.argmax(1) == y).astype(float)
    confidence = p.max(1)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    stats = {"loss": [], "accuracy": [], "ece": []}
    for r in range(resamples):
        omega = np.array([poisson_weight(seed, r, int(i)) for i in position], dtype=float)
        stats["loss"].append((omega * w * nll).sum() / (omega * w).sum())
        stats["accuracy"].append((omega * correct).sum() / omega.sum())
        gaps = [abs((omega * (correct - confidence))[index == b].sum()) for b in range(bins)]
        stats["ece"].append(sum(gaps) / omega.sum())
    for result in results:
        section = result["calibration"]
        assert (section["resamples"], section["seed"]) == (resamples, seed)
        for key, values in stats.items():
            expected = np.percentile(values, [2.5, 97.5])
            np.testing.assert_allclose(section["intervals"][key], expected, rtol=1e-5)
        assert section["intervals"]["loss"][0] < result["loss"] < section["intervals"]["loss"][1]
    _close(results[0]["calibration"]["intervals"], results[1]["calibration"]["intervals"])
    # another seed, other resamples
    other = report([*argv[:-4], "--seed", seed + 1, *argv[-2:]], capsys)
    assert other["calibration"]["intervals"] != results[0]["calibration"]["intervals"]


def _close(a, b, rel=1e-9):
    """Reports equal within ``rel`` (numbers), exactly (the rest)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key], rel)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y, rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-300)
    else:
        assert a == b


@once
def test_any_blocks_and_dask_give_the_same_report(files, capsys):
    argv = ["eval", files["folder"] / "spatial.npy", files["folder"] / "spatial_t.npy"]
    argv += ["--from-logits", "--calibration", "--top-k", "2", "--bootstrap", "20"]
    argv += ["--per-class"]
    whole = report([*argv, "--chunk-rows", 1000], capsys)
    for extra in (["--chunk-rows", 1], ["--chunk-rows", 13], ["--chunk-rows", 13, "--dask"]):
        blocks = report([*argv, *extra], capsys)
        _close(blocks.pop("calibration"), whole["calibration"])
        # the loss's float32 block sums round apart
        _close(blocks, {key: v for key, v in whole.items() if key != "calibration"}, 1e-6)


@once
def test_scheduler_on_a_cluster_of_threads(files, capsys):
    import logging

    from distributed import LocalCluster

    argv = ["eval", files["folder"] / "flat.npy", files["folder"] / "flat_t.npy"]
    argv += ["--from-logits", "--calibration", "--bootstrap", "10", "--chunk-rows", 64]
    here = report(argv, capsys)
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    ) as cluster:
        on_dask = report([*argv, "--scheduler", cluster.scheduler_address], capsys)
    assert on_dask == here  # the same blocks, added in the same order


@once
def test_calibration_in_table_and_csv(files, tmp_path, capsys):
    import csv

    argv = ["eval", files["folder"] / "flat.npy", files["folder"] / "flat_t.npy"]
    argv += ["--from-logits", "--calibration", "--top-k", "3", "--bootstrap", "10"]
    section = report(argv, capsys)["calibration"]
    assert main([*map(str, argv), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert f"accuracy      {section['accuracy']:.6g}  (top-1, top-3 " in table
    assert f"temperature   {section['temperature']:.6g}  (mean NLL" in table
    assert main([*map(str, argv), "--out", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.reader((tmp_path / "r.csv").read_text().splitlines()))
    summary = dict(zip(rows[0], rows[1], strict=True))
    assert float(summary["ece"]) == section["ece"]
    assert float(summary["top_3_accuracy"]) == section["top_k_accuracy"]["3"]
    assert float(summary["loss_low"]) == section["intervals"]["loss"][0]
    assert rows[2] == []
    assert rows[3] == ["lower", "upper", "count", "confidence", "accuracy"]
    assert len(rows) == 4 + len(section["bins"])


@once
def test_every_target_ignored_gives_null_figures(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "t.npy", np.full(4, IGNORE))
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--from-logits", "--calibration"]
    section = report([*argv, "--bootstrap", "5"], capsys)["calibration"]
    assert section["count"] == 0
    for key in ("accuracy", "brier", "ece", "mce", "temperature", "loss_at_temperature"):
        assert section[key] is None, key


def test_evaluate_from_python_is_the_json_report(files, capsys):
    import nllloss

    folder = files["folder"]
    argv = ["eval", folder / "spatial.npy", folder / "spatial_t.npy", "--from-logits"]
    argv += ["--calibration", "--top-k", "2", "--bootstrap", "8", "--seed", "4", "--per-class"]
    expected = report([*argv, "--chunk-rows", 16], capsys)
    options = dict(from_logits=True, calibration=True, top_k=[2], bootstrap=8, seed=4)
    from_paths = nllloss.evaluate(
        folder / "spatial.npy",
        str(folder / "spatial_t.npy"),
        per_class=True,
        chunk_rows=16,
        **options,
    )
    assert from_paths == expected
    from_arrays = nllloss.evaluate(
        np.load(folder / "spatial.npy"),
        np.load(folder / "spatial_t.npy"),
        per_class=True,
        chunk_rows=16,
        **options,
    )
    assert from_arrays == expected
    with pytest.raises(ValueError, match=r"top_k in 1\.\.7"):
        nllloss.evaluate(np.zeros((2, 7)), np.zeros(2, int), calibration=True, top_k=[8])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        nllloss.evaluate(np.zeros((2, 7)), np.zeros(2, int), reduction="none")


def test_documented_calibration_report_is_what_the_command_prints():
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    page = root / "docs" / "guide" / "command-line.md"
    section = page.read_text().split("## Calibration report", 1)[1]
    command, shown = re.search(r"```bash\n(.*?)\n```\n\n```text\n(.*?)```", section, re.S).groups()
    job = command.split()
    assert job[:2] == ["nllloss", "eval"]
    done = subprocess.run(
        [sys.executable, "-m", "nllloss", *job[1:]],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(root / "src")},
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == shown
    assert (root / "docs" / "landcover-calibration.png").stat().st_size < 200_000


# The numba kernel of the per-element figures against their float64 NumPy definition
# (``numpy_figures``), on scores that try its edges.


def _kernel_and_numpy(x, t, beta, softcap=None, from_logits=True, with_model=True, orders=0):
    from nllloss._cli import _calibration, _calibration_kernel

    position, y = _calibration.counted(t, IGNORE, x.shape[1])
    x3 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)
    out = np.full((len(y), len(_calibration.FIGURES) + (orders and orders + 1)), np.nan)
    _calibration_kernel.element_figures(
        x3, position, y, float(softcap or 0.0), from_logits, beta, with_model, out
    )
    rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    z = _calibration.scores(rows, position, softcap)
    return out, _calibration.numpy_figures(z, y, beta, from_logits, with_model, orders)


def _assert_figures_close(actual, expected, rel=1e-9):
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rel, atol=1e-300)


def _scores_with_edges(rng, shape, c):
    """float32 scores (N, C, ...) with tied rows, tied targets, ±inf and NaN rows."""
    x = rng.standard_normal((shape[0], c, *shape[1:])).astype(np.float32) * 4
    flat = np.moveaxis(x, 1, -1).reshape(-1, c)  # a copy: edit, then put back
    flat[0] = 1.5  # every class tied
    flat[1, ::2] = flat[1].max()  # the largest value at several classes
    flat[2, 3] = -np.inf  # a masked class
    flat[3, 1] = np.nan
    flat[4, 0] = np.inf
    flat[5] = -np.inf
    flat[6, :] = -1e30  # a huge spread: exp underflows
    flat[6, 2] = 50.0
    return np.moveaxis(flat.reshape(*shape, c), -1, 1).copy()


@once
@pytest.mark.parametrize("shape", [(40,), (9, 3, 2)])
@pytest.mark.parametrize("c", [1, 2, 7, 300])
@pytest.mark.parametrize("case", ["logits", "log_probs", "softcap", "temperature_only"])
def test_kernel_figures_equal_the_numpy_definition(shape, c, case, rng):
    x = (
        _scores_with_edges(rng, shape, c)
        if c > 6
        else rng.standard_normal((shape[0], c, *shape[1:]))
    )
    t = rng.integers(0, c, shape)
    t.reshape(-1)[::5] = IGNORE
    if c > 6:  # targets at the tied, masked and non-finite classes
        t.reshape(-1)[1] = 2
        t.reshape(-1)[2:5] = (3, 1, 0)
    options = {
        "logits": {},
        "log_probs": {"from_logits": False},
        "softcap": {"softcap": 3.0},
        "temperature_only": {"with_model": False},
    }[case]
    for beta in (1.0, 0.37, 5.5):
        actual, expected = _kernel_and_numpy(x, t, beta, **options)
        assert len(actual) == np.count_nonzero(t != IGNORE)
        if case == "temperature_only":  # the model's columns are not computed
            actual, expected = actual[:, [0, 1, 4, 5, 6, 7, 8]], expected[:, [0, 1, 4, 5, 6, 7, 8]]
        _assert_figures_close(actual, expected)


@once
def test_kernel_figures_do_not_depend_on_the_thread_count(rng):
    import numba

    from nllloss._cli import _calibration, _calibration_kernel

    x = _scores_with_edges(rng, (3000,), 50)
    t = rng.integers(0, 50, 3000)
    x3 = x.reshape(3000, 50, 1)
    position = np.flatnonzero(t >= 0)
    results = []
    kernel = _calibration_kernel.element_figures
    runs = [(kernel.parallel, n) for n in (1, 2, numba.config.NUMBA_NUM_THREADS)]
    runs.append((kernel.serial, 1))
    before = numba.get_num_threads()
    window = _calibration.Window.around(0.8, 0.01, 50)
    nodes, first = window.nodes(), _calibration.MOMENTS
    try:
        for function, threads in runs:
            numba.set_num_threads(threads)
            out = np.zeros((len(position), 9 + 1 + window.orders))
            function(x3, position, t.astype(np.int64), 0.0, True, 0.8, True, out)
            out = out[np.isfinite(out).all(axis=1)]
            # the window's kernels, on as many threads
            twin = "parallel" if function is kernel.parallel else "serial"
            slopes, confidence = np.empty((len(out), len(nodes))), np.empty((len(out), len(nodes)))
            ends = np.empty((len(out), 2))
            getattr(_calibration_kernel.window_figures, twin)(
                out, first, nodes, window.half, slopes, confidence, ends
            )
            crossing = np.flatnonzero(ends[:, 1] - ends[:, 0] > 1e-3)
            h = np.empty(len(crossing))
            level = 2 / (ends[crossing, 0] + ends[crossing, 1])
            getattr(_calibration_kernel.crossings, twin)(
                out, first, crossing, level, window.half, h
            )
            results.append((out, slopes, confidence, ends, h))
    finally:
        numba.set_num_threads(before)
    for arrays in results[1:]:
        for actual, expected in zip(arrays, results[0], strict=True):
            assert_bitwise(actual, expected)


@once
def test_exp64_is_within_two_ulp_of_numpy():
    from nllloss._kernels.cpu._softmax import exp64

    x = np.concatenate([-np.geomspace(1e-300, 745, 20001), [0.0, -0.0, -np.inf, np.nan]])
    actual = np.array([exp64(v) for v in x])
    expected = np.exp(x)
    normal = expected > 1e-307
    np.testing.assert_allclose(actual[normal], expected[normal], rtol=4.5e-16, atol=0)
    assert np.all(actual[~normal & ~np.isnan(x)] <= 1e-307)
    assert np.isnan(actual[-1])


# The temperature inside the main pass: a file larger than the sample the fit starts on.


def _passes(monkeypatch) -> list[str]:
    """The passes over the file that ``nllloss eval`` makes from now on, by name."""
    from nllloss._cli import _evaluate

    passes, stream = [], _evaluate.stream

    def counted(compute, *args, **kwargs):
        passes.append(compute.__name__)
        return stream(compute, *args, **kwargs)

    monkeypatch.setattr(_evaluate, "stream", counted)
    return passes


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict:
    """3000 x 40 logits of a model 2x overconfident (each target drawn from softmax(x / 2)),
    with masked (-inf) classes and ignored targets."""
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("one_pass")
    n, c = 3000, 40
    x = (3 * rng.standard_normal((n, c))).astype(np.float32)
    x[::17, 5] = -np.inf
    t = np.argmax(x / 2 + rng.gumbel(size=x.shape), axis=1)
    t[::11] = IGNORE
    np.save(folder / "x.npy", x)
    np.save(folder / "t.npy", t)
    keep = t != IGNORE
    return {"folder": folder, "z": x[keep].astype(np.float64), "y": t[keep]}


def _at_temperature(z, y, temperature, bins=15):
    """Mean NLL and ECE of softmax(z / T), float64 NumPy."""
    p = softmax(z, temperature)
    nll = -np.mean(np.log(p[np.arange(len(y)), y]))
    confidence, correct = p.max(1), p.argmax(1) == y
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    gaps = [abs((correct - confidence)[index == b].sum()) for b in range(bins)]
    return nll, sum(gaps) / len(y)


@pytest.mark.parametrize("chunk_rows", [256, 3000])
def test_temperature_is_fitted_in_the_main_pass(large, chunk_rows, monkeypatch, capsys):
    from nllloss._cli import _calibration

    monkeypatch.setattr(_calibration, "SAMPLE_VALUES", 40 * 1000)  # 1000 of 3000 rows
    passes = _passes(monkeypatch)
    argv = ["eval", large["folder"] / "x.npy", large["folder"] / "t.npy", "--from-logits"]
    section = report([*argv, "--calibration", "--chunk-rows", chunk_rows], capsys)["calibration"]
    assert passes == ["block_totals"]
    z, y = large["z"], large["y"]
    temperature = section["temperature"]
    # the cell boundary nearest the minimiser: within half a cell (TEMPERATURE_RTOL / 2)
    assert temperature == pytest.approx(fitted_temperature(z, y), rel=0.5e-4 * 1.01)
    nll, expected_ece = _at_temperature(z, y, temperature)
    assert section["loss_at_temperature"] == pytest.approx(nll, rel=1e-12)
    assert section["ece_at_temperature"] == pytest.approx(expected_ece, rel=1e-9)
    by_torchmetrics = ece(softmax(z, temperature), y, 15)
    assert section["ece_at_temperature"] == pytest.approx(by_torchmetrics, rel=1e-5)


@once
def test_a_minimiser_outside_the_window_takes_more_passes(large, monkeypatch, capsys):
    from nllloss._cli import _calibration

    monkeypatch.setattr(_calibration, "SAMPLE_VALUES", 40 * 20)  # a poor start: 20 rows
    monkeypatch.setattr(_calibration, "WINDOW_BOUNDS", (2e-4, 2e-4))  # and a narrow window
    passes = _passes(monkeypatch)
    argv = ["eval", large["folder"] / "x.npy", large["folder"] / "t.npy", "--from-logits"]
    section = report([*argv, "--calibration"], capsys)["calibration"]
    assert passes[0] == "block_totals"
    assert len(passes) > 1
    z, y = large["z"], large["y"]
    temperature = section["temperature"]
    assert temperature == pytest.approx(fitted_temperature(z, y), rel=1e-4)
    nll, expected_ece = _at_temperature(z, y, temperature)
    assert section["loss_at_temperature"] == pytest.approx(nll, rel=1e-12)
    assert section["ece_at_temperature"] == pytest.approx(expected_ece, rel=1e-9)


@once
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_taylor_bounds_hold_and_the_kernels_equal_their_definitions(scale, rng):
    """P(h) from the moments against Σ_c exp((β0 + h) s_c) at the window's nodes and ends,
    within each element's bound; the window's kernels against their NumPy definitions."""
    from nllloss._cli import _calibration, _calibration_kernel

    c, beta = 300, 0.6
    x = _scores_with_edges(rng, (40,), c) * np.float32(scale / 4)
    x[6] = x[7]  # (the -1e30 row scaled: every class but one is far)
    t = rng.integers(0, c, 40)
    window = _calibration.Window.around(beta, 0.01, c)
    out, expected = _kernel_and_numpy(x, t, beta, with_model=False, orders=window.orders)
    _assert_figures_close(out[:, 4:], expected[:, 4:])
    finite = np.isfinite(out).all(axis=1)
    out = out[finite]
    position, _ = _calibration.counted(t, IGNORE, c)
    z = np.moveaxis(x, 1, -1).reshape(-1, c)[position[finite]].astype(np.float64)
    s = z - z.max(1, keepdims=True)
    h = np.r_[window.nodes(), -window.half, window.half]
    with np.errstate(invalid="ignore"):
        exact = np.stack([np.exp((beta + step) * s).sum(1) for step in h], axis=1)
        masked = np.where(np.isinf(s), 0, s)  # a -inf score has weight 0: it adds 0
        moment = [(np.exp((beta + step) * s) * masked).sum(1) for step in h]
        slope = np.stack(moment, axis=1) / exact
    moments = out[:, _calibration.MOMENTS :]
    value, derivative = _calibration.moment_polynomial(
        moments, np.broadcast_to(h, (len(out), len(h)))
    )
    bound, bound_slope = _calibration.taylor_bounds(out, window.half)
    assert np.all(np.abs(value - exact) <= bound[:, None] + 1e-15 * exact)
    rounding = 1e-13 * (1 + np.abs(slope))
    assert np.all(np.abs(derivative / value - slope) <= bound_slope[:, None] + rounding)
    # the window's kernels
    nodes = window.nodes()
    slopes, confidence = np.empty((len(out), len(nodes))), np.empty((len(out), len(nodes)))
    ends = np.empty((len(out), 2))
    first = _calibration.MOMENTS
    _calibration_kernel.window_figures(out, first, nodes, window.half, slopes, confidence, ends)
    definition = _calibration.numpy_window_figures(out, nodes, window.half)
    for actual, wanted in zip((slopes, confidence, ends), definition, strict=True):
        np.testing.assert_allclose(actual, wanted, rtol=1e-12)
    crossing = np.flatnonzero(ends[:, 1] - ends[:, 0] > 1e-3)
    level = 2 / (ends[crossing, 0] + ends[crossing, 1])  # 1 / (a confidence inside)
    h_kernel = np.empty(len(crossing))
    _calibration_kernel.crossings(out, _calibration.MOMENTS, crossing, level, window.half, h_kernel)
    h_numpy = _calibration.numpy_crossings(out, crossing, level, window.half)
    np.testing.assert_allclose(h_kernel, h_numpy, rtol=0, atol=1e-12 * window.half)
    value, _ = _calibration.moment_polynomial(moments[crossing], h_kernel[:, None])
    np.testing.assert_allclose(value[:, 0], level, rtol=1e-12)
