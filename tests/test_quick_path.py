"""The quick path's guard and the options' ``in_use``, both derived from the declaration.

``nll_loss``'s commonest call goes to a backend's shortcut. The guard in front of it is
written from the function's own signature (``_options.quick_path``): every parameter the
shortcut does not take must be its default, the very object, or the call takes the full
path. No list of names is written anywhere, so a keyword added to the signature is
guarded without an edit: these tests read the parameters from the signature too.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nllloss
from nllloss import _options
from nllloss._options import Options
from nllloss._routes import torch as torch_route

TAKEN = ("input", "target", "weight", "ignore_index", "reduction")


class _Off:
    """A value that is no parameter's default (the full path refuses or computes it)."""


@pytest.fixture
def shortcut_calls(monkeypatch):
    """The torch route's shortcut, counting its calls (and answering them)."""
    calls = []
    original = torch_route.BACKEND.quick_forward

    def counted(*arguments):
        calls.append(arguments)
        return original(*arguments)

    monkeypatch.setattr(torch_route.BACKEND, "quick_forward", counted)
    return calls


def _case():
    x = torch.log_softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), 1)
    return x, torch.tensor([0, 3, 1, -100, 2, 2])


def test_the_commonest_call_takes_the_shortcut(shortcut_calls):
    x, t = _case()
    w = torch.rand(4) + 0.5
    result = nllloss.nll_loss(x, t, w, ignore_index=-100, reduction="sum")
    assert len(shortcut_calls) == 1
    assert torch.equal(result, F.nll_loss(x, t, w, reduction="sum"))


@pytest.mark.parametrize(
    "name", [name for name in inspect.signature(nllloss.nll_loss).parameters if name not in TAKEN]
)
def test_every_other_parameter_off_its_default_skips_the_shortcut(name, shortcut_calls):
    """Each parameter the shortcut does not take (the options, the legacy arguments,
    ``return_lse``, ``return_stats``), given any value but its default object, sends the
    call to the full path."""
    x, t = _case()
    with contextlib.suppress(TypeError, ValueError):  # the full path's refusal of it
        nllloss.nll_loss(x, t, **{name: _Off()})
    assert shortcut_calls == []


def test_a_default_value_given_again_takes_the_full_path(shortcut_calls):
    """An explicit float equal to the default is another object: the full path computes
    it (as documented), with the same answer."""
    x, t = _case()
    zero = float("0")  # a new float object, equal to the default
    assert zero is not Options().label_smoothing
    assert torch.equal(nllloss.nll_loss(x, t, label_smoothing=zero), F.nll_loss(x, t))
    assert shortcut_calls == []


def test_a_new_keyword_in_a_signature_is_guarded_without_an_edit():
    """A function with a keyword the guard was never told about (``canary``) still takes
    the full path when it is given."""
    calls = []

    def shortcut_for(first):
        return lambda a, b: calls.append((a, b)) or "shortcut"

    @_options.quick_path(shortcut_for, takes=("a", "b"))
    def function(a, b, c=None, *, label_smoothing: float = 0.0, canary=0.0):
        return "full"

    assert function(1, 2) == "shortcut"
    assert function(1, 2, canary=0.5) == "full"
    assert function(1, 2, c=3) == "full"
    assert function(1, 2, label_smoothing=float("0")) == "full"
    assert calls == [(1, 2)]
    assert inspect.signature(function) == inspect.signature(function.__wrapped__)


def test_the_guard_keeps_the_documentation():
    assert nllloss.nll_loss.__doc__.startswith("The negative log-likelihood loss")
    assert nllloss.nll_loss.__module__ == "nllloss._loss"
    assert nllloss.nll_loss.__globals__ is inspect.getmodule(nllloss.nll_loss).__dict__


def test_in_use_is_computed_once_per_value():
    options = Options(from_logits=True, z_loss=0.1, total_weight=np.float64(3.0))
    assert options.in_use() is options.in_use()
    assert options.in_use() == {"from_logits", "z_loss", "total_weight"}
    assert Options().in_use() == frozenset()
    assert options.replace(z_loss=0.0).in_use() == {"from_logits", "total_weight"}


@pytest.mark.parametrize(
    ("name", "value"),
    [("label_smoothing", 0), ("label_smoothing", torch.tensor(0.0)), ("check_targets", 1)],
)
def test_a_value_of_another_type_than_the_default_is_in_use(name, value):
    """As the quick path: a default only counts as the default's own type and value."""
    assert Options(**{name: value}).in_use() == {name}


@pytest.mark.parametrize("options", [{}, {"from_logits": True, "label_smoothing": 0.1}])
def test_compiled_with_fullgraph(options):
    """The guard and the options' ``in_use`` are traced by torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    x, t = _case()
    compiled = torch.compile(
        lambda a: nllloss.nll_loss(a, t, **options), backend="eager", fullgraph=True
    )
    expected = F.cross_entropy(x, t, label_smoothing=0.1) if options else F.nll_loss(x, t)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module", ["NLLLoss"])
def test_the_modules_commonest_call_takes_the_shortcut(module, shortcut_calls):
    """A module with every option at its default passes none of them on, so its call takes
    the shortcut (torch's own kernel, the same answer as torch's module)."""
    x, t = _case()
    ours = getattr(nllloss.torch, module)()
    theirs = getattr(torch.nn, module)()
    assert torch.equal(ours(x, t), theirs(x, t))
    assert len(shortcut_calls) == 1


def test_a_module_option_off_its_default_is_passed_on(shortcut_calls):
    x, t = _case()
    smoothed = nllloss.torch.CrossEntropyLoss(label_smoothing=0.1)(x, t)
    torch.testing.assert_close(smoothed, F.cross_entropy(x, t, label_smoothing=0.1))
    assert shortcut_calls == []

