r"""Training at scale on ``torch.distributed``: a global mean, and a class-parallel loss.

``total_weight`` adds up the 'mean' denominator :math:`\sum_n w_{y_n}` of a batch spread
over ranks (and micro-batches): passed as ``total_weight=`` to every piece's loss, it makes the
pieces' losses and gradients add up to those of the whole batch, whatever each piece ignores or
weighs.

``nll_loss`` computes the loss of an input whose class axis is sharded over the ranks of a
group (a vocabulary-parallel language-model head): rank :math:`r` holds the classes
:math:`[s_r, s_r + C_r)` of every row, and every rank the whole target. Per step::

    1. all_gather  the agreement: (failed?, s_r, C_r, SHA-256 of each other argument)
       -> any rank failed its checks: every rank raises;      one row of 808 bytes per rank
          C = sum C_r; the shards tile [0, C); the arguments are the same on every rank;
          the weight (length C) and the target values are checked against C
    from log-probabilities x:
    2. all_reduce SUM  [ x[n, y_n] on the rank owning y_n, 0 elsewhere ;
                         sum_{c in shard} w_c x[n, c]  (label smoothing only) ]        O(N)
    from logits x (Megatron-LM's vocabulary-parallel cross-entropy, with weights; with
    softcap, x is the capped shard c tanh(x / c), computed locally):
    2. all_reduce MAX  m_n = max_c x[n, c]                                             O(N)
    3. all_reduce SUM  [ sum_{c in shard} exp(x[n, c] - m_n) ;  x[n, y_n] - m_n  (owner) ;
                         sum_{c in shard} w_c (x[n, c] - m_n)  (label smoothing only) ]  O(N)
       -> log p[n, y_n] = (x[n, y_n] - m_n) - log Z_n,  lse_n = m_n + log Z_n  (z_loss)
          sum_c w_c log p[n, c] = sum_c w_c (x[n, c] - m_n) - (sum_c w_c) log Z_n
    4. each rank reduces the same N values: the same loss, bit for bit, on every rank.

With class probabilities, each rank holds its classes of them (the input shard's shape),
and the target's term ``x[n, y_n]`` becomes the shard's ``sum_c w_c p[n, c] x[n, c]``
(from logits also ``sum_c w_c p[n, c]``, one more N values in step 3).

N counts target elements (rows times spatial positions). Nothing of size N x C crosses the
network. The backward pass communicates nothing: the gradient of the shard is written from
the target, :math:`Z_n` and, from logits, the shard's :math:`\exp(x - m_n)` kept from the
forward (one buffer of the shard's size, as torch keeps its log-softmax). It is a
torch.autograd.Function with an explicit backward: differentiable collectives would
all-reduce again in the backward and, as every rank calls ``backward()`` on the same
replicated loss, sum the gradient over the ranks.

The protocol cannot pair one call's collectives with another's: every call (and the
backward of ``linear_cross_entropy`` for 'none') opens with the agreement, an all-gather of a
row of the same size whatever the function, to which a rank whose own checks failed sends a
flag instead of leaving the others waiting; then every rank raises (that rank its own error,
the others its type and message, naming the rank), so that a rank that catches the error
and calls again meets the others' next call. The row also names the function called (ranks
in different functions both raise) and carries SHA-256 digests of the arguments that must
be the same on every rank, compared exactly; an error names the first that differs. Each
collective of data carries a flag too, for a failure between two collectives.

``linear_cross_entropy`` makes each block of rows' logits locally and passes them through
the class-parallel loss (after one agreement for the whole call); the input's gradient, a
sum over the shards, is all-reduced.

``token_stats`` and ``linear_token_stats`` give the per-token statistics of sharded logits
(log-probability of the target, entropy, log-sum-exp, argmax) on every rank: after the same
agreement, an all-reduce MAX of each row's maximum, one SUM of its sum of exponentials,
softmax-weighted sum and target logit, and one MAX of the negated first index of the
maximum (the first index on ties across shards); see ``_token_stats``.

The modules: ``_agreement`` (the agreement and the flagged collectives),
``_data_parallel`` (``total_weight``), ``_class_parallel`` (``nll_loss`` and its autograd
Function), ``_vocabulary_parallel`` (``linear_cross_entropy``), ``_token_stats``
(``token_stats``, ``linear_token_stats``). Imported on first use of
``nllloss.distributed``; it imports torch.
"""

from ._class_parallel import nll_loss
from ._data_parallel import total_weight
from ._token_stats import linear_token_stats, token_stats
from ._vocabulary_parallel import linear_cross_entropy

__all__ = ["linear_cross_entropy", "linear_token_stats", "nll_loss", "token_stats", "total_weight"]
