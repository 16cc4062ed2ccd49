"""The ``nllloss`` command line, through ``main(argv)`` and through real subprocesses.

Expected values come from torch (``F.nll_loss`` / ``F.cross_entropy``) or from float64 NumPy
written here; file readers are checked against the arrays written by NumPy, the
``safetensors`` package and Zarr.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nllloss
from nllloss._cli import Progress, _evaluate, _io, main
from nllloss._cli._report import PLOT_CLASSES, Context, report_figure

N, C = 300, 5
IGNORE = -100
ROOT = Path(__file__).parents[1]
SUBPROCESS_TIMEOUT = 120  # seconds; a run that hangs fails instead
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

# Subprocesses pick their own NumPy engine, and file readers use none: run such tests once,
# not once per engine of conftest's numpy_engine fixture.
once = pytest.mark.parametrize("numpy_engine", ["compiled"], indirect=True)


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report(argv, capsys) -> dict:
    code, out, err = run([*argv, "--format", "json", "--quiet"], capsys)
    assert code == 0, err
    return json.loads(out)


def run_subprocess(*argv, timeout=SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nllloss", *map(str, argv)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Files of logits, log-probabilities, targets (some ignored) and a weight; ``arrays``
    holds their contents."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("cli")
    logits = (3 * rng.standard_normal((N, C))).astype(np.float32)
    log_probs = torch.from_numpy(logits).log_softmax(1).numpy()
    target = rng.integers(0, C, N)
    target[rng.random(N) < 0.1] = IGNORE
    weight = rng.uniform(0.2, 2.0, C).astype(np.float32)
    arrays = dict(logits=logits, log_probs=log_probs, target=target, weight=weight)
    files = {name: folder / f"{name}.npy" for name in arrays}
    for name, array in arrays.items():
        np.save(files[name], array)
    return dict(files, arrays=arrays, folder=folder)


def torch_loss(x, t, weight=None, reduction="mean", from_logits=False, smoothing=0.0):
    """The oracle: F.cross_entropy for logits, F.nll_loss for log-probabilities."""
    x, t = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(t, dtype=np.int64))
    w = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=x.numpy().dtype))
    if from_logits:
        return F.cross_entropy(
            x, t, w, ignore_index=IGNORE, reduction=reduction, label_smoothing=smoothing
        ).numpy()
    assert smoothing == 0.0
    return F.nll_loss(x, t, w, ignore_index=IGNORE, reduction=reduction).numpy()


# --- the numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("from_logits", "weighted", "smoothing"),
    [(False, False, 0.0), (False, True, 0.0), (True, False, 0.0), (True, True, 0.25)],
)
def test_one_block_is_the_one_shot_call_and_blocks_agree_with_torch(
    data, capsys, reduction, from_logits, weighted, smoothing
):
    arrays = data["arrays"]
    x = arrays["logits"] if from_logits else arrays["log_probs"]
    t, w = arrays["target"], arrays["weight"] if weighted else None
    pred = data["logits" if from_logits else "log_probs"]
    options = ["--reduction", reduction, "--label-smoothing", smoothing]
    if from_logits:
        options.append("--from-logits")
    if weighted:
        options += ["--weight", data["weight"]]
    expected = torch_loss(x, t, w, reduction, from_logits, smoothing)
    one_shot = nllloss.nll_loss(
        x, t, w, reduction=reduction, from_logits=from_logits, label_smoothing=smoothing
    )
    whole = report(["eval", pred, data["target"], *options, "--chunk-rows", N], capsys)
    if from_logits and reduction == "mean":
        # The block's float32 sum over its float32 total weight, where the from-logits
        # kernel divides its float64 sum: one rounding apart at most.
        np.testing.assert_array_max_ulp(np.float32(whole["loss"]), one_shot, maxulp=1)
    else:  # one block: the core's bits, and torch's for log-probabilities
        assert np.float32(whole["loss"]) == one_shot
    if not from_logits:
        assert np.float32(whole["loss"]) == expected
    for chunk_rows in (1, 37, 128, N):
        blocks = report(
            ["eval", pred, data["target"], *options, "--chunk-rows", chunk_rows], capsys
        )
        np.testing.assert_allclose(blocks["loss"], expected, rtol=2e-6)
        assert blocks["count"] == whole["count"]
        assert blocks["total_weight"] == pytest.approx(whole["total_weight"], rel=1e-6)
    counted = t != IGNORE
    assert whole["count"] == counted.sum()
    assert whole["ignored"] == N - counted.sum()
    weights = w if weighted else np.ones(C)
    assert whole["total_weight"] == pytest.approx(weights[t[counted]].sum(), rel=1e-6)


@pytest.mark.parametrize("from_logits", [False, True])
def test_float64_blocks_agree_with_torch(tmp_path, data, capsys, from_logits):
    arrays = data["arrays"]
    x = (arrays["logits"] if from_logits else arrays["log_probs"]).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    t, w = arrays["target"], arrays["weight"].astype(np.float64)
    expected = torch_loss(x, t, w, "mean", from_logits=from_logits)
    argv = ["eval", tmp_path / "x.npy", data["target"], "--weight", data["weight"]]
    argv += ["--from-logits"] if from_logits else []
    for chunk_rows in (N, 16):
        result = report([*argv, "--chunk-rows", chunk_rows], capsys)
        np.testing.assert_allclose(result["loss"], expected, rtol=1e-14)
        if chunk_rows == N and not from_logits:  # one block: torch's bits
            assert result["loss"] == float(expected)


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_reduction_none_writes_torchs_losses_for_spatial_input(tmp_path, capsys, chunk_rows):
    rng = np.random.default_rng(3)
    x = (2 * rng.standard_normal((40, 4, 3, 2))).astype(np.float32)
    t = rng.integers(0, 4, (40, 3, 2))
    t[5, 1, 0] = IGNORE
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    out = tmp_path / "losses.npy"
    result = report(
        [
            "eval",
            tmp_path / "x.npy",
            tmp_path / "t.npy",
            "--from-logits",
            "--reduction",
            "none",
            "--out",
            out,
            "--chunk-rows",
            chunk_rows,
        ],
        capsys,
    )
    losses = np.load(out)
    assert losses.dtype == np.float32
    # Element-wise losses do not depend on the blocks: the one-shot call's bits.
    one_shot = nllloss.nll_loss(x, t, reduction="none", from_logits=True)
    np.testing.assert_array_equal(losses, one_shot)
    expected = torch_loss(x, t, reduction="none", from_logits=True)
    np.testing.assert_allclose(losses, expected, rtol=1e-6, atol=1e-6)
    assert result["loss"] is None
    assert result["loss_file"] == str(out)
    assert result["count"] == t.size - 1


def test_per_class_table(data, capsys):
    x, t, w = data["arrays"]["logits"], data["arrays"]["target"], data["arrays"]["weight"]
    result = report(
        [
            "eval",
            data["logits"],
            data["target"],
            "--from-logits",
            "--weight",
            data["weight"],
            "--per-class",
            "--chunk-rows",
            50,
        ],
        capsys,
    )
    # float64, independently: -log p at the targets, and torch's weighted losses.
    x64 = x.astype(np.float64)
    log_p = x64 - np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1, keepdims=True))
    log_p -= x64.max(1, keepdims=True)
    counted = t != IGNORE
    nll = -log_p[counted, t[counted]]
    weighted = torch_loss(x, t, w, "none", from_logits=True)[counted].astype(np.float64)
    rows = result["per_class"]
    assert [list(row) for row in rows] == [["class", "count", "weight", "mean_nll", "share"]] * C
    for row in rows:
        c = row["class"]
        mask = t[counted] == c
        assert row["count"] == mask.sum()
        assert row["weight"] == float(w[c])
        np.testing.assert_allclose(row["mean_nll"], nll[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(row["share"], weighted[mask].sum() / weighted.sum(), rtol=1e-5)
    np.testing.assert_allclose(sum(row["share"] for row in rows), 1.0, rtol=1e-12)
    np.testing.assert_allclose(result["perplexity"], np.exp(nll.mean()), rtol=1e-6)


def test_per_class_lists_only_classes_that_occur(tmp_path, capsys):
    x = np.log(np.full((4, 6), 1 / 6, dtype=np.float32))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", np.array([1, 4, 4, IGNORE]))
    result = report(["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--per-class"], capsys)
    assert [(row["class"], row["count"]) for row in result["per_class"]] == [(1, 1), (4, 2)]
    assert [row["share"] for row in result["per_class"]] == pytest.approx([1 / 3, 2 / 3])


def test_perplexity_is_unweighted_and_unsmoothed(data, capsys):
    base = ["eval", data["logits"], data["target"], "--from-logits"]
    plain = report(base, capsys)
    weighted = report([*base, "--weight", data["weight"], "--label-smoothing", 0.3], capsys)
    assert weighted["perplexity"] == plain["perplexity"]
    assert weighted["loss"] != plain["loss"]


def test_label_smoothing_on_log_probabilities_follows_torchs_formula(data, capsys):
    """On log-probabilities, torch's formula applied to the given values (float64 here)."""
    x, t, w, eps = (
        data["arrays"]["log_probs"].astype(np.float64),
        data["arrays"]["target"],
        data["arrays"]["weight"],
        0.2,
    )
    counted = t != IGNORE
    wt = w.astype(np.float64)[t[counted]]
    nll = -(wt * x[counted, t[counted]]).sum()
    smooth = -(x[counted] * w.astype(np.float64)).sum()
    expected = ((1 - eps) * nll + eps / C * smooth) / wt.sum()
    result = report(
        [
            "eval",
            data["log_probs"],
            data["target"],
            "--weight",
            data["weight"],
            "--label-smoothing",
            eps,
        ],
        capsys,
    )
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("weighted", "smoothing"), [(False, 0.0), (True, 0.2)])
def test_a_floating_target_file_holds_class_probabilities(
    data, tmp_path, capsys, reduction, weighted, smoothing
):
    """As torch's cross_entropy with probability targets: 'mean' over the target elements."""
    rng = np.random.default_rng(11)
    p = rng.random((N, C)).astype(np.float32) ** 2
    p /= p.sum(1, keepdims=True)
    np.save(tmp_path / "p.npy", p)
    x, w = data["arrays"]["logits"], data["arrays"]["weight"] if weighted else None
    expected = F.cross_entropy(
        torch.from_numpy(x).double(), torch.from_numpy(p).double(),
        None if w is None else torch.from_numpy(w).double(),
        reduction=reduction, label_smoothing=smoothing,
    ).numpy()  # fmt: skip
    options = ["--from-logits", "--reduction", reduction, "--label-smoothing", smoothing]
    options += ["--weight", data["weight"]] if weighted else []
    for chunk_rows in (7, N):
        out = tmp_path / "losses.npy"
        result = report(
            ["eval", data["logits"], tmp_path / "p.npy", *options, "--chunk-rows", chunk_rows]
            + (["--out", out] if reduction == "none" else []),
            capsys,
        )
        loss = np.load(out) if reduction == "none" else result["loss"]
        np.testing.assert_allclose(loss, expected, rtol=2e-6, atol=1e-6)
        assert (result["count"], result["ignored"], result["total_weight"]) == (N, 0, N)
    plain = -(torch.from_numpy(x).double().log_softmax(1) * torch.from_numpy(p)).sum(1)
    assert result["perplexity"] == pytest.approx(float(plain.mean().exp()), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_z_loss_and_softcap_against_float64_torch(data, tmp_path, capsys, reduction):
    x, t, w = (data["arrays"][k] for k in ("logits", "target", "weight"))
    z, cap = 1e-3, 4.0
    xt = torch.from_numpy(x).double()
    tt, wt = torch.from_numpy(t), torch.from_numpy(w).double()
    capped = cap * torch.tanh(xt / cap)
    kept = tt != IGNORE
    v = torch.where(kept, wt[tt.clamp(min=0)], 0)
    z_terms = z * v * torch.logsumexp(capped, 1).square()
    main = F.cross_entropy(capped, tt, wt, ignore_index=IGNORE, reduction="sum")
    expected = main + z_terms.sum()
    if reduction == "mean":
        expected = expected / v.sum()
    argv = ["eval", data["logits"], data["target"], "--from-logits", "--weight", data["weight"]]
    argv += ["--reduction", reduction, "--z-loss", z, "--softcap", cap]
    for chunk_rows in (13, N):
        result = report([*argv, "--chunk-rows", chunk_rows], capsys)
        np.testing.assert_allclose(result["loss"], float(expected), rtol=2e-6)
    # the perplexity is the capped model's, without the z-loss
    nll = F.cross_entropy(capped, tt, ignore_index=IGNORE)
    assert result["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-6)
    code, out, _ = run([*argv, "--quiet"], capsys)
    assert code == 0
    assert f"z-loss {z:g}, softcap {cap:g}, from logits" in out


def test_z_loss_in_the_class_table_is_each_targets_own(data, capsys):
    base = ["eval", data["logits"], data["target"], "--from-logits", "--per-class"]
    result = report([*base, "--z-loss", 0.01], capsys)
    shares = sum(row["share"] for row in result["per_class"])
    assert shares == pytest.approx(1.0)
    plain = report(base, capsys)
    assert result["perplexity"] == plain["perplexity"]
    assert result["loss"] > plain["loss"]


def test_ignore_index_inside_the_class_range(data, capsys):
    t = data["arrays"]["target"].copy()
    t[t == IGNORE] = 2
    path = data["folder"] / "target_ignore_2.npy"
    np.save(path, t)
    result = report(["eval", data["log_probs"], path, "--ignore-index", 2], capsys)
    expected = F.nll_loss(
        torch.from_numpy(data["arrays"]["log_probs"]), torch.from_numpy(t), ignore_index=2
    )
    assert np.float32(result["loss"]) == expected.numpy()
    assert result["ignored"] == (t == 2).sum()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16_bit_predictions_accumulate_in_float32_and_round_once(tmp_path, data, capsys, dtype):
    x = data["arrays"]["log_probs"].astype(dtype)
    if dtype == np.float16:
        path = tmp_path / "x.npy"
        np.save(path, x)
    else:  # .npy cannot hold bfloat16: a safetensors BF16 tensor
        from safetensors.numpy import save_file

        path = tmp_path / "x.safetensors"
        save_file({"x": x}, str(path))
    result = report(["eval", path, data["target"], "--chunk-rows", N], capsys)
    expected = torch_loss(x.astype(np.float32), data["arrays"]["target"])
    assert result["loss"] == float(np.float32(expected).astype(dtype))


def test_empty_input_gives_nan_as_null(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((0, 3), np.float32))
    np.save(tmp_path / "t.npy", np.zeros(0, np.int64))
    result = report(["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--per-class"], capsys)
    assert result == {
        "loss": None,  # NaN, as torch's mean over nothing; JSON has no NaN
        "reduction": "mean",
        "total_weight": 0.0,
        "count": 0,
        "ignored": 0,
        "perplexity": None,
        "per_class": [],
    }


# --- formats and outputs ---------------------------------------------------------------


def test_table_csv_and_json_report_the_same_numbers(data, tmp_path, capsys):
    argv = ["eval", data["logits"], data["target"], "--from-logits", "--per-class", "--quiet"]
    expected = report(argv[:-1], capsys)

    code, table, _ = run(argv, capsys)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["loss", f"{expected['loss']:.6g}"]
    assert f"{expected['count']} used, {expected['ignored']} ignored" in lines[2]
    assert lines[5].split() == ["class", "count", "weight", "mean", "NLL", "share"]
    first = lines[6].split()
    assert first[:4] == [
        "0",
        str(expected["per_class"][0]["count"]),
        "1",
        f"{expected['per_class'][0]['mean_nll']:.4f}",
    ]

    assert run([*argv, "--out", tmp_path / "report.csv"], capsys)[:2] == (0, "")
    summary, classes = (tmp_path / "report.csv").read_text().split("\n\n")
    summary = list(csv.DictReader(io.StringIO(summary)))
    assert len(summary) == 1
    assert float(summary[0]["loss"]) == expected["loss"]
    assert float(summary[0]["perplexity"]) == expected["perplexity"]
    classes = list(csv.DictReader(io.StringIO(classes)))
    assert [float(row["mean_nll"]) for row in classes] == [
        row["mean_nll"] for row in expected["per_class"]
    ]

    assert run([*argv, "--out", tmp_path / "report.json"], capsys)[:2] == (0, "")
    assert json.loads((tmp_path / "report.json").read_text()) == expected
    assert run([*argv, "--format", "table", "--out", tmp_path / "r.json"], capsys)[0] == 0
    assert (tmp_path / "r.json").read_text() == table


def test_total_weight_is_written_in_full(tmp_path, capsys):
    rows = 2000
    np.save(tmp_path / "x.npy", np.log(np.full((rows, 2), 0.5, np.float32)))
    np.save(tmp_path / "t.npy", np.arange(rows) % 2)
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--weight", "1000,1000", "--quiet"]
    code, table, _ = run(argv, capsys)
    assert code == 0
    assert f"total weight  {rows * 1000}\n" in table  # not 2e+06


def test_nan_reads_one_way_in_each_format(tmp_path, capsys):
    """NaN predictions at class 1's targets: its mean NLL, its share and the loss are NaN."""
    x = np.log(np.full((4, 3), 1 / 3, np.float32))
    x[[1, 3], 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", np.array([0, 1, 2, 1]))
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--per-class", "--quiet"]
    expected = F.nll_loss(torch.from_numpy(x), torch.tensor([0, 1, 2, 1]))
    assert torch.isnan(expected)

    code, table, _ = run(argv, capsys)
    assert code == 0
    cells = [cell for line in table.splitlines() for cell in line.split()]
    # the loss, the perplexity, class 1's mean NLL, and every share (of a NaN total)
    assert cells.count("nan") == 6
    assert "-" not in cells
    code, text, _ = run([*argv, "--format", "csv"], capsys)
    summary, classes = text.split("\n\n")
    assert next(iter(csv.DictReader(io.StringIO(summary))))["loss"] == "nan"
    shares = [row["share"] for row in csv.DictReader(io.StringIO(classes))]
    assert shares == ["nan"] * 3  # the total loss is NaN: every share is
    result = report(argv[:-1], capsys)
    assert result["loss"] is None
    assert result["per_class"][1]["mean_nll"] is None


@pytest.mark.parametrize(
    ("options", "mean", "share"),
    [
        ([], "mean NLL", "share"),
        (["--weight", "1,2,0.5"], "unweighted mean NLL", "share of the weighted loss"),
        (
            ["--label-smoothing", "0.1", "--from-logits"],
            "unweighted mean NLL",
            "share of the smoothed loss",
        ),
    ],
)
def test_class_table_says_which_columns_are_weighted(tmp_path, capsys, options, mean, share):
    np.save(tmp_path / "x.npy", np.log(np.full((4, 3), 1 / 3, np.float32)))
    np.save(tmp_path / "t.npy", np.array([0, 1, 2, 1]))
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--per-class", "--quiet", *options]
    code, table, _ = run(argv, capsys)
    assert code == 0
    header = table.split("\n\n")[1].splitlines()[0]
    assert header.endswith(f"  {mean}  {share}"), header


def test_out_npy_holds_the_loss(data, tmp_path, capsys):
    out = tmp_path / "loss.npy"
    result = report(["eval", data["log_probs"], data["target"], "--out", out], capsys)
    saved = np.load(out)
    assert saved.shape == ()
    assert saved.dtype == np.float32
    assert float(saved) == result["loss"]


@once
def test_plot_draws_the_class_table(data, tmp_path, capsys):
    png = tmp_path / "classes.png"
    argv = ["eval", data["logits"], data["target"], "--from-logits", "--per-class"]
    code, out, err = run([*argv, "--plot", png, "--format", "json", "--quiet"], capsys)
    assert (code, err) == (0, f"nllloss: wrote the chart to {png}\n")
    result = json.loads(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    context = Context("mean", True, 0.0, weighted=False, loss_file=None)
    rows = result["per_class"]
    figure = report_figure(_evaluate.Result(0, 0, 0, 0, 0, 0, rows), context, "x against t")
    assert figure.get_suptitle() == "x against t"
    mean_axes, share_axes = figure.axes
    assert [bar.get_height() for bar in mean_axes.patches] == [row["mean_nll"] for row in rows]
    assert [bar.get_height() for bar in share_axes.patches] == [100 * r["share"] for r in rows]


@once
def test_plot_of_many_classes_is_bounded(tmp_path, capsys):
    """20,000 classes: the classes with the largest shares, the rest as one bar; a chart
    of fixed size, drawn in seconds."""
    import time

    rng = np.random.default_rng(5)
    classes, rows = 20_000, 4_000
    x = rng.standard_normal((rows, classes)).astype(np.float32)
    t = rng.integers(0, classes, rows)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    png = tmp_path / "plot.png"
    started = time.monotonic()
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--from-logits", "--calibration"]
    result = report([*argv, "--plot", png, "--per-class"], capsys)
    assert time.monotonic() - started < 60
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert (width, height) == (1300, 550)  # 13 x 5.5 inches at 100 dpi, whatever C is
    figure = report_figure(
        _evaluate.Result(0, 0, 0, 0, 0, 0, result["per_class"], result["calibration"]),
        Context("mean", True, 0.0, weighted=False, loss_file=None),
        "x",
    )
    reliability, _, share_axes = figure.axes
    shares = sorted((row["share"] for row in result["per_class"]), reverse=True)
    heights = [bar.get_height() for bar in share_axes.patches]
    assert len(heights) == PLOT_CLASSES
    np.testing.assert_allclose(sorted(heights[:-1], reverse=True), np.multiply(shares[:23], 100))
    np.testing.assert_allclose(heights[-1], 100 * sum(shares[23:]))
    assert share_axes.get_xticklabels()[-1].get_text().startswith(f"others ({len(shares) - 23})")
    used = [row for row in result["calibration"]["bins"] if row["count"]]
    assert [bar.get_height() for bar in reliability.patches] == [r["accuracy"] for r in used]


@once
def test_progress_is_drawn_on_a_terminal_after_its_delay_and_erased():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    now = [0.0]
    stream = Terminal()
    progress = Progress(1000, stream, clock=lambda: now[0])
    progress.update(100)
    assert stream.getvalue() == ""  # before the delay
    now[0] = 2.0
    progress.update(400)
    assert "50.0%" in stream.getvalue()
    assert "500/1000 rows" in stream.getvalue()
    assert "about 2 s left" in stream.getvalue()
    progress.close()
    assert stream.getvalue().endswith("\r\x1b[K")

    for quiet in (Progress(10, Terminal(), enabled=False), Progress(10, io.StringIO())):
        now[0] += 5
        quiet.update(10)
        quiet.close()
        assert quiet.stream.getvalue() == ""


def test_eval_draws_progress_on_a_terminal_unless_quiet(data, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(Progress, "DELAY", 0.0)
    monkeypatch.setattr(Progress, "INTERVAL", 0.0)
    for extra, drawn in (([], True), (["--quiet"], False)):
        stderr = Terminal()
        monkeypatch.setattr(sys, "stderr", stderr)
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["eval", str(data["log_probs"]), str(data["target"]), *extra]) == 0
        assert ("100.0%" in stderr.getvalue()) is drawn


# --- readers ---------------------------------------------------------------------------


@once
def test_every_container_reads_the_same_rows(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 4)).astype(np.float32)
    t = rng.integers(0, 4, 23)
    np.savez(tmp_path / "stored.npz", x=x, t=t)
    np.savez_compressed(tmp_path / "packed.npz", x=x, t=t)
    np.savez(tmp_path / "single.npz", x)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    from safetensors.numpy import save_file

    save_file({"x": x, "t": t}, str(tmp_path / "both.safetensors"))
    import zarr

    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(5, 4))
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("x", data=x, chunks=(6, 4))
    (tmp_path / "t.txt").write_text("# targets\n" + "\n".join(map(str, t)) + "\n")

    specs = [
        "stored.npz:x",
        "packed.npz:x",
        "single.npz",
        "fortran.npy",
        "both.safetensors:x",
        "x.zarr",
        "g.zarr:x",
    ]
    for spec in specs:
        source = _io.open_array(str(tmp_path / spec), "predictions")
        assert (source.shape, source.dtype) == (x.shape, x.dtype), spec
        np.testing.assert_array_equal(source.rows(0, 23), x, err_msg=spec)
        np.testing.assert_array_equal(source.rows(5, 11), x[5:11], err_msg=spec)
        np.testing.assert_array_equal(source[3:9, 1:3], x[3:9, 1:3], err_msg=spec)
        assert source.rows(30, 40).shape == (0, 4)
    for spec in ["stored.npz:t", "both.safetensors:t", "t.txt"]:
        source = _io.open_array(str(tmp_path / spec), "targets", text_dtype=np.int64)
        np.testing.assert_array_equal(source.rows(0, 23), t, err_msg=spec)
    stored = _io.open_array(str(tmp_path / "stored.npz:x"), "predictions")
    assert isinstance(stored, _io.FileRows)  # read a block at a time, not whole


@once
def test_safetensors_reader_follows_the_format(tmp_path):
    """Every dtype the reference writer produces, against its own reader."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(2)
    arrays = {
        name: (100 * rng.standard_normal((3, 2))).astype(dtype)
        for name, dtype in [
            ("f64", np.float64),
            ("f32", np.float32),
            ("f16", np.float16),
            ("i64", np.int64),
            ("i32", np.int32),
            ("i16", np.int16),
            ("i8", np.int8),
            ("u8", np.uint8),
            ("u16", np.uint16),
            ("u32", np.uint32),
            ("u64", np.uint64),
        ]
    }
    arrays["bool"] = rng.random((2, 2)) < 0.5
    arrays["bf16"] = rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "all.safetensors"
    save_file(arrays, str(path), metadata={"made_by": "test"})
    reference = load_file(str(path))
    for name, array in reference.items():
        source = _io.open_array(f"{path}:{name}", "predictions")
        read = source.rows(0, array.shape[0])
        assert read.dtype == array.dtype, name
        np.testing.assert_array_equal(read, array, err_msg=name)


def test_all_inputs_from_containers_give_the_npy_result(data, tmp_path, capsys):
    np.savez(tmp_path / "both.npz", x=data["arrays"]["logits"], t=data["arrays"]["target"])
    from safetensors.numpy import save_file

    save_file(
        {"x": data["arrays"]["logits"], "w": data["arrays"]["weight"]},
        str(tmp_path / "both.safetensors"),
    )
    import zarr

    zarr.create_array(str(tmp_path / "x.zarr"), data=data["arrays"]["logits"], chunks=(64, C))
    (tmp_path / "t.txt").write_text(" ".join(map(str, data["arrays"]["target"])))
    (tmp_path / "w.txt").write_text("\n".join(repr(float(v)) for v in data["arrays"]["weight"]))
    weight_list = ",".join(repr(float(v)) for v in data["arrays"]["weight"])

    def loss(pred, target, weight):
        argv = ["eval", pred, target, "--from-logits", "--weight", weight, "--per-class"]
        return report([*argv, "--chunk-rows", 64], capsys)

    expected = loss(data["logits"], data["target"], data["weight"])
    for pred, target, weight in [
        (f"{tmp_path}/both.npz:x", f"{tmp_path}/both.npz:t", f"{tmp_path}/both.safetensors:w"),
        (f"{tmp_path}/both.safetensors:x", tmp_path / "t.txt", tmp_path / "w.txt"),
        (tmp_path / "x.zarr", data["target"], weight_list),
    ]:
        assert loss(pred, target, weight) == expected


# --- Dask --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Two workers on the loopback interface, no dashboard, with bounded connect timeouts."""
    import dask
    from distributed import LocalCluster

    with (
        dask.config.set({"distributed.comm.timeouts.connect": "20s"}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as local,
    ):
        assert len(local.workers) == 2
        assert local.scheduler_address.startswith("tcp://127.0.0.1:")
        yield local


def test_scheduler_gives_the_same_numbers(data, cluster, capsys):
    for extra in (["--weight", data["weight"], "--label-smoothing", 0.1], ["--reduction", "sum"]):
        argv = [
            "eval",
            data["logits"],
            data["target"],
            "--from-logits",
            "--per-class",
            "--chunk-rows",
            40,
            *extra,
        ]
        here = report(argv, capsys)
        on_dask = report([*argv, "--scheduler", cluster.scheduler_address], capsys)
        assert on_dask == here


def test_scheduler_with_zarr_and_none(data, cluster, tmp_path, capsys):
    import zarr

    logits, target = data["arrays"]["logits"], data["arrays"]["target"]
    zarr.create_array(str(tmp_path / "x.zarr"), data=logits, chunks=(50, C))
    out = tmp_path / "losses.npy"
    options = ["--from-logits", "--reduction", "none", "--chunk-rows", "32"]
    argv = ["eval", tmp_path / "x.zarr", data["target"], *options, "--out", out]
    report([*argv, "--scheduler", cluster.scheduler_address], capsys)
    one_shot = nllloss.nll_loss(logits, target, reduction="none", from_logits=True)
    np.testing.assert_array_equal(np.load(out), one_shot)
    expected = torch_loss(logits, target, reduction="none", from_logits=True)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6, atol=1e-6)


def test_scheduler_with_no_rows(cluster, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((0, 3), np.float32))
    np.save(tmp_path / "t.npy", np.zeros(0, np.int64))
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--per-class"]
    assert report([*argv, "--scheduler", cluster.scheduler_address], capsys) == report(argv, capsys)


def test_scheduler_reports_an_out_of_range_target_in_one_line(data, cluster, tmp_path, capsys):
    t = data["arrays"]["target"].copy()
    t[251] = C + 2
    np.save(tmp_path / "t.npy", t)
    code, out, err = run(
        [
            "eval",
            data["log_probs"],
            tmp_path / "t.npy",
            "--chunk-rows",
            100,
            "--scheduler",
            cluster.scheduler_address,
        ],
        capsys,
    )
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert f"target[251] = {C + 2} is not in the class range [0, {C})" in err


@once
def test_unreachable_scheduler_is_an_error(data, capsys, monkeypatch):
    monkeypatch.setattr(_evaluate, "SCHEDULER_TIMEOUT", 1)
    code, _, err = run(
        ["eval", data["log_probs"], data["target"], "--scheduler", "tcp://127.0.0.1:9"], capsys
    )
    assert code == 1
    assert err.startswith("nllloss: error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert err.count("\n") == 1


@once
def test_dask_local_cluster_in_a_subprocess(data, capsys):
    argv = [
        "eval",
        data["logits"],
        data["target"],
        "--from-logits",
        "--per-class",
        "--chunk-rows",
        64,
        "--format",
        "json",
    ]
    here = report(argv[:-2], capsys)
    done = run_subprocess(*argv, "--dask")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == here


# --- memory ----------------------------------------------------------------------------

PEAK_RSS = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    if sys.argv[1] == "eval":
        from nllloss._cli import main
        code = main(sys.argv[1:])
    else:  # the control: the whole file in memory
        import numpy as np, nllloss
        x, t = np.load(sys.argv[2]), np.load(sys.argv[3])
        print(json.dumps({"loss": float(nllloss.nll_loss(x, t))}))
        code = 0
    # VmHWM: this process's peak resident memory since exec. (ru_maxrss would not do: it
    # keeps the parent's peak, inherited through fork.)
    status = Path("/proc/self/status").read_text()
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
    sys.exit(code)
    """
)


@once
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_peak_memory_stays_bounded_by_the_block(tmp_path):
    """A 240 MB file through 4096-row blocks (0.8 MB) costs no more memory than a file of one
    block, while the same measurement sees the whole file when it is loaded."""
    rows, classes, tile = 1_200_000, 50, 1000
    rng = np.random.default_rng(5)
    block_x = torch.from_numpy(rng.standard_normal((tile, classes)).astype(np.float32))
    block_x = block_x.log_softmax(1).numpy()
    block_t = rng.integers(0, classes, tile)
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (rows, classes))
    for start in range(0, rows, tile):
        x[start : start + tile] = block_x
    x.flush()
    del x
    np.save(tmp_path / "t.npy", np.tile(block_t, rows // tile))
    np.save(tmp_path / "small_x.npy", block_x)
    np.save(tmp_path / "small_t.npy", block_t)
    file_size = (tmp_path / "x.npy").stat().st_size

    def peak(*argv):
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *map(str, argv)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=SUBPROCESS_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        result, rss = done.stdout.splitlines()
        return json.loads(result), int(rss)

    blocks = ["--chunk-rows", 4096, "--format", "json", "--quiet"]
    small, baseline = peak("eval", tmp_path / "small_x.npy", tmp_path / "small_t.npy", *blocks)
    big, big_peak = peak("eval", tmp_path / "x.npy", tmp_path / "t.npy", *blocks)
    loaded, loaded_peak = peak("load", tmp_path / "x.npy", tmp_path / "t.npy")
    # The big file repeats the small one's rows: the same mean, to float32 rounding.
    np.testing.assert_allclose(small["loss"], torch_loss(block_x, block_t), rtol=1e-6)
    np.testing.assert_allclose(big["loss"], small["loss"], rtol=1e-5)
    np.testing.assert_allclose(big["loss"], loaded["loss"], rtol=1e-6)
    assert big["count"] == rows
    assert big_peak - baseline < file_size / 16, (big_peak, baseline, file_size)
    assert loaded_peak - baseline > file_size, (loaded_peak, baseline, file_size)


# --- info, examples, bench, imports ------------------------------------------------------


@once
def test_info_reports_versions_threads_and_gpus(capsys):
    code, out, _ = run(["info", "--format", "json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["versions"]["nllloss"] == nllloss.__version__
    assert info["versions"]["numpy"] == np.__version__
    assert info["versions"]["torch"] == torch.__version__
    import numba

    assert info["threads"]["nllloss"] == numba.get_num_threads()
    assert info["threads"]["cpus"] == os.cpu_count()
    assert info["gpus"]["torch"] == [
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
    ]
    code, table, err = run(["info"], capsys)
    assert code == 0, err
    assert table.splitlines()[1].split() == ["nllloss", nllloss.__version__]


@once
def test_examples_subcommand_and_the_benchmark_outside_the_package(capsys):
    code, out, _ = run(["examples"], capsys)
    assert code == 0
    assert out.splitlines()[0].split() == ["example", "documented", "source", "nllloss"]
    # the benchmark is a script of the repository, not a command of the installed package
    code, out, err = run(["bench", "--quick"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("nllloss: error: ")
    assert err.count("\n") == 1
    assert "python benchmarks/cpu.py" in err


@once
def test_subprocess_eval_and_usage(data):
    done = run_subprocess("eval", data["log_probs"], data["target"], "--format", "json")
    assert done.returncode == 0, done.stderr
    expected = torch_loss(data["arrays"]["log_probs"], data["arrays"]["target"])
    assert np.float32(json.loads(done.stdout)["loss"]) == expected
    bare = run_subprocess()
    assert bare.returncode == 2
    assert bare.stderr.startswith("nllloss: error: the following arguments are required")
    help_text = run_subprocess("--help")
    assert help_text.returncode == 0
    for command in ("eval", "info", "examples"):
        assert command in help_text.stdout


@once
def test_eval_imports_no_framework_and_no_optional_extra(data):
    code = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from nllloss._cli import main
        args = ["eval", {str(data["logits"])!r}, {str(data["target"])!r}, "--from-logits",
                "--per-class", "--quiet"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0
        heavy = ("torch", "jax", "dask", "distributed", "zarr", "matplotlib", "paddle")
        loaded = [name for name in heavy if name in sys.modules]
        assert not loaded, loaded
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 0, done.stderr


# --- bad input -----------------------------------------------------------------------------


def _write(folder: Path, name: str, array) -> Path:
    path = folder / name
    if name.endswith((".txt", ".csv")):
        path.write_text(array)
    elif name.endswith(".safetensors"):
        path.write_bytes(array)
    else:
        np.save(path, array)
    return path


@pytest.fixture(scope="module")
def bad(data):
    """Files that are wrong in one way each."""
    folder = data["folder"]
    t_bad = data["arrays"]["target"].copy()
    t_bad[123] = 9
    nan_x = data["arrays"]["log_probs"].copy()
    nan_x[[3, 8, 8], [0, 1, 2]] = np.nan
    np.savez(folder / "two.npz", a=data["arrays"]["logits"], b=data["arrays"]["target"])
    bad = dict(
        prob_t=_write(folder, "prob_t.npy", np.full((N, C), 1 / C, np.float32)),
        wide_prob_t=_write(folder, "wide_prob_t.npy", np.zeros((N, C + 1), np.float32)),
        int_prob_t=_write(folder, "int_prob_t.npy", np.zeros((N, C), np.int64)),
        short_t=_write(folder, "short_t.npy", data["arrays"]["target"][:-1]),
        float_t=_write(folder, "float_t.npy", data["arrays"]["target"].astype(np.float32)),
        text_t=_write(folder, "text_t.txt", "1\n2\n1.5\n"),
        range_t=_write(folder, "range_t.npy", t_bad),
        int_x=_write(folder, "int_x.npy", np.zeros((N, C), np.int32)),
        flat_x=_write(folder, "flat_x.npy", np.zeros(C, np.float32)),
        nan_x=_write(folder, "nan_x.npy", nan_x),
        garbage=_write(folder, "garbage.safetensors", b"\xff" * 16),
        csv=_write(folder, "x.csv", "1,2"),
        cut=_write(folder, "cut.npy", data["arrays"]["log_probs"]),
        two=folder / "two.npz",
    )
    with bad["cut"].open("r+b") as file:  # the last row's bytes are lost
        file.truncate(bad["cut"].stat().st_size - 4 * C)
    return bad


ERRORS = {
    # id: (argv after 'eval', with {names} from the fixtures, exit code, text in stderr)
    "missing-predictions": (
        ["{folder}/nope.npy", "{target}"],
        1,
        "predictions {folder}/nope.npy: no such file",
    ),
    "missing-targets": (
        ["{log_probs}", "{folder}/nope.npy"],
        1,
        "targets {folder}/nope.npy: no such",
    ),
    "unknown-format": (
        ["{csv}", "{target}"],
        1,
        "unknown format '.csv': expected .npy, .npz[:KEY]",
    ),
    "truncated-npy": (
        ["{cut}", "{target}"],
        1,
        f"predictions {{cut}}: the file is cut short ({128 + 4 * C * (N - 1)} bytes; float32 "
        f"({N}, {C}) needs {128 + 4 * C * N})",
    ),
    "npz-unknown-key": (["{two}:c", "{target}"], 1, "no array 'c' (it holds a, b)"),
    "npz-no-key": (["{two}", "{target}"], 1, "holds a, b; name one as {two}:KEY"),
    "npy-with-key": (["{log_probs}:x", "{target}"], 1, "a .npy file holds one array; drop ':x'"),
    "bad-safetensors": (["{garbage}:x", "{target}"], 1, "not a valid .safetensors file"),
    "shape-mismatch": (
        ["{log_probs}", "{short_t}"],
        1,
        f"input shape ({N}, {C}) needs target shape ({N},), got ({N - 1},)",
    ),
    "float-targets": (["{log_probs}", "{float_t}"], 1, "integer dtype, got dtype float32"),
    "text-targets": (["{log_probs}", "{text_t}"], 1, "line 3: '1.5' is not an integer"),
    "out-of-range": (
        ["{log_probs}", "{range_t}", "--chunk-rows", "50"],
        1,
        f"targets {{range_t}}: Target 9 is out of bounds: target[123] = 9 is not in the class "
        f"range [0, {C}) and is not ignore_index (-100)",
    ),
    "probabilities-of-another-shape": (
        ["{logits}", "{wide_prob_t}"],
        1,
        f"class probabilities and must have the input's shape ({N}, {C}), got target shape "
        f"({N}, {C + 1})",
    ),
    "integer-probabilities": (
        ["{logits}", "{int_prob_t}"],
        1,
        f"a target of the input's shape ({N}, {C}) holds class probabilities and must be "
        "floating, got dtype int64",
    ),
    "probabilities-ignore-index": (
        ["{logits}", "{prob_t}", "--ignore-index", "0"],
        1,
        "ignore_index is not supported with a target of class probabilities",
    ),
    "integer-predictions": (["{int_x}", "{target}"], 1, "floating dtype"),
    "unbatched-predictions": (
        ["{flat_x}", "{target}"],
        1,
        f"expected shape (N, C) or (N, C, d1, ..., dK), got ({C},)",
    ),
    "weight-length": (
        ["{log_probs}", "{target}", "--weight", "1,2"],
        1,
        f"weight 1,2: weight tensor should be defined either for all {C} classes",
    ),
    "weight-not-numbers": (
        ["{log_probs}", "{target}", "--weight", "1,x"],
        1,
        "weight 1,x: item 2 'x' is not a number; expected a file or numbers separated by commas",
    ),
    "weight-missing": (
        ["{log_probs}", "{target}", "--weight", "{folder}/w.npy"],
        1,
        "weight {folder}/w.npy: no such file or directory",
    ),
    "out-folder-missing": (
        ["{log_probs}", "{target}", "--out", "{folder}/nope/r.json"],
        1,
        "{folder}/nope/r.json: its folder does not exist",
    ),
    # usage errors
    "no-targets": (["{log_probs}"], 2, "the following arguments are required: TARGET"),
    "bad-reduction": (
        ["{log_probs}", "{target}", "--reduction", "avg"],
        2,
        "invalid choice: 'avg'",
    ),
    "bad-chunk-rows": (
        ["{log_probs}", "{target}", "--chunk-rows", "0"],
        2,
        "expected a positive integer, got 0",
    ),
    "bad-smoothing": (
        ["{log_probs}", "{target}", "--label-smoothing", "1.5"],
        2,
        "--label-smoothing must be between 0.0 and 1.0, got 1.5",
    ),
    "z-loss-without-logits": (
        ["{log_probs}", "{target}", "--z-loss", "0.1"],
        2,
        "--z-loss 0.1 acts on logits: add --from-logits (see",
    ),
    "negative-z-loss": (
        ["{logits}", "{target}", "--from-logits", "--z-loss", "-1"],
        2,
        "--z-loss must be a finite real number >= 0, got -1.0",
    ),
    "softcap-without-logits": (
        ["{log_probs}", "{target}", "--softcap", "30"],
        2,
        "--softcap 30.0 acts on logits: add --from-logits (see",
    ),
    "zero-softcap": (
        ["{logits}", "{target}", "--from-logits", "--softcap", "0"],
        2,
        "--softcap must be None or a finite real number > 0, got 0.0",
    ),
    "bad-z-loss": (
        ["{logits}", "{target}", "--z-loss", "x"],
        2,
        "invalid float value: 'x'",
    ),
    "probabilities-per-class": (
        ["{logits}", "{prob_t}", "--from-logits", "--per-class"],
        2,
        "holds class probabilities: the per-class table (--per-class, --plot) and "
        "--calibration need class indices",
    ),
    "probabilities-calibration": (
        ["{logits}", "{prob_t}", "--from-logits", "--calibration"],
        2,
        "holds class probabilities: the per-class table (--per-class, --plot) and "
        "--calibration need class indices",
    ),
    "zero-bins": (
        ["{logits}", "{target}", "--calibration", "--bins", "0"],
        2,
        "argument --bins: expected a positive integer, got 0",
    ),
    "zero-top-k": (
        ["{logits}", "{target}", "--calibration", "--top-k", "1,0"],
        2,
        "argument --top-k: expected a positive integer, got 0",
    ),
    "top-k-over-classes": (
        ["{logits}", "{target}", "--calibration", "--top-k", "2,6"],
        2,
        "--top-k 6: expected at most the 5 classes",
    ),
    "bins-without-calibration": (
        ["{logits}", "{target}", "--bins", "10"],
        2,
        "--bins is a setting of the calibration report: add --calibration",
    ),
    "seed-without-bootstrap": (
        ["{logits}", "{target}", "--calibration", "--seed", "3"],
        2,
        "--seed seeds the resamples of --bootstrap: add --bootstrap R",
    ),
    "empty-out": (["{logits}", "{target}", "--out", ""], 2, "--out: expected a file name, got ''"),
    "empty-plot": (
        ["{logits}", "{target}", "--plot", ""],
        2,
        "--plot: expected a file name, got ''",
    ),
    "misspelled-option": (
        ["{logits}", "{target}", "--from-logit"],
        2,
        "unrecognized arguments: --from-logit (did you mean --from-logits?)",
    ),
    "misspelled-option-with-value": (
        ["{logits}", "{target}", "--chunk-row", "5"],
        2,
        "unrecognized arguments: --chunk-row 5 (did you mean --chunk-rows?)",
    ),
    "inproc-scheduler": (
        ["{logits}", "{target}", "--scheduler", "inproc://x"],
        2,
        "argument --scheduler: 'inproc://x': inproc:// names a scheduler inside one process",
    ),
    "scheduler-port-not-a-number": (
        ["{logits}", "{target}", "--scheduler", "localhost:notaport"],
        2,
        "argument --scheduler: 'localhost:notaport': expected an address as tcp://HOST:PORT",
    ),
    "bad-ignore-index": (
        ["{log_probs}", "{target}", "--ignore-index", "x"],
        2,
        "invalid int value: 'x'",
    ),
    "none-without-npy": (
        ["{log_probs}", "{target}", "--reduction", "none"],
        2,
        "save them with --out FILE.npy",
    ),
    "dask-and-scheduler": (
        ["{log_probs}", "{target}", "--dask", "--scheduler", "tcp://127.0.0.1:1"],
        2,
        "not allowed with argument",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_with_its_exit_code(case, data, bad, capsys):
    argv, expected_code, text = ERRORS[case]
    names = {**{k: str(v) for k, v in data.items() if isinstance(v, Path)}, **bad}
    names["folder"] = str(data["folder"])
    code, out, err = run(["eval", *(a.format(**names) for a in argv)], capsys)
    assert (code, out) == (expected_code, "")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert text.format(**names) in err, err


def test_nan_predictions_are_a_warning_with_the_count(data, bad, capsys):
    code, out, err = run(["eval", bad["nan_x"], data["target"], "--format", "json"], capsys)
    assert code == 0
    assert f"warning: predictions {bad['nan_x']} holds 3 NaN values" in err
    assert json.loads(out)["count"] == (data["arrays"]["target"] != IGNORE).sum()


def test_logits_without_from_logits_are_flagged(data, capsys):
    code, _, err = run(["eval", data["logits"], data["target"]], capsys)
    assert code == 0
    assert "does not hold log-probabilities" in err
    assert "--from-logits" in err
    assert run(["eval", data["log_probs"], data["target"]], capsys)[2] == ""


def test_plot_without_matplotlib_is_an_error(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    code, _, err = run(
        ["eval", data["log_probs"], data["target"], "--plot", tmp_path / "p.png"], capsys
    )
    assert code == 1
    assert err == "nllloss: error: --plot needs matplotlib (pip install 'nllloss[plot]')\n"


@once
def test_bad_input_in_a_subprocess_has_no_traceback(data, bad):
    done = run_subprocess("eval", data["log_probs"], bad["range_t"])
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("nllloss: error: targets")
    assert done.stderr.count("\n") == 1
