"""The public functions: ``nll_loss``, ``nll_loss_backward`` and the ``NLLLoss`` object."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

from . import _generic, _options, _validate
from ._builder import build
from ._routes import as_array, backend_for, like_input, quick_forward_for

if TYPE_CHECKING:  # _stats imports this module
    from ._token_stats import LossAndStats


class _ArrayLike(Protocol):
    """What every array library's array has: a NumPy ndarray, a torch Tensor, a JAX Array,
    a Dask or CuPy array, an array-API array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...


# An array of the caller's library: results come back in it, so a type checker gives the
# loss of a torch.Tensor the type torch.Tensor, that of an ndarray the ndarray's.
Array = TypeVar("Array", bound=_ArrayLike)
Reduction = Literal["none", "mean", "sum"]

# Deprecation warnings point at the line that called the public function: one frame up.
_CALLER = 2


@overload
def nll_loss(
    input: Array,
    target: Any,
    weight: Any = ...,
    size_average: Any = ...,
    ignore_index: int = ...,
    reduce: Any = ...,
    reduction: Reduction = ...,
    *,
    from_logits: bool = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    check_targets: bool = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    return_lse: Literal[False] = ...,
    return_stats: Literal[False] = ...,
) -> Array: ...


@overload
def nll_loss(
    input: Array,
    target: Any,
    weight: Any = ...,
    size_average: Any = ...,
    ignore_index: int = ...,
    reduce: Any = ...,
    reduction: Reduction = ...,
    *,
    from_logits: bool = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    check_targets: bool = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    return_lse: Literal[True],
    return_stats: Literal[False] = ...,
) -> tuple[Array, Array]: ...


@overload
def nll_loss(
    input: Array,
    target: Any,
    weight: Any = ...,
    size_average: Any = ...,
    ignore_index: int = ...,
    reduce: Any = ...,
    reduction: Reduction = ...,
    *,
    from_logits: bool = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    check_targets: bool = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    return_lse: Literal[False] = ...,
    return_stats: Literal[True],
) -> LossAndStats: ...


@overload
def nll_loss(
    input: Array,
    target: Any,
    weight: Any = ...,
    size_average: Any = ...,
    ignore_index: int = ...,
    reduce: Any = ...,
    reduction: Reduction = ...,
    *,
    from_logits: bool = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    check_targets: bool = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    return_lse: bool = ...,
    return_stats: Literal[False] = ...,
) -> Array | tuple[Array, Array]: ...


@overload
def nll_loss(
    input: Array,
    target: Any,
    weight: Any = ...,
    size_average: Any = ...,
    ignore_index: int = ...,
    reduce: Any = ...,
    reduction: Reduction = ...,
    *,
    from_logits: bool = ...,
    label_smoothing: float = ...,
    total_weight: Any = ...,
    check_targets: bool = ...,
    z_loss: float = ...,
    softcap: float | None = ...,
    return_lse: bool = ...,
    return_stats: bool = ...,
) -> Array | tuple[Array, Array] | LossAndStats: ...


# The commonest call (every other argument at its default), on a backend with a shortcut
# for it, is answered by the shortcut (or None: the full path, which then raises nllloss's
# errors).
@_options.quick_path(quick_forward_for, takes=("input", "target", "weight", "ignore_index",
                                                "reduction"))  # fmt: skip
def nll_loss(
    input: Array,
    target: Any,
    weight: Any = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: Reduction = "mean",
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    check_targets: bool = True,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
) -> Array | tuple[Array, Array] | LossAndStats:
    r"""The negative log-likelihood loss, exactly as ``torch.nn.functional.nll_loss``.

    For each target element :math:`n` with class :math:`y_n \ne` ``ignore_index``,

    .. math:: \ell_n = -w_{y_n} \, x_{n, y_n},

    and :math:`\ell_n = 0` where :math:`y_n =` ``ignore_index``. Then ``'none'`` returns
    :math:`\ell` with the target's shape, ``'sum'`` returns :math:`\sum_n \ell_n`, and
    ``'mean'`` returns :math:`\sum_n \ell_n / \sum_{n: y_n \ne ii} w_{y_n}` (the weighted
    mean; without ``weight`` the count of non-ignored elements).

    A floating ``target`` of the input's own shape holds class probabilities
    :math:`p_{n, c}` instead (soft labels: distillation, mixup), and

    .. math:: \ell_n = -\sum_c w_c \, p_{n, c} \, x_{n, c},

    with ``'mean'`` the plain average over the target elements, as ``cross_entropy`` with
    probability targets averages (:math:`\sum_n \ell_n / (N d_1 \cdots d_K)`, not divided
    by a weight sum). The target is used as given: torch checks neither that it is
    non-negative nor that it sums to 1, and neither do we. ``ignore_index`` does not apply
    (a non-negative one is refused, as by torch). From logits this is exactly torch's
    ``cross_entropy``; on log-probabilities torch has no such loss: ours makes
    ``nll_loss(log_softmax(z), p)`` equal ``cross_entropy(z, p)``.

    Parameters
    ----------
    input : array
        Log-probabilities of shape ``(C,)`` (unbatched), ``(N, C)`` or
        ``(N, C, d1, ..., dK)``; float16, bfloat16, float32 or float64.
    target : array
        Class indices of shape ``()`` (or ``(1,)``) for unbatched input, ``(N,)`` or
        ``(N, d1, ..., dK)``; any integer dtype. Each value is in ``[0, C)`` or equals
        ``ignore_index``. Or class probabilities: any float dtype (used in the input's),
        the input's shape. A floating target of the indices' shape, or an integer one of
        the input's, is refused naming both forms.
    weight : array, optional
        Rescaling weight per class, 1-D of length C, any float dtype (used in the
        input's dtype). Zero and negative weights are allowed. Default: all ones.
    size_average, reduce : bool, optional
        Deprecated, as in torch: when either is given, ``reduction`` is ignored and
        derived from them (None counts as True; ``reduce=False`` gives ``'none'``,
        else ``size_average`` chooses ``'mean'`` or ``'sum'``), with a ``UserWarning``.
    ignore_index : int, default -100
        Target value that contributes neither loss, weight nor gradient. Any integer,
        inside the class range or not.
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    from_logits : bool, default False
        The input holds unnormalised logits: the loss is that of
        :math:`x - \operatorname{logsumexp}_c x` (log-softmax over the class axis), computed
        without forming it, and equals ``torch.nn.functional.cross_entropy``.
    label_smoothing : float, default 0.0
        :math:`\varepsilon \in [0, 1]`, as ``cross_entropy``'s (0, or at least
        :math:`2^{-64}`: smaller ones are refused, since their :math:`\varepsilon / C`
        does not survive float32 and a ``-inf`` logit would give NaN): the loss becomes
        :math:`(1 - \varepsilon)\,\ell + \frac{\varepsilon}{C} s` with
        :math:`s_n = -\sum_c w_c \log p_{n, c}` (0 where ignored), reduced like :math:`\ell`
        ('mean' divides both by the same total weight). With probability targets, as
        torch: the target becomes :math:`(1 - \varepsilon) p + \varepsilon / C`.
    total_weight : float or 0-d array, optional
        With ``'mean'`` only: the denominator to divide by instead of this batch's own
        :math:`\sum w_{y_n}`, e.g. the total weight of a whole batch split into
        micro-batches or ranks (see :func:`total_weight`); summing the pieces' losses
        then gives the whole batch's loss. Not differentiated.
    check_targets : bool, default True
        False lets torch CUDA tensors on the Triton kernels skip the range check of the
        targets, the one host synchronisation of the loss (for CUDA-graph capture): an
        out-of-range target then gives NaN instead of an ``IndexError``. Other arrays are
        always checked.
    z_loss : float, default 0.0
        From logits only: :math:`z \ge 0` (at most the largest float32 number) adds
        :math:`z \, v_n \operatorname{lse}_n^2`
        to each element's loss (PaLM's auxiliary z-loss, which keeps the log-normaliser
        :math:`\operatorname{lse}_n = \log \sum_c e^{x_{n, c}}` near 0), reduced with the
        main loss ('mean' by the same denominator). The element's weight :math:`v_n` is
        :math:`w_{y_n}` for a class index (0 where ignored), 1 for probabilities: so a
        weighted 'mean' stays a weighted mean of per-element losses, and an example
        that counts twice in the main loss counts twice here too (Liger-Kernel leaves
        the weight out; with ``weight=None`` the two agree). Gradient
        :math:`2 z v_n \operatorname{lse}_n \operatorname{softmax}(x_n)`.
    softcap : float, optional
        From logits only: :math:`c > 0` replaces every logit by :math:`c \tanh(x / c)`
        before the softmax (Gemma 2's final-logit soft-capping), in the same pass; the
        gradient goes through the tanh. Any finite :math:`c > 0`, also beyond the dtype's
        range (1e-50 caps every logit to about 0, so the loss is :math:`\log C`; 1e39
        leaves float32 logits almost as they are); a capped value is rounded to the
        dtype, so with :math:`c` above its largest value an infinite logit stays
        infinite. Default: no cap.
    return_lse : bool, default False
        From logits only: also return :math:`\operatorname{lse}_n` of every target
        element (of the capped logits; ignored elements too), e.g. to log the z-loss's
        quantity. The fused kernels (NumPy; torch on the CPU or Triton when no gradient
        is recorded) give the one they compute; otherwise one more read of the input
        with the array library's own operations (so differentiable by its autodiff).
    return_stats : bool, default False
        From logits with class indices: also return the per-token statistics of
        :func:`token_stats` of the (capped) logits, ``ignore_index`` as the loss's, as
        ``LossAndStats(loss, stats)``: e.g. to log token accuracy (``stats.argmax ==
        target``) and entropy beside the loss. Without label smoothing the loss is
        computed from the statistics (``-w[y] logprob + z_loss w[y] lse**2``, reduced),
        so the input is read once, by the statistics' kernel (NumPy, torch CPU, Triton),
        and the loss equals the one without ``return_stats`` to rounding; with label
        smoothing, and for float16/bfloat16 input, the statistics are one more read.
        Differentiable as :func:`token_stats`, the loss through them.

    Returns
    -------
    array
        In the input's library and dtype: the target's shape for ``'none'``, 0-d
        otherwise. An unbatched input always gives a 0-d result.
    (array, array)
        With ``return_lse``: the loss, and :math:`\operatorname{lse}` of the target's
        shape (0-d unbatched) in the input's library and dtype.
    LossAndStats
        With ``return_stats``: ``(loss, stats)``, ``stats`` a :class:`TokenStats`.

    Raises
    ------
    IndexError
        A target value is neither in ``[0, C)`` nor ``ignore_index`` (the first one is
        named, with its position).
    ValueError
        Shapes do not fit, ``reduction`` is unknown, ``ignore_index`` overflows int64 (or
        names a class with probability targets), ``z_loss`` or ``softcap`` is out of
        range or given without ``from_logits``.
    TypeError
        A non-floating input or weight, a target of neither form, a non-integer
        ``ignore_index``, a ``z_loss`` or ``softcap`` that is not a real number.

    Notes
    -----
    Edge cases, as torch: ``'mean'`` is NaN when the total weight is 0 (every element
    ignored, an empty batch, zero weights) and ±inf when non-zero weights sum to 0;
    ``'sum'`` of nothing is 0. Nothing from an ignored element reaches the result, not
    even a NaN or inf in its row. float32 and float64 results are bit-identical to
    torch 2.13 on CPU (same summation order); float16 and bfloat16 accumulate in float32
    and round once, where torch rounds every partial sum.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import nll_loss
    >>> x = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=np.float32))
    >>> t = np.array([0, 2])
    >>> nll_loss(x, t)
    array(0.45814535, dtype=float32)
    >>> nll_loss(x, t, reduction="none")
    array([0.6931472 , 0.22314353], dtype=float32)
    >>> nll_loss(x, np.array([0, -100]), weight=np.array([2.0, 1.0, 1.0]), reduction="sum")
    array(1.3862944, dtype=float32)

    Probabilities as the target, and logits with the z-loss and a cap:

    >>> p = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    >>> nll_loss(x, p)
    array(0.6314322, dtype=float32)
    >>> z = np.array([[2.0, 0.0, 0.0], [0.0, 9.0, 0.0]], dtype=np.float32)
    >>> nll_loss(z, t, from_logits=True, z_loss=1e-4, softcap=5.0)
    array(2.5079718, dtype=float32)
    """
    options = _options.given(locals())
    # one frame more: the quick path's guard in front (``_options.quick_path``)
    reduction = _validate.resolve_reduction(size_average, reduce, reduction, stacklevel=_CALLER + 1)
    backend, problem = build(input, target, weight, ignore_index, reduction, options)
    return_lse = _validate.check_return_lse(return_lse, problem.from_logits)
    if problem.return_stats:
        if return_lse:
            raise ValueError(
                "return_lse=True and return_stats=True: the statistics hold the log-sum-exp "
                "(stats.lse); pass one of them"
            )
        from . import _token_stats  # the statistics' engines, loaded on first use

        return _token_stats.loss_and_stats(backend, problem)
    if return_lse:
        # the fused kernels give the log-sum-exp they compute (O(N) memory); other
        # backends compute it apart
        fused = getattr(backend, "forward_and_lse", None)
        if fused is not None:
            return fused(problem)
        return backend.forward(problem), _generic.log_normalizer(backend.xp, problem)
    return backend.forward(problem)


@_options.keywords
def nll_loss_backward(
    grad_output: Any,
    input: Array,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    check_targets: bool = True,
    z_loss: float = 0.0,
    softcap: float | None = None,
    out: Any = None,
) -> Array:
    r"""The gradient of :func:`nll_loss` with respect to ``input``.

    Without options it is zero everywhere except at ``(n, y_n)`` for each non-ignored
    target element, where it is

    * ``'none'``: :math:`-w_{y_n} g_n` (``g`` has the target's shape, or is a scalar);
    * ``'sum'``: :math:`-w_{y_n} g`;
    * ``'mean'``: :math:`-w_{y_n} g / W` with :math:`W` the total weight of ``nll_loss``
      (or ``total_weight``).

    With ``label_smoothing`` :math:`\varepsilon`, every class :math:`c` of a non-ignored
    element also gets :math:`-\frac{\varepsilon}{C} w_c u_n` (:math:`u_n` the upstream
    gradient after reduction), and the target term is scaled by :math:`1 - \varepsilon`.
    ``from_logits`` differentiates through the log-softmax: with :math:`p = \operatorname
    {softmax}(x)` the gradient at :math:`(n, c)` is :math:`u_n \big((1-\varepsilon)
    w_{y_n} (p_c - [c = y_n]) + \frac{\varepsilon}{C} (p_c \sum_k w_k - w_c)\big)`.

    Parameters
    ----------
    grad_output : array or float
        The upstream gradient: an array of the loss's shape, or a scalar.
    input, target, weight, ignore_index, reduction, from_logits, label_smoothing, total_weight
        As in :func:`nll_loss` (the legacy ``size_average``/``reduce`` are not taken).
    check_targets : bool, default True
        As in :func:`nll_loss`.
    out : array, optional
        NumPy only: a C-contiguous array of the input's shape and dtype to write the
        gradient into (it may be ``input`` itself, which is then overwritten, but share
        no memory with any other argument: a ``ValueError``); returned.

    Returns
    -------
    array
        Same shape, dtype and library as ``input``; bit-identical to what torch's
        autograd gives for float32 and float64 without options.

    Notes
    -----
    As torch: when every element is ignored the 'mean' loss is NaN but the gradient is
    all zeros; when the weights hit are all zero, the gradient is NaN at the targets.
    Without ``from_logits`` and ``label_smoothing`` the input's values are never read.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import nll_loss_backward
    >>> x = np.zeros((2, 3), dtype=np.float32)
    >>> nll_loss_backward(1.0, x, np.array([0, 2]))
    array([[-0.5,  0. ,  0. ],
           [ 0. ,  0. , -0.5]], dtype=float32)
    >>> nll_loss_backward(np.array([1.0, 3.0]), x, np.array([1, -100]), reduction="none")
    array([[ 0., -1.,  0.],
           [ 0.,  0.,  0.]], dtype=float32)
    >>> g = nll_loss_backward(1.0, x, np.array([0, 2]), from_logits=True)  # softmax - onehot
    >>> np.round(g * 6, 5)  # / 2 rows
    array([[-2.,  1.,  1.],
           [ 1.,  1., -2.]], dtype=float32)
    """
    options = _options.given(locals())
    return _with_gradient(
        "backward", grad_output, input, target, weight, ignore_index, reduction, options, out
    )


@_options.keywords
def nll_loss_and_grad(
    input: Array,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    *,
    grad_output: Any = 1.0,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    total_weight: Any = None,
    check_targets: bool = True,
    z_loss: float = 0.0,
    softcap: float | None = None,
    out: Any = None,
) -> tuple[Array, Array]:
    r"""The loss and its gradient together: one read of ``input`` for both.

    Equal to ``(nll_loss(input, target, ...), nll_loss_backward(grad_output, input,
    target, ...))`` with the same options. For NumPy input with ``from_logits``, each row's
    log-sum-exp is computed once and the gradient written in the same pass; with
    ``out=input`` a training step allocates nothing of the input's size.

    Parameters
    ----------
    input, target, weight, ignore_index, reduction, from_logits, label_smoothing, total_weight
        As in :func:`nll_loss`.
    check_targets : bool, default True
        As in :func:`nll_loss`.
    grad_output : array or float, default 1.0
        The upstream gradient of the loss (a scalar, or the loss's shape for ``'none'``).
    out : array, optional
        As in :func:`nll_loss_backward`. The loss is computed before ``out`` is written,
        so ``out=input`` is allowed.

    Returns
    -------
    (loss, grad)
        As :func:`nll_loss` and :func:`nll_loss_backward` return them.

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import nll_loss_and_grad
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    >>> loss, grad = nll_loss_and_grad(logits, np.array([0, 1]), from_logits=True)
    >>> round(float(loss), 6)  # torch: cross_entropy(logits, target)
    0.669079
    >>> grad.shape
    (2, 3)
    """
    options = _options.given(locals())
    return _with_gradient(
        "forward_backward", grad_output, input, target, weight, ignore_index, reduction,
        options, out,
    )  # fmt: skip


def _with_gradient(
    method, grad_output, input, target, weight, ignore_index, reduction, options: dict, out
):
    """Validate the arguments of a call that returns the gradient, and run ``method`` of the
    input's backend ('backward' or 'forward_backward')."""
    reduction = _validate.check_reduction(reduction, stacklevel=_CALLER + 1)
    backend, problem = build(input, target, weight, ignore_index, reduction, options)
    given_upstream = grad_output
    grad_output = like_input(backend, grad_output, problem.input, "grad_output")
    _validate.check_grad_output_dtype(grad_output.dtype)
    _validate.check_grad_output_shape(grad_output.shape, problem.loss_shape)
    if out is not None:
        _validate.check_out(out, problem.input)
        array_options = [f.name for f in _options.fields(problem.options) if f.array]
        reads = [
            ("input", input), ("target", target), ("weight", weight),
            *((name, options.get(name)) for name in array_options),
            ("grad_output", given_upstream),  # as given
            ("input", problem.input), ("target", problem.target), ("weight", problem.weight),
            *((name, getattr(problem.options, name)) for name in array_options),
            ("grad_output", grad_output),  # as used
        ]  # fmt: skip
        _validate.check_out_buffers([("out", out)], reads, in_place={("out", "input")})
    return getattr(backend, method)(problem, grad_output, out)


def total_weight(target: Array, weight: Any = None, ignore_index: int = -100) -> Array:
    r"""The denominator of the 'mean' loss, from the targets alone.

    :math:`\sum_{n: y_n \ne ii} w_{y_n}` with ``weight``, else the number of non-ignored
    target elements. Summed over the pieces of a batch (micro-batches, ranks) and passed
    as ``total_weight=`` to each piece's loss, it makes the pieces' losses add up to the
    whole batch's.

    Parameters
    ----------
    target : array
        Class indices of any shape and integer dtype.
    weight : array, optional
        Weight per class, 1-D; targets are then checked against its length.
    ignore_index : int, default -100

    Returns
    -------
    array
        0-d, in the target's library: in the weight's dtype (float32 for 16-bit weights),
        summed in the order ``nll_loss`` sums it on NumPy (so its 'mean' with this
        ``total_weight`` is bit-identical to its own); without weight, an integer count.

    Examples
    --------
    >>> import numpy as np
    >>> import nllloss
    >>> t = np.array([0, 2, -100, 2])
    >>> nllloss.total_weight(t)
    array(3)
    >>> nllloss.total_weight(t, weight=np.array([1.0, 0.5, 2.0]))
    array(5.)
    """
    target = as_array(target, "target")
    backend = backend_for(target)
    ignore_index = _validate.check_ignore_index(ignore_index)
    _validate.check_target_dtype(target.dtype)
    if weight is not None:
        weight = like_input(backend, weight, target, "weight")
        _validate.check_weight(weight, None)
    return backend.total_weight(target, weight, ignore_index)


class NLLLoss:
    r"""The negative log-likelihood loss as a callable object, like ``torch.nn.NLLLoss``.

    ``NLLLoss(...)(input, target)`` equals ``nll_loss(input, target, ...)``; see
    :func:`nll_loss` for the formula, shapes and edge cases.

    Parameters
    ----------
    weight : array, optional
        Rescaling weight per class (1-D, length C).
    size_average, reduce : bool, optional
        Deprecated; resolved to ``reduction`` at construction, with a ``UserWarning``.
    ignore_index : int, default -100
    reduction : {'mean', 'sum', 'none'}, default 'mean'
        Checked when the loss is called, as in torch.
    from_logits : bool, default False
        The input holds logits (then this is ``torch.nn.CrossEntropyLoss``).
    label_smoothing : float, default 0.0

    Attributes
    ----------
    weight, ignore_index, reduction, from_logits, label_smoothing
        As given (``reduction`` after resolving the legacy arguments).

    Examples
    --------
    >>> import numpy as np
    >>> from nllloss import NLLLoss
    >>> loss = NLLLoss(reduction="sum")
    >>> loss
    NLLLoss(reduction='sum')
    >>> loss(np.array([[-1.0, -2.0], [-0.5, -3.0]]), np.array([1, 0]))
    array(2.5)
    """

    @_options.keywords
    def __init__(
        self,
        weight: Any = None,
        size_average: Any = None,
        ignore_index: int = -100,
        reduce: Any = None,
        reduction: Reduction = "mean",
        *,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        given = _options.given(locals())
        if size_average is not None or reduce is not None:
            reduction = _validate.resolve_reduction(
                size_average, reduce, reduction, stacklevel=_CALLER
            )
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        checked = _options.checked(given)  # early errors; checked again at each call
        self._option_names = tuple(given)
        for name in given:
            setattr(self, name, getattr(checked, name))

    def __call__(self, input: Array, target: Any, *, total_weight: Any = None) -> Array:
        """The loss of ``input`` against ``target`` (class indices or probabilities); see
        :func:`nll_loss`."""
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            total_weight=total_weight,
            **{name: getattr(self, name) for name in self._option_names},
        )

    forward = __call__

    def __repr__(self) -> str:
        options = []
        if self.weight is not None:
            options.append(f"weight=<{getattr(self.weight, 'shape', '?')}>")
        if self.ignore_index != -100:
            options.append(f"ignore_index={self.ignore_index!r}")
        options.append(f"reduction={self.reduction!r}")
        defaults = _options.Options()
        for name in self._option_names:
            value = getattr(self, name)
            if value != getattr(defaults, name):
                options.append(f"{name}={value!r}")
        return f"NLLLoss({', '.join(options)})"
