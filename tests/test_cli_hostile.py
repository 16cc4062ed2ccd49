"""``nllloss eval`` against hostile and careless input: no lost file, no hang, one line.

Each case of ``CASES`` builds its files in a fresh folder and gives the command line and the
text its one-line error must hold (or None where the run must succeed). Every run is bounded
by an alarm, so a read that blocks (a FIFO) or never ends (a device) fails the test instead
of hanging it. A fuzz test then mutates header fields and archive members at random.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nllloss
from nllloss._cli import main

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
N, C = 200, 5
RUN_SECONDS = 20  # a case's whole run; the lying headers took 49 s to 400 s before the fix

once = pytest.mark.parametrize("numpy_engine", ["compiled"], indirect=True)


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm(f"the run took over {RUN_SECONDS} s")


def run(argv, capsys, seconds=RUN_SECONDS) -> tuple[int, str, str]:
    """main(argv) under an alarm: a blocking open() is interrupted, and the test fails."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    try:
        code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        captured = capsys.readouterr()  # also after an exception: the next run starts clean
    return code, captured.out, captured.err


def assert_one_line(code, out, err, text, expected_code=1):
    assert (code, out) == (expected_code, ""), err
    assert err.count("\n") == 1, err
    assert err.startswith("nllloss"), err
    assert "Traceback" not in err
    assert text in err, err


# --- files --------------------------------------------------------------------------------


def log_probs(rows=N, classes=C, seed=0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, classes)).astype(np.float32)
    return torch.from_numpy(x).log_softmax(1).numpy()


def targets(rows=N, classes=C, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, rows)


def header(descr: str, shape: tuple, fortran: bool = False) -> str:
    """A .npy header's text, as NumPy writes it."""
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"


def npy_with_header(path: Path, header: str, payload: bytes = b"") -> Path:
    """A version 1.0 .npy file whose header text is ``header`` (padded as NumPy pads it)."""
    text = header.encode("latin1")
    text += b" " * ((-(10 + len(text) + 1)) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload)
    return path


def safetensors_file(path: Path, header: dict | bytes, payload: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    return path


def patch_zip(path: Path, *, flags: int | None = None, method: int | None = None) -> Path:
    """Rewrite the general-purpose flags or the compression method of the archive's first
    member, in its local header (offsets 6, 8) and its central directory entry (8, 10)."""
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    for offset, field in ((0, 6), (central, 8)):
        if flags is not None:
            data[offset + field : offset + field + 2] = struct.pack("<H", flags)
        if method is not None:
            data[offset + field + 2 : offset + field + 4] = struct.pack("<H", method)
    path.write_bytes(bytes(data))
    return path


def npz_member_with_header(path: Path, header: str, payload: bytes, compressed=True) -> Path:
    """An .npz whose one member ``x.npy`` has the given header text and payload."""
    member = npy_with_header(path.with_suffix(".member"), header, payload).read_bytes()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("x.npy", member)
    return path


def zarr_v2(path: Path, array: np.ndarray, compressor: str, chunks=(50, C)) -> Path:
    """A Zarr v2 array under ``compressor`` whose chunk files are then overwritten with junk."""
    import zarr
    from numcodecs import Blosc, Zlib, Zstd

    codec = {"blosc": Blosc(), "zstd": Zstd(), "zlib": Zlib()}[compressor]
    zarr.create_array(str(path), data=array, chunks=chunks, zarr_format=2, compressors=codec)
    for chunk in path.iterdir():
        if not chunk.name.startswith("."):
            chunk.write_bytes(b"not a compressed chunk at all" * 3)
    return path


# --- the cases ---------------------------------------------------------------------------
# Each builder gets a fresh folder and returns (argv after 'eval', text of the one-line
# error); usage errors (exit 2) return a third element, 2.


def _pair(folder: Path):
    x, t = folder / "x.npy", folder / "t.npy"
    np.save(x, log_probs())
    np.save(t, targets())
    return x, t


def fifo(folder: Path, name: str) -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def case_fifo_npy(f):
    _, t = _pair(f)
    return [fifo(f, "p.npy"), t], "p.npy: is a FIFO, not a regular file"


def case_fifo_npz(f):
    _, t = _pair(f)
    return [fifo(f, "p.npz"), t], "p.npz: is a FIFO, not a regular file"


def case_fifo_safetensors(f):
    _, t = _pair(f)
    return [fifo(f, "p.safetensors"), t], "p.safetensors: is a FIFO, not a regular file"


def case_fifo_text_targets(f):
    x, _ = _pair(f)
    return [x, fifo(f, "t.txt")], "targets", "t.txt: is a FIFO"


def case_fifo_weight(f):
    x, t = _pair(f)
    return [x, t, "--weight", fifo(f, "w.npy")], "weight", "w.npy: is a FIFO"


def case_dev_zero(f):
    _, t = _pair(f)
    (f / "z.npy").symlink_to("/dev/zero")
    return [f / "z.npy", t], "z.npy: is a character device, not a regular file"


def case_dev_urandom(f):
    _, t = _pair(f)
    (f / "u.safetensors").symlink_to("/dev/urandom")
    return [f / "u.safetensors", t], "u.safetensors: is a character device"


def case_huge_npy_rows(f):
    x = npy_with_header(f / "x.npy", header("<f4", (2**60, 2, 0)))
    t = npy_with_header(f / "t.npy", header("<i8", (2**60, 0)))
    return [x, t], "x.npy: the shape [1152921504606846976, 2, 0] is too large"


def case_npz_declares_8_gib(f):
    text = header("<f4", (1073741824, 2))
    x = npz_member_with_header(f / "x.npz", text, b"\0" * 4096)
    _, t = _pair(f)
    return [
        x,
        t,
    ], "inflates to 8589934592 bytes, over the limit of 1073741824; raise it with --max-inflate"


def case_npz_over_a_lowered_cap(f):
    np.savez_compressed(f / "x.npz", x=log_probs())
    _, t = _pair(f)
    return [
        f / "x.npz",
        t,
        "--max-inflate",
        "1K",
    ], "over the limit of 1024; raise it with --max-inflate"


def case_npz_encrypted(f):
    np.savez_compressed(f / "x.npz", x=log_probs())
    _, t = _pair(f)
    patch_zip(f / "x.npz", flags=0x1)
    return [f / "x.npz", t], "x.npz: cannot read this .npz member (RuntimeError"


def case_npz_encrypted_stored(f):
    np.savez(f / "x.npz", x=log_probs())
    _, t = _pair(f)
    patch_zip(f / "x.npz", flags=0x1)
    return [f / "x.npz", t], "x.npz: the .npz member is encrypted"


def case_npz_method_99(f):
    np.savez_compressed(f / "x.npz", x=log_probs())
    _, t = _pair(f)
    patch_zip(f / "x.npz", method=99)
    return [f / "x.npz", t], "x.npz: cannot read this .npz member"


def case_npz_method_93(f):
    np.savez_compressed(f / "x.npz", x=log_probs())
    _, t = _pair(f)
    patch_zip(f / "x.npz", method=93)
    return [f / "x.npz", t], "x.npz: cannot read this .npz member"


def case_npz_corrupt_deflate(f):
    np.savez_compressed(f / "x.npz", x=log_probs())
    _, t = _pair(f)
    data = bytearray((f / "x.npz").read_bytes())
    start = 30 + len("x.npy")  # the member's deflate stream
    data[start + 10 : start + 60] = b"\xff" * 50
    (f / "x.npz").write_bytes(bytes(data))
    return [f / "x.npz", t], "x.npz: cannot read this .npz member"


def case_npz_object_member(f):
    np.savez_compressed(f / "x.npz", x=np.array([object()] * 4, dtype=object))
    _, t = _pair(f)
    return [f / "x.npz", t], "x.npz: holds dtype object; expected numbers"


def case_npz_member_cut_short(f):
    text = header("<f4", (200, 5))
    x = npz_member_with_header(f / "x.npz", text, b"\0" * 100)
    _, t = _pair(f)
    return [x, t], "x.npz: the member is cut short (100 bytes; float32 (200, 5) needs 4000)"


def case_npz_stored_member_runs_past_its_end(f):
    text = header("<f4", (200, 5))
    x = npz_member_with_header(f / "x.npz", text, b"\0" * 100, compressed=False)
    _, t = _pair(f)
    return [x, t], "x.npz: the member is cut short (100 bytes; float32 (200, 5) needs 4000)"


def case_fortran_npy_cut_short(f):
    _, t = _pair(f)
    np.save(f / "x.npy", np.asfortranarray(log_probs()))
    with (f / "x.npy").open("r+b") as file:
        file.truncate(1000)
    return [f / "x.npy", t], "x.npy: the file is cut short (1000 bytes"


def case_npy_negative_shape(f):
    _, t = _pair(f)
    x = npy_with_header(f / "x.npy", header("<f4", (-200, 5)))
    return [x, t], "x.npy: the shape [-200, 5] has a negative dimension"


def _safetensors(f, entry: dict, payload: bytes = b"\0" * 4000, raw: bytes | None = None):
    path = safetensors_file(f / "x.safetensors", raw if raw is not None else {"x": entry}, payload)
    _, t = _pair(f)
    return path, t


def case_safetensors_nested_header(f):
    raw = b"[" * 200_000 + b"]" * 200_000
    x, t = _safetensors(f, {}, raw=raw)
    return [x, t], "x.safetensors: not a valid .safetensors file (bad header)"


def case_safetensors_offsets_before_the_data(f):
    entry = {"dtype": "F32", "shape": [200, 5], "data_offsets": [-(10**6), 4000 - 10**6]}
    x, t = _safetensors(f, entry)
    return [x, t], "x.safetensors: not a valid .safetensors file (data_offsets [-1000000, -996000]"


def case_safetensors_offsets_into_the_header(f):
    entry = {"dtype": "F32", "shape": [200, 5], "data_offsets": [-64, 4000 - 64]}
    x, t = _safetensors(f, entry)
    return [x, t], "x.safetensors: not a valid .safetensors file (data_offsets [-64, 3936]"


def case_safetensors_huge_shape(f):
    entry = {"dtype": "F32", "shape": [10**30, 5], "data_offsets": [0, 4000]}
    x, t = _safetensors(f, entry)
    return [x, t], "x.safetensors: the shape [1000000000000000000000000000000, 5] is too large"


def case_safetensors_float_shape(f):
    entry = {"dtype": "F32", "shape": [200.7, 5], "data_offsets": [0, 4000]}
    x, t = _safetensors(f, entry)
    return [x, t], "x.safetensors: the shape [200.7, 5] is not a list of integers"


def case_safetensors_negative_shape(f):
    entry = {"dtype": "F32", "shape": [-200, -5], "data_offsets": [0, 4000]}
    x, t = _safetensors(f, entry)
    return [x, t], "x.safetensors: the shape [-200, -5] has a negative dimension"


def case_safetensors_list_dtype(f):
    entry = {"dtype": ["F32"], "shape": [200, 5], "data_offsets": [0, 4000]}
    x, t = _safetensors(f, entry)
    return [x, t], "x.safetensors: not a valid .safetensors file (bad entry)"


def case_zarr_garbage_blosc(f):
    _, t = _pair(f)
    return [zarr_v2(f / "x.zarr", log_probs(), "blosc"), t], "x.zarr: cannot read rows 0..200 ("


def case_zarr_garbage_zstd(f):
    _, t = _pair(f)
    return [zarr_v2(f / "x.zarr", log_probs(), "zstd"), t], "x.zarr: cannot read rows 0..200 ("


def case_zarr_garbage_zlib(f):
    _, t = _pair(f)
    return [zarr_v2(f / "x.zarr", log_probs(), "zlib"), t], "x.zarr: cannot read rows 0..200 ("


def case_zarr_zero_chunks(f):
    import zarr

    zarr.create_array(str(f / "x.zarr"), shape=(N, C), chunks=(0, C), dtype="f4")
    _, t = _pair(f)
    return [f / "x.zarr", t], "x.zarr: the Zarr chunks [0, 5] have a dimension below 1"


def case_binary_text_targets(f):
    x, _ = _pair(f)
    (f / "t.txt").write_bytes(b"1\n2\n\xff\xfe\n")
    return [x, f / "t.txt"], "t.txt: not a text file of numbers (byte 4 is not UTF-8)"


def case_weight_empty_item(f):
    x, t = _pair(f)
    return [x, t, "--weight", "1,,2,1,1"], "weight 1,,2,1,1: item 2 is empty"


def case_scheduler_empty(f):
    x, t = _pair(f)
    return [x, t, "--scheduler", ""], "--scheduler: expected an address", 2


def case_dashboard_without_dask(f):
    x, t = _pair(f)
    return [x, t, "--dashboard", "127.0.0.1:0"], "--dashboard serves the local cluster", 2


def case_option_prefix(f):
    x, t = _pair(f)
    return (
        [x, t, "--from-logit"],
        "unrecognized arguments: --from-logit (did you mean --from-logits?) "
        "(see nllloss eval --help)",
        2,
    )


def case_out_is_the_predictions(f):
    x, t = _pair(f)
    return [x, t, "--reduction", "none", "--out", x], f"--out {x}: is the input predictions"


def case_out_is_a_hard_link_to_the_targets(f):
    x, t = _pair(f)
    os.link(t, f / "link.npy")
    return [x, t, "--out", f / "link.npy"], "link.npy: is the input targets"


def case_out_is_a_symlink_to_the_predictions(f):
    x, t = _pair(f)
    (f / "link.npy").symlink_to(x)
    return [x, t, "--reduction", "none", "--out", f / "link.npy"], "is the input predictions"


def case_out_is_the_weight(f):
    x, t = _pair(f)
    np.save(f / "w.npy", np.ones(C, np.float32))
    return [x, t, "--weight", f / "w.npy", "--out", f / "w.npy"], "is the input weight"


def case_out_inside_a_zarr_input(f):
    import zarr

    zarr.create_array(str(f / "x.zarr"), data=log_probs(), chunks=(50, C))
    _, t = _pair(f)
    out = f / "x.zarr" / "zarr.json"
    return [f / "x.zarr", t, "--out", out], "zarr.json: is the input predictions"


def case_plot_and_out_the_same_file(f):
    x, t = _pair(f)
    return [x, t, "--out", f / "r.png", "--plot", f / "r.png"], "--plot", "names the same file"


def case_out_is_a_fifo(f):
    x, t = _pair(f)
    return [x, t, "--out", fifo(f, "r.json")], "--out", "r.json: is a FIFO"


CASES = {name[5:]: builder for name, builder in globals().items() if name.startswith("case_")}


@once
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_in_one_line(case, tmp_path, capsys):
    built = CASES[case](tmp_path)
    argv, *texts = built
    code = 2 if texts[-1] == 2 else 1
    texts = [t for t in texts if not isinstance(t, int)]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    started = time.monotonic()
    result = run(["eval", *argv], capsys)
    assert time.monotonic() - started < RUN_SECONDS
    for text in texts:
        assert_one_line(*result, text, expected_code=code)
    after = {p: p.read_bytes() for p in before}
    assert after == before, "an input changed"
    left = sorted(p.name for p in tmp_path.rglob("*.partial*"))
    assert not left, left


# --- what the refusals protect ---------------------------------------------------------------


@once
def test_a_failed_run_leaves_the_old_output_and_no_temporary(tmp_path, capsys):
    x, t = _pair(tmp_path)
    bad = targets()
    bad[150] = C  # out of range in the second block: the first block's losses are written
    np.save(tmp_path / "bad.npy", bad)
    out = tmp_path / "losses.npy"
    out.write_bytes(b"the previous results")
    argv = ["eval", x, tmp_path / "bad.npy", "--reduction", "none", "--out", out]
    code, _, err = run([*argv, "--chunk-rows", 100], capsys)
    assert code == 1, err
    assert out.read_bytes() == b"the previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "losses.npy", "t.npy", "x.npy"]
    # and a run that completes replaces it, keeping its permissions
    out.chmod(0o640)
    code, _, err = run(["eval", x, t, "--reduction", "none", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    expected = F.nll_loss(
        torch.from_numpy(log_probs()), torch.from_numpy(targets()), reduction="none"
    )
    np.testing.assert_array_equal(np.load(out), expected.numpy())
    assert out.stat().st_mode & 0o777 == 0o640


@once
def test_empty_rows_of_a_huge_header_take_no_time(tmp_path, capsys):
    """(2**44, 2, 0): no element at all, so one empty block, as torch's loss over nothing."""
    rows = 2**44
    for name, writer in (
        (
            "npy",
            lambda: (
                npy_with_header(tmp_path / "x.npy", header("<f4", (rows, 2, 0))),
                npy_with_header(tmp_path / "t.npy", header("<i8", (rows, 0))),
            ),
        ),
        (
            "safetensors",
            lambda: (
                safetensors_file(
                    tmp_path / "x.safetensors",
                    {"x": {"dtype": "F32", "shape": [rows, 2, 0], "data_offsets": [0, 0]}},
                    b"",
                ),
                safetensors_file(
                    tmp_path / "t.safetensors",
                    {"t": {"dtype": "I64", "shape": [rows, 0], "data_offsets": [0, 0]}},
                    b"",
                ),
            ),
        ),
    ):
        x, t = writer()
        started = time.monotonic()
        code, out, err = run(["eval", x, t, "--per-class", "--format", "json", "--quiet"], capsys)
        assert time.monotonic() - started < 5, name
        assert code == 0, err
        expected = F.nll_loss(torch.empty(3, 2, 0), torch.empty(3, 0, dtype=torch.int64))
        assert torch.isnan(expected)  # torch's mean over no element
        assert json.loads(out) == {
            "loss": None,
            "reduction": "mean",
            "total_weight": 0.0,
            "count": 0,
            "ignored": 0,
            "perplexity": None,
            "per_class": [],
        }


@once
def test_empty_rows_of_a_huge_header_on_dask(tmp_path):
    rows = 2**44
    x = npy_with_header(tmp_path / "x.npy", header("<f4", (rows, 2, 0)))
    t = npy_with_header(tmp_path / "t.npy", header("<i8", (rows, 0)))
    done = subprocess.run(
        [sys.executable, "-m", "nllloss", "eval", x, t, "--dask", "--format", "json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["count"] == 0


@once
def test_a_raised_inflate_limit_reads_the_member(tmp_path, capsys):
    np.savez_compressed(tmp_path / "x.npz", x=log_probs())
    _, t = _pair(tmp_path)
    code, out, err = run(
        ["eval", tmp_path / "x.npz", t, "--max-inflate", "4K", "--format", "json"], capsys
    )
    assert code == 0, err
    expected = F.nll_loss(torch.from_numpy(log_probs()), torch.from_numpy(targets()))
    assert np.float32(json.loads(out)["loss"]) == expected.numpy()


@once
def test_closed_stdout_is_one_line(tmp_path):
    x, t = _pair(tmp_path)
    done = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m nllloss eval "{x}" "{t}" >&-'],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == "nllloss: error: stdout is closed: name a report file with --out FILE\n"


@once
def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert (code, out) == (0, f"nllloss {nllloss.__version__}\n")
    done = subprocess.run(
        [sys.executable, "-m", "nllloss", "--version"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.stdout == f"nllloss {nllloss.__version__}\n"


@once
def test_the_local_cluster_serves_no_dashboard_unless_asked():
    from nllloss._cli._evaluate import dask_client

    with dask_client(None) as client:
        scheduler = client.cluster.scheduler
        assert "bokeh" not in str(type(scheduler.http_application)).lower()
        assert not any(
            "status" in str(rule.matcher)
            for rule in scheduler.http_application.wildcard_router.rules
        )
        assert scheduler.http_server.port != 8787
        assert scheduler.http_server.address == "127.0.0.1"


# --- fuzz: header fields and archive members --------------------------------------------------

FUZZ = settings(
    # a file per example and a run of the CLI: a fifth of the profile's examples
    max_examples=max(20, settings.default.max_examples // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

dimensions = st.one_of(
    st.integers(-3, 8),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(st.characters(max_codepoint=255), max_size=2),
    st.none(),
)
shapes = st.lists(dimensions, max_size=4)
NPY_DESCRS = ["<f4", ">f8", "<f2", "<i8", "|u1", "|O", "V8", "<U3", "<c8", "<M8[s]", "?", "xyz"]


def _fuzz_run(folder: Path, spec: str, capsys) -> None:
    """main on a fuzzed PRED: it returns (no exception, no hang); an error is one line
    naming the file."""
    np.save(folder / "t.npy", np.zeros(4, np.int64))
    code, out, err = run(["eval", spec, folder / "t.npy", "--quiet"], capsys, seconds=10)
    assert code in (0, 1), err
    if code == 1:
        assert out == "", err
        assert err.count("\n") == 1, err
        assert err.startswith(f"nllloss: error: predictions {spec}"), err


@once
@FUZZ
@given(
    descr=st.one_of(
        st.sampled_from(NPY_DESCRS),
        st.just([("a", "<f4")]),
        st.text(st.characters(max_codepoint=255), max_size=4),  # a header is latin-1
    ),
    fortran=st.one_of(st.booleans(), st.integers(0, 2), st.none()),
    shape=st.one_of(shapes.map(tuple), shapes, st.integers(0, 4)),
    payload=st.binary(max_size=256),
)
def test_fuzzed_npy_headers(tmp_path_factory, capsys, descr, fortran, shape, payload):
    folder = tmp_path_factory.mktemp("npy")
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    npy_with_header(folder / "x.npy", text, payload)
    _fuzz_run(folder, str(folder / "x.npy"), capsys)


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", "f32"]


@once
@FUZZ
@given(
    dtype=st.one_of(
        st.sampled_from(SAFETENSORS_DTYPES),
        st.integers(),
        st.lists(st.text(max_size=2), max_size=2),
    ),
    shape=st.one_of(shapes, st.integers(), st.text(max_size=3)),
    offsets=st.one_of(
        st.lists(st.integers(-(2**65), 2**65), max_size=3),
        st.lists(st.integers(-64, 128), min_size=2, max_size=2),
        st.lists(st.floats(), max_size=2),
        st.none(),
    ),
    extra=st.dictionaries(st.sampled_from(["__metadata__", "y", "x "]), st.integers(), max_size=2),
    payload=st.binary(max_size=128),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
)
def test_fuzzed_safetensors_headers(
    tmp_path_factory, capsys, dtype, shape, offsets, extra, payload, length_delta
):
    folder = tmp_path_factory.mktemp("safetensors")
    text = json.dumps(
        {"x": {"dtype": dtype, "shape": shape, "data_offsets": offsets}, **extra}
    ).encode()
    path = folder / "x.safetensors"
    path.write_bytes(struct.pack("<Q", max(len(text) + length_delta, 0)) + text + payload)
    _fuzz_run(folder, f"{path}:x", capsys)


@once
@FUZZ
@given(
    compressed=st.booleans(),
    method=st.one_of(st.none(), st.sampled_from([0, 1, 8, 12, 14, 93, 95, 98, 99])),
    flags=st.one_of(st.none(), st.sampled_from([0, 1, 8, 0x41, 0x800])),
    flips=st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**4)),
)
def test_fuzzed_npz_members(tmp_path_factory, capsys, compressed, method, flags, flips, cut):
    folder = tmp_path_factory.mktemp("npz")
    path = folder / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=log_probs(4, 3))
    if method is not None or flags is not None:
        patch_zip(path, flags=flags, method=method)
    data = bytearray(path.read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    _fuzz_run(folder, str(path), capsys)


# --- what changes under the reader, peers that are no scheduler, signals ---------------------


@once
@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_file_changed_while_read_is_one_line(tmp_path, capsys, monkeypatch, change):
    """The first block is read, then the file is cut short or saved over (as np.save does,
    in place): the next block is refused in one line, where a memory map gave SIGBUS."""
    from nllloss._cli import _io

    x, t = _pair(tmp_path)
    read = _io.FileRows.rows
    blocks = []

    def rows_then_change(self, start, stop):
        out = read(self, start, stop)
        if self.path == str(x) and not blocks:
            blocks.append(start)
            if change == "truncate":
                os.truncate(x, 200)
            else:
                time.sleep(0.01)  # a new modification time on coarse clocks too
                np.save(x, log_probs(seed=5))
        return out

    monkeypatch.setattr(_io.FileRows, "rows", rows_then_change)
    result = run(["eval", x, t, "--chunk-rows", 50, "--quiet"], capsys)
    assert_one_line(*result, "x.npy: the file changed while it was read")


class _Peer:
    """A TCP peer on the loopback interface that accepts and then says ``reply`` (or nothing)."""

    def __init__(self, reply: bytes | None):
        import socket
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.reply, self.connections = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)
            if self.reply is not None:
                connection.sendall(self.reply)

    def close(self):
        self.server.close()
        for connection in self.connections:
            connection.close()


@once
@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (None, "no answer within 2 s"),
        (b"\xff" * 64 + b"garbage" * 100, "the peer does not answer as one"),
    ],
)
def test_a_peer_that_is_no_scheduler_is_one_line(tmp_path, capsys, monkeypatch, reply, text):
    from nllloss._cli import _evaluate

    monkeypatch.setattr(_evaluate, "SCHEDULER_TIMEOUT", 2)
    peer = _Peer(reply)
    try:
        x, t = _pair(tmp_path)
        started = time.monotonic()
        result = run(["eval", x, t, "--scheduler", peer.address], capsys)
        assert time.monotonic() - started < 10
    finally:
        peer.close()
    assert_one_line(*result, f"cannot reach the Dask scheduler at {peer.address}: {text}")


def _losses_run(folder: Path, *extra) -> subprocess.Popen:
    """--reduction none --out of a file large enough to take a while, in a subprocess."""
    rows, classes = 20000, 200
    x = np.lib.format.open_memmap(folder / "x.npy", "w+", np.float32, (rows, classes))
    x[:] = np.random.default_rng(0).standard_normal((1, classes))
    del x
    np.save(folder / "t.npy", np.zeros(rows, np.int64))
    (folder / "losses.npy").write_bytes(b"the old losses")
    argv = ["eval", folder / "x.npy", folder / "t.npy", "--from-logits", "--reduction", "none"]
    argv += ["--out", folder / "losses.npy", "--chunk-rows", "16", "--quiet", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "nllloss", *map(str, argv)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@once
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopping_signal_leaves_no_temporary(tmp_path, signum):
    process = _losses_run(tmp_path)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".losses.npy.*.partial.npy")):  # writing has begun
        assert time.monotonic() < deadline, "no temporary file after 60 s"
        assert process.poll() is None, process.stderr
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err
    assert (tmp_path / "losses.npy").read_bytes() == b"the old losses"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.npy", "t.npy", "x.npy"]


@once
def test_a_file_size_limit_leaves_no_temporary(tmp_path):
    import resource

    def limit():  # 40 KB: the 20000 float32 losses need 80 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    process = _losses_run(tmp_path)
    process.kill()
    process.wait()
    argv = ["eval", tmp_path / "x.npy", tmp_path / "t.npy", "--from-logits", "--reduction"]
    argv += ["none", "--out", tmp_path / "losses.npy", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "nllloss", *map(str, argv)],
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "File too large" in done.stderr, done.stderr
    assert (tmp_path / "losses.npy").read_bytes() == b"the old losses"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.npy", "t.npy", "x.npy"]
