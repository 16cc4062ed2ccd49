"""Every keyword option of the loss, declared once: :class:`Options`.

Each option is one field of :class:`Options`, with its default and its check (the
field's metadata, see :func:`option`). Everything else follows from the declaration:

* the public functions forward their option keywords with :func:`given` (read from their
  own arguments by name: no list of options is written there), and :func:`checked`
  validates them into one ``Options`` value that ``Problem`` carries whole;
* :meth:`Options.in_use` names the options that differ from their defaults, so an engine
  says what it computes with a set of names (``supports(problem)``) and a new option is
  unsupported, hence routed to the generic path, until its engine says otherwise;
* :func:`quick_path` writes a public function's quick-path guard (every option left at
  its default) from its signature;
* the torch operators' schema, ``Problem.with_arrays`` (fields marked ``array``) and the
  blocks of the loss from hidden states (fields marked ``per_element``, sliced with the
  target's rows) read the fields and their metadata.

Adding an option: a field here (default, check, and ``array``/``per_element`` when it is
an array), its formula in ``_generic`` (the specification), and the keyword in the public
signatures (``_loss``, ``_hidden_states``) with its documentation.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
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
    cls._in_use_of = staticmethod(_in_use_function(cls._fields))
    return cls


def _in_use_function(declared: tuple[Field, ...]):
    """``in_use_of(options)``: the names of the options not at their defaults, written out
    from the declaration, one test per field (a loop over the fields costs about 1.3 us
    more per call, a fiftieth of a (64, 10) from-logits forward). An option is at its
    default when it is None for a default of None or an array option, else of the
    default's type and equal to it (``0`` or ``False`` for ``0.0`` is in use)."""
    lines = ["def in_use_of(o):", "    names = []"]
    for i, f in enumerate(declared):
        if f.default is None or f.array:
            away = f"o.{f.name} is not None"
        else:
            away = f"not (type(o.{f.name}) is type(DEFAULTS[{i}]) and o.{f.name} == DEFAULTS[{i}])"
        lines += [f"    if {away}:", f"        names.append({f.name!r})"]
    lines.append("    return frozenset(names)")
    namespace: dict = {"DEFAULTS": tuple(f.default for f in declared)}
    exec("\n".join(lines), namespace)
    return namespace["in_use_of"]


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

    def __post_init__(self):
        # Computed once per value: ``plain``, every engine's ``supports`` and the routes
        # read it on each call.
        object.__setattr__(self, "_in_use", self._in_use_of(self))  # frozen: as __init__ sets

    def in_use(self) -> frozenset[str]:
        """The names of the options not at their defaults (an array option: given; a value
        of another type than the default's, such as a 0-d tensor, counts as given)."""
        return self._in_use

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


# The default objects themselves, by name: ``keywords`` puts them into the public
# signatures, so that ``quick_path``'s guard compares identities.
_DEFAULTS = {f.name: f.default for f in fields(Options)}


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


def quick_path(shortcut_for, takes: tuple[str, ...]):
    """Decorator (applies :func:`keywords`): ``function`` with a guard in front, written
    out from its own signature, that hands its commonest call to a shortcut.

    When every parameter not named in ``takes`` is its default, the very object of the
    signature (every option among them: an explicit ``0.0`` takes the full path),
    ``shortcut_for(first argument)`` gives the shortcut or None, and
    ``shortcut(*takes)`` the result or None; else, or on None, ``function`` computes the
    call. One identity test per parameter, on the arguments themselves: no ``locals()``
    and no list of names (each costs about a third of a microsecond, a sixth of the
    quick path of a (64, 10) forward). The guard is plain Python that torch.compile
    traces.
    """

    def decorate(function):
        function = keywords(function)
        parameters = list(inspect.signature(function).parameters.values())
        defaults = [p.default for p in parameters]
        signature, forwarded, guard = [], [], []
        for i, p in enumerate(parameters):
            if p.kind is p.KEYWORD_ONLY and "*" not in signature:
                signature.append("*")
            default = "" if p.default is p.empty else f"=_q_defaults[{i}]"
            signature.append(f"{p.name}{default}")
            forwarded.append(p.name if p.kind is p.POSITIONAL_OR_KEYWORD else f"{p.name}={p.name}")
            if p.name not in takes:
                guard.append(f"{p.name} is _q_defaults[{i}]")
        # the generated names (``_q_`` prefixed) cannot be a parameter's or the function's
        source = (
            f"def _q_make(_q_defaults, _q_shortcut_for, _q_full):\n"
            f"    def {function.__name__}({', '.join(signature)}):\n"
            f"        if {' and '.join(guard) or 'True'}:\n"
            f"            _q_shortcut = _q_shortcut_for({takes[0]})\n"
            f"            if _q_shortcut is not None:\n"
            f"                _q_result = _q_shortcut({', '.join(takes)})\n"
            f"                if _q_result is not None:\n"
            f"                    return _q_result\n"
            f"        return _q_full({', '.join(forwarded)})\n"
            f"    return {function.__name__}\n"
        )
        if any(p.name.startswith("_q_") for p in parameters):
            raise TypeError(f"{function.__qualname__}: a parameter name starts with _q_")
        namespace: dict = {}
        # the module's globals, so that doctest and the documentation find the function
        exec(source, function.__globals__, namespace)
        guarded = namespace["_q_make"](defaults, shortcut_for, function)
        return functools.update_wrapper(guarded, function)

    return decorate


_Function = TypeVar("_Function")  # the decorated function's own type, kept for type checkers


def keywords(function: _Function) -> _Function:
    """Give ``function``'s option keywords the declared defaults (the same objects, for
    :func:`quick_path`); a keyword whose default differs from the declaration is an error
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
