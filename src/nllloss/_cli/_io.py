"""Arrays named on the command line: ``.npy``, ``.npz[:KEY]``, ``.safetensors[:KEY]``, Zarr, text.

Every reader returns a *source*: a small, picklable description of where the array's bytes
are, with its shape and dtype, that reads a range of rows on demand (``rows``) and supports
the basic slicing ``dask.array.from_array`` needs. Nothing is read until rows are asked for,
so a 50 GB file costs only the rows being evaluated; the sources travel to Dask workers as
descriptions (path and offset), never as data.

Arrays stored as raw bytes (``.npy``, uncompressed ``.npz`` members, ``.safetensors``
tensors, in C or Fortran order) are read one row range at a time with plain reads, never
memory-mapped: memory holds one block, and a file cut short or rewritten while it is read
ends the run with a message instead of a SIGBUS. Compressed ``.npz`` members and text files
are read whole.

Nothing a file says is trusted beyond the bytes it holds: only regular files (and Zarr
directories) are opened, so a FIFO or a device cannot block or stream without end; a
header's shape must be non-negative integers whose bytes the file holds; a compressed member
may inflate to ``max_inflate`` bytes at most (``--max-inflate``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".npy", ".npz", ".safetensors", ".zarr", ".txt")

# A compressed .npz member is inflated into memory whole: by default to at most this many
# bytes (--max-inflate raises it). A policy, not a measurement: four times the 256 MiB
# that --chunk-rows' default block would read, well under the memory of a small machine.
MAX_INFLATE = 1 << 30


class UserError(Exception):
    """A problem the user can fix (a file, a key, a missing extra): one line, exit code 1."""


# safetensors dtype names (format spec, huggingface/safetensors README): all little-endian.
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


class _Rows:
    """What every source offers besides ``rows``: ``ndim`` and the basic slicing (row ranges
    of step 1, then anything NumPy takes) that ``dask.array.from_array`` uses."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        first = index[0] if index else slice(None)
        start, stop, step = first.indices(self.shape[0])
        if step != 1:
            raise IndexError("only row ranges of step 1 are read")
        return self.rows(start, stop)[(slice(None), *index[1:])]


@dataclass(frozen=True)
class FileRows(_Rows):
    """An array stored as raw bytes at ``offset`` in the file at ``path`` (C order, or
    Fortran order with ``fortran``), read a block of rows at a time with plain reads.

    Plain reads, not a memory map: a file cut short while it is read ends the read with a
    message, where a mapped page past the new end would kill the process (SIGBUS). ``stamp``
    is the file's (inode, size, modification time) when it was opened; a block read from a
    file whose stamp changed is refused, so a file rewritten under the reader (``np.save``
    over it) cannot mix old and new rows.
    """

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    label: str  # how the user named it, for messages
    stamp: tuple[int, int, int]
    fortran: bool = False

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, read into a new C-ordered array."""
        stop = min(stop, self.shape[0])
        start = min(start, stop)
        rows, tail = stop - start, math.prod(self.shape[1:])
        out = np.empty((rows, *self.shape[1:]), dtype=self.dtype)
        if out.size == 0:
            return out
        itemsize = self.dtype.itemsize
        with open(self.path, "rb", buffering=0) as file:
            self._check_unchanged(file)
            if not self.fortran:
                self._read(file, out, self.offset + start * tail * itemsize)
            else:  # element (i, J) of the rows and the trailing (Fortran) index J
                columns = np.empty((tail, rows), dtype=self.dtype)
                for j in range(tail):
                    position = self.offset + (j * self.shape[0] + start) * itemsize
                    self._read(file, columns[j], position)
                out[...] = columns.T.reshape(out.shape, order="F")
            self._check_unchanged(file)
        return out

    def _read(self, file, into: np.ndarray, position: int) -> None:
        view = memoryview(into.reshape(-1).view(np.uint8))
        file.seek(position)
        done = 0
        while done < len(view):
            count = file.readinto(view[done:])
            if not count:
                raise UserError(
                    f"{self.label}: the file changed while it was read (it ends at byte "
                    f"{position + done}, before the array's end)"
                )
            done += count

    def _check_unchanged(self, file) -> None:
        if file_stamp(os.fstat(file.fileno())) != self.stamp:
            raise UserError(
                f"{self.label}: the file changed while it was read (rewritten, cut short or "
                "grown); evaluate it once it is complete"
            )

    def __dask_tokenize__(self):
        return (
            type(self).__name__,
            self.path,
            self.offset,
            self.shape,
            self.dtype.str,
            self.stamp,
            self.fortran,
        )


def file_stamp(status: os.stat_result) -> tuple[int, int, int]:
    """What tells a file's versions apart: inode, size and modification time."""
    return (status.st_ino, status.st_size, status.st_mtime_ns)


@dataclass(frozen=True, eq=False)
class InMemory(_Rows):
    """An array held in memory: text, compressed ``.npz`` members, arrays given to
    :func:`nllloss.evaluate`."""

    array: np.ndarray
    label: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


@dataclass(frozen=True)
class ZarrRows(_Rows):
    """An array of a Zarr store (``key`` names it inside a group), opened where it is read."""

    path: str
    key: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    label: str

    def rows(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        array = _open_zarr(self.path, self.key, self.label)
        try:
            return np.asarray(array[start:stop])
        except Exception as error:  # codecs raise their own types for a corrupt chunk
            raise UserError(
                f"{self.label}: cannot read rows {start}..{stop} ({type(error).__name__}: "
                f"{_one_line(error)})"
            ) from None

    def __dask_tokenize__(self):
        return (type(self).__name__, self.path, self.key, self.shape, self.dtype.str)


Source = FileRows | InMemory | ZarrRows


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``'a.npz:x'`` -> (a.npz, 'x'); a colon counts only after a suffix we read."""
    head, colon, key = spec.rpartition(":")
    if colon and head.lower().endswith(SUFFIXES):
        return Path(head), key
    return Path(spec), None


def open_array(
    spec: str, role: str, *, text_dtype: Any = None, max_inflate: int = MAX_INFLATE
) -> Source:
    """The array named ``spec`` (a path, or ``path:key`` for a container).

    ``role`` ('predictions', 'targets', 'weight') names it in messages; ``text_dtype`` is the
    dtype a ``.txt`` file is read in (None: text is refused); ``max_inflate`` bounds the
    bytes a compressed ``.npz`` member may inflate to.
    """
    path, key = split_spec(spec)
    label = f"{role} {spec}"
    suffix = path.suffix.lower()
    if not path.exists():
        raise UserError(f"{label}: no such file or directory")
    if path.is_dir():
        if suffix == ".zarr" or _looks_like_zarr(path):
            return _zarr_source(path, key, label)
        raise UserError(f"{label}: is a directory, not a Zarr store")
    require_regular_file(path, label)
    if suffix == ".zarr":
        return _zarr_source(path, key, label)
    if key is not None and suffix in (".npy", ".txt"):
        raise UserError(f"{label}: a {suffix} file holds one array; drop ':{key}'")
    try:
        if suffix == ".npy":
            return _npy_source(path, label)
        if suffix == ".npz":
            return _npz_source(path, key, label, max_inflate)
        if suffix == ".safetensors":
            return _safetensors_source(path, key, label)
        if suffix == ".txt" and text_dtype is not None:
            return InMemory(_read_text(path, np.dtype(text_dtype), label), label)
    except OSError as error:
        raise UserError(f"{label}: {error.strerror or error}") from None
    text = ", a .txt file" if text_dtype is not None else ""
    raise UserError(
        f"{label}: unknown format {suffix or '(no suffix)'!r}: expected .npy, .npz[:KEY], "
        f".safetensors[:KEY], a .zarr store{text}"
    )


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def require_regular_file(path: Path, label: str) -> None:
    """Refuse what is not a regular file (after symlinks): a FIFO blocks, a device never ends."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
        raise UserError(f"{label}: is {kind}, not a regular file")


def _npy_header(file, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(file)
        else:
            header = np.lib.format.read_array_header_2_0(file)
    except UserError:
        raise
    except Exception as error:  # NumPy's parser of the header's text raises what it meets
        raise UserError(f"{label}: not a valid .npy array ({_one_line(error)})") from None
    shape, fortran, dtype = header
    return checked_shape(shape, dtype, label), fortran, dtype


def checked_shape(shape, dtype: np.dtype, label: str) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints, refused when it is none or NumPy cannot hold it."""
    if not all(type(d) is int for d in shape):  # bool, float: not a dimension
        raise UserError(f"{label}: the shape {list(shape)} is not a list of integers")
    if any(d < 0 for d in shape):
        raise UserError(f"{label}: the shape {list(shape)} has a negative dimension")
    # NumPy refuses arrays whose nonzero dimensions' bytes exceed its index range, even
    # when another dimension is 0.
    if dtype.itemsize * math.prod(d for d in shape if d) > np.iinfo(np.intp).max:
        raise UserError(f"{label}: the shape {list(shape)} is too large for an array")
    return tuple(shape)


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of an array (Python ints: no int64 overflow for a header's huge shape)."""
    return dtype.itemsize * math.prod(shape)


def _checked_dtype(dtype: np.dtype, label: str) -> np.dtype:
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise UserError(f"{label}: holds dtype {dtype}; expected numbers")
    return dtype


def _require_bytes(path: Path, offset: int, shape, dtype: np.dtype, label: str) -> None:
    needed = offset + nbytes(shape, dtype)
    size = path.stat().st_size
    if size < needed:
        raise UserError(
            f"{label}: the file is cut short ({size} bytes; {dtype} {shape} needs {needed})"
        )


def _file_rows(path: Path, offset: int, shape, dtype: np.dtype, label: str, fortran=False):
    """A FileRows, once the file is known to hold all of its bytes."""
    _require_bytes(path, offset, shape, dtype, label)
    stamp = file_stamp(path.stat())
    return FileRows(str(path), offset, shape, dtype, label, stamp, fortran and len(shape) > 1)


def _npy_source(path: Path, label: str) -> Source:
    with path.open("rb") as file:
        shape, fortran, dtype = _npy_header(file, label)
        offset = file.tell()
    dtype = _checked_dtype(dtype, label)
    return _file_rows(path, offset, shape, dtype, label, fortran)


def _pick_key(names: list[str], key: str | None, label: str, path: Path) -> str:
    if key is None:
        if len(names) == 1:
            return names[0]
        listed = ", ".join(names) or "nothing"
        raise UserError(f"{label}: holds {listed}; name one as {path}:KEY")
    if key not in names:
        raise UserError(f"{label}: no array {key!r} (it holds {', '.join(names) or 'nothing'})")
    return key


# A zip local file header: signature, then fixed fields; the name and extra lengths are the
# last two 16-bit fields (APPNOTE.TXT, section 4.3.7).
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")


def _npz_source(path: Path, key: str | None, label: str, max_inflate: int) -> Source:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {
                info.filename[:-4]: info
                for info in archive.infolist()
                if info.filename.endswith(".npy")
            }
            info = members[_pick_key(list(members), key, label, path)]
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    return InMemory(
                        _inflate(_MemberStream(member, label), label, max_inflate), label
                    )
    except UserError:
        raise
    except zipfile.BadZipFile as error:
        raise UserError(f"{label}: not a valid .npz file ({_one_line(error)})") from None
    except Exception as error:
        raise _member_error(error, label) from None
    if info.flag_bits & 0x1:  # a stored member's bytes would be read as they are
        raise UserError(f"{label}: the .npz member is encrypted")
    with path.open("rb") as file:
        file.seek(info.header_offset)
        local_header = file.read(_ZIP_LOCAL_HEADER.size)
        if len(local_header) < _ZIP_LOCAL_HEADER.size:
            raise UserError(f"{label}: not a valid .npz file (cut short)")
        signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(local_header)
        if signature != b"PK\x03\x04":
            raise UserError(f"{label}: not a valid .npz file")
        file.seek(name_length + extra_length, 1)
        data_start = file.tell()
        shape, fortran, dtype = _npy_header(file, label)
        offset = file.tell()
    dtype = _checked_dtype(dtype, label)
    # The array's bytes must lie inside the member, not run on into the next one.
    held = info.file_size - (offset - data_start)
    if nbytes(shape, dtype) > held:
        raise UserError(
            f"{label}: the member is cut short ({max(held, 0)} bytes; {dtype} {shape} needs "
            f"{nbytes(shape, dtype)})"
        )
    return _file_rows(path, offset, shape, dtype, label, fortran)


def _member_error(error: Exception, label: str) -> UserError:
    # zipfile and its decompressors raise their own types: an unsupported method
    # (NotImplementedError), an encrypted member (RuntimeError), a corrupt stream
    # (zlib.error, lzma.LZMAError, OSError from bz2, EOFError), a bad CRC (BadZipFile).
    return UserError(
        f"{label}: cannot read this .npz member ({type(error).__name__}: {_one_line(error)})"
    )


class _MemberStream:
    """A compressed member whose read errors name the member, wherever they happen: a
    corrupt stream met while reading the .npy header is the stream's fault, not the
    header's."""

    def __init__(self, member, label: str):
        self._member, self._label = member, label

    def read(self, size: int = -1) -> bytes:
        try:
            return self._member.read(size)
        except Exception as error:
            raise _member_error(error, self._label) from None

    def readinto(self, buffer) -> int:
        try:
            return self._member.readinto(buffer)
        except Exception as error:
            raise _member_error(error, self._label) from None


def _inflate(member, label: str, max_inflate: int) -> np.ndarray:
    """A compressed member's array, inflated only once its header's size is within the cap,
    and refused when the stream holds fewer bytes than the header says."""
    shape, fortran, dtype = _npy_header(member, label)
    dtype = _checked_dtype(dtype, label)
    size = nbytes(shape, dtype)
    if size > max_inflate:
        raise UserError(
            f"{label}: the compressed member inflates to {size} bytes, over the limit of "
            f"{max_inflate}; raise it with --max-inflate BYTES"
        )
    data = bytearray(size)
    filled = member.readinto(memoryview(data)) if size else 0
    while 0 < filled < size:
        more = member.readinto(memoryview(data)[filled:])
        if not more:
            break
        filled += more
    if filled < size:
        raise UserError(
            f"{label}: the member is cut short ({filled} bytes; {dtype} {shape} needs {size})"
        )
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _safetensors_source(path: Path, key: str | None, label: str) -> Source:
    """A tensor of a ``.safetensors`` file: an 8-byte little-endian header length N, N bytes
    of JSON (``name -> {dtype, shape, data_offsets}``, offsets relative to the end of the
    header, plus an optional ``__metadata__``), then the tensors' bytes."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        if length > size - 8:
            raise UserError(f"{label}: not a valid .safetensors file (header length {length})")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UserError(f"{label}: not a valid .safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{label}: not a valid .safetensors file (bad header)")
    names = [name for name in header if name != "__metadata__"]
    entry = header[_pick_key(names, key, label, path)]
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{label}: not a valid .safetensors file (bad entry)") from None
    if not isinstance(dtype_name, str) or not isinstance(shape, list):
        raise UserError(f"{label}: not a valid .safetensors file (bad entry)")
    if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
        raise UserError(
            f"{label}: not a valid .safetensors file (data_offsets {[begin, end]} are not "
            "0 <= begin <= end)"
        )
    dtype = _safetensors_dtype(dtype_name, label)
    shape = checked_shape(shape, dtype, label)
    expected = nbytes(shape, dtype)
    if end - begin != expected or 8 + length + end > size:
        raise UserError(
            f"{label}: not a valid .safetensors file ({dtype_name} {list(shape)} needs "
            f"{expected} bytes, the header gives bytes {begin}..{end})"
        )
    return _file_rows(path, 8 + length + begin, shape, dtype, label)


def _safetensors_dtype(name: str, label: str) -> np.dtype:
    if name == "BF16":
        try:
            import ml_dtypes
        except ImportError:
            raise UserError(
                f"{label}: BF16 needs the ml_dtypes package (pip install 'nllloss[bfloat16]')"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in _SAFETENSORS_DTYPES:
        raise UserError(f"{label}: unsupported safetensors dtype {name}")
    return np.dtype(_SAFETENSORS_DTYPES[name])


def _looks_like_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


def _open_zarr(path: str, key: str | None, label: str):
    try:
        import zarr
    except ImportError:
        raise UserError(
            f"{label}: reading Zarr needs the zarr package (pip install 'nllloss[zarr]')"
        ) from None
    try:
        node = zarr.open(path, mode="r")
    except Exception as error:  # zarr raises several types for a path that is no store
        raise UserError(f"{label}: not a Zarr store ({error})") from None
    if hasattr(node, "shape"):  # an array
        if key is not None:
            raise UserError(f"{label}: is a Zarr array, not a group; drop ':{key}'")
        return node
    names = sorted(name for name, _ in node.arrays())
    return node[_pick_key(names, key, label, Path(path))]


def _zarr_source(path: Path, key: str | None, label: str) -> ZarrRows:
    array = _open_zarr(str(path), key, label)
    try:
        dtype = np.dtype(array.dtype)
        chunks = tuple(array.chunks)
    except Exception as error:  # zarr's own types for metadata it cannot use
        raise UserError(f"{label}: not a usable Zarr array ({_one_line(error)})") from None
    dtype = _checked_dtype(dtype, label)
    shape = checked_shape(tuple(array.shape), dtype, label)
    if any(c < 1 for c in chunks):
        raise UserError(f"{label}: the Zarr chunks {list(chunks)} have a dimension below 1")
    return ZarrRows(str(path), key, shape, dtype, label)


def _read_text(path: Path, dtype: np.dtype, label: str) -> np.ndarray:
    """Whitespace-separated numbers (``#`` starts a comment), all of them in order, as 1-D."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{label}: not a text file of numbers (byte {error.start} is not UTF-8)"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            return np.loadtxt(text.splitlines(), dtype=dtype, ndmin=1).reshape(-1)
    except ValueError:
        pass
    # Name the first value that is not one; only lines of different lengths remain.
    what = "an integer" if dtype.kind in "iu" else "a number"
    for number, line in enumerate(text.splitlines(), start=1):
        for token in line.split("#", 1)[0].split():
            if not _parses(token, dtype):
                raise UserError(f"{label}: line {number}: {token!r} is not {what} ({dtype})")
    raise UserError(f"{label}: lines hold different numbers of values")


def _parses(token: str, dtype: np.dtype) -> bool:
    if dtype.kind == "f":
        try:
            float(token)
        except ValueError:
            return False
        return True
    if re.fullmatch(r"[+-]?[0-9]+", token) is None:
        return False
    info = np.iinfo(dtype)
    return info.min <= int(token) <= info.max
