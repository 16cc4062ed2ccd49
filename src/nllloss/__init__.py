"""nllloss: the negative log-likelihood loss of ``torch.nn.NLLLoss``, exactly, for NumPy.

>>> import numpy as np, nllloss
>>> nllloss.nll_loss(np.array([[-0.5, -1.0]]), np.array([1]))
array(1.)
"""

from ._hidden_states import linear_cross_entropy, linear_cross_entropy_and_grad
from ._kernels.cpu._threads import set_num_threads
from ._loss import NLLLoss, nll_loss, nll_loss_and_grad, nll_loss_backward, total_weight
from ._token_stats import (
    LossAndStats,
    TokenStats,
    linear_token_stats,
    linear_token_stats_and_grad,
    token_stats,
    token_stats_and_grad,
)
from ._validate import FallbackWarning

__all__ = [
    "FallbackWarning",
    "LossAndStats",
    "NLLLoss",
    "TokenStats",
    "evaluate",
    "linear_cross_entropy",
    "linear_cross_entropy_and_grad",
    "linear_token_stats",
    "linear_token_stats_and_grad",
    "nll_loss",
    "nll_loss_and_grad",
    "nll_loss_backward",
    "set_num_threads",
    "token_stats",
    "token_stats_and_grad",
    "total_weight",
]
__version__ = "0.1.0"

# Framework submodules load on first attribute access, so `import nllloss` imports none.
_FRAMEWORK_MODULES = ("torch", "paddle", "distributed", "transformers")


def __getattr__(name: str):
    if name == "evaluate":  # the command line's machinery, loaded when first used
        from ._cli._python import evaluate

        return evaluate
    if name in _FRAMEWORK_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
