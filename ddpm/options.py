"""Options declared once: a dataclass field that carries its default, its help text and its rule.

    steps: int = option(20, help="sampling steps (network calls per image)", low=1)

From that one declaration come the command-line flags (:func:`add_flags`, :func:`flag_values`), the
page's API body (serve.py builds it from the same fields) and the one check (:func:`check`, run by
the dataclass's ``__post_init__``), which raises :class:`OutOfRange` naming the field. A front end
spells field names its own way (``--steps`` on a command line, ``steps`` in JSON) through
:meth:`InvalidRequest.render`, so a bad value gets the same message everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

from runtime.errors import UserError


class InvalidRequest(UserError):
    """A request the pipeline refuses. ``field`` is the input at fault; the message names inputs by
    their parameter names, and :meth:`render` spells them otherwise (as ``--flags``, say)."""

    def __init__(self, field: str, template: str, **values: object):
        self.field, self.template, self.values = field, template, values
        super().__init__(self.render(lambda name: name))

    def render(self, spell: Callable[[str], str]) -> str:
        return self.template.format_map(_Names(spell, self.values))


class OutOfRange(InvalidRequest):
    """A value outside what the sampler or the model can take."""


class _Names(dict):
    def __init__(self, spell: Callable[[str], str], values: dict):
        super().__init__(values)
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)


@contextmanager
def refused_as(spell: Callable[[str], str]) -> Iterator[None]:
    """Turn an InvalidRequest raised inside into a UserError whose message spells names with ``spell``."""
    try:
        yield
    except InvalidRequest as err:
        raise UserError(err.render(spell)) from None


@dataclass(frozen=True)
class Option:
    """What a declared field takes, beyond its type and default.

    ``choices``: the values allowed. ``low`` / ``high``: inclusive bounds (NaN is refused).
    ``only_with=(other, value)``: the field may be set (not None) only while field ``other`` is ``value``.
    ``interval``: a pair (low, high) with 0 <= low < high (high may be inf). ``name``: the field as the
    front ends spell it, when not its own name. ``metavar``: the flag's placeholder(s).
    """

    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    only_with: tuple[str, object] | None = None
    interval: bool = False
    name: str | None = None
    metavar: str | tuple[str, ...] | None = None

    @property
    def has_rule(self) -> bool:
        """Whether some value of the field is refused."""
        bounded = self.low is not None or self.high is not None
        return bool(self.choices) or bounded or self.only_with is not None or self.interval

    def check(self, field: str, value: Any, owner: object) -> None:
        """Raise OutOfRange if ``value`` of ``field`` (an attribute of ``owner``) breaks this rule."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise OutOfRange(
                field, f"{{{field}}} must be one of {', '.join(self.choices)}, got {{value!r}}", value=value
            )
        if not self._in_range(value):
            raise OutOfRange(field, f"{{{field}}} must be {self._range()}, got {{value}}", value=value)
        if self.interval and not 0 <= value[0] < value[1]:
            pair = " ".join(f"{x:g}" for x in value)
            raise OutOfRange(field, f"{{{field}}} must be two noise levels 0 <= low < high, got {{value}}", value=pair)
        if self.only_with is not None and getattr(owner, self.only_with[0]) != self.only_with[1]:
            other, wanted = self.only_with
            raise OutOfRange(
                field,
                f"{{{field}}} only applies to {{{other}}} {wanted}, not {{value}}; "
                f"drop {{{field}}} or use {{{other}}} {wanted}",
                value=getattr(owner, other),
            )

    def _in_range(self, value: float) -> bool:
        above = self.low is None or value >= self.low  # written so that NaN fails
        return above and (self.high is None or value <= self.high)

    def _range(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in [{low}, {high}]"
        if self.high is not None:
            return f"at most {high}"
        return f"at least {low}" if self.low > 0 else f">= {low}"  # counts; non-negative values


def _number(value: float | None) -> str | None:
    """A bound as a person writes it: integers whole (a seed's 9007199254740991), others short."""
    return None if value is None else str(value) if isinstance(value, int) else f"{value:g}"


def option(default: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field with its default and its :class:`Option` (``help`` and the rule) as metadata."""
    return dataclasses.field(default=default, metadata={"option": Option(**rule)})


def declared(cls: type) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of dataclass ``cls`` that are declared options, in order, with their Option."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def check(instance: object) -> None:
    """Raise OutOfRange for the first declared field of ``instance`` whose value breaks its rule."""
    for f, rule in declared(type(instance)):
        rule.check(f.name, getattr(instance, f.name), instance)


def front_name(cls: type, name: str) -> str:
    """Field ``name`` of ``cls`` as the front ends spell it (its Option's ``name``, else its own)."""
    rules = {f.name: rule for f, rule in declared(cls)}
    return (rules[name].name if name in rules else None) or name


@cache
def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(the type of field ``name`` of ``cls`` without None, whether None is allowed)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        return kinds[0], len(kinds) < len(typing.get_args(hint))
    return hint, False


def shown(value: Any) -> str:
    """A default as a flag's help shows it: tuples as their items, numbers in short form."""
    if isinstance(value, tuple):
        return " ".join(shown(x) for x in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _selected(cls: type, only: Iterable[str] | None, skip: Iterable[str]) -> Iterator[tuple[dataclasses.Field, Option]]:
    only, skip = None if only is None else set(only), set(skip)
    return ((f, rule) for f, rule in declared(cls) if (only is None or f.name in only) and f.name not in skip)


def add_flags(
    parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None, skip: Iterable[str] = ()
) -> None:
    """A ``--flag`` per declared field of ``cls`` (all, those in ``only``, less those in ``skip``).

    The flag's value is stored under the field's name; its type, arity and default come from the field.
    Values are checked by the declaration (:func:`check`), not by argparse, so that a bad value gets
    the same message from every front end; choices are only shown, as the flag's placeholder.
    """
    for f, rule in _selected(cls, only, skip):
        kind, _ = field_type(cls, f.name)
        flag, required = f"--{rule.name or f.name}", f.default is dataclasses.MISSING
        spec: dict[str, Any] = {"dest": f.name, "help": rule.help}
        if kind is bool:
            spec["action"] = "store_true"
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[-1] is Ellipsis:  # repeat the flag
            spec.update(action="append", type=typing.get_args(kind)[0], required=required, metavar=flag[2:].upper())
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            spec.update(nargs=len(items), type=items[0], metavar=rule.metavar)
        else:
            spec.update(
                type=kind, metavar=rule.metavar or ("{" + ",".join(rule.choices) + "}" if rule.choices else None)
            )
        if not required:
            spec["default"] = f.default
            if f.default not in (None, "") and kind is not bool:
                spec["help"] += f" (default: {shown(f.default)})"
        parser.add_argument(flag, **spec)


def flag_values(
    args: argparse.Namespace, cls: type, *, only: Iterable[str] | None = None, skip: Iterable[str] = ()
) -> dict[str, Any]:
    """The values of the flags :func:`add_flags` made, by field name (lists of fixed length as tuples)."""
    values = {}
    for f, _ in _selected(cls, only, skip):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def to_json(value: Any) -> Any:
    """A value as JSON holds it (a tuple becomes an array): a pair's open end, inf, as None (null);
    :func:`from_json` undoes it."""
    if isinstance(value, tuple):
        return tuple(None if isinstance(x, float) and math.isinf(x) else x for x in value)
    return value


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`: a list as a tuple, its None as inf."""
    return tuple(math.inf if x is None else x for x in value) if isinstance(value, (list, tuple)) else value
