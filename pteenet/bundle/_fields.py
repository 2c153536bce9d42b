"""Defensive reading of pteenet's own JSON: every malformed field is one BundleError line.

A bundle or table may have been edited, truncated or crafted: nothing read from it is trusted
before it is checked, and no parser error escapes as an internal one.
"""

from __future__ import annotations

import json
from typing import Any

from pteenet.errors import BundleError

__all__ = ["INT64_MAX", "count", "int_list", "need", "parse_json", "show"]

_MAX_DIGITS = 19  # no integer of ours needs more (int64)
INT64_MAX = (1 << 63) - 1  # FLOPs, widths and sizes become torch int64 tensors
_SHOW = 60  # longest value echoed in an error message
_MAX_DEPTH = 32  # pteenet's own JSON nests a few levels; deeper is an edit, refused the same way


class _TooLong(ValueError):
    """An integer with more digits than any field of ours can hold."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise _TooLong(text)
    return int(text)


def parse_json(data: str | bytes, what: str, fix: str) -> Any:
    """``json.loads`` whose every failure (bad syntax or UTF-8, deep nesting, integers too long
    to be ours) is one BundleError line, so no parser error escapes as an internal one."""
    try:
        doc = json.loads(data, parse_int=_bounded_int)
        if _depth(doc) > _MAX_DEPTH:
            raise RecursionError
        return doc
    except _TooLong as e:
        raise BundleError(f"{what} holds an integer of {len(str(e))} digits (edited?); {fix}") \
            from None
    except RecursionError:
        raise BundleError(f"{what} is nested too deeply to be pteenet's (edited?); {fix}") \
            from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{what} is not valid JSON (edited?); {fix}") from e


def _depth(doc: Any) -> int:
    """How deeply lists and objects nest (iteratively: the document may be deeper than the
    interpreter's recursion limit allows a recursive walk)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def show(value: Any) -> str:
    """A value for an error message, cut short: an edited file may hold anything."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOW else text[:_SHOW] + "..."


def need(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d or not isinstance(d[key], kind) or \
            isinstance(d[key], bool) and kind is int:
        raise BundleError(
            f"{where}: field '{key}' is missing or malformed; re-run `pteenet attach`")
    return d[key]


def count(d: Any, key: str, where: str, low: int = 0, optional: bool = False) -> int | None:
    """Field ``key`` of ``d`` as an integer in [``low``, int64's largest] (None when it is
    ``optional`` and absent): a width of "wide" or FLOPs past int64 would otherwise fail deep
    inside torch as a TypeError or an OverflowError."""
    if optional and (not isinstance(d, dict) or d.get(key) is None):
        return None
    v = need(d, key, int, where)
    if not low <= v <= INT64_MAX:
        raise BundleError(f"{where}: field '{key}' is out of range ({show(v)}); re-run "
                          f"`pteenet attach`")
    return v


def int_list(v: Any, key: str, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                          and 0 <= x <= INT64_MAX for x in v):
        raise BundleError(f"{where}: field '{key}' is malformed; re-run `pteenet attach`")
    return v
