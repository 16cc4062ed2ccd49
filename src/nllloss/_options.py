"""Every keyword option of the loss, declared once: :class:`Options`.

Each option is one field of :class:`Options`, with its default and its check (the
field's metadata, see :func:`option`). Everything else follows from the declaration:

* the public functions forward their option keywords with :func:`given` (read from their
  own arguments by name: no list of options is written there), and :func:`checked`
  validates them into one ``Options`` value that ``Problem`` carries whole;
* :meth:`Options.in_use` names the options that differ from their defaults, so an engine
  says what it computes with a set of names (``supports(problem)``) and a new option is
  unsupported, hence routed to the generic path, until its engine says otherwise;
* :func:`untouched` is the quick path's guard (every option left at its default);
* the torch operators' schema, ``Problem.with_arrays`` (fields marked ``array``) and the
  blocks of the loss from hidden states (fields marked ``per_element``, sliced with the
  target's rows) read the fields and their metadata.

Adding an option: a field here (default, check, and ``array``/``per_element`` when it is
an array), its formula in ``_generic`` (the specification), and the keyword in the public
signatures (``_loss``, ``_hidden_states``) with its documentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from . import _validate


class Context(NamedTuple):
    """What the checks of the options may read besides the options checked before them
    (fields are checked in declaration order): the reduction, and the conversion of an
    ``array`` option to the input's library (None where there is no input yet)."""

    reduction: str | None
    to_array: Any


def option(default: Any, check, *, array: bool = False, per_element: bool = False):
    """A field of :class:`Options`: its ``default`` and ``check(value, options, context)``,
    which returns the validated value (``options``: the fields checked before it).

    ``array``: the value may be an array of the input's library (converted by the
    context's ``to_array`` before its check, and by ``Problem.with_arrays``).
    ``per_element``: an array of the target's shape, cut with the target's rows wherever a
    problem is cut into blocks of rows.
    """
    metadata = {"check": check, "array": array or per_element, "per_element": per_element}
    return dataclasses.field(default=default, metadata=metadata)


class Field(NamedTuple):
    """One declared option, as the code reads it."""

    name: str
    default: Any
    check: Any
    array: bool
    per_element: bool


def declaration(cls):
    """Class decorator (after ``@dataclass``): read the declared fields once into
    ``cls._fields``, a tuple of :class:`Field` that compilers trace (they trace neither
    ``dataclasses.fields`` nor the metadata's mapping proxies)."""
    cls._fields = tuple(
        Field(f.name, f.default, f.metadata["check"], f.metadata["array"],
              f.metadata["per_element"])
        for f in dataclasses.fields(cls)
    )  # fmt: skip
    return cls


def _flag(name):
    return lambda value, options, context: _validate.check_flag(value, name)


def _total_weight(value, options, context):
    if value is None:
        return None
    if context.to_array is not None:
        value = context.to_array(value, "total_weight")
    _validate.check_total_weight(value, context.reduction)
    return value


@declaration
@dataclass(frozen=True)
class Options:
    """The options of one loss computation (all at their defaults: torch's ``nll_loss``).

    ``Options()`` is the plain loss. Built by :func:`checked`; see ``nllloss.nll_loss``
    for what each option means.
    """

    from_logits: bool = option(False, _flag("from_logits"))
    label_smoothing: float = option(
        0.0, lambda value, options, context: _validate.check_label_smoothing(value)
    )
    total_weight: Any | None = option(None, _total_weight, array=True)  # noqa: RUF009
    check_targets: bool = option(True, _flag("check_targets"))
    z_loss: float = option(
        0.0, lambda value, options, context: _validate.check_z_loss(value, options["from_logits"])
    )
    softcap: float | None = option(
        None, lambda value, options, context: _validate.check_softcap(value, options["from_logits"])
    )
    # The per-token statistics of the logits with the loss (``_token_stats.loss_and_stats``):
    # every route hands such a problem there, none of the loss engines computes it.
    return_stats: bool = option(
        False,
        lambda value, options, context: _validate.check_return_stats(value, options["from_logits"]),
    )

    def in_use(self) -> frozenset[str]:
        """The names of the options not at their defaults (an array option: given)."""
        return frozenset(
            f.name for f in fields(self) if not _at_default(getattr(self, f.name), f)
        )

    def as_keywords(self) -> dict:
        """``{name: value}`` of the options in use: what a public function takes to solve
        the same problem (one that does not take an option in use refuses it)."""
        return {name: getattr(self, name) for name in self.in_use()}

    def replace(self, **changes: Any) -> Options:
        return dataclasses.replace(self, **changes)

    def with_arrays(self, convert) -> Options:
        """The same options with every array option passed through ``convert`` (None stays)."""
        changes = {
            f.name: convert(getattr(self, f.name))
            for f in fields(self)
            if f.array and getattr(self, f.name) is not None
        }
        return self.replace(**changes) if changes else self

    def per_element(self, cut) -> dict:
        """``{name: cut(array)}`` for the ``per_element`` options given: what a block of
        rows takes of them (a dict of arrays, so that ``lax.scan`` can cut it too)."""
        return {
            f.name: cut(getattr(self, f.name))
            for f in fields(self)
            if f.per_element and getattr(self, f.name) is not None
        }


def fields(options) -> tuple[Field, ...]:
    """The fields of an options value or class (an extended declaration's included)."""
    return options._fields


def _at_default(value: Any, f: Field) -> bool:
    if f.default is None or f.array:
        return value is None
    return type(value) is type(f.default) and value == f.default


# The default objects themselves, by name: ``keywords`` puts them into the public
# signatures, so that ``untouched`` compares identities.
_DEFAULTS = {f.name: f.default for f in fields(Options)}


def names() -> tuple[str, ...]:
    """The options' names, in declaration order."""
    return tuple(_DEFAULTS)


_NAMES = tuple(_DEFAULTS)


def given(arguments: dict) -> dict:
    """The option keywords among a public function's ``arguments`` (its ``locals()``, read
    first thing): ``{name: value}`` for every declared option it takes."""
    return {name: arguments[name] for name in _NAMES if name in arguments}


def checked(values: dict, reduction: str | None = None, to_array=None) -> Options:
    """Validate ``values`` (option name -> value as given; missing ones take their
    defaults) into one :class:`Options`; the errors are ``_validate``'s."""
    context = Context(reduction, to_array)
    done: dict[str, Any] = {}
    for f in fields(Options):
        value = values.get(f.name, f.default)
        done[f.name] = f.check(value, done, context)
    unknown = set(values) - set(done)
    if unknown:
        raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
    return Options(**done)


_DEFAULT_VALUES = tuple(_DEFAULTS.values())


def _untouched_guard():
    """``untouched``, written out from the declaration: one identity test per option, the
    fastest guard Python has (a loop or ``map`` over the names costs 2-3x as much, about
    0.3 us more per call: a seventh of the quick path)."""
    tests = " and ".join(f"arguments[{name!r}] is DEFAULTS[{i}]" for i, name in enumerate(_NAMES))
    return eval(f"lambda arguments: {tests}", {"DEFAULTS": _DEFAULT_VALUES})


# untouched(arguments): whether every option among the ``arguments`` (the ``locals()``) of
# a function that takes them all is its declared default, the very object of the signature
# (an explicit ``0.0`` takes the full path). The quick path's guard: cheaper than a check,
# traceable by torch.compile; a function without one of the options raises KeyError.
untouched = _untouched_guard()


_Function = TypeVar("_Function")  # the decorated function's own type, kept for type checkers


def keywords(function: _Function) -> _Function:
    """Give ``function``'s option keywords the declared defaults (the same objects, for
    :func:`untouched`); a keyword whose default differs from the declaration is an error
    at import."""
    defaults = function.__kwdefaults__ or {}  # type: ignore[attr-defined]
    for name, default in _DEFAULTS.items():
        if name in defaults:
            if defaults[name] != default:
                raise TypeError(
                    f"{function.__qualname__}: option {name} defaults to {defaults[name]!r}, "
                    f"declared {default!r}"
                )
            defaults[name] = default
    return function
