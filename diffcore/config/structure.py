"""Strict structuring of plain data into attrs configs, with every problem reported by path.

cattrs does the walking; these hooks make scalars strict (``"no"`` is not ``True``, ``1.5`` is not an
int) and turn cattrs' exception groups into :class:`~diffcore.errors.Problem` lists with a
``$.dotted.path``, what was expected and a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from diffcore.errors import ConfigError, Problem

T = TypeVar("T")

_INT = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ExpectedError(ValueError):
    """A value of the wrong kind; the message says what was expected."""


_SHORT = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 36


def _describe(value: Any) -> str:
    # bounded by construction: a value can be a huge shared structure (YAML aliases), so never repr it whole
    text = _SHORT.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(value: Any, _: type) -> int:
    if isinstance(value, bool):
        raise ExpectedError(f"expected an integer, got {_describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value)
    raise ExpectedError(f"expected an integer, got {_describe(value)}")


def _float(value: Any, _: type) -> float:
    if isinstance(value, bool):
        raise ExpectedError(f"expected a number, got {_describe(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ExpectedError(f"expected a number, got {_describe(value)}")


def _bool(value: Any, _: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ExpectedError(f"expected true or false, got {_describe(value)}")


def _str(value: Any, _: type) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ExpectedError(f"expected a string, got {_describe(value)}")


def _is_literal(tp: Any) -> bool:
    return get_origin(tp) is Literal


def _literal(value: Any, tp: Any) -> Any:
    choices = get_args(tp)
    if value in choices and not (isinstance(value, bool) and True in choices and value is not True):
        return value
    if isinstance(value, str):
        for choice in choices:
            if isinstance(choice, str) and choice.lower() == value.lower():
                return choice
    options = ", ".join(repr(c) for c in choices)
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    raise ExpectedError(f"expected one of {options}, got {_describe(value)}{hint}")


def _any(value: Any, _: type) -> Any:
    return value


def make_converter() -> cattrs.Converter:
    """The converter every config in diffcore is structured with."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(float, _float)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook(typing.Any, _any)
    conv.register_structure_hook_func(_is_literal, _literal)
    return conv


CONVERTER = make_converter()


def problems_of(exc: BaseException, path: str, cls: Any = None) -> list[Problem]:
    """Flatten a cattrs exception (group) into problems with dotted paths."""
    out: list[Problem] = []
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            out.extend(problems_of(sub, f"{path}.{note.name}", note.type))
        for sub in without:
            out.extend(problems_of(sub, path, exc.cl))
    elif isinstance(exc, IterableValidationError):
        indexed, unindexed = exc.group_exceptions()
        for sub, item in indexed:
            out.extend(problems_of(sub, f"{path}[{item.index}]", item.type))
        for sub in unindexed:
            out.extend(problems_of(sub, path))
    elif isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            out.append(Problem(f"{path}.{key}", f"unknown key{hint}"))
    elif isinstance(exc, KeyError):
        out.append(Problem(path, "required key missing"))
    elif isinstance(exc, ExpectedError):
        out.append(Problem(path, str(exc)))
    elif isinstance(exc, ConfigError):
        out.extend(exc.problems)
    elif isinstance(exc, AttributeError) and "items" in str(exc):
        out.append(Problem(path, "expected a mapping of keys to values"))
    elif isinstance(exc, (TypeError, ValueError)):
        name = getattr(cls, "__name__", None) or (repr(cls) if cls is not None else "")
        detail = str(exc) or type(exc).__name__
        out.append(Problem(path, f"invalid value ({detail})" + (f", expected {name}" if name else "")))
    else:
        out.append(Problem(path, f"{type(exc).__name__}: {exc}"))
    return out


def structure(data: Any, cls: type[T], path: str = "$", converter: cattrs.Converter | None = None) -> T:
    """Structure ``data`` into ``cls``; raise :class:`ConfigError` listing every problem."""
    conv = converter or CONVERTER
    if data is None:
        data = {}
    if attrs.has(cls) and not isinstance(data, dict):
        raise ConfigError([Problem(path, f"expected a mapping of keys to values, got {_describe(data)}")])
    try:
        return conv.structure(data, cls)
    except Exception as exc:  # cattrs raises groups of many kinds; all become problems
        problems = problems_of(exc, path, cls)
        problems += _validator_problems(data, cls, path, {p.path for p in problems}, conv)
        raise ConfigError(problems) from None


def _validator_problems(
    data: Any, cls: Any, path: str, known: set[str], conv: cattrs.Converter
) -> list[Problem]:
    """Range checks of the fields that did structure, which cattrs skips once any field failed."""
    if not attrs.has(cls) or not isinstance(data, dict):
        return []
    out = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        where = f"{path}.{field.name}"
        if field.validator is None or field.name not in data or where in known:
            continue
        try:
            value = conv.structure(data[field.name], field.type)
        except Exception:
            continue
        try:
            field.validator(None, field, value)
        except ExpectedError as exc:
            out.append(Problem(where, str(exc)))
        except (TypeError, ValueError) as exc:
            out.append(Problem(where, f"invalid value ({exc})"))
    return out


def unstructure(obj: Any) -> Any:
    return CONVERTER.unstructure(obj)
