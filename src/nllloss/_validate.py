"""Every argument check of nllloss, and every error message, lives here.

Each check takes the value and the argument's name where it can be several, and raises
with what was expected and what came; the backends and the framework modules call these
and raise nothing of their own about arguments.

The checks follow PyTorch's (``torch.nn.functional.nll_loss`` in 2.13) in what they
accept and reject, with three deliberate differences, listed in the README:

* errors are ``ValueError`` (shapes and values), ``TypeError`` (types and dtypes) or
  ``IndexError`` (target values), never a bare ``RuntimeError``;
* any integer target dtype is accepted, and a weight of another float dtype is cast to the
  input's dtype (torch accepts int64/uint8 targets only and requires equal dtypes);
* the weight must be 1-D of length C for every input rank (torch also accepts a ``(1, C)``
  weight for inputs of rank 3 and more).
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Container
from typing import Any

import numpy as np

REDUCTIONS = ("none", "mean", "sum")

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


class FallbackWarning(UserWarning):
    """A fast engine could not load, so the generic path computes instead (same results,
    slower). Given once per process, with the reason and the remedy."""


def fallback_message(reason: str) -> str:
    return (
        f"nllloss's compiled NumPy kernels cannot load: {reason}. The generic path computes "
        "instead (the same results, slower)."
    )


def resolve_reduction(size_average: Any, reduce: Any, reduction: Any, *, stacklevel: int) -> str:
    """Map the legacy ``size_average``/``reduce`` pair and ``reduction`` to one reduction name.

    As ``torch.nn._reduction.legacy_get_string``: when either legacy argument is not None,
    ``reduction`` is ignored, None counts as True, and a ``UserWarning`` names the result.
    """
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = "none" if not reduce else "mean" if size_average else "sum"
        warnings.warn(
            "size_average and reduce args will be deprecated, please use "
            f"reduction='{reduction}' instead.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return reduction
    return check_reduction(reduction, stacklevel=stacklevel + 1)


def check_reduction(reduction: Any, *, stacklevel: int) -> str:
    """Return ``reduction`` if valid; 'elementwise_mean' is torch's deprecated alias of 'mean'."""
    if isinstance(reduction, str):
        if reduction in REDUCTIONS:
            return reduction
        if reduction == "elementwise_mean":
            warnings.warn(
                "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
            return "mean"
    raise ValueError(
        f"{reduction} is not a valid value for reduction: expected one of 'none', 'mean' or 'sum'"
    )


def check_ignore_index(ignore_index: Any, probabilities: bool = False) -> int:
    """Return ``ignore_index`` as a Python int; it may be any integer that fits in int64.

    With a target of class ``probabilities`` there is nothing to ignore: as torch's
    ``cross_entropy``, an ``ignore_index`` that could name a class (>= 0) is refused.
    """
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError(f"ignore_index must be an int, not {type(ignore_index).__name__}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be an int, not {type(ignore_index).__name__}"
            + _dtype_suffix(ignore_index)
        ) from None
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(
            f"ignore_index must fit in int64 (between -2**63 and 2**63 - 1), got {value}"
        )
    if probabilities and value >= 0:
        raise ValueError(
            "ignore_index is not supported with a target of class probabilities (as in "
            f"torch's cross_entropy), got ignore_index={value}: leave it at the default -100"
        )
    return value


def _dtype_suffix(obj: Any) -> str:
    dtype = getattr(obj, "dtype", None)
    return f" of dtype {dtype}" if dtype is not None else ""


def dtype_name(dtype: Any) -> str:
    """'float32' for np.float32, torch.float32, jnp.float32, ... (no library imported)."""
    if isinstance(dtype, np.dtype):
        return _numpy_dtype_name(dtype)
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):  # a scalar type such as np.float32, or torch.float32
        name = getattr(dtype, "__name__", None) or str(dtype)
    return name.rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=256)
def _numpy_dtype_name(dtype: np.dtype) -> str:
    # Cached: NumPy computes dtype.name in Python, slowly enough to show in small calls.
    return dtype.name


def is_float_dtype(dtype: Any) -> bool:
    """True for the input dtypes we compute in: float16, bfloat16, float32, float64."""
    return dtype_name(dtype) in _FLOAT_DTYPE_NAMES


def check_input(input: Any) -> None:
    """The input must be a floating array of rank 1 or more."""
    if not is_float_dtype(input.dtype):
        raise TypeError(
            "input must hold log-probabilities of a floating dtype "
            f"(float16, bfloat16, float32 or float64), got dtype {input.dtype}"
        )
    if input.ndim == 0:
        raise ValueError(
            "Expected 1 or more dimensions (got 0): input must have shape (C,), (N, C) "
            "or (N, C, d1, ..., dK), got shape ()"
        )


def check_target_dtype(dtype: Any) -> None:
    if not is_integer_dtype(dtype):
        raise TypeError(f"target must hold class indices of an integer dtype, got dtype {dtype}")


def check_target(target: Any, input_shape: tuple[int, ...], probabilities: bool = True) -> None:
    """Check the target's dtype and shape against the input's.

    Class indices are an integer array of the input's shape without its class axis; with
    ``probabilities`` (the loss, not ``nllloss.distributed``) a floating array of the
    input's own shape holds class probabilities instead.
    """
    input_shape = tuple(input_shape)
    target_shape = tuple(target.shape)
    ndim = len(input_shape)
    if probabilities:
        if is_float_dtype(target.dtype):
            if target_shape == _index_target_shape(input_shape):  # indices meant
                raise TypeError(
                    "target must hold class indices of an integer dtype, got dtype "
                    f"{target.dtype} of shape {target_shape} (a floating target holds class "
                    f"probabilities and must have the input's shape {input_shape})"
                )
            if target_shape != input_shape:
                raise ValueError(
                    "a floating target holds class probabilities and must have the input's "
                    f"shape {input_shape}, got target shape {target_shape} (class indices "
                    "need an integer dtype)"
                )
            return
        # Unbatched, the shape is the ValueError's below, as torch's (whose message names
        # the size); (1,) is also the class index of an unbatched input of one class.
        if target_shape == input_shape and ndim > 1:
            raise TypeError(
                f"a target of the input's shape {input_shape} holds class probabilities and "
                f"must be floating, got dtype {target.dtype} (class indices have shape "
                f"{_index_target_shape(input_shape)})"
            )
    check_target_dtype(target.dtype)
    if ndim == 1:
        if target_shape not in ((), (1,)):
            detail = (
                f"For 1D input, 1D target must have size 1, but got target size: {target_shape[0]}"
                if len(target_shape) == 1
                else "0D or 1D target tensor expected"
            )
            probabilities_hint = (
                " (a target of the input's shape holds class probabilities and must be floating)"
                if probabilities and target_shape == input_shape
                else ""
            )
            raise ValueError(
                f"{detail}: an unbatched input of shape {input_shape} needs a target of shape () "
                f"or (1,), got {target_shape}{probabilities_hint}"
            )
        return

    batch = input_shape[0]
    expected = _index_target_shape(input_shape)
    target_batch = target_shape[0] if target_shape else 0
    if target_batch != batch:
        raise ValueError(
            f"Expected input batch_size ({batch}) to match target batch_size ({target_batch}): "
            f"input shape {input_shape} needs target shape {expected}, got {target_shape}"
        )
    if target_shape != expected:
        detail = " (multi-target not supported)" if ndim == 2 else ""
        raise ValueError(
            f"Expected target shape {expected} for input shape {input_shape}, "
            f"got {target_shape}{detail}"
        )


def _index_target_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a target of class indices: the input's without its class axis."""
    return () if len(input_shape) == 1 else (input_shape[0], *input_shape[2:])


_INTEGER_DTYPE_NAMES = frozenset(
    f"{kind}int{bits}" for kind in ("", "u") for bits in (8, 16, 32, 64)
)


def is_integer_dtype(dtype: Any) -> bool:
    """Signed or unsigned integer, from NumPy, torch, JAX, ... (bool is not)."""
    return dtype_name(dtype) in _INTEGER_DTYPE_NAMES


def check_weight(weight: Any, classes: int | None) -> None:
    """The weight must be a 1-D floating array of length C (any length if C is None)."""
    if not is_float_dtype(weight.dtype):
        raise TypeError(
            "weight must be a floating array (float16, bfloat16, float32 or float64), "
            f"got dtype {weight.dtype}"
        )
    shape = tuple(weight.shape)
    if classes is None and len(shape) == 1:
        return
    if shape != (classes,):
        raise ValueError(
            f"weight tensor should be defined either for all {classes} classes or no classes "
            f"but got weight tensor of shape: {shape}; expected shape ({classes},)"
        )


def out_of_bounds_error(value: int, position: tuple[int, ...], classes: int, ignore_index: int):
    """The IndexError for the first target that is neither a class index nor ignore_index."""
    where = "target[" + ", ".join(map(str, position)) + "]"
    return IndexError(
        f"Target {value} is out of bounds: {where} = {value} is not in the class range "
        f"[0, {classes}) and is not ignore_index ({ignore_index})"
    )


def check_flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_label_smoothing(label_smoothing: Any) -> float:
    """A real number in [0, 1], as torch's ``cross_entropy`` requires."""
    value = _real_number(label_smoothing, "label_smoothing", "a real number between 0.0 and 1.0")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {value}")
    return value


def _real_number(value: Any, name: str, expected: str) -> float:
    """``value`` as a float, if it is a real number (not bool) or a 0-d array of one, as
    torch reads ``label_smoothing=torch.tensor(0.1)``; else the TypeError. A tensor that
    requires grad is refused, as by torch: the option would get no gradient."""
    if getattr(value, "shape", None) == () and (
        is_float_dtype(value.dtype) or is_integer_dtype(value.dtype)
    ):
        if getattr(value, "requires_grad", False):
            raise TypeError(f"{name} must be {expected}, got a tensor that requires grad")
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        kind = type(value).__name__ + _dtype_suffix(value)
        raise TypeError(f"{name} must be {expected}, got {kind}")
    return float(value)


def _needs_logits(name: str, from_logits: bool) -> None:
    if not from_logits:
        raise ValueError(f"{name} acts on logits: it needs from_logits=True, got from_logits=False")


def check_z_loss(z_loss: Any, from_logits: bool) -> float:
    """The z-loss coefficient: a finite real number >= 0, used from logits only."""
    value = _real_number(z_loss, "z_loss", "a finite real number >= 0")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"z_loss must be a finite real number >= 0, got {value}")
    if value:
        _needs_logits(f"z_loss={value}", from_logits)
    return value


def check_softcap(softcap: Any, from_logits: bool) -> float | None:
    """The logit cap: None, or a finite real number > 0, used from logits only."""
    if softcap is None:
        return None
    value = _real_number(softcap, "softcap", "None or a finite real number > 0")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"softcap must be None or a finite real number > 0, got {value}")
    _needs_logits(f"softcap={value}", from_logits)
    return value


def check_temperature(temperature: Any) -> float:
    """The sampling temperature of the per-token statistics: a finite real number > 0."""
    value = _real_number(temperature, "temperature", "a finite real number > 0")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be a finite real number > 0, got {value}")
    return value


def check_classes_for_stats(classes: int) -> None:
    """The per-token statistics need a class at least (the argmax of nothing is undefined)."""
    if classes < 1:
        raise ValueError(
            f"token statistics need at least one class (the argmax of none is undefined), "
            f"got C = {classes}"
        )


def check_return_lse(return_lse: Any, from_logits: bool) -> bool:
    """Whether to return the log-sum-exp of each element's logits (from logits only)."""
    value = check_flag(return_lse, "return_lse")
    if value:
        _needs_logits("return_lse=True", from_logits)
    return value


def check_return_stats(return_stats: Any, from_logits: bool) -> bool:
    """Whether to return the per-token statistics with the loss (from logits only; the
    target's form is checked where the statistics are computed, ``check_stats_target``)."""
    value = check_flag(return_stats, "return_stats")
    if value:
        _needs_logits("return_stats=True", from_logits)
    return value


def check_stats_target(probabilities: bool) -> None:
    """The statistics read the log-probability of a class index."""
    if probabilities:
        raise ValueError(
            "return_stats=True needs class indices as the target (the log-probability of "
            "the target), got class probabilities"
        )


def check_total_weight(total_weight: Any, reduction: str) -> None:
    """``total_weight`` replaces the 'mean' denominator: a real scalar, with 'mean' only.

    Arrays are not read (they may be traced or lazy): their shape and dtype are checked.
    """
    if reduction != "mean":
        raise ValueError(
            "total_weight is the denominator of reduction='mean'; it cannot be used with "
            f"reduction={reduction!r}"
        )
    if isinstance(total_weight, (bool, np.bool_)):
        raise TypeError("total_weight must be a real number or a 0-d array, got bool")
    dtype = getattr(total_weight, "dtype", None)
    if dtype is None or not (is_float_dtype(dtype) or is_integer_dtype(dtype)):
        raise TypeError(
            "total_weight must be a real number or a 0-d array of a real dtype, got "
            f"{type(total_weight).__name__}{_dtype_suffix(total_weight)}"
        )
    shape = tuple(total_weight.shape)
    if shape != () and shape != (1,):
        raise ValueError(f"total_weight must be a scalar (shape () or (1,)), got shape {shape}")


def check_array_type(obj: Any, name: str) -> None:
    """NumPy subclasses whose meaning a plain array would lose are refused: a masked array's
    mask would be ignored, and ``np.matrix`` keeps two dimensions under indexing."""
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array, whose mask nllloss would ignore: pass "
            f"{name}.filled(...) (or set ignore_index on the masked targets) instead"
        )
    if isinstance(obj, np.matrix):
        raise TypeError(f"{name} is an np.matrix: pass np.asarray({name}) instead")


def check_sequence(obj: Any, values: np.ndarray, name: str) -> None:
    """A Python scalar or sequence read as ``values`` must hold real numbers (not None,
    strings or other objects, which NumPy would read as NaN or text)."""
    if values.dtype.kind not in "biuf" and not is_float_dtype(values.dtype):
        raise TypeError(
            f"{name} must be a real number or a sequence of them, got "
            f"{type(obj).__name__} (read as dtype {values.dtype})"
        )


def check_out(out: Any, like: Any, name: str = "out", like_name: str = "input") -> None:
    """An ``out=`` buffer takes a gradient: a writeable, C-contiguous NumPy array of the
    shape and dtype of the array ``like`` it is the gradient of. (Overlaps are
    ``check_out_buffers``'s.)"""
    if not isinstance(like, np.ndarray):
        raise TypeError(
            f"out= is supported for NumPy input only, got input of type {type(like).__name__}"
        )
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(
            f"{name} must have the {like_name}'s shape {like.shape} and dtype {like.dtype}, "
            f"got shape {out.shape} and dtype {out.dtype}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be a writeable, C-contiguous array")


def check_out_buffers(
    outs: list[tuple[str, Any]],
    reads: list[tuple[str, Any]],
    in_place: Container[tuple[str, str]] = (),
) -> None:
    """No ``out=`` buffer shares memory with another buffer or with an array the call reads.

    ``outs`` and ``reads`` are ``(argument name, array)`` pairs (None skipped; a read
    argument may appear twice, as given and as converted). A gradient written over values
    still to be read -- the weight, a probability target, the upstream gradient, a row of
    the input not yet visited, another gradient -- gives a wrong number, so every overlap
    is refused, except that a buffer named with a read array in ``in_place`` may be that
    array itself (the same address, shape, strides and dtype: the documented in-place
    use, which reads each value before writing its gradient). ``np.shares_memory`` is
    exact (not the bounds test of ``may_share_memory``): arrays that interleave without
    touching, such as a bias stored in the row padding of the hidden states, are accepted.
    """
    outs = [(name, out) for name, out in outs if out is not None]
    for i, (name, out) in enumerate(outs):
        for other_name, other in outs[:i]:
            if np.shares_memory(out, other):
                raise ValueError(
                    f"{other_name} and {name} overlap: each gradient needs an array of its own"
                )
        for read_name, read in reads:
            if not isinstance(read, np.ndarray) or not np.shares_memory(out, read):
                continue
            if (name, read_name) in in_place and _same_memory(out, read):
                continue
            itself = (
                f" (only {name}={read_name} itself is allowed)"
                if (name, read_name) in in_place
                else ""
            )
            raise ValueError(
                f"{name} overlaps {read_name}'s memory: its gradient would be written over "
                f"values still to be read{itself}; pass a separate array as {name}"
            )


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def check_grad_output_shape(
    grad_shape: tuple[int, ...], output_shape: tuple[int, ...], name: str = "grad_output"
) -> None:
    """``grad_output`` (or the upstream gradient ``name``) has the loss's shape, or holds one
    value that broadcasts to it (for a 0-d loss any shape of ones, for an element-wise loss
    one of at most its rank)."""
    grad_shape = tuple(grad_shape)
    output_shape = tuple(output_shape)
    one_value = all(d == 1 for d in grad_shape)
    if grad_shape == output_shape or (
        one_value and (not output_shape or len(grad_shape) <= len(output_shape))
    ):
        return
    raise ValueError(
        f"{name} must have the loss's shape {output_shape} or be a scalar, got shape {grad_shape}"
    )


def check_grad_output_dtype(dtype: Any, name: str = "grad_output") -> None:
    """``grad_output`` (or ``name``) must be real: floating, or integer (cast to the input's
    dtype)."""
    if is_float_dtype(dtype) or is_integer_dtype(dtype):
        return
    raise TypeError(f"{name} must be a real floating array or number, got dtype {dtype}")


def check_paddle_reduction(reduction: Any) -> str:
    """Paddle's ``reduction`` check, with Paddle's message (``nllloss.paddle``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            "The value of 'reduction' in nll_loss should be 'sum', 'mean' or 'none', "
            f"but received {reduction}, which is not allowed."
        )
    return reduction


def unsupported_array_error(array_type: type) -> TypeError:
    return TypeError(
        f"{array_type.__module__}.{array_type.__qualname__} arrays are not supported: "
        "pass NumPy arrays or arrays of a library that follows the array API standard "
        "(torch, JAX, CuPy, array-api-strict, ...)"
    )


def mixed_libraries_error(name: str, obj: Any, input: Any) -> TypeError:
    def kind(a):
        return f"{type(a).__module__}.{type(a).__qualname__}"

    return TypeError(
        f"{name} is a {kind(obj)} but input is a {kind(input)}: pass arrays of one library "
        "(NumPy arrays and Python sequences are converted to the input's library)"
    )


def devices_differ_error(name: str, device: Any, input_device: Any) -> ValueError:
    return ValueError(
        f"{name} is on device {device} but input is on {input_device}: move them to the same device"
    )


def check_paddle_input_rank(input_shape: tuple[int, ...]) -> None:
    """Paddle's nll_loss has no unbatched form."""
    if len(input_shape) < 2:
        raise ValueError(
            f"Expected 2 or more dimensions (got {len(input_shape)}): Paddle's nll_loss takes "
            f"input of shape (N, C) or (N, C, d1, ..., dK), got {input_shape}"
        )


def check_not_differentiable(name: str, requires_grad: bool) -> None:
    """As torch's nll_loss: the loss is not differentiable with respect to the weight."""
    if requires_grad:
        raise ValueError(
            f"{name} requires grad, but the loss is not differentiable with respect to the "
            f"class weights (as torch's nll_loss and cross_entropy): pass {name}.detach()"
        )


def check_num_threads(n: Any, limit: int | None) -> int:
    """A thread count for the compiled kernels: an int in ``[1, limit]`` (``limit`` None:
    1 or more, where numba, which fixes the limit, is not installed)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    if limit is None:
        if n < 1:
            raise ValueError(f"n must be 1 or more, got {n}")
        return int(n)
    if not 1 <= n <= limit:
        raise ValueError(
            f"n must be between 1 and NUMBA_NUM_THREADS={limit} (set that variable before "
            f"the first import of numba to allow more), got {n}"
        )
    return int(n)


# nllloss.distributed: a class-parallel group must agree on everything but the class shards.


def check_torch_tensor(obj: Any, name: str) -> None:
    """``nllloss.distributed`` communicates torch tensors: its inputs must be torch tensors."""
    if not (type(obj).__module__.startswith("torch") and hasattr(obj, "is_floating_point")):
        raise TypeError(
            f"{name} must be a torch.Tensor (nllloss.distributed communicates through "
            f"torch.distributed), got {type(obj).__module__}.{type(obj).__qualname__}"
        )


def check_class_start(class_start: Any) -> int:
    """The first class of a rank's shard: a non-negative int."""
    if isinstance(class_start, (bool, np.bool_)):
        raise TypeError(f"class_start must be an int, not {type(class_start).__name__}")
    try:
        value = operator.index(class_start)
    except TypeError:
        raise TypeError(
            f"class_start must be an int, not {type(class_start).__name__}"
            + _dtype_suffix(class_start)
        ) from None
    if not 0 <= value <= _INT64_MAX:
        raise ValueError(f"class_start must be a class index (0 or more), got {value}")
    return value


def check_shards(starts: list[int], sizes: list[int]) -> int:
    """The ranks' shards ``[start, start + size)`` must tile ``[0, C)``; return C.

    Ranks may hold their shards in any order; an empty shard may start anywhere.
    """
    classes = sum(sizes)
    shards = list(zip(starts, sizes, strict=True))
    covered = sorted((start, start + size) for start, size in shards if size)
    previous_ends = [0, *(end for _, end in covered)][: len(covered)]
    if any(start != end for (start, _), end in zip(covered, previous_ends, strict=True)):
        listing = ", ".join(
            f"rank {rank}: [{start}, {start + size})" for rank, (start, size) in enumerate(shards)
        )
        raise ValueError(
            f"the class shards of the group must cover the classes [0, {classes}) once each "
            f"(class_start and the input's class axis on each rank), got {listing}"
        )
    return classes


def ranks_disagree_error(name: str, rank: int, other_rank: int) -> ValueError:
    """The error for an argument that must be the same on every rank of a group but is not."""
    return ValueError(
        f"{name} must be the same on every rank of the group (only the input's classes are "
        f"sharded), but rank {rank} and rank {other_rank} passed different values"
    )


def raised_on_rank_error(rank: int, kind: str, message: str) -> Exception:
    """What the other ranks raise when a check failed on ``rank``: its type and message."""
    kinds = {"ValueError": ValueError, "TypeError": TypeError, "IndexError": IndexError}
    return kinds.get(kind, RuntimeError)(f"on rank {rank} of the group: {kind}: {message}")


def check_linear(input: Any, linear_weight: Any, linear_bias: Any) -> tuple[int, ...]:
    """The shapes and dtypes of the loss from hidden states (``linear_cross_entropy``); the
    shape of the logits they make, ``(*batch, C, d1, ..., dK)``, as torch's.

    ``input`` is ``(in_features,)`` or ``(N, in_features)``; ``linear_weight`` is ``(C,
    in_features)`` or ``(C, d1, ..., dK, in_features)`` (then the input is batched); the
    bias, if any, ``(C, d1, ..., dK)``; all three of one floating dtype.
    """
    if not is_float_dtype(input.dtype):
        raise TypeError(
            "input must hold hidden states of a floating dtype (float16, bfloat16, float32 "
            f"or float64), got dtype {input.dtype}"
        )
    for name, array in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if array is not None and array.dtype != input.dtype:
            raise TypeError(
                f"{name} must have the input's dtype {input.dtype}, got dtype {array.dtype}"
            )
    input_shape, weight_shape = tuple(input.shape), tuple(linear_weight.shape)
    if len(input_shape) not in (1, 2):
        raise ValueError(
            f"input must have shape (in_features,) or (N, in_features), got shape {input_shape}"
        )
    if len(weight_shape) < 2:
        raise ValueError(
            "linear_weight must have shape (C, in_features) or (C, d1, ..., dK, "
            f"in_features), got shape {weight_shape}"
        )
    if weight_shape[-1] != input_shape[-1]:
        raise ValueError(
            f"input's last dimension (in_features) is {input_shape[-1]} but linear_weight's "
            f"is {weight_shape[-1]}: input shape {input_shape}, linear_weight shape "
            f"{weight_shape}"
        )
    classes = weight_shape[:-1]  # (C, d1, ..., dK)
    if linear_bias is not None and tuple(linear_bias.shape) != classes:
        raise ValueError(
            f"linear_bias must have shape {classes} (linear_weight's without in_features), "
            f"got shape {tuple(linear_bias.shape)}"
        )
    if len(classes) > 1 and len(input_shape) == 1:
        raise ValueError(
            f"a linear_weight of shape {weight_shape} makes a K-dimensional loss, which needs "
            f"a batched input (N, {input_shape[0]}), got shape {input_shape}"
        )
    return (*input_shape[:-1], *classes)


def check_chunk_rows(chunk_rows: Any) -> int | None:
    """None (the rule's choice), or a positive number of rows per chunk."""
    if chunk_rows is None:
        return None
    if isinstance(chunk_rows, (bool, np.bool_)) or not isinstance(chunk_rows, (int, np.integer)):
        raise TypeError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows}")
    return int(chunk_rows)


def check_linear_out(out: Any, arrays: tuple) -> list[tuple[str, Any]]:
    """``out=`` of ``linear_cross_entropy_and_grad``: three entries, each None or an array
    for the gradient of (input, linear_weight, linear_bias) as ``check_out`` requires;
    returned as ``(name, array)`` pairs for ``check_out_buffers``."""
    names = ("d_input", "d_linear_weight", "d_linear_bias")
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(
            "out must be a tuple (d_input, d_linear_weight, d_linear_bias) of arrays or None, "
            f"got {type(out).__name__}"
        )
    arguments = ("input", "linear_weight", "linear_bias")
    for name, given, like, argument in zip(names, out, arrays, arguments, strict=True):
        if given is None:
            continue
        if like is None:
            raise ValueError(f"out gives {name} but there is no linear_bias")
        check_out(given, like, f"out's {name}", argument)
    return [(f"out's {name}", given) for name, given in zip(names, out, strict=True)]
