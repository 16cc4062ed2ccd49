"""The agreement that opens every call of ``nllloss.distributed``, and the flagged collectives
after it.

Each rank checks its arguments on its own, then every rank sends one row of the same size
to one all-gather, whatever the call and whether its checks passed::

    failed flag | the function called | up to 3 int64 values of the function's own
                | SHA-256 of each argument that every rank must pass alike (up to 24)

so that a rank whose checks failed still takes part: when any rank failed, every rank
raises (the failing ones their own error, the others an error of its type naming the first
failing rank), before any collective of data. The functions must match (a rank that skipped
a call, or a backward, meets the others' next call here, and both raise); then the digests
are compared, argument by argument, so that the error names the argument that differs.
A digest covers the exact bytes, dtype and shape of an array (or the exact value of a
scalar): two different values agree only if SHA-256 collides.

Each collective of data after it carries a flag too, so that an error on one rank between
two collectives (a check against the number of classes, memory) is raised on every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any

import torch
import torch.distributed as dist

from .. import _validate

# The functions whose calls open with an agreement; a row names its function by position.
FUNCTIONS = (
    "total_weight",
    "nll_loss",
    "linear_cross_entropy",
    "the backward of linear_cross_entropy",
    "token_stats",
    "linear_token_stats",
    "the backward of linear_token_stats",
)
VALUES = 3  # int64 values of a function's own per rank (class_start, C_r, ...)
ARGUMENTS = 24  # digests per row: room for the most arguments a function agrees on (15)
_HEADER = struct.Struct(f"<{2 + VALUES}q")  # failed flag, function, values
_DIGEST_BYTES = hashlib.sha256().digest_size
_ROW_BYTES = _HEADER.size + ARGUMENTS * _DIGEST_BYTES


@dataclasses.dataclass(frozen=True)
class Peer:
    """What one rank sent: its values, and the digest of each agreed argument."""

    values: tuple[int, ...]
    digests: tuple[bytes, ...]


def agree(
    function: str,
    group: Any,
    device: torch.device,
    error: Exception | None,
    values: tuple[int, ...] = (),
    arguments: tuple[tuple[str, Any], ...] = (),
) -> list[Peer]:
    """The opening all-gather of a call of ``function``: one :class:`Peer` per rank.

    ``error`` is the error of this rank's own checks (then ``values`` and ``arguments`` are
    not sent). Raises on every rank alike when any rank failed or called another function;
    the caller compares the digests (:func:`check_same`) once it has checked what needs
    the values (the class shards).
    """
    assert len(arguments) <= ARGUMENTS, "more agreed arguments than a row holds: raise ARGUMENTS"
    row = bytearray(_ROW_BYTES)
    code = FUNCTIONS.index(function)
    if error is None:
        _HEADER.pack_into(row, 0, 0, code, *values, *(0,) * (VALUES - len(values)))
        for i, (_, value) in enumerate(arguments):
            start = _HEADER.size + i * _DIGEST_BYTES
            row[start : start + _DIGEST_BYTES] = digest(value)
    else:
        _HEADER.pack_into(row, 0, 1, code, *(0,) * VALUES)
    sent = torch.frombuffer(row, dtype=torch.uint8).to(device)
    received = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]
    dist.all_gather(received, sent, group=group)
    rows = [bytes(r.cpu().numpy()) for r in received]
    headers = [_HEADER.unpack_from(r) for r in rows]
    raise_if_any_failed(any(header[0] for header in headers), error, group)
    for rank, header in enumerate(headers):
        if header[1] != headers[0][1]:
            raise RuntimeError(
                "the ranks of the group must call nllloss.distributed's functions (and the "
                "backward of linear_cross_entropy) in the same order, but rank 0 called "
                f"{FUNCTIONS[headers[0][1]]} and rank {rank} {FUNCTIONS[header[1]]}"
            )
    count = len(arguments)
    return [
        Peer(
            header[2 : 2 + len(values)],
            tuple(
                r[_HEADER.size + i * _DIGEST_BYTES : _HEADER.size + (i + 1) * _DIGEST_BYTES]
                for i in range(count)
            ),
        )
        for header, r in zip(headers, rows, strict=True)
    ]


def check_same(peers: list[Peer], names: list[str]) -> None:
    """Raise (on every rank alike) for the first agreed argument that differs between ranks."""
    for i, name in enumerate(names):
        for rank, peer in enumerate(peers):
            if peer.digests[i] != peers[0].digests[i]:
                raise _validate.ranks_disagree_error(name, 0, rank)


def digest(value: Any) -> bytes:
    """SHA-256 of a value, exact: a tensor's dtype, shape and bytes (read on the host), a
    tuple's items, a scalar's type and value (-0.0 as 0.0, which computes alike)."""
    sha = hashlib.sha256()
    _feed(sha, value)
    return sha.digest()


def _feed(sha, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        array = value.detach().contiguous().cpu()
        sha.update(f"tensor {array.dtype} {tuple(array.shape)}:".encode())
        sha.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, tuple):
        sha.update(f"tuple {len(value)}:".encode())
        for item in value:
            _feed(sha, item)
    elif isinstance(value, float):
        sha.update(f"float {(value + 0.0).hex()};".encode())
    else:
        sha.update(f"{type(value).__name__} {value!r};".encode())


def raise_if_any_failed(any_failed: bool, error: Exception | None, group: Any) -> None:
    """Raise on every rank when a check failed on any: the failing ranks their own error,
    the others the first failing rank's type and message (exchanged on this path only)."""
    if not any_failed:
        return
    report = None if error is None else (type(error).__name__, str(error))
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, report, group=group)
    if error is not None:
        raise error
    rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    raise _validate.raised_on_rank_error(rank, kind, message) from None


def all_reduce(parts: list[torch.Tensor], op, group: Any, error: Exception | None):
    """One all-reduce of the same-shaped ``parts``, with a failure flag (max or sum: non-zero
    when any rank failed), and a raise on every rank if it is set. A rank whose ``error``
    is set sends its parts as they are (zeros, say): only the flag is read."""
    shape = parts[0].shape
    payload = [part.reshape(-1) for part in parts]
    payload.append(parts[0].new_full((1,), float(error is not None)))
    payload = torch.cat(payload)
    dist.all_reduce(payload, op=op, group=group)
    raise_if_any_failed(bool(payload[-1]), error, group)
    count = len(parts) * shape.numel()
    return list(payload[:count].reshape(len(parts), *shape))


def device_of(obj: Any) -> torch.device:
    """Where a call's collectives run: the device of its (first) tensor."""
    return obj.device if isinstance(obj, torch.Tensor) else torch.device("cpu")
